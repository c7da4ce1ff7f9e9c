"""Typed params: every backbone file loads; bad keys, types, ranges and batch splits are errors."""
import pytest
import yaml

from rtdmd.config import BACKBONES, ConfigError, load_params, params_hash
from rtdmd.config.loader import params_path


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_params_file_loads(name):
    p = load_params(name)
    assert p.name == name
    assert p.sampler.step_list == sorted(p.sampler.step_list, reverse=True)


def test_reference_settings_are_carried_for_flux2_4b():
    p = load_params("flux2_4b")
    assert p.model.pretrained == "black-forest-labs/FLUX.2-klein-base-4B"
    assert p.model.generator_init == "black-forest-labs/FLUX.2-klein-4B"
    assert (p.lora.rank, p.lora.alpha) == (32, 64.0)
    assert "single_transformer_blocks.19.attn.to_out" in p.lora.targets
    assert p.cold_start.teacher_guidance == (4.0, 4.0) and p.cold_start.generator.lr == 1e-6
    assert p.rl.num_images_per_prompt == 24 and p.rl.global_sample_batch_size == 96  # 6/GPU x 2x8 GPUs
    assert p.rl.last_step.weight == 0.001 and p.rl.bp.margin == 3.0
    assert p.eval.reward_dataset_map["ocr"] == "ocr"
    assert (p.compute.rl.nodes, p.compute.rl.gpus_per_node) == (2, 8)


def test_unknown_backbone_lists_valid_ones():
    with pytest.raises(ConfigError) as exc:
        load_params("flux3_giant")
    assert "flux3_giant" in str(exc.value) and "flux2_4b" in str(exc.value) and "toy2d" in str(exc.value)


def _write(tmp_path, mutate):
    raw = yaml.safe_load(params_path("toy2d").read_text())
    mutate(raw)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_misspelled_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, lambda r: r["rl"].__setitem__("lrr", 1e-5))
    with pytest.raises(ConfigError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "rl.lrr" in msg and str(path) in msg


def test_misspelled_nested_key_suggests_the_right_one(tmp_path):
    path = _write(tmp_path, lambda r: r["cold_start"]["generator"].__setitem__("learning_rat", 1.0))
    with pytest.raises(ConfigError, match="cold_start.generator.learning_rat"):
        load_params(path)


def test_wrong_type_is_an_error(tmp_path):
    path = _write(tmp_path, lambda r: r["sampler"].__setitem__("eta", "high"))
    with pytest.raises(ConfigError, match=r"sampler.eta.*'high'.*expected float"):
        load_params(path)
    path = _write(tmp_path, lambda r: r["cold_start"].__setitem__("total_steps", 10.5))
    with pytest.raises(ConfigError, match="cold_start.total_steps"):
        load_params(path)


@pytest.mark.parametrize("override, fragment", [
    ("sampler.eta=1.5", "eta must be in [0, 1]"),
    ("dmd.min_step=990", "min_step"),
    ("cold_start.fake_update_ratio=0", "fake_update_ratio must be >= 1"),
    ("rl.num_images_per_prompt=7", "must divide rl.global_sample_batch_size"),
])
def test_out_of_range_knobs_are_rejected(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_params("toy2d", [override])
    assert fragment in str(exc.value)


def test_dotted_overrides_apply_and_are_typed():
    p = load_params("toy2d", ["rl.generator.lr=1e-5", "sampler.step_list=[1000,500]", "rl.bp.enabled=false"])
    assert p.rl.generator.lr == 1e-5 and p.sampler.step_list == [1000, 500] and p.rl.bp.enabled is False
    with pytest.raises(ConfigError, match="rl.generator.lrate"):
        load_params("toy2d", ["rl.generator.lrate=1e-5"])


def test_global_batches_split_per_rank_or_fail_before_loading():
    p = load_params("flux2_4b")
    p.check_world_size(8, "cold_start")
    p.check_world_size(16, "rl")
    assert p.per_rank(p.rl.global_sample_batch_size, 16, "rl.global_sample_batch_size") == 6
    with pytest.raises(ValueError, match=r"rl.global_sample_batch_size=96 is not divisible by the world size 7"):
        p.per_rank(96, 7, "rl.global_sample_batch_size")
    with pytest.raises(ValueError, match="not divisible by the world size 5"):
        p.check_world_size(5, "rl")
    with pytest.raises(ValueError, match="cold_start.global_batch_size=72 is not divisible by the world size 16"):
        p.check_world_size(16, "cold_start")


def test_params_hash_changes_with_any_value():
    assert params_hash(load_params("toy2d")) == params_hash(load_params("toy2d"))
    assert params_hash(load_params("toy2d")) != params_hash(load_params("toy2d", ["rl.seed=1"]))
