"""The ``step`` suite: one full training step (prepare, forward, loss, backward, AdamW) of the reference model.

The question it answers is the paper's practical claim: training on the dual objective costs what AR training
costs. Three steps run on the same model initialisation and the same tokens:

- ``ar``: :class:`~dualobj.objectives.ARObjective` (every row causal, every position a target);
- ``md``: :class:`~dualobj.objectives.MDObjective` (every row bidirectional, only masked positions are scored);
- ``dual``: :class:`~dualobj.objectives.DualObjective` with ``split="rows"``, α = 0.5 (half the rows each, one
  forward pass with per-row mixed attention).
- ``bd``: :class:`~dualobj.objectives.BlockDiffusionObjective` with blocks of ``BD_BLOCK`` tokens (rows
  ``[x_t ; x_0]``: twice the tokens per forward pass under the block-diffusion mask; target ≤ 2.2× AR).

Two cases compare them with the AR step: ``dual`` (target ≤ 1.05× AR) and ``md`` (target ≤ 1.0× AR). The outputs
of different objectives do not agree by design, so the check is a sanity one: every first-step loss is finite,
and the AR loss at initialisation is within 0.5 nat of ``ln V`` (the untrained model predicts nearly uniformly).

A third case times the dual step with the value checks on (the default) against the same step with them off
(``dualobj.validation(False)``): the cost of validation, target ≤ 1.03×. Both draw the same batches, so their
first-step losses must be equal.

With ``--compile`` (``Context.compile``), three more cases time, for ``ar``, ``md`` and ``dual``, the step whose
model forward and loss run as one ``torch.compile``-d function (default inductor backend; ``prepare`` and the
optimizer stay eager, the backward is the compiled graph's) against the eager step; target ≤ 0.9× eager for
``dual``. Compilation happens in the untimed first call; the first-step losses must agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dualobj.bench._core import Case, Context, Impl

MASK_ID = 3
NUM_SPECIAL = 4
BD_BLOCK = 16

QUICK = {"batch": 8, "length": 128, "dim": 128, "layers": 2, "heads": 4, "vocab": 512}
FULL = {"batch": 8, "length": 256, "dim": 256, "layers": 4, "heads": 4, "vocab": 4096}


def _objective(kind: str) -> Any:
    from dualobj.objectives import ARObjective, BlockDiffusionObjective, DualObjective, MDObjective

    md = MDObjective(MASK_ID, num_special=NUM_SPECIAL)
    if kind == "bd":
        return BlockDiffusionObjective(MASK_ID, BD_BLOCK, num_special=NUM_SPECIAL)
    return {"ar": ARObjective(), "md": md, "dual": DualObjective(0.5, md=md, split="rows")}[kind]


def make_step(
    kind: str,
    sizes: dict[str, int],
    ctx: Context,
    *,
    seed: int = 0,
    compiled: bool = False,
    validate: bool = True,
) -> Callable[[], torch.Tensor]:
    """Set up a model, AdamW and a token batch; return a callable running one training step.

    Args:
        kind: ``"ar"``, ``"md"``, ``"dual"`` or ``"bd"``.
        sizes: ``batch``, ``length``, ``dim``, ``layers``, ``heads``, ``vocab``.
        ctx: device and parameter dtype.
        seed: the model initialisation and the tokens depend only on it (same for every kind).
        compiled: run the model forward and the loss as one ``torch.compile``-d function.
        validate: the value checks on (``dualobj.validation(True)``, the default) or off.

    Returns:
        ``step() -> loss``: one step (the objective's random draws advance with each call); the loss is a
        detached float32 scalar.
    """
    from dualobj.models import Transformer, TransformerConfig

    config = TransformerConfig(vocab_size=sizes["vocab"], dim=sizes["dim"], layers=sizes["layers"],
                               heads=sizes["heads"], max_len=2 * sizes["length"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(config)
    model = model.to(device=ctx.device, dtype=ctx.torch_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data_gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(NUM_SPECIAL, sizes["vocab"], (sizes["batch"], sizes["length"]), generator=data_gen)
    tokens = tokens.to(ctx.device)
    objective = _objective(kind)
    draws = torch.Generator().manual_seed(seed + 1)
    counter = [0]
    scheduled = kind == "dual"  # only the dual objective takes the step (for a scheduled α)

    from dualobj._errors import validation

    def forward_loss(batch: Any) -> torch.Tensor:
        hidden = model(batch.input_ids, layout=batch.layout)
        return objective.loss(hidden, batch, head=model.lm_head).loss

    forward = torch.compile(forward_loss) if compiled else forward_loss

    def step() -> torch.Tensor:
        with validation(validate):
            extra = {"step": counter[0]} if scheduled else {}
            batch = objective.prepare(tokens, generator=draws, **extra)
            counter[0] += 1
            loss = forward(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    return step


def _check(vocab: int) -> Callable[[dict[str, Any]], str | None]:
    def check(outputs: dict[str, Any]) -> str | None:
        for name, loss in outputs.items():
            if not bool(torch.isfinite(loss)):
                return f"{name}: first-step loss is {float(loss)}"
        if "ar" in outputs:
            ar = float(outputs["ar"])
            if abs(ar - math.log(vocab)) > 0.5:
                return f"ar: loss at initialisation {ar:.3f}, expected within 0.5 of ln V = {math.log(vocab):.3f}"
        return None

    return check


def cases(ctx: Context) -> list[Case]:
    """The dual-vs-AR, MD-vs-AR and BD-vs-AR training-step cases (smaller model and batch under ``ctx.quick``)."""
    sizes = dict(QUICK if ctx.quick else FULL)
    tokens = sizes["batch"] * sizes["length"]
    label = f"{sizes['batch']}x{sizes['length']} d{sizes['dim']} L{sizes['layers']} V{sizes['vocab']}"

    def impl(kind: str, ours: bool = False) -> Impl:
        return Impl(kind, lambda: make_step(kind, sizes, ctx), ours=ours)

    common: dict[str, Any] = {"sizes": sizes, "units": tokens, "unit": "tok", "check": _check(sizes["vocab"]),
                              "memory": not ctx.quick}
    out = [
        Case(f"dual rows α=0.5 {label}", [impl("dual", ours=True), impl("ar")], targets={"ar": 1.05}, **common),
        Case(f"md {label}", [impl("md", ours=True), impl("ar")], targets={"ar": 1.0}, **common),
        Case(f"bd b={BD_BLOCK} {label}", [impl("bd", ours=True), impl("ar")], targets={"ar": 2.2}, **common),
    ]
    same: dict[str, Any] = {**common, "memory": False}
    out.append(Case(
        f"dual validation on/off {label}",
        [Impl("validation on", lambda: make_step("dual", sizes, ctx, validate=True), ours=True),
         Impl("validation off", lambda: make_step("dual", sizes, ctx, validate=False))],
        targets={"validation off": 1.03}, **{**same, "check": _same_loss(1e-6)},
    ))
    if ctx.compile:
        for kind in ("ar", "md", "dual"):
            out.append(Case(
                f"{kind} compiled/eager {label}",
                [Impl("compiled", lambda kind=kind: make_step(kind, sizes, ctx, compiled=True), ours=True),
                 Impl("eager", lambda kind=kind: make_step(kind, sizes, ctx))],
                targets={"eager": 0.9} if kind == "dual" else {}, **{**same, "check": _same_loss(1e-4)},
            ))
    return out


def _same_loss(rtol: float) -> Callable[[dict[str, Any]], str | None]:
    """``Case.check``: the implementations' first-step losses agree within ``rtol`` (same model, same draws)."""

    def check(outputs: dict[str, Any]) -> str | None:
        values = {name: float(loss) for name, loss in outputs.items()}
        if not all(math.isfinite(v) for v in values.values()):
            return f"a first-step loss is not finite: {values}"
        ref = next(iter(values.values()))
        if any(abs(v - ref) > rtol * abs(ref) for v in values.values()):
            return f"first-step losses differ: {values}"
        return None

    return check
