"""Model construction from the config, and the EMA copy of the weights."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn

import models
from models.weights import CheckpointMismatchError

from .config import ModelConfig
from .errors import UserError


def model_kwargs(cfg: ModelConfig, num_classes: Optional[int], in_chans: Optional[int]) -> Dict[str, Any]:
    """timm.create_model kwargs for ``cfg``; dataset-derived values fill what the config leaves None,
    and a None the registered model fills (the normalizers of its ``*_multimax_*``/``*_gap_*`` variant)."""
    kwargs: Dict[str, Any] = dict(
        num_classes=cfg.num_classes if cfg.num_classes is not None else num_classes,
        img_size=cfg.img_size,
        in_chans=cfg.in_chans if cfg.in_chans is not None else in_chans,
        attn_normalizer=cfg.attn_normalizer,
        out_normalizer=cfg.out_normalizer,
        modulator_order=cfg.modulator_order,
        modulator_init=cfg.modulator_init,
        modulator_affine=cfg.modulator_affine,
        softmax_temperature=cfg.softmax_temperature,
        qkv_bias=cfg.qkv_bias,
        attn_backend=cfg.attn_backend,
        drop_rate=cfg.drop_rate,
        pos_drop_rate=cfg.pos_drop_rate,
        proj_drop_rate=cfg.proj_drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    kwargs.update(cfg.kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def built_model_config(cfg: ModelConfig, model: nn.Module) -> ModelConfig:
    """``cfg`` with the normalizers ``model`` was built with, so that a run records what it trains
    (not a None that means "the variant's")."""
    return dataclasses.replace(cfg, attn_normalizer=getattr(model, "attn_normalizer", cfg.attn_normalizer),
                               out_normalizer=getattr(model, "out_normalizer", cfg.out_normalizer))


def build_model(cfg: ModelConfig, num_classes: Optional[int] = None, in_chans: Optional[int] = None) -> nn.Module:
    """The model named in ``cfg`` (a registered MultiMax/GAP ViT), optionally initialised from
    ``cfg.init_checkpoint``."""
    if cfg.name not in timm.list_models(cfg.name):
        known = ", ".join(n for n in timm.list_models() if "_multimax_" in n or "_gap_patch" in n)
        raise UserError(f"model.name: unknown model {cfg.name!r}; registered MultiMax/GAP models: {known}")
    try:
        model = timm.create_model(cfg.name, **model_kwargs(cfg, num_classes, in_chans))
    except (TypeError, ValueError) as e:
        raise UserError(f"model: cannot build {cfg.name!r}: {e}") from None
    if cfg.init_checkpoint:
        try:
            models.load_weights(model, cfg.init_checkpoint)
        except (FileNotFoundError, CheckpointMismatchError) as e:
            raise UserError(f"model.init_checkpoint: {cfg.init_checkpoint}: {e}") from None
    return model


class EMA:
    """Exponential moving average of a model's parameters and buffers, updated once per
    optimizer step: ema = decay * ema + (1 - decay) * weights. Kept in float32 on the model's device."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                target.lerp_(value.to(target.dtype), 1.0 - self.decay)
            else:
                target.copy_(value)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
