#!/usr/bin/env python
"""Evaluate checkpoints exactly: top-1/top-5/loss over the whole split, throughput, peak memory,
(``--attn-stats``) the paper's attention statistics per layer and head, and
(``--patch-similarity``) the mean pairwise cosine similarity of the patch tokens after each block.

    python eval.py --checkpoint runs/deit_small_multimax/best.pth --data-root /data/imagenet
    python eval.py --checkpoint paper_ckpt.pth --model deit_small_multimax_patch16_224 --data-root /data/imagenet
    python eval.py --checkpoint deit_small_patch16_224-cd65a155.pth --model deit_small_patch16_224 --data-root ...
    python eval.py --model deit_small_patch16_224 --pretrained --data-root /data/imagenet
    python eval.py --model deit_small_patch16_224 --pretrained-file model.safetensors --data-root ...
    python eval.py --checkpoint exported/ --data-root ...           # a folder written by scripts/export.py
    torchrun --nproc_per_node=8 eval.py --checkpoint runs/x/ --data-root ...   # every checkpoint in a run dir

What is evaluated (one of):
  --checkpoint   ours (they carry their config), the paper's code's or DeiT's main.py (model,
                 optimizer, lr_scheduler, epoch, model_ema, scaler, args), a released DeiT/timm
                 file, a directory of checkpoints, an exported folder, or an http(s) URL.
  --pretrained   timm's weights for --model (from the Hugging Face hub cache, downloaded if missing).
  --pretrained-file  a local copy of timm's weights for --model, loaded as --pretrained loads them.
Foreign checkpoints need ``--model``: any name ``timm.list_models()`` knows, built in its own
architecture (a class-token DeiT as ``deit_small_patch16_224``, a distilled one as
``deit_small_distilled_patch16_224``, whose two heads timm averages); the class count and qkv bias
are read off the weights, preprocessing comes from timm's config for that model. Nothing is
changed to make a checkpoint fit: a class-token checkpoint in a GAP model, a head of another
class count, or a split whose classes differ from the checkpoint's are refused with one line.
Trailing ``key=value`` arguments override the config as in train.py.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

import models
from data import build_eval_loader
from engine import distributed as dist
from engine.checkpoint import download_checkpoint, is_url, load_checkpoint
from engine.config import Config, config_to_dict
from engine.errors import EXIT_NONFINITE, EXIT_OK, EXIT_USER_ERROR, UserError
from engine.evaluation import EvalSpec, checkpoint_model, eval_config, head_rows, source_crop_mode, source_state_dict
from engine.loop import evaluate
from engine.model import build_pretrained

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
EXPORT_CONFIG = "config.json"  # marks a folder written by scripts/export.py (Hugging Face Hub layout)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error of this script
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint file or URL, a directory of them, or an exported folder")
    src.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for --model")
    src.add_argument("--pretrained-file", metavar="PATH", help="a local copy of timm's weights for --model")
    p.add_argument("--model", help="any timm model name (ours included; needed for foreign checkpoints)")
    p.add_argument("--config", help="YAML config for the model/data (default: the checkpoint's own)")
    p.add_argument("--data-root", help="dataset root (data.root)")
    p.add_argument("--dataset", help="dataset kind/name (data.dataset)")
    p.add_argument("--split", help="split to evaluate (data.val_split)")
    p.add_argument("--class-subset", action="store_true",
                   help="the split holds a subset of the checkpoint's classes (matched by name); its labels are "
                        "mapped onto the checkpoint's and predictions still range over all of them")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights (model_ema)")
    p.add_argument("--batch-size", type=_positive_int, help="images per process")
    p.add_argument("--workers", type=int, help="data loader workers")
    p.add_argument("--img-size", type=_positive_int, help="input resolution")
    p.add_argument("--crop-pct", type=float, help="centre crop fraction (resize to img_size / crop_pct)")
    p.add_argument("--interpolation", help="resize interpolation (bicubic, bilinear, ...)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast dtype")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device")
    p.add_argument("--attn-stats", action="store_true", help="per layer/head sparsity, multi-modality, entropy")
    p.add_argument("--attn-stats-batches", type=_positive_int, help="limit the statistics to the first N batches")
    p.add_argument("--stats-eps", type=float, default=0.0, help="ε of the paper's S/M definitions")
    p.add_argument("--stats-s", type=float, default=None,
                   help="reference value s of the sparsity S (default: min of softmax(x), the paper's)")
    p.add_argument("--patch-similarity", action="store_true",
                   help="per block, the mean pairwise cosine similarity of the patch tokens (over-smoothing)")
    p.add_argument("--output", help="JSON file, or a directory for the results (default: next to the checkpoint, "
                                    "<name>.<model>.<dataset>-<split>.<size>px.eval.json)")
    p.add_argument("--csv", help="CSV to append a row to (default: eval_results.csv next to the results)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.workers=4 data.max_val_samples=500")
    args = p.parse_intermixed_args(argv)  # overrides may come between options
    if (args.pretrained or args.pretrained_file) and not args.model:
        p.error("--pretrained/--pretrained-file need --model (a timm model name)")
    return args


# ---------------------------------------------------------------- what is evaluated

@dataclass
class Source:
    """One thing to evaluate: a checkpoint file, or timm's pretrained weights for a model name
    (``local-dir:`` for an exported folder), optionally from a local file."""

    label: str                               # what results and messages call it (path, URL, timm:NAME)
    home: str                                # where its results go by default
    path: Optional[str] = None               # checkpoint file (read with load_checkpoint)
    timm_name: Optional[str] = None          # timm.create_model(timm_name, pretrained=True)
    weights_file: Optional[str] = None       # --pretrained-file
    stored_config: Optional[str] = None      # YAML of the training run (exported folders)
    same_file: List[str] = field(default_factory=list)  # hard links to ``path`` evaluated with it

    @classmethod
    def file(cls, path: str) -> "Source":
        return cls(path, os.path.dirname(os.path.abspath(path)), path=path)

    @property
    def stem(self) -> str:
        """First part of the result file name."""
        name = self.path or self.weights_file
        if name:
            return os.path.splitext(os.path.basename(name))[0]
        if self.timm_name.startswith("local-dir:"):  # an exported folder
            return os.path.basename(os.path.normpath(self.label))
        return "pretrained"

    @property
    def identity(self) -> str:
        """The result's ``checkpoint`` entry: an absolute path, a URL or timm:NAME."""
        if is_url(self.label) or not (self.path or self.weights_file or os.path.isdir(self.label)):
            return self.label
        return os.path.abspath(self.label)


def _exported_config(folder: str) -> Optional[Dict[str, Any]]:
    """config.json of a folder written by scripts/export.py (or any timm Hub-layout folder), else None."""
    path = os.path.join(folder, EXPORT_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise UserError(f"{path}: no 'architecture' entry, not a timm model folder")
    arch = cfg["architecture"]
    if not (isinstance(arch, str) and timm.is_model(timm.models.get_arch_name(arch))):
        raise UserError(f"{path}: architecture {arch!r} is not a model timm knows (timm.list_models() lists them)")
    return cfg


def sources(args: argparse.Namespace) -> List[Source]:
    """What the arguments ask to evaluate; a directory yields each distinct checkpoint file once
    (hard links — run directories link best/top-k files to last.pth — are evaluated as one)."""
    if args.pretrained_file:
        return [Source(args.pretrained_file, os.path.dirname(os.path.abspath(args.pretrained_file)),
                       timm_name=args.model, weights_file=args.pretrained_file)]
    if args.pretrained:
        return [Source(f"timm:{args.model}", os.getcwd(), timm_name=args.model)]
    path = args.checkpoint
    if is_url(path):  # results go to the working directory, not into the download cache
        return [Source(path, os.getcwd(), path=download_checkpoint(path))]
    if os.path.isdir(path):
        exported = _exported_config(path)
        if exported is not None:
            folder = os.path.abspath(path)
            return [Source(path, os.path.dirname(folder), timm_name=f"local-dir:{folder}",
                           stored_config=exported.get("training_config") or None)]
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(CHECKPOINT_SUFFIXES))
        if not files:
            raise UserError(f"--checkpoint: directory {path} holds no {'/'.join(CHECKPOINT_SUFFIXES)} files "
                            f"and no {EXPORT_CONFIG}")
        found: Dict[Tuple[int, int], Source] = {}
        for f in files:
            st = os.stat(f)
            if (st.st_dev, st.st_ino) in found:
                found[st.st_dev, st.st_ino].same_file.append(f)
            else:
                found[st.st_dev, st.st_ino] = Source.file(f)
        return list(found.values())
    if not os.path.exists(path):
        raise UserError(f"--checkpoint: {path} does not exist")
    return [Source.file(path)]


# ---------------------------------------------------------------- config and model

def eval_spec(args: argparse.Namespace) -> EvalSpec:
    """The command line as an ``EvalSpec``: the flags become the overrides they stand for,
    before the trailing ``key=value`` ones."""
    flags = {"data.root": args.data_root, "data.dataset": args.dataset, "data.val_split": args.split,
             "data.eval_batch_size": args.batch_size, "data.workers": args.workers,
             "model.img_size": args.img_size, "data.crop_pct": args.crop_pct,
             "data.interpolation": args.interpolation, "data.mean": args.mean, "data.std": args.std,
             "train.amp": args.amp, "train.device": args.device}
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return EvalSpec(model=args.model, config=args.config, use_ema=args.use_ema, overrides=overrides)


def pretrained_model(src: Source, cfg: Config, args: argparse.Namespace) -> nn.Module:
    """timm's ``src.timm_name`` with pretrained weights: timm's own (hub cache), an exported
    folder (``local-dir:``), or ``--pretrained-file`` passed through timm's loader; explicit
    ``model.kwargs`` and ``--img-size`` are passed on."""
    state_dict, num_classes = None, None
    if src.weights_file:
        state_dict = source_state_dict(load_checkpoint(src.weights_file), args.use_ema, src.weights_file)
        num_classes = head_rows(state_dict, src.timm_name)
    elif args.use_ema:
        raise UserError(f"--use-ema: {src.label} holds one set of weights (EMA applies to checkpoints with model_ema)")
    return build_pretrained(src.timm_name, state_dict, num_classes, img_size=args.img_size, **cfg.model.kwargs)


# ---------------------------------------------------------------- classes

def class_mapping(trained: Optional[Sequence[str]], num_trained: int, split: Optional[Sequence[str]],
                  num_split: int, subset: bool, where: str) -> Optional[List[int]]:
    """How the split's labels index the model's outputs: None when they are the same classes in
    the same order, else (only with ``subset``) the model's index of each split label. Refuses
    (UserError) a split whose classes differ: the head is never re-initialised or re-read."""
    if trained is not None and split is not None:
        trained, split = list(trained), list(split)
        if trained == split and not subset:
            return None
        if subset and set(split) <= set(trained):
            return [trained.index(c) for c in split]
        only_split = [c for c in split if c not in trained][:3]
        detail = (f"; not among the checkpoint's: {only_split}" if only_split
                  else "; the same names in another order" if sorted(trained) == sorted(split) else "")
        advice = (" (pass --class-subset to evaluate these classes within the checkpoint's)"
                  if set(split) < set(trained) else "")
        raise UserError(f"{where}: the checkpoint was trained on {len(trained)} classes, the split has "
                        f"{len(split)}{detail}; refusing to score mismatched labels{advice}")
    if subset:
        raise UserError(f"{where}: --class-subset matches classes by name, and "
                        f"{'the checkpoint' if trained is None else 'the split'} records none")
    if num_trained != num_split:
        raise UserError(f"{where}: the model has {num_trained} classes, the split {num_split}; evaluation never "
                        "re-initialises the head: use the split the checkpoint was trained for")
    return None


class _MappedLabels:
    """A loader whose labels are mapped onto the model's class indices (``--class-subset``)."""

    def __init__(self, loader, mapping: Sequence[int]):
        self.loader, self.batch_size = loader, loader.batch_size
        self.lut = torch.tensor(mapping, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, target in self.loader:
            yield images, self.lut[target]


# ---------------------------------------------------------------- one evaluation

def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB (process RSS)


def evaluate_source(src: Source, args: argparse.Namespace,
                    info: Optional[dist.DistInfo]) -> Tuple[Dict[str, Any], dist.DistInfo]:
    spec = eval_spec(args)
    if src.path:
        ckpt = load_checkpoint(src.path)
        model, cfg, load, crop_mode = checkpoint_model(spec, ckpt, src.label)
        weights = {"source": load.source, "dropped": load.dropped, "resampled": load.resampled}
        trained_classes = ckpt.get("classes")
    else:
        cfg = eval_config(spec, None, src.label, src.stored_config)
        model = pretrained_model(src, cfg, args)
        weights = {"source": "timm", "dropped": [], "resampled": []}
        trained_classes = model.pretrained_cfg.get("label_names")
        crop_mode = source_crop_mode(spec, cfg, model, stored=src.stored_config)
    if info is None:
        info = dist.init_distributed(cfg.train.device, cfg.train.dist_backend)
    d, img_size = cfg.data, cfg.model.img_size
    transform = None
    model_chans = timm.models.get_model_input_config(model)["input_size"][0]
    if crop_mode != "center":  # timm's transform for the crop modes data/ does not implement
        transform = timm.data.create_transform(input_size=(model_chans, img_size, img_size), crop_pct=d.crop_pct,
                                               crop_mode=crop_mode, interpolation=d.interpolation,
                                               mean=d.mean, std=d.std)
    loader, data_info = build_eval_loader(d, img_size, info.rank, info.world_size, transform=transform)
    if model_chans != data_info.in_chans:
        raise UserError(f"{src.label}: the model takes {model_chans} input channel(s), the data gives "
                        f"{data_info.in_chans}: set --mean/--std with {model_chans} value(s)")
    where = f"{src.label} on {d.dataset} split {d.val_split!r}"
    mapping = class_mapping(trained_classes, model.num_classes, data_info.classes, data_info.num_classes,
                            args.class_subset, where)
    if mapping is not None:
        loader = _MappedLabels(loader, mapping)
    mean, std = list(d.mean or data_info.mean), list(d.std or data_info.std)
    model.to(info.device).eval()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)

    stats = None
    if args.attn_stats:
        from engine.attn_stats import AttentionStats

        if not models.attention_layers(model):
            raise UserError(f"--attn-stats: {cfg.model.name} has no attention layer it can record "
                            "(timm's Attention or MultiMaxAttention)")
        stats = AttentionStats(eps=args.stats_eps, s=args.stats_s, model=model)
    similarity = None
    if args.patch_similarity:
        from engine.patch_similarity import PatchSimilarity

        if not models.transformer_blocks(model):
            raise UserError(f"--patch-similarity: {cfg.model.name} has no transformer blocks (model.blocks)")
        similarity = PatchSimilarity(model)
    dist.barrier()
    start = time.perf_counter()
    metrics = _run(model, loader, info, cfg.train.amp, stats, args.attn_stats_batches, similarity)
    seconds = time.perf_counter() - start
    result: Dict[str, Any] = {
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
        "num_images": metrics["num_images"],
        "checkpoint": src.identity,
        "same_file": [os.path.abspath(p) for p in src.same_file],
        "model": cfg.model.name, "use_ema": args.use_ema,
        "dataset": {"name": d.dataset, "root": d.root, "split": d.val_split,
                    "max_samples": d.max_val_samples, "classes": data_info.num_classes,
                    "class_subset": mapping is not None},
        "preprocessing": {"img_size": img_size, "crop_pct": d.crop_pct, "crop_mode": crop_mode,
                          "resize": int(img_size / d.crop_pct), "interpolation": d.interpolation,
                          "mean": list(mean), "std": list(std)},
        "throughput": {"img_per_s": metrics["num_images"] / seconds if seconds > 0 else None,
                       "seconds": seconds, "peak_memory_mb": peak_memory_mb(info.device),
                       "peak_memory_kind": "cuda_allocated" if info.device.type == "cuda" else "process_max_rss",
                       "device": str(info.device), "world_size": info.world_size,
                       "batch_size": loader.batch_size, "amp": cfg.train.amp},
        "weights": {**weights, "nonfinite": [n for n, t in model.state_dict().items()
                                             if t.is_floating_point() and not bool(torch.isfinite(t).all())]},
        "model_config": config_to_dict(cfg)["model"],
    }
    if stats is not None:
        result["attn_stats"] = stats.summary(model)
    if similarity is not None:
        result["patch_similarity"] = similarity.summary()
    return result, info


def _run(model, loader, info, amp, stats, stats_batches, similarity=None):
    """``evaluate`` over the loader; with statistics, each batch's attention (the first
    ``stats_batches``) and block outputs (every batch) are recorded, reduced into ``stats`` and
    ``similarity`` and dropped."""
    if stats is None and similarity is None:
        return evaluate(model, loader, info, amp)
    batches = {"n": 0}

    with contextlib.ExitStack() as recording:
        record = recording.enter_context(models.record_attention(model, scores=True)) if stats else None
        tokens = recording.enter_context(models.record_block_outputs(model)) if similarity else None

        def on_batch():
            if record is not None:
                if stats_batches is None or batches["n"] < stats_batches:
                    stats.update(record)
                record.probs.clear()
                record.scores.clear()
            if tokens is not None:
                similarity.update(tokens)
                tokens.tokens.clear()
            batches["n"] += 1

        metrics = evaluate(model, loader, info, amp, on_batch=on_batch)
    for reduced in (stats, similarity):
        if reduced is not None:
            reduced.reduce(lambda t: dist.all_reduce_sum(t.to(info.device)).cpu())
    return metrics


# ---------------------------------------------------------------- results

def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_") or "x"


def result_name(src: Source, result: Dict[str, Any]) -> str:
    """``<checkpoint stem>[_ema].<model>.<dataset>-<split>.<size>px.eval.json``: evaluations of one
    checkpoint with another model, dataset, split or size never overwrite each other."""
    ds = result["dataset"]
    data = os.path.basename(os.path.normpath(ds["root"])) if ds["root"] and ds["name"] == "imagefolder" else ds["name"]
    subset = f".n{ds['max_samples']}" if ds["max_samples"] else ""
    return (f"{src.stem}{'_ema' if result['use_ema'] else ''}.{_safe(timm.models.safe_model_name(result['model']))}."
            f"{_safe(data)}-{_safe(ds['split'])}{subset}.{result['preprocessing']['img_size']}px.eval.json")


def output_dir_mode(args: argparse.Namespace) -> bool:
    """True when ``--output`` names a directory (an existing one, or a path ending in a separator)."""
    return bool(args.output) and (os.path.isdir(args.output) or args.output.endswith(os.sep))


def write_outputs(result: Dict[str, Any], args: argparse.Namespace, src: Source) -> str:
    """The result JSON (written atomically) and a CSV row; returns the JSON path."""
    if args.output and not output_dir_mode(args):
        out = args.output
    else:
        out = os.path.join(args.output or src.home, result_name(src, result))
    table = args.csv or os.path.join(os.path.dirname(os.path.abspath(out)), "eval_results.csv")
    tmp = f"{out}.tmp-{os.getpid()}"  # two evaluations writing one result never share a temp file
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out)
        row = {"checkpoint": result["checkpoint"], "model": result["model"], "use_ema": result["use_ema"],
               "dataset": result["dataset"]["name"], "split": result["dataset"]["split"],
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
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write results ({e.filename}): {e.strerror}") from None
    return out


# ---------------------------------------------------------------- main

def nonfinite_warning(src: Source, result: Dict[str, Any]) -> Optional[str]:
    """What a user must know of a result whose loss is not finite (its top-1/top-5 mean nothing), else None."""
    if math.isfinite(result["loss"]):
        return None
    names = result["weights"]["nonfinite"]
    cause = (f"{len(names)} weight tensor(s) hold NaN/Inf ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
             if names else "its weights are finite, the forward pass overflowed (--amp fp16?)")
    return (f"eval.py: warning: {src.label}: the loss is {result['loss']}: the model's outputs are not finite, "
            f"so its top-1/top-5 mean nothing; {cause} (exit status 3)")


def main(argv=None) -> int:
    args = parse_args(argv)
    info, failed, nonfinite = None, 0, 0
    try:
        todo = sources(args)
        if args.output and not output_dir_mode(args) and len(todo) > 1:
            raise UserError(f"--output {args.output} names one file, but {len(todo)} checkpoints are evaluated: "
                            "give a directory (ending in /)")
        for src in todo:
            try:
                result, info = evaluate_source(src, args, info)
            except UserError as e:
                failed += 1
                print(f"eval.py: error: {e}", file=sys.stderr, flush=True)
                continue
            warning = nonfinite_warning(src, result)
            nonfinite += warning is not None
            if info.is_main:
                out = write_outputs(result, args, src)
                print(f"{src.label}: top1 {result['top1']:.3f} top5 {result['top5']:.3f} loss {result['loss']:.4f} "
                      f"images {result['num_images']} ({result['throughput']['img_per_s']:.0f} img/s) -> {out}",
                      flush=True)
                if warning:
                    print(warning, file=sys.stderr, flush=True)
        if failed and len(todo) > 1:
            print(f"eval.py: error: {failed} of {len(todo)} checkpoints could not be evaluated (see above)",
                  file=sys.stderr)
        return EXIT_USER_ERROR if failed else EXIT_NONFINITE if nonfinite else EXIT_OK
    except UserError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if info is not None:
            dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
