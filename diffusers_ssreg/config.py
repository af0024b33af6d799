"""Regularizer configurations: the fields every regularizer shares, and SSRegConfig.

`RegularizerConfig` holds what the paper's Table 1 keeps fixed across methods (the plain
reconstruction loss and the frozen blocks), validation, JSON, loading from a folder or a Hub
repository, and the generated command-line flags. `SSRegConfig` adds every hyperparameter of the
structured state-space regularization, with the paper's Flux setting as defaults.
"""

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

from .basis import BASES, DISCRETIZATIONS, validate_grid


CONFIG_NAME = "ssreg_config.json"
CONFIG_FORMAT_VERSION = 1
LPIPS_NETS = ("vgg", "alex", "squeeze")


# --------------------------------------------------------------------------------------------
# Files in a local folder or a Hub repository
# --------------------------------------------------------------------------------------------


def resolve_file(
    pretrained_model_name_or_path: str,
    filename: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: Optional[bool] = None,
) -> str:
    """
    Local path of `filename` in a folder, or in a Hub repository (fetched into the Hugging Face
    cache with `huggingface_hub.hf_hub_download`, which also serves it offline from the cache).

    Raises a `FileNotFoundError` naming the file and where it was looked for.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    source = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {filename} in {folder!r}.")
        return path
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(
            f"no {filename} in {source!r}: it is neither a local folder nor a Hub repository id ('org/name')."
        ) from None
    try:
        return hf_hub_download(
            source,
            filename,
            subfolder=subfolder or None,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=bool(local_files_only),
        )
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"no {filename} in {source!r} (no such local folder; as a Hub repository: subfolder={subfolder!r}, "
            f"revision={revision!r}): {type(error).__name__}: {error}"
        ) from error


# --------------------------------------------------------------------------------------------
# The shared base
# --------------------------------------------------------------------------------------------


def _check_number(name, value, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"`{name}` must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}.")


def _check_int(name, value, low=0):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        kind = "a non-negative int" if low == 0 else f"an int >= {low}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


@dataclass
class RegularizerConfig:
    """
    The fields every regularizer shares: the plain reconstruction loss λ_MAE·L1 + λ_LPIPS·LPIPS + w_KL·KL
    and the frozen blocks, i.e. what the paper's Table 1 holds fixed across methods (A.5: no
    discriminator). Defaults are the paper's Flux setting. Subclasses add their method's fields and
    set `regularizer_name` and `config_name` (the JSON file written by `save_pretrained`).
    """

    regularizer_name: ClassVar[str] = ""
    config_name: ClassVar[str] = "regularizer_config.json"
    version_key: ClassVar[str] = "_config_version"
    format_version: ClassVar[int] = 1
    # Command-line parsers of fields whose type is not a plain bool/int/float/str/tuple.
    flag_parsers: ClassVar[Dict[str, Callable[[str], Any]]] = {}

    lambda_mae: float = field(default=1.0, metadata={"help": "Weight of the pixel L1 terms."})
    lambda_lpips: float = field(default=0.1, metadata={"help": "Weight of the LPIPS terms; 0: no LPIPS."})
    kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the KL term of the posterior."})
    lpips_net: str = field(default="vgg", metadata={"help": f"LPIPS backbone: one of {LPIPS_NETS}."})
    lpips_pretrained_backbone: bool = field(
        default=True,
        metadata={"help": "Load the ImageNet backbone weights of LPIPS; False: random backbone (offline tests only)."},
    )
    freeze_encoder_blocks: int = field(default=2, metadata={"help": "Freeze this many first encoder down blocks."})
    freeze_decoder_blocks: int = field(default=2, metadata={"help": "Freeze this many last decoder up blocks."})

    def __post_init__(self):
        if self.lpips_net not in LPIPS_NETS:
            raise ValueError(f"`lpips_net` must be one of {LPIPS_NETS}, got {self.lpips_net!r}.")
        for name in ("lambda_mae", "lambda_lpips", "kl_weight"):
            _check_number(name, getattr(self, name), low=0.0)
        for name in ("freeze_encoder_blocks", "freeze_decoder_blocks"):
            _check_int(name, getattr(self, name))
        _check_bool("lpips_pretrained_backbone", self.lpips_pretrained_backbone)

    # --- serialization ---
    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-simple dict (tuples as lists), with the method's name, format and package version."""
        from . import __version__

        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        data[self.version_key] = self.format_version
        data["_regularizer"] = self.regularizer_name
        data["_diffusers_ssreg_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RegularizerConfig":
        """Builds a config from `to_dict` output; rejects another method's config, unknown fields and newer formats."""
        data = dict(data)
        version = data.pop(cls.version_key, cls.format_version)
        data.pop("_diffusers_ssreg_version", None)
        method = data.pop("_regularizer", cls.regularizer_name)
        if method != cls.regularizer_name:
            raise ValueError(
                f"this config is of the regularizer {method!r}, not {cls.regularizer_name!r} ({cls.__name__})."
            )
        if version > cls.format_version:
            raise ValueError(
                f"this config has format version {version}; this diffusers-ssreg reads up to {cls.format_version}: upgrade it."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}.")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    def save_pretrained(self, save_directory: str) -> str:
        """Writes `config_name` (e.g. `ssreg_config.json`) into `save_directory` and returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_json_file(cls, path: str) -> "RegularizerConfig":
        """Reads a config JSON file written by `save_pretrained`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[str] = None,
        token: Optional[str] = None,
        local_files_only: Optional[bool] = None,
    ) -> "RegularizerConfig":
        r"""
        Reads `config_name` from a folder or a Hub repository.

        Args:
            pretrained_model_name_or_path (`str`): a folder, or a Hub repository id such as `"org/flux-vae-ssreg"`.
            subfolder (`str`, *optional*): the folder inside it, e.g. `"ssreg"` beside an exported VAE.
            revision (`str`, *optional*): a branch, tag or commit of the Hub repository.
            cache_dir, token, local_files_only: passed to `huggingface_hub.hf_hub_download`.
        """
        try:
            path = resolve_file(
                pretrained_model_name_or_path, cls.config_name, subfolder, revision, cache_dir, token, local_files_only
            )
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} Not a saved {cls.regularizer_name!r} regularizer folder.") from error
        return cls.from_json_file(path)


# --------------------------------------------------------------------------------------------
# SSReg
# --------------------------------------------------------------------------------------------


@dataclass
class SSRegConfig(RegularizerConfig):
    """
    Configuration of a `StateSpaceRegularizer`. Defaults reproduce the paper's Flux VAE setting
    (Tables 2-3, A.5); fields marked "project decision" are choices the paper leaves open
    (see docs/method.md).
    """

    regularizer_name: ClassVar[str] = "ssreg"
    config_name: ClassVar[str] = CONFIG_NAME
    version_key: ClassVar[str] = "_ssreg_config_version"
    format_version: ClassVar[int] = CONFIG_FORMAT_VERSION

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
    # --- training state ---
    ema_decay: float = field(default=0.999, metadata={"help": "Decay of the EMA target encoder (A.5)."})
    ssm_lr_scale: float = field(default=0.1, metadata={"help": "Learning rate of A and Δ relative to the base LR."})

    def __post_init__(self):
        if self.basis not in BASES:
            raise ValueError(f"`basis` must be one of {BASES}, got {self.basis!r}.")
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(f"`discretization` must be one of {DISCRETIZATIONS}, got {self.discretization!r}.")
        super().__post_init__()
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
        for name in ("lambda_z", "lambda_image", "ssm_lr_scale"):
            _check_number(name, getattr(self, name), low=0.0)
        _check_number("ema_decay", self.ema_decay, low=0.0, high=1.0)
        _check_int("random_seed", self.random_seed)
        _check_bool("mean_centering", self.mean_centering)


# --------------------------------------------------------------------------------------------
# Command-line flags: one `--<prefix><field>` per field, generated from the dataclass
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


def _tuple_parser(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """`"0.5,0.75"` -> `(0.5, 0.75)`; an empty string or `none` gives `()`."""

    def parse(text: str) -> tuple:
        text = str(text).strip()
        if text.lower() in ("", "none"):
            return ()
        return tuple(kind(part) for part in text.split(","))

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


SSRegConfig.flag_parsers = {"grid": _parse_grid, "reference_resolution": _parse_optional_int}


def _flag_parser(config_class, f: dataclasses.Field) -> Callable[[str], Any]:
    if f.name in config_class.flag_parsers:
        return config_class.flag_parsers[f.name]
    kind = f.type
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        return _tuple_parser(items[0] if items else str)
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
        if inner is int:
            return _parse_optional_int
        return lambda text: None if str(text).lower() == "none" else inner(text)
    return {bool: _parse_bool, int: int, float: float}.get(kind, str)


def _shown_default(f: dataclasses.Field):
    if f.name == "grid":
        return "auto"
    if isinstance(f.default, tuple):
        return ",".join(str(v) for v in f.default) or "none"
    return f.default


def add_config_arguments(parser, prefix: str = "ssreg_", config_class=SSRegConfig, title: Optional[str] = None) -> None:
    """Adds `--<prefix><field>` for every field of `config_class`; a flag left out is absent from the namespace."""
    title = title or (
        "structured state-space regularization (SSRegConfig)" if config_class is SSRegConfig else config_class.__name__
    )
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config_class):
        group.add_argument(
            f"--{prefix}{f.name}",
            type=_flag_parser(config_class, f),
            default=argparse.SUPPRESS,
            help=f"{f.metadata.get('help', '')} (default: {_shown_default(f)})",
        )


def config_from_args(args, prefix: str = "ssreg_", defaults: Optional[Dict[str, Any]] = None, config_class=SSRegConfig):
    """Builds a `config_class` from parsed flags; flags left unset fall back to `defaults`, then to the paper's values."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(defaults or {}) - known)
    if unknown:
        raise ValueError(f"`defaults` has fields {unknown} that {config_class.__name__} does not have.")
    values = dict(defaults or {})
    for name in known:
        if hasattr(args, prefix + name):  # given on the command line (None is a valid value: "none", "auto")
            values[name] = getattr(args, prefix + name)
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        # name the flag(s) of the field(s) the config's message names in backticks
        named = [f"--{prefix}{name}" for name in sorted(known) if f"`{name}`" in str(error)]
        raise ValueError(f"invalid --{prefix}* flag{' ' + ', '.join(named) if named else ''}: {error}") from error
