"""One door for weights: our checkpoints, checkpoints trained with the paper's code, and timm/DeiT ones.

``load_weights(model, checkpoint)`` takes a loaded checkpoint dict (files and URLs are read by
``engine.checkpoint.load_checkpoint``, which never executes pickled code), finds the state dict
(``model`` / ``state_dict``, with ``use_ema`` ``model_ema`` / ``state_dict_ema``, or the dict
itself), maps its keys onto ours and loads it strictly, except for what is reported as
deliberately dropped, resampled or left at init.

Key mapping:
- ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile) are stripped.
- Paper code (``from_paper``): ``blocks.{i}.attn.{ranges,ts}`` →
  ``blocks.{i}.attn.normalizer.modulator.{ranges,ts}``; top-level ``ranges`` / ``ts`` →
  ``out_modulator.{ranges,ts}``. Its "affine then first-order" variant (the authors' DeiT code at
  commit 31ff228) adds 0-d ``blocks.{i}.attn.t`` / ``.b`` (σ(t·x + b) in attention) and keeps
  ``ranges``/``ts`` of length 4 everywhere of which its first-order σ reads only the first 2:
  ``t``/``b`` → ``modulator.scale``/``shift``, ``ranges``/``ts`` cut to 2, so it loads into a
  ``modulator_affine`` model of order 1 (its output σ is plain first order, as ours).
- timm/DeiT into a model without those tokens: ``cls_token`` / ``dist_token`` / ``reg_token`` /
  ``head_dist.*`` dropped with their rows of ``pos_embed``; a position grid of another size is
  resampled (``timm.layers.resample_abs_pos_embed``, as timm does); a head whose shape differs
  from the model's is left at init; a softmax checkpoint leaves a MultiMax model's modulators at init.
Those changes make a fine-tuning start. ``strict=True`` (evaluation) refuses all of them but the
resampling, since the model would then compute another function than the one trained: a
class-token checkpoint is refused with the timm architecture it belongs to.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

_PREFIXES = ("module.", "_orig_mod.")
_PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")
_PAPER_ATTN_KEY = re.compile(r"^(blocks\.\d+\.attn)\.(ranges|ts|t|b)$")
_PAPER_NAMES = {"ranges": "ranges", "ts": "ts", "t": "scale", "b": "shift"}
class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists the keys."""


@dataclass
class LoadResult:
    """What ``load_weights`` did: the detected source format and every deliberate change."""

    source: str                                       # ours | paper | timm
    reset: List[str] = field(default_factory=list)    # model keys deliberately kept at init
    dropped: List[str] = field(default_factory=list)  # checkpoint keys deliberately ignored
    resampled: List[str] = field(default_factory=list)  # e.g. "pos_embed 14x14 -> 24x24"

    def describe(self) -> str:
        """One line: what was dropped, resampled and left at init (empty if nothing)."""
        parts = []
        if self.dropped:
            parts.append("dropped " + ", ".join(self.dropped))
        if self.resampled:
            parts.append("resampled " + ", ".join(self.resampled))
        if self.reset:
            modulators = [k for k in self.reset if _is_modulator(k)]
            others = [k for k in self.reset if not _is_modulator(k)]
            parts.append("left at init " + ", ".join(others + ([f"{len(modulators)} modulator tensors"]
                                                               if modulators else [])))
        return "; ".join(parts)


def _is_modulator(key: str) -> bool:
    return ".modulator." in key or key.startswith("out_modulator.")


# ---------------------------------------------------------------- state dicts

def extract_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint dict (ours, DeiT's, timm's or a bare state dict)."""
    keys = ("model_ema", "state_dict_ema") if use_ema else ("model", "state_dict")
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping) and checkpoint[key]:
            return dict(checkpoint[key])
    if use_ema:
        raise CheckpointMismatchError("checkpoint has no EMA weights ('model_ema' is missing or empty)")
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointMismatchError(
        f"no model weights found: expected a 'model' or 'state_dict' entry or a bare state dict, "
        f"got keys {sorted(checkpoint)[:10]}"
    )


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def detect_source(sd: Mapping[str, torch.Tensor]) -> str:
    """The format of a state dict (prefixes stripped): ours | paper | timm."""
    if any(k.endswith("normalizer.modulator.ranges") or k.startswith("out_modulator.") for k in sd):
        return "ours"
    if "ranges" in sd or any(_PAPER_ATTN_KEY.match(k) for k in sd):
        return "paper"
    return "timm"


def from_paper(sd: Mapping[str, torch.Tensor]) -> tuple[Dict[str, torch.Tensor], List[str]]:
    """A state dict of the paper's code with its modulators under our names (see the module doc),
    and what was left out: the entries of ``ranges``/``ts`` its first-order affine code never reads."""
    affine = any(k.endswith(".attn.t") for k in sd)
    out: Dict[str, torch.Tensor] = {}
    cut = 0
    for k, v in sd.items():
        m = _PAPER_ATTN_KEY.match(k)
        if m:
            k, name = f"{m.group(1)}.normalizer.modulator", _PAPER_NAMES[m.group(2)]
        elif k in ("ranges", "ts"):
            k, name = "out_modulator", k
        else:
            out[k] = v
            continue
        if name in ("scale", "shift"):
            v = v.reshape(1)
        elif affine and v.shape[0] > 2:
            v, cut = v[:2], cut + 1
        out[f"{k}.{name}"] = v
    return out, [f"entries 2+ of {cut} ranges/ts tensors (the paper's first-order affine code never reads them)"] \
        if cut else []


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n ** 0.5)) ** 2 == n


def _grid(n: int) -> List[int]:
    side = int(round(n ** 0.5))
    if not _is_square(n):
        raise CheckpointMismatchError(f"pos_embed has {n} patch positions: not a square grid, cannot resample")
    return [side, side]


def _fit_pos_embed(pos: torch.Tensor, sd: Mapping[str, torch.Tensor], model: nn.Module,
                   result: LoadResult) -> torch.Tensor:
    """``pos`` (1, prefix + patches, C) made to fit the model's pos_embed: the rows of prefix
    tokens the model lacks dropped (they come first in timm/DeiT), the patch grid resampled."""
    target = model.state_dict()["pos_embed"]
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if not getattr(model, "no_embed_class", False) else 0
    drop = max(0, sum(1 for t in _PREFIX_TOKENS if t in sd) - prefix)
    if drop and _is_square(pos.shape[1] - prefix) and not _is_square(pos.shape[1] - prefix - drop):
        drop = 0  # the tokens have no rows here (timm's no_embed_class models)
    if drop:
        pos = pos[:, drop:]
        result.dropped.append(f"pos_embed's first {drop} row(s)")
    n_old, n_new = pos.shape[1] - prefix, target.shape[1] - prefix
    if n_old != n_new:
        new = list(getattr(getattr(model, "patch_embed", None), "grid_size", None) or _grid(n_new))
        old = _grid(n_old)
        pos = resample_abs_pos_embed(pos.float(), new_size=new, old_size=old, num_prefix_tokens=prefix).to(pos.dtype)
        result.resampled.append(f"pos_embed {old[0]}x{old[1]} -> {new[0]}x{new[1]}")
    return pos


def in_our_names(sd: Mapping[str, torch.Tensor]) -> tuple[Dict[str, torch.Tensor], str, List[str]]:
    """A state dict of any source under our key names: prefixes stripped and the paper's
    modulators renamed (``from_paper``). Returns (state dict, its source, what was left out)."""
    sd = strip_prefixes(sd)
    source = detect_source(sd)
    if source != "paper":
        return sd, source, []
    sd, dropped = from_paper(sd)
    return sd, source, dropped


def convert_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module) -> tuple[Dict[str, torch.Tensor], LoadResult]:
    """Map a foreign state dict onto ``model``'s keys. Returns the new dict and what was done."""
    sd, source, dropped = in_our_names(sd)
    result = LoadResult(source=source, dropped=dropped)
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if (k in _PREFIX_TOKENS or k.startswith("head_dist.")) and k not in target:
            result.dropped.append(k)
            continue
        out[k] = v
    if "pos_embed" in out and "pos_embed" in target and out["pos_embed"].shape != target["pos_embed"].shape:
        out["pos_embed"] = _fit_pos_embed(out["pos_embed"], sd, model, result)
    for key in ("head.weight", "head.bias"):
        if key in out and key in target and out[key].shape != target[key].shape:
            del out[key]
            result.reset.append(key)
    if result.source == "timm":
        # a softmax checkpoint has no modulators: the model keeps their init
        result.reset += [k for k in target if _is_modulator(k)]
    return out, result


# ---------------------------------------------------------------- loading into a model

def class_token_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    """The timm model a class-token ViT/DeiT state dict belongs to, as eval.py arguments:
    'deit_small_patch16_224', 'deit_tiny_distilled_patch16_224', or for sizes timm has no name
    for, the nearest DeiT name with the ``model.kwargs`` that differ."""
    sd = strip_prefixes(sd)
    proj, pos = sd.get("patch_embed.proj.weight"), sd.get("pos_embed")
    distilled = "_distilled" if "dist_token" in sd else ""
    if proj is None or pos is None or proj.dim() != 4:
        return f"deit_small{distilled}_patch16_224 (a timm ViT with a class token)"
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max((int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.").match, sd) if m), default=-1)
    side = int(round((pos.shape[1] - sum(1 for t in _PREFIX_TOKENS if t in sd)) ** 0.5))
    size = {192: "tiny", 384: "small", 768: "base"}.get(width)
    name = f"deit_{size}{distilled}_patch{patch}_{side * patch}"
    if size and depth == 12 and timm.is_model(name):
        return name
    extra = [] if size else [f"model.kwargs.embed_dim={width}", "model.kwargs.num_heads=<its heads>"]
    extra += [f"model.kwargs.depth={depth}"] if depth != 12 else []
    extra += [f"model.kwargs.patch_size={patch}"] if patch != 16 else []
    extra += [f"--img-size {side * patch}"] if side * patch != 224 else []
    return " ".join([f"deit_{size or 'tiny'}{distilled}_patch16_224", *extra])


_TOKEN_NAMES = {"cls_token": "a class token", "dist_token": "a distillation token", "reg_token": "register tokens"}


def _tokens(names: Sequence[str]) -> str:
    return f"{' and '.join(_TOKEN_NAMES[t] for t in names)} ({', '.join(names)})"


def _token_mismatch(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why a strict load cannot go on when the checkpoint and the model have other prefix tokens
    (class, distillation, register), else None."""
    in_ckpt = [t for t in _PREFIX_TOKENS if t in sd]
    in_model = [t for t in _PREFIX_TOKENS if t in target]
    if in_ckpt == in_model:
        return None
    if not in_model:
        return (f"it is a class-token model ({', '.join(in_ckpt)}) and this model has no class token, so its "
                f"classifier would read other features than it was trained on (a GAP model averages the patch "
                f"tokens); evaluate it in its own architecture: --model {class_token_architecture(sd)} "
                f"(model.init_checkpoint starts a GAP model from it)")
    if not in_ckpt:
        return (f"the checkpoint has no {', '.join(in_model)} (it pools the average of its tokens) and the model "
                "expects one: build the model it was trained as (e.g. a *_gap_* or *_multimax_* model)")
    return (f"it has {_tokens(in_ckpt)}, this model {_tokens(in_model)}, so its output would be computed from other "
            f"tokens than it was trained on; evaluate it in its own architecture: --model "
            f"{class_token_architecture(sd)}")


def load_weights(model: nn.Module, checkpoint: Mapping[str, Any], use_ema: bool = False,
                 strict: bool = False) -> LoadResult:
    """Load ``checkpoint`` (a loaded checkpoint dict or a bare state dict) into ``model``; raise
    ``CheckpointMismatchError`` naming the missing, unexpected and mis-shaped keys if it does not
    fit. ``strict``: nothing may be dropped or left at init (evaluation; see the module doc)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    raw = strip_prefixes(extract_state_dict(checkpoint, use_ema))
    target = model.state_dict()
    if strict:
        reason = _token_mismatch(raw, target)
        if reason:
            raise CheckpointMismatchError(reason)
    sd, result = convert_state_dict(raw, model)
    if strict and result.reset:
        heads = [k for k in result.reset if not _is_modulator(k)]
        if heads:
            raise CheckpointMismatchError(
                f"its head has {tuple(raw[heads[0]].shape)}, the model's {tuple(target[heads[0]].shape)}: "
                "another number of classes, which evaluation never re-initialises")
        raise CheckpointMismatchError("it has no MultiMax modulators (a softmax model): build the model with "
                                      "attn_normalizer=softmax and out_normalizer=softmax")
    missing = [k for k in target if k not in sd and k not in result.reset]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd if k in target and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(_mismatch_message(result.source, missing, unexpected, shapes))
    model.load_state_dict(sd, strict=False)
    return result


def _mismatch_message(source: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> str:
    def some(keys: Sequence[str]) -> str:
        return ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {some(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {'; '.join(shapes[:6])}")
    hint = ""
    if any(k.endswith("attn.qkv.bias") for k in unexpected):
        hint = (" (the checkpoint has qkv biases and the model none: qkv_bias=True builds them, in a config "
                "model.qkv_bias=true, for timm's own models model.kwargs.qkv_bias=true)")
    elif any(k.endswith("attn.qkv.bias") for k in missing):
        hint = (" (the checkpoint has no qkv biases: build the model with qkv_bias=False, in a config "
                "model.qkv_bias=false, for timm's own models model.kwargs.qkv_bias=false)")
    return f"checkpoint ({source} format) does not fit the model: " + "; ".join(parts) + hint


def infer_model_kwargs(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Dict[str, Any]:
    """Architecture kwargs a foreign checkpoint implies (``qkv_bias`` for ViTs, ``num_classes``,
    normalizers, the paper's modulator order and affine map), so that eval can build a model that
    fits it; every key is a ``ModelConfig`` field."""
    sd, source, _ = in_our_names(extract_state_dict(checkpoint, use_ema))
    kwargs: Dict[str, Any] = {}
    if any(k.endswith("attn.qkv.weight") for k in sd):
        kwargs["qkv_bias"] = any(k.endswith("attn.qkv.bias") for k in sd)
    if "head.weight" in sd:
        kwargs["num_classes"] = int(sd["head.weight"].shape[0])
    if source == "paper":
        kwargs["out_normalizer"] = "multimax" if "out_modulator.ranges" in sd else "softmax"
        kwargs["modulator_order"] = int(next(v for k, v in sd.items() if k.endswith("ranges")).shape[0]) // 2
        kwargs["modulator_affine"] = any(k.endswith("modulator.scale") for k in sd)
    elif source == "timm":
        kwargs.update(attn_normalizer="softmax", out_normalizer="softmax")
    return kwargs


__all__ = ["CheckpointMismatchError", "LoadResult", "load_weights", "extract_state_dict", "strip_prefixes", "detect_source", "from_paper",
           "convert_state_dict", "in_our_names",
           "class_token_architecture", "infer_model_kwargs"]
