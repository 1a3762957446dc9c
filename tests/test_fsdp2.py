"""FSDP2 (``fully_shard``) on two gloo processes on the CPU: the dual objective with the fused loss
(``objective.loss(hidden, batch, head=model.lm_head)``) gives the loss and the gradients of one process on the
global batch, with the output layer as its own FSDP unit or tied to the embedding, with and without gradient
accumulation. Also runs the FSDP2 torchrun example's ``main`` on the two processes."""

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

from dualobj import DualObjError
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import Batch, DualObjective, MDObjective, batch_count, global_count, global_loss

WORLD = 2
V, PAD, MASK = 24, 0, 1
MICRO = 2  # micro-batches per rank in the accumulation case
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp2_torchrun.py"
CASES = [(tied, accumulate) for tied in (False, True) for accumulate in (False, True)]


def build(tied: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=V, dim=16, layers=2, heads=2, max_len=16, backend="math"))
    if tied:
        model.lm_head.weight = model.embed.weight
    return model


def objective() -> DualObjective:
    md = MDObjective(MASK, special_ids=[PAD, MASK], pad_id=PAD)
    return DualObjective(0.5, md=md, z_loss=1e-3)  # rows split: each micro-batch mixes AR and MD rows


def prepared(rank: int, micro: int) -> Batch:
    """Rank ``rank``'s micro-batch ``micro``: 2 rows of 10 tokens; rank 1's rows are mostly padding."""
    x = torch.randint(2, V, (2, 10), generator=torch.Generator().manual_seed(10 * rank + micro))
    if rank == 1:
        x[0, 4:] = PAD
        x[1, 2:] = PAD
    return objective().prepare(x, generator=torch.Generator().manual_seed(100 + 10 * rank + micro))


def _train(rank: int, world: int, tied: bool, accumulate: bool) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = build(tied)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    if not tied:
        fully_shard(model.lm_head, mesh=mesh)  # its own unit: sharded outside its own forward
    fully_shard(model, mesh=mesh)
    micro = [prepared(rank, k) for k in range(MICRO if accumulate else 1)]
    count = global_count(batch_count(micro))
    losses = []
    for k, batch in enumerate(micro):
        model.set_requires_gradient_sync(k == len(micro) - 1)
        hidden = model(batch.input_ids, causal=batch.causal)
        loss = global_loss(objective().loss(hidden, batch, head=model.lm_head), count=count, reduced=True)
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}  # a collective: all ranks
    refused = ""
    if not tied:  # after the backward the head is resharded: its raw weight is a DTensor, refused by name
        try:
            objective().loss(hidden.detach(), micro[0], head=model.lm_head.weight)
        except DualObjError as error:
            refused = str(error)
    return {"loss": torch.stack(losses).sum(), "grads": grads, "refused": refused}


def _worker(rank: int, world: int, init_file: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results: dict[str, object] = {case: _train(rank, world, *case) for case in CASES}
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    spec = importlib.util.spec_from_file_location("fsdp2_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results["example"] = example.main(steps=1, batch_size=2, length=16, tied=True, accumulate=2)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_worker, args=(WORLD, str(out / "init"), port, str(out)), nprocs=WORLD, join=False)
    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    deadline = time.monotonic() + 180  # a stuck collective fails the test instead of hanging the suite
    while not all(f.exists() for f in files):
        if context.join(timeout=1) or time.monotonic() > deadline:
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


def single_process(tied: bool, accumulate: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference: no sharding, one process, the loss of the concatenated global batch."""
    model = build(tied)
    whole = Batch.cat([prepared(r, k) for r in range(WORLD) for k in range(MICRO if accumulate else 1)])
    hidden = model(whole.input_ids, causal=whole.causal)
    out = objective().loss(hidden, whole, head=model.lm_head)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(("tied", "accumulate"), CASES, ids=[f"tied={t}-accumulate={a}" for t, a in CASES])
def test_fsdp2_fused_loss_and_gradients_equal_one_process(ranks, tied, accumulate):
    ref_loss, ref_grads = single_process(tied, accumulate)
    got = [r[(tied, accumulate)] for r in ranks]
    # each rank's loss is W·total_r/N summed over its micro-batches: their mean is Σ total / N
    assert sum(float(g["loss"]) for g in got) / WORLD == pytest.approx(float(ref_loss), rel=1e-5)
    assert set(got[0]["grads"]) == set(ref_grads)
    if tied:
        assert "lm_head.weight" not in ref_grads  # one parameter, reached through the embedding's name
    for r in range(WORLD):
        for name, want in ref_grads.items():
            assert want.abs().max() > 0, name
            torch.testing.assert_close(got[r]["grads"][name], want, rtol=1e-4, atol=1e-7, msg=name)


def test_a_sharded_head_weight_is_refused_by_name(ranks):
    for r in range(WORLD):
        message = ranks[r][(False, False)]["refused"]
        assert message.startswith("head: expected an unsharded weight") and "DTensor" in message


def test_fsdp2_torchrun_example_trains_on_two_ranks(ranks):
    a, b = ranks[0]["example"], ranks[1]["example"]
    assert a == b  # the metric is synced: every rank reports the same number
    assert math.isfinite(a["train_loss"]) and 0 < a["train_loss"] < math.log(320)
