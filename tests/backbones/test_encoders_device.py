"""``model.encoders_device``: frozen text encoders on the training device, or kept in host memory
and streamed per submodule (accelerate ``cpu_offload``) with the same embeddings."""
from __future__ import annotations

import pytest
import torch

from rtdmd.backbones import build_backbone
from rtdmd.config import load_params
from rtdmd.config.typed import ConfigError


@pytest.mark.parametrize("name,encoders", [("tiny_sd3", ("clips", "t5")), ("tiny_flux2", ("text_encoder",))])
def test_cpu_offload_gives_the_same_embeddings(name, encoders):
    prompts = ["a red cat on a table", "a golden clock"]
    on_device = build_backbone(load_params(name, ["model.resolution=32"]))
    offloaded = build_backbone(load_params(name, ["model.resolution=32", "model.encoders_device=cpu_offload"]))
    for attr in encoders:  # weights live in accelerate's host-side map, not on the module
        mods = getattr(offloaded, attr)
        for m in mods if isinstance(mods, list) else [mods]:
            assert all(p.device.type == "meta" for p in m.parameters())
    a, b = on_device.encode_prompts(prompts).tensors, offloaded.encode_prompts(prompts).tensors
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_encoders_device_refuses_unknown_values():
    with pytest.raises(Exception, match="encoders_device.*(device|cpu_offload)"):
        load_params("tiny_flux2", ["model.encoders_device=cpu"])
    with pytest.raises(ConfigError, match="toy2d has no text encoders"):
        load_params("toy2d", ["model.encoders_device=cpu_offload"])
