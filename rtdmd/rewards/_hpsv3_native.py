"""Native HPSv3 reward model on transformers' ``Qwen2VLModel`` (rewards.md §1.3), written for rtdmd.

Facts taken from the published ``hpsv3==1.0.0`` package / ``MizzenAI/HPSv3`` checkpoint (no code
copied):

* network: Qwen2-VL-7B-Instruct + ``rm_head`` = Linear(hidden→1024), ReLU, Dropout(0.05),
  Linear(1024→16), ReLU, Linear(16→2) (keys ``rm_head.{0,3,5}.{weight,bias}``), kept in float32;
  output ``[B,2]`` = (μ, σ) read at the special token ``<|Reward|>`` (added to the Qwen2-VL
  tokenizer; the checkpoint's embedding has ``len(tokenizer)`` rows);
* checkpoint ``HPSv3.safetensors`` in the transformers-4.45 layout (``visual.*``, ``model.*``,
  ``lm_head.weight``, ``rm_head.*``), renamed on load (``visual.*`` → ``model.visual.*``,
  ``model.*`` → ``model.language_model.*``); ``lm_head.weight`` is not used by the reward and
  is dropped; every other key must match (strict);
* input: one user turn = [image, text ``PROMPT_TEMPLATE`` with the prompt], the base model's
  chat template with ``add_generation_prompt=True``, right padding; the image is first resized
  (PIL bicubic) to the Qwen "smart resize" of a fixed budget min = max = 256·28·28 pixels
  (sides multiples of patch·merge = 28);
* **QUIRK** (kept): the package calls the language model without position ids, so the LM gets
  plain sequential positions ``0..L-1`` on all three M-RoPE axes (no 2-D image positions).
  :meth:`HPSv3RewardNet.forward` passes those positions explicitly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn

REWARD_TOKEN = "<|Reward|>"
#: min_pixels = max_pixels = 256·28·28 (every image is resized to ~200,704 pixels).
PIXEL_BUDGET = 256 * 28 * 28
MAX_ASPECT_RATIO = 200
#: Keys of the checkpoint that the reward does not use (the LM head of the base VLM).
UNUSED_KEYS = ("lm_head.weight",)
RM_HEAD_DROPOUT = 0.05

# The instruction of the HPSv3 package followed by its "with special token" suffix;
# ``{text_prompt}`` is replaced by the prompt (sha256 pinned in the tests).
PROMPT_TEMPLATE = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a '
    'overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the '
    'worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such '
    'as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy '
    'to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual '
    'elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, '
    'composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a '
    'sense of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, '
    'violent, or adult material. If such content is present, the image quality and satisfaction score '
    'should be the lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, '
    'object) align with the textual description. The subject should match the description in terms of '
    'number, appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how '
    'well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the '
    'image logically fit the scenario described in the prompt. The environment should support and enhance '
    'the subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, '
    'clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations '
    'may be acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured '
    'in the image. The generated content should not introduce elements that conflict with or distort the '
    'original description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
    '\n'
    'Please provide the overall ratings of this image: <|Reward|>\n'
    '\n'
    'END\n'
)


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.replace("{text_prompt}", prompt)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = PIXEL_BUDGET,
                 max_pixels: int = PIXEL_BUDGET) -> tuple[int, int]:
    """Qwen-VL size rule: sides rounded to multiples of ``factor``, area brought into [min, max]."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"hpsv3: aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                         f"{MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        s = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / s / factor) * factor, math.floor(width / s / factor) * factor
    elif h * w < min_pixels:
        s = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * s / factor) * factor, math.ceil(width * s / factor) * factor
    return h, w


def resize_for_budget(img: Image.Image, factor: int = 28, budget: int = PIXEL_BUDGET) -> Image.Image:
    img = img.convert("RGB")
    h, w = smart_resize(img.height, img.width, factor, budget, budget)
    return img.resize((w, h), Image.BICUBIC)


def rename_key(k: str) -> str:
    """transformers-4.45 Qwen2-VL key -> transformers-5 ``Qwen2VLModel`` layout (spec §1.3)."""
    if k.startswith("visual."):
        return "model." + k
    if k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + k[len("model."):]
    return k


def old_layout_key(k: str) -> str:
    """Inverse of :func:`rename_key` (used to write checkpoints in the published layout)."""
    if k.startswith("model.visual."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    return k


def rm_head(hidden: int, dims: tuple[int, int, int] = (1024, 16, 2)) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, dims[0]), nn.ReLU(), nn.Dropout(RM_HEAD_DROPOUT),
                         nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2]))


def head_dims_from_state_dict(sd: dict) -> tuple[int, int, int]:
    return tuple(int(sd[f"rm_head.{i}.weight"].shape[0]) for i in (0, 3, 5))  # type: ignore[return-value]


class HPSv3RewardNet(nn.Module):
    """``Qwen2VLModel`` + ``rm_head``; ``forward(...) -> [B, 2]`` (μ, σ) at the reward token."""

    def __init__(self, config, reward_token_id: int, head_dims: tuple[int, int, int] = (1024, 16, 2)):
        super().__init__()
        from transformers import Qwen2VLModel

        self.config = config
        self.reward_token_id = int(reward_token_id)
        self.model = Qwen2VLModel(config)
        self.rm_head = rm_head(config.text_config.hidden_size, head_dims)

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> torch.Tensor:
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device).view(1, 1, n).expand(3, b, n)
        vis_dtype = self.model.visual.patch_embed.proj.weight.dtype
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                         pixel_values=pixel_values.to(vis_dtype), image_grid_thw=image_grid_thw, use_cache=False)
        hit = input_ids == self.reward_token_id
        counts = hit.sum(1)
        if not bool((counts == 1).all()):
            raise RuntimeError(f"hpsv3: expected exactly one {REWARD_TOKEN} token per sequence, got "
                               f"{counts.tolist()} (a prompt containing '{REWARD_TOKEN}'?)")
        head_dtype = self.rm_head[0].weight.dtype
        return self.rm_head(out.last_hidden_state[hit].to(head_dtype))


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    sd = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    return sd
