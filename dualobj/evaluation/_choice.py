"""Scoring completions and multiple-choice questions in AR, prefix-LM and MD (pseudo-log-likelihood) modes,
and the small zero-shot probe built from held-out files."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dualobj._errors import (
    check_bool,
    check_choice,
    check_int,
    check_tensor,
    describe,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.data import ByteTokenizer, Corpus
from dualobj.evaluation._likelihood import head_weight, resolve_head

MODES = ("ar", "prefix", "md")
"""``"ar"``: causal over everything; ``"prefix"``: bidirectional over the context, causal over the completion;
``"md"``: pseudo-log-likelihood, each completion token masked alone with bidirectional attention."""


def _as_ids(x: bytes | str | torch.Tensor | Sequence[int], tok: ByteTokenizer, name: str) -> list[int]:
    if isinstance(x, (bytes, str)):
        return tok.encode(x).tolist()
    if isinstance(x, torch.Tensor):
        check_tensor(name, x, integer=True)
        if x.ndim > 1:
            raise fail(name, "a 1-D id tensor", describe(x))
        return x.reshape(-1).tolist()
    if isinstance(x, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        return list(x)
    raise fail_type(name, "bytes, str, a 1-D integer id tensor or a list of int ids", describe(x))


def _sequence(name: str, x: object) -> Sequence:
    """A list or tuple of items (a bare str, bytes or tensor would be read one character or row at a time)."""
    if isinstance(x, (str, bytes, torch.Tensor)) or not isinstance(x, Sequence):
        raise fail_type(name, "a list or tuple (one item per pair)", describe(x))
    return x


def _check_model(model: object) -> None:
    if not callable(model):
        raise fail_type("model", "a callable model (an nn.Module)", describe(model))


@torch.no_grad()
def completion_logprobs(
    model: nn.Module,
    contexts: Sequence[bytes | str | torch.Tensor | Sequence[int]],
    completions: Sequence[bytes | str | torch.Tensor | Sequence[int]],
    *,
    mode: str = "ar",
    tokenizer: ByteTokenizer | None = None,
    mask_id: int | None = None,
    head: nn.Linear | torch.Tensor | None = None,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each completion given its context: ``log p(c | x)`` summed over the completion tokens.

    Each pair is scored as ``BOS context completion`` (next-token read-out: position ``i`` predicts ``i + 1``),
    right-padded into one batch; padding gets its own document id so no real position attends to it.

    Args:
        model: called as ``model(input_ids, causal=, doc_ids=, prefix_lengths=)``.
        contexts: ``N`` contexts (bytes or str are byte-tokenized; id lists are used as they are).
        completions: ``N`` non-empty completions.
        mode: one of :data:`MODES`.
        tokenizer: the byte tokenizer (its BOS, pad and mask ids are used).
        mask_id: the ``<mask>`` id for ``"md"`` (default ``tokenizer.mask_id``).
        head: the output layer (default ``model.lm_head``).
        batch_size: rows per forward pass (``"md"`` uses one row per completion token).

    Returns:
        ``(logprob [N] float32, length [N] int64)``: summed log-probabilities (nats) and completion lengths.
    """
    _check_model(model)
    _sequence("contexts", contexts)
    _sequence("completions", completions)
    check_choice("mode", mode, MODES)
    batch_size = check_int("batch_size", batch_size, low=1)
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        raise fail_type("tokenizer", "a ByteTokenizer or None", describe(tokenizer))
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    mask_id = tok.mask_id if mask_id is None else check_int("mask_id", mask_id, low=0)
    if len(contexts) != len(completions):
        raise fail("completions", f"one per context ({len(contexts)})", f"{len(completions)}")
    ctx = [[tok.bos_id, *_as_ids(c, tok, f"contexts[{i}]")] for i, c in enumerate(contexts)]
    comp = [_as_ids(c, tok, f"completions[{i}]") for i, c in enumerate(completions)]
    for i, c in enumerate(comp):
        if not c:
            raise fail(f"completions[{i}]", "a non-empty completion", "an empty one")
    weight, bias = head_weight(resolve_head(model, head))
    device = weight.device
    V = weight.shape[0]
    if mask_id >= V:
        raise fail("mask_id", f"an id < the head's vocabulary size {V}", mask_id)
    if validation_enabled():
        for name, seqs in (("contexts", ctx), ("completions", comp)):
            for i, ids in enumerate(seqs):
                if any(not 0 <= y < V for y in ids):
                    raise fail(f"{name}[{i}]", f"ids in [0, {V}) (the head's vocabulary)",
                               f"ids in [{min(ids)}, {max(ids)}]")
                if mode == "md" and mask_id in ids:
                    raise fail(f"{name}[{i}]", f"ids without mask_id={mask_id} in mode 'md'", "the mask id")
    # One row per pair (ar/prefix) or per completion token (md): its ids, the position read, the target id.
    rows, prefix, read, target, owner = [], [], [], [], []
    for n, (x, c) in enumerate(zip(ctx, comp)):
        seq = x + c
        if mode == "md":
            for j in range(len(c)):
                pos = len(x) + j
                rows.append([*seq[:pos], mask_id, *seq[pos + 1:]])
                prefix.append(0)
                read.append([pos - 1])
                target.append([c[j]])
                owner.append(n)
        else:
            rows.append(seq)
            prefix.append(len(x))
            read.append(list(range(len(x) - 1, len(seq) - 1)))
            target.append(c)
            owner.append(n)
    total = torch.zeros(len(comp), dtype=torch.float32)
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        B, L = len(part), max(len(r) for r in part)
        ids = torch.full((B, L), tok.pad_id, dtype=torch.long)
        docs = torch.ones((B, L), dtype=torch.long)
        for b, r in enumerate(part):
            ids[b, :len(r)] = torch.tensor(r)
            docs[b, :len(r)] = 0
        kwargs: dict = {"doc_ids": docs.to(device)}
        if mode == "md":
            kwargs["causal"] = torch.zeros(B, dtype=torch.bool)
        else:
            kwargs["causal"] = torch.ones(B, dtype=torch.bool)
            if mode == "prefix":
                kwargs["prefix_lengths"] = torch.tensor(prefix[s:s + B], device=device)
        hidden = model(ids.to(device), **kwargs)
        bi = torch.cat([torch.full((len(r),), b) for b, r in enumerate(read[s:s + B])])
        pi = torch.tensor([p for r in read[s:s + B] for p in r])
        yi = torch.tensor([y for r in target[s:s + B] for y in r], device=device)
        logits = nn.functional.linear(hidden[bi.to(device), pi.to(device)], weight, bias).float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, yi[:, None]).squeeze(1).cpu()
        who = torch.repeat_interleave(torch.tensor(owner[s:s + B]), torch.tensor([len(r) for r in read[s:s + B]]))
        total.index_add_(0, who, lp)
    return total, torch.tensor([len(c) for c in comp])


@dataclass(frozen=True)
class Question:
    """A multiple-choice question: the ``options`` are completions of ``context``; ``answer`` indexes the right one.

    Checked on construction: bytes or str context, at least one non-empty option, ``0 <= answer < len(options)``.
    """

    context: bytes
    options: tuple[bytes, ...]
    answer: int

    def __post_init__(self) -> None:
        if not isinstance(self.context, (bytes, str)):
            raise fail_type("context", "bytes or str", describe(self.context))
        if isinstance(self.options, (bytes, str)) or not isinstance(self.options, (tuple, list)):
            raise fail_type("options", "a tuple of bytes or str options", describe(self.options))
        if not self.options:
            raise fail("options", "at least one option", "none")
        for i, option in enumerate(self.options):
            if not isinstance(option, (bytes, str)):
                raise fail_type(f"options[{i}]", "bytes or str", describe(option))
            if not option:
                raise fail(f"options[{i}]", "a non-empty option", repr(option))
        object.__setattr__(self, "options", tuple(self.options))
        check_int("answer", self.answer, low=0, high=len(self.options) - 1)


def score_choices(
    model: nn.Module,
    questions: Sequence[Question],
    *,
    mode: str = "ar",
    normalize: bool = True,
    tokenizer: ByteTokenizer | None = None,
    head: nn.Linear | torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Score every option of every question: ``[N, C]`` log-probabilities (per token when ``normalize``).

    The prediction is the arg-max option (see :func:`choice_accuracy`). ``normalize=True`` divides by the option
    length so longer options are not penalised (options of one question may differ in length).

    Args:
        model: the model (see :func:`completion_logprobs`).
        questions: ``N`` questions with the same number ``C`` of options.
        mode: one of :data:`MODES`.
        normalize: mean log-probability per token (True) or the sum (False).
        tokenizer, head, batch_size: as for :func:`completion_logprobs`.
    """
    _sequence("questions", questions)
    if not questions:
        raise fail("questions", "at least one Question", "none")
    for i, q in enumerate(questions):
        if not isinstance(q, Question):
            raise fail_type(f"questions[{i}]", "a Question", describe(q))
    check_bool("normalize", normalize)
    C = len(questions[0].options)
    if C < 1:
        raise fail("questions", "at least one option per question", "none")
    if any(len(q.options) != C for q in questions):
        raise fail("questions", f"the same number of options in every question ({C})", "a mix")
    contexts = [q.context for q in questions for _ in q.options]
    options = [o for q in questions for o in q.options]
    lp, n = completion_logprobs(model, contexts, options, mode=mode, tokenizer=tokenizer, head=head,
                                batch_size=batch_size)
    if normalize:
        lp = lp / n
    return lp.view(len(questions), C)


def choice_accuracy(scores: torch.Tensor, questions: Sequence[Question]) -> float:
    """Share of questions whose highest-scoring option is the answer (``scores``: ``[N, C]``)."""
    _sequence("questions", questions)
    for i, q in enumerate(questions):
        if not isinstance(q, Question):
            raise fail_type(f"questions[{i}]", "a Question", describe(q))
    N = len(questions)
    if N == 0:
        raise fail("questions", "at least one Question", "none")
    check_tensor("scores", scores, ndim=2, floating=True)
    if scores.shape[0] != N:
        raise fail("scores", f"one row per question, shape [{N}, C]", describe(scores))
    for i, q in enumerate(questions):
        check_int(f"questions[{i}].answer", q.answer, low=0, high=scores.shape[1] - 1)
    answers = torch.tensor([q.answer for q in questions], device=scores.device)
    return float((scores.argmax(dim=1) == answers).float().mean())


def next_line_probe(
    corpus: Corpus,
    *,
    questions: int = 64,
    options: int = 4,
    context_bytes: int = 64,
    min_line: int = 8,
    max_line: int = 32,
    seed: int = 0,
) -> list[Question]:
    """A zero-shot probe from held-out text: which line comes next?

    Each question takes the ``context_bytes`` bytes before a line of a held-out document; the options are that
    line (with its newline) and ``options − 1`` distractor lines drawn from other documents (different from the
    true line). Lines are chosen with ``min_line <= len(line.strip()) <= max_line``. Chance is ``1/options``.

    Args:
        corpus: held-out documents (at least two, so distractors come from other files).
        questions: how many questions (>= 1).
        options: options per question (>= 2).
        context_bytes: bytes of context before the line (>= 1).
        min_line: shortest line, in bytes without surrounding whitespace (>= 1).
        max_line: longest line (>= ``min_line``).
        seed: fixes the questions, the distractors and the answer positions.

    Returns:
        ``questions`` :class:`Question` records (fewer if the corpus has fewer usable lines).
    """
    if not isinstance(corpus, Corpus):
        raise fail_type("corpus", "a dualobj.data.Corpus", describe(corpus))
    check_int("questions", questions, low=1)
    check_int("options", options, low=2)
    check_int("context_bytes", context_bytes, low=1)
    check_int("min_line", min_line, low=1)
    check_int("max_line", max_line)
    if max_line < min_line:
        raise fail("max_line", f"an int >= min_line={min_line}", repr(max_line))
    check_int("seed", seed)
    rng = random.Random(seed)
    pool: list[tuple[int, int, bytes]] = []  # (document index, line start, line)
    for d, doc in enumerate(corpus.documents):
        start = 0
        for line in doc.text.splitlines(keepends=True):
            if start >= context_bytes and min_line <= len(line.strip()) <= max_line and line.endswith(b"\n"):
                pool.append((d, start, line))
            start += len(line)
    if len({d for d, _, _ in pool}) < 2:
        raise fail("corpus", "held-out text with usable lines in at least two documents",
                   f"{len(pool)} usable lines")
    rng.shuffle(pool)
    out = []
    for d, start, line in pool[:questions]:
        distractors: list[bytes] = []
        for _ in range(1000 * options):
            if len(distractors) == options - 1:
                break
            d2, _, other = pool[rng.randrange(len(pool))]
            if d2 != d and other != line and other not in distractors:
                distractors.append(other)
        if len(distractors) < options - 1:
            raise fail("corpus", f"{options - 1} distinct distractor lines from other documents",
                       f"{len(distractors)}")
        answer = rng.randrange(options)
        opts = [*distractors[:answer], line, *distractors[answer:]]
        context = corpus.documents[d].text[start - context_bytes:start]
        out.append(Question(context, tuple(opts), answer))
    return out
