"""GPU check and timing of dualobj.attention's backends (SDPA, Flex, xformers where its kernels load, math).

Run from the repository root on a CUDA machine::

    python scripts/gpu_attention.py                 # checks, then timings at T=1024 and T=4096 (bf16)
    python scripts/gpu_attention.py --quick         # T=1024 only, fewer repeats
    python scripts/gpu_attention.py --device cpu --quick   # dry run of the script itself on a CPU

1. Prints torch, CUDA, the card, and ``available_backends()`` with the reason for each backend that does not run.
2. Checks every backend that runs against ``"math"``, forward and backward, on small shapes for the layouts
   causal, bidirectional, mixed rows (grouped, interleaved, flags on the device), packed documents,
   prefix-LM rows and the block-diffusion layout (with and without documents; Flex runs it as a cached BlockMask),
   in float32 and bfloat16. Prints the largest differences; exits with status 1 if one is out
   of tolerance.
3. Times forward+backward (``torch.autograd.grad`` with a fixed upstream gradient): median of ``--repeats``
   calls after ``--warmup`` calls, CUDA-synchronised, and the peak extra allocated memory of one call. Rows:
   ``auto``, each backend forced, and the direct SDPA baselines (``is_causal`` / no mask, and one boolean mask
   for mixed rows or documents). Layouts: causal, bidirectional, mixed (half the rows causal, AR rows first) and
   documents (four per row, mixed rows). Prints a Markdown table (and writes JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualobj.attention import AttentionLayout, AttentionSpec, attention, available_backends
from dualobj.bench.attention import layout as bench_layout


def layout(kind: str, B: int, T: int, device: str) -> dict:
    """The bench suite's layouts (causal, bidirectional, mixed, documents) plus three that only matter on a GPU."""
    if kind == "interleaved":
        return {"causal": torch.arange(B) % 2 == 0}
    if kind == "flags-on-device":  # a causal tensor on the accelerator (copied to the host once)
        return {"causal": (torch.arange(B) % 3 == 0).to(device)}
    if kind == "prefix":
        return {"causal": True, "prefix_lengths": torch.full((B,), T // 3, device=device)}
    if kind in ("block", "block-documents"):  # block diffusion over rows [x_t ; x_0] of T = 2L (Flex: a BlockMask)
        L = T // 2
        docs = (torch.arange(L) * 3 // L).expand(B, L).contiguous().to(device) if kind == "block-documents" else None
        return {"layout": AttentionLayout(block_size=16, doc_ids=docs)}
    return bench_layout(kind, B, T, device)


def fwd_bwd(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> tuple:
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), g))


def inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, T, H, D, generator=gen).to(device, dtype) for _ in range(4))
    return [q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), g]


def check(device: str, backends: list[str]) -> bool:
    ok = True
    print("\n## Equivalence with 'math' (max |diff| over output and gradients)\n")
    print("| backend | dtype | layout | shape | max diff | tolerance | result |")
    print("|---|---|---|---|---|---|---|")
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 6e-2)):
        for name in backends:
            for kind in ("causal", "bidirectional", "mixed", "interleaved", "flags-on-device", "documents", "prefix",
                         "block", "block-documents"):
                if name == "xformers" and (kind == "prefix" or kind.startswith("block")):
                    continue
                for B, T, H, D in ((4, 77, 2, 64), (2, 1, 1, 32), (3, 130, 4, 128), (2, 512, 4, 64)):
                    if kind.startswith("block") and T % 2:
                        continue  # block diffusion rows are [x_t ; x_0]: an even length
                    q, k, v, g = inputs(B, T, H, D, dtype, device, seed=T)
                    lay = layout(kind, B, T, device)
                    want = fwd_bwd(lambda q, k, v, lay=lay: attention(q, k, v, backend="math", **lay), q, k, v, g)
                    try:
                        got = fwd_bwd(lambda q, k, v, lay=lay, n=name: attention(q, k, v, backend=n, **lay), q, k, v,
                                      g)
                        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
                        good = diff <= tol
                        verdict = "ok" if good else "FAIL"
                    except Exception as exc:
                        diff, good, verdict = float("nan"), False, f"ERROR {type(exc).__name__}: {exc}"[:120]
                    ok &= good
                    shape = f"{B}x{T}x{H}x{D}"
                    print(f"| {name} | {str(dtype)[6:]} | {kind} | {shape} | {diff:.2e} | {tol:g} | {verdict} |")
    return ok


def time_one(fn: Callable, args: list[torch.Tensor], device: str, warmup: int, repeats: int) -> tuple[float, float]:
    q, k, v, g = args
    for _ in range(warmup):
        fwd_bwd(fn, q, k, v, g)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(fn, q, k, v, g)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = float("nan")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fwd_bwd(fn, q, k, v, g)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        del out
    return statistics.median(times) * 1e3, peak


def timings(device: str, dtype: torch.dtype, lengths: list[int], backends: list[str], warmup: int,
            repeats: int) -> list[dict]:
    B, H, D = 8, 16, 64
    rows = []
    print(f"\n## Forward+backward, B={B} H={H} D={D} {str(dtype)[6:]} (median of {repeats} after {warmup} warm-up)\n")
    print("| layout | T | impl | ms | peak extra MiB |")
    print("|---|---|---|---|---|")
    for T in lengths:
        args = inputs(B, T, H, D, dtype, device)
        for kind in ("causal", "bidirectional", "mixed", "documents"):
            lay = layout(kind, B, T, device)
            spec = AttentionSpec.build(B, T, lay["causal"], lay.get("doc_ids"), device=device)
            mask = None if (isinstance(lay["causal"], bool) and "doc_ids" not in lay) else spec.mask(device)
            is_causal = lay["causal"] is True and mask is None
            impls: dict[str, Callable] = {
                "auto": lambda q, k, v, lay=lay: attention(q, k, v, **lay),
                "sdpa direct": lambda q, k, v, m=mask, c=is_causal: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, is_causal=c
                ).transpose(1, 2),
            }
            for name in backends:
                if name == "math" and T > 1024:
                    continue
                impls[name] = lambda q, k, v, lay=lay, n=name: attention(q, k, v, backend=n, **lay)
            for name, fn in impls.items():
                try:
                    ms, mib = time_one(fn, args, device, warmup, repeats)
                    shown = f"{ms:.2f}"
                except Exception as exc:
                    ms, mib, shown = float("nan"), float("nan"), f"error: {type(exc).__name__}"
                rows.append({"layout": kind, "T": T, "impl": name, "ms": ms, "peak_mib": mib})
                print(f"| {kind} | {T} | {name} | {shown} | {mib:.0f} |")
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="T=1024 only and fewer repeats")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the environment, checks and timings here")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run of the script")
        return 2
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# dualobj attention on {card}\n\ntorch {torch.__version__}, CUDA {torch.version.cuda}\n")
    status = available_backends(device, dtype)
    print("| backend | forward | backward | reason |\n|---|---|---|---|")
    for s in status.values():
        print(f"| {s.name} | {s.forward} | {s.backward} | {s.reason or ''} |")
    training = [s.name for s in status.values() if s.backward]
    ok = True if args.skip_check else check(device, training)
    lengths = [256] if device == "cpu" else ([1024] if args.quick else [1024, 4096])
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    rows = timings(device, dtype, lengths, training, warmup, repeats)
    if args.json:
        env = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
               "backends": {s.name: [s.forward, s.backward, s.reason] for s in status.values()}}
        args.json.write_text(json.dumps({"env": env, "check_ok": ok, "timings": rows}, indent=1))
    print("\nchecks:", "all ok" if ok else "FAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
