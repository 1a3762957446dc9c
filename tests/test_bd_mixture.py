"""Block diffusion inside a Mixture (AR + BD, the Fast-dLLM v2 / SDAR recipe), its metrics, its Hugging Face path,
and the absence of host syncs in ``prepare``.

References are independent of the code under test: closed forms of each component's expected loss for a fixed
predictor (``F.cross_entropy`` on hand-aligned logits), the rank rotation written out as a table, the attention
mask of :func:`dualobj.attention.block_diffusion_mask` with positions counted by hand, and the meta device (any read
of a tensor's values there raises) as the detector of device-to-host syncs.
"""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import dualobj
from dualobj import DualObjError
from dualobj.attention import block_diffusion_mask
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import (
    IGNORE_INDEX,
    ARObjective,
    BlockDiffusionObjective,
    DualObjective,
    MDObjective,
    Mixture,
)

MASK, NUM_SPECIAL, V = 3, 4, 24
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(NUM_SPECIAL, V, (B, L), generator=gen(seed))


def bd(block_size: int = 3, **kwargs) -> BlockDiffusionObjective:
    return BlockDiffusionObjective(MASK, block_size, num_special=NUM_SPECIAL, **kwargs)


def md(**kwargs) -> MDObjective:
    return MDObjective(MASK, num_special=NUM_SPECIAL, **kwargs)


def model(max_len: int = 32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=V, dim=16, layers=2, heads=2, max_len=max_len, backend="math"))


def by_hand(logits: torch.Tensor, batch) -> torch.Tensor:
    """``Σ weights·CE / valid`` with plain torch: the loss of a batch under ``normalize="valid"``."""
    B, T = batch.shape
    ce = F.cross_entropy(logits.reshape(B * T, -1).float(), batch.labels.reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX).view(B, T)
    return (ce * batch.weights).sum() / batch.valid.sum()


# ------------------------------------------------------------------------------- expected loss of the step split


def test_step_split_expected_loss_is_the_weighted_sum_of_ar_bd_and_md_losses():
    """E[loss] = Σ w_i L_i under split="step", for AR + BD + MD, over the component choice, noise levels and masks.

    The "model" is a fixed predictor: logits ``A`` for a plain row of ``L`` columns and ``C`` (other values) for a
    block-diffusion row of ``2L`` columns, the same for every row. Closed forms:

    - AR: mean CE of output ``i`` (from ``A``) on token ``i + 1``.
    - MD, in place, ELBO weight, linear schedule: each maskable position is masked with probability ``t`` and
      weighted ``1/t``, so the expectation is the mean in-place CE of ``A`` over the maskable positions.
    - BD, the same argument block by block (each block its own ``t``): the mean in-place CE of ``C``'s noisy half
      over the maskable positions. The clean half is never scored.

    The first token is a special id (never masked), so MD and BD have ``L − 1`` valid positions per row.
    """
    B, L, draws = 3, 8, 1500
    weights = {"ar": 0.5, "bd": 0.35, "md": 0.15}
    mix = Mixture({"ar": (ARObjective(), weights["ar"]), "bd": (bd(3), weights["bd"]),
                   "md": (md(shift=False), weights["md"])}, split="step")
    row = tokens(1, L, seed=5)
    row[0, 0] = 1
    x = row.expand(B, L).clone()
    plain = torch.randn(L, V, generator=gen(6)) * 2
    block = torch.randn(2 * L, V, generator=gen(7)) * 2
    block[torch.arange(L), row[0]] += 4.0  # the BD predictor is good on the noisy half: its loss stands apart
    refs = {
        "ar": F.cross_entropy(plain[:-1], row[0, 1:]).item(),
        "md": F.cross_entropy(plain[1:], row[0, 1:]).item(),
        "bd": F.cross_entropy(block[1:L], row[0, 1:]).item(),
    }
    assert min(abs(refs["bd"] - refs[k]) for k in ("ar", "md")) > 1.0
    expected = sum(weights[k] * refs[k] for k in weights)

    losses, picks = [], dict.fromkeys(weights, 0)
    for s in range(draws):
        batch = mix.prepare(x, generator=gen(s))
        logits = (block if batch.block_size is not None else plain).expand(B, *batch.shape[1:], V)
        out = mix.loss(logits, batch)
        losses.append(out.loss.item())
        (name,) = [k for k, n in batch.component_counts() if n]
        picks[name] += 1
        assert (batch.block_size is not None) == (name == "bd")
        assert out.metrics[f"{name}/loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)
        for other in set(weights) - {name}:
            assert out.metrics[f"{other}/tokens"].item() == 0 and out.metrics[f"{other}/loss"].item() == 0
    losses = torch.tensor(losses, dtype=torch.float64)
    se = losses.std().item() / math.sqrt(draws)
    assert abs(losses.mean().item() - expected) < 4.5 * se, (losses.mean().item(), expected, se)
    # a swapped pair of weights would be far outside that margin
    swapped = expected + (weights["bd"] - weights["md"]) * (refs["md"] - refs["bd"])
    assert abs(swapped - expected) > 3 * 4.5 * se
    for name, w in weights.items():
        assert abs(picks[name] - draws * w) < 4.5 * math.sqrt(draws * w * (1 - w))


# ------------------------------------------------------------------------------------------ the rank split


def test_rank_split_runs_the_documented_component_on_each_rank():
    """Weights ar 1/4, md 1/4, bd 1/2 over W = 4 ranks: rank r at epoch e takes slot (e + r) mod 4 of the table
    [ar, md, bd, bd] (cumulative ranges of a = [1, 1, 2] over d = 4), as docs/objectives.md states."""
    table = ["ar", "md", "bd", "bd"]
    x, L = tokens(2, 6, seed=1), 6
    steps_per_epoch = 2
    for step in range(10):
        epoch = step // steps_per_epoch
        ran = []
        for rank in range(4):
            mix = Mixture({"ar": (ARObjective(), 0.25), "md": (md(), 0.25), "bd": (bd(2), 0.5)}, split="rank",
                          steps_per_epoch=steps_per_epoch, rank=rank, world_size=4)
            batch = mix.prepare(x, step=step, generator=gen(step))
            (name,) = [k for k, n in batch.component_counts() if n]
            assert name == table[(epoch + rank) % 4], (step, rank)
            assert batch.shape == ((2, 2 * L) if name == "bd" else (2, L))
            assert batch.block_size == (2 if name == "bd" else None)
            ran.append(name)
        assert sorted(ran) == ["ar", "bd", "bd", "md"]  # exactly w_i·W ranks per component at every step


# ------------------------------------------------------------------------ end to end with the reference model


@pytest.mark.parametrize("split", ["step", "rank"])
def test_ar_plus_bd_trains_end_to_end_on_the_reference_model_with_and_without_the_fused_head(split):
    net = model()
    bd_obj = bd(4)
    mix = Mixture({"ar": (ARObjective(), 0.5), "bd": (bd_obj, 0.5)}, split=split, steps_per_epoch=1, rank=0,
                  world_size=2)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7] * 3)
    seen = set()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(6):
        x = tokens(3, 12, seed=10 + step)
        batch = mix.prepare(x, step=step, doc_ids=doc_ids, generator=gen(step))
        hidden = net(batch.input_ids, layout=batch.layout)
        fused = mix.loss(hidden, batch, head=net.lm_head)
        logits = net.lm_head(hidden)
        plain = mix.loss(logits, batch)
        torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.loss, by_hand(logits, batch), rtol=1e-5, atol=1e-6)
        name = "bd" if batch.block_size is not None else "ar"
        seen.add(name)
        torch.testing.assert_close(fused.metrics[f"{name}/loss"], plain.loss.detach(), rtol=1e-5, atol=1e-6)
        if name == "bd":  # the batch the mixture hands over is the standalone objective's batch
            assert batch.shape == (3, 24) and torch.equal(batch.position_ids[:, :12], batch.position_ids[:, 12:])
            assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6] * 2
        fused.loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.zero_grad()
        plain_again = mix.loss(net.lm_head(net(batch.input_ids, layout=batch.layout)), batch)
        plain_again.loss.backward()
        for a, p in zip(grads, net.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
        opt.step()
        opt.zero_grad()
        assert math.isfinite(fused.loss.item())
    assert seen == {"ar", "bd"}  # rank 0 alternates: ar at even epochs, bd at odd ones; step draws both here


# ------------------------------------------------------------------------------------------------ metrics


def test_standalone_block_diffusion_reports_bd_metrics():
    obj = bd(3)
    x = tokens(4, 9, seed=2)
    x[:, 0] = 1  # special: never scored
    batch = obj.prepare(x, generator=gen(3))
    assert batch.component_names == ("bd",) and batch.component.device.type == "cpu"
    logits = torch.randn(4, 18, V, generator=gen(4))
    out = obj.loss(logits, batch)
    masked = batch.labels != IGNORE_INDEX
    assert out.metrics["bd/tokens"].item() == masked.sum().item() > 0
    torch.testing.assert_close(out.metrics["bd/loss"], by_hand(logits, batch))
    torch.testing.assert_close(out.metrics["bd/loss"], out.loss.detach())
    torch.testing.assert_close(out.metrics["md/loss"], out.metrics["bd/loss"])  # BD rows are not causal rows
    assert out.metrics["ar/tokens"].item() == 0
    # micro-batches of one objective stack and keep the label; the fused path reports the same keys
    both = dualobj.objectives.Batch.cat([batch, obj.prepare(x, generator=gen(5))])
    assert both.component_counts() == (("bd", 8),)
    net = model()
    fused = obj.loss(net(batch.input_ids, layout=batch.layout), batch, head=net.lm_head)
    assert {"bd/loss", "bd/tokens", "md/loss", "ar/loss", "accuracy"} <= set(fused.metrics)


def test_mixture_metrics_are_keyed_by_component_name():
    mix = Mixture({"ar": (ARObjective(), 0.5), "bd": (bd(2), 0.5)}, split="step")
    x = tokens(2, 6, seed=3)
    names = set()
    for s in range(8):
        batch = mix.prepare(x, generator=gen(s))
        out = mix.loss(torch.randn(*batch.shape, V, generator=gen(s)), batch)
        assert {"ar/loss", "ar/tokens", "bd/loss", "bd/tokens"} <= set(out.metrics)
        (name,) = [k for k, n in batch.component_counts() if n]
        names.add(name)
        if name == "ar":
            assert out.metrics["ar/tokens"].item() == 2 * 5 and out.metrics["bd/tokens"].item() == 0
        else:
            assert out.metrics["ar/tokens"].item() == 0
            assert out.metrics["bd/tokens"].item() == (batch.labels != IGNORE_INDEX).sum().item()
    assert names == {"ar", "bd"}
    # a component under another name keeps its own key: no "bd/" key is invented
    named = Mixture({"ar": (ARObjective(), 0.0), "blocks": (bd(2), 1.0)}, split="step")
    batch = named.prepare(x, generator=gen(0))
    out = named.loss(torch.randn(*batch.shape, V, generator=gen(0)), batch)
    assert "blocks/loss" in out.metrics and "bd/loss" not in out.metrics


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("split", ["rows", "both"])
def test_stacking_splits_refuse_block_diffusion_naming_split_and_the_alternative(split):
    for comps in ({"ar": (ARObjective(), 0.5), "bd": (bd(2), 0.5)},
                  {"md": (md(), 0.5), "bd": (bd(2), 0.5)},
                  {"bd2": (bd(2), 0.5), "bd3": (bd(3), 0.5)}):
        with pytest.raises(DualObjError, match=r"^split: .*use split='step' or 'rank'"):
            Mixture(comps, split=split).prepare(tokens(4, 6), generator=gen(0))


def test_bad_input_to_a_block_diffusion_mixture():
    x = tokens(2, 6)
    with pytest.raises(DualObjError, match=r"^block_size: "):  # the component's own check, through the mixture
        Mixture({"ar": (ARObjective(), 0.0), "bd": (bd(7), 1.0)}, split="step").prepare(x, generator=gen(0))
    rank = Mixture({"ar": (ARObjective(), 0.5), "bd": (bd(2), 0.5)}, split="rank", steps_per_epoch=1, rank=0,
                   world_size=2)
    with pytest.raises(DualObjError, match=r"^step: "):
        rank.prepare(x)
    with pytest.raises(DualObjError, match="multiples of 1/world_size"):
        Mixture({"ar": (ARObjective(), 0.3), "bd": (bd(2), 0.7)}, split="rank", steps_per_epoch=1, rank=0,
                world_size=2).prepare(x, step=0)
    with pytest.raises(DualObjError, match=r"^weights: "):
        Mixture({"ar": (ARObjective(), 0.3), "bd": (bd(2), 0.3)}, split="step")
    with pytest.raises(DualObjError, match=r"^steps_per_epoch: "):
        Mixture({"ar": (ARObjective(), 0.5), "bd": (bd(2), 0.5)}, split="rank")
    with pytest.raises(DualObjError, match=r"^tokens: .*mask_token_id"):
        Mixture({"ar": (ARObjective(), 0.0), "bd": (bd(2), 1.0)}, split="step").prepare(
            torch.tensor([[5, MASK, 6, 7]]), generator=gen(0))
    # a BD batch handed to the model without its layout is refused, naming layout
    batch = Mixture({"ar": (ARObjective(), 0.0), "bd": (bd(2), 1.0)}, split="step").prepare(x, generator=gen(0))
    with pytest.raises(DualObjError, match=r"^layout: "):
        model()(batch.input_ids, causal=batch.causal)


# ----------------------------------------------------------------------------------- no device-to-host syncs


def _cases():
    return {
        "bd per block": bd(3),
        "bd per row": bd(4, t_per="row"),
        "bd weighting none": bd(2, weighting="none"),
        "step ar+bd": Mixture({"ar": (ARObjective(), 0.5), "bd": (bd(3), 0.5)}, split="step"),
        "rank ar+bd": Mixture({"ar": (ARObjective(), 0.5), "bd": (bd(3), 0.5)}, split="rank", steps_per_epoch=1,
                              rank=0, world_size=2),
        "scheduled step": Mixture({"ar": (ARObjective(), lambda s: 1.0 - 0.1 * (s % 2)),
                                   "bd": (bd(3), lambda s: 0.1 * (s % 2))}, split="step"),
        "md count": md(),
        "md bernoulli": MDObjective(MASK, num_special=NUM_SPECIAL, estimator="bernoulli"),
        "md complementary": MDObjective(MASK, num_special=NUM_SPECIAL, complementary=True),
        "rows": Mixture({"a": (ARObjective(), 0.3), "m": (md(), 0.7)}),
        "both": Mixture({"a": (ARObjective(), 0.3), "m": (md(), 0.7)}, split="both"),
        "dual rows": DualObjective(0.5, md=md()),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_prepare_never_reads_device_values_with_validation_off(name):
    """On the meta device any read of a tensor's values (``.item()``, ``bool()``, ``float()``, ``.tolist()``) raises,
    as a device-to-host copy would stall a CUDA step. CPU metadata (``causal``, ``component``, the host draws of
    the split) stays readable. With validation on, the value checks do read the tokens, and the probe sees it."""
    objective = _cases()[name]
    x = tokens(6, 12, seed=4).to("meta")
    doc_ids = torch.zeros(6, 12, dtype=torch.int64, device="meta")
    prompt_lengths = torch.ones(6, dtype=torch.int64, device="meta")
    with dualobj.validation(False):
        for step in range(4):  # step and rank splits visit both components
            for g in (gen(step), None):
                batch = objective.prepare(x, step=step, doc_ids=doc_ids, prompt_lengths=prompt_lengths, generator=g)
                assert batch.input_ids.device.type == "meta" and batch.causal.device.type == "cpu"
                assert batch.component is None or batch.component.device.type == "cpu"
    with dualobj.validation(True), pytest.raises(RuntimeError, match="meta"):
        objective.prepare(x, step=0, generator=gen(0))


def test_the_meta_probe_catches_each_kind_of_read():
    y = torch.ones(3, device="meta")
    for read in (lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: float(t.sum()), lambda t: t.tolist()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read(y)


# ------------------------------------------------------------------------------------------- Hugging Face


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="eager", initializer_range=0.5)  # sharp attention
    return transformers.LlamaForCausalLM(config).eval()


def test_hf_trainer_runs_a_block_diffusion_batch_with_its_mask_and_positions(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dualobj.integrations import DualObjectiveTrainer

    net = tiny_llama()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    recipe = Mixture({"ar": (ARObjective(), 0.0), "bd": (bd(3), 1.0)}, split="step")  # the BD side of the recipe
    trainer = DualObjectiveTrainer(model=net, args=args, objective=recipe)
    L = 8
    doc_ids = torch.tensor([[0] * 3 + [1] * 5, [0] * 8])
    samples, count = trainer.get_batch_samples(iter([{"input_ids": tokens(2, L, seed=8), "doc_ids": doc_ids}]), 1)
    (sample,) = samples
    batch = sample["dualobj_batch"]
    assert batch.shape == (2, 2 * L)
    loss = trainer.compute_loss(net, sample, num_items_in_batch=count)

    # reference: the block rule from the public helper, positions counted by hand, plain CE
    allowed = block_diffusion_mask(L, 3, doc_ids=doc_ids)  # [B, 2L, 2L]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]).repeat(1, 2)
    with torch.no_grad():
        logits = net(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits
        reference = by_hand(logits, batch)
        unpositioned = by_hand(net(input_ids=batch.input_ids, attention_mask=mask).logits, batch)
    assert float(count) == batch.valid.sum().item()
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)
    assert abs(unpositioned - reference) > 1e-2  # the positions matter: the test would see them
    assert trainer.last_output.metrics["bd/tokens"].item() == (batch.labels != IGNORE_INDEX).sum().item()
    # evaluation path (prepared inside compute_loss) takes the same route
    assert math.isfinite(trainer.compute_loss(net, {"input_ids": tokens(2, L, seed=9)}).item())


# ------------------------------------------------------------------------------------------------ the docs


def docs_block(path: pathlib.Path, heading: str) -> str:
    text = path.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


@pytest.mark.parametrize(("doc", "heading"), [("block_diffusion.md", "AR plus block diffusion"),
                                              ("objectives.md", "AR plus block diffusion")])
def test_the_ar_plus_bd_recipe_from_the_docs_runs(doc, heading):
    net = Transformer(TransformerConfig(vocab_size=260, dim=16, layers=1, heads=2, max_len=64, backend="math"))
    seen = set()
    for step in range(4):
        namespace = {"model": net, "tokens": torch.randint(4, 260, (4, 32), generator=gen(step)), "step": step,
                     "g": gen(100 + step)}
        exec(compile(docs_block(DOCS / doc, heading), str(DOCS / doc), "exec"), namespace)
        out, batch = namespace["out"], namespace["batch"]
        assert math.isfinite(out.loss.item()) and {"ar/loss", "bd/loss"} <= set(out.metrics)
        seen.add("bd" if batch.block_size is not None else "ar")
        assert all(p.grad is not None for p in net.parameters())
        net.zero_grad()
    assert seen == {"ar", "bd"}
