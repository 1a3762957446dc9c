"""What to predict and how to weigh it: AR, MD, mixtures of any objectives, scored by one weighted cross-entropy.

Every objective follows one contract, :class:`ObjectiveProtocol`: ``prepare(tokens, *, step=None, doc_ids=None,
prompt_lengths=None, generator=None) -> Batch`` and ``loss(output, batch, *, head=None, ...) -> LossOutput``.
"""

from dualobj.objectives._ar import ARObjective
from dualobj.objectives._base import Normalize, Objective, ObjectiveProtocol, require_step
from dualobj.objectives._batch import IGNORE_INDEX, Batch, LossOutput
from dualobj.objectives._block import BlockDiffusionObjective, bernoulli_masker
from dualobj.objectives._ce import NORMALIZERS, cross_entropy
from dualobj.objectives._distributed import batch_count, global_count, global_loss
from dualobj.objectives._dual import DualObjective, rank_is_ar
from dualobj.objectives._fused import linear_cross_entropy
from dualobj.objectives._md import WEIGHTINGS, MDObjective
from dualobj.objectives._mixture import SPLITS, Mixture, Split, Weight, rank_component, row_counts

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
    "Mixture",
    "Normalize",
    "Objective",
    "ObjectiveProtocol",
    "Split",
    "Weight",
    "batch_count",
    "bernoulli_masker",
    "cross_entropy",
    "global_count",
    "global_loss",
    "linear_cross_entropy",
    "rank_component",
    "rank_is_ar",
    "require_step",
    "row_counts",
]
