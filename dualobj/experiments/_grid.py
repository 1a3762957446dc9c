"""The miniature replication: one small transformer per (α, R, seed) cell, trained at a fixed token budget on a
subset repeated R times, then evaluated on held-out text in AR, MD and prefix-LM mode and on a zero-shot probe."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dualobj._errors import check_probability, describe, fail
from dualobj.data import ByteTokenizer, Corpus, Packed, load_corpus, pack, repetition_subset, split_corpus
from dualobj.evaluation import ar_nll, choice_accuracy, md_elbo, next_line_probe, prefix_nll, score_choices
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import DualObjective, MDObjective

PAPER_ALPHAS = (0.0, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 15 / 16, 63 / 64, 1.0)
"""The paper's α values that a small budget can realise (1/256 and 255/256 round to the pure objectives at 16
rows per step)."""


@dataclass(frozen=True)
class GridConfig:
    """Everything that defines a replication grid.

    Attributes:
        alphas: AR weights α (1 = pure AR, 0 = pure MD).
        repetitions: repetition counts R; each cell trains on ``budget / R`` unique tokens seen R times.
        budget: training tokens per cell (the same for every R, as in the paper).
        seeds: seeds per (α, R); results give mean ± standard deviation over them.
        dim, layers, heads, seq_len: the model and its row length.
        batch_size: rows per step; with ``split="rows"`` a share α of them is AR.
        lr, warmup, min_lr_ratio, weight_decay: AdamW with linear warm-up (a share of the steps) then cosine decay.
        curve_points: held-out AR evaluations over training (for the loss curve and its minimum).
        heldout_tokens: held-out tokens for the AR curve, the final AR loss and the prefix-LM loss.
        elbo_tokens, elbo_samples: held-out tokens and masks per row for the MD ELBO.
        probe_questions, probe_options: the next-line zero-shot probe.
        data: a text file or folder, or ``None`` for the embedded standard-library corpus.
    """

    alphas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.0)
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
    elbo_tokens: int = 16_384
    elbo_samples: int = 2
    probe_questions: int = 32
    probe_options: int = 4
    data: str | None = None

    def __post_init__(self) -> None:
        alphas = tuple(check_probability("alphas", a) for a in self.alphas)
        if not alphas:
            raise fail("alphas", "at least one α in [0, 1]", "none")
        reps = tuple(self.repetitions)
        if not reps or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in reps):
            raise fail("repetitions", "one or more ints >= 1", describe(self.repetitions))
        object.__setattr__(self, "alphas", tuple(sorted(set(alphas), reverse=True)))
        object.__setattr__(self, "repetitions", tuple(sorted(set(reps))))
        for name in ("budget", "seeds", "dim", "layers", "heads", "seq_len", "batch_size", "curve_points",
                     "heldout_tokens", "elbo_tokens", "elbo_samples", "probe_questions", "probe_options"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(name, "an int >= 1", describe(value))
        if self.budget < self.seq_len * self.batch_size * max(self.repetitions):
            raise fail("budget", f"at least seq_len · batch_size · max(R) = "
                       f"{self.seq_len * self.batch_size * max(self.repetitions)} tokens", self.budget)

    def cells(self) -> list[Cell]:
        """Every (α, R, seed) cell, largest R first (the slowest to show its result), then α descending."""
        return [Cell(a, r, s) for r in sorted(self.repetitions, reverse=True) for a in self.alphas
                for s in range(self.seeds)]

    def training_settings(self) -> dict:
        """The settings a cell's result depends on (all but the grid axes), for resuming safely."""
        out = dataclasses.asdict(self)
        for key in ("alphas", "repetitions", "seeds"):
            out.pop(key)
        return out

    def signature(self) -> str:
        """A short hash of :meth:`training_settings`: stored cells with another signature are retrained."""
        text = json.dumps(self.training_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def model_config(self) -> TransformerConfig:
        """The :class:`TransformerConfig` of every cell (byte vocabulary)."""
        return TransformerConfig(vocab_size=ByteTokenizer().vocab_size, dim=self.dim, layers=self.layers,
                                 heads=self.heads, max_len=max(self.seq_len, 256))

    def to_dict(self) -> dict:
        """All fields (JSON-ready)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, GridConfig] = {
    "quick": GridConfig(),
    "paper": GridConfig(
        alphas=PAPER_ALPHAS,
        repetitions=(1, 4, 16, 32, 64),
        budget=1_500_000,
        seeds=1,
        curve_points=12,
        probe_questions=64,
    ),
}
"""Named grids: ``"quick"`` (the few-minute check of the paper's finding at R = 32) and ``"paper"`` (the paper's
α set on five repetition levels; about 40 minutes on two idle CPU cores)."""


@dataclass(frozen=True)
class Cell:
    """One trained model: ``alpha``, ``repetitions`` ``R`` and ``seed``."""

    alpha: float
    repetitions: int
    seed: int

    @property
    def key(self) -> str:
        """``"a=<α>,R=<R>,seed=<s>"``, the cell's key in the results file."""
        return f"a={self.alpha:.6g},R={self.repetitions},seed={self.seed}"


@dataclass
class CellData:
    """The tensors one cell needs (the same for every cell of a grid, except the training subset)."""

    train: Packed
    heldout: Packed
    heldout_corpus: Corpus = field(repr=False)


@functools.lru_cache(maxsize=2)
def _packed(data: str | None, seq_len: int, heldout_tokens: int) -> CellData:
    train_corpus, heldout_corpus = split_corpus(load_corpus(data))
    train = pack(train_corpus, seq_len, seed=0)
    heldout = pack(heldout_corpus, seq_len, max_tokens=max(seq_len, heldout_tokens), seed=1)
    return CellData(train, heldout, heldout_corpus)


def cell_data(config: GridConfig) -> CellData:
    """The packed training stream (all training files) and held-out rows, cached per process."""
    return _packed(config.data, config.seq_len, max(config.heldout_tokens, config.elbo_tokens))


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
        cell: which α, R and seed.
        progress: called as ``progress(step, total_steps)`` during training.

    Returns:
        A JSON-ready dict: ``alpha``, ``repetitions``, ``seed``, ``unique_tokens``, ``steps``, ``params``,
        ``curve`` (``[[tokens seen, held-out AR bits/byte], ...]``), ``ar_final`` and ``ar_min`` (bits per byte),
        ``md_elbo`` (bits per byte, an upper bound), ``prefix`` and ``prefix_causal`` (bits per byte of the
        second half of each held-out row given the first, with a bidirectional or a causal prefix),
        ``probe`` (accuracy per mode), ``seconds`` and ``cpu_seconds``.
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    data = cell_data(config)
    subset = repetition_subset(data.train, config.budget, cell.repetitions, seed=0)
    torch.manual_seed(cell.seed)
    model = Transformer(config.model_config())
    tok = ByteTokenizer()
    md = MDObjective(tok.mask_id, num_special=tok.num_special)
    objective = DualObjective(cell.alpha, md=md, split="rows")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    steps = subset.steps(config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, config.warmup, config.min_lr_ratio))
    eval_at = {max(1, round(steps * (i + 1) / config.curve_points)) for i in range(config.curve_points)}
    held = data.heldout.rows(slice(0, max(1, config.heldout_tokens // config.seq_len)))
    gen = torch.Generator().manual_seed(10_000 + cell.seed)
    curve = []
    for step, rows in enumerate(subset.batches(config.batch_size, generator=gen), start=1):
        model.train()
        batch = objective.prepare(rows.tokens, doc_ids=rows.doc_ids, step=step - 1, generator=gen)
        hidden = model(batch.input_ids, causal=batch.causal, doc_ids=batch.doc_ids)
        loss = objective.loss(hidden, batch, head=model.lm_head).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step in eval_at:
            model.eval()
            nll = ar_nll(model, held.tokens, doc_ids=held.doc_ids)
            curve.append([step * config.batch_size * config.seq_len, nll.bits_per_token])
        if progress is not None:
            progress(step, steps)
    model.eval()
    elbo_rows = data.heldout.rows(slice(0, max(1, config.elbo_tokens // config.seq_len)))
    elbo = md_elbo(model, elbo_rows.tokens, doc_ids=elbo_rows.doc_ids, md=md, samples=config.elbo_samples, seed=0)
    half = config.seq_len // 2
    pre = prefix_nll(model, held.tokens, doc_ids=held.doc_ids, prefix_length=half)
    pre_causal = prefix_nll(model, held.tokens, doc_ids=held.doc_ids, prefix_length=half, prefix_mode=False)
    questions = next_line_probe(data.heldout_corpus, questions=config.probe_questions, options=config.probe_options,
                                seed=0)
    probe = {mode: choice_accuracy(score_choices(model, questions, mode=mode), questions)
             for mode in ("ar", "prefix", "md")}
    values = [v for _, v in curve]
    return {
        "alpha": cell.alpha,
        "repetitions": cell.repetitions,
        "seed": cell.seed,
        "unique_tokens": subset.unique.num_tokens,
        "steps": steps,
        "params": model.num_parameters(),
        "curve": curve,
        "ar_final": values[-1],
        "ar_min": min(values),
        "md_elbo": elbo.bits_per_token,
        "prefix": pre.bits_per_token,
        "prefix_causal": pre_causal.bits_per_token,
        "probe": probe,
        "probe_questions": len(questions),
        "seconds": time.perf_counter() - wall0,
        "cpu_seconds": time.process_time() - cpu0,
    }
