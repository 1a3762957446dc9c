"""The miniature replication: one small transformer per (α or objective, R, seed) cell, trained at a fixed token
budget on a subset repeated R times, then evaluated on held-out test text in AR, MD and prefix-LM mode and on a
zero-shot probe, with early stopping chosen on a separate validation split."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dualobj._errors import DualObjError, check_number, check_probability, describe, fail
from dualobj.data import (
    ByteTokenizer,
    EvalRows,
    HeldoutSplit,
    Packed,
    evaluation_rows,
    load_corpus,
    pack,
    repetition_subset,
    row_window_hashes,
    split_heldout,
    text_window_hashes,
    window_overlap,
)
from dualobj.evaluation import ar_nll, choice_accuracy, md_elbo, next_line_probe, prefix_nll, score_choices
from dualobj.models import Transformer, TransformerConfig

PAPER_ALPHAS = (0.0, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 15 / 16, 63 / 64, 1.0)
"""The paper's α values that a small budget can realise (1/256 and 255/256 round to the pure objectives at 16
rows per step)."""


@dataclass(frozen=True)
class GridConfig:
    """Everything that defines a replication grid.

    Attributes:
        alphas: the α axis: AR weights of ``DualObjective(α)`` (1 = pure AR, 0 = pure MD); may be empty when
            ``objectives`` is not.
        objectives: the objective axis: names in :data:`OBJECTIVES` (e.g. ``("ar", "md")``), trained beside the α
            axis at the same budget and R.
        repetitions: repetition counts R; each cell trains on ``budget / R`` unique tokens seen R times.
        budget: training tokens per cell (the same for every R, as in the paper).
        seeds: seeds per (α or objective, R); results give mean ± standard deviation over them.
        dim, layers, heads, seq_len: the model and its row length.
        batch_size: rows per step; with ``split="rows"`` a share α of them is AR.
        lr, warmup, min_lr_ratio, weight_decay: AdamW with linear warm-up (a share of the steps) then cosine decay.
        curve_points: held-out AR evaluations over training, on the validation and the test rows.
        heldout_tokens: test tokens for the AR curve, the final AR loss and the prefix-LM loss.
        validation_tokens: validation tokens for the AR curve that picks the early-stopping point (``ar_min``).
        elbo_tokens, elbo_samples: test tokens (the first test rows) and masks per row for the MD ELBO.
        probe_questions, probe_options, probe_modes: the next-line zero-shot probe on test files (300 questions
            keep one standard error of an accuracy at or under 0.03).
        test_fraction, validation_fraction: expected shares of near-duplicate file families held out for test and
            for validation (:func:`dualobj.data.split_heldout`).
        data: a text file or folder, or ``None`` for the embedded standard-library corpus.
    """

    alphas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.0)
    objectives: tuple[str, ...] = ()
    repetitions: tuple[int, ...] = (32,)
    budget: int = 750_000
    seeds: int = 3
    dim: int = 128
    layers: int = 2
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    curve_points: int = 8
    heldout_tokens: int = 32_768
    validation_tokens: int = 16_384
    elbo_tokens: int = 16_384
    elbo_samples: int = 2
    probe_questions: int = 300
    probe_options: int = 4
    probe_modes: tuple[str, ...] = ("ar", "prefix")
    test_fraction: float = 0.05
    validation_fraction: float = 0.05
    data: str | None = None

    def __post_init__(self) -> None:
        from dualobj.experiments._objectives import OBJECTIVES

        if isinstance(self.alphas, (str, bytes)) or not isinstance(self.alphas, (tuple, list)):
            raise fail("alphas", "a sequence of α in [0, 1]", describe(self.alphas))
        alphas = tuple(check_probability("alphas", a) for a in self.alphas)
        if isinstance(self.objectives, (str, bytes)) or not isinstance(self.objectives, (tuple, list)):
            raise fail("objectives", "a sequence of names from " + ", ".join(OBJECTIVES), describe(self.objectives))
        objectives = tuple(dict.fromkeys(self.objectives))
        for name in objectives:
            if name not in OBJECTIVES:
                raise fail("objectives", "names from " + ", ".join(OBJECTIVES), repr(name))
        if not alphas and not objectives:
            raise fail("alphas", "at least one α in [0, 1] (or one name in objectives)", "none")
        reps = tuple(self.repetitions) if isinstance(self.repetitions, (tuple, list)) else None
        if not reps or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in reps):
            raise fail("repetitions", "one or more ints >= 1", describe(self.repetitions))
        object.__setattr__(self, "alphas", tuple(sorted(set(alphas), reverse=True)))
        object.__setattr__(self, "objectives", objectives)
        object.__setattr__(self, "repetitions", tuple(sorted(set(reps))))
        for name in ("budget", "seeds", "dim", "layers", "heads", "seq_len", "batch_size", "curve_points",
                     "heldout_tokens", "validation_tokens", "elbo_tokens", "elbo_samples", "probe_questions",
                     "probe_options"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(name, "an int >= 1", describe(value))
        for name in ("lr", "warmup", "min_lr_ratio", "weight_decay"):
            check_number(name, getattr(self, name), low=0.0)
        modes = tuple(self.probe_modes) if isinstance(self.probe_modes, (tuple, list)) else None
        if not modes or any(m not in PROBE_MODES for m in modes):
            raise fail("probe_modes", "one or more of " + ", ".join(PROBE_MODES), describe(self.probe_modes))
        object.__setattr__(self, "probe_modes", tuple(dict.fromkeys(modes)))
        tf = check_probability("test_fraction", self.test_fraction, low_open=True, high_open=True)
        vf = check_probability("validation_fraction", self.validation_fraction, low_open=True, high_open=True)
        if tf + vf >= 1:
            raise fail("validation_fraction", f"test_fraction + validation_fraction < 1 (test_fraction={tf})", vf)
        if self.data is not None and not isinstance(self.data, str):
            raise fail("data", "None or a path as a str", describe(self.data))
        if self.budget < self.seq_len * self.batch_size * max(self.repetitions):
            raise fail("budget", f"at least seq_len · batch_size · max(R) = "
                       f"{self.seq_len * self.batch_size * max(self.repetitions)} tokens", self.budget)

    def cells(self) -> list[Cell]:
        """Every cell: largest R first (the slowest to show its result); within an R, seed 0 of every α (descending)
        and then of every objective (in the order given), then seed 1, and so on, so that a grid stopped early
        already covers both axes."""
        out = []
        for r in sorted(self.repetitions, reverse=True):
            for s in range(self.seeds):
                out += [Cell(a, r, s) for a in self.alphas]
                out += [Cell(None, r, s, name) for name in self.objectives]
        return out

    def training_settings(self) -> dict:
        """The settings a cell's result depends on (all but the grid axes), for resuming safely."""
        out = dataclasses.asdict(self)
        for key in ("alphas", "objectives", "repetitions", "seeds"):
            out.pop(key)
        return out

    def signature(self) -> str:
        """A short hash of :meth:`training_settings`: results are stored under it, so cells trained under other
        settings are kept apart and never overwritten."""
        text = json.dumps(self.training_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def model_config(self) -> TransformerConfig:
        """The :class:`TransformerConfig` of every cell (byte vocabulary)."""
        return TransformerConfig(vocab_size=ByteTokenizer().vocab_size, dim=self.dim, layers=self.layers,
                                 heads=self.heads, max_len=max(2 * self.seq_len, 256))

    def to_dict(self) -> dict:
        """All fields (JSON-ready)."""
        return dataclasses.asdict(self)


PROBE_LINE_LENGTHS = (32, 80, 200)
"""Longest probe line (stripped bytes) tried in turn until the test text gives enough questions."""

PROBE_MODES = ("ar", "prefix", "md")
"""Scoring modes of the next-line probe (``md`` costs one forward pass per option byte)."""


PRESETS: dict[str, GridConfig] = {
    "quick": GridConfig(),
    "paper": GridConfig(
        alphas=PAPER_ALPHAS,
        repetitions=(1, 4, 16, 32, 64),
        budget=1_500_000,
        seeds=1,
        curve_points=12,
    ),
    "objectives": GridConfig(
        alphas=(0.75,),
        objectives=("ar", "bd4", "bd16", "md"),
        seeds=2,
    ),
}
"""Named grids: ``"quick"`` (the few-minute check of the paper's finding at R = 32), ``"paper"`` (the paper's α set
on five repetition levels) and ``"objectives"`` (the objective axis beside the best quick α at R = 32, two seeds)."""


@dataclass(frozen=True)
class Cell:
    """One trained model: on the α axis ``alpha`` (with ``objective="dual"``), on the objective axis the
    ``objective``'s name (with ``alpha=None``); ``repetitions`` ``R`` and ``seed``."""

    alpha: float | None
    repetitions: int
    seed: int
    objective: str = "dual"

    @property
    def key(self) -> str:
        """``"a=<α>,R=<R>,seed=<s>"`` on the α axis, ``"obj=<name>,R=<R>,seed=<s>"`` on the objective axis."""
        head = f"a={self.alpha:.6g}" if self.objective == "dual" else f"obj={self.objective}"
        return f"{head},R={self.repetitions},seed={self.seed}"

    @property
    def label(self) -> str:
        """``"α=3/4"`` or the objective's name, for tables and logs."""
        if self.objective == "dual":
            from dualobj.experiments._report import alpha_label

            return f"α={alpha_label(self.alpha)}"
        return self.objective


@dataclass
class CellData:
    """What every cell of a grid shares: the training stream, the validation and test rows, the probe.

    Attributes:
        split: the train / validation / test documents.
        train: all training documents packed into rows (each cell takes its repeated subset from it).
        validation: rows for the early-stopping curve.
        test: rows for every reported number (the MD ELBO uses the first of them).
        test_hashes: the 32-byte window hashes of the test rows (for the overlap with a training subset).
        questions: the next-line probe, built from the test documents (empty when they have no usable lines:
            the cells then have no probe result).
    """

    split: HeldoutSplit = field(repr=False)
    train: Packed
    validation: EvalRows
    test: EvalRows
    test_hashes: torch.Tensor = field(repr=False)
    questions: list = field(repr=False)
    train_overlap: float | None = None  # computed once, by check_data


@functools.lru_cache(maxsize=2)
def _cell_data(data: str | None, seq_len: int, test_tokens: int, validation_tokens: int, test_fraction: float,
               validation_fraction: float, probe_questions: int, probe_options: int) -> CellData:
    corpus = load_corpus(data)
    slack = lambda n: n + n // 4 + 4 * seq_len  # noqa: E731  (rows drop the rest of every document)
    split = split_heldout(corpus, test_fraction=test_fraction, validation_fraction=validation_fraction,
                          min_test_bytes=slack(test_tokens), min_validation_bytes=slack(validation_tokens))
    train = pack(split.train, seq_len, seed=0)
    validation = evaluation_rows(split.validation, seq_len, max(seq_len, validation_tokens), seed=2)
    test = evaluation_rows(split.test, seq_len, max(seq_len, test_tokens), seed=1)
    questions: list = []
    for max_line in PROBE_LINE_LENGTHS:  # short lines first (code); longer ones only when too few (prose)
        with contextlib.suppress(DualObjError):  # too few usable lines: try longer ones, else no probe
            found = next_line_probe(split.test, questions=probe_questions, options=probe_options, seed=0,
                                    max_line=max_line)
            if len(found) > len(questions):
                questions = found
        if len(questions) >= probe_questions:
            break
    return CellData(split, train, validation, test, row_window_hashes(test.rows), questions)


def cell_data(config: GridConfig) -> CellData:
    """The split, packed training stream, validation and test rows and probe of ``config``, cached per process.

    Raises:
        DualObjError: the data cannot be read or is too small for the held-out splits or the probe.
    """
    return _cell_data(config.data, config.seq_len, max(config.heldout_tokens, config.elbo_tokens),
                      config.validation_tokens, config.test_fraction, config.validation_fraction,
                      config.probe_questions, config.probe_options)


def check_data(config: GridConfig) -> dict:
    """Check, before any training, that the data holds what every cell of ``config`` needs, and describe the
    held-out set.

    Returns:
        A JSON-ready dict: ``train_tokens``, ``files`` (train / validation / test document counts), ``families``,
        ``pieces`` (whether documents were cut into pieces), ``test_tokens``, ``validation_tokens``,
        ``max_file_share`` (the largest share of the test rows from one source file), ``max_file_share_elbo``
        (the same for the MD-ELBO rows), ``max_file_share_validation``, ``test_window_overlap_train`` (the share
        of the test text's 32-byte windows found anywhere in the training documents; each cell also stores the
        share found in its own training subset) and ``probe_questions``.

    Raises:
        DualObjError: the data is too small for the splits, the probe, or ``budget / min(R)`` training tokens.
    """
    data = cell_data(config)
    R = min(config.repetitions)
    need = round(config.budget / R / config.seq_len)
    if need > len(data.train):
        raise fail("data", f"at least budget / R = {config.budget:,} / {R} = {need * config.seq_len:,} training "
                   "tokens (lower --budget or raise the smallest --repetitions)",
                   f"{data.train.num_tokens:,} after holding out validation and test text")
    elbo_rows = max(1, config.elbo_tokens // config.seq_len)
    if data.train_overlap is None:
        data.train_overlap = window_overlap(data.test_hashes, text_window_hashes(data.split.train.documents))
    return {
        "train_tokens": data.train.num_tokens,
        "files": {"train": len(data.split.train), "validation": len(data.split.validation),
                  "test": len(data.split.test)},
        "families": data.split.families,
        "pieces": data.split.pieces,
        "test_tokens": data.test.rows.num_tokens,
        "validation_tokens": data.validation.rows.num_tokens,
        "max_file_share": data.test.max_file_share(),
        "max_file_share_elbo": data.test.max_file_share(elbo_rows),
        "max_file_share_validation": data.validation.max_file_share(),
        "test_window_overlap_train": data.train_overlap,
        "probe_questions": len(data.questions),
    }


def _lr_lambda(steps: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    warm = max(1, round(warmup * steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


Progress = Callable[[int, int], None]


def train_cell(config: GridConfig, cell: Cell, progress: Progress | None = None) -> dict:
    """Train and evaluate one cell.

    Args:
        config: the grid.
        cell: which α (or objective), R and seed.
        progress: called as ``progress(step, total_steps)`` during training.

    Returns:
        A JSON-ready dict: ``alpha`` (``None`` on the objective axis), ``objective``, ``repetitions``, ``seed``,
        ``unique_tokens``, ``steps``, ``params``; ``curve`` and ``curve_validation``
        (``[[tokens seen, held-out AR bits/byte], ...]`` on the test and the validation rows); ``ar_final`` (test,
        end of training); ``ar_min`` (test, at the evaluation where the *validation* curve is lowest: early
        stopping chosen without looking at the test rows) with ``ar_min_tokens``; ``ar_test_min`` (the lowest
        test point, an optimistic reference only); ``md_elbo`` (bits per byte, an upper bound); ``prefix`` and
        ``prefix_causal`` (bits per byte of the second half of each test row given the first, with a bidirectional
        or a causal prefix); ``probe`` and ``probe_se`` (accuracy and its standard error per mode),
        ``probe_questions``; ``window_overlap`` (the share of the test text's 32-byte windows found in this cell's
        training subset); ``seconds`` and ``cpu_seconds``. On the objective axis also ``bound_curve`` and
        ``bound_curve_validation`` (the model's own held-out bound over training, bits per byte: AR NLL, MD or BD
        NELBO, one Monte Carlo mask per row), ``bound_final`` and ``bound_min`` (test, at the validation minimum)
        with ``bound_min_tokens``.
    """
    from dualobj.experiments._objectives import OBJECTIVES, dual_objective, forward, md_objective, own_bound, prepare

    wall0, cpu0 = time.perf_counter(), time.process_time()
    data = cell_data(config)
    subset = repetition_subset(data.train, config.budget, cell.repetitions, seed=0)
    torch.manual_seed(cell.seed)
    model = Transformer(config.model_config())
    tok = ByteTokenizer()
    md = md_objective(tok)
    objective = dual_objective(cell.alpha, tok) if cell.objective == "dual" else OBJECTIVES[cell.objective](tok)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    steps = subset.steps(config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, config.warmup, config.min_lr_ratio))
    eval_at = {max(1, round(steps * (i + 1) / config.curve_points)) for i in range(config.curve_points)}
    test = data.test.rows.rows(slice(0, max(1, config.heldout_tokens // config.seq_len)))
    val = data.validation.rows
    gen = torch.Generator().manual_seed(10_000 + cell.seed)
    curve, curve_val = [], []
    # the objective axis also follows each model's own held-out bound (AR NLL, MD or BD NELBO) over training
    on_axis = cell.objective != "dual"
    bound_rows = data.test.rows.rows(slice(0, max(1, config.elbo_tokens // config.seq_len)))
    bound_val = val.rows(slice(0, max(1, config.elbo_tokens // config.seq_len)))
    bound, bound_v = [], []
    for step, rows in enumerate(subset.batches(config.batch_size, generator=gen), start=1):
        model.train()
        batch = prepare(objective, rows, step=step - 1, generator=gen)
        loss = objective.loss(forward(model, batch), batch, head=model.lm_head).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step in eval_at:
            model.eval()
            seen = step * config.batch_size * config.seq_len
            curve.append([seen, ar_nll(model, test.tokens, doc_ids=test.doc_ids).bits_per_token])
            curve_val.append([seen, ar_nll(model, val.tokens, doc_ids=val.doc_ids).bits_per_token])
            if on_axis:
                bound.append([seen, own_bound(model, objective, bound_rows, samples=1)])
                bound_v.append([seen, own_bound(model, objective, bound_val, samples=1)])
        if progress is not None:
            progress(step, steps)
    model.eval()
    elbo_rows = data.test.rows.rows(slice(0, max(1, config.elbo_tokens // config.seq_len)))
    elbo = md_elbo(model, elbo_rows.tokens, doc_ids=elbo_rows.doc_ids, md=md, samples=config.elbo_samples, seed=0)
    half = config.seq_len // 2
    pre = prefix_nll(model, test.tokens, doc_ids=test.doc_ids, prefix_length=half)
    pre_causal = prefix_nll(model, test.tokens, doc_ids=test.doc_ids, prefix_length=half, prefix_mode=False)
    n_q = len(data.questions)
    probe = {mode: choice_accuracy(score_choices(model, data.questions, mode=mode), data.questions)
             for mode in config.probe_modes} if n_q else {}
    best = min(range(len(curve_val)), key=lambda i: curve_val[i][1])
    own: dict = {}
    if on_axis:
        best_own = min(range(len(bound_v)), key=lambda i: bound_v[i][1])
        own = {
            "bound_curve": bound,
            "bound_curve_validation": bound_v,
            "bound_final": bound[-1][1],
            "bound_min": bound[best_own][1],
            "bound_min_tokens": bound[best_own][0],
        }
    return {
        "alpha": cell.alpha,
        "objective": cell.objective,
        "repetitions": cell.repetitions,
        "seed": cell.seed,
        "unique_tokens": subset.unique.num_tokens,
        "steps": steps,
        "params": model.num_parameters(),
        "curve": curve,
        "curve_validation": curve_val,
        "ar_final": curve[-1][1],
        "ar_min": curve[best][1],
        "ar_min_tokens": curve[best][0],
        "ar_test_min": min(v for _, v in curve),
        "md_elbo": elbo.bits_per_token,
        "prefix": pre.bits_per_token,
        "prefix_causal": pre_causal.bits_per_token,
        "probe": probe,
        "probe_se": {m: math.sqrt(max(a * (1 - a), 0.0) / n_q) for m, a in probe.items()},
        "probe_questions": n_q,
        "window_overlap": window_overlap(data.test_hashes, row_window_hashes(subset.unique)),
        **own,
        "seconds": time.perf_counter() - wall0,
        "cpu_seconds": time.process_time() - cpu0,
    }
