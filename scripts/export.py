#!/usr/bin/env python
"""Export a checkpoint as timm users consume weights: a folder in the Hugging Face Hub layout.

    python scripts/export.py runs/deit_small_multimax/best.pth --out exported/deit_small_multimax
    python scripts/export.py runs/x/best.pth --out exported/x --use-ema --eval-result runs/x/best.<...>.eval.json
    python scripts/export.py runs/x/best.pth --out exported/x --push-to-hub your-name/deit_small_multimax

The folder holds ``model.safetensors`` (no pickle), ``config.json`` (timm's: ``architecture``,
``num_classes``, ``label_names``, ``model_args`` and ``pretrained_cfg`` with the eval
preprocessing; plus the training config and the eval result) and ``README.md``, a short model
card. timm rebuilds the exact model from it, once this repository's ``models`` is imported:

    import timm, models
    model = timm.create_model("local-dir:exported/deit_small_multimax", pretrained=True)
    model = timm.create_model("hf-hub:your-name/deit_small_multimax", pretrained=True)  # after --push-to-hub

and ``eval.py --checkpoint exported/deit_small_multimax`` evaluates it. ``--push-to-hub`` uploads
through timm's ``push_to_hf_hub`` (needs the network and a token: ``huggingface-cli login``).
Foreign checkpoints (the paper's code, DeiT) need ``--model`` as in eval.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.models._hub import generate_readme  # noqa: E402

from data.datasets import normalization  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.config import Config, dump_config  # noqa: E402
from engine.errors import EXIT_OK, EXIT_USER_ERROR, UserError, one_line_reason  # noqa: E402
from engine.evaluation import EvalSpec, checkpoint_model, stored_config  # noqa: E402


def eval_line(result: Optional[Dict[str, Any]], ckpt: Dict[str, Any]) -> str:
    """The model card's evaluation line: an eval.py result, else the best epoch training logged."""
    if result:
        ds, pre = result["dataset"], result["preprocessing"]
        return (f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {ds['name']} split {ds['split']} "
                f"({result['num_images']} images, {pre['img_size']} px, crop {pre['crop_pct']}), eval.py")
    best = ckpt.get("best") or {}
    if best.get("value") is not None:
        return f"{best['metric']} {best['value']:.2f} at epoch {best['epoch']} (logged by training)"
    return "not evaluated"


def model_card(name: str, model: nn.Module, cfg: Config, config_text: str, evaluated: str, source: str) -> dict:
    """The card timm's ``generate_readme`` renders (and ``push_to_hf_hub`` uploads)."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    size = cfg.model.img_size
    return {
        "description": (f"`{name}` exported from `{source}` with multimax-vit's scripts/export.py.\n\n"
                        f"<details><summary>Training config</summary>\n\n```yaml\n{config_text.rstrip()}\n```\n"
                        "</details>"),
        "details": {"Model Type": "Image classification", "Architecture": name, "Params (M)": f"{params:.2f}",
                    "Image size": f"{size} x {size}", "Classes": model.num_classes, "Eval": evaluated},
        "usage": ("```python\nimport timm\nimport models  # multimax-vit's package: registers the architecture\n\n"
                  "model = timm.create_model('local-dir:<this folder>', pretrained=True).eval()  # or 'hf-hub:<repo>'\n"
                  "```"),
    }


def export(checkpoint: str, out_dir: str, use_ema: bool = False, model_name: Optional[str] = None,
           eval_result: Optional[str] = None, push_to_hub: Optional[str] = None) -> str:
    """Write the folder (and upload it with ``push_to_hub``); returns ``out_dir``."""
    ckpt = load_checkpoint(checkpoint)
    # runtime choices of the training run are not part of the released model
    spec = EvalSpec(model=model_name, use_ema=use_ema,
                    overrides=["model.grad_checkpointing=false", "model.attn_backend=auto"])
    model, cfg, _, crop_mode = checkpoint_model(spec, ckpt, checkpoint)
    result = _read_json(eval_result) if eval_result else None
    # the run's own config (as trained); a foreign checkpoint's as eval.py resolves it
    config_text = stored_config(ckpt) or dump_config(cfg)
    mean, std = normalization(cfg.data, model.in_chans)
    data_config = {"input_size": (model.in_chans, cfg.model.img_size, cfg.model.img_size),
                   "crop_pct": cfg.data.crop_pct, "crop_mode": crop_mode, "interpolation": cfg.data.interpolation,
                   "mean": tuple(mean), "std": tuple(std)}
    model_config: Dict[str, Any] = {"training_config": config_text}
    if ckpt.get("classes"):
        model_config["label_names"] = list(ckpt["classes"])
    if result:
        model_config["eval_result"] = {k: result[k] for k in ("top1", "top5", "loss", "num_images", "dataset",
                                                               "preprocessing") if k in result}
    name = timm.models.get_arch_name(cfg.model.name)
    card = model_card(name, model, cfg, config_text, eval_line(result, ckpt),
                      os.path.basename(checkpoint) + (" (EMA weights)" if use_ema else ""))
    try:
        timm.models.save_for_hf(model, out_dir, model_config=dict(model_config), safe_serialization=True,
                                data_config=data_config)
        with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(generate_readme(card, name))
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    if push_to_hub:
        try:
            timm.models.push_to_hf_hub(model, push_to_hub, model_config=dict(model_config), model_card=card,
                                       safe_serialization=True, data_config=data_config)
        except Exception as e:  # network, authentication, repository errors of huggingface_hub
            raise UserError(f"--push-to-hub {push_to_hub}: upload failed ({one_line_reason(e)}); "
                            f"the folder {out_dir} is written") from None
    return out_dir


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--eval-result: cannot read {path} ({e})") from None
    if not isinstance(result, dict) or not {"top1", "top5", "dataset", "preprocessing"} <= set(result):
        raise UserError(f"--eval-result: {path} is not an eval.py result (top1, top5, dataset, preprocessing)")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--use-ema", action="store_true", help="export the EMA weights")
    p.add_argument("--model", help="timm model name, for a checkpoint without a stored config")
    p.add_argument("--eval-result", metavar="JSON", help="an eval.py result to put in the model card")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder with timm's push_to_hf_hub")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.use_ema, args.model, args.eval_result, args.push_to_hub)
    except UserError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {out}" + (f" and uploaded it to {args.push_to_hub}" if args.push_to_hub else ""))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
