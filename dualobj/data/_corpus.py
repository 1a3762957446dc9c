"""Text corpora as documents of bytes: the embedded default (the standard library's source) or the user's files."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dualobj._errors import check_probability, describe, fail

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Folders of the standard library left out of the default corpus (installed packages and test suites)."""


@dataclass(frozen=True)
class Document:
    """One text file.

    Attributes:
        name: its path relative to the corpus root, with ``/`` separators (the key of the train/held-out split).
        text: its raw bytes.
    """

    name: str
    text: bytes


@dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order (sorted by name), with where they came from.

    Attributes:
        documents: the non-empty documents, sorted by ``name``.
        source: a description of the origin (``"python-stdlib"`` or the path given).
    """

    documents: tuple[Document, ...]
    source: str

    @property
    def num_bytes(self) -> int:
        """Total size in bytes."""
        return sum(len(d.text) for d in self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (``sysconfig``'s ``stdlib``, else ``os.__file__``'s)."""
    root = Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))
    return root if root.is_dir() else Path(os.path.dirname(os.__file__))


def stdlib_corpus() -> Corpus:
    """The embedded default corpus: every ``.py`` file of the standard library, read as bytes (no download).

    Test suites and installed packages (:data:`SKIPPED_DIRS`) are left out: about 13 MB on CPython 3.11.
    """
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        text = path.read_bytes()
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise fail("corpus", f"Python source files under the standard library folder {root}", "none")
    return Corpus(tuple(docs), "python-stdlib")


def _looks_binary(text: bytes) -> bool:
    return b"\x00" in text[:8192]


def _read(file: Path, given: object) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise fail("data", "readable text files",
                   f"{str(file)!r} ({err.strerror or err}) under {str(given)!r}") from err


def load_corpus(path: str | os.PathLike | None = None) -> Corpus:
    """Load the user's text files, or the default corpus when ``path`` is ``None``.

    Args:
        path: a text file (one document), or a folder whose regular, non-hidden, non-binary files (searched
            recursively) are the documents; ``None`` for :func:`stdlib_corpus`.

    Returns:
        A :class:`Corpus`; document names are relative to the folder (the file's own name for a file).

    Raises:
        DualObjError: the path does not exist; a file cannot be read; the file is empty (or only whitespace) or
            binary; the folder holds no non-empty text file.
    """
    if path is None:
        return stdlib_corpus()
    if not isinstance(path, (str, os.PathLike)):
        raise fail("data", "a path to a text file or a folder", describe(path))
    p = Path(path).expanduser()
    if not p.exists():
        raise fail("data", "an existing text file or folder", f"{str(path)!r}, which does not exist")
    if p.is_file():
        text = _read(p, path)
        if not text.strip():
            raise fail("data", "a non-empty text file", f"{str(path)!r}, which is empty")
        if _looks_binary(text):
            raise fail("data", "a text file", f"{str(path)!r}, which looks binary (it contains NUL bytes)")
        return Corpus((Document(p.name, text),), str(path))
    if not p.is_dir():
        raise fail("data", "a regular text file or a folder", f"{str(path)!r}")
    docs = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        text = _read(f, path)
        if text.strip() and not _looks_binary(text):
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise fail("data", "a folder holding at least one non-empty text file", f"{str(path)!r}, which holds none")
    return Corpus(tuple(docs), str(path))


def heldout_score(name: str) -> float:
    """A number in [0, 1) fixed by the document name alone (SHA-256), which decides its side of the split."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_corpus(corpus: Corpus, heldout_fraction: float = 0.1) -> tuple[Corpus, Corpus]:
    """Split into (train, held-out) by file, deterministically: a document is held out when its name's hash
    score (:func:`heldout_score`) is below ``heldout_fraction``.

    The split depends only on the names, so it is the same on every machine and does not move when files are
    added or removed elsewhere. When the hash leaves one side empty (a corpus of one or a few files), the last
    ``heldout_fraction`` of the bytes of the largest document (cut at a line break) is held out instead.

    Args:
        corpus: the documents.
        heldout_fraction: the expected share of documents held out, in (0, 1).

    Returns:
        ``(train, heldout)``, both non-empty.
    """
    frac = check_probability("heldout_fraction", heldout_fraction, low_open=True, high_open=True)
    if not isinstance(corpus, Corpus) or not corpus.documents:
        raise fail("corpus", "a non-empty Corpus", describe(corpus))
    held = tuple(d for d in corpus.documents if heldout_score(d.name) < frac)
    train = tuple(d for d in corpus.documents if heldout_score(d.name) >= frac)
    if held and train:
        return Corpus(train, corpus.source), Corpus(held, corpus.source)
    big = max(corpus.documents, key=lambda d: len(d.text))
    cut = int(len(big.text) * (1.0 - frac))
    line = big.text.rfind(b"\n", 0, cut)
    cut = line + 1 if line > 0 else cut
    head, tail = big.text[:cut], big.text[cut:]
    if not head.strip() or not tail.strip():
        raise fail("corpus", "enough text to hold some out (at least two non-empty lines)",
                   f"{corpus.num_bytes} bytes")
    rest = tuple(d for d in corpus.documents if d is not big)
    train_docs = tuple(sorted((*rest, Document(big.name, head)), key=lambda d: d.name))
    return Corpus(train_docs, corpus.source), Corpus((Document(big.name + "#heldout", tail),), corpus.source)
