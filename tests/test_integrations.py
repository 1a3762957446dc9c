"""dualobj.integrations: the 4D mask against dualobj.attention, Hugging Face models and Trainer, and the examples."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from dualobj import DualObjError
from dualobj.attention import attention
from dualobj.integrations import additive_attention_mask, allowed_keys, batch_count
from dualobj.objectives import ARObjective, Batch, DualObjective, MDObjective, cross_entropy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rule(causal, doc_ids, prefix, b, i, j) -> bool:
    """The attention rule written out for one (row, query, key), documents as runs of equal ids."""
    if doc_ids is not None:
        lo, hi = min(i, j), max(i, j)
        if any(doc_ids[b, m] != doc_ids[b, m + 1] for m in range(lo, hi)):
            return False
    return (not causal[b]) or j <= i or (prefix is not None and j < prefix[b])


def layout(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    causal = torch.tensor([True, False, True, False])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0],  # id 0 comes back: a third document
                            [5, 5, 5, 5, 6, 6, 6, 6],
                            [1, 1, 1, 1, 1, 1, 1, 1],
                            [2, 3, 3, 3, 3, 3, 4, 4]])
    prefix = torch.tensor([0, 3, 5, 2])
    return g, causal, doc_ids, prefix


def test_allowed_keys_matches_the_rule_written_out():
    _, causal, doc_ids, prefix = layout()
    for d in (None, doc_ids):
        for p in (None, prefix):
            got = allowed_keys(causal, 8, doc_ids=d, prefix_lengths=p)
            expected = torch.tensor([[[rule(causal, d, p, b, i, j) for j in range(8)] for i in range(8)]
                                     for b in range(4)])
            assert torch.equal(got, expected)


def test_additive_mask_reproduces_dualobj_attention_math_backend():
    dtype = torch.float32  # the math backend computes in float32
    g, causal, doc_ids, prefix = layout()
    B, T, H, D = 4, 8, 2, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=dtype) for _ in range(3))
    tokens = torch.randint(4, 20, (B, T), generator=g)
    batch = Batch(input_ids=tokens, labels=torch.full((B, T), -100), weights=torch.zeros(B, T), causal=causal,
                  doc_ids=doc_ids)
    mask = additive_attention_mask(batch, dtype=dtype, prefix_lengths=prefix)
    assert mask.shape == (B, 1, T, T) and mask.dtype == dtype
    # plain softmax attention with the additive mask, as a Hugging Face eager layer computes it
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D) + mask
    reference = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    ours = attention(q, k, v, causal=causal, doc_ids=doc_ids, prefix_lengths=prefix, backend="math")
    torch.testing.assert_close(reference, ours)


def test_padding_hides_padded_keys_and_keeps_every_row_non_empty():
    causal = torch.tensor([False, True])
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    allowed = allowed_keys(causal, 4, padding_mask=pad)
    assert not allowed[0, :3, 3].any() and allowed[0, :, :3].all()
    assert allowed[0, 3, 3] and allowed[1, 3, 3]  # a padded query sees itself
    assert not allowed[1, 3, 2]


def test_mask_helpers_reject_bad_input():
    batch = ARObjective().prepare(torch.tensor([[1, 2, 3]]))
    with pytest.raises(DualObjError, match="dtype"):
        additive_attention_mask(batch, dtype=torch.long)
    with pytest.raises(DualObjError, match="batch"):
        additive_attention_mask(torch.zeros(1, 3))
    with pytest.raises(DualObjError, match="causal"):
        allowed_keys(torch.ones(2), 3)
    with pytest.raises(DualObjError, match="doc_ids"):
        allowed_keys(torch.ones(2, dtype=torch.bool), 3, doc_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(DualObjError, match="padding_mask"):
        allowed_keys(torch.ones(2, dtype=torch.bool), 3, padding_mask=torch.ones(2, 2))
    with pytest.raises(DualObjError, match="length"):
        allowed_keys(torch.ones(2, dtype=torch.bool), 0)


# ------------------------------------------------------------------------------------------------ Hugging Face

transformers = pytest.importorskip("transformers")  # a test extra; the rest of this module needs it


def tiny_llama(attn: str = "eager"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation=attn)
    return transformers.LlamaForCausalLM(config).eval()


def test_hf_causal_lm_loss_equals_ours_on_the_same_logits():
    model = tiny_llama()
    ids = torch.randint(4, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids)
    ours = cross_entropy(hf.logits, ARObjective().prepare(ids))
    torch.testing.assert_close(ours.loss, hf.loss)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_with_our_mask_is_causal_or_bidirectional_per_row_and_keeps_documents_apart(attn):
    model = tiny_llama(attn)
    assert model.config._attn_implementation == attn
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 40, (2, 8), generator=g)
    doc_ids = torch.tensor([[0] * 8, [0, 0, 0, 0, 1, 1, 1, 1]])
    md = MDObjective(3, num_special=4)
    ar_batch = ARObjective().prepare(ids[:1])
    md_batch = md.build(ids[1:], torch.zeros(1, 8, dtype=torch.bool), torch.ones(1),
                        maskable=torch.ones(1, 8, dtype=torch.bool), doc_ids=doc_ids[1:])
    batch = Batch.cat([dataclass_with_docs(ar_batch, doc_ids[:1]), md_batch])

    def logits(x):
        with torch.no_grad():
            return model(input_ids=x, attention_mask=additive_attention_mask(batch)).logits

    base = logits(ids)
    with torch.no_grad():
        default = model(input_ids=ids[:1]).logits
    torch.testing.assert_close(base[:1], default, rtol=1e-4, atol=1e-5)  # AR row: the model's own causal mask
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 4) % 36 + 4  # the last token of row 1's first document
    out = logits(changed)
    assert torch.allclose(out[0, :3], base[0, :3], atol=1e-5)  # causal row: the past does not see the future
    assert not torch.allclose(out[1, :3], base[1, :3], atol=1e-5)  # bidirectional row: it does
    assert torch.allclose(out[1, 4:], base[1, 4:], atol=1e-5)  # the next document never sees it


def dataclass_with_docs(batch: Batch, doc_ids: torch.Tensor) -> Batch:
    import dataclasses

    return dataclasses.replace(batch, doc_ids=doc_ids)


def test_trainer_loss_over_accumulated_micro_batches_equals_one_loss_on_the_whole_batch(tmp_path):
    example = load_example("hf_trainer")
    trainer = example.build_trainer(str(tmp_path), steps=1, alpha=0.5, accumulation=2)
    model = trainer.model
    g = torch.Generator().manual_seed(3)
    docs = torch.tensor([0] * 7 + [1] * 9)  # packed rows: two documents each
    micro = [{"input_ids": torch.randint(4, 256, (3, 16), generator=g), "doc_ids": docs.repeat(3, 1)},
             {"input_ids": torch.randint(4, 256, (2, 16), generator=g), "doc_ids": docs.repeat(2, 1)}]
    micro[1]["input_ids"][1, 9:] = 0  # rows of different lengths of scored targets are fine
    samples, count = trainer.get_batch_samples(iter(micro), 2, trainer.args.device)
    batches = [s["dualobj_batch"] for s in samples]
    assert float(count) == float(batch_count(batches))
    assert all(b.doc_ids is not None for b in batches)
    model.zero_grad()
    total = 0.0
    for s in samples:
        loss = trainer.compute_loss(model, s, num_items_in_batch=count)
        loss.backward()
        total += float(loss.detach())
    assert trainer.last_output is not None
    grads = [p.grad.clone() for p in model.parameters()]
    # reference: the two prepared micro-batches as one batch, one forward, our loss
    model.zero_grad()
    whole = Batch.cat(batches)
    logits = model(input_ids=whole.input_ids, attention_mask=additive_attention_mask(whole)).logits
    reference = cross_entropy(logits, whole)
    reference.loss.backward()
    assert total == pytest.approx(float(reference.loss.detach()), rel=1e-5)
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_trainer_evaluate_reports_the_global_nll_per_token(tmp_path):
    from dualobj.integrations import DualObjectiveTrainer

    class Rows(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i]}

    ids = torch.randint(4, 40, (5, 9), generator=torch.Generator().manual_seed(4))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    model = tiny_llama()
    trainer = DualObjectiveTrainer(model=model, args=args, objective=ARObjective())
    metrics = trainer.evaluate(Rows(ids))
    with torch.no_grad():
        expected = cross_entropy(model(input_ids=ids).logits, ARObjective().prepare(ids)).loss
    # token-weighted over uneven batches (2, 2, 1 rows), unlike a mean of per-batch means
    assert metrics["eval_nll_per_token"] == pytest.approx(float(expected), rel=1e-5)


def test_trainer_rejects_a_non_objective(tmp_path):
    from dualobj.integrations import DualObjectiveTrainer

    with pytest.raises(DualObjError, match="objective"):
        DualObjectiveTrainer(model=tiny_llama(), objective="dual")


def test_trainer_hands_the_global_step_to_any_objective(tmp_path):
    from dualobj.integrations import DualObjectiveTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    # AR at steps 0..1, MD from step 2: only right if the trainer passes its global step
    scheduled = DualObjective(lambda step: 1.0 if step < 2 else 0.0, md=MDObjective(3, num_special=4), split="step")
    trainer = DualObjectiveTrainer(model=tiny_llama(), args=args, objective=scheduled)
    ids = {"input_ids": torch.randint(4, 40, (2, 6), generator=torch.Generator().manual_seed(0))}
    trainer.state.global_step = 1
    assert trainer._prepare_objective(ids).causal.all()
    trainer.state.global_step = 2
    assert not trainer._prepare_objective(ids).causal.any()

    class Plain:  # follows the contract without subclassing Objective
        def prepare(self, tokens, *, step=None, doc_ids=None, prompt_lengths=None, generator=None):
            assert step == 2
            return ARObjective().prepare(tokens, doc_ids=doc_ids, prompt_lengths=prompt_lengths)

        def loss(self, output, batch, *, head=None, bias=None, chunk_size=None):
            return cross_entropy(output, batch)

    plain = DualObjectiveTrainer(model=tiny_llama(), args=args, objective=Plain())
    plain.state.global_step = 2
    assert plain.normalize == "valid" and plain._prepare_objective(ids).causal.all()


def test_hf_trainer_example_trains(tmp_path):
    example = load_example("hf_trainer")
    trainer = example.build_trainer(str(tmp_path), steps=3, accumulation=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert math.isfinite(result.training_loss) and 3.0 < result.training_loss < 7.0  # near log(260) = 5.56
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.last_output is not None and set(trainer.last_output.metrics) >= {"ar/loss", "md/loss"}


# ------------------------------------------------------------------------------------------------ other routes


def test_plain_loop_example_runs():
    result = load_example("plain_loop").main(steps=2, micro_batches=2, batch_size=2)
    assert all(math.isfinite(v) for v in result.values())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["ar_perplexity"] > 1.0


def test_lightning_example_runs_and_logs_synced_metrics():
    pytest.importorskip("lightning")
    result = load_example("lightning_module").main(steps=2)
    assert {"train/loss", "train/epoch_loss", "val/ar_perplexity"} <= set(result)
    assert all(math.isfinite(v) for v in result.values())


def test_dual_objective_prepares_for_every_route():
    # the routes all consume one Batch: a split="rows" batch mixes causal and bidirectional rows
    md = MDObjective(3, num_special=4)
    tokens = torch.randint(4, 30, (4, 6), generator=torch.Generator().manual_seed(0))
    batch = DualObjective(0.5, md=md).prepare(tokens, generator=torch.Generator().manual_seed(0))
    mask = additive_attention_mask(batch)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert batch.causal.any() and not batch.causal.all()
    for b in range(4):
        assert bool((mask[b, 0][future] != 0).all()) == bool(batch.causal[b])
        assert bool((mask[b, 0][~future] == 0).all())
