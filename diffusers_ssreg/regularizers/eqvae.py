"""EQVAERegularizer: equivariance regularization of the latent space (EQ-VAE, Kouzelis et al. 2025).

"EQ-VAE: Equivariance Regularized Latent Space for Improved Generative Image Modeling" (Kouzelis,
Kakogeorgiou, Gidaris, Komodakis; arXiv 2502.09509) fine-tunes an autoencoder so that decoding a
spatially transformed latent gives the same transform of the image: D(τ∘E(x)) ≈ τ∘x, with τ a
downscaling by s and a rotation by a multiple of 90°, and keeps "prior preservation" samples
reconstructed plainly, some of them at a lower resolution. The authors' training code
(github.com/zelaki/eqvae, `train_eqvae/ldm/models/autoencoder.py`, `training_step`) fixes the details
followed here. Data flow of one `forward`:

    plan            per step: a scale s from `scales`, a rotation k quarter turns from `quarter_turns`;
                    per sample: equivariance branch with `equivariance_probability`; of the others,
                    low resolution with `low_resolution_probability`; the rest plain
    z               = posterior sample of E([x_eq, x_plain])                 (one full-resolution encoder pass)
    z_low           = posterior sample of E(resize(x_low, s))                (low-resolution prior preservation)
    decoder input   rot_k(resize(z_eq, s)) and z_low (one pass when their shapes agree); z_plain
    target          rot_k(resize(x_eq, s)), resize(x_low, s), x_plain
    loss_i          = λ_MAE |target - D(input)|_1 + λ_LPIPS LPIPS + w_KL KL(posterior of the sample)
    loss            = mean over the batch of loss_i

The draws are made on the host: shapes depend only on (s, k) and the branch counts. The scaled
branches change size with s (24 sizes), so they run uncompiled (`LatentRegularizer.varying_shapes`):
compiled encoder, decoder and LPIPS keep their full-resolution graphs.
"""

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import RegularizerConfig, _check_bool, _check_number
from .base import LatentRegularizer, RegularizerOutput, choose, downsampling_factor, host_generator, stochastic_subset


# The authors' code draws s uniformly from {8/32, 9/32, ..., 31/32}, i.e. [0.25, 1) in steps of 1/32.
EQVAE_SCALES = tuple(k / 32 for k in range(8, 32))


@dataclass
class EQVAEConfig(RegularizerConfig):
    """
    Configuration of an `EQVAERegularizer`. Defaults are the EQ-VAE setting of the authors' code
    (`train_eqvae/configs/eqvae_config.yaml` and `autoencoder.py`); the reconstruction loss and the
    frozen blocks are the fields shared by every regularizer (docs/method.md).
    """

    regularizer_name: ClassVar[str] = "eqvae"
    config_name: ClassVar[str] = "eqvae_config.json"

    equivariance_probability: float = field(
        default=0.5, metadata={"help": "Probability that a sample takes the equivariance branch (the code's p_prior)."}
    )
    low_resolution_probability: float = field(
        default=0.25,
        metadata={"help": "Probability that a sample outside that branch is reconstructed at a lower resolution (p_prior_s)."},
    )
    scales: Tuple[float, ...] = field(
        default=EQVAE_SCALES, metadata={"help": "Downscaling factors s in (0, 1], one drawn uniformly per step (8/32 ... 31/32)."}
    )
    quarter_turns: Tuple[int, ...] = field(
        default=(1, 2, 3), metadata={"help": "Rotations in multiples of 90° (0-3), one drawn uniformly per step."}
    )
    antialias: bool = field(
        default=False, metadata={"help": "Antialiased bilinear resizing (the authors' code: off)."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("scales", "quarter_turns"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        _check_number("equivariance_probability", self.equivariance_probability, low=0.0, high=1.0)
        _check_number("low_resolution_probability", self.low_resolution_probability, low=0.0, high=1.0)
        if (
            not isinstance(self.scales, tuple)
            or not self.scales
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 1 for s in self.scales)
        ):
            raise ValueError(f"`scales` must be a non-empty tuple of numbers in (0, 1], got {self.scales!r}.")
        if (
            not isinstance(self.quarter_turns, tuple)
            or not self.quarter_turns
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= 3 for k in self.quarter_turns)
        ):
            raise ValueError(f"`quarter_turns` must be a non-empty tuple of ints in 0-3, got {self.quarter_turns!r}.")
        _check_bool("antialias", self.antialias)


@dataclass
class EQVAEPlan:
    """
    The branch of every sample of a batch, and the step's transform.

    Args:
        equivariant (`torch.LongTensor`): batch indices of the equivariance branch.
        low_resolution (`torch.LongTensor`): batch indices reconstructed at the lower resolution.
        plain (`torch.LongTensor`): batch indices reconstructed at full resolution.
        scale (`float`): the downscaling factor s of this step.
        quarter_turns (`int`): the rotation of this step, in multiples of 90°.
    """

    equivariant: torch.Tensor
    low_resolution: torch.Tensor
    plain: torch.Tensor
    scale: float
    quarter_turns: int


@dataclass
class EQVAEOutput(RegularizerOutput):
    """
    Output of `EQVAERegularizer.forward`.

    Args:
        loss, rec_mae, rec_lpips: see `RegularizerOutput` (rec_* over the full-resolution plain samples).
        kl (`torch.Tensor`): KL of the posterior, mean over every sample (each branch weighs its own posterior's KL).
        eq_mae (`torch.Tensor`): pixel L1 between τ∘x and D(τ∘z) of the equivariance branch.
        eq_lpips (`torch.Tensor`): LPIPS of the same pairs.
        low_res_mae (`torch.Tensor`): pixel L1 of the low-resolution reconstructions.
        low_res_lpips (`torch.Tensor`): LPIPS of the low-resolution reconstructions.
        eq_fraction (`torch.Tensor`): fraction of the batch in the equivariance branch.
        low_res_fraction (`torch.Tensor`): fraction of the batch reconstructed at the lower resolution.
        scale (`torch.Tensor`): the step's downscaling factor s.
        quarter_turns (`torch.Tensor`): the step's rotation in multiples of 90°.
        reconstruction (`list` of `torch.Tensor`, *optional*): with `return_reconstruction=True`, the decoder's
            output for each sample in the input's order, `(3, h_i, w_i)` (sizes differ between branches).
    """

    eq_mae: torch.Tensor = None
    eq_lpips: torch.Tensor = None
    low_res_mae: torch.Tensor = None
    low_res_lpips: torch.Tensor = None
    eq_fraction: torch.Tensor = None
    low_res_fraction: torch.Tensor = None
    scale: torch.Tensor = None
    quarter_turns: torch.Tensor = None
    reconstruction: Optional[List[torch.Tensor]] = None


def scaled_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """`(round(height * scale), round(width * scale))`, at least 1 each: the latent size of the scaled branch."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize(x: torch.Tensor, size: Tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resizing to `size` with half-pixel centres (`F.interpolate`, `align_corners=False`), as the authors' code."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def rotate(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """
    Rotation by `quarter_turns` × 90° of the last two axes (`torch.rot90(x, k, dims=(-1, -2))`, as the authors' code),
    returned dense in the input's memory format: a transposed stride order would reach the compiled decoder, whose
    dynamic-shape graph cannot order symbolic strides.
    """
    if not quarter_turns % 4:
        return x
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.rot90(x, quarter_turns, dims=(-1, -2)).contiguous(memory_format=layout)


def equivariance_transform(x: torch.Tensor, size: Tuple[int, int], quarter_turns: int, antialias: bool = False) -> torch.Tensor:
    """τ∘x: resize to `size`, then rotate; applied alike to latents and to images (at their own sizes)."""
    return rotate(resize(x, size, antialias), quarter_turns)


class EQVAERegularizer(LatentRegularizer):
    r"""
    EQ-VAE (Kouzelis et al. 2025) attached to a diffusers `AutoencoderKL`.

    Stateless: it holds a reference to the VAE and LPIPS only.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder to regularize.
        config (`EQVAEConfig`, *optional*): hyperparameters; defaults to the authors' setting.
    """

    name = "eqvae"
    config_class = EQVAEConfig
    subfolder = "eqvae"

    sizes_vary_per_step = True  # one of 24 latent sizes per step

    def smallest_target_size(self, height: int, width: int) -> Tuple[int, int]:
        """The images of the branches at the smallest of `scales`."""
        ratio = downsampling_factor(self.vae)
        latent = scaled_size(height // ratio, width // ratio, min(self.config.scales))
        return latent[0] * ratio, latent[1] * ratio

    def draw_plan(self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> EQVAEPlan:
        """Draws each sample's branch and the step's (s, k) on the host (a CPU generator, else the global CPU RNG)."""
        cfg = self.config
        generator = host_generator(generator)
        equivariant, rest = stochastic_subset(batch_size, cfg.equivariance_probability, generator)
        low, plain = stochastic_subset(rest.numel(), cfg.low_resolution_probability, generator)
        scale = float(choose(cfg.scales, generator))
        turns = int(choose(cfg.quarter_turns, generator))
        return EQVAEPlan(equivariant, rest[low], rest[plain], scale, turns)

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_reconstruction: bool = False,
        plan: Optional[EQVAEPlan] = None,
    ) -> EQVAEOutput:
        r"""
        Runs the VAE on a batch and returns the training loss with its components.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): images in [-1, 1].
            generator (`torch.Generator`, *optional*): drives the draws (when a CPU generator) and the posterior samples.
            return_reconstruction (`bool`, *optional*, defaults to `False`): also return every sample's decoded output.
            plan (`EQVAEPlan`, *optional*): the branches and the transform; drawn with `draw_plan` when not given.
        """
        if self.validate_inputs:
            self.check_pixel_values(pixel_values)
        cfg = self.config
        batch, _, height, width = pixel_values.shape
        device = pixel_values.device
        if plan is None:
            plan = self.draw_plan(batch, height, width, generator)
        n_eq, n_low, n_plain = (int(i.numel()) for i in (plan.equivariant, plan.low_resolution, plan.plain))
        if n_eq + n_low + n_plain != batch:
            raise ValueError(f"`plan` covers {n_eq + n_low + n_plain} samples but the batch has {batch}.")
        self.check_lpips_size(height, width, f" (the smallest of `scales`, {min(cfg.scales)})")
        ratio = downsampling_factor(self.vae)
        latent_size = scaled_size(height // ratio, width // ratio, plan.scale)
        image_size = (latent_size[0] * ratio, latent_size[1] * ratio)
        equivariant, low, plain = (i.to(device, non_blocking=True) for i in (plan.equivariant, plan.low_resolution, plan.plain))

        decoder_inputs, targets, kls = [], [], []  # per branch, in the order equivariance, low resolution, plain
        if n_eq + n_plain:  # one full-resolution encoder pass serves the equivariance and plain branches
            _, z, kl = self.encode(pixel_values.index_select(0, torch.cat([equivariant, plain])), generator)
            z_eq, z_plain, kl_eq, kl_plain = z[:n_eq], z[n_eq:], kl[:n_eq], kl[n_eq:]
        if n_eq:
            decoder_inputs.append(equivariance_transform(z_eq, latent_size, plan.quarter_turns, cfg.antialias))
            with torch.no_grad():
                x_eq = pixel_values.index_select(0, equivariant)
                targets.append(equivariance_transform(x_eq, image_size, plan.quarter_turns, cfg.antialias))
            kls.append(kl_eq)
        if n_low:  # prior preservation at a lower resolution: the downscaled image, encoded and reconstructed
            with torch.no_grad():
                x_low = resize(pixel_values.index_select(0, low), image_size, cfg.antialias)
            with self.varying_shapes(image_size != (height, width)):
                _, z_low, kl_low = self.encode(x_low, generator)
            decoder_inputs.append(z_low)
            targets.append(x_low)
            kls.append(kl_low)
        if n_plain:
            decoder_inputs.append(z_plain)
            targets.append(pixel_values.index_select(0, plain))
            kls.append(kl_plain)

        # Decoder passes: inputs of one shape go through together (for square images the two scaled branches do).
        decoded = []
        start = 0
        while start < len(decoder_inputs):
            stop = start + 1
            while stop < len(decoder_inputs) and decoder_inputs[stop].shape[2:] == decoder_inputs[start].shape[2:]:
                stop += 1
            group = decoder_inputs[start:stop]
            with self.varying_shapes(tuple(group[0].shape[2:]) != (height // ratio, width // ratio)):
                out = self.vae.decode(torch.cat(group) if len(group) > 1 else group[0]).sample
            decoded += list(out.split([g.shape[0] for g in group]))
            start = stop

        terms = []
        for d, t in zip(decoded, targets):
            with self.varying_shapes(tuple(d.shape[2:]) != (height, width)):
                terms.append(self.pixel_terms(d, t))
        total = sum((pixel + cfg.kl_weight * kl).sum() for (pixel, _, _), kl in zip(terms, kls))
        loss = total / batch

        by_branch = dict(zip([name for name, n in (("eq", n_eq), ("low", n_low), ("plain", n_plain)) if n], terms))
        zero = pixel_values.new_zeros((), dtype=torch.float32)

        def branch_mean(name, which):
            return (by_branch[name][which].sum() / by_branch[name][which].numel()).detach() if name in by_branch else zero

        reconstruction = None
        if return_reconstruction:
            order = torch.cat([plan.equivariant, plan.low_resolution, plan.plain]).tolist()
            samples = [s for d in decoded for s in d.unbind(0)]
            reconstruction = [None] * batch
            for position, sample in zip(order, samples):
                reconstruction[position] = sample
        return EQVAEOutput(
            loss=loss,
            rec_mae=branch_mean("plain", 1),
            rec_lpips=branch_mean("plain", 2),
            kl=(sum(k.sum() for k in kls) / batch).detach(),
            eq_mae=branch_mean("eq", 1),
            eq_lpips=branch_mean("eq", 2),
            low_res_mae=branch_mean("low", 1),
            low_res_lpips=branch_mean("low", 2),
            eq_fraction=torch.tensor(n_eq / batch, device=device),
            low_res_fraction=torch.tensor(n_low / batch, device=device),
            scale=torch.tensor(plan.scale, device=device),
            quarter_turns=torch.tensor(float(plan.quarter_turns), device=device),
            reconstruction=reconstruction,
        )
