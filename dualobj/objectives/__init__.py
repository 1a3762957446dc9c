"""What to predict and how to weigh it: AR, MD and the dual mix, scored by one weighted cross-entropy."""

from dualobj.objectives._ar import ARObjective
from dualobj.objectives._base import Objective
from dualobj.objectives._batch import IGNORE_INDEX, Batch, LossOutput
from dualobj.objectives._block import BlockDiffusionObjective, bernoulli_masker
from dualobj.objectives._ce import NORMALIZERS, cross_entropy
from dualobj.objectives._distributed import batch_count, global_count, global_loss
from dualobj.objectives._dual import SPLITS, DualObjective, rank_is_ar
from dualobj.objectives._fused import linear_cross_entropy
from dualobj.objectives._md import WEIGHTINGS, MDObjective

__all__ = [
    "IGNORE_INDEX",
    "NORMALIZERS",
    "SPLITS",
    "WEIGHTINGS",
    "ARObjective",
    "Batch",
    "BlockDiffusionObjective",
    "DualObjective",
    "LossOutput",
    "MDObjective",
    "Objective",
    "batch_count",
    "bernoulli_masker",
    "cross_entropy",
    "global_count",
    "global_loss",
    "linear_cross_entropy",
    "rank_is_ar",
]
