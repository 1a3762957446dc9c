"""Hugging Face ``Trainer`` integration: each micro-batch is prepared by a dualobj objective and normalised once
over the whole accumulated batch and every device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from dualobj._errors import check_choice, describe, fail, fail_type
from dualobj.integrations._masks import additive_attention_mask
from dualobj.metrics import NLLPerToken
from dualobj.objectives import NORMALIZERS, Batch, LossOutput, Normalize, ObjectiveProtocol, batch_count, cross_entropy

BATCH_KEY = "dualobj_batch"
"""Key under which :class:`DualObjectiveTrainer` stores the prepared :class:`Batch` in an inputs dict."""


class DualObjectiveTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on a dualobj objective (AR, MD or the dual mix).

    The dataset yields dicts with ``input_ids`` ``[B, L]`` (clean tokens) and optionally ``doc_ids`` ``[B, L]``,
    ``prompt_lengths`` ``[B]`` (context that is never a target or masked), ``prefix_lengths`` ``[B]`` (a
    bidirectional prefix in causal rows: prefix-LM attention) and a 2D ``attention_mask`` (padding). For every
    optimizer step the trainer

    1. fetches the step's micro-batches and runs ``objective.prepare`` on each (masks are drawn here, with a
       generator seeded from ``args.seed`` and the process index);
    2. sums their loss denominators (:func:`~dualobj.objectives.batch_count`), all-reduced over devices when
       ``args.average_tokens_across_devices`` is set; this plays the part of ``num_items_in_batch``, which
       would otherwise count shifted labels and be wrong for MD rows;
    3. runs the model with the 4D mask from :func:`additive_attention_mask`, built from ``batch.layout``
       (per-row causal or bidirectional, documents kept apart; the block rule for block-diffusion batches), with
       ``position_ids=batch.position_ids`` when the batch sets them (block diffusion: both halves of ``[x_t ; x_0]``
       count from 0), and scores the logits with :func:`~dualobj.objectives.cross_entropy`;
    4. returns ``total / N`` (times the number of processes, to cancel DDP's gradient average, when the count is
       global), already scaled for gradient accumulation.

    So the accumulated gradient equals that of one ``total / N`` over the whole global batch. Outside training
    (``evaluate``) each batch is prepared in :meth:`compute_loss` and normalised by its own count, and
    ``evaluate`` adds ``eval_nll_per_token``: ``Σ total / Σ count`` over the whole evaluation set and every
    process (a :class:`~dualobj.metrics.NLLPerToken`), the held-out NLL per token for an ``ARObjective`` and the
    negative-ELBO bound per token for an ``MDObjective`` (``weighting="elbo"``, ``z_loss=0``). Hugging Face's own
    ``eval_loss`` is a mean of per-batch means.

    Set ``remove_unused_columns=False`` in ``TrainingArguments`` when the dataset is a ``datasets.Dataset``
    carrying ``doc_ids`` or ``prompt_lengths`` (the model's forward does not take them).

    Args:
        objective: any objective following :class:`~dualobj.objectives.ObjectiveProtocol` (``ARObjective``,
            ``MDObjective``, ``DualObjective``, ``BlockDiffusionObjective``, a ``Mixture``, your own). Its
            ``prepare`` receives ``step=state.global_step``.
        normalize: the denominator (default: the objective's own ``normalize``, else ``"valid"``).
        *args, **kwargs: passed to ``transformers.Trainer``.

    Attributes:
        last_output: the :class:`LossOutput` of the latest micro-batch (its ``metrics`` are detached, for logging).
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self, *args: Any, objective: ObjectiveProtocol, normalize: Normalize | None = None, **kwargs: Any
    ) -> None:
        if isinstance(objective, type) or not isinstance(objective, ObjectiveProtocol):
            raise fail_type("objective", "a dualobj objective (with prepare and loss)", describe(objective))
        normalize = getattr(objective, "normalize", "valid") if normalize is None else normalize
        check_choice("normalize", normalize, NORMALIZERS)
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.normalize = normalize
        # Older transformers decide from this flag (with a given count) that the loss is already scaled for
        # gradient accumulation; our compute_loss never passes loss kwargs to the model.
        self.model_accepts_loss_kwargs = True
        self.last_output: LossOutput | None = None
        self._eval_metric: NLLPerToken | None = None
        self.last_output_labels: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(int(self.args.seed) * 1009 + int(self.args.process_index))

    def _prepare_objective(self, inputs: dict[str, Any]) -> Batch:
        if "input_ids" not in inputs:
            raise fail("inputs", "a dict with 'input_ids' [B, L] (clean tokens)", sorted(inputs))
        return self.objective.prepare(
            inputs["input_ids"],
            step=int(self.state.global_step),
            doc_ids=inputs.get("doc_ids"),
            prompt_lengths=inputs.get("prompt_lengths"),
            generator=self._generator,
        )

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, *args: Any, **kwargs: Any
    ) -> tuple[list, torch.Tensor | None]:
        """Fetch one optimizer step's micro-batches, prepare each, and count the step's global denominator."""
        samples = []
        for _ in range(num_batches):
            try:
                samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not samples:
            return samples, None
        for sample in samples:
            sample[BATCH_KEY] = self._prepare_objective(sample)
        count = batch_count([s[BATCH_KEY] for s in samples], self.normalize).to(self.args.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return samples, count

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Forward the prepared batch with its 4D mask and return ``total / N`` (see the class docstring)."""
        batch = inputs.get(BATCH_KEY)
        prepared_for_step = batch is not None and num_items_in_batch is not None
        if batch is None:
            batch = self._prepare_objective(inputs)
        batch = batch.to(inputs["input_ids"].device)
        dtype = getattr(self.accelerator.unwrap_model(model), "dtype", torch.float32)
        mask = additive_attention_mask(
            batch,
            dtype=dtype,
            prefix_lengths=inputs.get("prefix_lengths"),
            padding_mask=inputs.get("attention_mask"),
        )
        extra = {} if batch.position_ids is None else {"position_ids": batch.position_ids}
        outputs = model(input_ids=batch.input_ids, attention_mask=mask, **extra)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        out = cross_entropy(logits, batch, z_loss=getattr(self.objective, "z_loss", 0.0), normalize=self.normalize)
        self.last_output = out
        self.last_output_labels = batch.labels
        if self._eval_metric is not None and not model.training:
            self._eval_metric.update(out)
        if prepared_for_step:
            loss = out.total / torch.as_tensor(num_items_in_batch, device=out.total.device).clamp_min(1.0)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = out.loss
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Score one evaluation batch with the objective: ``(loss, logits, labels)``, labels aligned with logits
        (``Batch.labels``: use ``shift=False`` metrics in ``compute_metrics``)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return loss.detach(), logits.detach(), self.last_output_labels

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """Run Hugging Face's loop and add ``<prefix>_nll_per_token`` (synced over processes) to its metrics."""
        self._eval_metric = NLLPerToken().to(self.args.device)
        try:
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            output.metrics[f"{prefix}_nll_per_token"] = float(self._eval_metric.compute())
        finally:
            self._eval_metric = None
        return output
