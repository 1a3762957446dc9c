"""The masked-diffusion objective, read out as masked next-token prediction (or in place), and the masked-LM
objectives built from the same pieces (span masking, BERT-style corruption, a fixed or scheduled rate)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from dualobj import _random
from dualobj._errors import (
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_number,
    check_tensor,
    describe,
    fail,
    fail_type,
    validation_enabled,
)
from dualobj.masking import Corruption, RandomMasker, count_mask, maskable_positions, random_mask
from dualobj.objectives._base import Objective, check_tokens, same_document_next, shift_left
from dualobj.objectives._batch import IGNORE_INDEX, Batch
from dualobj.schedules import LinearSchedule, NoiseSchedule, StratifiedSampler, TimeSampler, UniformSampler

WEIGHTINGS = ("elbo", "none")
ESTIMATORS = ("count", "bernoulli", "official")
OFFICIAL_FLOOR = 1e-4
"""The floor of the official code's per-token weight ``(1 − 1e-4)·k/L + 1e-4``."""

_TINY = 1e-30


def _elbo_weight(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """``w(t)`` in float64 at ``t > 0`` itself: the built-in schedules evaluate ``weight`` at ``max(t, eps)``, which
    would bias the Bernoulli estimator for schedules whose mask rate at ``eps`` is still large (``t^0.25``: 0.03).
    ``t`` here is at least ``T(t_min) > 0``, so the unclamped closed form is finite."""
    closed_form = getattr(schedule, "_weight", None)
    t = t.double()
    if callable(closed_form):
        return closed_form(t.clamp_min(torch.finfo(torch.float64).tiny)).double()
    return schedule.weight(t).double()


def _time_at(schedule: NoiseSchedule, rate: torch.Tensor) -> torch.Tensor:
    """``t`` with ``mask_rate(t) = rate`` (float64, clamped to [0, 1])."""
    return schedule.t_at_rate(rate.double().clamp(0.0, 1.0)).double().clamp(0.0, 1.0)


class MDObjective(Objective):
    r"""Masked diffusion (absorbing ``<mask>`` state) trained on an unbiased estimate of its negative ELBO, or a
    masked-LM objective (span masking, BERT-style corruption, a fixed rate) built from the same pieces.

    **ELBO mode** (``weighting="elbo"``, the default with random masking). For a row with ``n`` maskable tokens the
    negative ELBO of every schedule with ``α(0) = 1, α(1) = 0`` is

    .. math::
        \mathrm{NELBO} = \int_0^1 w(t)\, \mathbb{E}\Big[\sum_{i \in M_t} -\log p_\theta(x_i \mid x_{M_t})\Big] dt
        = \sum_{k=1}^{n} \frac{1}{k}\, \mathbb{E}_{|M| = k}\Big[\sum_{i\in M} -\log p_\theta(x_i \mid x_M)\Big],

    with ``w(t) = −α'(t)/(1 − α(t))``. ``estimator`` chooses how one row estimates it:

    - ``"count"`` (default): ``t`` from the sampler, then exactly ``k = ⌈mask_rate(t)·n⌉`` (at least 1) uniformly
      chosen tokens are masked and the row is weighted ``1/(k·P(k))``, where
      ``P(k) = T(k/n) − T((k−1)/n)`` is the probability of that count (``T`` = ``schedule.t_at_rate``). Unbiased for
      the NELBO above, for every model and schedule, with no truncation (``t_min`` is not used). With the linear
      schedule ``k ~ U{1..n}`` and the weight is ``n/k``.
    - ``"bernoulli"``: every maskable token is masked independently with probability ``mask_rate(t)``, weight
      ``w(t)``. ``t`` is drawn on ``[T(t_min), 1]`` (truncation on the *mask rate*, the same for every schedule)
      and the weight is multiplied by ``1 − T(t_min)``, so the row estimates exactly the NELBO restricted to mask
      rates ``≥ t_min`` (smaller than the full NELBO by ``O(t_min)``).
    - ``"official"``: the dual-objective paper's code, for reproducing it: ``k = max(1, ⌊L·mask_rate(t) + u⌋)``
      counted over the full row length ``L`` (special tokens included; dualobj clamps ``k`` to ``n``), weight
      ``1/((1 − 1e-4)·k/L + 1e-4)``. **Biased** for the NELBO (see ``docs/objectives.md``).

    **Masked-LM mode** (``weighting="none"``, the default when a ``masker``, a ``corruption`` or a fixed ``rate``
    is given): the masker chooses the positions at the rate (``rate``, or ``mask_rate(t)`` for ``t`` from the
    sampler), the corruption decides what they show, and every masked position is scored with weight 1. This is
    not a likelihood bound: span masking and corruption do not give an ELBO, so ``weighting="elbo"`` with them is
    refused.

    With ``shift=True`` (the paper's masked next-token prediction) output ``i`` predicts token ``i + 1`` and is
    scored where token ``i + 1`` is masked; the first token of a row or of a packed document has no predecessor
    and is never masked. With ``shift=False`` output ``i`` predicts token ``i`` in place (MDLM style).

    Args:
        mask_token_id: the id written at masked positions. It must not be a maskable id: with ``num_special``
            it must be ``< num_special``; with ``special_ids`` it must be one of them.
        schedule: a :class:`~dualobj.schedules.NoiseSchedule` (default :class:`~dualobj.schedules.LinearSchedule`).
        sampler: a :class:`~dualobj.schedules.TimeSampler` drawing ``t`` on ``[0, 1]`` (default
            ``UniformSampler()``; ``StratifiedSampler()`` lowers the variance). Its importance weights multiply
            the row weights. In ELBO mode a sampler restricted to a sub-range of ``[0, 1]`` is refused (the
            objective truncates on the mask rate itself).
        estimator: ``"count"`` (default), ``"bernoulli"`` or ``"official"`` (ELBO mode only).
        weighting: ``"elbo"`` or ``"none"``; ``None`` picks ``"elbo"`` for random masking and ``"none"`` when a
            ``masker``, ``corruption`` or ``rate`` is given.
        masker: a :class:`~dualobj.masking.Masker` (``RandomMasker(...)``, ``SpanMasker(...)`` or any callable
            ``masker(tokens, rate, *, maskable, generator) -> [B, L] bool``); masked-LM mode.
        corruption: a :class:`~dualobj.masking.Corruption` (e.g. BERT's 80/10/10); masked-LM mode.
        rate: a fixed mask rate in ``(0, 1]`` or a step schedule ``step -> rate`` (then ``prepare`` needs
            ``step``); masked-LM mode. ``None`` draws the rate from the schedule at ``t`` from the sampler.
        complementary: also score each row's complement (the maskable tokens it did not mask), so every maskable
            token is scored exactly once across the pair; ``prepare`` returns ``2B`` rows (the ``B`` draws, then
            their complements) weighted so the estimate stays unbiased. ``"count"`` and ``"bernoulli"`` only.
        shift: masked next-token prediction (True) or in-place prediction (False).
        exact: shortcut: ``exact=False`` selects ``estimator="bernoulli"`` (ELBO mode) or Bernoulli masking
            (masked-LM mode, as ``RandomMasker(exact=False)``).
        rounding, min_count: masked-LM mode: the default masker's rounding and minimum count. In ELBO mode
            ``rounding`` is refused (the estimator fixes the count), and ``min_count`` may only be 0 or 1 with
            ``"count"`` (which masks at least one token anyway), 0 with ``"bernoulli"``, 1 with ``"official"``:
            other values bias the estimate.
        special_ids / num_special / pad_id: never masked (see :func:`dualobj.masking.maskable_positions`).
        t_min: the ``"bernoulli"`` estimator's truncation: mask rates below ``t_min`` are left out (weights stay
            finite). Not used by the other estimators.
        z_loss, normalize: as for :class:`~dualobj.objectives.Objective`. ``"valid"`` divides by the maskable
            positions, which makes the loss the per-token NELBO.
    """

    def __init__(
        self,
        mask_token_id: int,
        *,
        schedule: NoiseSchedule | None = None,
        sampler: TimeSampler | None = None,
        estimator: Literal["count", "bernoulli", "official"] | None = None,
        weighting: Literal["elbo", "none"] | None = None,
        masker: Callable[..., torch.Tensor] | None = None,
        corruption: Corruption | None = None,
        rate: float | Callable[[int], float] | None = None,
        complementary: bool = False,
        shift: bool = True,
        exact: bool | None = None,
        rounding: str | None = None,
        min_count: int | None = None,
        special_ids: Sequence[int] | None = None,
        num_special: int | None = None,
        pad_id: int | None = None,
        t_min: float = 1e-3,
        z_loss: float = 0.0,
        normalize: str = "valid",
    ) -> None:
        super().__init__(z_loss=z_loss, normalize=normalize)
        check_int("mask_token_id", mask_token_id, low=0)
        if num_special is not None:
            check_int("num_special", num_special, low=0)
            if mask_token_id >= num_special:
                raise fail("mask_token_id", f"a special id < num_special={num_special} (ids >= num_special are "
                           "maskable)", mask_token_id)
        if special_ids is not None and mask_token_id not in list(special_ids):
            raise fail("mask_token_id", f"one of special_ids={list(special_ids)}", mask_token_id)
        if pad_id is not None:
            check_int("pad_id", pad_id)
            if pad_id == mask_token_id:
                raise fail("mask_token_id", f"an id different from pad_id={pad_id}", mask_token_id)
        self.t_min = check_number("t_min", t_min, low=0.0, high=1.0, low_open=True, high_open=True)
        self.shift = check_bool("shift", shift)
        self.complementary = check_bool("complementary", complementary)
        if exact is not None:
            check_bool("exact", exact)
        if schedule is None:
            schedule = LinearSchedule()
        elif not isinstance(schedule, NoiseSchedule) or isinstance(schedule, type):
            raise fail_type("schedule", "a NoiseSchedule instance such as LinearSchedule() or CosineSchedule('cos')",
                            describe(schedule))
        if sampler is None:
            sampler = UniformSampler()
        elif not callable(sampler) or isinstance(sampler, (str, type)):
            raise fail_type("sampler", "a TimeSampler instance such as UniformSampler() or StratifiedSampler()",
                            describe(sampler))
        if masker is not None and (not callable(masker) or isinstance(masker, (str, type))):
            raise fail_type("masker", "a Masker such as RandomMasker() or SpanMasker(UniformSpans(3))",
                            describe(masker))
        if corruption is not None:
            if not callable(corruption) or isinstance(corruption, type):
                raise fail_type("corruption", "a Corruption(...)", describe(corruption))
            vocab = getattr(corruption, "vocab_range", None)
            if vocab is not None and vocab[0] <= mask_token_id < vocab[1]:
                raise fail("corruption", f"a vocab_range without mask_token_id={mask_token_id}", vocab)
        if rate is not None and not callable(rate):
            check_number("rate", rate, low=0.0, high=1.0, low_open=True)
        self.mask_token_id = mask_token_id
        self.schedule = schedule
        self.sampler = sampler
        self.corruption = corruption
        self.rate = rate
        self.special_ids = None if special_ids is None else [int(i) for i in special_ids]
        self.num_special = num_special
        self.pad_id = pad_id

        if weighting == "realized":
            raise fail("weighting", "'elbo' or 'none' (the official code's realized k/L weight is "
                       "estimator='official', a biased estimator kept for reproduction)", repr(weighting))
        mlm_parts = [name for name, value in (("masker", masker), ("corruption", corruption), ("rate", rate))
                     if value is not None]
        if weighting is None:
            weighting = "none" if mlm_parts else "elbo"
        check_choice("weighting", weighting, WEIGHTINGS)
        self.weighting = weighting
        if weighting == "elbo":
            if mlm_parts:
                raise fail("weighting", f"'none' with {', '.join(mlm_parts)}: the ELBO weight holds only for "
                           "uniformly random masking with every masked token shown as the mask id (span masking, "
                           "corruption and a fixed rate make a masked-LM objective, not an ELBO)", repr(weighting))
            if estimator is None:
                estimator = "bernoulli" if exact is False else "count"
            check_choice("estimator", estimator, ESTIMATORS)
            if exact is False and estimator != "bernoulli":
                raise fail("exact", f"True or None with estimator={estimator!r} (exact=False is the Bernoulli "
                           "estimator)", exact)
            if exact is True and estimator == "bernoulli":
                raise fail("exact", "False or None with estimator='bernoulli'", exact)
            if rounding is not None:
                raise fail("rounding", "None with weighting='elbo' (the estimator fixes how many tokens are "
                           "masked; rounding applies to masked-LM objectives)", repr(rounding))
            allowed = {"count": (0, 1), "bernoulli": (0,), "official": (1,)}[estimator]
            if min_count is not None:
                check_int("min_count", min_count, low=0)
                if min_count not in allowed:
                    why = {"count": "the count estimator masks at least one token already; a larger minimum "
                                    "changes the count distribution its weight corrects for",
                           "bernoulli": "a minimum count is not Bernoulli masking, so w(t) would no longer be "
                                        "the right weight (biased upward)",
                           "official": "the official estimator always masks at least one token"}[estimator]
                    raise fail("min_count", f"{' or '.join(map(str, allowed))} with estimator={estimator!r} "
                               f"({why})", min_count)
            if complementary and estimator == "official":
                raise fail("complementary", "False with estimator='official' (complementary pairs are defined "
                           "for the unbiased estimators 'count' and 'bernoulli')", complementary)
            lo, hi = getattr(sampler, "t_min", 0.0), getattr(sampler, "t_max", 1.0)
            if (lo, hi) != (0.0, 1.0):
                raise fail("sampler", "a sampler on [0, 1] in ELBO mode (the objective truncates on the mask rate "
                           f"with t_min={self.t_min}; a narrower time range would bias the estimate)",
                           repr(sampler))
            self.estimator: str | None = estimator
            self.masker = None
            if estimator == "bernoulli" and isinstance(sampler, (UniformSampler, StratifiedSampler)):
                self._warn_if_heavy_tailed()
        else:
            if estimator is not None:
                raise fail("estimator", "None with weighting='none' (estimators are ELBO weightings)",
                           repr(estimator))
            if complementary:
                raise fail("complementary", "False with weighting='none' (complementary pairs are an ELBO "
                           "variance reduction)", complementary)
            if masker is None:
                masker = RandomMasker(exact=True if exact is None else exact,
                                      rounding="stochastic" if rounding is None else rounding,
                                      min_count=0 if min_count is None else min_count)
            elif exact is not None or rounding is not None or min_count is not None:
                raise fail("masker", "no exact/rounding/min_count besides a masker (give them to the masker)",
                           describe(masker))
            self.estimator = None
            self.masker = masker

    # ------------------------------------------------------------------------------------------------ helpers

    def _warn_if_heavy_tailed(self) -> None:
        """Warn when the Bernoulli estimator's variance explodes with this schedule.

        Under ``t ~ U`` a row at mask rate ``m`` is weighted ``(1 − T(t_min))·w(T(m))``, and the second moment of
        the estimate grows like ``∫_{t_min}^1 w(T(m)) dm`` (``ln(1/t_min)`` for the linear schedule). Schedules
        whose rate rises steeply at ``t = 0`` (``t^0.25``: ``∝ t_min^-3``) draw small rates so rarely that their
        weights dominate: the estimate stays unbiased but is useless.
        """
        import math
        import warnings

        m = torch.logspace(math.log10(self.t_min), 0.0, 2001, dtype=torch.float64)
        w = _elbo_weight(self.schedule, _time_at(self.schedule, m))
        proxy = float(torch.trapezoid(w, m))
        linear = math.log(1.0 / self.t_min)
        if not proxy <= 1000.0 * linear:
            warnings.warn(
                f"MDObjective(estimator='bernoulli') with {self.schedule!r} and t_min={self.t_min}: the variance "
                f"proxy ∫ w(T(m)) dm over mask rates m >= t_min is {proxy:.3g}, {proxy / linear:.3g}x the linear "
                "schedule's: small mask rates are drawn so rarely that their weights dominate the estimate. Use "
                "estimator='count' (the default), an importance sampler with more draws near t = 0, or a larger "
                "t_min.",
                stacklevel=3,
            )

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

    def _count_probabilities(
        self, counts: list[torch.Tensor], n: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """For each ``[B]`` count tensor ``c``: ``P(c)`` (float64), the probability that ``⌈mask_rate(t)·n⌉ = c``
        (``c >= 1``) for ``t ~ U(0, 1)``, 0 where ``c < 1`` or ``c > n``; and ``T(c/n)``. One schedule call for all."""
        nf = n.double().clamp_min(1.0)
        rates = torch.stack([r for c in counts for r in (c.double() / nf, (c.double() - 1.0) / nf)])
        times = _time_at(self.schedule, rates.clamp(0.0, 1.0)).unbind(0)
        probs, upper = [], []
        for i, c in enumerate(counts):
            hi, lo = times[2 * i], times[2 * i + 1]
            probs.append(torch.where((c >= 1) & (c <= n), hi - lo, 0.0))
            upper.append(hi)
        return probs, upper

    def _bernoulli_density(self, r: torch.Tensor, t_lo: torch.Tensor) -> torch.Tensor:
        """``r · p(r)`` ``[B]`` float64: ``p`` the density of the mask rate under ``t ~ U(T(t_min), 1)``; 0 outside
        ``[t_min, mask_rate(1)]``."""
        top = self.schedule.mask_rate(torch.ones((), dtype=torch.float64, device=r.device)).double()
        t = _time_at(self.schedule, r)
        w = _elbo_weight(self.schedule, t)
        inside = (r >= self.t_min) & (r <= top) & (r > 0)
        return torch.where(inside, 1.0 / ((1.0 - t_lo) * w).clamp_min(_TINY), 0.0)

    def _row_rate(self, B: int, step: int | None, device: torch.device) -> torch.Tensor:
        rate = self.rate
        if callable(rate):
            if step is None:
                raise fail("step", "the training step (this objective's mask rate is a step schedule)", None)
            check_int("step", step, low=0)
            rate = check_number("rate(step)", rate(step), low=0.0, high=1.0)
        return torch.full((B,), float(rate), dtype=torch.float32, device=device)

    # ------------------------------------------------------------------------------------------------ prepare

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Draw a mask per row (and, in ELBO mode, a noise level and its estimator weight); build the batch.

        Args:
            tokens: ``[B, L]`` clean ids of any integer dtype (must not contain ``mask_token_id``).
            step: the training step; needed only when ``rate`` is a step schedule.
            doc_ids: ``[B, L]`` document ids of packed rows.
            prompt_lengths: ``[B]``; tokens before this position are never masked (conditioning prompt).
            generator: the source of randomness; the same seed gives the same batch on any device.

        Returns:
            A :class:`Batch` of ``B`` rows (``2B`` with ``complementary=True``: the draws, then their complements).
        """
        check_generator("generator", generator)
        B, L = check_tokens(tokens, doc_ids, prompt_lengths)
        if step is not None:
            check_int("step", step, low=0)
        tokens = tokens.long()  # (build refuses tokens that contain mask_token_id)
        device = tokens.device
        maskable = self.eligible(tokens, doc_ids=doc_ids, prompt_lengths=prompt_lengths)
        if self.weighting == "none":
            return self._prepare_mlm(tokens, maskable, step, doc_ids, generator)
        sample = self.sampler(B, device=device, generator=generator)
        u = sample.t.to(device).double().clamp(0.0, 1.0)
        iw = sample.weight.to(device).double()
        n = maskable.sum(dim=1)
        if self.estimator == "bernoulli":
            t_lo = _time_at(self.schedule, torch.tensor(self.t_min, dtype=torch.float64, device=device))
            t = t_lo + (1.0 - t_lo) * u
            r = self.schedule.mask_rate(t).double()
            mask = random_mask(tokens, r.clamp(0.0, 1.0), exact=False, maskable=maskable, generator=generator)
            if not self.complementary:
                weight = iw * (1.0 - t_lo) * _elbo_weight(self.schedule, t)
                return self.build(tokens, mask, t.float(), maskable=maskable, doc_ids=doc_ids,
                                  row_weight=weight.float())
            s = 1.0 - r
            rp_r = self._bernoulli_density(r, t_lo)  # r·p(r)
            sp_s = self._bernoulli_density(s, t_lo)  # s·p(s)
            # r·p(1 − r) = (r / s)·(s·p(s)), and s·p(r) = (s / r)·(r·p(r)).
            rp_s = torch.where(s > 0, r / s.clamp_min(_TINY) * sp_s, 0.0)
            sp_r = torch.where(r > 0, s / r.clamp_min(_TINY) * rp_r, 0.0)
            w_first = 2.0 * iw / (rp_r + rp_s).clamp_min(_TINY)
            w_second = torch.where(s >= self.t_min, 2.0 * iw / (sp_s + sp_r).clamp_min(_TINY), 0.0)
            return self._pair(tokens, mask, maskable, doc_ids, t, _time_at(self.schedule, s), w_first, w_second)
        rate = self.schedule.mask_rate(u).double().clamp(0.0, 1.0)
        nf = n.double()
        if self.estimator == "official":
            v = _random.rand((B,), generator=generator, device=device, dtype=torch.float64)
            k = torch.minimum(torch.floor(L * rate + v).long().clamp_min(1), n)
        else:
            k = torch.minimum(torch.ceil(rate * nf).long().clamp_min(1), n)
        mask = count_mask(tokens, k, maskable=maskable, generator=generator)
        kf = k.double()
        if self.estimator == "official":
            weight = iw / ((1.0 - OFFICIAL_FLOOR) * kf / L + OFFICIAL_FLOOR)
            return self.build(tokens, mask, u.float(), maskable=maskable, doc_ids=doc_ids, row_weight=weight.float())
        if not self.complementary:
            (p_k,), (t,) = self._count_probabilities([k], n)
            weight = torch.where(k >= 1, iw / (kf * p_k).clamp_min(_TINY), 0.0)
            return self.build(tokens, mask, t.float(), maskable=maskable, doc_ids=doc_ids, row_weight=weight.float())
        j = n - k
        (p_k, p_j), (t, t_second) = self._count_probabilities([k, j], n)
        # A row with count c is weighted 2 / (c·(P(c) + P(n − c))): a count c arises as a draw (probability P(c))
        # or as the complement of the draw n − c (probability P(n − c)).
        w_first = torch.where(k >= 1, 2.0 * iw / (kf * (p_k + p_j)).clamp_min(_TINY), 0.0)
        w_second = torch.where(j >= 1, 2.0 * iw / (j.double() * (p_j + p_k)).clamp_min(_TINY), 0.0)
        return self._pair(tokens, mask, maskable, doc_ids, t, t_second, w_first, w_second)

    def _pair(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        maskable: torch.Tensor,
        doc_ids: torch.Tensor | None,
        t_first: torch.Tensor,
        t_second: torch.Tensor,
        w_first: torch.Tensor,
        w_second: torch.Tensor,
    ) -> Batch:
        """The ``2B`` rows of complementary pairs: the draws, then their complements."""
        return self.build(
            torch.cat([tokens, tokens]),
            torch.cat([mask, maskable & ~mask]),
            torch.cat([t_first, t_second]).float(),
            maskable=torch.cat([maskable, maskable]),
            doc_ids=None if doc_ids is None else torch.cat([doc_ids, doc_ids]),
            row_weight=torch.cat([w_first, w_second]).float(),
        )

    def _prepare_mlm(
        self,
        tokens: torch.Tensor,
        maskable: torch.Tensor,
        step: int | None,
        doc_ids: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> Batch:
        B, L = tokens.shape
        device = tokens.device
        if self.rate is not None:
            rate = self._row_rate(B, step, device)
            t = self.schedule.t_at_rate(rate).float()
        else:
            t = self.sampler(B, device=device, generator=generator).t.to(device).float()
            rate = self.schedule.mask_rate(t).float().clamp(0.0, 1.0)
        spans = None
        per_span = self.corruption is not None and getattr(self.corruption, "per_span", False)
        with_spans = getattr(self.masker, "with_spans", None)
        if per_span and callable(with_spans):
            mask, spans = with_spans(tokens, rate, maskable=maskable, generator=generator)
        else:
            mask = self.masker(tokens, rate, maskable=maskable, generator=generator)
        check_tensor("masker(...)", mask, shape=(B, L), dtypes=(torch.bool,))
        mask = mask & maskable
        inputs = None
        if self.corruption is not None:
            inputs = self.corruption(tokens, mask, mask_token_id=self.mask_token_id, spans=spans,
                                     generator=generator)
        return self.build(tokens, mask, t, maskable=maskable, doc_ids=doc_ids, input_ids=inputs)

    # ------------------------------------------------------------------------------------------------ build

    def build(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        t: torch.Tensor,
        *,
        maskable: torch.Tensor,
        importance: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        row_weight: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> Batch:
        """The deterministic half of :meth:`prepare`: the batch for a given mask, noise level and row weight.

        Args:
            tokens: ``[B, L]`` clean ids (any integer dtype), without ``mask_token_id``.
            mask: ``[B, L]`` bool, True = masked and scored (only positions inside ``maskable`` count).
            t: ``[B]`` noise levels (recorded in the batch).
            maskable: ``[B, L]`` bool, the positions that could have been masked (the ``"valid"`` count).
            importance: ``[B]`` importance weights from the time sampler (1 when ``None``), used only when
                ``row_weight`` is ``None``.
            doc_ids: ``[B, L]`` document ids, passed through for attention.
            row_weight: ``[B]`` per-row weights; ``None`` gives the plain continuous-time weight
                ``w(t)·importance`` with ``weighting="elbo"`` (the Bernoulli estimator's weight, as the held-out
                evaluation uses it) and 1 with ``weighting="none"``.
            input_ids: ``[B, L]`` model inputs when masked positions show something else than the mask id
                (a corruption); default: ``mask_token_id`` at every masked position.
        """
        check_tensor("tokens", tokens, ndim=2, integer=True)
        tokens = tokens.long()
        if validation_enabled() and bool((tokens == self.mask_token_id).any()):
            raise fail("tokens", f"clean ids without mask_token_id={self.mask_token_id}",
                       "a batch that already contains it")
        B, L = tokens.shape
        check_tensor("mask", mask, shape=(B, L), dtypes=(torch.bool,))
        check_tensor("t", t, shape=(B,), floating=True)
        check_tensor("maskable", maskable, shape=(B, L), dtypes=(torch.bool,))
        mask = mask & maskable
        t = t.float()
        if row_weight is not None:
            check_tensor("row_weight", row_weight, shape=(B,), floating=True)
            row_w = row_weight.float()
        elif self.weighting == "elbo":
            row_w = self.schedule.weight(t).float()
            if importance is not None:
                row_w = row_w * importance.float()
        else:
            row_w = torch.ones(B, device=tokens.device)
        if self.shift:
            scored = shift_left(mask, False)
            valid = shift_left(maskable, False)
            target = shift_left(tokens, IGNORE_INDEX)
        else:
            scored, valid, target = mask, maskable, tokens
        if input_ids is None:
            input_ids = torch.where(mask, self.mask_token_id, tokens)
        else:
            check_tensor("input_ids", input_ids, shape=(B, L), integer=True)
            input_ids = input_ids.long()
        return Batch(
            input_ids=input_ids,
            labels=torch.where(scored, target, IGNORE_INDEX),
            weights=row_w[:, None] * scored,
            causal=torch.zeros(B, dtype=torch.bool),
            doc_ids=doc_ids,
            t=t,
            valid=valid,
            scale=None,
        )

    def __repr__(self) -> str:
        if self.weighting == "elbo":
            return (f"MDObjective(mask_token_id={self.mask_token_id}, estimator={self.estimator!r}, "
                    f"schedule={self.schedule!r}, sampler={self.sampler!r}, shift={self.shift}, "
                    f"complementary={self.complementary})")
        return (f"MDObjective(mask_token_id={self.mask_token_id}, weighting='none', masker={self.masker!r}, "
                f"corruption={self.corruption!r}, rate={self.rate!r}, shift={self.shift})")
