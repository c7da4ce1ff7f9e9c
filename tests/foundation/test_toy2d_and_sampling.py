"""toy2d backbone and the generic few-step sampler."""
import pytest
import torch

from rtdmd.backbones import BackboneError, build_backbone
from rtdmd.config import load_params
from rtdmd.lora import inject_lora
from rtdmd.sampling import generate, teacher_step_list


@pytest.fixture(scope="module")
def toy():
    params = load_params("toy2d")
    return params, build_backbone(params)


def test_toy2d_generates_points_deterministically(toy):
    params, bb = toy
    net = bb.load_transformer("generator")
    prompts = ["ring", "square", "triangle"] * 4
    a = generate(bb, net, prompts, step_list=params.sampler.step_list, eta=0.9, seed=3)
    b = generate(bb, net, prompts, step_list=params.sampler.step_list, eta=0.9, seed=3)
    c = generate(bb, net, prompts, step_list=params.sampler.step_list, eta=0.9, seed=4)
    assert a.shape == (12, 2) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_toy2d_teacher_fits_the_data(toy):
    """50-step teacher samples land on the class's modes (radius 2 circle)."""
    from rtdmd.metrics.toy2d import coverage, swd
    from rtdmd.backbones.toy2d import sample_data

    _, bb = toy
    teacher = bb.load_transformer("teacher")
    x = generate(bb, teacher, ["square"] * 1000, step_list=teacher_step_list(50), eta=0.0, seed=0, teacher_mode=True)
    data = sample_data(torch.full((1000,), 1), torch.Generator().manual_seed(0))
    assert swd(x, data) < 0.1
    assert coverage(x, 1) == 1.0


def test_lora_changes_samples_only_when_nonzero(toy):
    params, bb = toy
    net = bb.load_transformer("generator")
    base = generate(bb, net, ["ring"] * 8, step_list=[1000, 500], eta=0.0, seed=0)
    inject_lora(net, params.lora.targets, params.lora.rank, params.lora.alpha)
    assert torch.equal(generate(bb, net, ["ring"] * 8, step_list=[1000, 500], eta=0.0, seed=0), base)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    assert not torch.allclose(generate(bb, net, ["ring"] * 8, step_list=[1000, 500], eta=0.0, seed=0), base)


def test_unknown_prompt_and_missing_teacher_are_clear_errors(toy, tmp_path):
    _, bb = toy
    with pytest.raises(BackboneError, match="names no class"):
        bb.encode_prompts(["a photo of a cat"])
    params = load_params("toy2d", [f"model.pretrained={tmp_path / 'nothing'}", "model.tiny=false"])
    with pytest.raises(BackboneError, match="teacher weights not found"):
        build_backbone(params)


def test_teacher_step_list():
    assert teacher_step_list(4) == [1000, 750, 500, 250]
    assert len(teacher_step_list(50)) == 50


@pytest.mark.parametrize("name", ["tiny_flux2", "tiny_sd3", "tiny_flux1"])
def test_generate_images_on_tiny_backbones_with_and_without_lora(name):
    params = load_params(name)
    bb = build_backbone(params)
    net = bb.load_transformer("generator")
    kw = dict(step_list=params.sampler.step_list, eta=params.sampler.eta, seed=7)
    plain = generate(bb, net, ["a red cube", "two dogs"], **kw)
    assert plain.shape == (2, 3, params.model.resolution, params.model.resolution)
    assert plain.min() >= 0 and plain.max() <= 1
    assert torch.equal(plain, generate(bb, net, ["a red cube", "two dogs"], **kw))
    inject_lora(net, params.lora.targets, params.lora.rank, params.lora.alpha)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    with_lora = generate(bb, net, ["a red cube", "two dogs"], **kw)
    assert with_lora.shape == plain.shape and not torch.allclose(with_lora, plain)
    teacher = generate(bb, bb.load_transformer("teacher"), ["a red cube"], step_list=[1000, 500], eta=0.0,
                       seed=1, guidance=3.0, teacher_mode=True)
    assert torch.isfinite(teacher).all()
