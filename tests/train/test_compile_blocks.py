"""Regional compilation of the repeated transformer blocks (``distributed.compile``).

* numerics: a tiny FLUX.2 transformer with a peft LoRA, compiled with inductor, matches eager in a
  forward + backward within fp32 rounding (outputs and LoRA gradients, relative 1e-4);
* no recompilation storm: after the warm-up (grad forward + backward, no-grad rollout, two batch
  shapes), further calls with fresh σ values and the same shapes compile nothing;
* the option is wired: through the cold-start trainer every role's blocks are compiled and later
  iterations (new σ draws, stop steps) compile nothing; the shipped params compile on CUDA only.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from rtdmd.config.schema import CompileCfg
from rtdmd.lora import inject_lora, lora_parameters
from rtdmd.train.compiling import compile_blocks, compiles_so_far, repeated_blocks

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out"]


def tiny_flux2(seed=0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    net = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                  timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    inject_lora(net, [t for t in TARGETS if any(n.endswith(t) for n, _ in net.named_modules())], 4, 8.0)
    for p in lora_parameters(net).values():  # non-zero B so the LoRA path carries signal
        torch.nn.init.normal_(p, std=0.2)
    return net


def call(net, b, sigma, grid=4, text=8):
    from rtdmd.backbones.flux2_klein import image_ids, text_ids

    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, grid * grid, 16, generator=g)
    emb = torch.randn(b, text, 48, generator=g)
    return net(hidden_states=x, encoder_hidden_states=emb, timestep=torch.full((b,), sigma),
               img_ids=image_ids(grid, grid, "cpu"), txt_ids=text_ids(text, "cpu"), return_dict=False)[0]


def fwd_bwd(net, b, sigma):
    out = call(net, b, sigma)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in lora_parameters(net).items()}
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.slow  # inductor C++ codegen: ~80 s CPU
def test_compiled_blocks_match_eager_forward_backward_with_lora():
    torch._dynamo.reset()
    eager = tiny_flux2()
    comp = copy.deepcopy(eager)
    n = compile_blocks([comp], CompileCfg(enabled="always"), "cpu", log=lambda m: None)
    assert n == 4 == len(repeated_blocks(comp))
    t0 = time.perf_counter()
    out_c, g_c = fwd_bwd(comp, 2, 0.7)
    print(f"inductor warm-up (forward+backward, 2 block classes): {time.perf_counter() - t0:.1f}s")
    out_e, g_e = fwd_bwd(eager, 2, 0.7)
    assert compiles_so_far() >= 2  # really compiled (both block classes)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert set(g_c) == set(g_e) and len(g_c) > 0
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], rtol=1e-4, atol=1e-5 * g_e[k].abs().max().item())


@pytest.mark.slow  # ~30 s CPU of graph capture
def test_no_recompilation_after_warm_up_across_sigmas_and_stage_shapes():
    """Guards only: the aot_eager backend captures graphs exactly like inductor (same dynamo
    guards) without generating kernels, so the test stays fast."""
    torch._dynamo.reset()
    net = tiny_flux2()
    compile_blocks([net], CompileCfg(enabled="always", backend="aot_eager"), "cpu", log=lambda m: None)
    shapes = (2, 4)  # e.g. the stage-1 batch and the rollout batch

    def one_round(sigmas):
        for b in shapes:
            for s in sigmas:
                fwd_bwd(net, b, s)
                with torch.no_grad():
                    call(net, b, s)

    one_round([0.9])  # warm-up
    warm = compiles_so_far()
    assert warm >= 2
    one_round([0.1, 0.35, 0.5, 0.999])
    assert compiles_so_far() == warm, "recompiled after warm-up"


def test_shipped_params_compile_on_cuda_only():
    from rtdmd.config import load_params
    from rtdmd.train.compiling import wants_compile

    cfg = load_params("tiny_flux2", []).distributed.compile
    assert cfg.enabled == "cuda" and wants_compile(cfg, "cuda") and not wants_compile(cfg, "cpu")
    net = tiny_flux2()
    assert compile_blocks([net], cfg, "cpu", log=lambda m: None) == 0
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in repeated_blocks(net))


def test_cold_start_trainer_compiles_every_role_and_does_not_recompile(tmp_path):
    """Through the trainer: every role's blocks compiled; after two iterations (critic and
    generator turns, grad forwards/backwards and the no-grad rollout), more iterations — new σ
    draws and stop steps — compile nothing."""
    from tests.train.helpers import make_trainer, tiny_overrides, write_prompts

    torch._dynamo.reset()
    ov = [*tiny_overrides("tiny_flux2", write_prompts(tmp_path / "p.txt")), "distributed.compile.enabled=always",
          "distributed.compile.backend=aot_eager", "cold_start.fake_update_ratio=1"]
    tr = make_trainer("tiny_flux2", tmp_path / "out", ov)
    tr.setup()

    def loop_step(tr):  # one iteration as Trainer.run does it
        tr.train_step()
        tr.roles.reshard()
        tr.after_step()
        tr.step += 1

    for net in (tr.roles.teacher, *tr.roles.raw.values()):
        blocks = repeated_blocks(net)
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    for _ in range(2):
        loop_step(tr)
    warm = compiles_so_far()
    assert warm >= 2
    for _ in range(3):
        loop_step(tr)
    assert compiles_so_far() == warm, "recompiled after warm-up"


def test_blocks_found_after_fsdp2_style_reclassing():
    """``fully_shard`` swaps each sharded module's class for a subclass ``FSDP<Name>``; the blocks
    must still be found (a name-only match would silently compile nothing under FSDP2)."""
    net = tiny_flux2()
    before = repeated_blocks(net)
    for m in [net, *before]:
        m.__class__ = type(f"FSDP{type(m).__name__}", (type(m),), {})
    assert repeated_blocks(net) == before and len(before) == 4
