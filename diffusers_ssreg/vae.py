"""Loading the VAE a model flag names: which classes the package supports, checked before any weights load.

One helper for every script and flag (`--pretrained_model_name_or_path`, `--model_config_name_or_path`,
`--pretrained_vae_model_name_or_path`, `ssreg-eval --vae`): the folder's or repo's `config.json` is read
first and its `_class_name` checked against the classes the caller handles, so that another VAE class is
refused with a clear error instead of being loaded as an `AutoencoderKL` with parts of its weights dropped
(diffusers' `from_pretrained` only warns about unexpected weights).

`SUPPORTED_VAE_CLASSES` are the classes whose image path the regularizers, the fine-tuning script, the
latent cache and `ssreg-eval` handle: `AutoencoderKL` and `AutoencoderKLFlux2` (the FLUX.2 VAE: the same
encoder, decoder and quant convs, plus a BatchNorm over 2x2-patchified latents that only its pipeline
reads). Why `AutoencoderKLCosmos` is not among them: docs/method.md.
"""

import os
from typing import Iterable, Optional

import diffusers
from diffusers import AutoencoderKL


# `_class_name` -> the diffusers class; a config without `_class_name` is taken as an AutoencoderKL.
# AutoencoderKLFlux2 exists from diffusers 0.36 on; with an older diffusers only AutoencoderKL is supported.
SUPPORTED_VAE_CLASSES = {
    name: getattr(diffusers, name) for name in ("AutoencoderKL", "AutoencoderKLFlux2") if hasattr(diffusers, name)
}
# What `load_vae_config` accepts unless told otherwise: callers that rebuild the VAE as an `AutoencoderKL`
# (the DiT scripts) take this class only.
DEFAULT_VAE_CLASSES = ("AutoencoderKL",)


def supported_vae_classes_text(classes: Iterable[str] = tuple(SUPPORTED_VAE_CLASSES)) -> str:
    """`"AutoencoderKL, AutoencoderKLFlux2"`: the class names, sorted, for error messages and help texts."""
    return ", ".join(sorted(classes))


def check_vae_instance(vae, argument: str = "vae") -> None:
    """Raises a TypeError naming `argument`, the class received and the supported ones unless `vae` is one of them."""
    if not isinstance(vae, tuple(SUPPORTED_VAE_CLASSES.values())):
        raise TypeError(
            f"`{argument}` must be a diffusers autoencoder of a supported class ({supported_vae_classes_text()}), "
            f"got {type(vae).__module__}.{type(vae).__name__}."
        )


def _location(pretrained_model_name_or_path: str, subfolder: Optional[str]) -> str:
    return f"{pretrained_model_name_or_path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")


def load_vae_config(
    pretrained_model_name_or_path: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    flag: str = "--pretrained_model_name_or_path",
    subfolder_flag: str = "--vae_subfolder",
    classes: Iterable[str] = DEFAULT_VAE_CLASSES,
) -> dict:
    """
    The VAE's `config.json`, checked to be of one of `classes` (names of `SUPPORTED_VAE_CLASSES`). Raises a
    ValueError naming `flag`, the location and, for another class, the class found and the accepted ones.
    """
    classes = tuple(classes)
    try:
        config = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder=subfolder, revision=revision)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        wanted = " or ".join(sorted(classes))
        raise ValueError(
            f"could not load an {wanted} from {flag} {_location(pretrained_model_name_or_path, subfolder)}: "
            f"{type(error).__name__}: {error}. Give a Hub id or a folder holding an {wanted}"
            f"{' already in the Hugging Face cache (HF_HUB_OFFLINE is set)' if offline else ''} "
            f"(for a pipeline repo add {subfolder_flag} vae)."
        ) from error
    check_vae_class(config, pretrained_model_name_or_path, subfolder, flag, classes)
    return config


def check_vae_class(
    config: dict,
    pretrained_model_name_or_path: str,
    subfolder=None,
    flag="--pretrained_model_name_or_path",
    classes: Iterable[str] = DEFAULT_VAE_CLASSES,
):
    """Raises a ValueError when `config["_class_name"]` is not one of `classes`; returns the class."""
    classes = [c for c in classes if c in SUPPORTED_VAE_CLASSES]
    name = config.get("_class_name") or "AutoencoderKL"
    if name not in classes:
        raise ValueError(
            f"{flag} {_location(pretrained_model_name_or_path, subfolder)} holds a model of class {name}; supported VAE "
            f"classes: {supported_vae_classes_text(classes)}. Loading it as one of them would silently drop the "
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
    classes: Iterable[str] = tuple(SUPPORTED_VAE_CLASSES),
    **kwargs,
):
    """
    The VAE at `pretrained_model_name_or_path` (a Hub id or a folder), of the class its config names (one of
    `classes`, by default every class of `SUPPORTED_VAE_CLASSES`), its class checked first (`load_vae_config`);
    with `from_config`, a random-init model of that config. Errors name `flag`; `kwargs` go to
    `from_pretrained` (e.g. the dtype).
    """
    config = load_vae_config(pretrained_model_name_or_path, subfolder, revision, flag, subfolder_flag, classes)
    cls = check_vae_class(config, pretrained_model_name_or_path, subfolder, flag, classes)
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
