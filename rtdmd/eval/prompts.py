"""Evaluation prompts per reward dataset (data_and_eval.md §4.2).

``load_eval_prompts(root, dataset, cap)`` looks in ``root/dataset/`` for the first of
``test.txt, test.jsonl, test_metadata.jsonl, prompts.json, prompts.txt, metadata.jsonl`` and keeps
the **first** ``cap`` prompts in file order (``cap <= 0``: all), metadata sliced alike. A prepared
directory (``root/manifest.json`` from ``rtdmd.data.prepare``) is read through its ``test`` split
instead, checksums verified.

Eval-side metadata (differs from the training reader, as in the reference): ``.txt`` and ``.json``
string lists give ``None``; a ``.jsonl`` object line gives the whole object; a ``.jsonl`` string
line gives ``{"text": line}``.

``toy2d`` is a built-in dataset: when ``root/toy2d/`` has no prompt file, the class names of the
toy2d backbone are used (one prompt per class); :func:`ensure_toy2d_prompts` writes them as
``test.txt`` / ``train.txt`` for the trainers.

Loaded sets are cached per ``(root, dataset, cap)`` and file checksum. Errors:
:class:`MissingDatasetError` (a ``FileNotFoundError``) names the reward(s) routed to the dataset and
every path looked at; :class:`EmptyPromptsError` (a ``ValueError``) a file with no prompts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

TEST_FILES = ("test.txt", "test.jsonl", "test_metadata.jsonl", "prompts.json", "prompts.txt", "metadata.jsonl")
BUILTIN_DATASETS = ("toy2d",)


class MissingDatasetError(FileNotFoundError):
    """No prompt file for a dataset a reward is routed to."""


class EmptyPromptsError(ValueError):
    """A prompt source holds no prompts."""


@dataclass
class EvalPrompts:
    dataset: str
    prompts: list[str]
    metadata: list[Any] | None  # None when every item has no metadata (plain text sources)
    source: str
    sha256: str
    total: int  # prompts in the source before the cap
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def describe(self) -> dict:
        return {"dataset": self.dataset, "source": self.source, "sha256": self.sha256,
                "num_prompts": len(self.prompts), "total_in_source": self.total}


_CACHE: dict[tuple, EvalPrompts] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_test_file(directory: Path) -> Path | None:
    for name in TEST_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def _read_raw(path: Path) -> tuple[list[str], list[Any]]:
    from rtdmd.data.formats import read_prompts

    records = read_prompts(path)
    ext = path.suffix.lower()
    prompts, metadata = [], []
    for r in records:
        prompts.append(r.text)
        if ext == ".jsonl":
            metadata.append(r.metadata if isinstance(r.metadata, dict) else {"text": str(r.text)})
        else:
            metadata.append(r.metadata if isinstance(r.metadata, dict) else None)
    return prompts, metadata


def _builtin(dataset: str) -> tuple[list[str], list[Any], str, str]:
    if dataset == "toy2d":
        from rtdmd.backbones.toy2d import CLASS_NAMES

        text = "\n".join(CLASS_NAMES)
        return list(CLASS_NAMES), [None] * len(CLASS_NAMES), "builtin:toy2d", _sha(text.encode())
    raise KeyError(dataset)


def load_eval_prompts(root: str | Path, dataset: str, cap: int = 0, *, rewards: Sequence[str] = ()) -> EvalPrompts:
    """Prompts (+ metadata) of ``dataset`` under ``root``; see the module docstring."""
    root = Path(root)
    who = f" (routed from reward{'s' if len(rewards) > 1 else ''} {', '.join(rewards)})" if rewards else ""
    if not dataset or "/" in dataset or dataset in (".", ".."):
        raise MissingDatasetError(f"invalid dataset name {dataset!r}{who}")
    if (root / "manifest.json").is_file():
        from rtdmd.data.formats import read_prepared

        try:
            rows = read_prepared(root, dataset, "test")
        except FileNotFoundError:
            raise MissingDatasetError(
                f"dataset '{dataset}'{who} has no test split in the prepared directory {root} "
                f"(expected {root / dataset / 'test.jsonl'}); add it to the prepare stage or fix eval.reward_dataset_map"
            ) from None
        prompts = [r["text"] for r in rows]
        metadata = [r.get("metadata") for r in rows]
        source = str(root / dataset / "test.jsonl")
        digest = _sha((root / dataset / "test.jsonl").read_bytes())
    else:
        path = find_test_file(root / dataset)
        if path is None:
            if dataset in BUILTIN_DATASETS:
                prompts, metadata, source, digest = _builtin(dataset)
            else:
                raise MissingDatasetError(
                    f"dataset '{dataset}'{who}: no prompt file in {root / dataset}/ (looked for "
                    f"{', '.join(TEST_FILES)}). Build the prompt sets (python -m rtdmd.data.builtin --out {root}), "
                    "point eval.datasets_root at them, or route the reward elsewhere with eval.reward_dataset_map"
                )
        else:
            digest = _sha(path.read_bytes())
            key = (str(root.resolve()), dataset, int(cap), digest)
            if key in _CACHE:
                return _CACHE[key]
            prompts, metadata = _read_raw(path)
            source = str(path)
    total = len(prompts)
    if total == 0:
        raise EmptyPromptsError(f"dataset '{dataset}'{who}: {source} holds no prompts")
    if cap and cap > 0:
        prompts, metadata = prompts[:cap], metadata[:cap]
    if all(m is None for m in metadata):
        metadata = None
    out = EvalPrompts(dataset=dataset, prompts=list(prompts), metadata=metadata, source=source, sha256=digest,
                      total=total)
    _CACHE[(str(root.resolve()), dataset, int(cap), digest)] = out
    return out


def inline_prompts(prompts: Sequence[str] | None = None, prompt_file: str | Path | None = None,
                   name: str = "prompts") -> EvalPrompts:
    """Inline prompts first, then a prompt file (any supported format) — the CLI source."""
    items = [p for p in (prompts or [])]
    bad = [p for p in items if not isinstance(p, str) or not p.strip()]
    if bad:
        raise EmptyPromptsError(f"prompts must be non-empty strings, got {bad[:3]!r}")
    metadata: list[Any] = [None] * len(items)
    digest_src = json.dumps(items).encode()
    source = "inline"
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        more, md = _read_raw(path)
        items += more
        metadata += md
        digest_src += path.read_bytes()
        source = f"inline+{path}" if prompts else str(path)
    if not items:
        raise EmptyPromptsError("no prompts given: pass --prompt TEXT (repeatable) or --prompt-file PATH")
    return EvalPrompts(dataset=name, prompts=items, metadata=None if all(m is None for m in metadata) else metadata,
                       source=source, sha256=_sha(digest_src), total=len(items))


def ensure_toy2d_prompts(root: str | Path = "data/prompts") -> Path:
    """Write ``root/toy2d/{test,train}.txt`` (the class names) when missing; returns the dir."""
    from rtdmd.artifacts.fs import atomic_write_bytes
    from rtdmd.backbones.toy2d import CLASS_NAMES

    d = Path(root) / "toy2d"
    for name in ("test.txt", "train.txt"):
        if not (d / name).is_file():  # renamed into place: a concurrent reader never sees it half-written
            atomic_write_bytes(d / name, ("\n".join(CLASS_NAMES) + "\n").encode("utf-8"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def expand(prompts: EvalPrompts, samples_per_prompt: int) -> tuple[list[str], list[Any] | None]:
    """Each prompt repeated ``samples_per_prompt`` times consecutively (index = p*k + j)."""
    k = int(samples_per_prompt)
    texts = [p for p in prompts.prompts for _ in range(k)]
    md = None if prompts.metadata is None else [m for m in prompts.metadata for _ in range(k)]
    return texts, md


def class_points(samples: torch.Tensor, texts: Sequence[str], indices: Sequence[int]) -> dict[int, torch.Tensor]:
    """toy2d: rows of ``samples`` (sample ``indices[row]`` of prompts ``texts``) grouped by class index."""
    from rtdmd.backbones.toy2d import class_index_of  # lazy: torch

    by_class: dict[int, list[int]] = {}
    for row, i in enumerate(indices):
        by_class.setdefault(class_index_of(texts[i]), []).append(row)
    return {c: samples[rows] for c, rows in sorted(by_class.items())}
