"""Shared plumbing of the diffusers-based adapters (``flux2_klein``, ``sd3``, ``flux1``).

* Every component is loaded with ``from_pretrained(source, subfolder=..., revision=...)`` from a
  hub id or a local directory in diffusers pipeline layout (``model_index.json`` + one
  subfolder per component). Tiny pipelines (``model.tiny: true``) are first built into
  ``model.pretrained`` by :func:`rtdmd.backbones.tiny.ensure_tiny` and then loaded through the
  very same calls.
* Any failure to find or load a model becomes one :class:`BackboneError` naming the id/path and
  how to provide the weights (the original exception is chained and quoted).
* Frozen parts (text encoders, VAE, and freshly loaded transformers) are ``eval()`` with
  ``requires_grad=False``; LoRA is injected later by :mod:`rtdmd.lora`. Text encoders are placed
  per ``model.encoders_device`` (:func:`place_encoder`).
* Transformer role sources (spec §8.1): teacher and fake score load ``model.pretrained``;
  the generator loads ``model.generator_init`` when set. An init source may be a hub id or
  pipeline dir (``transformer/`` subfolder), a bare transformer dir (``config.json`` at the
  root), or a full state-dict file (``.pt``/``.pth``/``.safetensors``) applied non-strictly on
  top of the pretrained transformer (``torch.load(weights_only=True)``: nothing is executed).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from rtdmd.backbones.base import IMAGES, ROLES, BackboneError, Cond

_HOWTO = (
    "pass a local directory in diffusers layout as model.pretrained, or pre-download it into the "
    "HF cache with `huggingface-cli download {id}`; offline: HF_HUB_OFFLINE=1"
)
_STATE_DICT_EXT = (".pt", ".pth", ".safetensors", ".bin")


def looks_local(source: str) -> bool:
    """A path (existing, absolute, ``./``-relative, ``~``, or with >1 slash) rather than a hub id."""
    if os.path.exists(source):
        return True
    return (os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
            or source.endswith(_STATE_DICT_EXT))


def backbone_error(source: str, what: str, err: BaseException | str | None = None) -> BackboneError:
    where = f"local path {source!r}" if looks_local(source) else f"hub id {source!r}"
    msg = f"cannot load {what} from {where}"
    if err is not None:
        msg += f" ({type(err).__name__ + ': ' if isinstance(err, BaseException) else ''}{str(err).strip()[:400]})"
    return BackboneError(msg + ". To provide weights: " + _HOWTO.format(id=source))


def check_source(source: str, what: str = "the pipeline") -> None:
    """Fail early and clearly for a local path that does not exist."""
    if not source:
        raise BackboneError("model.pretrained is empty. To provide weights: " + _HOWTO.format(id="<hub id>"))
    if looks_local(source) and not os.path.exists(os.path.expanduser(source)):
        raise backbone_error(source, what, "no such file or directory")


def load(cls, source: str, subfolder: str | None, revision: str | None, what: str, **kwargs) -> Any:
    """``cls.from_pretrained`` with every failure turned into a :class:`BackboneError`."""
    check_source(source, what)
    src = os.path.expanduser(source) if looks_local(source) else source
    if subfolder is not None:
        if looks_local(source) and os.path.isdir(src) and not os.path.isdir(os.path.join(src, subfolder)):
            raise backbone_error(source, what, f"no '{subfolder}/' subfolder: expected a diffusers pipeline "
                                               "layout (model_index.json + one subfolder per component)")
        kwargs["subfolder"] = subfolder
    try:
        return cls.from_pretrained(src, revision=revision, **kwargs)
    except BackboneError:
        raise
    except Exception as e:  # OSError / LocalEntryNotFoundError / HTTP errors / bad configs ...
        raise backbone_error(source, f"{what} ({cls.__name__}, subfolder={subfolder!r})", e) from e


def load_config(cls, source: str, subfolder: str, revision: str | None, what: str) -> dict:
    """The config dict of a diffusers component (``cls.load_config``) without loading weights."""
    check_source(source, what)
    src = os.path.expanduser(source) if looks_local(source) else source
    try:
        return dict(cls.load_config(src, subfolder=subfolder, revision=revision))
    except Exception as e:
        raise backbone_error(source, f"{what} config ({subfolder}/)", e) from e


def freeze(module: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move, cast, ``eval()`` and freeze a module in place."""
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    module.eval()
    module.requires_grad_(False)
    return module


def place_encoder(module: nn.Module, device, how: str) -> nn.Module:
    """A frozen text encoder per ``model.encoders_device``: ``device`` moves it to the training
    device; ``cpu_offload`` keeps its weights in host memory and lets accelerate's ``cpu_offload``
    stream each submodule's weights to ``device`` for its forward only (inputs are moved there,
    outputs come back on the caller's device). Same numbers, less device memory, a host-to-device
    copy of the encoder per encoding call."""
    if how == "device":
        return freeze(module, device)
    if how != "cpu_offload":
        raise ValueError(f"model.encoders_device: expected device or cpu_offload, got {how!r}")
    from accelerate import cpu_offload

    module = freeze(module, "cpu")
    cpu_offload(module, execution_device=torch.device(device))
    return module


def maybe_build_tiny(cfg) -> None:
    """For ``model.tiny: true`` build the random-weight pipeline into ``model.pretrained`` if missing."""
    if getattr(cfg, "tiny", False):
        from rtdmd.backbones.tiny import ensure_tiny

        ensure_tiny(cfg.tiny_config, cfg.pretrained)


def sigma_batch(sigma, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """``sigma`` (python float, 0-d or ``[B]`` tensor) -> ``[B]`` tensor."""
    s = torch.as_tensor(sigma, device=device, dtype=dtype)
    if s.ndim == 0:
        s = s.expand(batch)
    s = s.reshape(-1)
    if s.shape[0] != batch:
        raise ValueError(f"sigma has {s.shape[0]} entries for a batch of {batch}")
    return s


def quantize_bf16_timestep(sigma: torch.Tensor, n: int = 1000) -> torch.Tensor:
    """Reference quirk (spec §1.2, §12.6): FLUX timesteps ``t = Nσ`` cast to bf16 before ``/N``."""
    return (sigma * n).to(torch.bfloat16).to(sigma.dtype) / n


class DiffusersBackbone:
    """Common state and helpers; subclasses implement the family specifics."""

    family: str = ""
    domain: str = IMAGES
    transformer_cls: Any = None

    def __init__(self, cfg, lora_targets: Sequence[str], *, name: str, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.name = name
        self.lora_targets = list(lora_targets)
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = int(cfg.resolution)
        self.revision = cfg.revision
        # model.quantize_timestep (§12.6): the reference's bf16-quantised FLUX timestep
        self.quantize_timestep = bool(cfg.quantize_timestep)
        maybe_build_tiny(cfg)
        self.source = cfg.pretrained
        self._empty: Cond | None = None

    # ---- conditioning ------------------------------------------------------------------------
    def empty_cond(self, batch: int) -> Cond:
        """Encoding of the empty prompt, computed once and broadcast to ``batch`` rows."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty.expand_to(batch)

    # ---- transformer roles -------------------------------------------------------------------
    def role_source(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if role == "generator" and self.cfg.generator_init:
            return self.cfg.generator_init
        return self.source

    def load_transformer(self, role: str) -> nn.Module:
        """A fresh, frozen (``requires_grad=False``), ``eval()`` transformer for ``role``."""
        src = self.role_source(role)
        what = f"the {role} transformer"
        kw = {"dtype": self.dtype}
        if src.endswith(_STATE_DICT_EXT) and looks_local(src):
            net = load(self.transformer_cls, self.source, "transformer", self.revision, what, **kw)
            self._load_state_dict_file(net, src, what)
        elif looks_local(src) and os.path.isfile(os.path.join(os.path.expanduser(src), "config.json")) \
                and not os.path.isdir(os.path.join(os.path.expanduser(src), "transformer")):
            net = load(self.transformer_cls, src, None, self.revision, what, **kw)
        elif src != self.source and not looks_local(src):
            try:  # hub id: a pipeline repo first, then a bare transformer repo
                net = load(self.transformer_cls, src, "transformer", None, what, **kw)
            except BackboneError:
                net = load(self.transformer_cls, src, None, None, what, **kw)
        else:
            rev = self.revision if src == self.source else None
            net = load(self.transformer_cls, src, "transformer", rev, what, **kw)
        return freeze(net, self.device)

    def transformer_files(self, role: str) -> tuple[dict, list[str]] | None:
        """``(config, safetensors files)`` of the role's transformer when its source is a diffusers
        directory or hub repo with safetensors weights (a hub repo resolved through the local HF
        cache / download); ``None`` for any other source (state-dict files, .bin weights)."""
        import glob
        import json

        src = self.role_source(role)
        if src.endswith(_STATE_DICT_EXT):
            return None
        try:
            if looks_local(src):
                root = os.path.expanduser(src)
            else:
                from huggingface_hub import snapshot_download

                rev = self.revision if src == self.source else None
                root = snapshot_download(src, revision=rev, allow_patterns=["transformer/*", "config.json",
                                                                              "*.safetensors*"])
        except Exception:
            return None
        sub = os.path.join(root, "transformer") if os.path.isdir(os.path.join(root, "transformer")) else root
        files = sorted(glob.glob(os.path.join(sub, "*.safetensors")))
        if not files or not os.path.isfile(os.path.join(sub, "config.json")):
            return None
        with open(os.path.join(sub, "config.json")) as f:
            return json.load(f), files

    def empty_transformer(self, config: dict) -> nn.Module:
        """The transformer of ``config`` with its parameters on the meta device (accelerate's
        ``init_empty_weights``; buffers stay real), frozen and ``eval()``."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            net = self.transformer_cls.from_config(config)
        return net.to(self.dtype).eval().requires_grad_(False)

    @staticmethod
    def _load_state_dict_file(net: nn.Module, path: str, what: str) -> None:
        path = os.path.expanduser(path)
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(path)
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise backbone_error(path, f"{what} init weights", e) from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if any(".lora_A." in k or ".lora_B." in k for k in sd):
            raise BackboneError(f"{path!r} holds LoRA weights, not a full state dict; pass it as a LoRA load path instead")
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if len(unexpected) == len(sd):
            raise BackboneError(f"{path!r}: none of its {len(sd)} keys match the transformer ({what})")

    # ---- helpers -----------------------------------------------------------------------------
    def model_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return quantize_bf16_timestep(sigma) if self.quantize_timestep else sigma

    def _cast_in(self, net: nn.Module, t: torch.Tensor) -> torch.Tensor:
        p = next(net.parameters(), None)
        return t.to(dtype=p.dtype if p is not None else self.dtype)

    @staticmethod
    def vae_out_to_unit(img: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1] -> float32 in [0, 1] (``x/2 + 0.5``, clamped)."""
        return (img.float() / 2 + 0.5).clamp(0.0, 1.0)
