"""One door for weights: our checkpoints, checkpoints trained with the paper's code, and timm/DeiT ones.

``load_weights(model, checkpoint)`` takes a path (``.pth``/``.pt`` loaded with
``weights_only=True``, or ``.safetensors``) or an already loaded dict, finds the state dict
(``model`` / ``state_dict`` / ``model_ema`` key, or the dict itself), maps its keys onto ours
and loads it strictly, except for what is reported as deliberately reset.

Key mapping:
- ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile) are stripped.
- Paper code: ``blocks.{i}.attn.{ranges,ts}`` → ``blocks.{i}.attn.normalizer.modulator.{ranges,ts}``;
  top-level ``ranges`` / ``ts`` → ``out_modulator.{ranges,ts}``.
- timm/DeiT: ``cls_token`` / ``dist_token`` / ``head_dist.*`` dropped, the prefix tokens' rows of
  ``pos_embed`` dropped (and the grid resampled if the image size differs); a head whose shape
  differs from the model's is reset (the model keeps its own init).
A softmax checkpoint loaded into a MultiMax model leaves the modulators at their init (reported).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

_PREFIXES = ("module.", "_orig_mod.")
_FOREIGN_TOKENS = ("cls_token", "dist_token", "reg_token")
_PAPER_ATTN_KEY = re.compile(r"^(blocks\.\d+\.attn)\.(ranges|ts)$")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists the keys."""


@dataclass
class LoadResult:
    """What ``load_weights`` did: the detected source format and what it left at init."""

    source: str                                   # ours | paper | timm
    reset: List[str] = field(default_factory=list)  # model keys deliberately kept at init
    dropped: List[str] = field(default_factory=list)  # checkpoint keys deliberately ignored


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load a checkpoint file without executing pickled code (safetensors or weights_only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {"model": load_file(path)}
    return torch.load(path, map_location="cpu", weights_only=True)


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


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
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


def _detect_source(sd: Mapping[str, torch.Tensor]) -> str:
    if any(k.endswith("normalizer.modulator.ranges") or k.startswith("out_modulator.") for k in sd):
        return "ours"
    if "ranges" in sd or any(_PAPER_ATTN_KEY.match(k) for k in sd):
        return "paper"
    return "timm"


def _resample_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubic resize of a (1, G*G, C) grid of position embeddings to ``num_patches`` positions."""
    old, new = int(math.isqrt(pos.shape[1])), int(math.isqrt(num_patches))
    if old * old != pos.shape[1] or new * new != num_patches:
        raise CheckpointMismatchError(
            f"pos_embed has {pos.shape[1]} positions, the model {num_patches}: not square grids, cannot resample"
        )
    grid = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)


def convert_state_dict(
    sd: Dict[str, torch.Tensor], model: nn.Module
) -> tuple[Dict[str, torch.Tensor], LoadResult]:
    """Map a foreign state dict onto ``model``'s keys. Returns the new dict and what was done."""
    sd = _strip_prefixes(sd)
    result = LoadResult(source=_detect_source(sd))
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if result.source == "paper":
            m = _PAPER_ATTN_KEY.match(k)
            if m:
                k = f"{m.group(1)}.normalizer.modulator.{m.group(2)}"
            elif k in ("ranges", "ts"):
                k = f"out_modulator.{k}"
        if k in _FOREIGN_TOKENS and k not in target or k.startswith("head_dist."):
            result.dropped.append(k)
            continue
        out[k] = v
    pos = out.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        n_model = target["pos_embed"].shape[1]
        extra = pos.shape[1] - n_model
        # class/distillation tokens' positions come first in timm/DeiT
        n_prefix = sum(1 for t in ("cls_token", "dist_token") if t in sd and t not in target)
        if n_prefix and extra >= n_prefix:
            pos = pos[:, n_prefix:]
        if pos.shape[1] != n_model:
            pos = _resample_pos_embed(pos, n_model)
        out["pos_embed"] = pos
    for key in ("head.weight", "head.bias"):
        if key in out and key in target and out[key].shape != target[key].shape:
            del out[key]
            result.reset.append(key)
    if result.source == "timm":
        # a softmax checkpoint has no modulators: the model keeps their init
        result.reset += [k for k in target if ".modulator." in k or k.startswith("out_modulator.")]
    return out, result


def load_weights(
    model: nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
    use_ema: bool = False,
) -> LoadResult:
    """Load ``checkpoint`` (a path or a loaded dict) into ``model``; raise
    ``CheckpointMismatchError`` naming the missing, unexpected and mis-shaped keys if it does not fit."""
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f"a checkpoint must be a dict, got {type(ckpt).__name__}")
    sd, result = convert_state_dict(extract_state_dict(ckpt, use_ema), model)
    target = model.state_dict()
    missing = [k for k in target if k not in sd and k not in result.reset]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd if k in target and sd[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:6])}")
        hint = ""
        if any(k.endswith("attn.qkv.bias") for k in unexpected):
            hint = " (the checkpoint has qkv biases: build the model with qkv_bias=True)"
        elif any(k.endswith("attn.qkv.bias") for k in missing):
            hint = " (the checkpoint has no qkv biases: build the model with qkv_bias=False)"
        raise CheckpointMismatchError(f"checkpoint ({result.source} format) does not fit the model: "
                                      + "; ".join(parts) + hint)
    model.load_state_dict(sd, strict=False)
    return result


def infer_model_kwargs(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Dict[str, Any]:
    """Architecture kwargs a foreign checkpoint implies (``qkv_bias``, ``num_classes``,
    normalizers), so that eval can build a model that fits it."""
    sd = _strip_prefixes(extract_state_dict(checkpoint, use_ema))
    kwargs: Dict[str, Any] = {"qkv_bias": any(k.endswith("attn.qkv.bias") for k in sd)}
    if "head.weight" in sd:
        kwargs["num_classes"] = int(sd["head.weight"].shape[0])
    source = _detect_source(sd)
    if source == "paper":
        kwargs["out_normalizer"] = "multimax" if "ranges" in sd else "softmax"
        kwargs["modulator_order"] = int(next(v for k, v in sd.items() if k.endswith("ranges")).shape[0]) // 2
    elif source == "timm":
        kwargs.update(attn_normalizer="softmax", out_normalizer="softmax")
    return kwargs


__all__ = ["CheckpointMismatchError", "LoadResult", "load_weights", "read_checkpoint",
           "extract_state_dict", "convert_state_dict", "infer_model_kwargs"]
