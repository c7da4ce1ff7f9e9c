"""GenEval2 Soft-TIFA with a Qwen-VL judge (rewards.md §1.9).

Per (prompt, image): look up the prompt's ``vqa_list`` (``[[question, answer], ...]``);
for each atom ask the judge ``question + " Answer in one word."`` with the image
(chat template, generation prompt), generate one token greedily, softmax the
first-step scores and **sum** the probabilities of the first token id of every
accepted answer variant (:func:`answer_variants`; duplicated ids are counted
twice — QUIRK kept). Aggregate the atoms with the geometric mean (``"gm"``,
any 0 atom gives 0) or the arithmetic mean (``"am"``). An empty ``vqa_list``
scores −10.

Prompt → ``vqa_list``: ``metadata[i]["vqa_list"]`` when given, else the lookup
file (``RTDMD_GENEVAL2_DATA_PATH``: a file, or a directory with ``merged.jsonl``
or ``train.jsonl``+``test.jsonl``; else ``dataset/geneval2/...`` under the
working directory). A duplicated prompt with a different ``vqa_list`` is an
error; a prompt missing from the map raises :class:`UnknownPromptError`
(a ``KeyError``).

Judge backend ``"transformers"``: ``Qwen3VLForConditionalGeneration`` (or
``Qwen2_5_VLForConditionalGeneration`` when the first is unavailable) +
``AutoProcessor`` via ``from_pretrained`` from, in order: ``RTDMD_GENEVAL2_MODEL_NAME``,
the first directory with a ``config.json`` among ``<ckpt>``, ``<ckpt>/geneval2``,
``<ckpt>/geneval2/Qwen3-VL-8B-Instruct``, ``<ckpt>/Qwen3-VL-8B-Instruct``, else the
hub id ``Qwen/Qwen3-VL-8B-Instruct`` (when the hub is allowed). fp16 on CUDA as
the reference; **fp32 on CPU** (fp16 matmuls are ~100× slower there). The
image goes to the processor as a PIL image instead of a temporary PNG
(lossless, same pixels).

The glue (:class:`GenEval2Scorer`) talks to any judge implementing
:class:`VqaJudge` (tests use a stub).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from .base import RewardScorer
from .ckpt import hub_allowed, missing, resolve_ckpt_root, wrap_load_errors
from .errors import RewardInputError, UnknownRewardError

HUB_ID = "Qwen/Qwen3-VL-8B-Instruct"
QUESTION_SUFFIX = " Answer in one word."
EMPTY_SCORE = -10.0
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"], start=1)}


class UnknownPromptError(RewardInputError, KeyError):
    """A prompt that is not in the GenEval2 prompt → vqa_list map."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- pure logic


def answer_variants(question: str, answer: str) -> list[str]:
    """Accepted answer strings whose first-token probabilities are summed."""
    if question.startswith("How many"):
        digit = NUMBER_WORDS.get(answer.strip().lower(), "other")
        return [answer, answer.capitalize(), " " + answer, " " + answer.capitalize(), digit, " " + digit]
    return ["Yes", "yes", " Yes", " yes"]


def aggregate(atoms: Sequence[float], mode: str = "gm") -> float:
    if len(atoms) == 0:
        return EMPTY_SCORE
    a = np.asarray(atoms, dtype=np.float64)
    if mode == "am":
        return float(a.mean())
    if mode != "gm":
        raise ValueError(f"geneval2: aggregation must be 'gm' or 'am', got {mode!r}")
    if np.any(a <= 0):
        return 0.0
    return float(math.exp(np.log(a).mean()))


def load_vqa_file(path: Path, into: dict[str, list] | None = None) -> dict[str, list]:
    out = {} if into is None else into
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "vqa_list" not in row:
                raise RewardInputError(f"geneval2: {path}:{ln} needs 'prompt' and 'vqa_list'")
            p, v = row["prompt"], [list(x) for x in row["vqa_list"]]
            if p in out and out[p] != v:
                raise RewardInputError(f"geneval2: prompt {p!r} appears twice with different vqa_list ({path}:{ln})")
            out[p] = v
    return out


def resolve_vqa_source(base: Path | None = None) -> list[Path]:
    env = os.environ.get("RTDMD_GENEVAL2_DATA_PATH")
    if env:
        p = Path(env)
        if p.is_file():
            return [p]
        if (p / "merged.jsonl").is_file():
            return [p / "merged.jsonl"]
        files = [p / n for n in ("train.jsonl", "test.jsonl") if (p / n).is_file()]
        if files:
            return files
        raise RewardInputError(f"geneval2: RTDMD_GENEVAL2_DATA_PATH={env} has no merged.jsonl/train.jsonl/test.jsonl")
    base = base or Path.cwd()
    d = base / "dataset" / "geneval2"
    if (d / "merged.jsonl").is_file():
        return [d / "merged.jsonl"]
    files = [d / n for n in ("train.jsonl", "test.jsonl") if (d / n).is_file()]
    if files:
        return files
    return sorted((base / "dataset" / "GenEval2" / "synthetic").glob("*.jsonl"))


def load_vqa_map(paths: Sequence[Path] | None = None) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in (resolve_vqa_source() if paths is None else paths):
        load_vqa_file(Path(p), out)
    return out


# --------------------------------------------------------------------------- judge


class VqaJudge(Protocol):
    def next_token_probs(self, image, text: str) -> torch.Tensor:
        """Softmax of the first generated token's scores (1-D over the vocabulary)."""

    def first_token_id(self, s: str) -> int: ...


class QwenVLJudge:
    """A transformers Qwen-VL chat model as a one-token VQA judge."""

    def __init__(self, model, processor, device="cpu"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)
        self._ids: dict[str, int] = {}

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def first_token_id(self, s: str) -> int:
        if s not in self._ids:
            ids = self.tokenizer.encode(s, add_special_tokens=False)
            self._ids[s] = int(ids[0])
        return self._ids[s]

    @torch.no_grad()
    def next_token_probs(self, image, text: str) -> torch.Tensor:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        inputs = self.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out = self.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
        return torch.softmax(out.scores[0][0].float(), dim=-1)


# --------------------------------------------------------------------------- scorer


class GenEval2Scorer(RewardScorer):
    name = "geneval2"
    differentiable = False

    def __init__(self, judge: VqaJudge, vqa_map: dict[str, list] | None = None, device="cpu",
                 backend="transformers", mode: str = "gm"):
        super().__init__(device, backend)
        self.judge = judge
        self._vqa_map = vqa_map
        self.mode = mode

    def modules(self):
        m = getattr(self.judge, "model", None)
        return [m] if isinstance(m, torch.nn.Module) else []

    @property
    def vqa_map(self) -> dict[str, list]:
        if self._vqa_map is None:
            self._vqa_map = load_vqa_map()
        return self._vqa_map

    def vqa_list(self, prompt: str, meta: Any) -> list:
        if isinstance(meta, dict) and "vqa_list" in meta:
            return meta["vqa_list"]
        if prompt not in self.vqa_map:
            raise UnknownPromptError(f"geneval2: prompt {prompt[:80]!r} has no vqa_list (not in the lookup map of "
                                     f"{len(self.vqa_map)} prompts; set RTDMD_GENEVAL2_DATA_PATH or pass "
                                     "metadata=[{'vqa_list': ...}])")
        return self.vqa_map[prompt]

    def atom_score(self, image, question: str, answer: str) -> float:
        probs = self.judge.next_token_probs(image, question + QUESTION_SUFFIX)
        return float(sum(float(probs[self.judge.first_token_id(v)]) for v in answer_variants(question, answer)))

    def _score(self, batch, prompts, metadata):
        metadata = metadata or [None] * len(prompts)
        vqas = [self.vqa_list(p, m) for p, m in zip(prompts, metadata)]  # fail fast on unknown prompts
        out = []
        for im, vqa in zip(batch.pil(), vqas):
            out.append(aggregate([self.atom_score(im, q, a) for q, a in vqa], self.mode))
        return out


def resolve_model_source(root: Path | None, ckpt_dir=None) -> str:
    env = os.environ.get("RTDMD_GENEVAL2_MODEL_NAME")
    if env:
        return env
    if root is not None:
        for d in (root, root / "geneval2", root / "geneval2" / "Qwen3-VL-8B-Instruct", root / "Qwen3-VL-8B-Instruct"):
            if (d / "config.json").is_file():
                return str(d)
    if hub_allowed(ckpt_dir):
        return HUB_ID
    where = (root / "geneval2" / "Qwen3-VL-8B-Instruct") if root is not None else None
    raise missing("geneval2", "Qwen3-VL judge directory (save_pretrained, with config.json)", where, hub_id=HUB_ID)


def load_judge(src: str, device="cpu") -> QwenVLJudge:
    import transformers
    from transformers import AutoProcessor

    cls = getattr(transformers, "Qwen3VLForConditionalGeneration", None) or \
        getattr(transformers, "Qwen2_5_VLForConditionalGeneration")
    arch = None
    cfg = Path(src) / "config.json"
    if cfg.is_file():
        arch = (json.loads(cfg.read_text()).get("architectures") or [None])[0]
        if arch and hasattr(transformers, arch):
            cls = getattr(transformers, arch)  # e.g. a Qwen2-VL / Qwen2.5-VL judge directory
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    model = wrap_load_errors("geneval2", src, lambda: cls.from_pretrained(src, dtype=dtype))
    proc = wrap_load_errors("geneval2", src, lambda: AutoProcessor.from_pretrained(src))
    return QwenVLJudge(model.to(device), proc, device)


def build(ckpt_dir=None, device="cpu", backend=None) -> GenEval2Scorer:
    if backend not in (None, "transformers"):
        raise UnknownRewardError(f"unknown geneval2 backend '{backend}'; valid backends: transformers")
    root = resolve_ckpt_root(ckpt_dir)
    judge = load_judge(resolve_model_source(root, ckpt_dir), device)
    return GenEval2Scorer(judge, device=device)
