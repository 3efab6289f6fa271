"""The model and config a checkpoint is evaluated with, as eval.py resolves them; scripts that
read checkpoints the same way (scripts/attention_maps.py, scripts/export.py) use them too.

    spec = EvalSpec(model="deit_small_multimax_patch16_224", overrides=["data.root=/data/imagenet"])
    model, cfg, load, crop_mode = checkpoint_model(spec, load_checkpoint(path), path)

Nothing is changed to make a checkpoint fit: the model is built in the architecture it was
trained as (ours from the stored config, a foreign one from ``--model`` with its class count, qkv
bias and modulators read off the weights) and loaded with ``load_weights(strict=True)``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from models.weights import CheckpointMismatchError, LoadResult, extract_state_dict, infer_model_kwargs, \
    load_weights, strip_prefixes

from .config import Config, DataConfig, apply_overrides, config_from_yaml_text, load_config
from .errors import UserError
from .model import build_model, is_multimax_model

# DeiT's main.py evaluates its releases at --eval-crop-ratio 0.875 whatever the size (timm's
# configs for them say 0.9, and 1.0 at 384).
_DEIT_RELEASE = re.compile(r"^deit_(tiny|small|base)(_distilled)?_patch16_(224|384)(\.|$)")
DEIT_EVAL_CROP_PCT = 0.875
# Where a stored config's data come from, besides data.dataset (see eval_config).
_DATA_SOURCE = ("root", "download", "val_split")


@dataclass
class EvalSpec:
    """What the command line says about the evaluation of a checkpoint."""

    model: Optional[str] = None        # a timm model name (foreign checkpoints need one)
    config: Optional[str] = None       # a YAML file instead of the checkpoint's own config
    use_ema: bool = False              # the EMA weights (model_ema)
    overrides: Sequence[str] = ()      # dotted ``key=value`` overrides, applied last

    def sets(self, key: str) -> bool:
        """Whether an override sets the dotted ``key``."""
        return any(o.partition("=")[0].strip() == key for o in self.overrides)


def stored_config(ckpt: Optional[Dict[str, Any]], stored: Optional[str] = None) -> Optional[str]:
    """The training run's config text a source carries (given, or the checkpoint's), else None."""
    text = stored if stored is not None else (ckpt or {}).get("config")
    return text if isinstance(text, str) and text.strip() else None


def eval_config(spec: EvalSpec, ckpt: Optional[Dict[str, Any]], label: str, stored: Optional[str] = None) -> Config:
    """Config for one source: ``spec.config``, else the stored one (the checkpoint's ``config``,
    an exported folder's training config), else defaults for a foreign checkpoint or a timm model
    (ImageFolder data; the image size timm gives ``spec.model``; for a checkpoint what its weights
    say, ``models.infer_model_kwargs``). Then evaluation's rules — the whole split
    (``data.max_val_samples`` only from the overrides) and no ``model.init_checkpoint`` (the
    weights are the ones evaluated) — and the overrides on top. Overrides naming another dataset
    or root than the stored config's replace its data source as a whole (``_DATA_SOURCE``: what
    they do not set takes its default)."""
    stored = stored_config(ckpt, stored)
    if spec.config:
        cfg = load_config(spec.config, [])
    elif stored:
        cfg = config_from_yaml_text(stored, source=f"{label} (stored config)")
    else:
        if not spec.model:
            trained_as = getattr((ckpt or {}).get("args"), "model", None)
            hint = f" (its args say it was trained as {trained_as!r})" if isinstance(trained_as, str) else ""
            raise UserError(f"{label} carries no config: name its architecture with --model{hint}, e.g. "
                            f"deit_small_patch16_224 for a DeiT release, deit_small_multimax_patch16_224 for ours")
        cfg = Config()
        cfg.data.dataset = "imagefolder"
        cfg.data.workers = min(cfg.data.workers, os.cpu_count() or 1)
        pcfg = _pretrained_cfg(spec.model)
        if pcfg is not None:
            cfg.model.img_size = pcfg.input_size[-1]
        if ckpt is not None:
            _architecture_from_weights(cfg, spec.model, infer_model_kwargs(ckpt, spec.use_ema))
    if spec.model:
        cfg.model.name = spec.model
    cfg.model.init_checkpoint = ""
    cfg.data.max_val_samples = None
    if not spec.overrides:
        return cfg
    out = apply_overrides(cfg, spec.overrides)
    if stored and not spec.config and (out.data.dataset, out.data.root) != (cfg.data.dataset, cfg.data.root):
        # another dataset or root: the stored data source gives way as a whole, so that nothing is
        # read from, downloaded or written into a root the user did not name for this dataset
        for key in _DATA_SOURCE:
            if not spec.sets(f"data.{key}"):
                setattr(out.data, key, getattr(DataConfig(), key))
    return out


def _pretrained_cfg(name: str):
    return timm.get_pretrained_cfg(name) if timm.is_model(timm.models.get_arch_name(name)) else None


def _architecture_from_weights(cfg: Config, model_name: str, inferred: Dict[str, Any]) -> None:
    """Put what the weights say into ``cfg.model``: as our knobs (every key ``infer_model_kwargs``
    gives) for our models; the class count, and the qkv bias as ``model.kwargs``, for others."""
    if "num_classes" in inferred:
        cfg.model.num_classes = inferred["num_classes"]
    if is_multimax_model(model_name):
        for key, value in inferred.items():
            setattr(cfg.model, key, value)
    elif "qkv_bias" in inferred:
        cfg.model.kwargs["qkv_bias"] = inferred["qkv_bias"]


def classifier_and_stem(name: str) -> Tuple[str, str]:
    """Module names of the classifier and the first conv of ``name`` (timm's pretrained config)."""
    pcfg = _pretrained_cfg(name)
    classifier = (pcfg.classifier if pcfg else None) or "head"
    first_conv = (pcfg.first_conv if pcfg else None) or "patch_embed.proj"
    pick = (lambda v: v[0] if isinstance(v, (tuple, list)) else v)
    return pick(classifier), pick(first_conv)


def checkpoint_model(spec: EvalSpec, ckpt: Dict[str, Any], label: str) -> Tuple[nn.Module, Config, LoadResult, str]:
    """The model a checkpoint was trained as, loaded strictly, and its eval config: ``eval_config``,
    the model built for the weights (class count and input channels from them unless the config
    sets them), and for a checkpoint without a config of its own timm's preprocessing. Returns
    (model, config, LoadResult, crop mode)."""
    sd = source_state_dict(ckpt, spec.use_ema, label)  # first: a missing entry is named before anything reads it
    cfg = eval_config(spec, ckpt, label)
    conv = sd.get(f"{classifier_and_stem(cfg.model.name)[1]}.weight")
    num_classes = cfg.model.num_classes or head_rows(sd, cfg.model.name)
    in_chans = cfg.model.in_chans or (int(conv.shape[1]) if conv is not None and conv.dim() == 4 else None)
    model = build_model(cfg.model, num_classes, in_chans)
    try:
        load = load_weights(model, ckpt, use_ema=spec.use_ema, strict=True)
    except CheckpointMismatchError as e:
        raise UserError(f"{label} does not fit model {cfg.model.name}: {e}") from None
    return model, cfg, load, source_crop_mode(spec, cfg, model, ckpt)


def source_state_dict(ckpt: Dict[str, Any], use_ema: bool, label: str) -> Dict[str, torch.Tensor]:
    """The weights a checkpoint holds (``model_ema`` with ``use_ema``), wrapper prefixes stripped;
    a missing entry is a UserError naming ``label``."""
    try:
        return strip_prefixes(extract_state_dict(ckpt, use_ema))
    except CheckpointMismatchError as e:
        raise UserError(f"{label}: {e}") from None


def head_rows(sd: Dict[str, torch.Tensor], name: str) -> Optional[int]:
    """The class count of model ``name``'s classifier weight in ``sd``, None if it has none."""
    head = sd.get(f"{classifier_and_stem(name)[0]}.weight")
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def source_crop_mode(spec: EvalSpec, cfg: Config, model: nn.Module, ckpt: Optional[Dict[str, Any]] = None,
                     stored: Optional[str] = None) -> str:
    """"center" for a source evaluated with a config (given, or the run's stored one), else timm's
    preprocessing for the model (which also fills in ``cfg.data``)."""
    return "center" if spec.config or stored_config(ckpt, stored) else timm_preprocessing(cfg, model, spec)


def authors_crop_pct(name: str, timm_crop_pct: float) -> float:
    """The centre-crop fraction a model's authors evaluated with: DeiT's for DeiT's releases
    (``DEIT_EVAL_CROP_PCT``), timm's own value for every other model."""
    return DEIT_EVAL_CROP_PCT if _DEIT_RELEASE.match(name) else timm_crop_pct


def timm_preprocessing(cfg: Config, model: nn.Module, spec: EvalSpec) -> str:
    """For a model without a stored config: timm's data config of the built model (size, crop,
    interpolation, mean/std; the crop as its authors evaluated), where the overrides do not set
    them. Returns timm's crop mode."""
    data = timm.data.resolve_input_data_config(model)
    data["crop_pct"] = authors_crop_pct(cfg.model.name, data["crop_pct"])
    cfg.model.img_size = data["input_size"][-1]
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if not spec.sets(f"data.{key}"):
            setattr(cfg.data, key, list(data[key]) if key in ("mean", "std") else data[key])
    return data.get("crop_mode") or "center"


__all__ = ["EvalSpec", "DEIT_EVAL_CROP_PCT", "stored_config", "eval_config", "classifier_and_stem", "checkpoint_model",
           "authors_crop_pct", "timm_preprocessing", "source_state_dict", "head_rows", "source_crop_mode"]
