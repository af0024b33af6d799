"""Latent regularizers of the package, behind one protocol (`LatentRegularizer`)."""

from .base import LatentRegularizer, RegularizerOutput, TargetEncoder
from .ssreg import BranchPlan, SSRegOutput, StateSpaceRegularizer


__all__ = [
    "BranchPlan",
    "LatentRegularizer",
    "RegularizerOutput",
    "SSRegOutput",
    "StateSpaceRegularizer",
    "TargetEncoder",
]
