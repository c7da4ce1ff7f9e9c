"""Backbone families behind one protocol (``base.Backbone``); ``build_backbone`` dispatches."""
from __future__ import annotations

import importlib

import torch

from rtdmd.backbones.base import IMAGES, POINTS, Backbone, BackboneError, Cond

_FAMILIES = {
    "toy2d": ("rtdmd.backbones.toy2d", "Toy2dBackbone"),
    "flux2_klein": ("rtdmd.backbones.flux2_klein", "Flux2KleinBackbone"),
    "sd3": ("rtdmd.backbones.sd3", "SD3Backbone"),
    "flux1": ("rtdmd.backbones.flux1", "Flux1Backbone"),
}
_TINY_KINDS = {"flux2": "flux2", "sd3": "sd3", "sd35": "sd35", "flux1": "flux1"}


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def backbone_domain(family: str) -> str:
    """The declared ``domain`` (:data:`POINTS` / :data:`IMAGES`) of a family, without building it."""
    module_name, cls_name = _FAMILIES[family]
    return getattr(importlib.import_module(module_name), cls_name).domain


def build_backbone(params, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Backbone:
    """Build the backbone of ``params`` (a :class:`rtdmd.config.Params`).

    ``tiny`` backbones are built into ``model.pretrained`` on first use (random weights, saved in
    the real on-disk layout) and then loaded through the same ``from_pretrained`` path.
    On CPU the compute dtype falls back to float32 (bf16 matmuls are ~10x slower there).
    """
    cfg = params.model
    module_name, cls_name = _FAMILIES[cfg.family]
    device = torch.device(device)
    if dtype is None:
        dtype = torch_dtype(cfg.dtype) if device.type == "cuda" else torch.float32
    if cfg.tiny and cfg.family != "toy2d":
        from rtdmd.backbones.tiny import ensure_tiny

        if cfg.tiny_config not in _TINY_KINDS:
            raise BackboneError(f"model.tiny_config '{cfg.tiny_config}' is not one of {sorted(_TINY_KINDS)}")
        ensure_tiny(cfg.tiny_config, cfg.pretrained)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, list(params.lora.targets), name=params.name, device=device, dtype=dtype)


__all__ = ["Backbone", "BackboneError", "Cond", "IMAGES", "POINTS", "backbone_domain", "build_backbone", "torch_dtype"]
