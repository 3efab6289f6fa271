"""MultiMax Vision Transformers on top of timm's ``VisionTransformer``.

The paper's architecture: DeiT sizes, no class token, the final LayerNorm on every token,
global average pooling (``fc_norm`` off), a linear head, and (for MultiMax) a SegLU
modulator on the logits, so the model's output is σ(logits) and the usual cross-entropy
trains softmax(σ(logits)). The softmax baseline is the same GAP model.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from .attention import MultiMaxAttention
from .choices import OUT_NORMALIZERS, check_choice
from .multimax import SegLU


class MultiMaxVisionTransformer(VisionTransformer):
    """timm ViT with a configurable attention normalizer and an optional output modulator.

    Extra kwargs over timm's ``VisionTransformer``:
        attn_normalizer: softmax | multimax | sparsemax | entmax15 | evsoftmax.
        out_normalizer: softmax | multimax (multimax adds a SegLU on the logits).
        modulator_order, modulator_init: the SegLU's N and init (attention and output alike).
        modulator_affine: x ↦ t·x + b before σ in the attention modulators; the output σ stays
            plain, as in the authors' code for this variant.
        softmax_temperature: temperature of the softmax attention normalizer.
        attn_backend: auto | sdpa | explicit | flex | chunked (see models.attention).
        grad_checkpointing: recompute blocks in the backward pass.
    Input (B, in_chans, H, W) → logits (B, num_classes); float32 when the output modulator is on.
    timm conventions hold: ``num_classes=0`` / ``reset_classifier(0)`` give the pooled features
    (σ acts on logits only), ``features_only=True`` and ``forward_intermediates`` as for timm's ViT.
    """

    def __init__(
        self,
        attn_normalizer: str = "multimax",
        out_normalizer: str = "multimax",
        modulator_order: int = 2,
        modulator_init: str = "trunc_normal",
        modulator_affine: bool = False,
        softmax_temperature: float = 1.0,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        check_choice("out_normalizer", out_normalizer, OUT_NORMALIZERS)
        kwargs.setdefault("class_token", False)
        kwargs.setdefault("global_pool", "avg")
        kwargs.setdefault("fc_norm", False)
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        attn_layer = _attention_with(
            normalizer=attn_normalizer,
            modulator_order=modulator_order,
            modulator_init=modulator_init,
            modulator_affine=modulator_affine,
            softmax_temperature=softmax_temperature,
            backend=attn_backend,
        )
        super().__init__(attn_layer=attn_layer, **kwargs)
        self.attn_normalizer = attn_normalizer
        self.out_normalizer = out_normalizer
        self.out_modulator = SegLU(modulator_order, modulator_init) if out_normalizer == "multimax" else None
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = super().forward_head(x, pre_logits=pre_logits)
        if pre_logits or self.out_modulator is None or self.num_classes == 0:
            return x  # no classifier (num_classes 0): pooled features, not logits to modulate
        return self.out_modulator(x.float())


def _attention_with(**defaults: Any) -> type:
    """A MultiMaxAttention subclass with our kwargs bound: timm's Block wants a class, not a partial."""

    class BoundMultiMaxAttention(MultiMaxAttention):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**defaults, **kwargs})

    return BoundMultiMaxAttention


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_FMNIST = dict(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, mean=(0.2860,), std=(0.3530,))

# Architectures: DeiT sizes (Touvron et al., 2021) and a micro size for 28x28 CPU demos.
_ARCHS: Dict[str, Dict[str, Any]] = {
    "deit_tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_micro": dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4),
}
_VARIANTS = {"multimax": dict(attn_normalizer="multimax", out_normalizer="multimax"),
             "gap": dict(attn_normalizer="softmax", out_normalizer="softmax")}

default_cfgs = generate_default_cfgs({
    f"{arch}_{variant}_patch{_ARCHS[arch]['patch_size']}_{28 if arch == 'vit_micro' else 224}": (
        _cfg(**_FMNIST) if arch == "vit_micro" else _cfg()
    )
    for arch in _ARCHS
    for variant in _VARIANTS
})


def _create(variant: str, arch: str, kind: str, pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    # No weights are hosted under these names: pretrained=True loads what the caller points at
    # (an exported folder via "local-dir:" / "hf-hub:", or pretrained_cfg_overlay=dict(file=...)),
    # else timm says that no pretrained weights exist.
    args = {**_ARCHS[arch], **_VARIANTS[kind], **kwargs}
    out_indices = args.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's ViT
    return build_model_with_cfg(MultiMaxVisionTransformer, variant, pretrained=pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


@register_model
def deit_tiny_multimax_patch16_224(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """DeiT-Ti (192 wide, 3 heads) with MultiMax attention and output, GAP, no qkv bias."""
    return _create("deit_tiny_multimax_patch16_224", "deit_tiny", "multimax", pretrained, **kwargs)


@register_model
def deit_small_multimax_patch16_224(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """DeiT-S (384 wide, 6 heads) with MultiMax attention and output, GAP, no qkv bias."""
    return _create("deit_small_multimax_patch16_224", "deit_small", "multimax", pretrained, **kwargs)


@register_model
def deit_base_multimax_patch16_224(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """DeiT-B (768 wide, 12 heads) with MultiMax attention and output, GAP, no qkv bias."""
    return _create("deit_base_multimax_patch16_224", "deit_base", "multimax", pretrained, **kwargs)


@register_model
def deit_tiny_gap_patch16_224(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """The paper's softmax baseline at DeiT-Ti size: GAP, no class token, no qkv bias."""
    return _create("deit_tiny_gap_patch16_224", "deit_tiny", "gap", pretrained, **kwargs)


@register_model
def deit_small_gap_patch16_224(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """The paper's softmax baseline at DeiT-S size: GAP, no class token, no qkv bias."""
    return _create("deit_small_gap_patch16_224", "deit_small", "gap", pretrained, **kwargs)


@register_model
def deit_base_gap_patch16_224(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """The paper's softmax baseline at DeiT-B size: GAP, no class token, no qkv bias."""
    return _create("deit_base_gap_patch16_224", "deit_base", "gap", pretrained, **kwargs)


@register_model
def vit_micro_multimax_patch7_28(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """A 4-block, 64-wide MultiMax ViT for 28x28 single-channel images (the CPU quickstart)."""
    return _create("vit_micro_multimax_patch7_28", "vit_micro", "multimax", pretrained, **kwargs)


@register_model
def vit_micro_gap_patch7_28(pretrained: bool = False, **kwargs: Any) -> MultiMaxVisionTransformer:
    """The softmax GAP counterpart of ``vit_micro_multimax_patch7_28``."""
    return _create("vit_micro_gap_patch7_28", "vit_micro", "gap", pretrained, **kwargs)

