"""A small reference transformer (RMSNorm, rotary embeddings, SwiGLU) built on :mod:`dualobj.attention`."""

from dualobj.models._transformer import Block, SwiGLU, Transformer, TransformerConfig

__all__ = [
    "Block",
    "SwiGLU",
    "Transformer",
    "TransformerConfig",
]
