"""Build the real backbones' components from :mod:`rtdmd.plan.facts` instead of downloading them.

:func:`simulated_loading` swaps the adapters' ``from_pretrained`` wrapper (``hf_common.load``,
and ``load_config`` for SD3) for constructors of the same classes with the published configs,
so ``build_backbone`` / ``load_transformer`` run their own code unchanged; under
``FakeTensorMode`` the weights cost nothing. Tokenizers become :class:`FakeTokenizer` (token ids
of the right length; values do not matter for memory or FLOPs). The compute dtype is the
params' ``model.dtype`` as on a GPU (``build_backbone`` falls back to fp32 on CPU otherwise).

Every role whose source is a pipeline (not a state-dict file) also looks like a diffusers
safetensors directory (``DiffusersBackbone.transformer_files``), and ``safetensors.safe_open`` of
that simulated file lists the transformer's state-dict keys with their shapes and dtype and reads
each as a new tensor: so ``distributed.fsdp_load: meta`` takes its real path (meta model, shard,
stream tensor by tensor) in the simulation too. The tensor a real rank reads into host memory is
counted as device memory here (one parameter at a time: an over-count of at most the largest
parameter).
"""
from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import torch

from rtdmd.plan.facts import FAMILY, SCHEDULERS, TEXT_ENCODERS, TRANSFORMERS, VAE_SCALING, VAES


class _Encoding(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class FakeTokenizer:
    """Returns ``max_length`` token ids per prompt (all zero), as padding="max_length" does."""

    def apply_chat_template(self, messages, tokenize: bool = False, **kw) -> str:
        return messages[-1]["content"]

    def __call__(self, texts, max_length: int = 77, return_tensors=None, **kw) -> _Encoding:
        n = 1 if isinstance(texts, str) else len(texts)
        ids = torch.zeros(n, int(max_length), dtype=torch.long)
        return _Encoding(input_ids=ids, attention_mask=torch.ones_like(ids))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _class(name: str):
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


def spec_for(key: str) -> dict:
    """The component spec of a real backbone (from :mod:`rtdmd.plan.facts`)."""
    if key not in FAMILY:
        raise KeyError(f"unknown backbone {key!r}; expected one of {sorted(FAMILY)}")
    vae = dict(VAES[key])
    if key in VAE_SCALING:
        vae["cfg"] = {**vae["cfg"], "scaling_factor": VAE_SCALING[key][0], "shift_factor": VAE_SCALING[key][1]}
    return {"transformer": TRANSFORMERS[key], "text_encoders": TEXT_ENCODERS[key], "vae": vae,
            "scheduler": SCHEDULERS[key]}


def build_text_encoder(spec: dict, dtype: torch.dtype):
    import transformers

    cfg_cls = {"Qwen3Model": transformers.Qwen3Config, "CLIPTextModelWithProjection": transformers.CLIPTextConfig,
               "CLIPTextModel": transformers.CLIPTextConfig, "T5EncoderModel": transformers.T5Config}[spec["cls"]]
    with default_dtype(dtype):
        return getattr(transformers, spec["cls"])(cfg_cls(**spec["cfg"]))


def build_module(spec: dict, dtype: torch.dtype):
    with default_dtype(dtype):
        return _class(spec["cls"])(**spec["cfg"])


def fake_component(spec: dict, cls, subfolder: str | None, dtype: torch.dtype):
    """The component ``cls`` stored in ``subfolder`` of the pipeline described by ``spec``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sub = subfolder or "transformer"
    if sub.startswith("tokenizer"):
        return FakeTokenizer()
    if sub == "transformer":
        return build_module(spec["transformer"], dtype)
    if sub.startswith("text_encoder"):
        idx = 0 if sub == "text_encoder" else int(sub.rsplit("_", 1)[1]) - 1
        return build_text_encoder(spec["text_encoders"][idx], dtype)
    if sub == "vae":
        return build_module(spec["vae"], dtype)
    if sub == "scheduler":
        return FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    raise KeyError(f"no simulated component {sub!r} ({getattr(cls, '__name__', cls)})")


_SIM_FILE = "<simulated>/transformer/diffusion_pytorch_model.safetensors"


class SimulatedCheckpoint:
    """``safe_open`` of the simulated transformer file: keys, shapes and dtype of the state dict
    (taken from the model built on the meta device); ``get_tensor`` allocates that tensor."""

    def __init__(self, entries: dict[str, tuple[torch.Size, torch.dtype]]):
        self.entries = entries

    def __enter__(self) -> "SimulatedCheckpoint":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, key: str) -> torch.Tensor:
        shape, dt = self.entries[key]
        return torch.empty(shape, dtype=dt)


def checkpoint_entries(spec: dict, dtype: torch.dtype) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """State-dict keys → (shape, dtype) of ``spec``'s transformer, built on the meta device outside
    any active fake/tracking mode (it allocates nothing)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.device("meta"):
        net = build_module(spec["transformer"], dtype)
    return {k: (v.shape, v.dtype) for k, v in net.state_dict().items()}


@contextlib.contextmanager
def fake_init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """accelerate's ``init_empty_weights`` under ``FakeTensorMode``: new parameters go to the meta
    device, buffers stay. (accelerate rebuilds each as ``type(param)(param.to("meta"))``; under the
    fake mode that type is ``FakeTensor``, whose constructor puts it back on the fake device, so
    the simulation registers ``nn.Parameter``s itself.)"""
    from torch import nn

    if include_buffers:
        raise ValueError("simulated init_empty_weights: include_buffers is not used by the project")
    old = nn.Module.register_parameter

    def register(module, name, param):
        old(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


@contextlib.contextmanager
def simulated_loading(spec: dict, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within: backbones load the components of ``spec`` (:func:`spec_for`) in ``dtype``
    (default: the params' ``model.dtype``)."""
    import accelerate
    import safetensors

    import rtdmd.backbones as B
    from rtdmd.backbones import flux1, flux2_klein, hf_common, sd3

    def load(cls, source, subfolder, revision, what, **kw):
        return fake_component(spec, cls, subfolder, kw.get("dtype") or torch.float32)

    def load_config(cls, source, subfolder, revision, what):
        return dict(spec["transformer"]["cfg"])

    real_build = B.build_backbone

    def build_backbone(params, device="cpu", dt=None):
        return real_build(params, device, dt or dtype or B.torch_dtype(params.model.dtype))

    entries: dict = {}

    def transformer_files(self, role: str):
        if self.role_source(role).endswith(hf_common._STATE_DICT_EXT):
            return None  # loaded whole by the real code too
        entries.setdefault("file", checkpoint_entries(spec, self.dtype))
        return dict(spec["transformer"]["cfg"]), [_SIM_FILE]

    real_open = safetensors.safe_open

    def safe_open(path, *args, **kwargs):
        return SimulatedCheckpoint(entries["file"]) if path == _SIM_FILE else real_open(path, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        for mod in (hf_common, flux2_klein, sd3, flux1):
            stack.enter_context(mock.patch.object(mod, "load", load))
        stack.enter_context(mock.patch.object(sd3, "load_config", load_config))
        stack.enter_context(mock.patch.object(B, "build_backbone", build_backbone))
        stack.enter_context(mock.patch.object(hf_common.DiffusersBackbone, "transformer_files", transformer_files))
        stack.enter_context(mock.patch.object(safetensors, "safe_open", safe_open))
        stack.enter_context(mock.patch.object(accelerate, "init_empty_weights", fake_init_empty_weights))
        yield
