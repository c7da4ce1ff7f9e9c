"""``rtdmd params import-reference``: the authors' five config pairs convert to the shipped params.

Fixtures: ``tests/fixtures/reference/{cold_start,rtdmd,inference}/<backbone>.yaml`` (verbatim,
Apache-2.0). GPU counts are the reference's (§10.2: stage 1 on 1x8; §10.3: stage 2 per backbone).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rtdmd.config import ConfigError, load_params
from rtdmd.config.reference_import import convert
from rtdmd.config.typed import to_mapping

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "tests" / "fixtures" / "reference"
GPUS = {"flux2_4b": (8, 16), "flux2_9b": (8, 32), "sd35m": (8, 8), "sd3m": (8, 16), "flux1_dev": (8, 32)}
DICT_FIELDS = ("reward_weights", "rewards", "reward_dataset_map")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in DICT_FIELDS:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def departure_knobs() -> set[str]:
    rows = [ln for ln in (ROOT / "docs" / "reference_departures.md").read_text().splitlines() if ln.startswith("| ")]
    knobs = set()
    for row in rows[1:]:  # rows[0] is the header
        knobs.update(re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", row.split("|")[4]))
    return knobs


def _convert(bb, **kw):
    c, r = GPUS[bb]
    return convert(REF / "cold_start" / f"{bb}.yaml", REF / "rtdmd" / f"{bb}.yaml", REF / "inference" / f"{bb}.yaml",
                   name=bb, cold_start_gpus=c, rl_gpus=r, **kw)


@pytest.mark.parametrize("bb", sorted(GPUS))
def test_reference_pair_equals_shipped_params_except_departures(bb):
    out, notes = _convert(bb)
    converted = _flat(out)
    shipped = load_params(bb)
    resolved = {"": _flat(to_mapping(shipped)), "rl": _flat(to_mapping(shipped.for_stage("rl")))}
    knobs = departure_knobs()
    assert "model.patch_embed_linear" in knobs
    diffs = []
    for key, want in converted.items():
        if key.startswith("rl.distributed."):  # compare with the stage-resolved section
            got = resolved["rl"]["distributed." + key.split(".")[-1]]
        else:
            got = resolved[""].get(key, "<missing>")
        if got != want and key not in knobs:
            diffs.append(f"{key}: reference {want!r} != params/{bb}.yaml {got!r}")
    assert not diffs, "\n".join(diffs)
    assert len(converted) > 90 and notes  # every recipe field came from the files; ignored keys are reported


def test_converted_file_loads_as_params(tmp_path):
    out, _ = _convert("sd35m")
    path = tmp_path / "sd35m_ref.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    with pytest.raises(ConfigError, match="patch_embed_linear"):
        bad, _ = _convert("sd3m")
        p2 = tmp_path / "sd3m_ref.yaml"
        p2.write_text(yaml.safe_dump(bad, sort_keys=False))
        load_params(p2)
    p = load_params(path)
    assert p.cold_start.global_batch_size == 72 and p.rl.global_sample_batch_size == 72
    assert p.for_stage("rl").distributed.strategy == "ddp" and p.distributed.strategy == "fsdp"
    assert p.rl.init_milestone == 15000 and p.cold_start.milestones == [15000]


def test_patch_embed_linear_is_refused():
    with pytest.raises(ConfigError, match="patch_embed_linear: true .* not supported"):
        load_params("sd3m", ["model.patch_embed_linear=true"])


def _write_variant(tmp_path, edit):
    data = yaml.safe_load((REF / "rtdmd" / "flux2_4b.yaml").read_text())
    edit(data)
    path = tmp_path / "rtdmd.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_and_misspelled_keys_fail_with_their_names(tmp_path):
    def edit(d):
        d["grpo"]["lerning_rate"] = d["grpo"].pop("learning_rate")
        d["grpo"]["my_new_knob"] = 3
    path = _write_variant(tmp_path, edit)
    with pytest.raises(ConfigError) as exc:
        convert(REF / "cold_start" / "flux2_4b.yaml", path, name="x")
    # the misspelling leaves learning_rate missing; fix that and the unknown keys are listed
    assert "learning_rate" in str(exc.value)

    def edit2(d):
        d["grpo"]["my_new_knob"] = 3
        d["grpo"]["step_selection"]["num_train_step"] = 2
    path = _write_variant(tmp_path, edit2)
    with pytest.raises(ConfigError) as exc:
        convert(REF / "cold_start" / "flux2_4b.yaml", path, name="x")
    msg = str(exc.value)
    assert "grpo.my_new_knob" in msg and "grpo.step_selection.num_train_step" in msg and "cannot be mapped" in msg


def test_unsupported_value_and_disagreement_are_named(tmp_path):
    path = _write_variant(tmp_path, lambda d: d["grpo"].__setitem__("sde_type", "sde"))
    with pytest.raises(ConfigError, match=r"'grpo.sde_type' = 'sde' is not supported; expected 'cps'"):
        convert(REF / "cold_start" / "flux2_4b.yaml", path, name="x")
    path = _write_variant(tmp_path, lambda d: d["grpo"].__setitem__("noise_level", 0.5))
    with pytest.raises(ConfigError, match=r"'grpo.noise_level' = 0.5 disagrees with .*cps_eta = 0.9"):
        convert(REF / "cold_start" / "flux2_4b.yaml", path, name="x")


def test_cli_writes_params_and_refuses_to_overwrite(tmp_path):
    from rtdmd.cli import main

    out = tmp_path / "mine.yaml"
    args = ["params", "import-reference", str(REF / "cold_start" / "flux2_4b.yaml"), str(REF / "rtdmd" / "flux2_4b.yaml"),
            "--inference", str(REF / "inference" / "flux2_4b.yaml"), "--out", str(out)]
    assert main(args) == 0
    p = load_params(out)
    assert p.name == "mine" and p.lora.reinit_after_merge == "reference" and p.rl.epochs == 100000
    assert main(args) == 2  # exists: needs --force
    assert main([*args, "--force"]) == 0
