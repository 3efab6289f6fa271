"""The values the model's knobs take, free of torch: ``engine.config`` checks a config against
them without importing the ``models`` package (whose ``__init__`` imports torch and timm)."""

NORMALIZERS = ("softmax", "multimax", "sparsemax", "entmax15", "evsoftmax")  # attention normalizers
OUT_NORMALIZERS = ("softmax", "multimax")                                     # output layer
MODULATOR_INITS = ("trunc_normal", "zeros")
ATTN_BACKENDS = ("auto", "sdpa", "explicit", "flex", "chunked")

__all__ = ["NORMALIZERS", "OUT_NORMALIZERS", "MODULATOR_INITS", "ATTN_BACKENDS"]
