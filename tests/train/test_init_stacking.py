"""``--init URI``: the artifact chain is merged into the base before a fresh adapter is trained,
and the new artifact links its parent (uri + manifest sha256)."""
from __future__ import annotations

import torch

from rtdmd.lora import inject_lora, load_lora_state
from rtdmd.lora.artifact import load_lora_artifact, stack_chain

from .helpers import make_trainer

SMALL = ["cold_start.global_batch_size=8", "cold_start.total_steps=4", "cold_start.fake_update_ratio=2",
         "cold_start.eval_interval=0", "cold_start.ema_decay=0.0"]


def test_init_artifact_is_merged_and_linked(tmp_path):
    make_trainer("toy2d", tmp_path / "a", SMALL).run()
    parent = load_lora_artifact(str(tmp_path / "a" / "artifact"))
    child = make_trainer("toy2d", tmp_path / "b", SMALL)
    child.opts.init = str(tmp_path / "a" / "artifact")
    child.setup()
    # at start the child's generator equals base + parent generator LoRA (fresh adapter has B = 0)
    ref = child.backbone.load_transformer("generator")
    ad = parent.adapters["generator"]
    inject_lora(ref, ad.targets, ad.rank, ad.alpha)
    load_lora_state(ref, ad.state)
    x, s = torch.randn(16, 2), torch.rand(16)
    cond = child.backbone.encode_prompts(["ring", "square"] * 8)
    got = child.backbone.velocity(child.roles.raw["generator"], x, s, cond)
    assert torch.allclose(got, child.backbone.velocity(ref, x, s, cond), atol=1e-5)
    assert not torch.allclose(got, child.backbone.velocity(child.roles.teacher, x, s, cond), atol=1e-5)
    fresh = make_trainer("toy2d", tmp_path / "c", SMALL)
    fresh.opts.init = str(tmp_path / "a" / "artifact")
    manifest = fresh.run()
    assert manifest["parent"] == {"uri": str(tmp_path / "a" / "artifact"), "manifest_sha256": parent.manifest_sha256}
    chain = stack_chain(str(tmp_path / "c" / "artifact"), backbone="toy2d")
    assert [a.uri for a in chain] == [str(tmp_path / "a" / "artifact"), str(tmp_path / "c" / "artifact")]
