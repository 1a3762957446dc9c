"""Causal, bidirectional, per-row mixed and document-packed attention over xformers, SDPA, Flex and math.

- :func:`attention`: ``q, k, v [B, T, H, D] -> [B, T, H, D]`` with ``causal`` a bool or a bool ``[B]``, optional
  ``doc_ids [B, T]`` and ``prefix_lengths [B]``; every backend gives the same numbers.
- :func:`available_backends`: which backends really run on a device, and why the others do not.
- :class:`SelfAttention`: the ``nn.Module`` (qkv projection, RoPE, attention, output projection).
- :class:`AttentionLayout`: the layout a batch carries (``batch.layout``) and a model hands to attention unchanged:
  causal rows, documents, prefixes, block-diffusion blocks, position ids.
- :func:`block_diffusion_mask`: the ``[2L, 2L]`` mask of block-diffusion training over ``[x_t ; x_0]``.
- :class:`AttentionSpec`: the validated layout and its boolean mask (for models that take a 4D mask).
"""

from dualobj.attention._api import BackendStatus, attention, available_backends
from dualobj.attention._backends import BACKENDS, Backend
from dualobj.attention._module import SelfAttention
from dualobj.attention._rope import apply_rope, rope_frequencies
from dualobj.attention._spec import (
    AttentionLayout,
    AttentionSpec,
    block_diffusion_mask,
    document_positions,
    document_segments,
)

__all__ = [
    "BACKENDS",
    "AttentionLayout",
    "AttentionSpec",
    "Backend",
    "BackendStatus",
    "SelfAttention",
    "apply_rope",
    "attention",
    "available_backends",
    "block_diffusion_mask",
    "document_positions",
    "document_segments",
    "rope_frequencies",
]
