"""Evaluation of one model in its three modes: held-out AR NLL, MD ELBO (antithetic or exact-count Monte Carlo),
prefix-LM scoring, and multiple-choice scoring (AR, prefix, MD pseudo-log-likelihood) with a zero-shot probe."""

from dualobj.evaluation._block import MonteCarloNLL, bd_nelbo
from dualobj.evaluation._choice import (
    MODES,
    Question,
    choice_accuracy,
    completion_logprobs,
    next_line_probe,
    score_choices,
)
from dualobj.evaluation._likelihood import (
    NLL,
    antithetic_times,
    ar_nll,
    md_elbo,
    prefix_nll,
)

__all__ = [
    "MODES",
    "NLL",
    "MonteCarloNLL",
    "Question",
    "antithetic_times",
    "ar_nll",
    "bd_nelbo",
    "choice_accuracy",
    "completion_logprobs",
    "md_elbo",
    "next_line_probe",
    "prefix_nll",
    "score_choices",
]
