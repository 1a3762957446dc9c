"""dualobj: composable language-model training objectives (autoregressive, masked diffusion, and their mix).

The subpackages are the API: :mod:`dualobj.objectives`, :mod:`dualobj.masking`, :mod:`dualobj.schedules`,
:mod:`dualobj.attention`, :mod:`dualobj.metrics`, :mod:`dualobj.evaluation`, :mod:`dualobj.models`,
:mod:`dualobj.data`. The most used names are re-exported here.
"""

from dualobj._errors import DualObjError, DualObjTypeError, set_validation, validation, validation_enabled
from dualobj.objectives import (
    ARObjective,
    Batch,
    DualObjective,
    LossOutput,
    MDObjective,
    Mixture,
    Objective,
    cross_entropy,
    global_loss,
)

__version__ = "0.1.0"

__all__ = [
    "ARObjective",
    "Batch",
    "DualObjError",
    "DualObjTypeError",
    "DualObjective",
    "LossOutput",
    "MDObjective",
    "Mixture",
    "Objective",
    "__version__",
    "cross_entropy",
    "global_loss",
    "set_validation",
    "validation",
    "validation_enabled",
]
