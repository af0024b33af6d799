"""Every latent regularizer of the package, behind one protocol, and the registry that makes each one a flag.

| name | class | config | flags | saved to |
|---|---|---|---|---|
| `ssreg` | `StateSpaceRegularizer` | `SSRegConfig` | `--ssreg_*` | `ssreg/` |
| `eqvae` | `EQVAERegularizer` | `EQVAEConfig` | `--eqvae_*` | `eqvae/` |
| `scale_equivariance` | `ScaleEquivarianceRegularizer` | `ScaleEquivarianceConfig` | `--se_*` | `scale_equivariance/` |
| `spectrum_matching` | `SpectrumMatchingRegularizer` | `SpectrumMatchingConfig` | `--sm_*` | `spectrum_matching/` |
| `none` | `PlainFinetune` | `PlainFinetuneConfig` | `--plain_*` | `plain/` |

A script gains `--regularizer {ssreg,eqvae,scale_equivariance,spectrum_matching,none}` and every
method's fields with `add_regularizer_arguments(parser)`, builds the chosen config with
`regularizer_config_from_args(args)` (in `parse_args`, so bad values fail before any work) and the
regularizer with `build_regularizer(args.regularizer, vae, config)`.
"""

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Type

from diffusers import AutoencoderKL

from ..config import RegularizerConfig, SSRegConfig, add_config_arguments, config_from_args, resolve_file
from .base import LatentRegularizer, RegularizerOutput, TargetEncoder
from .eqvae import EQVAEConfig, EQVAEOutput, EQVAEPlan, EQVAERegularizer
from .plain import PlainFinetune, PlainFinetuneConfig, PlainFinetuneOutput
from .scale_equivariance import (
    ScaleEquivarianceConfig,
    ScaleEquivarianceOutput,
    ScaleEquivariancePlan,
    ScaleEquivarianceRegularizer,
)
from .spectrum_matching import (
    SpectrumMatchingConfig,
    SpectrumMatchingOutput,
    SpectrumMatchingPlan,
    SpectrumMatchingRegularizer,
)
from .ssreg import BranchPlan, SSRegOutput, StateSpaceRegularizer


@dataclass(frozen=True)
class RegularizerSpec:
    """
    One entry of `REGULARIZERS`.

    Args:
        name (`str`): the value of `--regularizer`.
        regularizer_class (`type`): the `LatentRegularizer` subclass.
        flag_prefix (`str`): its fields are the flags `--<flag_prefix><field>`.
        title (`str`): the method in words (help texts, model cards).
    """

    name: str
    regularizer_class: Type[LatentRegularizer]
    flag_prefix: str
    title: str

    @property
    def config_class(self) -> Type[RegularizerConfig]:
        return self.regularizer_class.config_class

    @property
    def subfolder(self) -> str:
        """The folder its state is saved to beside an exported VAE."""
        return self.regularizer_class.subfolder


REGULARIZERS: Dict[str, RegularizerSpec] = {
    spec.name: spec
    for spec in (
        RegularizerSpec("ssreg", StateSpaceRegularizer, "ssreg_", "structured state-space regularization (SSReg)"),
        RegularizerSpec("eqvae", EQVAERegularizer, "eqvae_", "EQ-VAE equivariance regularization"),
        RegularizerSpec("scale_equivariance", ScaleEquivarianceRegularizer, "se_", "scale equivariance (FT-SE)"),
        RegularizerSpec("spectrum_matching", SpectrumMatchingRegularizer, "sm_", "spectrum matching (ESM / DSM)"),
        RegularizerSpec("none", PlainFinetune, "plain_", "plain reconstruction fine-tuning (no regularizer)"),
    )
}
DEFAULT_REGULARIZER = "ssreg"


def get_regularizer_spec(name: str) -> RegularizerSpec:
    """The registry entry of `name`, with a clear error for an unknown one."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {sorted(REGULARIZERS)}.")
    return REGULARIZERS[name]


def build_regularizer(name: str, vae: AutoencoderKL, config: Optional[RegularizerConfig] = None) -> LatentRegularizer:
    """Attaches the regularizer `name` (a key of `REGULARIZERS`) to `vae`; `config` defaults to its paper's setting."""
    return get_regularizer_spec(name).regularizer_class(vae, config)


# --------------------------------------------------------------------------------------------
# Command-line flags
# --------------------------------------------------------------------------------------------


def add_regularizer_arguments(parser: argparse.ArgumentParser, default: str = DEFAULT_REGULARIZER) -> None:
    """Adds `--regularizer` and, for every method, `--<prefix><field>` for each field of its config."""
    listing = "; ".join(f"{spec.name}: {spec.title} (flags --{spec.flag_prefix}*)" for spec in REGULARIZERS.values())
    parser.add_argument(
        "--regularizer",
        choices=list(REGULARIZERS),
        default=default,
        help=f"The latent regularizer to fine-tune with: {listing}. (default: {default})",
    )
    for spec in REGULARIZERS.values():
        add_config_arguments(
            parser,
            prefix=spec.flag_prefix,
            config_class=spec.config_class,
            title=f"{spec.title}: {spec.config_class.__name__}, used with --regularizer {spec.name}",
        )


def regularizer_config_from_args(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None) -> RegularizerConfig:
    """
    The config of `args.regularizer` from its flags, the other fields from `defaults` (shared fields
    such as `freeze_encoder_blocks`), then from its paper. A flag of another method is an error.
    """
    spec = get_regularizer_spec(getattr(args, "regularizer", DEFAULT_REGULARIZER))
    for other in REGULARIZERS.values():
        if other is spec:
            continue
        given = sorted(
            f"--{other.flag_prefix}{f.name}" for f in fields(other.config_class) if hasattr(args, other.flag_prefix + f.name)
        )
        if given:
            raise ValueError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --regularizer {other.name}, "
                f"but --regularizer is {spec.name}: use its --{spec.flag_prefix}* flags."
            )
    return config_from_args(args, prefix=spec.flag_prefix, defaults=defaults, config_class=spec.config_class)


def regularizer_from_args(
    args: argparse.Namespace, vae: AutoencoderKL, defaults: Optional[Dict[str, Any]] = None
) -> LatentRegularizer:
    """`build_regularizer(args.regularizer, vae, regularizer_config_from_args(args, defaults))`."""
    config = regularizer_config_from_args(args, defaults)
    return build_regularizer(getattr(args, "regularizer", DEFAULT_REGULARIZER), vae, config)


# --------------------------------------------------------------------------------------------
# Loading a saved regularizer of any method
# --------------------------------------------------------------------------------------------


def load_regularizer(
    pretrained_model_name_or_path: str,
    vae: AutoencoderKL,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: Optional[bool] = None,
) -> LatentRegularizer:
    """
    Rebuilds whichever regularizer was saved in a folder or Hub repository (its config file names the
    method) and attaches it to `vae`. Arguments as `LatentRegularizer.from_pretrained`.
    """
    hub = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    names = [spec.config_class.config_name for spec in REGULARIZERS.values()]
    for spec in REGULARIZERS.values():
        try:
            resolve_file(pretrained_model_name_or_path, spec.config_class.config_name, **hub)
        except FileNotFoundError:
            continue
        return spec.regularizer_class.from_pretrained(pretrained_model_name_or_path, vae, **hub)
    where = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "")
    raise FileNotFoundError(f"no regularizer config ({', '.join(names)}) in {where!r}.")


__all__ = [
    "DEFAULT_REGULARIZER",
    "REGULARIZERS",
    "BranchPlan",
    "EQVAEConfig",
    "EQVAEOutput",
    "EQVAEPlan",
    "EQVAERegularizer",
    "LatentRegularizer",
    "PlainFinetune",
    "PlainFinetuneConfig",
    "PlainFinetuneOutput",
    "RegularizerConfig",
    "RegularizerOutput",
    "RegularizerSpec",
    "SSRegConfig",
    "SSRegOutput",
    "ScaleEquivarianceConfig",
    "ScaleEquivarianceOutput",
    "ScaleEquivariancePlan",
    "ScaleEquivarianceRegularizer",
    "SpectrumMatchingConfig",
    "SpectrumMatchingOutput",
    "SpectrumMatchingPlan",
    "SpectrumMatchingRegularizer",
    "StateSpaceRegularizer",
    "TargetEncoder",
    "add_regularizer_arguments",
    "build_regularizer",
    "get_regularizer_spec",
    "load_regularizer",
    "regularizer_config_from_args",
    "regularizer_from_args",
]
