"""A byte-level tokenizer with a few special ids in front of the 256 byte values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dualobj._errors import check_tensor, describe, fail, fail_type


@dataclass(frozen=True)
class ByteTokenizer:
    """Bytes as tokens: id ``b + num_special`` for byte ``b``; the first ids are special.

    Ids ``0..3`` are ``pad``, ``bos``, ``eos`` and ``mask``; more reserved ids can be added with ``num_special``
    (the paper's tokenizer reserves 16). Every byte string round-trips, so held-out NLL per token is NLL per byte.

    Attributes:
        num_special: how many ids come before the bytes (at least 4).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi").tolist(), tok.vocab_size
        ([108, 109], 260)
        >>> tok.decode(tok.encode("hi"))
        'hi'
    """

    num_special: int = 4
    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2
    mask_id: ClassVar[int] = 3

    def __post_init__(self) -> None:
        if isinstance(self.num_special, bool) or not isinstance(self.num_special, int) or self.num_special < 4:
            raise fail("num_special", "an int >= 4 (pad, bos, eos, mask)", describe(self.num_special))

    @property
    def vocab_size(self) -> int:
        """``num_special + 256``."""
        return self.num_special + 256

    def encode(self, text: str | bytes) -> torch.Tensor:
        """``[N]`` int64 ids of the UTF-8 bytes of ``text`` (no BOS/EOS added)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise fail_type("text", "str or bytes", describe(text))
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).long() + self.num_special if text else (
            torch.empty(0, dtype=torch.long))

    def decode(self, ids: torch.Tensor, *, errors: str = "replace") -> str:
        """Text of the byte ids in ``ids`` (any shape, flattened); special ids are dropped."""
        check_tensor("ids", ids, integer=True)
        flat = ids.reshape(-1).cpu()
        flat = flat[(flat >= self.num_special) & (flat < self.vocab_size)] - self.num_special
        return bytes(flat.to(torch.uint8).tolist()).decode("utf-8", errors=errors)
