"""LoRA: injection with checked targets, exact save/load/stack round-trips, safe .pt import."""
import json
import pickle

import pytest
import torch
from torch import nn

from rtdmd.config import load_params
from rtdmd.lora import LoraError, inject_lora, load_lora_dir, load_lora_state, lora_state_dict, save_lora_dir
from rtdmd.lora.artifact import load_lora_artifact
from rtdmd.lora.core import merge_lora_into_base, stack_and_refresh
from rtdmd.lora.importer import import_reference
from rtdmd.lora.io import WEIGHTS


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_out": nn.Linear(8, 6)}) for _ in range(2)])

    def forward(self, x):
        for blk in self.blocks:
            x = torch.tanh(blk["to_q"](x))
            x = torch.cat([blk["to_out"](x), x[:, :2]], dim=1)
        return x


def _randomise_lora(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_inject_matches_targets_and_trains_only_lora():
    net = Net()
    adapted = inject_lora(net, ["to_q", "to_out"], rank=2, alpha=4)
    assert adapted == ["blocks.0.to_out", "blocks.0.to_q", "blocks.1.to_out", "blocks.1.to_q"]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    keys = lora_state_dict(net).keys()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    # the in-memory names keep the adapter name, as the reference (spec §9.2, invariant 28)
    assert any(n.endswith(".lora_A.default.weight") for n, _ in net.named_parameters())


def test_fresh_adapter_is_identity_and_b_is_zero():
    net, x = Net(), torch.randn(3, 8)
    before = net(x)
    inject_lora(net, ["to_q"], rank=2, alpha=4)
    assert torch.equal(net(x), before)
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_state_dict(net).items() if "lora_B" in k)


def test_target_matching_nothing_is_an_error_even_if_others_match():
    with pytest.raises(LoraError, match="to_kk"):
        inject_lora(Net(), ["to_q", "to_kk"], rank=2, alpha=4)


def test_save_load_round_trip_is_exact(tmp_path):
    net = Net()
    inject_lora(net, ["to_q", "to_out"], rank=2, alpha=4)
    _randomise_lora(net)
    x = torch.randn(4, 8)
    out = net(x)
    save_lora_dir(tmp_path / "a", lora_state_dict(net), rank=2, alpha=4, targets=["to_q", "to_out"])
    state, cfg = load_lora_dir(tmp_path / "a")
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    other = Net()
    inject_lora(other, ["to_q", "to_out"], rank=2, alpha=4)
    load_lora_state(other, state)
    assert torch.equal(other(x), out)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / WEIGHTS), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())


def test_stacked_equals_active_adapter():
    net = Net()
    inject_lora(net, ["to_q", "to_out"], rank=2, alpha=4)
    _randomise_lora(net)
    x = torch.randn(4, 8)
    expected = net(x)
    state = lora_state_dict(net)
    stacked = Net()
    stack_and_refresh(stacked, [(state, 4 / 2)], ["to_q", "to_out"], rank=2, alpha=4)
    assert torch.allclose(stacked(x), expected, atol=1e-6)
    # the fresh adapter on top is trainable and starts at zero
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_state_dict(stacked).items() if "lora_B" in k)


def test_wrong_rank_and_unknown_keys_are_refused(tmp_path):
    net = Net()
    inject_lora(net, ["to_q"], rank=2, alpha=4)
    state = lora_state_dict(net)
    wrong_rank = {k: (v.repeat(2, 1) if "lora_A" in k else v.repeat(1, 2)) for k, v in state.items()}
    with pytest.raises(LoraError, match="wrong rank"):
        load_lora_state(net, wrong_rank)
    unknown = dict(state, **{"blocks.9.to_q.lora_A.weight": torch.zeros(2, 8), "blocks.9.to_q.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(LoraError, match="blocks.9.to_q"):
        load_lora_state(net, unknown)
    # a file whose config rank disagrees with its tensors
    save_lora_dir(tmp_path / "a", state, rank=2, alpha=4, targets=["to_q"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["r"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraError, match="rank 2 but .* r=8"):
        load_lora_dir(tmp_path / "a")


def test_file_with_non_lora_key_is_refused(tmp_path):
    from safetensors.torch import save_file

    net = Net()
    inject_lora(net, ["to_q"], rank=2, alpha=4)
    save_lora_dir(tmp_path / "a", lora_state_dict(net), rank=2, alpha=4, targets=["to_q"])
    tensors = {f"transformer.{k}": v for k, v in lora_state_dict(net).items()}
    tensors["transformer.blocks.0.to_q.weight"] = torch.zeros(8, 8)
    save_file(tensors, str(tmp_path / "a" / WEIGHTS))
    with pytest.raises(LoraError, match="unknown key 'transformer.blocks.0.to_q.weight'"):
        load_lora_dir(tmp_path / "a")


def test_truncated_safetensors_is_refused(tmp_path):
    net = Net()
    inject_lora(net, ["to_q"], rank=2, alpha=4)
    save_lora_dir(tmp_path / "a", lora_state_dict(net), rank=2, alpha=4, targets=["to_q"])
    path = tmp_path / "a" / WEIGHTS
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(LoraError, match="truncated"):
        load_lora_dir(tmp_path / "a")


def _reference_pt(path, net_modules, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (fin, fout) in net_modules.items():
        state[f"{name}.lora_A.default.weight"] = torch.randn(rank, fin, generator=g) * 0.1
        state[f"{name}.lora_B.default.weight"] = torch.randn(fout, rank, generator=g) * 0.1
    torch.save(state, path)
    return state


def test_import_reference_pt_matches_hand_applied_update(tmp_path):
    """The published layout (torch-saved `.lora_A.default.weight` dict) on the toy2d MLP."""
    from rtdmd.backbones import build_backbone

    params = load_params("toy2d")
    backbone = build_backbone(params)
    modules = {"in_proj": (50, 128), "hidden.0": (128, 128), "hidden.1": (128, 128), "out_proj": (128, 2)}
    ref = _reference_pt(tmp_path / "generator_ema.pt", modules)
    _reference_pt(tmp_path / "fake_score_net.pt", modules, seed=1)
    import_reference([tmp_path / "generator_ema.pt", tmp_path / "fake_score_net.pt"], params=params,
                     out=str(tmp_path / "art"), alpha=8.0)
    art = load_lora_artifact(str(tmp_path / "art"), backbone="toy2d")
    assert set(art.adapters) == {"generator", "fake_score"} and art.adapters["generator"].rank == 4

    x, sigma = torch.randn(5, 2), torch.rand(5)
    cond = backbone.encode_prompts(["ring", "square", "triangle", "ring", "ring"])
    by_hand = backbone.load_transformer("generator")
    with torch.no_grad():
        for name in modules:
            a, b = ref[f"{name}.lora_A.default.weight"], ref[f"{name}.lora_B.default.weight"]
            by_hand.get_submodule(name).weight += (8.0 / 4) * b @ a
    imported = backbone.load_transformer("generator")
    inject_lora(imported, params.lora.targets, rank=4, alpha=8.0)
    load_lora_state(imported, art.adapters["generator"].state)
    with torch.no_grad():
        assert torch.allclose(backbone.velocity(imported, x, sigma, cond), backbone.velocity(by_hand, x, sigma, cond), atol=1e-5)
        merged = backbone.load_transformer("generator")
        merge_lora_into_base(merged, art.adapters["generator"].state, 2.0)
        assert torch.allclose(backbone.velocity(merged, x, sigma, cond), backbone.velocity(by_hand, x, sigma, cond), atol=1e-5)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pt_with_pickled_object_is_refused_without_executing(tmp_path, capsys):
    path = tmp_path / "generator_ema.pt"
    torch.save({"blocks.0.to_q.lora_A.default.weight": torch.zeros(2, 8), "payload": Evil()}, path)
    with pytest.raises(LoraError, match="refused"):
        import_reference([path], params=load_params("toy2d"), out=str(tmp_path / "o"))
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_pt_for_another_backbone_is_refused(tmp_path):
    _reference_pt(tmp_path / "generator_ema.pt", {"transformer_blocks.0.attn.to_q": (8, 8)})
    with pytest.raises(LoraError, match="wrong --backbone"):
        import_reference([tmp_path / "generator_ema.pt"], params=load_params("toy2d"), out=str(tmp_path / "o"))


def test_cli_lora_import(tmp_path):
    from rtdmd.cli import main

    _reference_pt(tmp_path / "generator_ema.pt", {"in_proj": (50, 128), "out_proj": (128, 2)})
    assert main(["lora", "import", str(tmp_path / "generator_ema.pt"), "--backbone", "toy2d", "--out", str(tmp_path / "art")]) == 0
    assert (tmp_path / "art" / "manifest.json").is_file()
    assert main(["lora", "import", str(tmp_path / "missing.pt"), "--backbone", "toy2d", "--out", str(tmp_path / "x")]) == 2
