"""Two gloo processes on the CPU: the rank split and global normalisation equal one process on the global batch,
and the metrics sync to the global values. Also runs the torchrun example's ``main`` on the two processes."""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dualobj import DualObjError
from dualobj.metrics import ARPerplexity, NLLPerToken, TokenAccuracy
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import (
    ARObjective,
    Batch,
    DualObjective,
    MDObjective,
    cross_entropy,
    global_loss,
    rank_is_ar,
)
from dualobj.objectives._distributed import batch_count, global_count

WORLD = 2
V, PAD, MASK = 24, 0, 1
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ddp_torchrun.py"


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Transformer(TransformerConfig(vocab_size=V, dim=16, layers=1, heads=2, max_len=16, backend="math"))

    def forward(self, ids: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        return self.net.logits(ids, causal=causal)


def global_tokens() -> torch.Tensor:
    """``[4, 10]``; rank 1's rows are mostly padding, so the ranks hold very different numbers of targets."""
    x = torch.randint(2, V, (4, 10), generator=torch.Generator().manual_seed(5))
    x[2, 4:] = PAD
    x[3, 2:] = PAD
    return x


def objective() -> DualObjective:
    md = MDObjective(MASK, special_ids=[PAD, MASK], pad_id=PAD)
    return DualObjective(0.5, md=md, ar=ARObjective(pad_id=PAD), split="rank", steps_per_epoch=2)


def prepared(rank: int, step: int, world: int | None = None) -> Batch:
    shard = global_tokens()[2 * rank : 2 * rank + 2]
    obj = objective()
    if world is not None:  # single process: say which rank to impersonate
        obj.rank, obj.world_size = rank, world
    return obj.prepare(shard, step=step, generator=torch.Generator().manual_seed(100 + 10 * step + rank))


def metric_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + rank)
    B = 1 + 2 * rank  # different sizes per rank
    target = torch.randint(0, V, (B, 6), generator=g)
    target[:, -1] = -100
    return torch.randn(B, 6, V, generator=g), target


def _worker(rank: int, world: int, init_file: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, object] = {}
    model = TinyLM()
    ddp = DistributedDataParallel(model)
    for step in (0, 2):  # epochs 0 and 1: the assignment rotates
        batch = prepared(rank, step)
        out = cross_entropy(ddp(batch.input_ids, batch.causal), batch)
        loss = global_loss(out)
        model.zero_grad()
        loss.backward()
        results[f"step{step}"] = {"loss": loss.detach(), "count": out.count, "causal": batch.causal,
                                  "grads": [p.grad.clone() for p in model.parameters()]}
    # gradient accumulation: two micro-batches per rank, one global count for both
    micro = [prepared(rank, 0), prepared(rank, 2)]
    count = global_count(batch_count(micro))
    model.zero_grad()
    for i, batch in enumerate(micro):
        out = cross_entropy(ddp(batch.input_ids, batch.causal), batch)
        if i == 0:
            with ddp.no_sync():
                global_loss(out, count=count, reduced=True).backward()
        else:
            global_loss(out, count=count, reduced=True).backward()
    results["accumulated"] = {"count": count, "grads": [p.grad.clone() for p in model.parameters()]}
    # metrics: each rank updates with its own data; compute() returns the global value on every rank
    logits, target = metric_data(rank)
    ppl, acc, elbo = ARPerplexity(), TokenAccuracy(), NLLPerToken()
    ppl.update(logits, target)
    acc.update(logits, target)
    elbo.update(torch.tensor(3.0 + rank), torch.tensor(2.0 + 3 * rank))
    results["metrics"] = {"ppl": ppl.compute(), "acc": acc.compute(), "elbo": elbo.compute()}
    dist.destroy_process_group()
    # the torchrun example, launched the way torchrun would set it up
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    spec = importlib.util.spec_from_file_location("ddp_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results["example"] = example.main(steps=2, batch_size=2, length=32)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)  # the fixture reads a file only once it is complete
    dist.barrier()  # rank 0 hosts the example's store: keep it up until every rank has saved
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_worker, args=(WORLD, str(out / "init"), port, str(out)), nprocs=WORLD, join=False)
    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    deadline = time.monotonic() + 180  # a stuck collective fails the test instead of hanging the suite
    # Wait for the results, not for the processes' exit: gloo's threads can make interpreter shutdown slow.
    while not all(f.exists() for f in files):
        if context.join(timeout=1):  # every worker exited: with results missing, one of them failed
            break
        if time.monotonic() > deadline:
            break
    grace = time.monotonic() + 20
    while any(p.is_alive() for p in context.processes) and time.monotonic() < grace:
        time.sleep(0.1)
    for process in context.processes:
        if process.is_alive():
            process.kill()
    missing = [f.name for f in files if not f.exists()]
    if missing:
        pytest.fail(f"the two gloo processes did not write {missing} within 180 s")
    return [torch.load(f, weights_only=False) for f in files]


def single_process(batches: list[Batch]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = TinyLM()
    whole = Batch.cat(batches)
    ref = cross_entropy(model(whole.input_ids, whole.causal), whole)
    ref.loss.backward()
    return ref.loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("step", [0, 2])
def test_rank_split_loss_and_gradients_equal_one_process_on_the_global_batch(ranks, step):
    got = [r[f"step{step}"] for r in ranks]
    # the rank split: one rank AR, the other MD, swapped in the next epoch (the paper's rotation)
    epoch = step // 2
    for r in range(WORLD):
        assert bool(got[r]["causal"].all()) == rank_is_ar(0.5, rank=r, world_size=WORLD, epoch=epoch)
        assert got[r]["causal"].all() or not got[r]["causal"].any()
    assert got[0]["causal"][0] != got[1]["causal"][0]
    assert float(got[0]["count"]) != float(got[1]["count"])  # different numbers of targets per rank
    ref_loss, ref_grads = single_process([prepared(r, step, world=WORLD) for r in range(WORLD)])
    # each rank's loss is W·total_r/N, so their mean is the global mean Σ total / N
    mean = sum(float(g["loss"]) for g in got) / WORLD
    assert mean == pytest.approx(float(ref_loss), rel=1e-5)
    for r in range(WORLD):  # DDP averaged the gradients: the same on every rank, equal to one process
        for a, b in zip(got[r]["grads"], ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_accumulation_over_micro_batches_and_ranks_equals_one_process(ranks):
    batches = [prepared(r, s, world=WORLD) for r in range(WORLD) for s in (0, 2)]
    _, ref_grads = single_process(batches)
    assert float(ranks[0]["accumulated"]["count"]) == float(batch_count(batches))
    for r in range(WORLD):
        for a, b in zip(ranks[r]["accumulated"]["grads"], ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_metrics_sync_to_the_global_values(ranks):
    logits = [metric_data(r)[0] for r in range(WORLD)]
    targets = [metric_data(r)[1] for r in range(WORLD)]
    flat_logits = torch.cat([x[:, :-1] for x in logits]).reshape(-1, V)
    flat_targets = torch.cat([t[:, 1:] for t in targets]).reshape(-1)
    keep = flat_targets != -100
    nll = torch.nn.functional.cross_entropy(flat_logits[keep], flat_targets[keep])
    acc = (flat_logits[keep].argmax(-1) == flat_targets[keep]).float().mean()
    for r in range(WORLD):
        m = ranks[r]["metrics"]
        assert float(m["ppl"]) == pytest.approx(math.exp(float(nll)), rel=1e-5)
        assert float(m["acc"]) == pytest.approx(float(acc), abs=1e-6)
        assert float(m["elbo"]) == pytest.approx((3.0 + 4.0) / (2.0 + 5.0), rel=1e-6)


def test_torchrun_example_trains_on_two_ranks_with_synced_results(ranks):
    a, b = ranks[0]["example"], ranks[1]["example"]
    assert a == b  # synced metrics: every rank reports the same global numbers
    assert all(math.isfinite(v) for v in a.values())


# ------------------------------------------------------------------------------ single-process checks (no spawn)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.data())
def test_rank_rule_counts_rotation_and_the_official_rule(world, data):
    n_ar = data.draw(st.integers(0, world))
    alpha = n_ar / world
    d = world // math.gcd(n_ar, world)
    a = n_ar // math.gcd(n_ar, world)
    for epoch in range(d + 1):
        flags = [rank_is_ar(alpha, rank=r, world_size=world, epoch=epoch) for r in range(world)]
        assert sum(flags) == n_ar  # exactly α·W AR ranks at every step
        for r in range(world):
            # the official code: masked when (epoch + r) % den < num, num/den = 1 - α; the same rotation, started
            # d - a epochs later
            official_md = (epoch + (d - a) + r) % d < d - a
            assert flags[r] == (not official_md)
    for r in range(world):  # over any d consecutive epochs a shard is AR exactly a times
        start = data.draw(st.integers(0, 50))
        assert sum(rank_is_ar(alpha, rank=r, world_size=world, epoch=e) for e in range(start, start + d)) == a


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.3, "rank": 0, "world_size": 4, "epoch": 0}, "alpha: expected a multiple of 1/world_size"),
        ({"alpha": 1.5, "rank": 0, "world_size": 4, "epoch": 0}, r"alpha: expected a number in \[0, 1\]"),
        ({"alpha": 0.5, "rank": 4, "world_size": 4, "epoch": 0}, r"rank: expected an int in \[0, world_size=4\)"),
        ({"alpha": 0.5, "rank": 0, "world_size": 0, "epoch": 0}, "world_size: expected an int >= 1"),
        ({"alpha": 0.5, "rank": 0, "world_size": 2, "epoch": -1}, "epoch: expected an int >= 0"),
    ],
)
def test_rank_rule_rejects_bad_input(kwargs, match):
    alpha = kwargs.pop("alpha")
    with pytest.raises(DualObjError, match=match):
        rank_is_ar(alpha, **kwargs)


def test_normalisation_helpers_without_torch_distributed():
    batches = [prepared(0, 0, world=WORLD), prepared(1, 0, world=WORLD)]
    expected = sum(float(b.valid_mask().sum()) for b in batches)
    assert float(batch_count(batches)) == expected
    assert float(batch_count(batches[0], "positions")) == 20.0
    assert float(global_count(3.0)) == 3.0
    logits = torch.randn(2, 10, V, requires_grad=True)
    out = cross_entropy(logits, batches[0])
    torch.testing.assert_close(global_loss(out), out.loss)  # one process: the local mean
    torch.testing.assert_close(global_loss(out, count=torch.tensor(expected)), out.total / expected)
    torch.testing.assert_close(global_loss(out, count=torch.tensor(0.0), reduced=True), out.total * 0 + out.total)
    with pytest.raises(DualObjError, match="output: expected a LossOutput"):
        global_loss(out.loss)
    with pytest.raises(DualObjError, match="batches: expected a Batch"):
        batch_count([])
    with pytest.raises(DualObjError, match="normalize"):
        batch_count(batches, "tokens")
    with pytest.raises(DualObjError, match="count: expected a scalar"):
        global_count(torch.ones(2))
