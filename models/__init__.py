"""MultiMax models. Importing this package registers the models with timm."""
from . import choices
from .attention import MultiMaxAttention
from .multimax import (
    NORMALIZERS, ModulatorParams, SegLU, build_normalizer, entmax15, evsoftmax, modulator_params, modulators,
    modulators_from_state_dict, multimax, seglu, softmax, sparsemax,
)
from .recording import (
    AttentionRecord, TokenRecord, attention_layers, record_attention, record_block_outputs, transformer_blocks,
)
from .vision_transformer import MultiMaxVisionTransformer
from .weights import CheckpointMismatchError, LoadResult, infer_model_kwargs, load_weights

__all__ = [
    "choices", "AttentionRecord", "MultiMaxAttention", "attention_layers", "record_attention", "TokenRecord",
    "record_block_outputs", "transformer_blocks", "NORMALIZERS", "SegLU",
    "build_normalizer", "entmax15", "evsoftmax", "ModulatorParams", "modulator_params", "modulators",
    "modulators_from_state_dict", "multimax", "seglu", "softmax",
    "sparsemax", "MultiMaxVisionTransformer", "CheckpointMismatchError", "LoadResult",
    "infer_model_kwargs", "load_weights",
]
