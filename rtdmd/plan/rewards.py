r"""Size-faithful stand-ins for the stage-2 reward models (the weights cannot be downloaded here).

:class:`SimulatedRewards` replaces :class:`rtdmd.rewards.MultiScorer` inside the simulation. Each
reward of ``rl.reward_weights`` gets its published architecture (:data:`rtdmd.plan.facts.REWARD_MODELS`)
built at its real size in fp32 on the device, as ``rtdmd.rewards`` loads them, and shared between
the advantage scorer and the BP scorer (as ``rtdmd.rewards.multi.shared_scorer`` caches them). Each
call runs what dominates the real scorer's memory and FLOPs:

* CLIP-family rewards (clipscore, pickscore, hpsv2): resize to the model's input size, normalise,
  image tower + projection, text tower on 77 tokens, cosine per pair. ``score_differentiable``
  runs the same with autograd on (the BP path, rewards.md §3); ``__call__`` under ``no_grad``.
* geneval (not differentiable): the Mask2Former detector on the image at its input size, and the
  colour CLIP's image tower on one batch of crops.

Departures from the real scorers (no effect on the counted bytes beyond small host-side work):
the eval path's 8-bit quantisation and PIL preprocessing are not run (fake tensors have no
pixels), GenEval's rule logic and crop extraction are not run, and scores are the CLIP cosine
(the real scorers' scale factors are elementwise on ``[B]`` tensors).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from rtdmd.plan.facts import REWARD_MODELS

TOKENS = 77  # CLIP text context


def build_reward_model(spec: dict, device) -> torch.nn.Module:
    """The published architecture of ``spec`` (a :data:`REWARD_MODELS` entry or its ``colour`` head)."""
    import transformers

    cls = getattr(transformers, spec["cls"])
    cfg_cls = {"CLIPModel": transformers.CLIPConfig,
               "Mask2FormerForUniversalSegmentation": transformers.Mask2FormerConfig}[spec["cls"]]
    cfg = dict(spec["cfg"])
    if spec["cls"] == "Mask2FormerForUniversalSegmentation":
        bb = dict(cfg.pop("backbone_config"))
        cfg["backbone_config"] = transformers.SwinConfig(**{k: v for k, v in bb.items() if k != "model_type"})
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        net = cls(cfg_cls(**cfg))
    finally:
        torch.set_default_dtype(old)
    net.eval().requires_grad_(False)
    # built on the default device; moved only if that is not ``device`` (a same-device ``.to`` would
    # swap fake parameters that FakeTensorMode still references)
    return net if next(net.parameters()).device == torch.device(device) else net.to(device)


class SimulatedRewards:
    """Drop-in for :class:`rtdmd.rewards.MultiScorer` (``__call__``, ``score_differentiable``, ``weights``)."""

    def __init__(self, weights: Mapping[str, float], models: dict[str, dict[str, torch.nn.Module]], device,
                 specs: Mapping[str, dict] | None = None):
        self.specs = dict(specs or REWARD_MODELS)
        unknown = [n for n in weights if n not in self.specs]
        if unknown:
            raise KeyError(f"no simulated reward model for {unknown}; simulated: {sorted(self.specs)}")
        self.weights = dict(weights)
        self.device = torch.device(device)
        self._models = models
        for name in self.weights:
            if name not in models:
                spec = self.specs[name]
                models[name] = {"main": build_reward_model(spec, self.device)}
                if "colour" in spec:
                    models[name]["colour"] = build_reward_model(spec["colour"], self.device)

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    @property
    def differentiable_names(self) -> list[str]:
        return [n for n in self.weights if self.specs[n]["differentiable"]]

    def _clip(self, net, images: torch.Tensor, size: int) -> torch.Tensor:
        b = images.shape[0]
        x = F.interpolate(images.to(self.device, torch.float32), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        img = net.get_image_features(pixel_values=x)
        img = getattr(img, "pooler_output", img)
        ids = torch.zeros(b, TOKENS, dtype=torch.long, device=self.device)
        txt = net.get_text_features(input_ids=ids)
        txt = getattr(txt, "pooler_output", txt)
        return F.cosine_similarity(img, txt, dim=-1)

    def _geneval(self, models, images: torch.Tensor) -> torch.Tensor:
        spec = self.specs["geneval"]
        size = spec["image_size"]
        x = F.interpolate(images.to(self.device, torch.float32), size=(size, size), mode="bilinear")
        models["main"](pixel_values=x)
        cs = spec["colour"]["cfg"]["vision_config"]["image_size"]
        crops = x.new_zeros(spec["colour"]["crops"], 3, cs, cs)
        models["colour"].get_image_features(pixel_values=crops)
        return images.new_zeros(images.shape[0], dtype=torch.float32)

    def _score(self, name: str, images: torch.Tensor) -> torch.Tensor:
        models = self._models[name]
        if name == "geneval":
            return self._geneval(models, images)
        return self._clip(models["main"], images, self.specs[name]["image_size"])

    def __call__(self, images, prompts, metadata=None, only_strict: bool = False) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = {n: self._score(n, images) for n in self.weights}
        out["mean"] = sum(float(w) * out[n] for n, w in self.weights.items())
        return out

    def score_differentiable(self, images, prompts, metadata=None) -> dict[str, torch.Tensor]:
        use = [n for n, w in self.weights.items() if w != 0 and self.specs[n]["differentiable"]]
        out = {n: self._score(n, images) for n in use}
        out["mean"] = sum(float(self.weights[n]) * out[n] for n in use)
        return out

    def to(self, device) -> "SimulatedRewards":
        return self


def reward_factory(specs: Mapping[str, dict] | None = None):
    """A ``build_reward_fn`` replacement whose scorers share one set of models (per simulation);
    ``specs``: the reward architectures (default :data:`REWARD_MODELS`; tests pass small ones)."""
    models: dict[str, dict[str, torch.nn.Module]] = {}

    def build_reward_fn(weights, *, domain: str, device="cpu", ckpt_dir=None):
        return SimulatedRewards(weights, models, device, specs)

    return build_reward_fn
