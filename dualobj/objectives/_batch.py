"""The two records that flow through a training step: :class:`Batch` in, :class:`LossOutput` out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dualobj._errors import check_int, check_tensor, fail, fail_type
from dualobj.attention._spec import AttentionLayout, tag_block_rows

IGNORE_INDEX = -100
"""Label value meaning "no loss at this output position" (the ``F.cross_entropy`` default)."""


@dataclass
class Batch:
    """What one objective asks of the model and of the loss for one step.

    Every objective's ``prepare`` returns one; any model consumes it: feed ``input_ids`` with the attention given
    by :attr:`layout` (``model(batch.input_ids, layout=batch.layout)``; for plain batches the layout is just
    ``causal`` and ``doc_ids``, so ``model(input_ids, causal=, doc_ids=)`` works too), then score the output against
    ``labels`` with ``weights``.

    Block-diffusion batches (``block_size`` set) hold rows ``[x_t ; x_0]`` of length ``2L``: ``input_ids``,
    ``labels``, ``weights``, ``valid``, ``doc_ids`` and ``position_ids`` all have ``2L`` columns, and attention
    needs :attr:`layout` (their ``causal`` tensor alone is refused by :func:`dualobj.attention.attention`).

    Attributes:
        input_ids: ``[B, L]`` int64. Clean tokens for AR rows, ``<mask>``-corrupted tokens for MD rows.
        labels: ``[B, L]`` int64. The target of each output position; ``-100`` means no loss. With shifted
            targets, position ``i`` is scored on token ``i + 1``.
        weights: ``[B, L]`` float32. Per-position loss weight, ``0`` wherever ``labels == -100``: 1 for AR rows,
            the MD estimator weight (``w(t)``, ``1/t`` for the linear schedule) for MD rows, times ``scale``.
        causal: ``[B]`` bool, kept on the **CPU** (host metadata, so attention can split rows without a device
            sync). ``True``: causal attention; ``False``: bidirectional.
        doc_ids: ``[B, L]`` int64 or ``None``. Document id of each position of packed rows; attention and targets
            never cross a document boundary.
        t: ``[B]`` float32 or ``None``. Noise level of each MD row (``NaN`` for AR rows); ``[B, K]`` for a
            block-diffusion batch (one level per block, ``K = ceil(L / block_size)``).
        valid: ``[B, L]`` bool or ``None``. Output positions that count for ``normalize="valid"``: those whose
            target token exists and could be scored (not padding, not across a document, not inside a prompt).
            For MD rows this includes unmasked positions (the per-token ELBO); ``None`` means ``labels != -100``.
        scale: ``[B]`` float32 or ``None``. The mixing factor already multiplied into ``weights`` for each row
            (``ar_scale`` for AR rows, ``2α`` / ``2(1-α)`` for ``split="both"``); ``None`` means 1. Metrics divide
            it out so ``ar/loss`` and ``md/loss`` stay comparable across mixes.
        position_ids: ``[B, L]`` int64 or ``None``. Rotary positions of the model input; ``None`` means counted
            from 0 in each packed document. Block-diffusion batches set them: ``0 .. L-1`` (per document) in both
            halves.
        block_size: ``None``, or the block size of a block-diffusion batch (rows ``[x_t ; x_0]``).
        component: ``[B]`` int64 on the **CPU**, or ``None``. Set by a mixture (and by block diffusion, whose
            rows form the one component ``"bd"``): the index into
            ``component_names`` of the component that made each row. The loss then reports ``"<name>/loss"`` and
            ``"<name>/tokens"`` for every name.
        component_names: the mixture's component names (set together with ``component``), or ``None``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    causal: torch.Tensor
    doc_ids: torch.Tensor | None = None
    t: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    block_size: int | None = None
    component: torch.Tensor | None = None
    component_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        ids = check_tensor("input_ids", self.input_ids, ndim=2, integer=True)
        B, L = ids.shape
        if B == 0 or L == 0:
            raise fail("input_ids", "a non-empty [B, L] batch", f"shape {list(ids.shape)}")
        check_tensor("labels", self.labels, shape=(B, L), integer=True)
        check_tensor("weights", self.weights, shape=(B, L), floating=True)
        check_tensor("causal", self.causal, shape=(B,), dtypes=(torch.bool,))
        if self.doc_ids is not None:
            check_tensor("doc_ids", self.doc_ids, shape=(B, L), integer=True)
        if self.t is not None:
            check_tensor("t", self.t, floating=True)
            if self.t.ndim not in (1, 2) or self.t.shape[0] != B or (self.t.ndim == 2 and self.block_size is None):
                raise fail("t", f"shape [{B}] (or [{B}, K] for block diffusion)", f"shape {list(self.t.shape)}")
        if self.valid is not None:
            check_tensor("valid", self.valid, shape=(B, L), dtypes=(torch.bool,))
        if self.scale is not None:
            check_tensor("scale", self.scale, shape=(B,), floating=True)
        if self.position_ids is not None:
            check_tensor("position_ids", self.position_ids, shape=(B, L), integer=True)
        if self.block_size is not None:
            if L % 2:
                raise fail("input_ids", "rows [x_t ; x_0] of even length 2L (block_size is set)",
                           f"shape {list(ids.shape)}")
            check_int("block_size", self.block_size, low=1, high=L // 2)
            tag_block_rows(self.causal, self.block_size)
        if (self.component is None) != (self.component_names is None):
            raise fail("component", "set together with component_names, or both None",
                       f"component={'set' if self.component is not None else None}, "
                       f"component_names={self.component_names!r}")
        if self.component is not None:
            check_tensor("component", self.component, shape=(B,), dtypes=(torch.int64,))
            if self.component.device.type != "cpu":
                raise fail("component", "a CPU tensor (host metadata, like causal)", str(self.component.device))
            self.component_names = tuple(self.component_names)

    @property
    def layout(self) -> AttentionLayout:
        """The attention layout of this batch, to hand to the model (and from it to attention) unchanged.

        Plain batches: per-row ``causal`` and ``doc_ids``. Block-diffusion batches: the block rule of
        :func:`dualobj.attention.block_diffusion_mask` over ``[x_t ; x_0]``, the documents of one half, and
        ``position_ids``.
        """
        if self.block_size is None:
            return AttentionLayout(causal=self.causal, doc_ids=self.doc_ids, position_ids=self.position_ids)
        half = self.shape[1] // 2
        docs = None if self.doc_ids is None else self.doc_ids[:, :half]
        return AttentionLayout(causal=self.causal, doc_ids=docs, block_size=self.block_size,
                               position_ids=self.position_ids)

    def component_counts(self) -> tuple[tuple[str, int], ...] | None:
        """``((name, rows), ...)``: how many rows each mixture component made (read on the CPU: no device sync)."""
        if self.component is None:
            return None
        counts = torch.bincount(self.component, minlength=len(self.component_names)).tolist()
        return tuple(zip(self.component_names, counts))

    @property
    def shape(self) -> torch.Size:
        """``[B, L]``."""
        return self.input_ids.shape

    @property
    def num_causal(self) -> int:
        """How many rows are causal (read from the CPU copy of ``causal``; no device sync)."""
        return int(self.causal.cpu().sum())

    def valid_mask(self) -> torch.Tensor:
        """``valid`` if set, else ``labels != -100``: ``[B, L]`` bool."""
        return self.valid if self.valid is not None else self.labels != IGNORE_INDEX

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device`` except ``causal``, which stays on the CPU."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            weights=move(self.weights),
            doc_ids=move(self.doc_ids),
            t=move(self.t),
            valid=move(self.valid),
            scale=move(self.scale),
            position_ids=move(self.position_ids),
        )

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        """Stack batches along rows.

        All must have the same length ``L`` and the same layout kind (the same ``block_size``, ``None`` for plain
        batches): block-diffusion rows cannot share a forward pass with plain rows, since their rows are twice as
        long and their attention follows another rule. Otherwise a :class:`~dualobj.DualObjError` names
        ``batches``.
        """
        if not isinstance(batches, (list, tuple)) or not batches:
            raise fail("batches", "a non-empty list of Batch", repr(batches) if not batches else type(batches))
        for i, b in enumerate(batches):
            if not isinstance(b, Batch):
                raise fail_type("batches", "a list of Batch", f"{type(b).__name__} at index {i}")
        lengths = sorted({b.shape[1] for b in batches})
        if len(lengths) > 1:
            raise fail("batches", "batches of one length L", f"lengths {lengths}")
        kinds = {b.block_size for b in batches}
        if len(kinds) > 1:
            shown = ", ".join("plain" if k is None else f"block diffusion (block_size={k})"
                              for k in sorted(kinds, key=lambda k: -1 if k is None else k))
            raise fail("batches", "batches of one attention layout (rows of different layouts cannot share a "
                       "forward pass; combine such objectives by step or by rank instead)", f"layouts: {shown}")

        def cat_opt(name: str, fill: float | None = None) -> torch.Tensor | None:
            values = [getattr(b, name) for b in batches]
            if all(v is None for v in values):
                return None
            if fill is None and any(v is None for v in values):
                raise fail(f"batches[*].{name}", "set on every batch or on none", "a mix of set and None")
            ref = next(v for v in values if v is not None)
            out = []
            for b, v in zip(batches, values):
                if v is None:
                    v = torch.full((b.shape[0],), fill, dtype=ref.dtype, device=ref.device)
                out.append(v)
            return torch.cat(out)

        valid = None
        if any(b.valid is not None for b in batches):
            valid = torch.cat([b.valid_mask() for b in batches])
        return Batch(
            input_ids=torch.cat([b.input_ids for b in batches]),
            labels=torch.cat([b.labels for b in batches]),
            weights=torch.cat([b.weights for b in batches]),
            causal=torch.cat([b.causal if b.causal.device.type == "cpu" else b.causal.cpu() for b in batches]),
            doc_ids=cat_opt("doc_ids"),
            t=cat_opt("t", float("nan")),
            valid=valid,
            scale=cat_opt("scale", 1.0),
            position_ids=cat_opt("position_ids"),
            block_size=batches[0].block_size,
            **_cat_components(batches),
        )


def _cat_components(batches: list[Batch]) -> dict:
    """The stacked ``component`` fields: kept when every batch carries the same names, dropped otherwise."""
    names = batches[0].component_names
    if names is None or any(b.component is None or b.component_names != names for b in batches):
        return {"component": None, "component_names": None}
    return {"component": torch.cat([b.component for b in batches]), "component_names": names}


def component_metrics(
    scored: torch.Tensor,
    labelled: torch.Tensor,
    valid: torch.Tensor,
    component: torch.Tensor,
    names: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """Per-component metrics: ``"<name>/loss"`` (``Σ w·CE / valid`` over its rows: the mean CE per target for
    AR rows, the per-token bound for MD rows, mixing factors divided out) and ``"<name>/tokens"`` (its targets).

    One ``[3, B] @ [B, k]`` product, with no Python branch on values, so a traced loss does not depend on how many
    rows each component has.

    Args:
        scored: ``[B, L]`` detached ``weights / scale · CE`` (0 where unlabelled).
        labelled: ``[B, L]`` bool, the labelled positions.
        valid: ``[B, L]`` bool, the positions counted by ``normalize="valid"``.
        component: ``[B]`` int64 component index per row, on the device of ``scored``.
        names: the ``k`` component names.
    """
    per_row = torch.stack([scored.sum(1), labelled.sum(1, dtype=scored.dtype), valid.sum(1, dtype=scored.dtype)])
    # one-hot by comparison: F.one_hot checks the values' range, a host read on an accelerator
    onehot = component[:, None] == torch.arange(len(names), device=component.device)
    sums = per_row @ onehot.to(per_row.dtype)  # [3, k]
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        out[f"{name}/loss"] = sums[0, i] / sums[2, i].clamp_min(1.0)
        out[f"{name}/tokens"] = sums[1, i]
    return out


@dataclass
class LossOutput:
    """The result of scoring a :class:`Batch`.

    Attributes:
        loss: scalar float32 to call ``backward`` on: ``total / count`` (0 when ``count`` is 0).
        total: scalar float32 with gradient: ``Σ weights · CE`` (plus the z-loss term), the numerator.
        count: scalar float32, no gradient: the normaliser chosen by ``normalize``. Sum ``count`` over
            data-parallel ranks (see :func:`dualobj.objectives.global_loss`) for exact global normalisation.
        metrics: detached scalars for logging. Keys: ``"ar/loss"`` (mean CE per AR target, nats),
            ``"ar/tokens"``, ``"md/loss"`` (per-token MD bound: ``Σ w·CE / valid`` over MD rows),
            ``"md/tokens"`` (scored MD targets), ``"md/mask_rate"`` (scored / valid over MD rows),
            ``"accuracy"`` (top-1 over all targets), ``"z_loss"`` (mean ``logsumexp²`` per target). The keys
            are always present so logging and ``torch.compile`` see a fixed structure; a kind with no tokens in
            this batch reports 0 loss and 0 tokens. A batch with ``component`` set (a mixture's, or a
            block-diffusion batch, whose rows form the component ``"bd"``) adds ``"<name>/loss"`` and
            ``"<name>/tokens"`` for each of its component names.
    """

    loss: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
