"""Document packing into fixed-length rows with document ids, and the repeated-subset training stream."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dualobj._errors import check_int, check_tensor, describe, fail
from dualobj.data._corpus import Corpus, Document
from dualobj.data._tokenizer import ByteTokenizer


@dataclass(frozen=True)
class Packed:
    """Documents packed back to back into rows of equal length.

    Attributes:
        tokens: ``[N, L]`` int64 ids; every document starts with the tokenizer's BOS id.
        doc_ids: ``[N, L]`` int64; equal ids mark one document (a document cut at a row end continues in the next
            row under the same id). Attention and targets never cross a change of id.
    """

    tokens: torch.Tensor
    doc_ids: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("tokens", self.tokens, ndim=2, integer=True)
        check_tensor("doc_ids", self.doc_ids, shape=tuple(self.tokens.shape), integer=True)

    @property
    def num_tokens(self) -> int:
        """``N · L``."""
        return self.tokens.numel()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: torch.Tensor | slice) -> Packed:
        """The rows at ``index`` (a slice or a ``[n]`` index tensor)."""
        return Packed(self.tokens[index], self.doc_ids[index])


def shuffled(documents: Sequence[Document], seed: int) -> list[Document]:
    """The documents in an order fixed by ``seed`` and their names only (hash order), whatever the input order."""
    check_int("seed", seed)

    def key(doc: Document) -> bytes:
        return hashlib.sha256(f"{seed}:{doc.name}".encode()).digest()

    return sorted(documents, key=key)


def pack(
    corpus: Corpus | Sequence[Document],
    seq_len: int,
    *,
    tokenizer: ByteTokenizer | None = None,
    max_tokens: int | None = None,
    seed: int | None = 0,
) -> Packed:
    """Pack documents into ``[N, seq_len]`` rows: ``BOS doc₀ BOS doc₁ ...``, cut every ``seq_len`` tokens.

    Args:
        corpus: the documents.
        seq_len: row length ``L`` (>= 2).
        tokenizer: the byte tokenizer (default :class:`ByteTokenizer`).
        max_tokens: stop after this many tokens (rounded up to whole rows); ``None``: all documents.
        seed: documents are taken in the hash order of :func:`shuffled` with this seed, so a prefix of the
            stream is a sample of files rather than the alphabetically first ones; ``None`` keeps the corpus order.

    Returns:
        :class:`Packed` with ``N = ⌊stream / L⌋`` rows (the last partial row is dropped).

    Raises:
        DualObjError: the documents hold fewer than ``seq_len`` tokens.
    """
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    check_int("seq_len", seq_len, low=2)
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, low=seq_len)
    docs = list(corpus.documents if isinstance(corpus, Corpus) else corpus)
    if seed is not None:
        docs = shuffled(docs, seed)
    want = None if max_tokens is None else -(-max_tokens // seq_len) * seq_len
    chosen, total = [], 0
    for doc in docs:
        chosen.append(doc.text)
        total += len(doc.text) + 1
        if want is not None and total >= want:
            break
    if total < seq_len:
        raise fail("corpus", f"at least seq_len={seq_len} tokens to pack", f"{total} tokens")
    lengths = torch.tensor([len(t) + 1 for t in chosen])
    # One buffer of all bytes with a zero byte where each BOS goes, then shift bytes past the special ids.
    buf = bytearray(b"".join(b"\x00" + t for t in chosen))
    ids = torch.frombuffer(buf, dtype=torch.uint8).long() + tok.num_special
    starts = torch.cumsum(lengths, 0) - lengths
    ids[starts] = tok.bos_id
    doc = torch.repeat_interleave(torch.arange(len(chosen)), lengths)
    n_rows = ids.numel() // seq_len
    if want is not None:
        n_rows = min(n_rows, want // seq_len)
    end = n_rows * seq_len
    return Packed(ids[:end].view(n_rows, seq_len).clone(), doc[:end].view(n_rows, seq_len).clone())


@dataclass(frozen=True)
class RepeatedSubset:
    """A fixed token budget spent on a unique subset repeated ``repetitions`` times (the paper's set-up).

    Attributes:
        unique: the unique rows (about ``budget / repetitions`` tokens).
        repetitions: how many times each unique row is seen (``R``).
    """

    unique: Packed
    repetitions: int

    @property
    def num_tokens(self) -> int:
        """Training tokens: ``unique.num_tokens · repetitions``."""
        return self.unique.num_tokens * self.repetitions

    def steps(self, batch_size: int) -> int:
        """Optimizer steps for one pass over the budget at ``batch_size`` rows per step."""
        return (len(self.unique) * self.repetitions) // batch_size

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None) -> Iterator[Packed]:
        """Yield :meth:`steps` batches of ``[batch_size, L]`` rows: ``R`` epochs, each a fresh permutation of the
        unique rows, read back to back (a batch may straddle two epochs)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise fail("batch_size", "an int >= 1", describe(batch_size))
        n = len(self.unique)
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(self.repetitions)])
        for s in range(self.steps(batch_size)):
            yield self.unique.rows(order[s * batch_size:(s + 1) * batch_size])


def repetition_subset(
    stream: Packed, budget_tokens: int, repetitions: int, *, seed: int | None = 0
) -> RepeatedSubset:
    """``budget_tokens / repetitions`` tokens of ``stream`` (whole rows), to be repeated ``R`` times.

    The rows are the first ones of a fixed random permutation of ``stream`` (``seed``), so even a small subset
    samples many documents rather than the start of one, and subsets for different ``R`` are nested (a larger
    ``R`` takes a prefix of a smaller one's rows): the grid compares repetition, not different text.

    Args:
        stream: packed training rows, at least ``budget_tokens / repetitions`` tokens.
        budget_tokens: total training tokens ``D``.
        repetitions: ``R >= 1``.
        seed: the permutation's seed; ``None`` takes the first rows of ``stream`` in order.

    Raises:
        DualObjError: ``R`` or the budget is not a positive int, or the stream is too short for ``D / R``.
    """
    if not isinstance(stream, Packed):
        raise fail("stream", "a Packed", describe(stream))
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
        raise fail("repetitions", "an int >= 1", describe(repetitions))
    L = stream.tokens.shape[1]
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < L * repetitions:
        raise fail("budget_tokens", f"an int >= seq_len · repetitions = {L * repetitions}", describe(budget_tokens))
    rows = round(budget_tokens / repetitions / L)
    if rows > len(stream):
        raise fail("stream", f"at least budget/R = {rows * L} tokens of training text",
                   f"{stream.num_tokens} tokens")
    if seed is None:
        return RepeatedSubset(stream.rows(slice(0, rows)), repetitions)
    order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(seed))
    return RepeatedSubset(stream.rows(order[:rows]), repetitions)
