"""Attention probabilities on request, for timm's ``Attention`` (ViT, DeiT) and ours alike.

    with record_attention(model, scores=True) as rec:
        model(images)
    rec.probs["blocks.0.attn"][0]    # (B, heads, N, N), one entry per forward
    rec.scores["blocks.0.attn"][0]   # the normalizer's input q·kᵀ/√d, same shape

Both attention classes share the explicit path's layout: ``q_norm(q)`` and ``k_norm(k)``, the
scaled scores (q·scale)·kᵀ, the normalizer, then ``attn_drop(probs)``. While recording, each
layer's ``fused_attn`` is switched off (so SDPA / flex / fused kernels step aside and the
probabilities exist) and forward hooks read q and k from ``q_norm``/``k_norm`` and the
probabilities from ``attn_drop``'s input; the scores are recomputed from q and k with the
layer's own ops. Outside the block nothing is kept and the layers run as before.

The tokens after each transformer block, likewise on request (a forward hook on each block):

    with record_block_outputs(model) as rec:
        model(images)
    rec.tokens["blocks.0"][0]        # (B, N, C); the first rec.prefix_tokens are class/distillation tokens
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention

from .attention import MultiMaxAttention

RECORDABLE = (TimmAttention, MultiMaxAttention)


@dataclass
class AttentionRecord:
    """What ``record_attention`` collected: per attention layer (module name), a list with one
    entry per forward of probabilities (B, H, N, N) and, if asked, the pre-normalizer scaled
    scores (B, H, N, N)."""

    probs: Dict[str, List[torch.Tensor]] = field(default_factory=dict)
    scores: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``record_attention`` records: timm's ``Attention`` and
    ``MultiMaxAttention`` (subclasses included), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RECORDABLE)]


@contextlib.contextmanager
def record_attention(model: nn.Module, scores: bool = False) -> Iterator[AttentionRecord]:
    """Collect the attention probabilities (and with ``scores`` the scaled scores) of every
    attention layer of ``model`` (see ``attention_layers``) for the forwards inside the block.

    Raises ValueError if the model has no such layer (other timm attention variants, e.g. with
    rotary embeddings between ``q_norm`` and the scores, are not recorded)."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer to record (timm's Attention or "
                         "MultiMaxAttention)")
    record = AttentionRecord()
    handles, fused = [], []
    try:
        for name, layer in layers:
            fused.append((layer, layer.fused_attn))
            layer.fused_attn = False
            handles += _hooks(name, layer, record, scores)
        yield record
    finally:
        for handle in handles:
            handle.remove()
        for layer, was in fused:
            layer.fused_attn = was


def _hooks(name: str, layer: nn.Module, record: AttentionRecord, scores: bool) -> list:
    """Forward hooks on one layer: q and k as ``q_norm``/``k_norm`` return them, the
    probabilities as ``attn_drop`` receives them."""
    qk: Dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module, args, out):
            qk[key] = out
        return hook

    def on_probs(module, args):
        probs = args[0]
        record.probs.setdefault(name, []).append(probs.detach())
        if scores:  # the layer's own ops: (q * scale) @ kᵀ
            with torch.no_grad():
                x = (qk["q"] * layer.scale) @ qk["k"].transpose(-2, -1)
            record.scores.setdefault(name, []).append(x.detach())
        qk.clear()

    return [layer.q_norm.register_forward_hook(keep("q")), layer.k_norm.register_forward_hook(keep("k")),
            layer.attn_drop.register_forward_pre_hook(on_probs)]


@dataclass
class TokenRecord:
    """What ``record_block_outputs`` collected: per transformer block (module name), a list with one
    entry per forward of its output tokens (B, N, C), of which the first ``prefix_tokens`` are class,
    distillation or register tokens (timm's ``num_prefix_tokens``; 0 for our GAP models)."""

    prefix_tokens: int = 0
    tokens: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


def transformer_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs ``record_block_outputs`` records: the items of ``model.blocks``
    (timm's ViT/DeiT and ours), in order; empty for a model without them."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return []
    return [(f"blocks.{i}", block) for i, block in enumerate(blocks)]


@contextlib.contextmanager
def record_block_outputs(model: nn.Module) -> Iterator[TokenRecord]:
    """Collect the output tokens of every transformer block of ``model`` (``transformer_blocks``),
    detached, for the forwards inside the block. Raises ValueError if the model has no blocks."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to record (model.blocks)")
    record = TokenRecord(int(getattr(model, "num_prefix_tokens", 0)))

    def keep(name: str):
        def hook(module, args, out):
            record.tokens.setdefault(name, []).append(out.detach())
        return hook

    handles = [block.register_forward_hook(keep(name)) for name, block in blocks]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["AttentionRecord", "RECORDABLE", "attention_layers", "record_attention", "TokenRecord",
           "transformer_blocks", "record_block_outputs"]
