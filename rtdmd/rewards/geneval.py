"""GenEval (detector-based) reward (rewards.md §1.8).

Rule logic lives in :mod:`rtdmd.rewards.geneval_rules` (pure, tested on
synthetic detections). This module adapts detectors and the colour head.

Detector backends (``backend=``):

* ``"transformers"`` (default): HF ``Mask2FormerForUniversalSegmentation``
  loaded with ``from_pretrained`` from ``<ckpt>/geneval/mask2former/`` (or the
  hub id ``facebook/mask2former-swin-small-coco-instance`` when the hub is
  allowed) — the same architecture (Mask2Former, Swin-S, COCO instance) as the
  reference's mmdet checkpoint but a different training run (Detectron2's),
  so scores near the 0.3/0.9 thresholds can differ. Instances come from
  ``post_process_instance_segmentation`` (binary maps); boxes are the mask
  extents ``[x_min, y_min, x_max+1, y_max+1]`` (as mmdet's Mask2Former).
* ``"mmdet"`` (optional extra ``rtdmd[mmdet]``, needs a compiled ``mmcv``):
  the reference's ``mask2former_swin-s-p4-w7-224`` config and checkpoint; mmdet-3
  ``DetDataSample`` outputs are regrouped by :func:`mmdet3_to_per_class`.

Both produce the mmdet-2 layout ``(bbox_per_class, segm_per_class)`` for the
80 COCO classes of ``assets/object_names.txt``.

Colour head: open_clip ViT-L-14 (OpenAI weights, QuickGELU) from
``<ckpt>/geneval/colour_clip/open_clip_pytorch_model.bin`` (optional
``open_clip_config.json`` for a custom architecture); zero-shot over 10 colours
with 3 templates averaged (clip_benchmark style); crops are the object pasted
on a ``#999`` grey background through its mask, then cropped to its box.
Crops are classified sequentially in batches of 16 (no DataLoader workers).

Outputs: the scorer returns the partial score per image. ``score_details``
also returns ``accuracy`` (standard GenEval 0/1), ``strict_accuracy`` and the
per-tag lists ``{tag}_accuracy`` / ``{tag}_strict_accuracy`` holding −10 for
other tags. Departure: ``only_strict`` defaults to ``False`` here, so
``accuracy`` is computed; ``only_strict=True`` reproduces the reference's
training default (accuracy forced to 0).
"""

from __future__ import annotations

import glob
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from . import geneval_rules as R
from .base import RewardScorer
from .ckpt import hf_source, hub_allowed, resolve_ckpt_root, wrap_load_errors
from .errors import MissingBackendError, MissingCheckpointError, RewardInputError, UnknownRewardError

MASK2FORMER_DIR, MASK2FORMER_HUB = "geneval/mask2former", "facebook/mask2former-swin-small-coco-instance"
COLOUR_DIR = "geneval/colour_clip"
COLOUR_ARCH = "ViT-L-14"  # openai weights: QuickGELU
CHUNK = 64
COLOUR_BATCH = 16
BACKENDS = ("transformers", "mmdet")


@lru_cache(maxsize=1)
def object_names() -> tuple[str, ...]:
    path = Path(__file__).with_name("assets") / "object_names.txt"
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    assert len(names) == 80, f"{path} must list the 80 COCO classes"
    return names


# --------------------------------------------------------------------------- detector adapters


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """``[N,H,W]`` bool -> ``[N,4]`` ``[x_min, y_min, x_max+1, y_max+1]`` (zeros for empty masks)."""
    out = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


def group_per_class(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None,
                    num_classes: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Flat instances -> mmdet-2 ``(bbox_per_class [N_c,5], segm_per_class [N_c masks])``."""
    bbox_pc, segm_pc = [], []
    for c in range(num_classes):
        idx = np.nonzero(labels == c)[0]
        bbox_pc.append(np.concatenate([boxes[idx].reshape(-1, 4), scores[idx].reshape(-1, 1)], 1).astype(np.float32))
        segm_pc.append([masks[i].astype(bool) for i in idx] if masks is not None else [])
    return bbox_pc, segm_pc


def mmdet3_to_per_class(sample: Any, num_classes: int = 80):
    """An mmdet-3 ``DetDataSample`` (``pred_instances.{bboxes,scores,labels,masks}``) -> mmdet-2 layout."""
    inst = sample.pred_instances

    def arr(x):
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    masks = arr(inst.masks) if getattr(inst, "masks", None) is not None else None
    return group_per_class(arr(inst.bboxes), arr(inst.scores), arr(inst.labels).astype(int), masks, num_classes)


class HFMask2FormerDetector:
    """HF Mask2Former instance segmentation behind the mmdet-2 output contract."""

    def __init__(self, model, processor, num_classes: int = 80, device="cpu", score_floor: float = 0.0):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.score_floor = score_floor

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]):
        inputs = self.processor(images=images, return_tensors="pt")
        p = next(self.model.parameters())
        inputs = {k: (v.to(self.device, p.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        out = self.model(**inputs)
        sizes = [(im.height, im.width) for im in images]
        res = self.processor.post_process_instance_segmentation(
            out, threshold=self.score_floor, target_sizes=sizes, return_binary_maps=True)
        results = []
        for r, (h, w) in zip(res, sizes):
            info = r.get("segments_info", [])
            seg = r.get("segmentation")
            if seg is None or len(info) == 0:
                masks = np.zeros((0, h, w), dtype=bool)
            else:
                seg = seg.cpu().numpy()
                masks = seg.astype(bool) if seg.ndim == 3 else np.stack([seg == s["id"] for s in info])
            scores = np.array([float(s["score"]) for s in info], dtype=np.float32)
            labels = np.array([int(s["label_id"]) for s in info], dtype=int)
            keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
            masks, scores, labels = masks[keep], scores[keep], labels[keep]
            results.append(group_per_class(masks_to_boxes(masks), scores, labels, masks, self.num_classes))
        return results

    def to(self, device):
        self.model.to(device)
        self.device = torch.device(device)
        return self


MMDET_CONFIGS = ("mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py", "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py")
MMDET_CKPT_GLOBS = ("mask2former_swin-s-p4-w7-224*_20220504_001756-c9d0c4f2.pth",
                    "mask2former_swin-s-p4-w7-224*_20220504_001756-743b7d99.pth")


class MMDetDetector:
    """Reference detector (mmdet ``init_detector`` / ``inference_detector``), optional extra."""

    def __init__(self, root: Path | None, device="cpu"):
        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except ImportError as e:
            raise MissingBackendError(
                "geneval backend 'mmdet' needs: pip install 'rtdmd[mmdet]' plus a compiled mmcv (mmcv 2.1.0 "
                "built from source with -std=c++20 for torch 2.14, ~42 min; see spec/feasibility.md d2)") from e
        cfg = os.environ.get("RTDMD_GENEVAL_MMDET_CONFIG_PATH")
        if not cfg:
            base = Path(mmdet.__file__).parent
            for d in (base / ".mim" / "configs" / "mask2former", base.parent / "configs" / "mask2former"):
                for n in MMDET_CONFIGS:
                    if (d / n).is_file():
                        cfg = str(d / n)
                        break
                if cfg:
                    break
        ckpt = os.environ.get("RTDMD_GENEVAL_MMDET_CKPT_PATH")
        if not ckpt and root is not None:
            for g in MMDET_CKPT_GLOBS:
                hits = sorted(glob.glob(str(root / "geneval" / g))) + sorted(glob.glob(str(root / g)))
                if hits:
                    ckpt = hits[0]
                    break
        if not cfg:
            raise MissingCheckpointError(f"geneval/mmdet: config {MMDET_CONFIGS[0]} not found in mmdet/.mim; "
                                         "set RTDMD_GENEVAL_MMDET_CONFIG_PATH")
        if not ckpt:
            raise MissingCheckpointError(
                f"geneval/mmdet: missing checkpoint {MMDET_CKPT_GLOBS[0]} under '{root}/geneval/'; put it there "
                "or set RTDMD_GENEVAL_MMDET_CKPT_PATH")
        self.model = init_detector(cfg, ckpt, device=str(device))
        self._infer = inference_detector

    def __call__(self, images: list[Image.Image]):
        out = []
        for im in images:
            res = self._infer(self.model, np.asarray(im)[:, :, ::-1].copy())  # mmdet expects BGR arrays
            if isinstance(res, tuple):  # mmdet-2 (bbox_per_class, segm_per_class)
                out.append(res)
            else:
                out.append(mmdet3_to_per_class(res, 80))
        return out


# --------------------------------------------------------------------------- colour head


class ClipColourClassifier:
    """Zero-shot colour of detected objects with an open_clip model (3 templates × 10 colours)."""

    def __init__(self, model, preprocess, tokenizer, device="cpu", batch_size: int = COLOUR_BATCH):
        self.model = model.eval().requires_grad_(False).to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._weights: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, cls: str) -> torch.Tensor:
        if cls not in self._weights:
            cols = []
            for c in R.COLOURS:
                texts = [t.format(c=c, cls=cls) for t in R.COLOUR_TEMPLATES]
                emb = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
                emb = emb.mean(0)
                cols.append(emb / emb.norm())
            self._weights[cls] = torch.stack(cols, dim=1)  # [D, 10]
        return self._weights[cls]

    @staticmethod
    def crop(image: Image.Image, obj) -> Image.Image:
        box, mask = obj
        image = image.convert("RGB")
        if mask is not None:
            blank = Image.new("RGB", image.size, color="#999")
            image = Image.composite(image, blank, Image.fromarray(np.asarray(mask, dtype=bool)))
        return image.crop(tuple(float(v) for v in box[:4]))

    @torch.no_grad()
    def __call__(self, image: Image.Image, objects: list, cls: str) -> list[str]:
        w = self.classifier(cls)
        p = next(self.model.parameters())
        preds: list[str] = []
        crops = [self.preprocess(self.crop(image, o)) for o in objects]
        for i in range(0, len(crops), self.batch_size):
            x = torch.stack(crops[i:i + self.batch_size]).to(self.device, p.dtype)
            feats = self.model.encode_image(x, normalize=True)
            preds += [R.COLOURS[j] for j in (feats @ w).argmax(-1).tolist()]
        return preds


def load_colour_classifier(root: Path | None, device="cpu", ckpt_dir=None) -> ClipColourClassifier:
    from . import _openclip as OC

    open_clip = OC.import_open_clip()
    arch_env = os.environ.get("RTDMD_GENEVAL_CLIP_ARCH")
    d = root / COLOUR_DIR if root is not None else None
    weights = d / "open_clip_pytorch_model.bin" if d is not None else None
    if weights is None or not weights.is_file():
        if hub_allowed(ckpt_dir) and root is None:
            arch = arch_env or COLOUR_ARCH
            pretrained = os.environ.get("RTDMD_GENEVAL_CLIP_PRETRAINED", "openai")
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device="cpu")
            return ClipColourClassifier(model, preprocess, open_clip.get_tokenizer(arch), device)
        from .ckpt import missing

        raise missing("geneval", "colour CLIP weights (open_clip ViT-L-14 openai state_dict)", weights)
    cfg = d / "open_clip_config.json"
    if cfg.is_file():
        arch, quick = OC.register_arch(cfg, "geneval"), False
    else:
        arch, quick = arch_env or COLOUR_ARCH, True
    model = OC.create_model(arch, "geneval", force_quick_gelu=quick)
    OC.load_weights(model, weights, "geneval")
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    preprocess = open_clip.image_transform(size, is_train=False)
    return ClipColourClassifier(model, preprocess, open_clip.get_tokenizer(arch), device)


def load_hf_detector(root: Path | None, device="cpu", ckpt_dir=None) -> HFMask2FormerDetector:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    src = hf_source(root, MASK2FORMER_DIR, MASK2FORMER_HUB, "geneval", ckpt_dir, "Mask2Former COCO instance")
    model = wrap_load_errors("geneval", src, lambda: Mask2FormerForUniversalSegmentation.from_pretrained(src))
    proc = wrap_load_errors("geneval", src, lambda: AutoImageProcessor.from_pretrained(src))
    n = len(model.config.id2label)
    if n != 80:
        from .errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"geneval: detector at '{src}' has {n} labels, expected the 80 COCO classes")
    return HFMask2FormerDetector(model, proc, 80, device)


# --------------------------------------------------------------------------- scorer


def _parse_metadata(metadata: list) -> list[dict]:
    out = []
    for i, m in enumerate(metadata):
        if isinstance(m, str):
            try:
                m = json.loads(m)
            except json.JSONDecodeError as e:
                raise RewardInputError(f"geneval: metadata entry {i} is not valid JSON") from e
        if not isinstance(m, dict) or not isinstance(m.get("include"), list):
            raise RewardInputError(f"geneval: metadata entry {i} must be a dict with an 'include' list "
                                   "({'tag', 'include': [{'class', 'count', ...}], 'exclude'?}); got "
                                   f"{str(m)[:120]}")
        for req in m["include"] + m.get("exclude", []):
            if not isinstance(req, dict) or "class" not in req or "count" not in req:
                raise RewardInputError(f"geneval: metadata entry {i}: every include/exclude item needs "
                                       f"'class' and 'count'; got {req!r}")
        out.append(m)
    return out


class GenEvalScorer(RewardScorer):
    name = "geneval"
    differentiable = False
    requires_metadata = True

    def __init__(self, detector: Callable, colour_fn: Callable, device="cpu", backend="transformers",
                 class_names: Sequence[str] | None = None, only_strict: bool = False):
        super().__init__(device, backend)
        self.detector = detector
        self.colour_fn = colour_fn
        self.class_names = tuple(class_names or object_names())
        self.only_strict = only_strict

    def modules(self):
        mods = []
        for o in (self.detector, self.colour_fn):
            m = getattr(o, "model", None)
            if isinstance(m, torch.nn.Module):
                mods.append(m)
        return mods

    def compute_geneval(self, images: list[Image.Image], metadatas: list[dict], only_strict: bool | None = None):
        """The reference's five outputs: scores, rewards, strict_rewards, grouped, grouped_strict."""
        only_strict = self.only_strict if only_strict is None else only_strict
        images = [ImageOps.exif_transpose(im).convert("RGB") for im in images]
        dets: list = []
        for idx in np.array_split(np.arange(len(images)), max(1, -(-len(images) // CHUNK))):
            if len(idx):
                dets += self.detector([images[i] for i in idx])
        scores, rewards, strict = [], [], []
        grouped = {t: [] for t in R.TAGS}
        grouped_strict = {t: [] for t in R.TAGS}
        for im, (bbox_pc, segm_pc), md in zip(images, dets, metadatas):
            r = R.score_image(im, bbox_pc, segm_pc, md, self.class_names, self.colour_fn, only_strict=only_strict)
            scores.append(r["score"])
            rewards.append(r["accuracy"])
            strict.append(r["strict_accuracy"])
            for t in R.TAGS:
                grouped[t].append(r["grouped"][t])
                grouped_strict[t].append(r["grouped_strict"][t])
        return scores, rewards, strict, grouped, grouped_strict

    def score_details(self, images, prompts, metadata=None, only_strict: bool | None = None) -> dict[str, torch.Tensor]:
        batch, prompts, metadata = self.prepare(images, prompts, metadata)
        metadata = _parse_metadata(metadata)
        with torch.no_grad():
            s, acc, strict, g, gs = self.compute_geneval(batch.pil(), metadata, only_strict)
        f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        out = {"geneval": f(s), "accuracy": f(acc), "strict_accuracy": f(strict)}
        for t in R.TAGS:
            out[f"{t}_accuracy"] = f(g[t])
            out[f"{t}_strict_accuracy"] = f(gs[t])
        return out

    def _score(self, batch, prompts, metadata):
        return self.compute_geneval(batch.pil(), _parse_metadata(metadata), only_strict=True)[0]


def build(ckpt_dir=None, device="cpu", backend=None) -> GenEvalScorer:
    backend = backend or "transformers"
    root = resolve_ckpt_root(ckpt_dir)
    if backend == "transformers":
        detector = load_hf_detector(root, device, ckpt_dir)
    elif backend == "mmdet":
        detector = MMDetDetector(root, device)
    else:
        raise UnknownRewardError(f"unknown geneval backend '{backend}'; valid backends: {', '.join(BACKENDS)}")
    colour = load_colour_classifier(root, device, ckpt_dir)
    return GenEvalScorer(detector, colour, device=device, backend=backend)
