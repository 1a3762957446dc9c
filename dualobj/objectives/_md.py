"""The masked-diffusion objective, read out as masked next-token prediction (or in place)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualobj._errors import check_choice, check_tensor, describe, fail
from dualobj.masking import maskable_positions, random_mask
from dualobj.objectives._base import Objective, check_tokens, same_document_next, shift_left
from dualobj.objectives._batch import IGNORE_INDEX, Batch
from dualobj.schedules import LinearSchedule, NoiseSchedule, TimeSampler, UniformSampler

WEIGHTINGS = ("elbo", "realized", "none")


class MDObjective(Objective):
    r"""Masked diffusion (absorbing ``<mask>`` state) with the continuous-time ELBO.

    For each row a noise level ``t`` is drawn, a share ``mask_rate(t)`` of its maskable tokens is replaced by
    ``mask_token_id``, and the model, attending bidirectionally, is scored only on the masked tokens:

    .. math::
        L_{MD} = \mathbb{E}_{t}\Big[w(t) \sum_{i\ \text{masked}} -\log p_\theta(x_i \mid x_t)\Big] \Big/ n,
        \qquad w(t) = \frac{-\alpha'(t)}{1-\alpha(t)}\ \ (= 1/t \text{ for the linear schedule}).

    With ``shift=True`` (the paper's masked next-token prediction) output ``i`` predicts token ``i + 1`` and is
    scored where token ``i + 1`` is masked; the first token of a row or of a packed document has no predecessor
    and is never masked. With ``shift=False`` output ``i`` predicts token ``i`` in place (MDLM style).

    Args:
        mask_token_id: the id written at masked positions. It must not be a maskable id: with ``num_special``
            it must be ``< num_special``; with ``special_ids`` it must be one of them.
        schedule: a :class:`~dualobj.schedules.NoiseSchedule` (default :class:`~dualobj.schedules.LinearSchedule`).
        sampler: a :class:`~dualobj.schedules.TimeSampler` for ``t`` (default ``UniformSampler(t_min, 1)``).
        shift: masked next-token prediction (True) or in-place prediction (False).
        weighting: ``"elbo"``: ``w(t)`` times the sampler's importance weight (an unbiased ELBO estimate with
            ``exact=False``; with an exact count, the paper's estimator); ``"realized"``: ``1/(k/n)`` with ``k``
            masked of ``n`` maskable in the row (the official code); ``"none"``: 1 (plain masked LM).
        exact: mask exactly ``round(mask_rate(t)·n)`` positions per row (True) or Bernoulli(``mask_rate(t)``).
        rounding: how the exact count is rounded (``"stochastic"`` keeps its expectation exact).
        min_count: at least this many masked positions per row (the official code uses 1).
        special_ids / num_special / pad_id: never masked (see :func:`dualobj.masking.maskable_positions`).
        t_min: ``t`` is clamped to ``[t_min, 1]`` so weights stay finite.
        z_loss, normalize: as for :class:`~dualobj.objectives.Objective`. ``"valid"`` divides by the maskable
            positions, which makes the loss the per-token ELBO.
    """

    def __init__(
        self,
        mask_token_id: int,
        *,
        schedule: NoiseSchedule | None = None,
        sampler: TimeSampler | None = None,
        shift: bool = True,
        weighting: str = "elbo",
        exact: bool = True,
        rounding: str = "stochastic",
        min_count: int = 0,
        special_ids: Sequence[int] | None = None,
        num_special: int | None = None,
        pad_id: int | None = None,
        t_min: float = 1e-3,
        z_loss: float = 0.0,
        normalize: str = "valid",
    ) -> None:
        super().__init__(z_loss=z_loss, normalize=normalize)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise fail("mask_token_id", "an int >= 0", describe(mask_token_id))
        if num_special is not None and mask_token_id >= num_special:
            raise fail("mask_token_id", f"a special id < num_special={num_special} (ids >= num_special are "
                       "maskable)", mask_token_id)
        if special_ids is not None and mask_token_id not in list(special_ids):
            raise fail("mask_token_id", f"one of special_ids={list(special_ids)}", mask_token_id)
        if pad_id is not None and pad_id == mask_token_id:
            raise fail("mask_token_id", f"an id different from pad_id={pad_id}", mask_token_id)
        check_choice("weighting", weighting, WEIGHTINGS)
        if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not 0.0 < t_min < 1.0:
            raise fail("t_min", "a number in (0, 1)", describe(t_min))
        self.mask_token_id = mask_token_id
        self.schedule = schedule if schedule is not None else LinearSchedule()
        self.sampler = sampler if sampler is not None else UniformSampler(t_min, 1.0)
        self.shift = bool(shift)
        self.weighting = weighting
        self.exact = bool(exact)
        self.rounding = rounding
        self.min_count = min_count
        self.special_ids = None if special_ids is None else [int(i) for i in special_ids]
        self.num_special = num_special
        self.pad_id = pad_id
        self.t_min = float(t_min)

    def eligible(
        self,
        tokens: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, L]`` bool: positions that may be masked (and so scored) under this objective's policy."""
        B, L = check_tokens(tokens, doc_ids, prompt_lengths)
        out = maskable_positions(
            tokens,
            special_ids=self.special_ids,
            num_special=self.num_special,
            pad_id=self.pad_id,
            prompt_lengths=prompt_lengths,
        )
        if self.shift:
            # A token is predicted from the position before it, inside its own document.
            out &= torch.roll(same_document_next(doc_ids, B, L, tokens.device), 1, dims=1)
        return out

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Draw ``t`` and a mask per row, and build the MD batch.

        Args:
            tokens: ``[B, L]`` clean integer ids (must not contain ``mask_token_id``).
            step: accepted and ignored (this objective does not depend on the step).
            doc_ids: ``[B, L]`` document ids of packed rows.
            prompt_lengths: ``[B]``; tokens before this position are never masked (conditioning prompt).
            generator: the source of randomness; the same seed gives the same batch on any device.
        """
        B, _ = check_tokens(tokens, doc_ids, prompt_lengths)
        if not torch.compiler.is_compiling() and bool((tokens == self.mask_token_id).any()):
            raise fail("tokens", f"clean ids without mask_token_id={self.mask_token_id}",
                       "a batch that already contains it")
        maskable = self.eligible(tokens, doc_ids=doc_ids, prompt_lengths=prompt_lengths)
        sample = self.sampler(B, device=tokens.device, generator=generator)
        t = sample.t.to(tokens.device).float().clamp(self.t_min, 1.0)
        mask = random_mask(
            tokens,
            self.schedule.mask_rate(t),
            exact=self.exact,
            maskable=maskable,
            rounding=self.rounding,
            min_count=self.min_count,
            generator=generator,
        )
        return self.build(tokens, mask, t, importance=sample.weight.to(tokens.device).float(),
                          maskable=maskable, doc_ids=doc_ids)

    def build(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        t: torch.Tensor,
        *,
        maskable: torch.Tensor,
        importance: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> Batch:
        """The deterministic half of :meth:`prepare`: the batch for a given mask and noise level.

        Args:
            tokens: ``[B, L]`` clean ids.
            mask: ``[B, L]`` bool, True = replaced by ``mask_token_id`` (must lie inside ``maskable``).
            t: ``[B]`` noise levels (clamped to ``[t_min, 1]``).
            maskable: ``[B, L]`` bool, the positions that could have been masked (the ``"valid"`` count).
            importance: ``[B]`` importance weights from the time sampler (1 when ``None``).
            doc_ids: ``[B, L]`` document ids, passed through for attention.
        """
        B, L = tokens.shape
        check_tensor("mask", mask, shape=(B, L), dtypes=(torch.bool,))
        check_tensor("t", t, shape=(B,), floating=True)
        check_tensor("maskable", maskable, shape=(B, L), dtypes=(torch.bool,))
        mask = mask & maskable
        t = t.float().clamp(self.t_min, 1.0)
        if self.weighting == "elbo":
            row_w = self.schedule.weight(t).float()
            if importance is not None:
                row_w = row_w * importance
        elif self.weighting == "realized":
            k = mask.sum(dim=1, dtype=torch.float32)
            n = maskable.sum(dim=1, dtype=torch.float32)
            row_w = 1.0 / (k / n.clamp_min(1.0)).clamp_min(self.t_min)
        else:
            row_w = torch.ones(B, device=tokens.device)
        if self.shift:
            scored = shift_left(mask, False)
            valid = shift_left(maskable, False)
            target = shift_left(tokens, IGNORE_INDEX)
        else:
            scored, valid, target = mask, maskable, tokens
        labels = torch.where(scored, target, IGNORE_INDEX)
        return Batch(
            input_ids=torch.where(mask, self.mask_token_id, tokens),
            labels=labels,
            weights=row_w[:, None] * scored,
            causal=torch.zeros(B, dtype=torch.bool),
            doc_ids=doc_ids,
            t=t,
            valid=valid,
            scale=None,
        )

    def __repr__(self) -> str:
        return (f"MDObjective(mask_token_id={self.mask_token_id}, schedule={self.schedule!r}, "
                f"sampler={self.sampler!r}, shift={self.shift}, weighting={self.weighting!r}, "
                f"exact={self.exact})")
