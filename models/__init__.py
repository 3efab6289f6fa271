"""MultiMax models. Importing this package registers the models with timm."""
from .attention import AttentionRecord, MultiMaxAttention, record_attention
from .multimax import (
    NORMALIZERS, SegLU, build_normalizer, entmax15, evsoftmax, modulators, multimax, seglu,
    softmax, sparsemax,
)
from .vision_transformer import MultiMaxVisionTransformer
from .weights import CheckpointMismatchError, LoadResult, infer_model_kwargs, load_weights, read_checkpoint

__all__ = [
    "AttentionRecord", "MultiMaxAttention", "record_attention", "NORMALIZERS", "SegLU",
    "build_normalizer", "entmax15", "evsoftmax", "modulators", "multimax", "seglu", "softmax",
    "sparsemax", "MultiMaxVisionTransformer", "CheckpointMismatchError", "LoadResult",
    "infer_model_kwargs", "load_weights", "read_checkpoint",
]
