"""OCR reward (rewards.md §1.7).

Reward per (image, prompt):

1. target = the text between the first pair of double quotes,
   ``prompt.split('"')[1]`` (a prompt with a single quote character uses the
   rest of the prompt, as in the reference);
2. OCR the 8-bit image; concatenate every line with confidence > 0, no separator;
3. remove all spaces (``" "``) from both strings and lower-case them;
4. distance = 0 if the target is a substring of the recognised text, else the
   Levenshtein distance capped at ``len(target)``;
5. reward = ``1 − distance/len(target)`` ∈ [0, 1].

Departures from the reference, decided here:

* **no quotes** (reference: uncaught ``IndexError``) and **empty target after
  removing spaces** (reference: ``ZeroDivisionError``) raise
  :class:`RewardInputError` naming the prompt, *before* any OCR runs;
* an OCR engine exception on one image gives reward 0 with a warning (as the
  reference's per-image try/except).

Engines (``backend=``): ``"rapidocr"`` (default; rapidocr 3.x, PP-OCRv6 ONNX
weights shipped in the wheel, offline), ``"tesseract"`` (pytesseract + the
Debian ``tesseract-ocr`` binary) and ``"paddleocr"`` (the reference engine,
PaddleOCR 2.x, optional extra; needs its model files, see
``RTDMD_PADDLEOCR_HOME``). Each engine implements :class:`OcrEngine`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .base import RewardScorer
from .ckpt import resolve_ckpt_root
from .errors import MissingBackendError, RewardInputError

log = logging.getLogger(__name__)

BACKENDS = ("rapidocr", "tesseract", "paddleocr")


# --------------------------------------------------------------------------- pure reward logic


def extract_target(prompt: str) -> str:
    """The quoted target text of an OCR prompt (``prompt.split('"')[1]``)."""
    parts = prompt.split('"')
    if len(parts) < 2:
        raise RewardInputError(f'ocr: expected the target text in double quotes in the prompt, e.g. '
                               f'\'A sign that says "OPEN"\'; got {prompt!r}')
    return parts[1]


def normalize_text(s: str) -> str:
    return s.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    try:
        from rapidfuzz.distance import Levenshtein

        return int(Levenshtein.distance(a, b))
    except ImportError:  # pure-python fallback
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]


def ocr_reward(recognized: str, target: str) -> float:
    """``1 − min(lev, len)/len`` with the substring rule; both strings space-stripped, lower-cased."""
    rec, tgt = normalize_text(recognized), normalize_text(target)
    if not tgt:
        raise RewardInputError(f"ocr: the quoted target {target!r} is empty after removing spaces")
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


def prompt_targets(prompts: Sequence[str]) -> list[str]:
    targets = []
    for p in prompts:
        t = extract_target(p)
        if not normalize_text(t):
            raise RewardInputError(f"ocr: the quoted target in prompt {p!r} is empty after removing spaces")
        targets.append(t)
    return targets


# --------------------------------------------------------------------------- engines


class OcrEngine(Protocol):
    """``read(rgb_uint8_hwc) -> [(text, confidence), ...]`` (the reference ``ocr()`` contract)."""

    def read(self, image: np.ndarray) -> list[tuple[str, float]]: ...


class RapidOcrEngine:
    """rapidocr 3.x (ONNX runtime; PP-OCRv6 small det + rec shipped in the wheel, no angle classifier).

    Lines below rapidocr's text score 0.5 are dropped, as PaddleOCR's ``drop_score`` 0.5 does.
    """

    def __init__(self, threads: int | None = None):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise MissingBackendError("ocr backend 'rapidocr' needs: pip install 'rtdmd[rewards]' "
                                      "(rapidocr==3.10.0 onnxruntime)") from e
        threads = threads or int(os.environ.get("RTDMD_OCR_THREADS", "1"))
        params = {
            "Global.use_cls": False,
            "Global.log_level": "error",
            # PaddleOCR 2.x detector defaults (the reference engine): downscale only, longest side <= 960.
            # rapidocr's own default ("min", 736) upscales small images and is ~10x slower on CPU.
            "Det.limit_type": "max",
            "Det.limit_side_len": 960,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        for name in ("RapidOCR", "rapidocr"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            self.engine = RapidOCR(params=params)
        except Exception:  # older 3.x releases without some keys
            self.engine = RapidOCR(params={"Global.use_cls": False})

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        out = self.engine(image, use_cls=False)
        txts = getattr(out, "txts", None) or ()
        scores = getattr(out, "scores", None) or ()
        return [(str(t), float(s)) for t, s in zip(txts, scores)]


class TesseractEngine:
    """pytesseract (``tesseract-ocr`` + ``tesseract-ocr-eng`` Debian packages)."""

    def __init__(self):
        try:
            import pytesseract
        except ImportError as e:
            raise MissingBackendError("ocr backend 'tesseract' needs: pip install pytesseract and "
                                      "apt-get install tesseract-ocr tesseract-ocr-eng") from e
        try:
            pytesseract.get_tesseract_version()
        except Exception as e:
            raise MissingBackendError("ocr backend 'tesseract': the tesseract binary is not installed "
                                      "(apt-get install tesseract-ocr tesseract-ocr-eng)") from e
        self.pt = pytesseract

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        from PIL import Image

        d = self.pt.image_to_data(Image.fromarray(image), output_type=self.pt.Output.DICT)
        return [(t, float(c)) for t, c in zip(d["text"], d["conf"]) if t and t.strip()]


def paddle_home(ckpt_root: Path | None) -> Path:
    """PaddleOCR model cache root, in the reference's order."""
    env = os.environ.get("RTDMD_PADDLEOCR_HOME")
    if env:
        return Path(env)
    pats = ("*.pdiparams", "*.pdmodel", "*.json", "*.onnx")

    def populated(d: Path) -> bool:
        return d.is_dir() and any(next(d.rglob(p), None) for p in pats)

    cands = []
    if ckpt_root is not None:
        cands.append(ckpt_root / ".paddleocr")
    cands.append(Path(__file__).resolve().parents[2] / ".paddleocr")
    for c in cands:
        if populated(c):
            return c
    return cands[0]


class PaddleOcrEngine:
    """The reference engine: PaddleOCR 2.x, ``lang="en"``, no angle classifier (optional extra)."""

    def __init__(self, ckpt_root: Path | None = None):
        try:
            import paddleocr
            from paddleocr import PaddleOCR
        except ImportError as e:
            raise MissingBackendError("ocr backend 'paddleocr' needs: pip install 'rtdmd[paddleocr]' "
                                      "(paddlepaddle==2.6.2 paddleocr==2.9.1, numpy<2, separate venv)") from e
        home = paddle_home(ckpt_root)
        try:
            paddleocr.paddleocr.BASE_DIR = str(home)
        except AttributeError:
            pass
        root_logger = logging.getLogger()
        saved = (root_logger.level, list(root_logger.handlers), root_logger.disabled)
        try:
            self.engine = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)
        finally:
            root_logger.setLevel(saved[0])
            root_logger.handlers[:] = saved[1]
            root_logger.disabled = saved[2]

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        res = self.engine.ocr(image, cls=False)
        lines = []
        for page in res or []:
            for item in page or []:
                text, conf = item[1]
                lines.append((str(text), float(conf)))
        return lines


def make_engine(backend: str | None, ckpt_dir=None) -> OcrEngine:
    backend = backend or "rapidocr"
    if backend == "rapidocr":
        return RapidOcrEngine()
    if backend == "tesseract":
        return TesseractEngine()
    if backend == "paddleocr":
        return PaddleOcrEngine(resolve_ckpt_root(ckpt_dir))
    from .errors import UnknownRewardError

    raise UnknownRewardError(f"unknown ocr backend '{backend}'; valid backends: {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- scorer


class OCRScorer(RewardScorer):
    name = "ocr"
    differentiable = False

    def __init__(self, engine: OcrEngine, device="cpu", backend="rapidocr"):
        super().__init__(device, backend)
        self.engine = engine

    def recognize(self, image: np.ndarray) -> str:
        return "".join(t for t, c in self.engine.read(image) if c > 0)

    def _score(self, batch, prompts, metadata):
        targets = prompt_targets(prompts)  # fail fast on bad prompts, before any OCR
        out = []
        for arr, tgt in zip(batch.arrays, targets):
            try:
                out.append(ocr_reward(self.recognize(arr), tgt))
            except RewardInputError:
                raise
            except Exception as e:  # the reference prints and scores 0
                warnings.warn(f"ocr: engine failed on one image ({type(e).__name__}: {e}); reward 0")
                out.append(0.0)
        return out


def build(ckpt_dir=None, device="cpu", backend=None) -> OCRScorer:
    backend = backend or "rapidocr"
    return OCRScorer(make_engine(backend, ckpt_dir), device=device, backend=backend)
