"""``distributed.fsdp_load: meta``: roles built on the meta device, sharded, and streamed in shard by
shard give the same weights and outputs as loading whole then sharding (2-rank gloo FSDP2)."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from rtdmd.config import load_params

from .helpers import ROOT, VENV_BIN, free_port, run
from .rl_helpers import make_init_artifact

pytestmark = pytest.mark.slow


def test_meta_init_and_streamed_shards_equal_the_whole_load(tmp_path):
    """Both layouts (share_base true / false), stage 2: the --init chain is merged while streaming
    in the separate layout and kept as frozen adapters on the shared base. Bit for bit."""
    init = make_init_artifact(load_params("tiny_flux2", ["model.resolution=32"]), tmp_path / "cs", scale=0.05)
    out = tmp_path / "built.safetensors"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), str(ROOT / "tests" / "train" / "sharded_load_worker.py"), str(out), init]
    res = run(cmd, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded whole" not in res.stdout
    got = load_file(str(out))
    whole = {k.removeprefix("whole/"): v for k, v in got.items() if k.startswith("whole/")}
    meta = {k.removeprefix("meta/"): v for k, v in got.items() if k.startswith("meta/")}
    assert whole.keys() == meta.keys() and sum("/out/" in k for k in whole) == 6
    for key, value in whole.items():
        assert (value == meta[key]).all(), key
