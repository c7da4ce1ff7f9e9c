import pytest
import torch

from rtdmd.backbones import digits_data as D


def test_every_phrasing_maps_back_to_its_digit():
    for c in range(D.NUM_CLASSES):
        for p in range(len(D.PHRASINGS)):
            assert D.class_index_of(D.prompt_for(c, p)) == c
    assert D.class_index_of("") == D.UNCOND_INDEX
    assert D.class_index_of("  A Handwritten Digit SEVEN ") == 7


@pytest.mark.parametrize("bad", ["a cat", "digits 3 and 4", "number 12", "three or five"])
def test_prompt_naming_no_single_digit_is_an_error(bad):
    with pytest.raises(D.DigitsPromptError, match="exactly one digit"):
        D.class_index_of(bad)


def test_images_labels_and_disjoint_stratified_splits():
    x, y = D.load_images(16)
    assert x.shape == (1797, 3, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2])  # grey replicated to RGB
    r, j = D.split_indices("reward"), D.split_indices("judge")
    assert set(r.tolist()).isdisjoint(j.tolist()) and len(r) + len(j) == 1797
    for c in range(10):  # every class in both halves, within one image of half
        nr, nj = int((y[r] == c).sum()), int((y[j] == c).sum())
        assert abs(nr - nj) <= 1
    assert torch.equal(D.split_indices("reward"), r)  # deterministic


def test_to_grey8_recovers_the_source_resolution_and_is_differentiable():
    x8, _ = D.load_images(8)
    assert torch.allclose(D.to_grey8(x8), x8[:, :1])
    x = D.load_images(16)[0][:4].clone().requires_grad_(True)
    D.to_grey8(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
