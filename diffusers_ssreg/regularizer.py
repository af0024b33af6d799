"""StateSpaceRegularizer and its pieces, importable from here as before; the implementation lives in
`diffusers_ssreg.regularizers.ssreg`, beside the other regularizers of `diffusers_ssreg.regularizers`
(see docs/method.md)."""

from .regularizers.base import TargetEncoder
from .regularizers.ssreg import (
    REGULARIZER_SUBFOLDER,
    STRUCTURE_FIELDS,
    WEIGHTS_NAME,
    BranchPlan,
    SSRegOutput,
    StateSpaceRegularizer,
    apply_transition,
    spatial_mean,
)


__all__ = [
    "REGULARIZER_SUBFOLDER",
    "STRUCTURE_FIELDS",
    "WEIGHTS_NAME",
    "BranchPlan",
    "SSRegOutput",
    "StateSpaceRegularizer",
    "TargetEncoder",
    "apply_transition",
    "spatial_mean",
]
