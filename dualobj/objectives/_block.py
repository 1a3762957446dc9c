"""Block diffusion (BD3-LM): autoregressive over blocks of tokens, masked diffusion inside each block."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from dualobj import _random
from dualobj._errors import (
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
from dualobj.attention import document_positions
from dualobj.masking import maskable_positions
from dualobj.objectives._base import Objective, check_tokens
from dualobj.objectives._batch import IGNORE_INDEX, Batch
from dualobj.schedules import LinearSchedule, NoiseSchedule, TimeSampler, UniformSampler

Masker = Callable[..., torch.Tensor]
"""``masker(tokens, rate, *, maskable, generator) -> [B, L] bool`` with ``rate`` a ``[B]`` float tensor."""

T_PER = ("block", "row")
METRICS_NAME = "bd"
"""The component name under which a block-diffusion batch reports its metrics (``"bd/loss"``, ``"bd/tokens"``)."""
BD_WEIGHTINGS = ("elbo", "none")


def bernoulli_masker(
    tokens: torch.Tensor, rate: torch.Tensor, *, maskable: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask each maskable position independently with probability ``rate`` of its row (the default masker of
    :class:`BlockDiffusionObjective`: with the ELBO weight ``w(t)`` it is unbiased for any model).

    The draws are those of ``random_mask(tokens, rate, exact=False, ...)``; the rates are checked to lie in [0, 1]
    only while :func:`dualobj.validation_enabled` (the check is a device sync).

    Args:
        tokens: ``[B, L]`` ids (their shape and device are used).
        rate: ``[B]`` float masking probability of each row.
        maskable: ``[B, L]`` bool, the positions that may be masked.
        generator: the source of randomness.
    """
    B, L = check_tensor("tokens", tokens, ndim=2).shape
    check_tensor("rate", rate, shape=(B,), floating=True)
    check_tensor("maskable", maskable, shape=(B, L), dtypes=(torch.bool,))
    if validation_enabled() and bool(((rate < 0) | (rate > 1) | rate.isnan()).any()):
        raise fail("rate", "values in [0, 1]", f"min {rate.min().item():.4g}, max {rate.max().item():.4g}")
    u = _random.rand((B, L), generator=generator, device=tokens.device)
    return (u < rate.float()[:, None]) & maskable.to(tokens.device)


class BlockDiffusionObjective(Objective):
    r"""Block diffusion: a row is cut into blocks of ``block_size`` tokens, modelled autoregressively over blocks
    and by masked diffusion inside a block, given the clean blocks before it (BD3-LM, Arriola et al., 2025).

    .. math::
        -\log p(x) \le \sum_k \mathbb{E}_{t_k}\Big[w(t_k) \sum_{i \in \text{block } k,\ \text{masked}}
        -\log p_\theta(x_i \mid x^{k}_{t_k}, x^{<k})\Big], \qquad w(t) = \frac{-\alpha'(t)}{1-\alpha(t)}
        \ (= 1/t \text{ for the linear schedule}).

    Training is vectorised: each row becomes ``[x_t ; x_0]`` (its noisy copy, then its clean copy, ``2L`` tokens)
    and one forward pass under :func:`~dualobj.attention.block_diffusion_mask` scores every block: a noisy block
    sees itself (bidirectionally) and the clean blocks before it, a clean block sees the clean blocks up to itself.
    Both halves get positions ``0 .. L-1`` (restarting in each packed document), in ``Batch.position_ids``;
    the attention layout travels as ``Batch.layout``: call the model as ``model(batch.input_ids,
    layout=batch.layout)`` (the reference :class:`~dualobj.models.Transformer` takes it; see
    ``docs/block_diffusion.md`` for other models).

    Conventions:

    - Targets are in place (as in BD3-LM): the output at a masked position of the noisy half predicts the clean
      token at that position. Only the noisy half is scored; the clean half's outputs carry no loss.
    - A block is positions ``[k·b, (k+1)·b)`` of the row; when ``L`` is not a multiple of ``b`` the last block is
      shorter and is treated like any other block. Blocks are cut by position in the row, across packed documents;
      attention never crosses a document.
    - ``t_per="block"`` (BD3-LM) draws one noise level per block; ``"row"`` draws one per row, shared by its blocks.
      Both are unbiased; per-block draws average more independent levels per row.
    - Normalisation as in :class:`~dualobj.objectives.MDObjective`: ``normalize="valid"`` divides by the maskable
      positions, so the loss is the per-token NELBO (``"positions"`` counts all ``2L`` columns of a row, clean half
      included).
    - Metrics: ``"bd/loss"`` (the per-token NELBO estimate, ``Σ w·CE / valid``, mixing factors divided out) and
      ``"bd/tokens"`` (scored targets): the batch labels its rows as the one component ``"bd"``. The per-kind
      keys of every loss stay too: block-diffusion rows are not causal, so ``"md/loss"`` equals ``"bd/loss"``,
      and ``"md/mask_rate"`` is the fraction of maskable positions masked. Inside a :class:`Mixture` the
      mixture's component names replace the label.
    - ``block_size = L`` is masked diffusion with in-place targets; ``block_size = 1`` with every token masked
      (``t = 1``) is exactly the autoregressive NLL (the model sees ``x_{<j}`` and a mask at ``j``).

    Args:
        mask_token_id: the id written at masked positions (never a maskable id).
        block_size: ``b >= 1`` (checked against the row length in :meth:`prepare`).
        schedule: a :class:`~dualobj.schedules.NoiseSchedule` (default linear).
        sampler: a :class:`~dualobj.schedules.TimeSampler` for ``t`` (default ``UniformSampler(t_min, 1)``); it is
            called for ``B·K`` levels (``t_per="block"``) or ``B`` (``"row"``); its importance weights are applied.
        masker: ``masker(tokens, rate, *, maskable, generator) -> bool`` applied to every block as a row of its own
            (default :func:`bernoulli_masker`; any masker of :mod:`dualobj.masking` works, e.g. an exact count per
            block). With an exact-count masker the ELBO weight is only unbiased if the loss does not depend on the
            number masked; Bernoulli masking is unbiased for every model.
        t_per: ``"block"`` or ``"row"``.
        weighting: ``"elbo"`` (``w(t)`` times the sampler's importance weight) or ``"none"`` (1).
        special_ids / num_special / pad_id: never masked (see :func:`dualobj.masking.maskable_positions`).
        t_min: ``t`` is clamped to ``[t_min, 1]`` so weights stay finite.
        z_loss, normalize: as for :class:`~dualobj.objectives.Objective`.

    Example:
        >>> import torch
        >>> bd = BlockDiffusionObjective(mask_token_id=0, block_size=2)
        >>> batch = bd.prepare(torch.tensor([[5, 6, 7, 8]]), generator=torch.Generator().manual_seed(0))
        >>> batch.input_ids.shape, batch.position_ids.tolist()
        (torch.Size([1, 8]), [[0, 1, 2, 3, 0, 1, 2, 3]])
        >>> batch.input_ids[0, 4:].tolist()  # the clean copy
        [5, 6, 7, 8]
    """

    def __init__(
        self,
        mask_token_id: int,
        block_size: int,
        *,
        schedule: NoiseSchedule | None = None,
        sampler: TimeSampler | None = None,
        masker: Masker | None = None,
        t_per: Literal["block", "row"] = "block",
        weighting: Literal["elbo", "none"] = "elbo",
        special_ids: Sequence[int] | None = None,
        num_special: int | None = None,
        pad_id: int | None = None,
        t_min: float = 1e-3,
        z_loss: float = 0.0,
        normalize: str = "valid",
    ) -> None:
        super().__init__(z_loss=z_loss, normalize=normalize)
        self.mask_token_id = check_int("mask_token_id", mask_token_id, low=0)
        self.block_size = check_int("block_size", block_size, low=1)
        if num_special is not None and mask_token_id >= check_int("num_special", num_special, low=0):
            raise fail("mask_token_id", f"a special id < num_special={num_special} (ids >= num_special are "
                       "maskable)", mask_token_id)
        if special_ids is not None and mask_token_id not in list(special_ids):
            raise fail("mask_token_id", f"one of special_ids={list(special_ids)}", mask_token_id)
        if pad_id is not None and pad_id == mask_token_id:
            raise fail("mask_token_id", f"an id different from pad_id={pad_id}", mask_token_id)
        if masker is not None and not callable(masker):
            raise fail_type("masker", "a callable masker(tokens, rate, *, maskable, generator)", describe(masker))
        check_choice("t_per", t_per, T_PER)
        check_choice("weighting", weighting, BD_WEIGHTINGS)
        self.t_min = check_number("t_min", t_min, low=0.0, high=1.0, low_open=True, high_open=True)
        self.schedule = schedule if schedule is not None else LinearSchedule()
        self.sampler = sampler if sampler is not None else UniformSampler(self.t_min, 1.0)
        self.masker = masker if masker is not None else bernoulli_masker
        self.t_per = t_per
        self.weighting = weighting
        self.special_ids = None if special_ids is None else [int(i) for i in special_ids]
        self.num_special = num_special
        self.pad_id = pad_id

    def eligible(self, tokens: torch.Tensor, *, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L]`` bool: positions that may be masked (and so scored) under this objective's policy."""
        return maskable_positions(tokens, special_ids=self.special_ids, num_special=self.num_special,
                                  pad_id=self.pad_id, prompt_lengths=prompt_lengths)

    def num_blocks(self, length: int) -> int:
        """``K = ceil(L / block_size)`` blocks in a row of ``length`` tokens."""
        return -(-length // self.block_size)

    def prepare(
        self,
        tokens: torch.Tensor,
        *,
        step: int | None = None,
        doc_ids: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """Draw a noise level per block (or row) and a mask per block, and build the ``[x_t ; x_0]`` batch.

        The value checks (ids, ``mask_token_id`` absent, rates in range) run only while
        :func:`dualobj.validation_enabled`; with validation off, and the default sampler and masker, nothing here
        reads a device tensor's values, so a CUDA step never waits for the host.

        Args:
            tokens: ``[B, L]`` clean integer ids of any integer dtype (must not contain ``mask_token_id``).
            step: ignored (the objective does not depend on the step).
            doc_ids: ``[B, L]`` document ids of packed rows (attention stays inside a document; positions restart).
            prompt_lengths: ``[B]``; tokens before this position are never masked (conditioning prompt).
            generator: the source of randomness; the same seed gives the same batch.

        Returns:
            A :class:`~dualobj.objectives.Batch` with ``2L`` columns, ``block_size``, ``position_ids`` and ``t``
            ``[B, K]`` set.
        """
        B, L = check_tokens(tokens, doc_ids, prompt_lengths)
        check_generator("generator", generator)
        if self.block_size > L:
            raise fail("block_size", f"an int in [1, L={L}] (the row length)", self.block_size)
        tokens = tokens.long()  # (build refuses tokens that contain mask_token_id)
        maskable = self.eligible(tokens, prompt_lengths=prompt_lengths)
        K = self.num_blocks(L)
        device = tokens.device
        if self.t_per == "block":
            sample = self.sampler(B * K, device=device, generator=generator)
            t, importance = sample.t.reshape(B, K), sample.weight.reshape(B, K)
        else:
            sample = self.sampler(B, device=device, generator=generator)
            t, importance = sample.t[:, None].expand(B, K), sample.weight[:, None].expand(B, K)
        t = t.to(device).float().clamp(self.t_min, 1.0)
        mask = self.block_mask(tokens, self.schedule.mask_rate(t).float(), maskable, generator)
        return self.build(tokens, mask, t, maskable=maskable, importance=importance.to(device).float(),
                          doc_ids=doc_ids)

    def block_mask(
        self, tokens: torch.Tensor, rate: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Run the masker on every block as a row of its own: ``rate [B, K]`` -> mask ``[B, L]`` bool."""
        B, L = tokens.shape
        b, K = self.block_size, rate.shape[1]
        pad = K * b - L
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
            maskable = torch.nn.functional.pad(maskable, (0, pad), value=False)
        mask = self.masker(tokens.reshape(B * K, b), rate.reshape(B * K), maskable=maskable.reshape(B * K, b),
                           generator=generator)
        check_tensor("masker(...)", mask, shape=(B * K, b), dtypes=(torch.bool,))
        return mask.reshape(B, K * b)[:, :L] & maskable[:, :L]

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
        """The deterministic half of :meth:`prepare`: the batch for a given mask and per-block noise levels.

        Args:
            tokens: ``[B, L]`` clean ids, without ``mask_token_id``.
            mask: ``[B, L]`` bool, True = replaced by ``mask_token_id`` in the noisy half (kept inside ``maskable``).
            t: ``[B, K]`` noise level of each block (clamped to ``[t_min, 1]``).
            maskable: ``[B, L]`` bool, positions that could have been masked (the ``"valid"`` count).
            importance: ``[B, K]`` importance weights from the time sampler (1 when ``None``).
            doc_ids: ``[B, L]`` document ids.
        """
        B, L = check_tokens(tokens, doc_ids)
        tokens = tokens.long()
        if validation_enabled() and bool((tokens == self.mask_token_id).any()):
            raise fail("tokens", f"clean ids without mask_token_id={self.mask_token_id}",
                       "a batch that already contains it")
        K = self.num_blocks(L)
        check_tensor("mask", mask, shape=(B, L), dtypes=(torch.bool,))
        check_tensor("t", t, shape=(B, K), floating=True)
        check_tensor("maskable", maskable, shape=(B, L), dtypes=(torch.bool,))
        mask = mask & maskable
        t = t.float().clamp(self.t_min, 1.0)
        if self.weighting == "elbo":
            block_w = self.schedule.weight(t).float()
            if importance is not None:
                check_tensor("importance", importance, shape=(B, K), floating=True)
                block_w = block_w * importance.float()
        else:
            block_w = torch.ones(B, K, device=tokens.device)
        block_of = torch.arange(L, device=tokens.device) // self.block_size
        w = block_w.index_select(1, block_of) * mask
        nothing = torch.full_like(tokens, IGNORE_INDEX)
        if doc_ids is not None:
            doc_ids = doc_ids.long()
            pos = document_positions(doc_ids)
            doc_ids = torch.cat([doc_ids, doc_ids], dim=1)
        else:
            pos = torch.arange(L, device=tokens.device).expand(B, L)
        return Batch(
            input_ids=torch.cat([torch.where(mask, self.mask_token_id, tokens), tokens], dim=1),
            labels=torch.cat([torch.where(mask, tokens, IGNORE_INDEX), nothing], dim=1),
            weights=torch.cat([w, torch.zeros_like(w)], dim=1),
            causal=torch.zeros(B, dtype=torch.bool),
            doc_ids=doc_ids,
            t=t,
            valid=torch.cat([maskable, torch.zeros_like(maskable)], dim=1),
            scale=None,
            position_ids=torch.cat([pos, pos], dim=1),
            block_size=self.block_size,
            component=torch.zeros(B, dtype=torch.int64),  # one component: metrics under "bd/" (CPU, no sync)
            component_names=(METRICS_NAME,),
        )

    def __repr__(self) -> str:
        return (f"BlockDiffusionObjective(mask_token_id={self.mask_token_id}, block_size={self.block_size}, "
                f"schedule={self.schedule!r}, sampler={self.sampler!r}, t_per={self.t_per!r}, "
                f"weighting={self.weighting!r})")
