"""GPU check and timing of ``dualobj.objectives.linear_cross_entropy`` against the full-logits computation.

Run from the repository root on a machine with one CUDA GPU (nothing else needed besides torch and dualobj)::

    python scripts/gpu_fused_ce.py                      # N=16384, H=1024, V=50304, bfloat16
    python scripts/gpu_fused_ce.py --json gpu_ce.json   # also write the figures as JSON

For each case it checks that the fused loss and the gradients of the hidden states and the output weight agree
with the naive computation (``F.linear`` → float32 logits → ``F.cross_entropy(reduction="none") · weights``) within
bfloat16 tolerance, then times forward + backward (CUDA events, median of ``--iters`` after ``--warmup`` calls) and
reads the peak extra memory from the CUDA allocator (over what the inputs already hold). Cases: per-token weighted
AR batch (every row labelled), the same unweighted, and an MD batch with half the rows labelled; baselines: naive
and, where torch has it (≥ 2.13), torch's chunked ``F.linear_cross_entropy``. Our chunk size is swept too.
Targets from the issue: memory ≤ 0.15× naive, time ≤ 1.2× naive.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dualobj.objectives import IGNORE_INDEX, linear_cross_entropy


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, labelled: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    if labelled < 1.0:
        labels[torch.randperm(N, generator=g)[: round(N * (1.0 - labelled))]] = IGNORE_INDEX
    return {
        "hidden": torch.randn(N, H, generator=g).to("cuda", dtype).requires_grad_(),
        "weight": (torch.randn(V, H, generator=g) / H**0.5).to("cuda", dtype).requires_grad_(),
        "labels": labels.cuda(),
        "weights": ((torch.rand(N, generator=g) + 0.1) * (labels != IGNORE_INDEX)).cuda(),
    }


def naive(x: dict, weighted: bool, chunk: int | None = None) -> torch.Tensor:
    logits = F.linear(x["hidden"], x["weight"]).float()
    per_row = F.cross_entropy(logits, x["labels"], reduction="none")
    return (per_row * x["weights"]).sum() if weighted else per_row.sum()


def ours(x: dict, weighted: bool, chunk: int | None = None) -> torch.Tensor:
    return linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["weights"] if weighted else None,
                                chunk_size=chunk)


def native(x: dict, weighted: bool, chunk: int | None = None) -> torch.Tensor:
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk or 2048)
    if not weighted:
        return F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="sum", options=options)
    per_row = F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], reduction="none", options=options)
    return (per_row.float() * x["weights"]).sum()


def step(fn: Callable, x: dict, weighted: bool, chunk: int | None) -> tuple[torch.Tensor, ...]:
    loss = fn(x, weighted, chunk)
    gh, gw = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
    return loss.detach(), gh, gw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def measure(fn: Callable, x: dict, weighted: bool, chunk: int | None, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        step(fn, x, weighted, chunk)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, x, weighted, chunk)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step(fn, x, weighted, chunk)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return {"ms": statistics.median(times), "extra_mib": peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--H", type=int, default=1024)
    parser.add_argument("--V", type=int, default=50304)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--chunks", default="default,1024,2048,4096", help="our chunk sizes to try")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    has_native = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    chunks = [None if c == "default" else int(c) for c in args.chunks.split(",")]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "N": args.N, "H": args.H,
              "V": args.V, "dtype": args.dtype, "cases": []}
    print(f"{report['device']}, torch {torch.__version__}, N={args.N} H={args.H} V={args.V} {args.dtype}")
    failed = False
    for case, weighted, labelled in (("weighted", True, 1.0), ("unweighted", False, 1.0), ("MD half", True, 0.5)):
        x = make_inputs(args.N, args.H, args.V, dtype, labelled)
        ref = step(naive, x, weighted, None)
        rows = {"naive": measure(naive, x, weighted, None, args.warmup, args.iters)}
        impls = [(f"ours chunk={c or 'default'}", ours, c) for c in chunks]
        if has_native:
            impls.append(("torch-native chunk=2048", native, 2048))
        for name, fn, chunk in impls:
            got = step(fn, x, weighted, chunk)
            errs = [rel_err(a, b) for a, b in zip(got, ref)]
            ok = all(e <= tol for e in errs)
            failed |= not ok and name.startswith("ours")
            rows[name] = {**measure(fn, x, weighted, chunk, args.warmup, args.iters),
                          "max_rel_err": errs, "agrees": ok}
            del got
        base = rows["naive"]
        print(f"\n{case} (labelled {labelled:.0%})")
        print(f"  {'impl':28s} {'ms':>8s} {'extra MiB':>10s} {'time/naive':>11s} {'mem/naive':>10s}  check")
        for name, r in rows.items():
            check = "" if name == "naive" else ("agree" if r["agrees"] else f"DISAGREE {r['max_rel_err']}")
            print(f"  {name:28s} {r['ms']:8.2f} {r['extra_mib']:10.0f} {r['ms'] / base['ms']:10.2f}x "
                  f"{r['extra_mib'] / base['extra_mib']:9.3f}x  {check}")
        report["cases"].append({"case": case, "labelled": labelled, "weighted": weighted, "results": rows})
        del x, ref
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
