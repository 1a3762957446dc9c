"""Corpus loading and splitting, the byte tokenizer, packing and repeated subsets, against brute-force loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualobj import DualObjError
from dualobj.data import (
    ByteTokenizer,
    Corpus,
    Document,
    Packed,
    heldout_score,
    load_corpus,
    pack,
    repetition_subset,
    shuffled,
    split_corpus,
    stdlib_corpus,
)


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


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
