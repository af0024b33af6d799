"""Loading the VAE a model flag names: which classes the package supports, checked before any weights load.

One helper for every script and flag (`--pretrained_model_name_or_path`, `--model_config_name_or_path`,
`--pretrained_vae_model_name_or_path`, `ssreg-eval --vae`): the folder's or repo's `config.json` is read
first and its `_class_name` checked against `SUPPORTED_VAE_CLASSES`, so that another VAE class is refused
with a clear error instead of being loaded as an `AutoencoderKL` with parts of its weights dropped
(diffusers' `from_pretrained` only warns about unexpected weights). Support for more classes is added here.
"""

import os
from typing import Optional

from diffusers import AutoencoderKL


# `_class_name` -> the diffusers class; a config without `_class_name` is taken as an AutoencoderKL.
SUPPORTED_VAE_CLASSES = {"AutoencoderKL": AutoencoderKL}


def _location(pretrained_model_name_or_path: str, subfolder: Optional[str]) -> str:
    return f"{pretrained_model_name_or_path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")


def load_vae_config(
    pretrained_model_name_or_path: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    flag: str = "--pretrained_model_name_or_path",
    subfolder_flag: str = "--vae_subfolder",
) -> dict:
    """
    The VAE's `config.json`, checked to be of a supported class. Raises a ValueError naming `flag`, the
    location and, for another class, the class found and the supported ones.
    """
    try:
        config = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder=subfolder, revision=revision)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ValueError(
            f"could not load an AutoencoderKL from {flag} {_location(pretrained_model_name_or_path, subfolder)}: "
            f"{type(error).__name__}: {error}. Give a Hub id or a folder holding an AutoencoderKL"
            f"{' already in the Hugging Face cache (HF_HUB_OFFLINE is set)' if offline else ''} "
            f"(for a pipeline repo add {subfolder_flag} vae)."
        ) from error
    check_vae_class(config, pretrained_model_name_or_path, subfolder, flag)
    return config


def check_vae_class(config: dict, pretrained_model_name_or_path: str, subfolder=None, flag="--pretrained_model_name_or_path"):
    """Raises a ValueError when `config["_class_name"]` is not one of `SUPPORTED_VAE_CLASSES`; returns the class."""
    name = config.get("_class_name") or "AutoencoderKL"
    if name not in SUPPORTED_VAE_CLASSES:
        raise ValueError(
            f"{flag} {_location(pretrained_model_name_or_path, subfolder)} holds a model of class {name}; supported VAE classes: "
            f"{', '.join(sorted(SUPPORTED_VAE_CLASSES))}. Loading it as an AutoencoderKL would silently drop the "
            f"weights and buffers that class adds."
        )
    return SUPPORTED_VAE_CLASSES[name]


def load_vae(
    pretrained_model_name_or_path: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    from_config: bool = False,
    flag: str = "--pretrained_model_name_or_path",
    subfolder_flag: str = "--vae_subfolder",
    **kwargs,
):
    """
    The VAE at `pretrained_model_name_or_path` (a Hub id or a folder), its class checked first
    (`load_vae_config`); with `from_config`, a random-init model of that config. Errors name `flag`;
    `kwargs` go to `from_pretrained` (e.g. the dtype).
    """
    config = load_vae_config(pretrained_model_name_or_path, subfolder, revision, flag, subfolder_flag)
    cls = check_vae_class(config, pretrained_model_name_or_path, subfolder, flag)
    if from_config:
        return cls.from_config(config)
    try:
        return cls.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, revision=revision, variant=variant, **kwargs
        )
    except Exception as error:
        raise ValueError(
            f"could not load the weights of the {cls.__name__} at {flag} "
            f"{_location(pretrained_model_name_or_path, subfolder)}: {type(error).__name__}: {error}."
        ) from error
