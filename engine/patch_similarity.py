"""Over-smoothing: how alike the patch tokens become with depth, as the mean pairwise cosine
similarity of the patch tokens after each transformer block.

For one image and one block, with h_1..h_N the N patch tokens (class, distillation and register
tokens left out) and u_i = h_i / ||h_i||:

    sim = 1/(N(N−1)) Σ_{i≠j} cos(h_i, h_j) = (||Σ_i u_i||² − Σ_i ||u_i||²) / (N(N−1))

the signed cosine over ordered pairs of distinct tokens: 1 when all tokens point one way, near 0
for unrelated directions (a zero token counts as 0 with every other). ``PatchSimilarity``
averages it over images, per block, in float64 sums that add up across DDP ranks.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.recording import TokenRecord, transformer_blocks


def patch_similarity(tokens: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """Mean pairwise cosine similarity of each image's patch tokens: (B, N, C) → (B,) float64,
    the first ``prefix_tokens`` left out; NaN for an image with fewer than two patch tokens."""
    u = F.normalize(tokens[:, prefix_tokens:].float(), dim=-1)
    n = u.shape[1]
    if n < 2:
        return torch.full(u.shape[:1], math.nan, dtype=torch.float64, device=u.device)
    summed = u.sum(1, dtype=torch.float64)
    pairs = summed.square().sum(-1) - u.square().sum((1, 2), dtype=torch.float64)
    return pairs / (n * (n - 1))


class PatchSimilarity:
    """Running per-block sums of ``patch_similarity`` over images. Built from the model, so every
    DDP rank holds the same blocks in the same order (a rank that saw no batch too); ``reduce(sum_fn)``
    with a function that all-reduces a tensor (SUM) adds the ranks up."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [name for name, _ in transformer_blocks(model)]
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no transformer blocks (model.blocks)")
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.sums = torch.zeros(len(self.blocks), 2, dtype=torch.float64)  # Σ similarity, images

    def update(self, record: TokenRecord) -> None:
        """Add one batch: ``record.tokens[block]`` is a list of (B, N, C)."""
        for i, name in enumerate(self.blocks):
            for tokens in record.tokens.get(name, []):
                sim = patch_similarity(tokens, record.prefix_tokens)
                self.sums[i] += torch.tensor([sim.sum().item(), sim.numel()], dtype=torch.float64)

    def reduce(self, sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum across processes: ``sum_fn`` takes the (blocks, 2) sums and returns them summed."""
        self.sums = sum_fn(self.sums).detach().to("cpu", torch.float64)

    def summary(self) -> Dict[str, Any]:
        """JSON-ready: the mean similarity per block (None where no image was seen), the images."""
        def mean(total: float, count: float) -> Optional[float]:
            return total / count if count and math.isfinite(total) else None

        return {
            "layers": {name: mean(*row) for name, row in zip(self.blocks, self.sums.tolist())},
            "images": int(self.sums[0, 1]),
            "prefix_tokens": self.prefix_tokens,
            "definition": "mean cosine similarity over ordered pairs of distinct patch tokens after each block",
        }


__all__ = ["patch_similarity", "PatchSimilarity"]
