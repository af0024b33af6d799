"""The protocol every latent regularizer follows, and what they all share.

A regularizer attaches to a diffusers `AutoencoderKL` or `AutoencoderKLFlux2` (`vae.SUPPORTED_VAE_CLASSES`;
it holds a reference; the VAE's parameters stay the VAE's own), runs the VAE in `forward(pixel_values)`
and returns an output with `.loss` and every logged term. Written once here: the plain reconstruction loss λ_MAE·L1 + λ_LPIPS·LPIPS +
w_KL·KL, the frozen blocks, the optimizer parameter groups, the per-sample branch draw on the host,
`save_pretrained` / `from_pretrained` of the regularizer's own state (apart from the VAE, from a
folder or a Hub repository) and `unload()`, which hands back the very same VAE untouched.

What the paper's Table 1 holds fixed across methods lives in `RegularizerConfig` (diffusers_ssreg.config):
the reconstruction loss, the frozen blocks, and no discriminator.
"""

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from diffusers.utils import BaseOutput
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import RegularizerConfig, resolve_file
from ..losses import LPIPS_MIN_SIZE, build_lpips, per_sample_l1, per_sample_lpips
from ..vae import check_vae_instance


@dataclass
class RegularizerOutput(BaseOutput):
    """
    What every regularizer's `forward` returns: `loss` carries gradients; every other field is a
    detached 0-dim float32 tensor for logging (a mean over the samples it concerns, 0 when none).
    Each method's output adds its own terms after these.

    Args:
        loss (`torch.Tensor`): the total loss, mean over the batch.
        rec_mae (`torch.Tensor`): pixel L1 of plain (full-resolution) reconstructions.
        rec_lpips (`torch.Tensor`): LPIPS of plain reconstructions (0 without LPIPS).
        kl (`torch.Tensor`): KL divergence of the posterior (summed over latent dims) of the samples it weighs.
    """

    # Defaults of None let the output be rebuilt from a mapping (BaseOutput's convention), which is
    # what Accelerate does when it casts a mixed-precision model's outputs back to float32.
    loss: torch.Tensor = None
    rec_mae: torch.Tensor = None
    rec_lpips: torch.Tensor = None
    kl: torch.Tensor = None

    def scalars(self) -> Dict[str, torch.Tensor]:
        """The logged components as a dict of 0-dim tensors (no host sync)."""
        return {k: v.detach() for k, v in self.items() if k != "reconstruction" and torch.is_tensor(v)}


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def host_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """`generator` if it is a CPU generator, else None (branch draws happen on the host, never on the device)."""
    if generator is not None and generator.device.type != "cpu":
        return None
    return generator


def stochastic_subset(
    batch_size: int, probability: float, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Splits `range(batch_size)` into a uniformly random subset and the rest, each sorted.

    The subset's size is `probability * batch_size` stochastically rounded (floor(pB + u), u ~ U(0, 1)),
    so each sample is chosen with probability exactly `probability`, while the count, known on the
    host, keeps tensor shapes static for a given count and needs no device sync. CPU generator only.
    """
    u = torch.rand((), generator=generator).item()
    count = min(batch_size, int(math.floor(probability * batch_size + u)))
    order = torch.randperm(batch_size, generator=generator)
    return order[:count].sort().values, order[count:].sort().values


def choose(options, generator: Optional[torch.Generator] = None):
    """One element of the non-empty sequence `options`, uniformly, drawn with a CPU generator."""
    return options[int(torch.randint(len(options), (), generator=generator))]


def downsampling_factor(vae: AutoencoderKL) -> int:
    """The VAE's spatial downsampling factor, 2 ** (number of down blocks - 1) (8 for the Flux VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class TargetEncoder(nn.Module):
    """An EMA copy of the VAE's encoder (and quant conv): returns the posterior mean `(B, latent_channels, h, w)`."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder)
        self.quant_conv = copy.deepcopy(vae.quant_conv) if vae.quant_conv is not None else None
        self.requires_grad_(False)
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(pixel_values)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments.chunk(2, dim=1)[0]


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


class LatentRegularizer(nn.Module):
    r"""
    Base class of every regularizer attached to a diffusers `AutoencoderKL` or `AutoencoderKLFlux2`.

    Every method works on the posterior latents of `vae.encode` and decodes with `vae.decode`: for
    `AutoencoderKLFlux2` those are the 32-channel latents before its pipeline's patchify-and-BatchNorm
    normalization, which neither call applies, so the BatchNorm's running statistics are never updated by
    training (docs/method.md).

    A subclass sets `name`, `config_class`, `subfolder` (the folder its state is saved to beside an
    exported VAE) and, when it has learnable or running state, `weights_name`; builds its own parts
    in `setup()`; and implements `draw_plan` and `forward`. The VAE is never modified beyond the
    `requires_grad` flags of frozen blocks, which `unload()` restores.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder to regularize.
        config (`RegularizerConfig`, *optional*): an instance of the subclass' `config_class`; defaults to its paper's setting.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[Type[RegularizerConfig]] = RegularizerConfig
    subfolder: ClassVar[str] = ""
    weights_name: ClassVar[Optional[str]] = None

    # Whether the spatial sizes of the step's passes change from step to step (EQ-VAE's random scales): cuDNN's
    # per-shape autotuning then costs more than it saves (`diffusers_ssreg.finetune.compile_modules`).
    sizes_vary_per_step = False

    def __init__(self, vae: AutoencoderKL, config: Optional[RegularizerConfig] = None):
        super().__init__()
        check_vae_instance(vae, "vae")
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(f"`config` must be an {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config
        self.vae = vae
        self.target_encoder: Optional[nn.Module] = None  # an EMA target, for the methods that use one
        self.setup()
        # LPIPS: not built at all when its weight is 0
        self.lpips = build_lpips(config.lpips_net, config.lpips_pretrained_backbone) if config.lambda_lpips > 0 else None
        self.validate_inputs = True
        # Passes whose spatial size changes from step to step run uncompiled (see `varying_shapes`).
        self.eager_varying_shapes = True
        self._requires_grad_before_freeze: Optional[Dict[str, bool]] = None
        self.freeze_blocks()

    def setup(self) -> None:
        """Builds the method's own parameters, buffers and modules (called by `__init__` before LPIPS and freezing)."""

    # ----------------------------------------------------------------------------------------
    # Parameters and training state
    # ----------------------------------------------------------------------------------------

    def freeze_blocks(self) -> None:
        """Freezes the first `freeze_encoder_blocks` encoder down blocks and the last `freeze_decoder_blocks` up blocks (A.5)."""
        down, up = self.vae.encoder.down_blocks, self.vae.decoder.up_blocks
        for name, count, blocks in (
            ("freeze_encoder_blocks", self.config.freeze_encoder_blocks, down),
            ("freeze_decoder_blocks", self.config.freeze_decoder_blocks, up),
        ):
            if count > len(blocks):
                raise ValueError(f"`{name}`={count} but the VAE has only {len(blocks)} such blocks.")
        if self._requires_grad_before_freeze is None:
            self._requires_grad_before_freeze = {n: p.requires_grad for n, p in self.vae.named_parameters()}
        frozen = list(down[: self.config.freeze_encoder_blocks])
        if self.config.freeze_decoder_blocks:
            frozen += list(up[-self.config.freeze_decoder_blocks :])
        for block in frozen:
            block.requires_grad_(False)

    def extra_parameter_groups(self, base_lr: float) -> List[dict]:
        """Optimizer groups of the method's own learnable parameters (none by default)."""
        return []

    def parameter_groups(self, base_lr: float, weight_decay: Optional[float] = None) -> List[dict]:
        """
        Optimizer parameter groups: the VAE's trainable weights at `base_lr` (group "vae"), then the
        method's own learnable parameters, if any. Frozen blocks, EMA targets and LPIPS are excluded.
        """
        if not base_lr > 0:
            raise ValueError(f"`base_lr` must be positive, got {base_lr!r}.")
        groups = [{"params": [p for p in self.vae.parameters() if p.requires_grad], "lr": base_lr, "name": "vae"}]
        groups += self.extra_parameter_groups(base_lr)
        if weight_decay is not None:
            groups[0]["weight_decay"] = weight_decay
        return groups

    @torch.no_grad()
    def update_ema(self) -> None:
        """Advances the method's EMA state after an optimizer step; nothing for methods without one."""

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target_encoder is not None:
            self.target_encoder.eval()
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def modules_to_compile(self) -> List[nn.Module]:
        """The modules that carry the step's FLOPs, for `torch.compile`: encoder, decoder, EMA target, LPIPS."""
        modules = [self.vae.encoder, self.vae.decoder, self.target_encoder, self.lpips]
        return [m for m in modules if m is not None]

    # ----------------------------------------------------------------------------------------
    # Pieces of the forward
    # ----------------------------------------------------------------------------------------

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raises a ValueError/TypeError for input that is not a `(B, C, H, W)` batch in [-1, 1] without NaN."""
        if not torch.is_tensor(pixel_values):
            raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if not pixel_values.is_floating_point():
            raise TypeError(f"`pixel_values` must be a floating-point tensor in [-1, 1], got dtype {pixel_values.dtype}.")
        channels = self.vae.config.in_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, {channels}, height, width), got {tuple(pixel_values.shape)}."
            )
        low, high, nan = torch.stack(
            [pixel_values.min().float(), pixel_values.max().float(), torch.isnan(pixel_values).any().float()]
        ).tolist()
        if nan:
            raise ValueError("`pixel_values` contains NaN.")
        if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
            raise ValueError(
                f"`pixel_values` must lie in [-1, 1] (diffusers' convention), got values in [{low:.4g}, {high:.4g}]."
            )

    def varying_shapes(self, varying: bool = True):
        """
        Context for a pass whose spatial size changes from step to step (a downscaled branch): it runs the VAE
        and LPIPS uncompiled even when `torch.compile` wrapped them, so their compiled graphs keep the one
        full-resolution shape. Compiling such passes would take one graph per size (24 for EQ-VAE's scales), or
        a dynamic-shape graph, which torch 2.14's Inductor fails to build for diffusers' VAE attention (measured
        on the CPU). `eager_varying_shapes = False` lets torch.compile see them.
        """
        stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        if not (varying and self.eager_varying_shapes and stance is not None):
            return contextlib.nullcontext()
        return stance("force_eager")

    def smallest_target_size(self, height: int, width: int) -> Tuple[int, int]:
        """The smallest images the method compares for `(height, width)` inputs (a downscaling method overrides it)."""
        return height, width

    def check_lpips_size(self, height: int, width: int, field_hint: str = "") -> None:
        """
        Raises a ValueError before any work when LPIPS could not measure the smallest images this method
        compares at `height` x `width` (each backbone needs a minimum size, `LPIPS_MIN_SIZE`).
        """
        if self.lpips is None:
            return
        net = self.config.lpips_net
        small_height, small_width = self.smallest_target_size(height, width)
        if min(small_height, small_width) < LPIPS_MIN_SIZE[net]:
            raise ValueError(
                f"LPIPS ('{net}') needs images of at least {LPIPS_MIN_SIZE[net]}x{LPIPS_MIN_SIZE[net]} pixels, but "
                f"{self.name} compares {small_height}x{small_width} images at the input size {height}x{width}"
                f"{field_hint}: train at a higher resolution{', change that field' if field_hint else ''}, "
                f"or set `lambda_lpips`=0."
            )

    def encode(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None):
        """The posterior `E(x)`, a sample z of it (gradients flow) and its KL per sample `(batch_size,)` in float32."""
        posterior = self.vae.encode(pixel_values).latent_dist
        z = posterior.sample(generator=generator)
        return posterior, z, posterior.kl().float()

    def pixel_terms(
        self, decoded: torch.Tensor, target: torch.Tensor, l1=None, lpips_distance=None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The plain reconstruction distance per sample: `(pixel, mae, lpips)`, each `(batch_size,)` float32,
        with pixel = λ_MAE·L1 + λ_LPIPS·LPIPS (LPIPS is 0 when its weight is 0). `l1` and `lpips_distance`
        default to `losses.per_sample_l1` and `losses.per_sample_lpips`.
        """
        l1, lpips_distance = l1 or per_sample_l1, lpips_distance or per_sample_lpips
        mae = l1(decoded, target)
        lp = lpips_distance(self.lpips, decoded, target) if self.lpips is not None else torch.zeros_like(mae)
        return self.config.lambda_mae * mae + self.config.lambda_lpips * lp, mae, lp

    def draw_plan(self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None):
        """Draws, on the host, which sample takes which branch of the method (and its transform)."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs):
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------
    # Saving, loading and removal
    # ----------------------------------------------------------------------------------------

    def config_to_save(self) -> RegularizerConfig:
        """The config written by `save_pretrained` (with anything resolved at attach time filled in)."""
        return self.config

    def regularizer_state_dict(self) -> Dict[str, torch.Tensor]:
        """The regularizer's own tensors (not the VAE's); empty for stateless methods."""
        return {}

    def state_metadata(self) -> Dict[str, str]:
        """String metadata stored in the state file beside the tensors: what they were trained for."""
        from .. import __version__

        return {"regularizer": self.name, "diffusers_ssreg_version": __version__}

    def save_pretrained(self, save_directory: str) -> None:
        """Writes the config (naming the method) and, for methods with state, `weights_name`; refuses a VAE folder."""
        vae_config = os.path.join(save_directory, "config.json")
        if os.path.isfile(vae_config):
            with open(vae_config) as f:
                class_name = json.load(f).get("_class_name")
            if class_name:
                raise ValueError(
                    f"`save_directory`={save_directory!r} holds a diffusers {class_name}: the regularizer's state "
                    f"never goes inside the VAE folder; use a subfolder such as '{self.subfolder}'."
                )
        os.makedirs(save_directory, exist_ok=True)
        self.config_to_save().save_pretrained(save_directory)
        if self.weights_name:
            save_file(
                self.regularizer_state_dict(), os.path.join(save_directory, self.weights_name), metadata=self.state_metadata()
            )

    def check_saved_config(self, saved: RegularizerConfig, directory: str) -> None:
        """Raises a ValueError when a saved config disagrees with this regularizer on what its state depends on."""

    def load_state(self, state: Dict[str, torch.Tensor], metadata: Dict[str, str], path: str) -> None:
        """Copies a loaded state file into this regularizer (methods with `weights_name`)."""
        raise NotImplementedError

    def load_regularizer_state(self, directory: str) -> None:
        """Loads a folder written by `save_pretrained` into this regularizer (its config must name the same method)."""
        config_path = os.path.join(directory, self.config_class.config_name)
        weights_path = os.path.join(directory, self.weights_name) if self.weights_name else None
        if weights_path is not None and not os.path.isfile(weights_path):
            raise FileNotFoundError(f"no {self.weights_name} in {directory!r}.")
        if os.path.isfile(config_path):
            self.check_saved_config(self.config_class.from_json_file(config_path), directory)
        elif weights_path is None:
            raise FileNotFoundError(
                f"no {self.config_class.config_name} in {directory!r}: not a saved {self.name!r} regularizer."
            )
        if weights_path is not None:
            with safe_open(weights_path, framework="pt") as f:
                metadata = f.metadata() or {}
            if metadata.get("regularizer", self.name) != self.name:
                raise ValueError(
                    f"{weights_path!r} holds the state of regularizer {metadata['regularizer']!r}, not {self.name!r}."
                )
            self.load_state(load_file(weights_path), metadata, weights_path)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        vae: AutoencoderKL,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[str] = None,
        token: Optional[str] = None,
        local_files_only: Optional[bool] = None,
    ) -> "LatentRegularizer":
        r"""
        Rebuilds a regularizer saved with `save_pretrained` and attaches it to `vae`.

        Args:
            pretrained_model_name_or_path (`str`): a folder, or a Hub repository id such as `"org/flux-vae-ssreg"`.
            vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the VAE to attach to.
            subfolder (`str`, *optional*): the folder inside it, e.g. `"ssreg"` beside an exported VAE.
            revision (`str`, *optional*): a branch, tag or commit of the Hub repository.
            cache_dir, token, local_files_only: passed to `huggingface_hub.hf_hub_download`.
        """
        hub = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        try:
            config_path = resolve_file(pretrained_model_name_or_path, cls.config_class.config_name, **hub)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} Not a saved {cls.__name__} folder.") from error
        directory = os.path.dirname(config_path)
        if cls.weights_name:  # fetched beside the config (the same snapshot folder for a Hub repository)
            directory = os.path.dirname(resolve_file(pretrained_model_name_or_path, cls.weights_name, **hub))
        regularizer = cls(vae, cls.config_class.from_json_file(config_path))
        regularizer.load_regularizer_state(directory)
        return regularizer

    def unload(self) -> AutoencoderKL:
        """
        Detaches the regularizer: restores the VAE's `requires_grad` flags and its stock diffusers blocks (after
        `diffusers_ssreg.speedups.apply_training_speedups`), and returns the very same VAE object.
        """
        from ..speedups import remove_training_speedups

        remove_training_speedups(self)
        if any(p.ndim == 4 and not p.is_contiguous() for p in self.vae.parameters()):
            self.vae.to(memory_format=torch.contiguous_format)  # channels-last weights of a faster step
        if self._requires_grad_before_freeze is not None:
            for name, param in self.vae.named_parameters():
                param.requires_grad_(self._requires_grad_before_freeze.get(name, param.requires_grad))
            self._requires_grad_before_freeze = None
        return self.vae

    def unwrap(self) -> AutoencoderKL:
        """The same as `unload()` (the name used before PEFT's was adopted)."""
        return self.unload()
