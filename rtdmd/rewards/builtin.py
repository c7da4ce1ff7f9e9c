"""Registration of the nine built-in rewards (factories are imported lazily)."""

from __future__ import annotations

from .registry import register_scorer

_B = "rtdmd.rewards"

register_scorer("pickscore", f"{_B}.pickscore:build", differentiable=True, backends=("transformers",),
                default_backend="transformers",
                description="PickScore_v1 (HF CLIP ViT-H/14): exp(logit_scale)*cos/26")
register_scorer("hpsv2", f"{_B}.hpsv2:build", differentiable=True, backends=("open_clip",),
                default_backend="open_clip", description="HPSv2.1 (open_clip ViT-H-14): cos(text, image)")
register_scorer("hpsv3", f"{_B}.hpsv3:build", differentiable=False, backends=("native", "hpsv3"),
                default_backend="native", description="HPSv3 (Qwen2-VL-7B reward model): mu column")
register_scorer("clipscore", f"{_B}.clipscore:build", differentiable=True, backends=("transformers",),
                default_backend="transformers",
                description="openai/clip-vit-large-patch14: logits_per_image.diag()/100 (= cosine)")
register_scorer("aesthetic", f"{_B}.aesthetic:build", differentiable=False, backends=("transformers",),
                default_backend="transformers",
                description="LAION improved aesthetic predictor on CLIP ViT-L/14 (1-10 scale)")
register_scorer("imagereward", f"{_B}.imagereward:build", differentiable=True,
                backends=("native", "image-reward"), default_backend="native",
                description="ImageReward-v1.0 (BLIP ViT-L + BERT cross-attention + MLP): normalised reward")
register_scorer("ocr", f"{_B}.ocr:build", differentiable=False, backends=("rapidocr", "tesseract", "paddleocr"),
                default_backend="rapidocr", description="1 - capped edit distance / len(quoted target)")
register_scorer("geneval", f"{_B}.geneval:build", differentiable=False, backends=("transformers", "mmdet"),
                default_backend="transformers",
                description="GenEval rules on a COCO instance detector + CLIP colour head (partial score)")
register_scorer("geneval2", f"{_B}.geneval2:build", differentiable=False, backends=("transformers",),
                default_backend="transformers",
                description="GenEval2 Soft-TIFA with a Qwen-VL judge (geometric mean of atom probs)")
# toy2d (DESIGN.md §3): analytic rewards on 2-D points; one differentiable, one not.
register_scorer("toy2d_target", f"{_B}.toy2d:target_fn", differentiable=True, domain="points",
                description="toy2d: -||x - (2.5, 0.5)|| (differentiable)")
register_scorer("toy2d_region", f"{_B}.toy2d:region_fn", differentiable=False, domain="points",
                description="toy2d: 1[x_0 > 0] (not differentiable)")
# digits (rtdmd/rewards/digits.py): learned classifiers on the scikit-learn digits; the judge is held out.
register_scorer("digits_logprob", f"{_B}.digits:logprob_fn", differentiable=True,
                description="digits: log-probability of the prompted digit by a CNN (reward split)")
register_scorer("digits_judge", f"{_B}.digits:judge_fn", differentiable=False,
                description="digits: held-out MLP judge's probability of the prompted digit (judge split)")
