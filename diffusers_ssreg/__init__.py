"""diffusers-ssreg: Structured State-Space Regularization (arXiv 2604.11089) for diffusers' AutoencoderKL and
AutoencoderKLFlux2, beside the latent regularizers it is compared with (EQ-VAE, scale equivariance, spectrum matching)."""

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
from .models import LightningDiTTransformer2DModel
from .pipelines import DiTFlowPipeline, LightningDiTPipeline  # also lets DiffusionPipeline.from_pretrained find them
from .regularizer import REGULARIZER_SUBFOLDER, BranchPlan, SSRegOutput, StateSpaceRegularizer
from .regularizers import (
    REGULARIZERS,
    EQVAEConfig,
    EQVAERegularizer,
    LatentRegularizer,
    PlainFinetune,
    PlainFinetuneConfig,
    RegularizerOutput,
    ScaleEquivarianceConfig,
    ScaleEquivarianceRegularizer,
    SpectrumMatchingConfig,
    SpectrumMatchingRegularizer,
    add_regularizer_arguments,
    build_regularizer,
    load_regularizer,
    regularizer_config_from_args,
    regularizer_from_args,
)


__all__ = [
    "BASES",
    "BranchPlan",
    "DISCRETIZATIONS",
    "DiTFlowPipeline",
    "EQVAEConfig",
    "EQVAERegularizer",
    "LatentRegularizer",
    "LightningDiTPipeline",
    "LightningDiTTransformer2DModel",
    "PlainFinetune",
    "PlainFinetuneConfig",
    "REGULARIZERS",
    "REGULARIZER_SUBFOLDER",
    "RegularizerConfig",
    "RegularizerOutput",
    "SSRegConfig",
    "SSRegOutput",
    "ScaleEquivarianceConfig",
    "ScaleEquivarianceRegularizer",
    "SpectrumMatchingConfig",
    "SpectrumMatchingRegularizer",
    "StateSpaceRegularizer",
    "add_regularizer_arguments",
    "build_regularizer",
    "channel_frequency_order",
    "channel_to_basis_index",
    "default_grid",
    "discretize",
    "gaussian_blur",
    "load_regularizer",
    "regularizer_config_from_args",
    "regularizer_from_args",
    "resolution_scale",
    "sample_tau_pairs",
    "transition_mask",
    "transition_matrix",
]
