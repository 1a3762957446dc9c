"""Training text: the embedded default corpus (the standard library's own source), a byte tokenizer, document
packing with document ids, and repeated subsets at a fixed token budget."""

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
from dualobj.data._packing import Packed, RepeatedSubset, pack, repetition_subset, shuffled
from dualobj.data._tokenizer import ByteTokenizer

__all__ = [
    "SKIPPED_DIRS",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "Packed",
    "RepeatedSubset",
    "heldout_score",
    "load_corpus",
    "pack",
    "repetition_subset",
    "shuffled",
    "split_corpus",
    "stdlib_corpus",
    "stdlib_root",
]
