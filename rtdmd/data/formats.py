"""Prompt file formats: raw (reference layout) readers/writers and the prepared, normalised form.

Raw formats (data_and_eval.md §1–2), chosen by extension, case-insensitive:

* ``.txt`` / ``.text`` — one prompt per line; lines are stripped, blank lines skipped.
* ``.jsonl`` — one item per non-blank line: an object gives ``prompt`` (else ``text``, else ""),
  a string is the prompt; GenEval lines (``tag/include/exclude/prompt``) and GenEval2 lines
  (``prompt/atom_count/vqa_list/skills``) keep the whole object as metadata.
* ``.json`` — a non-empty list of strings or of objects with ``prompt`` / ``text``.

Readers work on bytes and split on ``\\n`` only, so every record knows its 1-based source line
(``.json`` items carry their 1-based item number instead). A UTF-8 BOM is dropped and CRLF
endings are accepted. With ``strict=True`` (the default for library use) invalid UTF-8 and
unparseable JSON raise :class:`PromptFormatError` naming file and line; with ``strict=False``
(used by the prep stage) the bad bytes are kept as surrogate escapes and parse errors are kept on
the record, so the great-expectations validation reports every bad line at once.

Prepared form (output of :mod:`rtdmd.data.prepare`): ``<out>/<dataset>/<split>.jsonl``, one
object per prompt ``{id, text, dataset, split, metadata, source, line}`` where ``id`` is
``sha256(dataset + "\\x00" + text)[:16]`` (stable across runs and machines), plus
``<out>/manifest.json`` written last; the directory is built in a temp sibling and renamed into
place, so a reader either sees a complete set with its manifest or the previous one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import unicodedata
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from rtdmd.artifacts.fs import ArtifactError, check_manifest_paths, remove_path
from rtdmd.data import schema

BOM = b"\xef\xbb\xbf"
TEXT_EXTS = (".txt", ".text")
PREPARED_FORMAT = "rtdmd.prepared_prompts"
PREPARED_VERSION = 1
MANIFEST = "manifest.json"
ID_CHARS = 16
_WS = re.compile(r"\s+")


class PromptFormatError(ValueError):
    """A prompt file cannot be read; the message names the file (and line when known)."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        super().__init__(message)
        self.source = source
        self.line = line


@dataclasses.dataclass
class PromptRecord:
    """One prompt as read from a raw file.

    ``metadata`` is the whole object for dict rows (jsonl/json), ``None`` for plain strings.
    ``line`` is the 1-based source line (``item`` number for ``.json``). ``parse_error`` is set
    (and ``text`` is None) only in non-strict reads.
    """

    text: str | None
    metadata: dict | None = None
    source: str = ""
    line: int = 0
    parse_error: str | None = None

    def item(self, return_metadata: bool = False) -> Any:
        """The reference ``PromptDataset`` item: the prompt, or ``{"prompt", "metadata"}``."""
        if not return_metadata:
            return self.text
        return {"prompt": self.text, "metadata": self.metadata if self.metadata is not None else {"prompt": self.text}}


# ----------------------------------------------------------------------------- normalisation
def normalise_text(text: str) -> str:
    """BOM dropped, Unicode NFC, every whitespace run (incl. CR/LF/tab) -> one space, stripped.

    Lone surrogates (undecodable bytes kept by a non-strict read) survive NFC untouched so the
    validation can still point at them.
    """
    text = text.lstrip("\ufeff")
    try:
        text = unicodedata.normalize("NFC", text)
    except UnicodeError:  # pragma: no cover - NFC does not raise on surrogates in CPython
        pass
    return _WS.sub(" ", text).strip()


def prompt_id(dataset: str, text: str) -> str:
    """Stable id of a prompt within a dataset: ``sha256(dataset NUL text)`` truncated to 16 hex."""
    raw = f"{dataset}\x00{text}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()[:ID_CHARS]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- raw readers
def iter_lines(data: bytes, source: str, *, strict: bool = True, max_line_bytes: int | None = None):
    """Yield ``(line_no, text)`` for every line of ``data`` (split on LF only; CR, BOM dropped)."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    for no, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if max_line_bytes is not None and len(raw) > max_line_bytes:
            raise PromptFormatError(
                f"{source}:{no}: line is {len(raw)} bytes, above the reader limit of {max_line_bytes}",
                source=source, line=no,
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if strict:
                raise PromptFormatError(
                    f"{source}:{no}: invalid UTF-8 at byte {exc.start} of the line ({raw[exc.start:exc.start + 4]!r})",
                    source=source, line=no,
                ) from None
            text = raw.decode("utf-8", "surrogateescape")
        yield no, text


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PromptFormatError(f"{path}: cannot read: {exc}", source=str(path)) from None


def read_text(path: str | Path, *, strict: bool = True, max_line_bytes: int | None = None) -> list[PromptRecord]:
    path = Path(path)
    out = []
    for no, line in iter_lines(_read_bytes(path), str(path), strict=strict, max_line_bytes=max_line_bytes):
        if line.strip():
            out.append(PromptRecord(text=line.strip(), source=str(path), line=no))
    return out


def _item_to_record(item: Any, source: str, line: int, strict: bool, where: str) -> PromptRecord:
    if isinstance(item, dict):
        text = item.get("prompt", item.get("text", ""))
        if not isinstance(text, str):
            msg = f"{where}: 'prompt'/'text' must be a string, got {type(text).__name__}"
            if strict:
                raise PromptFormatError(msg, source=source, line=line)
            return PromptRecord(text=None, metadata=item, source=source, line=line, parse_error=msg)
        return PromptRecord(text=text, metadata=item, source=source, line=line)
    if isinstance(item, str):
        return PromptRecord(text=item, source=source, line=line)
    msg = f"{where}: item must be an object or a string, got {type(item).__name__}"
    if strict:
        raise PromptFormatError(msg, source=source, line=line)
    return PromptRecord(text=None, source=source, line=line, parse_error=msg)


def read_jsonl(path: str | Path, *, strict: bool = True, max_line_bytes: int | None = None) -> list[PromptRecord]:
    path = Path(path)
    out = []
    for no, line in iter_lines(_read_bytes(path), str(path), strict=strict, max_line_bytes=max_line_bytes):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            msg = f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
            if strict:
                raise PromptFormatError(msg, source=str(path), line=no) from None
            out.append(PromptRecord(text=None, source=str(path), line=no, parse_error=msg))
            continue
        out.append(_item_to_record(item, str(path), no, strict, where))
    return out


def read_json(path: str | Path, *, strict: bool = True, max_line_bytes: int | None = None) -> list[PromptRecord]:
    """A ``.json`` list; records carry their 1-based item number in ``line``."""
    path = Path(path)
    data = _read_bytes(path)
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        if strict:
            raise PromptFormatError(f"{path}:{line}: invalid UTF-8", source=str(path), line=line) from None
        text = data.decode("utf-8", "surrogateescape")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", source=str(path), line=exc.lineno) from None
    if not isinstance(items, list) or not items:
        raise PromptFormatError(f"{path}: a .json prompt file must hold a non-empty list", source=str(path))
    return [_item_to_record(it, str(path), i, strict, f"{path}: item {i}") for i, it in enumerate(items, start=1)]


def read_prompts(path: str | Path, *, strict: bool = True, max_line_bytes: int | None = None) -> list[PromptRecord]:
    """Read any raw prompt file by extension (case-insensitive)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext in TEXT_EXTS:
        return read_text(path, strict=strict, max_line_bytes=max_line_bytes)
    if ext == ".jsonl":
        return read_jsonl(path, strict=strict, max_line_bytes=max_line_bytes)
    if ext == ".json":
        return read_json(path, strict=strict, max_line_bytes=max_line_bytes)
    raise PromptFormatError(f"{path}: unsupported prompt file extension {path.suffix!r} (.txt, .text, .jsonl, .json)", source=str(path))


# ----------------------------------------------------------------------------- raw writers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _texts(items: Iterable[Any]) -> list[str]:
    out = []
    for it in items:
        if isinstance(it, PromptRecord):
            it = it.text
        elif isinstance(it, Mapping):
            it = it.get("prompt", it.get("text"))
        if not isinstance(it, str):
            raise PromptFormatError(f"cannot write a {type(it).__name__} as a prompt")
        out.append(it)
    return out


def write_text(path: str | Path, prompts: Iterable[Any]) -> None:
    """One prompt per line, LF endings, trailing newline; prompts must be single-line."""
    texts = _texts(prompts)
    for i, t in enumerate(texts):
        if "\n" in t or "\r" in t or not t.strip():
            raise PromptFormatError(f"prompt {i} is empty or spans lines; cannot write it to a .txt file")
    _atomic_write_bytes(Path(path), "".join(t + "\n" for t in texts).encode("utf-8"))


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _as_objects(rows: Iterable[Any]) -> list[Any]:
    return [r.metadata if isinstance(r, PromptRecord) and r.metadata is not None else (r.text if isinstance(r, PromptRecord) else r) for r in rows]


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """Generic jsonl: objects or strings, one per line."""
    _atomic_write_bytes(Path(path), "".join(_dump(r) + "\n" for r in _as_objects(rows)).encode("utf-8"))


def write_json(path: str | Path, rows: Iterable[Any]) -> None:
    """A ``.json`` list of strings or objects."""
    rows = _as_objects(rows)
    if not rows:
        raise PromptFormatError(f"{path}: refusing to write an empty .json prompt list")
    _atomic_write_bytes(Path(path), (json.dumps(rows, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))


def geneval_line(meta: Mapping) -> dict:
    """Canonical key order of a GenEval line: tag, include, exclude?, prompt."""
    out = {"tag": meta["tag"], "include": meta["include"]}
    if "exclude" in meta:
        out["exclude"] = meta["exclude"]
    out["prompt"] = meta["prompt"]
    return out


def geneval2_line(meta: Mapping) -> dict:
    return {k: meta[k] for k in ("prompt", "atom_count", "vqa_list", "skills")}


def write_geneval_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """GenEval metadata jsonl; every row is checked against the schema first."""
    metas = [r.metadata if isinstance(r, PromptRecord) else r for r in rows]
    for i, m in enumerate(metas):
        errs = schema.geneval_errors(m)
        if errs:
            raise PromptFormatError(f"{path}: row {i} is not a valid GenEval line: {'; '.join(errs)}")
    write_jsonl(path, [geneval_line(m) for m in metas])


def write_geneval2_jsonl(path: str | Path, rows: Iterable[Any], *, answers: tuple[str, ...] | None = schema.GENEVAL2_ANSWERS) -> None:
    metas = [r.metadata if isinstance(r, PromptRecord) else r for r in rows]
    for i, m in enumerate(metas):
        errs = schema.geneval2_errors(m, answers=answers)
        if errs:
            raise PromptFormatError(f"{path}: row {i} is not a valid GenEval2 line: {'; '.join(errs)}")
    write_jsonl(path, [geneval2_line(m) for m in metas])


def write_prompts(path: str | Path, rows: Iterable[Any]) -> None:
    """Write by extension: ``.txt`` text, ``.jsonl`` objects/strings, ``.json`` list."""
    ext = Path(path).suffix.lower()
    if ext in TEXT_EXTS:
        return write_text(path, rows)
    if ext == ".jsonl":
        return write_jsonl(path, rows)
    if ext == ".json":
        return write_json(path, rows)
    raise PromptFormatError(f"{path}: unsupported prompt file extension {Path(path).suffix!r}")


# ----------------------------------------------------------------------------- reference layout
TRAIN_FILES = ("train.txt", "train.jsonl", "train_metadata.jsonl", "prompts.json", "prompts.txt")
TRAIN_FILES_METADATA = ("train_metadata.jsonl",) + tuple(f for f in TRAIN_FILES if f != "train_metadata.jsonl")
TEST_FILES = ("test.txt", "test.jsonl", "test_metadata.jsonl", "prompts.json", "prompts.txt", "metadata.jsonl")


def resolve_prompt_file(directory: str | Path, split: str = "train", *, return_metadata: bool = False) -> Path:
    """The reference's file lookup in a dataset directory (data_and_eval.md §2 and §4.2)."""
    directory = Path(directory)
    if directory.is_file():
        return directory
    if split == "train":
        names = TRAIN_FILES_METADATA if return_metadata else TRAIN_FILES
    elif split == "test":
        names = TEST_FILES
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {split} prompt file in {directory}; looked for {', '.join(names)}")


# ----------------------------------------------------------------------------- prepared form
def prepared_path(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / dataset / f"{split}.jsonl"


def prepared_record(dataset: str, split: str, text: str, metadata: dict | None, source: str, line: int, *, rid: str | None = None) -> dict:
    return {
        "id": rid or prompt_id(dataset, text),
        "text": text,
        "dataset": dataset,
        "split": split,
        "metadata": metadata,
        "source": source,
        "line": line,
    }


def encode_prepared(records: Iterable[Mapping]) -> bytes:
    return "".join(json.dumps(dict(r), ensure_ascii=False, sort_keys=False) + "\n" for r in records).encode("utf-8")


def publish_prepared(out_dir: str | Path, files: Mapping[str, bytes], manifest: dict) -> Path:
    """Atomically publish ``files`` (relative path -> bytes) plus ``manifest.json`` under ``out_dir``.

    Everything goes into a temp sibling directory first; ``manifest["files"]`` gets the sha256,
    size and row count of each file; the manifest is written last; the temp directory is then
    renamed over ``out_dir`` (the previous version is moved aside and removed only after the new
    one is in place). Returns the manifest path.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:10]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        entries = {}
        for rel, data in sorted(files.items()):
            if Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MANIFEST:
                raise ValueError(f"bad prepared file name {rel!r}")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "rows": data.count(b"\n")}
        manifest = dict(manifest)
        manifest["files"] = entries
        manifest["data_version"] = hashlib.sha256(
            "".join(f"{k}\x00{v['sha256']}\n" for k, v in sorted(entries.items())).encode()
        ).hexdigest()
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, ensure_ascii=False, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            remove_path(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST


def read_manifest(root: str | Path, *, verify: bool = True) -> dict:
    """Load ``manifest.json`` of a prepared directory; with ``verify`` check every file's sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise PromptFormatError(f"{root}: no {MANIFEST}; not a (complete) prepared prompt directory", source=str(root))
    manifest = json.loads(path.read_text(encoding="utf-8"))
    try:
        check_manifest_paths(manifest, str(path))
    except ArtifactError as exc:
        raise PromptFormatError(str(exc), source=str(path)) from None
    if manifest.get("format") != PREPARED_FORMAT:
        raise PromptFormatError(f"{path}: format {manifest.get('format')!r} is not {PREPARED_FORMAT!r}")
    if verify:
        for rel, info in manifest.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                raise PromptFormatError(f"{root}: {rel} listed in the manifest is missing")
            digest = sha256_file(f)
            if digest != info["sha256"]:
                raise PromptFormatError(f"{f}: sha256 {digest} does not match the manifest ({info['sha256']})")
    return manifest


def read_prepared(root: str | Path, dataset: str, split: str, *, verify: bool = True) -> list[dict]:
    """Records of one dataset/split of a prepared directory (manifest checked first)."""
    read_manifest(root, verify=verify)
    path = prepared_path(root, dataset, split)
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no prepared split {dataset}/{split}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_prompts(root: str | Path, dataset: str, split: str, *, cap: int = 0, return_metadata: bool = False) -> list[Any]:
    """Prompts of ``dataset``/``split`` from a prepared directory or a reference-layout directory.

    Returns strings, or ``{"prompt", "metadata"}`` items; ``cap > 0`` keeps the first ``cap`` in
    file order (the reference's ``num_media_images`` rule).
    """
    root = Path(root)
    if (root / MANIFEST).is_file():
        items = [
            {"prompt": r["text"], "metadata": r["metadata"] if r["metadata"] is not None else {"prompt": r["text"]}}
            for r in read_prepared(root, dataset, split)
        ]
        if not return_metadata:
            items = [i["prompt"] for i in items]
    else:
        path = resolve_prompt_file(root / dataset, split, return_metadata=return_metadata)
        items = [r.item(return_metadata) for r in read_prompts(path)]
    return items[:cap] if cap > 0 else items
