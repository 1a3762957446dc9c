"""Training text: the embedded default corpus (the standard library's own source), a byte tokenizer, document
packing with document ids, repeated subsets at a fixed token budget, and a held-out set split by near-duplicate
family into validation and test, with rows sampled across files."""

from dualobj.data._corpus import (
    SKIPPED_DIRS,
    Corpus,
    Document,
    heldout_score,
    load_corpus,
    split_corpus,
    stdlib_corpus,
    stdlib_root,
)
from dualobj.data._heldout import (
    WINDOW,
    EvalRows,
    HeldoutSplit,
    cut_documents,
    evaluation_rows,
    near_duplicate_families,
    row_window_hashes,
    source_name,
    split_heldout,
    text_window_hashes,
    window_hashes,
    window_overlap,
)
from dualobj.data._packing import Packed, RepeatedSubset, pack, repetition_subset, shuffled
from dualobj.data._tokenizer import ByteTokenizer

__all__ = [
    "SKIPPED_DIRS",
    "WINDOW",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "EvalRows",
    "HeldoutSplit",
    "Packed",
    "RepeatedSubset",
    "cut_documents",
    "evaluation_rows",
    "heldout_score",
    "load_corpus",
    "near_duplicate_families",
    "pack",
    "repetition_subset",
    "row_window_hashes",
    "shuffled",
    "source_name",
    "split_corpus",
    "split_heldout",
    "stdlib_corpus",
    "stdlib_root",
    "text_window_hashes",
    "window_hashes",
    "window_overlap",
]
