"""Published constants of the scorers whose reference is the authors' code on standard models.

Each number is a fact from the reference code or the model card (rewards.md §1.1–1.6); the
formula tests in test_tiny_scorers.py / test_preprocessing.py check that the scorers use them.
"""

from __future__ import annotations

import torch

from rtdmd.rewards import _hfclip, aesthetic, clipscore, hpsv2, imagereward, pickscore
from rtdmd.rewards._blip import HEAD_DIMS, PROJ_DIM, VIT_LARGE


def test_clip_family_constants():
    assert pickscore.PICKSCORE_DIVISOR == 26.0        # PickScore: exp(logit_scale)·cos / 26
    assert clipscore.LOGIT_DIVISOR == 100.0           # CLIPScore: logits_per_image.diag() / 100
    assert _hfclip.TEXT_MAX_LENGTH == 77              # CLIP context length, padded and truncated
    assert hpsv2.IMAGE_SIZE == 224 and hpsv2.ARCH == "ViT-H-14"


def test_imagereward_architecture_constants():
    assert imagereward.TEXT_MAX_LENGTH == 35 and imagereward.IMAGE_SIZE == 224
    assert imagereward.BLIP_EXTRA_TOKENS == ("[DEC]", "[ENC]")
    assert VIT_LARGE == dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096)
    assert PROJ_DIM == 256 and HEAD_DIMS == (1024, 128, 64, 16, 1)


def test_aesthetic_head_layout():
    """sac+logos+ava1-l14-linearMSE: 768→1024→128→64→16→1, dropouts 0.2/0.2/0.1, no activations."""
    mlp = aesthetic.AestheticMLP((768, 1024, 128, 64, 16, 1))
    linears = [(m.in_features, m.out_features) for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    assert linears == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert sorted(k for k in mlp.state_dict() if k.endswith("weight")) == \
        [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]


def test_clip_text_is_padded_and_truncated_to_77(tiny_scorers):
    s = tiny_scorers("pickscore")
    long_prompt = "a " * 200
    enc = s.tokenizer([long_prompt, "cat"], padding="max_length", truncation=True,
                      max_length=_hfclip.TEXT_MAX_LENGTH, return_tensors="pt")
    assert enc.input_ids.shape == (2, 77)
    scores = s(torch.rand(2, 3, 32, 32), [long_prompt, "cat"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()  # no length error on a 400-char prompt
