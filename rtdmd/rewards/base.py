"""Scorer interface, input validation and the shared preprocessing helpers.

Two paths, as in the reference (``spec/rewards.md`` §0 and §3):

* **eval path** — ``scorer(images, prompts, metadata=None)``. Runs under
  ``torch.no_grad``. Float inputs are first quantised to 8 bit
  (``round(x*255)`` clamped to 0..255), exactly like the reference
  ``MultiScorer``, so a scorer called on its own and a scorer called through
  :class:`rtdmd.rewards.MultiScorer` give the same numbers. Returns a 1-D
  ``float32`` CPU tensor with one score per (image, prompt) pair.
* **BP path** — ``scorer.score_differentiable(images, prompts)``. Only for the
  differentiable scorers. Takes the float ``[B,3,H,W]`` image tensor as it is
  (no quantisation, tensor-only transforms) and returns a 1-D tensor on the
  scorer's device that carries gradients w.r.t. ``images``.

Accepted image inputs (domain ``"image"``):

* a floating-point ``torch.Tensor`` ``[B,3,H,W]`` with values in ``[0,1]``;
* a list/tuple of ``PIL.Image.Image`` (any mode; converted to RGB; sizes may differ);
* a ``numpy.uint8`` array ``[B,H,W,3]`` (the reference's "uint8 NHWC").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import RewardInputError, RewardNotDifferentiableError

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RANGE_TOLERANCE",
    "ImageBatch",
    "RewardScorer",
    "FunctionScorer",
    "validate_images",
    "validate_prompts",
    "validate_metadata",
    "quantize_uint8",
    "normalize",
    "resize_shortest_edge",
    "center_crop",
    "resize_max_and_pad",
    "clip_tensor_transform",
    "pil_clip_transform",
]

#: OpenAI CLIP normalisation (rewards.md §0).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Float images may exceed [0,1] by this much (rounding in a VAE decode) and are clamped.
RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------- inputs


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, np.ndarray):
        return f"numpy.ndarray(shape={x.shape}, dtype={x.dtype})"
    return type(x).__name__


_EXPECTED = (
    "expected images as a float torch.Tensor [B,3,H,W] with values in [0,1], "
    "a list of PIL images, or a numpy uint8 array [B,H,W,3]"
)


class ImageBatch:
    """A validated image batch, stored as 8-bit RGB ``H×W×3`` arrays (eval path).

    Conversions to every backend format of the reference (rewards.md §1 table):
    ``pil()``, ``uint8_nhwc()``, ``uint8_nchw()``, ``float_list()``.
    """

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    @property
    def uniform(self) -> bool:
        return len({a.shape for a in self.arrays}) == 1

    def pil(self) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.arrays]

    def uint8_nhwc(self) -> np.ndarray:
        if not self.uniform:
            raise RewardInputError("this scorer needs images of one size; got mixed sizes "
                                   f"{sorted({a.shape[:2] for a in self.arrays})}")
        return np.stack(self.arrays)

    def uint8_nchw(self) -> torch.Tensor:
        return torch.from_numpy(self.uint8_nhwc()).permute(0, 3, 1, 2).contiguous()

    def float_list(self) -> list[torch.Tensor]:
        """One float ``[1,3,H,W]`` tensor in [0,1] (``uint8/255``) per image."""
        return [torch.from_numpy(a).permute(2, 0, 1)[None].float().div(255.0) for a in self.arrays]

    def slice(self, start: int, stop: int) -> "ImageBatch":
        return ImageBatch(self.arrays[start:stop])


def quantize_uint8(x: torch.Tensor) -> np.ndarray:
    """Float ``[B,3,H,W]`` in [0,1] -> uint8 ``[B,H,W,3]``: ``round(x*255)`` clamped (rewards.md §0)."""
    q = torch.round(x.detach().float() * 255.0).clamp(0, 255).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _check_float_tensor(images: torch.Tensor, *, what: str = "images") -> None:
    if not images.is_floating_point():
        raise RewardInputError(f"{_EXPECTED}; got {_describe(images)} (integer dtype: convert "
                               "with x.float()/255, or pass a numpy uint8 [B,H,W,3] array)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardInputError(f"{_EXPECTED}; got {_describe(images)} (wrong shape)")
    b, _, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise RewardInputError(f"{_EXPECTED}; got an empty batch {_describe(images)}")
    with torch.no_grad():
        d = images.detach()
        if not bool(torch.isfinite(d).all()):
            raise RewardInputError(f"{what} contain NaN or inf values; expected values in [0,1]")
        lo, hi = float(d.min()), float(d.max())
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise RewardInputError(
            f"{_EXPECTED}; got values in [{lo:.4g}, {hi:.4g}] (a generator decoding to [-1,1] "
            "should pass (x/2+0.5).clamp(0,1))")


def validate_images(images: Any) -> ImageBatch:
    """Validate an image batch and quantise it to 8 bit (the eval path input)."""
    if isinstance(images, torch.Tensor):
        _check_float_tensor(images)
        return ImageBatch(list(quantize_uint8(images.clamp(0, 1))))
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise RewardInputError(f"{_EXPECTED}; got {_describe(images)}")
        return ImageBatch([np.ascontiguousarray(a) for a in images])
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise RewardInputError(f"{_EXPECTED}; got an empty list")
        arrays = []
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise RewardInputError(f"{_EXPECTED}; element {i} of the list is {_describe(im)}")
            if im.width == 0 or im.height == 0:
                raise RewardInputError(f"image {i} is empty ({im.size})")
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        return ImageBatch(arrays)
    raise RewardInputError(f"{_EXPECTED}; got {_describe(images)}")


def validate_prompts(prompts: Any, n: int) -> list[str]:
    if isinstance(prompts, str):
        raise RewardInputError("expected prompts as a list of strings (one per image); got a single str")
    if not isinstance(prompts, (list, tuple)):
        raise RewardInputError(f"expected prompts as a list of strings; got {_describe(prompts)}")
    if len(prompts) == 0:
        raise RewardInputError("expected a non-empty list of prompts (one per image); got []")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RewardInputError(f"expected prompts as a list of strings; prompt {i} is {_describe(p)}")
    if len(prompts) != n:
        raise RewardInputError(f"expected one prompt per image: got {n} images and {len(prompts)} prompts")
    return list(prompts)


def validate_metadata(metadata: Any, n: int, *, required: bool = False, scorer: str = "") -> list[dict] | None:
    if metadata is None:
        if required:
            raise RewardInputError(f"{scorer}: expected a metadata list (one dict per image); got None")
        return None
    if isinstance(metadata, dict) or not isinstance(metadata, (list, tuple)):
        raise RewardInputError(f"{scorer}: expected metadata as a list of dicts (one per image); "
                               f"got {_describe(metadata)}")
    if len(metadata) != n:
        raise RewardInputError(f"{scorer}: expected one metadata entry per image: got {n} images and "
                               f"{len(metadata)} metadata entries")
    return list(metadata)


def check_bp_images(images: Any, scorer: str) -> torch.Tensor:
    """Validate the BP-path input (float ``[B,3,H,W]`` tensor in [0,1], may require grad)."""
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"{scorer}.score_differentiable: expected a float torch.Tensor "
                               f"[B,3,H,W] in [0,1]; got {_describe(images)}")
    _check_float_tensor(images)
    return images


# --------------------------------------------------------------------------- tensor transforms


def normalize(x: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Channel normalisation of a ``[B,3,H,W]`` tensor (differentiable)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize: torchvision's rule (long side truncated)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_shortest_edge(x: torch.Tensor, size: int = 224, mode: str = "bilinear",
                         antialias: bool = True) -> torch.Tensor:
    """torchvision ``Resize(size)`` on a tensor: shortest edge -> ``size`` (differentiable)."""
    h, w = x.shape[-2:]
    oh, ow = shortest_edge_size(h, w, size)
    if (oh, ow) == (h, w):
        return x
    return F.interpolate(x, size=(oh, ow), mode=mode, antialias=antialias, align_corners=False)


def center_crop(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` (pads with zeros when the image is smaller)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def clip_tensor_transform(x: torch.Tensor, size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                          mode: str = "bilinear", crop: int | None = None) -> torch.Tensor:
    """Resize(size) (torchvision default bilinear + antialias) -> CenterCrop -> normalise.

    The CLIPScore transform (rewards.md §1.4) and the BP PickScore transform (§3).
    """
    return normalize(center_crop(resize_shortest_edge(x, size, mode=mode), crop or size), mean, std)


def resize_max_and_pad(x: torch.Tensor, size: int = 224, fill: float = 0.0) -> torch.Tensor:
    """HPSv2 "resize max size": longer side -> ``size`` (bicubic), then symmetric zero pad.

    Left/top get ``pad//2``, right/bottom the rest (rewards.md §1.2). When the
    scale is exactly 1 the image is returned unchanged.
    """
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def pil_clip_transform(img: Image.Image, size: int = 224, mean=OPENAI_CLIP_MEAN,
                       std=OPENAI_CLIP_STD, resample=Image.BICUBIC, crop: bool = True) -> torch.Tensor:
    """PIL pipeline: shortest edge -> size (PIL bicubic), centre crop, /255, normalise.

    The ImageReward eval preprocessing (torchvision Resize/CenterCrop on a PIL image).
    With ``crop=False`` resizes to exactly ``size×size``.
    """
    img = img.convert("RGB")
    if crop:
        oh, ow = shortest_edge_size(img.height, img.width, size)
        if (oh, ow) != (img.height, img.width):
            img = img.resize((ow, oh), resample=resample)
        left = int(round((img.width - size) / 2.0))
        top = int(round((img.height - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), resample=resample)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return normalize(t, mean, std)


# --------------------------------------------------------------------------- scorer base


class RewardScorer:
    """Base class of every scorer.

    Subclasses set ``name``, ``differentiable`` and ``domain`` and implement
    ``_score(batch, prompts, metadata)`` (eval path; ``batch`` is an
    :class:`ImageBatch` for the image domain, the raw validated input otherwise)
    and, when differentiable, ``_score_bp(images, prompts, metadata)``.
    """

    name: str = "reward"
    differentiable: bool = False
    domain: str = "image"
    requires_metadata: bool = False

    def __init__(self, device: str | torch.device = "cpu", backend: str | None = None):
        self.device = torch.device(device)
        self.backend = backend

    # ---- eval path
    def __call__(self, images, prompts, metadata=None) -> torch.Tensor:
        batch, prompts, metadata = self.prepare(images, prompts, metadata)
        with torch.no_grad():
            out = self._score(batch, prompts, metadata)
        return self._finalize(out, len(prompts))

    def prepare(self, images, prompts, metadata):
        """Validate the inputs; returns ``(batch, prompts, metadata)``."""
        if self.domain == "image":
            batch = images if isinstance(images, ImageBatch) else validate_images(images)
            n = len(batch)
        else:
            batch = self.validate_domain_inputs(images)
            n = len(batch)
        prompts = validate_prompts(prompts, n)
        metadata = validate_metadata(metadata, n, required=self.requires_metadata, scorer=self.name)
        return batch, prompts, metadata

    def validate_domain_inputs(self, inputs):
        """Validation for non-image domains; ``"points"``: a float tensor ``[B,D]``."""
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.ndim != 2 \
                or inputs.shape[0] == 0:
            raise RewardInputError(f"{self.name}: expected a float tensor [B,D] of {self.domain}; "
                                   f"got {_describe(inputs)}")
        return inputs

    def _finalize(self, out, n: int) -> torch.Tensor:
        t = torch.as_tensor(out).detach().to("cpu", torch.float32).reshape(-1)
        if t.numel() != n:
            raise RuntimeError(f"{self.name}: backend returned {t.numel()} scores for {n} inputs")
        return t

    def _score(self, batch, prompts: list[str], metadata) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- BP path
    def score_differentiable(self, images, prompts, metadata=None) -> torch.Tensor:
        if not self.differentiable:
            from .registry import differentiable_scorers

            raise RewardNotDifferentiableError(
                f"reward '{self.name}' has no differentiable path; differentiable rewards: "
                f"{', '.join(differentiable_scorers())}")
        if self.domain == "image":
            images = check_bp_images(images, self.name)
            n = images.shape[0]
        else:
            images = self.validate_domain_inputs(images)
            n = images.shape[0]
        prompts = validate_prompts(prompts, n)
        metadata = validate_metadata(metadata, n, required=self.requires_metadata, scorer=self.name)
        out = self._score_bp(images, prompts, metadata)
        return out.reshape(-1)

    def _score_bp(self, images: torch.Tensor, prompts: list[str], metadata) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ---- devices
    def modules(self) -> list[torch.nn.Module]:
        """The ``nn.Module`` objects this scorer owns (moved by :meth:`to`)."""
        return [v for v in vars(self).values() if isinstance(v, torch.nn.Module)]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "RewardScorer":
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        for m in self.modules():
            for p in m.parameters():
                return p.dtype
        return torch.float32

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, differentiable={self.differentiable})")


class FunctionScorer(RewardScorer):
    """Wraps a plain callable ``fn(inputs, prompts, metadata) -> tensor`` as a scorer.

    Used by :func:`rtdmd.rewards.register_scorer` when a factory returns a
    function instead of a :class:`RewardScorer`. For the image domain the eval
    path passes the quantised float ``[B,3,H,W]`` tensor; for other domains the
    raw validated input. The BP path passes the input unchanged.
    """

    def __init__(self, name: str, fn: Callable, *, differentiable: bool, domain: str = "image",
                 device="cpu"):
        super().__init__(device=device)
        self.name, self.fn, self.differentiable, self.domain = name, fn, differentiable, domain

    def _score(self, batch, prompts, metadata):
        if isinstance(batch, ImageBatch):
            batch = torch.cat(batch.float_list()) if batch.uniform else batch.pil()
        return self.fn(batch, prompts, metadata)

    def _score_bp(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)


@dataclass(frozen=True)
class ScorerInfo:
    """What :func:`rtdmd.rewards.list_scorers` reports for one reward."""

    name: str
    differentiable: bool
    domain: str
    backends: tuple[str, ...]
    default_backend: str | None
    description: str = ""
