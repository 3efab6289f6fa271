#!/usr/bin/env python
"""Evaluate checkpoints exactly: top-1/top-5/loss over the whole split, throughput, peak memory,
and (``--attn-stats``) the paper's attention statistics per layer and head.

    python eval.py --checkpoint runs/deit_small_multimax/best.pth --data-root /data/imagenet
    python eval.py --checkpoint paper_ckpt.pth --model deit_small_multimax_patch16_224 --data-root /data/imagenet
    python eval.py --checkpoint deit_small_patch16_224-cd65a155.pth --model deit_small_gap_patch16_224 --data-root ...
    torchrun --nproc_per_node=8 eval.py --checkpoint ... --data-root ...
    python eval.py --checkpoint runs/x/best.pth --config configs/quickstart.yaml --attn-stats --output results.json

Our checkpoints carry their config (model and data); foreign ones (the paper's code, timm/DeiT)
need ``--model``, and their architecture details (qkv bias, classes, normalizers) are read off
the weights. Trailing ``key=value`` arguments override the config as in train.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional

import timm
import torch

import models
from data import build_eval_loader
from engine import distributed as dist
from engine.checkpoint import load_checkpoint
from engine.cpu_alloc import apply_allocator_mode
from engine.config import Config, config_from_yaml_text, config_to_dict, load_config
from engine.errors import UserError
from engine.loop import evaluate
from engine.model import build_model
from models.weights import CheckpointMismatchError, infer_model_kwargs

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file, or a directory of them")
    p.add_argument("--model", help="registered model name (needed for foreign checkpoints)")
    p.add_argument("--config", help="YAML config for the model/data (default: the checkpoint's own)")
    p.add_argument("--data-root", help="dataset root (data.root)")
    p.add_argument("--dataset", help="dataset kind/name (data.dataset)")
    p.add_argument("--split", help="split to evaluate (data.val_split)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--workers", type=int, help="data loader workers")
    p.add_argument("--img-size", type=int, help="input resolution")
    p.add_argument("--crop-pct", type=float, help="centre crop fraction (resize to img_size / crop_pct)")
    p.add_argument("--interpolation", help="resize interpolation (bicubic, bilinear, ...)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast dtype")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--attn-stats", action="store_true", help="per layer/head sparsity, multi-modality, entropy")
    p.add_argument("--attn-stats-batches", type=int, default=None, help="limit the statistics to N batches")
    p.add_argument("--stats-eps", type=float, default=0.0, help="ε of the paper's S/M definitions")
    p.add_argument("--stats-s", type=float, default=None,
                   help="reference value s of the sparsity S (default: min of softmax(x), the paper's)")
    p.add_argument("--output", help="JSON path (default: next to the checkpoint, <name>.eval.json)")
    p.add_argument("--csv", help="CSV to append a row to (default: eval_results.csv next to the checkpoint)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.workers=4")
    return p.parse_args(argv)


def checkpoint_paths(path: str) -> List[str]:
    if os.path.isdir(path):
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(CHECKPOINT_SUFFIXES))
        if not found:
            raise UserError(f"--checkpoint: directory {path} holds no {'/'.join(CHECKPOINT_SUFFIXES)} files")
        return found
    if not os.path.exists(path):
        raise UserError(f"--checkpoint: {path} does not exist")
    return [path]


def resolve_config(args: argparse.Namespace, ckpt: Dict[str, Any]) -> Config:
    """Config for one checkpoint: --config, else the checkpoint's own, else defaults for a
    foreign checkpoint (ImageFolder data, the model's timm preprocessing); then the CLI on top."""
    overrides = list(args.overrides)
    if args.config:
        cfg = load_config(args.config, [])
    elif isinstance(ckpt.get("config"), str) and ckpt["config"].strip():
        cfg = config_from_yaml_text(ckpt["config"], source=f"{args.checkpoint} (stored config)")
    else:
        if not args.model:
            raise UserError(f"{args.checkpoint} carries no config: name its architecture with --model "
                            f"(e.g. deit_small_multimax_patch16_224)")
        cfg = Config()
        cfg.data.dataset = "imagefolder"
        cfg.data.workers = min(cfg.data.workers, os.cpu_count() or 1)
        pcfg = timm.get_pretrained_cfg(args.model)
        if pcfg is not None:
            cfg.model.img_size = pcfg.input_size[-1]
            cfg.data.crop_pct, cfg.data.interpolation = pcfg.crop_pct, pcfg.interpolation
            cfg.data.mean, cfg.data.std = list(pcfg.mean), list(pcfg.std)
        for key, value in infer_model_kwargs(ckpt, args.use_ema).items():
            if key in ("num_classes", "qkv_bias", "attn_normalizer", "out_normalizer", "modulator_order"):
                setattr(cfg.model, key, value)
    if args.model:
        cfg.model.name = args.model
    flags = {"data.root": args.data_root, "data.dataset": args.dataset, "data.val_split": args.split,
             "data.eval_batch_size": args.batch_size, "data.workers": args.workers,
             "model.img_size": args.img_size, "data.crop_pct": args.crop_pct,
             "data.interpolation": args.interpolation, "data.mean": args.mean, "data.std": args.std,
             "train.amp": args.amp, "train.device": args.device}
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + overrides
    if overrides:
        from engine.config import apply_overrides

        cfg = apply_overrides(cfg, overrides)
    return cfg


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process RSS)


def evaluate_checkpoint(path: str, args: argparse.Namespace, info: Optional[dist.DistInfo]) -> Dict[str, Any]:
    ckpt = load_checkpoint(path)
    args.checkpoint = path
    cfg = resolve_config(args, ckpt)
    if info is None:
        info = dist.init_distributed(cfg.train.device, cfg.train.dist_backend)
    d = cfg.data
    img_size = cfg.model.img_size
    loader, data_info = build_eval_loader(d, img_size, info.rank, info.world_size)
    mean, std = list(d.mean or data_info.mean), list(d.std or data_info.std)
    model = build_model(cfg.model, data_info.num_classes, data_info.in_chans)
    try:
        load = models.load_weights(model, ckpt, use_ema=args.use_ema)
    except CheckpointMismatchError as e:
        raise UserError(f"{path} does not fit model {cfg.model.name}: {e}") from None
    model.to(info.device).eval()
    apply_allocator_mode(cfg.train.cpu_malloc, info.device.type)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)

    stats = None
    if args.attn_stats:
        from engine.attn_stats import AttentionStats

        stats = AttentionStats(eps=args.stats_eps, s=args.stats_s, model=model)
    dist.barrier()
    start = time.perf_counter()
    metrics = _run(model, loader, info, cfg.train.amp, stats, args.attn_stats_batches)
    seconds = time.perf_counter() - start
    result: Dict[str, Any] = {
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
        "num_images": metrics["num_images"],
        "checkpoint": os.path.abspath(path), "model": cfg.model.name, "use_ema": args.use_ema,
        "dataset": {"name": d.dataset, "root": d.root, "split": d.val_split},
        "preprocessing": {"img_size": img_size, "crop_pct": d.crop_pct,
                          "resize": int(img_size / d.crop_pct), "interpolation": d.interpolation,
                          "mean": list(mean), "std": list(std)},
        "throughput": {"img_per_s": metrics["num_images"] / seconds if seconds > 0 else None,
                       "seconds": seconds, "peak_memory_mb": peak_memory_mb(info.device),
                       "peak_memory_kind": "cuda_allocated" if info.device.type == "cuda" else "process_max_rss",
                       "device": str(info.device), "world_size": info.world_size,
                       "batch_size": loader.batch_size, "amp": cfg.train.amp},
        "weights": {"source": load.source, "left_at_init": load.reset, "dropped": load.dropped},
        "model_config": config_to_dict(cfg)["model"],
    }
    if stats is not None:
        result["attn_stats"] = stats.summary(model)
    return result, info


def _run(model, loader, info, amp, stats, stats_batches):
    """``evaluate`` over the loader; with statistics, each batch's attention is recorded,
    reduced into ``stats`` and dropped."""
    if stats is None:
        return evaluate(model, loader, info, amp)
    batches = {"n": 0}

    with models.record_attention(model, scores=True) as record:
        def on_batch():
            if stats_batches is None or batches["n"] < stats_batches:
                stats.update(record)
            batches["n"] += 1
            record.probs.clear()
            record.scores.clear()

        metrics = evaluate(model, loader, info, amp, on_batch=on_batch)
    stats.reduce(lambda t: dist.all_reduce_sum(t.to(info.device)).cpu())
    return metrics


def write_outputs(result: Dict[str, Any], args: argparse.Namespace, path: str, many: bool) -> str:
    base = os.path.splitext(path)[0] + ("_ema" if args.use_ema else "")
    out = args.output if args.output and not many else base + ".eval.json"
    if args.output and many:
        out = os.path.join(os.path.dirname(args.output) or ".",
                           os.path.basename(base) + ".eval.json")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out)
        table = args.csv or os.path.join(os.path.dirname(os.path.abspath(path)), "eval_results.csv")
        row = {"checkpoint": result["checkpoint"], "model": result["model"], "use_ema": result["use_ema"],
               "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
               "num_images": result["num_images"], "img_size": result["preprocessing"]["img_size"],
               "crop_pct": result["preprocessing"]["crop_pct"],
               "interpolation": result["preprocessing"]["interpolation"],
               "img_per_s": result["throughput"]["img_per_s"], "world_size": result["throughput"]["world_size"],
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        new = not os.path.exists(table)
        with open(table, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
    except OSError as e:
        raise UserError(f"cannot write results ({e.filename}): {e.strerror}") from None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    info = None
    try:
        paths = checkpoint_paths(args.checkpoint)
        for path in paths:
            result, info = evaluate_checkpoint(path, args, info)
            if info.is_main:
                out = write_outputs(result, args, path, many=len(paths) > 1)
                print(f"{path}: top1 {result['top1']:.3f} top5 {result['top5']:.3f} loss {result['loss']:.4f} "
                      f"images {result['num_images']} ({result['throughput']['img_per_s']:.0f} img/s) -> {out}",
                      flush=True)
        return 0
    except (UserError, CheckpointMismatchError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if info is not None:
            dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
