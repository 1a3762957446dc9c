"""GPU checks of what runs beyond one eager process: no host syncs, torch.compile, FSDP2 with the fused loss.

Run from the repository root on a machine with one CUDA GPU (torch and dualobj only; ``PYTHONPATH=.`` makes
the checkout's dualobj the one imported when another is installed)::

    python scripts/gpu_scale.py                       # all three parts
    python scripts/gpu_scale.py --only sync fsdp2     # some of them
    python scripts/gpu_scale.py --json gpu_scale.json
    python scripts/gpu_scale.py --device cpu --quick  # a smoke run of the same code on the CPU (no sync check)

Parts:

- ``sync``: for AR, MD and dual, ``prepare`` → ``loss`` (logits and fused) → ``backward`` with validation off
  (``dualobj.validation(False)``) under ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host sync
  raises. Each path reports ``ok`` or the first line of the error (where it synced). With validation on, syncs
  are expected (the value checks read tensors) and are not tested.
- ``compile``: ``torch.compile(objective.loss, fullgraph=True)`` on the fused path (inductor) against eager, same
  loss and gradients; then the training step of ``dualobj bench step`` with the model forward and the loss compiled,
  against the eager step, for AR, MD and dual: first-step losses agree, and the median step times (CUDA events)
  give the compiled/eager ratio (target ≤ 0.9 for dual).
- ``fsdp2``: one process, world size 1 (NCCL; gloo on the CPU): the model under ``fully_shard`` still holds its
  parameters as ``DTensor`` s and goes through FSDP's hooks. The output layer as its own unit and tied to the
  embedding, one micro-batch and two: the loss and the gradients (``full_tensor()``) equal those of the same
  model without FSDP.

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import dualobj
from dualobj.models import Transformer, TransformerConfig
from dualobj.objectives import ARObjective, DualObjective, MDObjective, batch_count, global_count, global_loss

MASK, SPECIAL = 3, 4


def objectives() -> dict[str, Any]:
    md = MDObjective(MASK, num_special=SPECIAL)
    return {"ar": ARObjective(), "md": md, "dual": DualObjective(0.5, md=md)}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


# ------------------------------------------------------------------------------------------------ sync


def sync_check(device: str, quick: bool) -> dict[str, str]:
    """``{"<objective>/<path>": "ok" | error}`` for prepare → loss → backward with validation off."""
    B, L, H, V = (4, 32, 32, 128) if quick else (8, 512, 256, 4096)
    results: dict[str, str] = {}
    head = torch.nn.Linear(H, V, device=device)
    tokens = torch.randint(SPECIAL, V, (B, L), device=device)
    for name, objective in objectives().items():
        for path in ("logits", "fused"):

            def run(objective=objective, path=path) -> None:
                batch = objective.prepare(tokens)
                hidden = torch.randn(B, L, H, device=device, requires_grad=True)
                out = objective.loss(hidden, batch, head=head) if path == "fused" else \
                    objective.loss(head(hidden), batch)
                out.loss.backward()

            key = f"{name}/{path}"
            try:
                with dualobj.validation(False):
                    run()  # warm-up: lazy initialisations (cuBLAS handles, caches) may sync once
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        run()
                    finally:
                        if device.startswith("cuda"):
                            torch.cuda.set_sync_debug_mode("default")
                results[key] = "ok" if device.startswith("cuda") else "ok (not checked: no CUDA)"
            except Exception as exc:  # the sync (or another failure) is the result
                results[key] = _first_line(exc)
            print(f"sync  {key:14s} {results[key]}", flush=True)
    return results


# ------------------------------------------------------------------------------------------------ compile


def _time(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def compile_check(device: str, dtype: str, quick: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """Fullgraph compile of the fused loss against eager, then compiled/eager training-step times."""
    from dualobj.bench import step
    from dualobj.bench._core import Context

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    B, L, H, V = (4, 16, 32, 128) if quick else (8, 512, 256, 4096)
    dual = objectives()["dual"]
    batch = dual.prepare(torch.randint(SPECIAL, V, (B, L), device=device))
    head = torch.nn.Linear(H, V, device=device)
    hidden = torch.randn(B, L, H, device=device, requires_grad=True)

    def loss(hidden, batch):
        return dual.loss(hidden, batch, head=head).loss

    try:
        compiled = torch.compile(loss, fullgraph=True)(hidden, batch)
        eager = loss(hidden, batch)
        params = (hidden, head.weight, head.bias)
        errors = [float((compiled - eager).detach().abs() / eager.detach().abs())]
        for a, b in zip(torch.autograd.grad(compiled, params), torch.autograd.grad(eager, params)):
            errors.append(float((a - b).abs().max() / b.abs().max()))
        ok = max(errors) < 1e-4
        out["fullgraph_fused_loss"] = {"ok": ok, "max_rel_error": max(errors)}
    except Exception as exc:
        out["fullgraph_fused_loss"] = {"ok": False, "error": _first_line(exc)}
    print(f"compile fullgraph dual fused loss: {out['fullgraph_fused_loss']}", flush=True)

    sizes = dict(step.QUICK if quick else step.FULL)
    ctx = Context(device=device, dtype=dtype)
    for kind in ("ar", "md", "dual"):
        row: dict[str, Any] = {}
        try:
            eager_step = step.make_step(kind, sizes, ctx)
            compiled_step = step.make_step(kind, sizes, ctx, compiled=True)
            first = {"eager": float(eager_step()), "compiled": float(compiled_step())}
            row["first_loss"] = first
            row["ok"] = abs(first["compiled"] - first["eager"]) <= 1e-3 * abs(first["eager"])
            row["eager_s"] = _time(eager_step, device, warmup, repeats)
            row["compiled_s"] = _time(compiled_step, device, warmup, repeats)
            row["compiled/eager"] = row["compiled_s"] / row["eager_s"]
        except Exception as exc:
            row = {"ok": False, "error": _first_line(exc)}
        out[f"step/{kind}"] = row
        print(f"compile step {kind}: {row}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ FSDP2


def _fsdp2_case(device: str, tied: bool, micro_batches: int, quick: bool) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    V, dim, L = (64, 32, 16) if quick else (4096, 256, 256)
    config = TransformerConfig(vocab_size=V, dim=dim, layers=2, heads=4, max_len=L)

    def build() -> Transformer:
        torch.manual_seed(0)
        model = Transformer(config)
        if tied:
            model.lm_head.weight = model.embed.weight
        return model.to(device)

    dual = objectives()["dual"]
    g = torch.Generator().manual_seed(1)
    micro = [dual.prepare(torch.randint(SPECIAL, V, (4, L), generator=g), generator=g).to(device)
             for _ in range(micro_batches)]

    reference = build()
    whole = dualobj.objectives.Batch.cat(micro)
    ref = dual.loss(reference(whole.input_ids, causal=whole.causal), whole, head=reference.lm_head)
    ref.loss.backward()

    model = build()
    mesh = init_device_mesh(device.split(":")[0], (1,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    if not tied:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    count = global_count(batch_count(micro))
    total = torch.zeros((), device=device)
    for k, batch in enumerate(micro):
        model.set_requires_gradient_sync(k == len(micro) - 1)
        out = dual.loss(model(batch.input_ids, causal=batch.causal), batch, head=model.lm_head)
        loss = global_loss(out, count=count, reduced=True)
        loss.backward()
        total = total + loss.detach()
    errors = {"loss": float((total - ref.loss.detach()).abs() / ref.loss.detach().abs())}
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        got, want = p.grad.full_tensor(), grads[name].grad
        errors[name] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    worst = max(errors.values())
    return {"ok": worst < 1e-3, "max_rel_error": worst, "dtensor": type(p).__name__}


def fsdp2_check(device: str, quick: bool) -> dict[str, Any]:
    """World size 1: fully_shard with the fused loss equals the same model without FSDP."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    backend = "nccl" if device.startswith("cuda") else "gloo"
    out: dict[str, Any] = {}
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        for tied in (False, True):
            for micro_batches in (1, 2):
                key = f"{'tied' if tied else 'untied'}/{micro_batches} micro-batch(es)"
                try:
                    out[key] = _fsdp2_case(device, tied, micro_batches, quick)
                except Exception as exc:
                    out[key] = {"ok": False, "error": _first_line(exc)}
                print(f"fsdp2 {key}: {out[key]}", flush=True)
    finally:
        dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------ main


def _all_ok(results: dict[str, Any]) -> bool:
    ok = True
    for value in results.get("sync", {}).values():
        ok &= value.startswith("ok")
    for part in ("compile", "fsdp2"):
        for value in results.get(part, {}).values():
            ok &= bool(value.get("ok"))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter dtype of the compiled training steps")
    parser.add_argument("--only", nargs="+", choices=("sync", "compile", "fsdp2"),
                        default=["sync", "compile", "fsdp2"])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke run", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    if "sync" in args.only:
        results["sync"] = sync_check(args.device, args.quick)
    if "fsdp2" in args.only:
        results["fsdp2"] = fsdp2_check(args.device, args.quick)
    if "compile" in args.only:
        results["compile"] = compile_check(args.device, args.dtype, args.quick, args.warmup, args.repeats)
    results["all_ok"] = _all_ok(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"all checks passed: {results['all_ok']}")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
