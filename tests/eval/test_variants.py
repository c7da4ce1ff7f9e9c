"""Variant spec syntax: parsing, defaults, validation, LoRA stack resolution."""
import json

import pytest

from rtdmd.config import load_params
from rtdmd.eval.variants import VariantError, parse_variant, parse_variants, resolve_lora_stack


@pytest.fixture(scope="module")
def flux():
    from .helpers import flux_params

    return flux_params()


def test_examples_and_defaults(flux):
    t50 = parse_variant("teacher-50=teacher:steps=50,guidance=4.5", flux)
    assert (t50.kind, t50.nfe, t50.eta, t50.guidance, t50.teacher_mode, t50.role) == ("teacher", 50, 0.0, 4.5, True, "teacher")
    assert t50.step_list[0] == 1000 and t50.step_list[-1] == 20
    tdef = parse_variant("teacher-d=teacher", flux)  # eval.teacher_steps and sampler.teacher_guidance
    assert tdef.nfe == flux.eval.teacher_steps and tdef.guidance == flux.sampler.teacher_guidance
    t4 = parse_variant("teacher-4=teacher:steps=4", flux)
    assert t4.step_list == [1000, 750, 500, 250]
    base = parse_variant("base-4=generator", flux)
    assert (base.kind, base.step_list, base.eta, base.guidance, base.teacher_mode, base.role) == \
        ("generator", [1000, 750, 500, 250], flux.sampler.eta, 1.0, False, "generator")
    lo = parse_variant("rtdmd-8=lora:s3://bucket/run/rl,steps=8,eta=0.5", flux)
    assert lo.lora_uris == ["s3://bucket/run/rl"] and lo.nfe == 8 and lo.eta == 0.5 and lo.follow_parents
    two = parse_variant("x=lora:/a/cs,/a/b=c/rl,chain=false,step_list=1000/500", flux)
    assert two.lora_uris == ["/a/cs", "/a/b=c/rl"] and not two.follow_parents and two.step_list == [1000, 500]
    assert json.loads(json.dumps(lo.to_dict()))["spec"] == "rtdmd-8=lora:s3://bucket/run/rl,steps=8,eta=0.5"


@pytest.mark.parametrize("spec, match", [
    ("teacher", "NAME=KIND"),
    ("bad name=teacher", "must match"),
    ("x=student", "unknown kind 'student'"),
    ("x=lora", "needs at least one artifact URI"),
    ("x=teacher:some/path", "takes no artifact URI"),
    ("x=generator:stpes=4", "unknown option 'stpes'"),
    ("x=teacher:steps=4,step_list=1000/500", "not both"),
    ("x=teacher:steps=0", "steps must be >= 1"),
    ("x=teacher:steps=four", "not an integer"),
    ("x=generator:eta=1.5", r"eta must be in \[0, 1\]"),
    ("x=generator:guidance=-1", "guidance must be > 0"),
    ("x=generator:step_list=500/1000", "strictly descending"),
    ("x=generator:step_list=2000/10", r"\(0, 1000\]"),
    ("x=teacher:chain=false", "lora variants only"),
    ("x=lora:a,chain=maybe", "not a boolean"),
    ("x=generator:steps=2,steps=3", "given twice"),
    ("x=generator:,", "empty item"),
])
def test_bad_specs_are_clear_errors(flux, spec, match):
    with pytest.raises(VariantError, match=match):
        parse_variant(spec, flux)


def test_parse_variants_forms_and_duplicates(flux):
    vs = parse_variants({"a": "teacher:steps=2", "b": "generator"}, flux)
    assert [v.name for v in vs] == ["a", "b"]
    assert parse_variants("a=generator", flux)[0].name == "a"
    with pytest.raises(VariantError, match="used twice"):
        parse_variants(["a=teacher", "a=generator"], flux)
    with pytest.raises(VariantError, match="no model variants"):
        parse_variants([], flux)


def test_lora_stack_follows_parents_dedupes_and_verifies(toy_chain, tmp_path):
    params = load_params("toy2d")
    cs, rl = toy_chain
    stack = resolve_lora_stack([str(rl)], params)
    assert [a.manifest["stage"] for a in stack] == ["cold_start", "rl"]
    assert [a.manifest["stage"] for a in resolve_lora_stack([str(cs), str(rl)], params)] == ["cold_start", "rl"]
    assert [a.manifest["stage"] for a in resolve_lora_stack([str(rl)], params, follow_parents=False)] == ["rl"]
    with pytest.raises(VariantError, match="does not exist"):
        resolve_lora_stack([str(tmp_path / "nope")], params)
    with pytest.raises(VariantError, match="trained for backbone 'toy2d'"):
        resolve_lora_stack([str(rl)], load_params("tiny_sd3"))
    # a tampered weight file is refused by the checksum check
    import shutil

    bad = tmp_path / "rl"
    shutil.copytree(rl, bad)
    f = next((bad / "generator").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(VariantError, match="sha256"):
        resolve_lora_stack([str(bad)], params, follow_parents=False)
