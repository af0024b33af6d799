"""diffusers-ssreg: Structured State-Space Regularization (arXiv 2604.11089) for diffusers' AutoencoderKL."""

__version__ = "0.1.0.dev0"

from .basis import (
    BASES,
    DISCRETIZATIONS,
    channel_frequency_order,
    channel_to_basis_index,
    default_grid,
    discretize,
    transition_mask,
    transition_matrix,
)
from .blur import gaussian_blur, resolution_scale, sample_tau_pairs
from .config import RegularizerConfig, SSRegConfig
from .regularizer import REGULARIZER_SUBFOLDER, BranchPlan, SSRegOutput, StateSpaceRegularizer
from .regularizers import LatentRegularizer, RegularizerOutput

__all__ = [
    "BASES",
    "BranchPlan",
    "DISCRETIZATIONS",
    "LatentRegularizer",
    "REGULARIZER_SUBFOLDER",
    "RegularizerConfig",
    "RegularizerOutput",
    "SSRegConfig",
    "SSRegOutput",
    "StateSpaceRegularizer",
    "channel_frequency_order",
    "channel_to_basis_index",
    "default_grid",
    "discretize",
    "gaussian_blur",
    "resolution_scale",
    "sample_tau_pairs",
    "transition_mask",
    "transition_matrix",
]
