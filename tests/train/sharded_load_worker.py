"""torchrun worker for tests/train/test_sharded_load.py: builds the roles of one configuration under
FSDP2 (gloo, CPU) and writes rank 0's gathered weights and one forward of every role."""
from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from rtdmd.backbones import build_backbone
from rtdmd.config import load_params
from rtdmd.dist import full_tensor, init_distributed, teardown
from rtdmd.train.roles import build_roles


def build(env, init: str, overrides: list[str], tag: str, result: dict, notes: list) -> None:
    params = load_params("tiny_flux2", ["distributed.strategy=fsdp", "model.resolution=32",
                                        "distributed.mixed_precision=fp32", *overrides])
    bb = build_backbone(params)
    torch.manual_seed(0)
    roles = build_roles(bb, params, env, init_uri=init or None, log=notes.append)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bb.latent_shape(2), generator=g)
    cond = bb.encode_prompts(["a red cat", "a blue car"])
    for name, net in [("teacher", roles.teacher), *roles.nets.items()]:
        with torch.no_grad():
            result[f"{tag}/out/{name}"] = bb.velocity(net, x, torch.tensor([0.7, 0.4]), cond).contiguous()
    roles.reshard()
    for i, net in enumerate(roles.modules()):
        for n, p in net.named_parameters():
            result[f"{tag}/w{i}/{n}"] = full_tensor(p.detach()).contiguous()


def main(out: str, init: str) -> None:
    """Every (share_base, fsdp_load) pair, stage 2 (``init``), in one process group."""
    env = init_distributed(load_params("tiny_flux2", ["distributed.strategy=fsdp"]))
    result, notes = {}, []
    for share in ("true", "false"):
        for how in ("whole", "meta"):
            build(env, init, [f"distributed.share_base={share}", f"distributed.fsdp_load={how}"],
                  f"{how}/share_{share}", result, notes)
    if env.rank == 0:
        save_file(result, out)
        print("\n".join(notes))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
