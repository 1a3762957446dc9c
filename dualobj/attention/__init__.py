"""Causal, bidirectional, per-row mixed and document-packed attention over xformers, SDPA, Flex and math.

- :func:`attention`: ``q, k, v [B, T, H, D] -> [B, T, H, D]`` with ``causal`` a bool or a bool ``[B]``, optional
  ``doc_ids [B, T]`` and ``prefix_lengths [B]``; every backend gives the same numbers.
- :func:`available_backends`: which backends really run on a device, and why the others do not.
- :class:`SelfAttention`: the ``nn.Module`` (qkv projection, RoPE, attention, output projection).
- :class:`AttentionSpec`: the validated layout and its boolean mask (for models that take a 4D mask).
"""

from dualobj.attention._api import BackendStatus, attention, available_backends
from dualobj.attention._backends import BACKENDS, Backend
from dualobj.attention._module import SelfAttention
from dualobj.attention._rope import apply_rope, rope_frequencies
from dualobj.attention._spec import AttentionSpec, document_positions, document_segments

__all__ = [
    "BACKENDS",
    "AttentionSpec",
    "Backend",
    "BackendStatus",
    "SelfAttention",
    "apply_rope",
    "attention",
    "available_backends",
    "document_positions",
    "document_segments",
    "rope_frequencies",
]
