"""A held-out set that is real: near-duplicate file families kept on one side, separate validation and test
splits, evaluation rows sampled across all files, and the verbatim overlap between test and training text."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dualobj._errors import check_int, check_probability, describe, fail
from dualobj.data._corpus import Corpus, Document, heldout_score
from dualobj.data._packing import Packed
from dualobj.data._tokenizer import ByteTokenizer

WINDOW = 32
"""Width in bytes of the windows that define verbatim overlap and near-duplicate files."""

_PRIME = 1099511628211  # FNV-64 prime; arithmetic wraps modulo 2**64 (int64 two's complement)


def window_hashes(ids: torch.Tensor, width: int = WINDOW) -> torch.Tensor:
    """A 64-bit polynomial hash of every ``width``-long window of the last dimension of ``ids``.

    Equal windows give equal hashes; distinct windows collide with probability about ``2**-64`` per pair.

    Args:
        ids: ``[..., T]`` integer tensor (bytes or token ids).
        width: window length.

    Returns:
        ``[..., max(T − width + 1, 0)]`` int64 hashes; entry ``i`` covers ``ids[..., i:i + width]``.
    """
    width = check_int("width", width, low=1)
    x = ids.long()
    T = x.shape[-1]
    n = max(T - width + 1, 0)
    if n == 0:
        return torch.zeros((*x.shape[:-1], 0), dtype=torch.long)
    # Doubling: H(i, 2w) = H(i, w)·P^w + H(i + w, w); the width is composed from its binary digits, left to right.
    block, size = x, 1  # hashes of every window of length `size`
    out, done = torch.zeros((*x.shape[:-1], n), dtype=torch.long), 0
    while True:
        if width & size:
            out = out * _signed(pow(_PRIME, size, 2**64)) + block[..., done:done + n]
            done += size
        if size * 2 > width:
            return out
        m = block.shape[-1] - size
        block = block[..., :m] * _signed(pow(_PRIME, size, 2**64)) + block[..., size:size + m]
        size *= 2


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


def _text_ids(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long() if text else torch.zeros(0, dtype=torch.long)


def _document_windows(documents: Sequence[Document], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashes of every window inside one document, and the index of that document (one pass over all bytes)."""
    if not documents:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    ids = _text_ids(b"".join(d.text for d in documents))
    owner = torch.repeat_interleave(torch.arange(len(documents)), torch.tensor([len(d.text) for d in documents]))
    h = window_hashes(ids, width)
    keep = owner[: h.numel()] == owner[width - 1:]
    return h[keep], owner[: h.numel()][keep]


def text_window_hashes(documents: Sequence[Document], width: int = WINDOW) -> torch.Tensor:
    """The distinct window hashes of the documents' bytes (windows never cross documents), sorted."""
    return torch.unique(_document_windows(documents, check_int("width", width, low=1))[0])


def row_window_hashes(rows: Packed, *, num_special: int = 4, width: int = WINDOW) -> torch.Tensor:
    """The hashes of every window of packed rows that lies inside one row and one document and holds no special
    id (so it is ``width`` bytes of one file's text), flattened. Token ids are shifted back to bytes."""
    tokens, docs = rows.tokens.long(), rows.doc_ids.long()
    if tokens.shape[-1] < width:
        return torch.zeros(0, dtype=torch.long)
    h = window_hashes(tokens - num_special, width)
    special = (tokens < num_special).long()
    csum = torch.nn.functional.pad(torch.cumsum(special, dim=-1), (1, 0))
    no_special = (csum[:, width:] - csum[:, :-width]) == 0
    one_doc = docs[:, : h.shape[-1]] == docs[:, width - 1:]
    return h[no_special & one_doc]


def window_overlap(test: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of the ``test`` window hashes (with repeats) that occur in ``reference``; 0 when ``test`` is empty.

    Args:
        test: window hashes of the evaluation text (:func:`row_window_hashes`).
        reference: window hashes of the training text (:func:`text_window_hashes` or :func:`row_window_hashes`).
    """
    if test.numel() == 0:
        return 0.0
    return torch.isin(test, reference).double().mean().item()


def near_duplicate_families(
    documents: Sequence[Document],
    *,
    min_shared: float = 0.3,
    sample_bits: int = 6,
    max_fanout: int = 20,
    width: int = WINDOW,
) -> list[tuple[str, ...]]:
    """Group documents that share much verbatim text (e.g. the code-page tables ``encodings/cp*.py``).

    Each document is fingerprinted by the ``width``-byte windows whose hash falls in a fixed ``2**-sample_bits``
    share of hash space (content-defined, so a window shared by two files is sampled in both). Two documents are
    near-duplicates when the fingerprints they share are at least ``min_shared`` of the smaller one's; families
    are the connected groups of that relation. Windows found in more than ``max_fanout`` documents (licence text,
    common boilerplate) are not counted as shared.

    Args:
        documents: the documents (distinct names).
        min_shared: share of the smaller fingerprint, in (0, 1].
        sample_bits: fingerprint density ``2**-sample_bits``.
        max_fanout: windows in more documents than this are boilerplate.
        width: window length in bytes.

    Returns:
        Families as tuples of names (sorted), sorted by their first name; every document is in exactly one.
    """
    frac = check_probability("min_shared", min_shared, low_open=True)
    bits = check_int("sample_bits", sample_bits, low=0, high=32)
    fanout = check_int("max_fanout", max_fanout, low=2)
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        raise fail("documents", "documents with distinct names", f"{len(names) - len(set(names))} repeated names")
    h, owner = _document_windows(documents, check_int("width", width, low=1))
    if bits:
        keep = (h >> (64 - bits)) == 0
        h, owner = h[keep], owner[keep]
    pairs = torch.unique(torch.stack([owner, h]), dim=1) if h.numel() else torch.zeros(2, 0, dtype=torch.long)
    prints: list[list[int]] = [[] for _ in documents]
    for i, x in zip(pairs[0].tolist(), pairs[1].tolist()):
        prints[i].append(x)
    where: dict[int, list[int]] = defaultdict(list)
    for i, fp in enumerate(prints):
        for x in fp:
            where[x].append(i)
    shared: dict[tuple[int, int], int] = defaultdict(int)
    for docs in where.values():
        if 1 < len(docs) <= fanout:
            for a in range(len(docs)):
                for b in range(a + 1, len(docs)):
                    shared[(docs[a], docs[b])] += 1
    parent = list(range(len(documents)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), k in shared.items():
        smaller = min(len(prints[a]), len(prints[b]))
        if smaller and k >= frac * smaller:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[str]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[root(i)].append(name)
    return sorted((tuple(sorted(g)) for g in groups.values()), key=lambda g: g[0])


def cut_documents(corpus: Corpus, pieces: int) -> Corpus:
    """Cut every document into about ``pieces · len(doc) / total`` pieces at line breaks (at least one each).

    Used when a corpus has too few files to split by file: each piece is named ``"<name>#<k>"`` and the split
    then works on pieces. Concatenating a document's pieces in order (``k = 0, 1, ...``) gives it back; every piece
    but a document's last ends at a line break unless no line break falls inside its span.

    Args:
        corpus: the documents.
        pieces: the wanted number of pieces over the whole corpus (>= 1).
    """
    want = check_int("pieces", pieces, low=1)
    size = max(1, -(-corpus.num_bytes // want))
    out = []
    for doc in corpus.documents:
        text, k, start = doc.text, 0, 0
        while start < len(text):
            end = min(len(text), start + size)
            if end < len(text):
                nl = text.rfind(b"\n", start, end)
                end = nl + 1 if nl >= start else end
            out.append(Document(f"{doc.name}#{k}", text[start:end]))
            start, k = end, k + 1
    return Corpus(tuple(sorted(out, key=lambda d: d.name)), corpus.source)


def source_name(name: str) -> str:
    """The file a document or piece comes from (``"a.txt#3"`` → ``"a.txt"``)."""
    return name.split("#", 1)[0]


@dataclass(frozen=True)
class HeldoutSplit:
    """Train, validation and test documents, with whole near-duplicate families on one side.

    Attributes:
        train, validation, test: the three sides (disjoint; together the input corpus, or its pieces).
        families: the number of families (units of the split).
        pieces: whether documents were cut into pieces because there were too few of them.
    """

    train: Corpus
    validation: Corpus
    test: Corpus
    families: int
    pieces: bool


def split_heldout(
    corpus: Corpus,
    *,
    test_fraction: float = 0.05,
    validation_fraction: float = 0.05,
    min_test_bytes: int = 0,
    min_validation_bytes: int = 0,
    min_units: int = 64,
) -> HeldoutSplit:
    """Split into train, validation and test by near-duplicate family, deterministically.

    A family's score is :func:`heldout_score` of its first name. Families are taken in score order: into test while
    the score is below ``test_fraction`` or the test side is under ``min_test_bytes``, then into validation while the
    score is below ``test_fraction + validation_fraction`` or validation is under ``min_validation_bytes``; the rest
    is train. With enough text, the sides depend on the names alone (stable on every machine). A corpus of fewer
    than ``min_units`` documents is first cut into pieces (:func:`cut_documents`), so one file or a small folder
    can still be split; pieces of one file may then sit on different sides.

    Args:
        corpus: the documents.
        test_fraction, validation_fraction: expected shares of families; their sum < 1.
        min_test_bytes, min_validation_bytes: the least text each evaluation side must hold.
        min_units: cut documents into about ``2 · min_units`` pieces when there are fewer than this.

    Raises:
        DualObjError: a side would be empty, or the corpus is too small for the minimum sizes.
    """
    if not isinstance(corpus, Corpus) or not corpus.documents:
        raise fail("corpus", "a non-empty Corpus", describe(corpus))
    tf = check_probability("test_fraction", test_fraction, low_open=True, high_open=True)
    vf = check_probability("validation_fraction", validation_fraction, low_open=True, high_open=True)
    if tf + vf >= 1:
        raise fail("validation_fraction", f"test_fraction + validation_fraction < 1 (test_fraction={tf})", vf)
    min_test = check_int("min_test_bytes", min_test_bytes, low=0)
    min_val = check_int("min_validation_bytes", min_validation_bytes, low=0)
    units = check_int("min_units", min_units, low=1)
    pieces = len(corpus.documents) < units
    if pieces:
        corpus = cut_documents(corpus, 2 * units)
    by_name = {d.name: d for d in corpus.documents}
    families = near_duplicate_families(corpus.documents)
    families.sort(key=lambda f: (heldout_score(f[0]), f[0]))
    sides: dict[str, list[Document]] = {"test": [], "validation": [], "train": []}
    sizes = {"test": 0, "validation": 0}
    for fam in families:
        score = heldout_score(fam[0])
        if score < tf or sizes["test"] < min_test:
            side = "test"
        elif score < tf + vf or sizes["validation"] < min_val:
            side = "validation"
        else:
            side = "train"
        docs = [by_name[n] for n in fam]
        sides[side].extend(docs)
        if side != "train":
            sizes[side] += sum(len(d.text) for d in docs)
    for side, low in (("test", min_test), ("validation", min_val)):
        if not sides[side] or sizes[side] < low:
            raise fail("data", f"enough text for a {side} split of at least {max(low, 1):,} bytes besides training "
                       "text", f"{corpus.num_bytes:,} bytes in all ({sizes[side]:,} for {side})")
    if not sides["train"]:
        raise fail("data", "text left for training after the validation and test splits",
                   f"{corpus.num_bytes:,} bytes, all held out")
    out = {k: Corpus(tuple(sorted(v, key=lambda d: d.name)), corpus.source) for k, v in sides.items()}
    return HeldoutSplit(out["train"], out["validation"], out["test"], len(families), pieces)


@dataclass(frozen=True)
class EvalRows:
    """Evaluation rows sampled across files.

    Attributes:
        rows: ``[N, L]`` rows, each ``L`` consecutive tokens of one document's stream ``BOS text``.
        sources: the document name of each row.
    """

    rows: Packed
    sources: tuple[str, ...]

    def file_shares(self, n: int | None = None) -> dict[str, float]:
        """The share of the first ``n`` rows (default all) taken from each source file (pieces merged)."""
        names = [source_name(s) for s in self.sources[: n if n is not None else len(self.sources)]]
        counts: dict[str, int] = defaultdict(int)
        for s in names:
            counts[s] += 1
        return {k: v / len(names) for k, v in counts.items()}

    def max_file_share(self, n: int | None = None) -> float:
        """The largest of :meth:`file_shares` (0 when there are no rows)."""
        shares = self.file_shares(n)
        return max(shares.values()) if shares else 0.0


def evaluation_rows(
    corpus: Corpus, seq_len: int, max_tokens: int, *, seed: int = 0, tokenizer: ByteTokenizer | None = None
) -> EvalRows:
    """Rows of held-out text drawn round-robin across documents, so no file dominates.

    Each document's stream ``BOS text`` is cut into whole rows of ``seq_len`` tokens (a shorter rest is dropped,
    so documents shorter than a row give none). Documents are visited in a seeded hash order; round ``r`` takes one
    not-yet-used row of every document that has more than ``r`` rows (which of its rows is fixed by a seeded
    permutation, so rows come from anywhere in a file, not only its start). Every prefix of the result is balanced
    the same way: among the first ``n`` rows, a document gives at most one row more than any other document that
    still has unused rows (with ``F`` documents of at least ``⌈n / F⌉`` rows each, none gives more than
    ``⌈n / F⌉``).

    Args:
        corpus: held-out documents.
        seq_len: row length ``L`` (>= 2).
        max_tokens: take ``⌊max_tokens / L⌋`` rows (fewer if the documents hold fewer).
        seed: fixes the document order and the rows drawn.
        tokenizer: the byte tokenizer (default :class:`ByteTokenizer`).

    Raises:
        DualObjError: no document holds a whole row.
    """
    L = check_int("seq_len", seq_len, low=2)
    want = check_int("max_tokens", max_tokens, low=L) // L
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    docs = sorted(corpus.documents, key=lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).digest())
    chunks: list[list[int]] = []
    for d in docs:
        n = (len(d.text) + 1) // L
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{d.name}".encode()).digest()[:7],
                                                         "big"))
        chunks.append(torch.randperm(n, generator=g).tolist())
    if not any(chunks):
        raise fail("corpus", f"held-out documents holding at least one row of seq_len={L} tokens",
                   f"{len(docs)} documents, the longest {max((len(d.text) for d in docs), default=0)} bytes")
    picks: list[tuple[int, int]] = []
    r = 0
    while len(picks) < want and any(len(c) > r for c in chunks):
        for i, c in enumerate(chunks):
            if len(c) > r and len(picks) < want:
                picks.append((i, c[r]))
        r += 1
    tokens = torch.empty((len(picks), L), dtype=torch.long)
    streams: dict[int, torch.Tensor] = {}
    for k, (i, c) in enumerate(picks):
        if i not in streams:
            streams[i] = torch.cat([torch.tensor([tok.bos_id]), tok.encode(docs[i].text)])
        tokens[k] = streams[i][c * L:(c + 1) * L]
    doc_ids = torch.tensor([i for i, _ in picks], dtype=torch.long)[:, None].expand(-1, L).clone()
    return EvalRows(Packed(tokens, doc_ids), tuple(docs[i].name for i, _ in picks))
