"""Loading edge cases of the diffusers adapters and the tiny builders: clear errors for missing
weights, deterministic and atomic tiny builds, generator init sources, pure layout helpers."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from rtdmd.backbones.base import BackboneError
from rtdmd.config.schema import ModelCfg


def _cfg(family, pretrained, **kw):
    return ModelCfg(family=family, pretrained=str(pretrained), resolution=32, dtype="float32",
                    max_sequence_length=16, **kw)


@pytest.mark.parametrize("family", ["flux2_klein", "sd3", "flux1"])
def test_missing_local_dir_is_a_clear_error(tmp_path, family):
    from rtdmd.backbones.flux1 import Flux1Backbone
    from rtdmd.backbones.flux2_klein import Flux2KleinBackbone
    from rtdmd.backbones.sd3 import SD3Backbone

    cls = {"flux2_klein": Flux2KleinBackbone, "sd3": SD3Backbone, "flux1": Flux1Backbone}[family]
    missing = tmp_path / "nope" / "model"
    with pytest.raises(BackboneError) as ei:
        cls(_cfg(family, missing), [], name="x")
    msg = str(ei.value)
    assert str(missing) in msg and "local directory in diffusers layout" in msg and "huggingface-cli download" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneError, match="expected a diffusers pipeline layout"):
        cls(_cfg(family, empty), [], name="x")


def test_unknown_hub_id_offline_names_the_id(monkeypatch):
    import huggingface_hub.constants as hc

    from rtdmd.backbones.flux2_klein import Flux2KleinBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    hub_id = "rtdmd-test-org/no-such-model-xyz"
    with pytest.raises(BackboneError) as ei:
        Flux2KleinBackbone(_cfg("flux2_klein", hub_id), [], name="x")
    msg = str(ei.value)
    assert f"hub id {hub_id!r}" in msg and f"huggingface-cli download {hub_id}" in msg and "HF_HUB_OFFLINE=1" in msg


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_tiny_build_is_deterministic_and_seeded(tmp_path):
    from rtdmd.backbones.tiny import build_tiny_pipeline

    a = build_tiny_pipeline("sd3", tmp_path / "a", seed=0)
    b = build_tiny_pipeline("sd3", tmp_path / "b", seed=0)
    c = build_tiny_pipeline("sd3", tmp_path / "c", seed=1)
    assert _digest(a) == _digest(b) != _digest(c)
    assert (a / "model_index.json").is_file() and (a / "tokenizer_3" / "tokenizer.json").is_file()


def test_tiny_build_does_not_touch_global_rng(tmp_path):
    from rtdmd.backbones.tiny import build_tiny_pipeline

    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("flux1", tmp_path / "f")
    assert torch.equal(torch.rand(3), expect)


def test_ensure_tiny_builds_once_atomically(tmp_path):
    from rtdmd.backbones.tiny import ensure_tiny

    out = tmp_path / "cache" / "tiny_flux2"
    ensure_tiny("tiny_flux2", out)
    stamp = (out / "model_index.json").stat().st_mtime_ns
    ensure_tiny("flux2", out)
    assert (out / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny_flux2"]  # no temp dirs left
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="model_index.json"):
        ensure_tiny("flux2", junk)
    with pytest.raises(ValueError, match="valid: flux2, sd3, sd35, flux1"):
        ensure_tiny("flux3", tmp_path / "z")


@pytest.mark.slow
def test_cli_entry_point(tmp_path):
    out = tmp_path / "cli_sd35"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "rtdmd.backbones.tiny", "--kind", "sd35", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model_index.json").is_file() and str(out) in r.stdout
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["qk_norm"] == "rms_norm" and list(cfg["dual_attention_layers"]) == [0]


def test_generator_init_sources(tmp_path):
    """generator_init: another pipeline dir, a bare transformer dir, or a full state-dict file."""
    from rtdmd.backbones.flux2_klein import Flux2KleinBackbone
    from rtdmd.backbones.tiny import build_tiny_pipeline

    base = build_tiny_pipeline("flux2", tmp_path / "base", seed=0)
    other = build_tiny_pipeline("flux2", tmp_path / "other", seed=1)
    sd_file = tmp_path / "gen.pt"
    from diffusers import Flux2Transformer2DModel

    ref = Flux2Transformer2DModel.from_pretrained(str(other), subfolder="transformer")
    torch.save(ref.state_dict(), sd_file)
    layers = [1, 2, 3]
    for init in (other, other / "transformer", sd_file):
        bb = Flux2KleinBackbone(_cfg("flux2_klein", base, generator_init=str(init), text_encoder_out_layers=layers),
                                [], name="x")
        gen, teacher = bb.load_transformer("generator"), bb.load_transformer("teacher")
        assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), ref.state_dict().values()))
        assert not torch.equal(next(gen.parameters()), next(teacher.parameters()))
    lora_file = tmp_path / "lora.pt"
    torch.save({"x.lora_A.default.weight": torch.zeros(2, 2)}, lora_file)
    bb = Flux2KleinBackbone(_cfg("flux2_klein", base, generator_init=str(lora_file), text_encoder_out_layers=layers),
                            [], name="x")
    with pytest.raises(BackboneError, match="LoRA"):
        bb.load_transformer("generator")
    with pytest.raises(ValueError, match="text_encoder_out_layers"):
        Flux2KleinBackbone(_cfg("flux2_klein", base), [], name="x")  # default (9, 18, 27) vs 3 layers


def test_layout_helpers_round_trip():
    from rtdmd.backbones.flux1 import image_ids as ids1
    from rtdmd.backbones.flux1 import pack, unpack
    from rtdmd.backbones.flux2_klein import image_ids, patchify, text_ids, unpatchify

    z = torch.randn(2, 3, 6, 4)
    p = patchify(z)
    assert p.shape == (2, 12, 3, 2) and torch.equal(unpatchify(p), z)
    c, pp, q, i, j = 1, 1, 0, 2, 1  # channel 4c+2p+q <-> pixel (2i+p, 2j+q)
    assert p[0, 4 * c + 2 * pp + q, i, j] == z[0, c, 2 * i + pp, 2 * j + q]
    t = pack(z)
    assert t.shape == (2, 6, 12) and torch.equal(unpack(t, 6, 4), z)
    assert t[0, i * 2 + j, 4 * c + 2 * pp + q] == z[0, c, 2 * i + pp, 2 * j + q]
    assert image_ids(2, 3, "cpu").tolist()[4] == [0, 1, 1, 0] and text_ids(3, "cpu").tolist()[2] == [0, 0, 0, 2]
    assert ids1(2, 3, "cpu").tolist()[5] == [0, 1, 2]


@pytest.mark.parametrize("name", ["tiny_flux2", "tiny_sd3", "tiny_flux1"])
def test_params_files_build_through_dispatcher(tmp_path, name):
    """``params/tiny_*.yaml`` -> ``build_backbone`` -> one velocity + decode at the params' resolution."""
    from rtdmd.backbones import build_backbone
    from rtdmd.config import load_params

    overrides = [f"model.pretrained={tmp_path / name}"]
    if name == "tiny_flux2" and load_params(name).model.text_encoder_out_layers is None:
        overrides.append("model.text_encoder_out_layers=[1, 2, 3]")  # 3-layer tiny Qwen3
    params = load_params(name, overrides)
    bb = build_backbone(params)
    net = bb.load_transformer("generator")
    x = torch.randn(bb.latent_shape(2))
    with torch.no_grad():
        v = bb.velocity(net, x, torch.tensor([1.0, 0.5]), bb.encode_prompts(["a", "b"]))
    res = params.model.resolution
    assert v.shape == x.shape and bb.decode(x).shape == (2, 3, res, res)
    assert len(bb.sigmas(params.sampler.step_list)) == len(params.sampler.step_list) + 1
