"""SSRegConfig: every hyperparameter of the regularizer, with the paper's Flux setting as defaults."""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .basis import BASES, DISCRETIZATIONS, validate_grid


CONFIG_NAME = "ssreg_config.json"
CONFIG_FORMAT_VERSION = 1
LPIPS_NETS = ("vgg", "alex", "squeeze")


@dataclass
class SSRegConfig:
    """
    Configuration of a `StateSpaceRegularizer`. Defaults reproduce the paper's Flux VAE setting
    (Tables 2-3, A.5); fields marked "project decision" are choices the paper leaves open
    (see METHOD.md).
    """

    # --- the state-space model (Sec. 4.2, App. A.4) ---
    basis: str = field(default="fourier", metadata={"help": f"Basis of the transition matrix A: one of {BASES}."})
    grid: Optional[Tuple[int, int]] = field(
        default=None,
        metadata={"help": "(H, W) grid of basis functions with H*W = latent_channels; None: most square with W >= H."},
    )
    discretization: str = field(default="zoh", metadata={"help": f"Discretization of A: one of {DISCRETIZATIONS}."})
    delta_init: float = field(default=0.1, metadata={"help": "Initial value of the learnable step Δ > 0."})
    random_seed: int = field(default=0, metadata={"help": "Seed of the dense Gaussian A when basis='random'."})
    mean_centering: bool = field(
        default=True, metadata={"help": "Apply Ā to spatially mean-centred latents C(z) (eq. 24); False: to z."}
    )
    # --- the blur process (Sec. 4.2, A.5, Table 3) ---
    tau_max: float = field(default=10.0, metadata={"help": "Largest blur variance τ2 (pixels² at reference_resolution)."})
    delta_tau: float = field(default=4.0, metadata={"help": "Blur variance step Δ_I = τ2 - τ1."})
    reference_resolution: Optional[int] = field(
        default=256,
        metadata={"help": "Resolution at which tau_max/delta_tau hold; variances scale by (R/ref)². None: no scaling."},
    )
    # --- the training objective (eqs. 22-24, A.5) ---
    alpha: float = field(default=0.25, metadata={"help": "Probability that a sample goes to the regularization branch."})
    lambda_z: float = field(default=0.25, metadata={"help": "Weight of the latent state-space MSE (Flux 0.25, Cosmos 5.0)."})
    lambda_image: float = field(default=1.0, metadata={"help": "Weight λ_I of the blurred-image decoder term."})
    lambda_mae: float = field(default=1.0, metadata={"help": "Weight of the pixel L1 terms (both branches)."})
    lambda_lpips: float = field(default=0.1, metadata={"help": "Weight of the LPIPS terms (both branches); 0: no LPIPS."})
    kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the KL term of the reconstruction branch."})
    lpips_net: str = field(default="vgg", metadata={"help": f"LPIPS backbone: one of {LPIPS_NETS}."})
    lpips_pretrained_backbone: bool = field(
        default=True,
        metadata={"help": "Load the ImageNet backbone weights of LPIPS; False: random backbone (offline tests only)."},
    )
    # --- training state ---
    ema_decay: float = field(default=0.999, metadata={"help": "Decay of the EMA target encoder (A.5)."})
    ssm_lr_scale: float = field(default=0.1, metadata={"help": "Learning rate of A and Δ relative to the base LR."})
    freeze_encoder_blocks: int = field(default=2, metadata={"help": "Freeze this many first encoder down blocks."})
    freeze_decoder_blocks: int = field(default=2, metadata={"help": "Freeze this many last decoder up blocks."})

    def __post_init__(self):
        if self.basis not in BASES:
            raise ValueError(f"`basis` must be one of {BASES}, got {self.basis!r}.")
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(f"`discretization` must be one of {DISCRETIZATIONS}, got {self.discretization!r}.")
        if self.lpips_net not in LPIPS_NETS:
            raise ValueError(f"`lpips_net` must be one of {LPIPS_NETS}, got {self.lpips_net!r}.")
        if self.grid is not None:
            self.grid = validate_grid(self.grid)
        for name in ("delta_init", "delta_tau"):
            _check_number(name, getattr(self, name), low=0.0, low_open=True)
        _check_number("tau_max", self.tau_max, low=0.0)
        if self.tau_max < self.delta_tau:
            raise ValueError(f"`tau_max` ({self.tau_max}) must be >= `delta_tau` ({self.delta_tau}).")
        if self.reference_resolution is not None and (
            not isinstance(self.reference_resolution, int) or self.reference_resolution < 1
        ):
            raise ValueError(f"`reference_resolution` must be a positive int or None, got {self.reference_resolution!r}.")
        _check_number("alpha", self.alpha, low=0.0, high=1.0)
        for name in ("lambda_z", "lambda_image", "lambda_mae", "lambda_lpips", "kl_weight", "ssm_lr_scale"):
            _check_number(name, getattr(self, name), low=0.0)
        _check_number("ema_decay", self.ema_decay, low=0.0, high=1.0)
        for name in ("freeze_encoder_blocks", "freeze_decoder_blocks", "random_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
        for name in ("mean_centering", "lpips_pretrained_backbone"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")

    # --- serialization ---
    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-simple dict, with the format version and package version."""
        from . import __version__

        data = dataclasses.asdict(self)
        data["grid"] = list(self.grid) if self.grid is not None else None
        data["_ssreg_config_version"] = CONFIG_FORMAT_VERSION
        data["_diffusers_ssreg_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SSRegConfig":
        """Builds a config from `to_dict` output; rejects unknown fields and newer format versions."""
        data = dict(data)
        version = data.pop("_ssreg_config_version", CONFIG_FORMAT_VERSION)
        data.pop("_diffusers_ssreg_version", None)
        if version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"this config has format version {version}; this diffusers-ssreg reads up to {CONFIG_FORMAT_VERSION}: upgrade it."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SSRegConfig fields {unknown}; known fields: {sorted(known)}.")
        if data.get("grid") is not None:
            data["grid"] = tuple(data["grid"])
        return cls(**data)

    def save_pretrained(self, save_directory: str) -> str:
        """Writes `ssreg_config.json` into `save_directory` and returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, directory: str) -> "SSRegConfig":
        """Reads `ssreg_config.json` from `directory`."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not a StateSpaceRegularizer folder.")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _check_number(name, value, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"`{name}` must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}.")


# --------------------------------------------------------------------------------------------
# Command-line flags: one `--ssreg_<field>` per field, generated from the dataclass
# --------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _parse_grid(text: str):
    if str(text).lower() in ("none", "auto", ""):
        return None
    parts = str(text).lower().replace("x", ",").split(",")
    return tuple(int(p) for p in parts)


def _parse_optional_int(text: str):
    return None if str(text).lower() == "none" else int(text)


_FLAG_TYPES = {"grid": _parse_grid, "reference_resolution": _parse_optional_int}


def add_config_arguments(parser, prefix: str = "ssreg_") -> None:
    """Adds `--<prefix><field>` for every SSRegConfig field; a flag left out is absent from the namespace."""
    group = parser.add_argument_group("structured state-space regularization (SSRegConfig)")
    for f in dataclasses.fields(SSRegConfig):
        if f.name in _FLAG_TYPES:
            kind = _FLAG_TYPES[f.name]
        elif f.type in (bool, "bool"):
            kind = _parse_bool
        elif f.type in (int, "int"):
            kind = int
        elif f.type in (float, "float"):
            kind = float
        else:
            kind = str
        default = f.default if f.name != "grid" else "auto"
        group.add_argument(
            f"--{prefix}{f.name}", type=kind, default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {default})"
        )


def config_from_args(args, prefix: str = "ssreg_", defaults: Optional[Dict[str, Any]] = None) -> SSRegConfig:
    """Builds an SSRegConfig from parsed flags; flags left unset fall back to `defaults`, then to the paper's values."""
    values = dict(defaults or {})
    for f in dataclasses.fields(SSRegConfig):
        if hasattr(args, prefix + f.name):  # given on the command line (None is a valid value: "none", "auto")
            values[f.name] = getattr(args, prefix + f.name)
    try:
        return SSRegConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid --{prefix}* flag: {error}") from error
