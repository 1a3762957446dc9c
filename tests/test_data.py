"""Corpus loading and splitting, the byte tokenizer, packing and repeated subsets, against brute-force loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj import DualObjError
from dualobj.data import (
    WINDOW,
    ByteTokenizer,
    Corpus,
    Document,
    Packed,
    cut_documents,
    evaluation_rows,
    heldout_score,
    load_corpus,
    near_duplicate_families,
    pack,
    repetition_subset,
    row_window_hashes,
    shuffled,
    source_name,
    split_corpus,
    split_heldout,
    stdlib_corpus,
    text_window_hashes,
    window_hashes,
    window_overlap,
)


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


@pytest.fixture(scope="module")
def stdlib_families(stdlib):
    return near_duplicate_families(stdlib.documents)


@given(st.binary(max_size=64), st.text(max_size=32))
@settings(max_examples=50, deadline=None)
def test_tokenizer_round_trip_and_range(data, text):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert ids.tolist() == [b + 4 for b in data]
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_specials_and_errors():
    tok = ByteTokenizer(num_special=16)
    assert tok.vocab_size == 272 and tok.encode("A").tolist() == [65 + 16]
    assert tok.decode(torch.tensor([tok.bos_id, 65 + 16, tok.mask_id])) == "A"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    with pytest.raises(DualObjError, match="num_special"):
        ByteTokenizer(num_special=2)
    with pytest.raises(DualObjError, match="text"):
        tok.encode(12)


def test_stdlib_corpus_is_the_standard_library(stdlib):
    names = [d.name for d in stdlib.documents]
    assert names == sorted(names)
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) or "/tests/" in n for n in names)
    assert 5e6 < stdlib.num_bytes < 5e7
    assert all(d.text.strip() for d in stdlib.documents)


def test_split_is_deterministic_and_by_name_only(stdlib):
    train, held = split_corpus(stdlib)
    _, held2 = split_corpus(Corpus(tuple(reversed(stdlib.documents)), "reversed"))
    assert {d.name for d in held} == {d.name for d in held2}
    assert {d.name for d in train} | {d.name for d in held} == {d.name for d in stdlib.documents}
    assert not {d.name for d in train} & {d.name for d in held}
    assert 0.05 < len(held) / len(stdlib) < 0.15
    # Removing other files never moves a file across the split.
    sub = Corpus(stdlib.documents[::3], "sub")
    _, held_sub = split_corpus(sub)
    assert {d.name for d in held_sub} == {d.name for d in held} & {d.name for d in sub.documents}
    assert all((heldout_score(d.name) < 0.1) for d in held)


def test_split_of_a_single_file_holds_out_its_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    train, held = split_corpus(load_corpus(f))
    assert len(train) == 1 and len(held) == 1
    assert train.documents[0].text + held.documents[0].text == f.read_bytes()
    assert held.documents[0].text.startswith(b"line ") and train.documents[0].text.endswith(b"\n")


def test_load_user_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden").write_text("secret\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    corpus = load_corpus(tmp_path)
    assert [(d.name, d.text) for d in corpus.documents] == [("a.txt", b"alpha\n"), ("sub/b.md", b"beta\n")]
    assert corpus.source == str(tmp_path)


def test_bad_paths_and_empty_files(tmp_path):
    with pytest.raises(DualObjError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DualObjError, match="empty"):
        load_corpus(empty)
    (tmp_path / "blank.txt").write_text("\n\n  ")
    with pytest.raises(DualObjError, match="empty"):
        load_corpus(tmp_path / "blank.txt")
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"ab\x00cd")
    with pytest.raises(DualObjError, match="binary"):
        load_corpus(binary)
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "e.txt").write_text("")
    with pytest.raises(DualObjError, match="holds none"):
        load_corpus(folder)
    with pytest.raises(DualObjError, match="data"):
        load_corpus(3)
    locked = tmp_path / "locked.txt"
    locked.write_text("text\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(locked), "read_bytes", refuse)
        with pytest.raises(DualObjError, match=r"readable text files.*Permission denied"):
            load_corpus(locked)
        with pytest.raises(DualObjError, match="readable text files"):
            load_corpus(tmp_path)


def brute_pack(texts: list[bytes], L: int) -> tuple[list[list[int]], list[list[int]]]:
    ids, docs = [], []
    for d, t in enumerate(texts):
        ids.append(1)
        docs.append(d)
        for b in t:
            ids.append(b + 4)
            docs.append(d)
    n = len(ids) // L
    return [ids[i * L:(i + 1) * L] for i in range(n)], [docs[i * L:(i + 1) * L] for i in range(n)]


@given(st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=8), st.integers(2, 9))
@settings(max_examples=60, deadline=None)
def test_pack_matches_a_loop(texts, L):
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
    total = sum(len(t) + 1 for t in texts)
    if total < L:
        with pytest.raises(DualObjError, match="seq_len"):
            pack(docs, L, seed=None)
        return
    packed = pack(docs, L, seed=None)
    want_ids, want_docs = brute_pack(texts, L)
    assert packed.tokens.tolist() == want_ids
    assert packed.doc_ids.tolist() == want_docs


def test_pack_order_and_limit():
    docs = [Document(f"f{i}.py", bytes([65 + i]) * 30) for i in range(10)]
    a = pack(docs, 8, seed=7)
    b = pack(list(reversed(docs)), 8, seed=7)
    assert torch.equal(a.tokens, b.tokens)  # hash order, whatever the input order
    assert [d.name for d in shuffled(docs, 7)] != [d.name for d in docs]
    small = pack(docs, 8, seed=7, max_tokens=50)
    assert small.tokens.shape == (7, 8)
    assert torch.equal(small.tokens, a.tokens[:7])  # a prefix of the full stream
    with pytest.raises(DualObjError, match="seq_len"):
        pack(docs, 1)
    with pytest.raises(DualObjError, match="max_tokens"):
        pack(docs, 8, max_tokens=4)


def test_repetition_subset_budget_and_epochs():
    stream = Packed(torch.arange(96 * 16).view(96, 16), torch.zeros(96, 16, dtype=torch.long))  # distinct rows
    budget = 16 * 4 * 24
    first = repetition_subset(stream, budget, 1)
    assert torch.equal(repetition_subset(stream, budget, 1, seed=None).unique.tokens, stream.tokens[:96])
    assert not torch.equal(first.unique.tokens, stream.tokens[:96])  # a sample of rows, not the first ones
    for R in (1, 2, 4, 8):
        sub = repetition_subset(stream, budget, R)
        assert sub.unique.num_tokens == budget // R and sub.num_tokens == budget
        assert torch.equal(sub.unique.tokens, first.unique.tokens[: budget // R // 16])  # nested prefixes
        g = torch.Generator().manual_seed(0)
        batches = list(sub.batches(4, generator=g))
        assert len(batches) == sub.steps(4) == budget // (16 * 4)
        seen = torch.cat([b.tokens for b in batches])
        # Every unique row is seen exactly R times.
        counts = {}
        for row in seen.tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        assert set(counts) == {tuple(r) for r in sub.unique.tokens.tolist()}
        assert set(counts.values()) == {R}


def test_repetition_subset_errors():
    stream = pack([Document("a", b"x" * 200)], 10)
    with pytest.raises(DualObjError, match="repetitions"):
        repetition_subset(stream, 100, 0)
    with pytest.raises(DualObjError, match="budget_tokens"):
        repetition_subset(stream, 15, 2)
    with pytest.raises(DualObjError, match="at least"):
        repetition_subset(stream, 10_000, 1)
    with pytest.raises(DualObjError, match="batch_size"):
        next(repetition_subset(stream, 100, 2).batches(0))


# ---------------------------------------------------------------------------------------------------------------
# The held-out set: window hashes, near-duplicate families, the three-way split, rows sampled across files.

P64 = 1099511628211


def brute_hash(window: list[int]) -> int:
    h = 0
    for x in window:
        h = (h * P64 + x) % 2**64
    return h - 2**64 if h >= 2**63 else h


@given(st.lists(st.integers(0, 300), max_size=40), st.integers(1, 40))
@settings(max_examples=60, deadline=None)
def test_window_hashes_equal_the_polynomial_mod_2_64(values, width):
    got = window_hashes(torch.tensor(values, dtype=torch.long), width).tolist()
    want = [brute_hash(values[i:i + width]) for i in range(len(values) - width + 1)]
    assert got == want


def brute_windows(text: bytes, w: int = WINDOW) -> list[bytes]:
    return [text[i:i + w] for i in range(len(text) - w + 1)]


@given(st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=4),
       st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=4), st.binary(min_size=32, max_size=50))
@settings(max_examples=40, deadline=None)
def test_window_overlap_equals_a_set_of_byte_windows(test_texts, train_texts, shared):
    # Plant a shared passage so that overlaps are neither always 0 nor always 1.
    test_texts = [*test_texts, b"x" + shared + b"y"]
    train_texts = [*train_texts, shared]
    train_docs = [Document(f"t{i}", t) for i, t in enumerate(train_texts)]
    # Test rows: each test text is one row of one document, padded with BOS ids (specials) to a common length.
    L = max(len(t) for t in test_texts) + 1
    tokens = torch.full((len(test_texts), L), 1, dtype=torch.long)
    for r, t in enumerate(test_texts):
        tokens[r, 1:1 + len(t)] = torch.tensor(list(t), dtype=torch.long) + 4
    rows = Packed(tokens, torch.arange(len(test_texts))[:, None].expand(-1, L).clone())
    reference = {w for t in train_texts for w in brute_windows(t)}
    test_windows = [w for t in test_texts for w in brute_windows(t)]
    want = sum(w in reference for w in test_windows) / len(test_windows)
    got = window_overlap(row_window_hashes(rows), text_window_hashes(train_docs))
    assert got == pytest.approx(want, abs=1e-12)
    assert row_window_hashes(rows).numel() == len(test_windows)


def test_row_windows_stop_at_documents_and_specials():
    ids = torch.tensor([[1, *range(10, 50)], [*range(60, 80), 1, *range(80, 100)]])
    docs = torch.tensor([[0] * 41, [0] * 20 + [1] * 21])
    h = row_window_hashes(Packed(ids, docs), width=8)
    # Row 0: 40 byte ids after BOS: 33 windows. Row 1: 20 + 20 ids around a BOS and a document change: 13 + 13.
    assert h.numel() == 33 + 13 + 13
    assert window_overlap(torch.zeros(0, dtype=torch.long), h) == 0.0


def brute_families(docs, min_shared):
    sets = [set(brute_windows(d.text)) for d in docs]
    parent = list(range(len(docs)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a in range(len(docs)):
        for b in range(a + 1, len(docs)):
            small = min(len(sets[a]), len(sets[b]))
            if small and len(sets[a] & sets[b]) >= min_shared * small:
                parent[root(b)] = root(a)
    groups = {}
    for i, d in enumerate(docs):
        groups.setdefault(root(i), []).append(d.name)
    return sorted((tuple(sorted(g)) for g in groups.values()), key=lambda g: g[0])


@given(st.lists(st.binary(min_size=40, max_size=120), min_size=1, max_size=4), st.data())
@settings(max_examples=30, deadline=None)
def test_near_duplicate_families_are_the_components_of_the_shared_window_relation(bases, data):
    docs = []
    for i, base in enumerate(bases):
        docs.append(Document(f"b{i}", base))
        for k in range(data.draw(st.integers(0, 2))):  # variants: one edited byte, a prefix or a suffix kept
            cut = data.draw(st.integers(0, len(base) - 1))
            variant = base[:cut] + bytes([(base[cut] + 1) % 256]) + base[cut + 1:] if k == 0 else base[cut:] + b"z"
            docs.append(Document(f"b{i}v{k}", variant))
    min_shared = data.draw(st.sampled_from([0.3, 0.6, 1.0]))
    got = near_duplicate_families(docs, min_shared=min_shared, sample_bits=0, max_fanout=len(docs) + 1)
    assert got == brute_families(docs, min_shared)


def test_stdlib_code_page_tables_form_one_family(stdlib, stdlib_families):
    families = stdlib_families
    assert sorted(n for f in families for n in f) == sorted(d.name for d in stdlib.documents)
    of = {n: f for f in families for n in f}
    assert "encodings/cp850.py" in of["encodings/cp858.py"] and "encodings/cp437.py" in of["encodings/cp858.py"]
    assert of["os.py"] == ("os.py",) or len(of["os.py"]) < 5


@given(st.lists(st.text(alphabet="ab \n", min_size=1, max_size=60), min_size=1, max_size=5), st.integers(1, 30))
@settings(max_examples=50, deadline=None)
def test_cut_documents_gives_the_documents_back(texts, pieces):
    corpus = Corpus(tuple(Document(f"d{i}.txt", t.encode()) for i, t in enumerate(texts)), "x")
    cut = cut_documents(corpus, pieces)
    size = -(-corpus.num_bytes // pieces)
    for doc in corpus.documents:
        mine = sorted((d for d in cut.documents if source_name(d.name) == doc.name),
                      key=lambda d: int(d.name.rsplit("#", 1)[1]))
        assert b"".join(d.text for d in mine) == doc.text
        for piece in mine[:-1]:
            assert 0 < len(piece.text) <= size
            assert piece.text.endswith(b"\n") or (len(piece.text) == size and b"\n" not in piece.text)


def test_split_heldout_keeps_families_together_and_is_deterministic(stdlib, stdlib_families):
    split = split_heldout(stdlib)
    sides = {"train": split.train, "validation": split.validation, "test": split.test}
    names = {k: {d.name for d in v} for k, v in sides.items()}
    assert sorted(n for v in names.values() for n in v) == sorted(d.name for d in stdlib.documents)
    for family in stdlib_families:
        assert sum(bool(set(family) & v) for v in names.values()) == 1, family
    assert 0.02 < len(split.test) / len(stdlib) < 0.1 and 0.02 < len(split.validation) / len(stdlib) < 0.1
    again = split_heldout(Corpus(tuple(reversed(stdlib.documents)), "reversed"))
    assert {d.name for d in again.test} == names["test"] and {d.name for d in again.validation} == names["validation"]
    assert not split.pieces and split.families < len(stdlib)


def test_split_heldout_cuts_one_file_and_meets_the_minimum_sizes(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i} of a long single text file, with some words\n" for i in range(6000)))
    corpus = load_corpus(f)
    split = split_heldout(corpus, min_test_bytes=40_000, min_validation_bytes=20_000)
    assert split.pieces and split.test.num_bytes >= 40_000 and split.validation.num_bytes >= 20_000
    assert split.train.num_bytes + split.validation.num_bytes + split.test.num_bytes == corpus.num_bytes
    with pytest.raises(DualObjError, match="test split"):
        split_heldout(corpus, min_test_bytes=10**7)
    with pytest.raises(DualObjError, match="validation_fraction"):
        split_heldout(corpus, test_fraction=0.6, validation_fraction=0.5)


@given(st.lists(st.integers(0, 200), min_size=1, max_size=8), st.integers(2, 12), st.integers(1, 60),
       st.integers(0, 3))
@settings(max_examples=50, deadline=None)
def test_evaluation_rows_are_slices_of_files_balanced_across_files(lengths, L, rows, seed):
    docs = [Document(f"f{i}", bytes((7 * i + j) % 251 for j in range(n))) for i, n in enumerate(lengths)]
    chunks = {d.name: (len(d.text) + 1) // L for d in docs}
    if not any(chunks.values()):
        with pytest.raises(DualObjError, match="seq_len"):
            evaluation_rows(Corpus(tuple(docs), "x"), L, L * rows, seed=seed)
        return
    ev = evaluation_rows(Corpus(tuple(docs), "x"), L, L * rows, seed=seed)
    assert len(ev.rows) == min(rows, sum(chunks.values()))
    by_name = {d.name: d for d in docs}
    seen = set()
    for r, name in enumerate(ev.sources):
        stream = [1, *(b + 4 for b in by_name[name].text)]
        row = ev.rows.tokens[r].tolist()
        starts = [k for k in range(0, len(stream) - L + 1, L) if stream[k:k + L] == row]
        assert starts, "every row is one whole-row slice of its file"
        seen.add((name, row[0], tuple(row)))
    assert len(seen) == len(ev.sources)  # no row twice
    # Every prefix is balanced: a file gives two more rows than another only once that one has run out.
    for n in range(1, len(ev.sources) + 1):
        counts = {k: 0 for k in chunks if chunks[k]}
        for s in ev.sources[:n]:
            counts[s] += 1
        for a in counts:
            for b in counts:
                assert counts[a] <= counts[b] + 1 or counts[b] == chunks[b]
        assert ev.max_file_share(n) == max(counts.values()) / n


def test_quick_preset_heldout_set_is_spread_and_clean():
    from dualobj.experiments import PRESETS, cell_data, check_data

    config = PRESETS["quick"]
    stats = check_data(config)
    assert stats["max_file_share"] <= 0.10 and stats["max_file_share_elbo"] <= 0.10
    assert stats["max_file_share_validation"] <= 0.10
    assert stats["test_tokens"] == config.heldout_tokens and stats["probe_questions"] >= 278
    data = cell_data(config)
    test_names = {d.name for d in data.split.test} | {d.name for d in data.split.validation}
    assert "encodings/cp858.py" not in test_names or "encodings/cp850.py" in test_names
    # The quick grid's R = 32 training subset shares almost no 32-byte window with the test text.
    subset = repetition_subset(data.train, config.budget, 32)
    assert window_overlap(data.test_hashes, row_window_hashes(subset.unique)) < 0.03
    assert 0 < stats["test_window_overlap_train"] < 0.3
