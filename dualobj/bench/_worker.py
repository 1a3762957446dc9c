"""Measure one implementation's peak extra memory on the CPU, in a fresh process (``python -m``).

The parent passes one JSON argument ``{"module", "case", "impl", "ctx", "threads"}``. This process builds the
suite's cases, sets the implementation up, calls it once (one-time costs: lazy initialisation, thread pools),
then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and calls it again. It prints one JSON line
``{"peak_bytes": VmHWM − VmRSS before the call, "note": ...}`` (``peak_bytes`` null where the system has no
``/proc/self/status``) or ``{"error": ...}`` when the suite or the implementation raised.
"""

from __future__ import annotations

import gc
import json
import re
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure(request: dict) -> dict:
    """Run the request and return the JSON answer (see the module docstring)."""
    import importlib

    import torch

    from dualobj.bench._core import Context

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    module = importlib.import_module(request["module"])
    ctx = Context(**request["ctx"])
    case = list(module.cases(ctx))[request["case"]]
    impl = next(i for i in case.impls if i.name == request["impl"])
    fn = impl.make()
    out = fn()
    del out
    gc.collect()
    try:
        before = _status_kib("VmRSS")
    except OSError as exc:
        return {"peak_bytes": None, "note": f"not measured: peak RSS is not readable on this system ({exc})"}
    if _reset_peak():
        out = fn()
        peak = _status_kib("VmHWM")
        note = "peak RSS of a fresh process"
    else:
        # Without a resettable mark only a lower bound is available: the call's RSS right after it returns.
        out = fn()
        peak = _status_kib("VmRSS")
        note = "lower bound: RSS after the call (peak-RSS mark not resettable here)"
    del out
    return {"peak_bytes": max(0, peak - before) * 1024, "note": note}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(json.dumps({"error": "expected one JSON argument"}))
        return 2
    try:
        answer = measure(json.loads(argv[0]))
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
