"""The reference half of the equivalence tests; runs INSIDE the isolated reference env (never imports rtdmd).

``python run_reference.py <scorer> <ckpt_dir> <work_dir>`` reads ``<work_dir>/inputs.safetensors``
(``image0..``: uint8 ``[H,W,3]``; ``pixels``: float ``[B,3,S,S]`` model-ready pixels) and
``<work_dir>/inputs.json`` (``prompts``, ``ckpt``: scorer-specific file names), scores them with the
reference package and writes ``<work_dir>/reference.safetensors`` + ``reference.json``.

Only what the offline test machine forces is patched, each listed in ``reference.json["patches"]``:
hub downloads are redirected to the local test files, and the hard-coded model depths are
shrunk to the checkpoint's layer count. Everything that computes a score is the package's code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)


def _images(spec: dict) -> list[Image.Image]:
    """``image0``, ``image1``, ... (uint8 ``[H,W,3]``, sizes may differ) as PIL images."""
    n = sum(1 for k in spec if k.startswith("image") and k[5:].isdigit())
    return [Image.fromarray(spec[f"image{i}"].numpy()) for i in range(n)]


def _key_report(model: torch.nn.Module, sd: dict, ignore=("position_ids",)) -> dict:
    own = set(model.state_dict())
    return {"missing": sorted(k for k in own - set(sd) if not k.endswith(ignore)),
            "unexpected": sorted(k for k in set(sd) - own if not k.endswith(ignore))}


def imagereward(ckpt: Path, inputs: dict, spec: dict) -> tuple[dict, dict]:
    import transformers
    import ImageReward as RM
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    d = ckpt / "ImageReward"
    med = json.loads((d / "med_config.json").read_text())
    vis = med["rtdmd_vision"]
    orig_tok = transformers.BertTokenizer.from_pretrained.__func__

    def local_tokenizer(cls, name, *a, **k):  # the hub id 'bert-base-uncased' -> the test vocab
        return orig_tok(cls, str(d / "bert-base-uncased") if name == "bert-base-uncased" else name, *a, **k)

    transformers.BertTokenizer.from_pretrained = classmethod(local_tokenizer)

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        assert vit == "large" and image_size == vis["image_size"] == 224
        # create_vit('large') with only the depth taken from the checkpoint (real: 24)
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=1024, depth=vis["depth"], num_heads=16,
                                 use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                 drop_path_rate=0.1), 1024

    blip_pretrain.create_vit = create_vit
    model = RM.load(str(d / "ImageReward.pt"), device="cpu", med_config=str(d / "med_config.json"))
    sd = torch.load(d / "ImageReward.pt", map_location="cpu", weights_only=True)
    keys = _key_report(model, sd)
    prompts = inputs["prompts"]
    scores = [model.score(p, im) for p, im in zip(prompts, _images(spec))]
    tok = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    px = spec["pixels"].clone().requires_grad_(True)
    r = model.score_gard(tok.input_ids, tok.attention_mask, px).reshape(-1)
    r.sum().backward()
    out = {"score": torch.tensor(scores, dtype=torch.float64), "score_gard": r.detach(), "grad": px.grad,
           "input_ids": tok.input_ids, "attention_mask": tok.attention_mask}
    return out, {"keys": keys, "patches": ["BertTokenizer.from_pretrained('bert-base-uncased') -> test vocab",
                                           f"create_vit('large') depth 24 -> {vis['depth']}"]}


def hpsv2(ckpt: Path, inputs: dict, spec: dict) -> tuple[dict, dict]:
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    from hpsv2.src.open_clip import factory

    arch = json.loads((ckpt / "hpsv2_open_clip_config.json").read_text())
    factory._MODEL_CONFIGS["ViT-H-14"] = arch["model_cfg"]  # the bundled ViT-H-14 with fewer layers
    model, _, _ = create_model_and_transforms(
        "ViT-H-14", str(ckpt / "open_clip_pytorch_model.bin"), precision="fp32", device="cpu", jit=False,
        force_quick_gelu=False, force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True, aug_cfg={},
        output_dict=True, with_score_predictor=False, with_region_predictor=False)
    sd = torch.load(ckpt / "HPS_v2.1_compressed.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(sd)  # as hpsv2.img_score.score (strict)
    keys = _key_report(model, sd)
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")
    text = tokenizer(inputs["prompts"])
    px = spec["pixels"].clone().requires_grad_(True)
    outputs = model(px, text)
    logits = outputs["image_features"] @ outputs["text_features"].T
    s = torch.diagonal(logits)
    s.sum().backward()
    return ({"score": s.detach(), "grad": px.grad, "tokens": text},
            {"keys": keys, "patches": [f"open_clip ViT-H-14 config layers 32/24 -> "
                                       f"{arch['model_cfg']['vision_cfg']['layers']}/"
                                       f"{arch['model_cfg']['text_cfg']['layers']}",
                                       "precision 'amp' -> 'fp32' (autocast is CUDA-only; CPU runs fp32 anyway)"]})


def hpsv3(ckpt: Path, inputs: dict, spec: dict) -> tuple[dict, dict]:
    import yaml
    from transformers import AutoConfig

    d = ckpt / "hpsv3"
    import hpsv3 as pkg
    from hpsv3.model import qwen2vl_trainer

    cls = qwen2vl_trainer.Qwen2VLRewardModelBT
    head_keys = ("output_dim", "reward_token", "special_token_ids", "rm_head_type", "rm_head_kwargs")

    def from_config(path, **kw):  # the base Qwen2-VL weights all come from HPSv3.safetensors (strict load)
        config = AutoConfig.from_pretrained(path)
        config._attn_implementation = kw.get("attn_implementation", "sdpa")
        return cls(config, **{k: kw[k] for k in head_keys if k in kw}).to(kw.get("torch_dtype") or torch.float32)

    cls.from_pretrained = staticmethod(from_config)
    cfg = yaml.safe_load((Path(pkg.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
    cfg.update(model_name_or_path=str(d), torch_dtype="float32", bf16=False, deepspeed=None,
               disable_flash_attn2=True, gradient_checkpointing=False, report_to="none", dataloader_num_workers=0)
    (Path(spec["work"]) / "hpsv3.yaml").write_text(yaml.safe_dump(cfg))
    inf = pkg.HPSv3RewardInferencer(config_path=str(Path(spec["work"]) / "hpsv3.yaml"),
                                    checkpoint_path=str(d / "HPSv3.safetensors"), device="cpu")
    with torch.no_grad():  # HPSv3RewardInferencer.reward, split so that its model inputs are returned too
        batch = inf.prepare_batch(_images(spec), inputs["prompts"])
        out = inf.model(return_dict=True, **batch)["logits"]
    return ({"reward": out.float(), "input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"].float(),
             "image_grid_thw": batch["image_grid_thw"]},
            {"keys": {"missing": [], "unexpected": []},  # the package loads with strict=True
             "patches": ["Qwen2VLRewardModelBT.from_pretrained -> constructor (weights from HPSv3.safetensors)",
                         "HPSv3_7B.yaml: model_name_or_path -> test dir, float32, no bf16/deepspeed/flash-attn"]})


def main(argv: list[str]) -> int:
    scorer, ckpt, work = argv[0], Path(argv[1]), Path(argv[2])
    inputs = json.loads((work / "inputs.json").read_text())
    spec = dict(load_file(str(work / "inputs.safetensors")), work=str(work))
    tensors, info = {"imagereward": imagereward, "hpsv2": hpsv2, "hpsv3": hpsv3}[scorer](ckpt, inputs, spec)
    import transformers

    info["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "reference.safetensors"))
    (work / "reference.json").write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
