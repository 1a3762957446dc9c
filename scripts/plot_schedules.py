"""Plot α(t) and the ELBO weight w(t) of every built-in noise schedule.

Usage::

    python scripts/plot_schedules.py [--out docs/img/schedules.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dualobj.schedules import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogSchedule,
    PolynomialSchedule,
)

SCHEDULES = {
    "linear: 1 − t": LinearSchedule(),
    "cosine '1-sin': 1 − sin(πt/2)": CosineSchedule("1-sin"),
    "cosine 'cos': cos(πt/2)": CosineSchedule("cos"),
    "cosine 'cos^2': cos²(πt/2)": CosineSchedule("cos^2"),
    "polynomial p=2: 1 − t²": PolynomialSchedule(2),
    "polynomial p=0.5: 1 − √t": PolynomialSchedule(0.5),
    "log: 1 − log₂(1 + t)": LogSchedule(),
    "geometric: exp(−σ), σ ∈ [1e-4, 20]": GeometricSchedule(1e-4, 20.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/schedules.png"))
    args = parser.parse_args()
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    tw = torch.logspace(-3, 0, 1001, dtype=torch.float64)
    fig, (ax_a, ax_w) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for label, schedule in SCHEDULES.items():
        (line,) = ax_a.plot(t, schedule.alpha(t), label=label)
        ax_w.plot(tw, schedule.weight(tw), color=line.get_color())
    ax_a.set(xlabel="t", ylabel="α(t)  (probability a token is still clean)", title="Noise schedules α(t)")
    ax_w.set(xlabel="t", ylabel="w(t) = −α′(t) / (1 − α(t))", title="ELBO weight w(t) (log–log)",
             xscale="log", yscale="log", ylim=(1e-3, 1e4))
    ax_a.legend(fontsize=8)
    for ax in (ax_a, ax_w):
        ax.grid(True, which="both", alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
