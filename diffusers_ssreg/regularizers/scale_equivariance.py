"""ScaleEquivarianceRegularizer: the scale-equivariance fine-tuning of Skorokhodov et al. (FT-SE).

"Improving the diffusability of autoencoders" (Skorokhodov, Girish, Hu, Menapace, Li, Abdal,
Tulyakov, Siarohin; ICML 2025, arXiv 2502.14831) finds too much high-frequency energy in the
latents of modern autoencoders and fine-tunes them with scale equivariance of the decoder: the
latent z = E(x) and the image x are both downsampled (bilinear, by 2 or 4), and the decoder must
reconstruct the downsampled image from the downsampled latent. Data flow of one `forward`:

    plan            a per-step factor f from `scale_factors`; each sample joins the SE term with `probability`
    z               = posterior sample of E(x)                                  (one encoder pass)
    loss_i          = λ_MAE |x - D(z)|_1 + λ_LPIPS LPIPS + w_KL KL               (every sample)
                      + λ_SE [λ_MAE |d_f(x) - D(d_f(z))|_1 + λ_LPIPS LPIPS]       (samples of the SE term)
    loss            = mean over the batch of loss_i

This implementation follows the paper's description, not its code (github.com/snap-research/diffusability
was not consulted): `lambda_se`, `probability` and `antialias` are assumptions, listed as such in
docs/method.md.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import RegularizerConfig, _check_bool, _check_number
from .base import LatentRegularizer, RegularizerOutput, choose, downsampling_factor, host_generator, stochastic_subset


@dataclass
class ScaleEquivarianceConfig(RegularizerConfig):
    """
    Configuration of a `ScaleEquivarianceRegularizer`. The downsampling factors and the bilinear
    filter follow the paper; the fields marked "assumed" are choices of this implementation
    (docs/method.md).
    """

    regularizer_name: ClassVar[str] = "scale_equivariance"
    config_name: ClassVar[str] = "scale_equivariance_config.json"

    scale_factors: Tuple[int, ...] = field(
        default=(2, 4), metadata={"help": "Downsampling factors of latent and image, one drawn uniformly per step."}
    )
    lambda_se: float = field(
        default=1.0, metadata={"help": "Weight of the downsampled reconstruction term (assumed: 1; not given in the sources)."}
    )
    probability: float = field(
        default=1.0, metadata={"help": "Probability that a sample gets the scale-equivariance term (assumed: every sample)."}
    )
    antialias: bool = field(
        default=False, metadata={"help": "Antialiased bilinear downsampling (assumed off: torch's plain bilinear)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scale_factors, list):
            self.scale_factors = tuple(self.scale_factors)
        if (
            not isinstance(self.scale_factors, tuple)
            or not self.scale_factors
            or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 2 for f in self.scale_factors)
        ):
            raise ValueError(f"`scale_factors` must be a non-empty tuple of ints >= 2, got {self.scale_factors!r}.")
        _check_number("lambda_se", self.lambda_se, low=0.0)
        _check_number("probability", self.probability, low=0.0, high=1.0)
        _check_bool("antialias", self.antialias)


@dataclass
class ScaleEquivariancePlan:
    """
    Which samples get the scale-equivariance term, and the step's downsampling factor.

    Args:
        regularized (`torch.LongTensor` of shape `(k,)`): batch indices of the samples with the SE term.
        factor (`int`): the downsampling factor of this step.
    """

    regularized: torch.Tensor
    factor: int


@dataclass
class ScaleEquivarianceOutput(RegularizerOutput):
    """
    Output of `ScaleEquivarianceRegularizer.forward`.

    Args:
        loss, rec_mae, rec_lpips, kl: see `RegularizerOutput` (every sample is reconstructed at full resolution).
        se_mae (`torch.Tensor`): pixel L1 between d_f(x) and D(d_f(z)) of the samples with the SE term.
        se_lpips (`torch.Tensor`): LPIPS of the same pairs.
        se_fraction (`torch.Tensor`): fraction of the batch with the SE term.
        se_factor (`torch.Tensor`): the step's downsampling factor.
        reconstruction (`torch.Tensor`, *optional*): the full-resolution decoded batch, with `return_reconstruction=True`.
    """

    se_mae: torch.Tensor = None
    se_lpips: torch.Tensor = None
    se_fraction: torch.Tensor = None
    se_factor: torch.Tensor = None
    reconstruction: Optional[torch.Tensor] = None


def downsample(x: torch.Tensor, factor: int, antialias: bool = False) -> torch.Tensor:
    """Bilinear downsampling `(B, C, H, W)` -> `(B, C, H // factor, W // factor)` (half-pixel centres, as `F.interpolate`)."""
    size = (x.shape[-2] // factor, x.shape[-1] // factor)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


class ScaleEquivarianceRegularizer(LatentRegularizer):
    r"""
    Scale-equivariance regularization (Skorokhodov et al., ICML 2025) attached to a diffusers `AutoencoderKL`.

    Stateless: it holds a reference to the VAE and LPIPS only.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder to regularize.
        config (`ScaleEquivarianceConfig`, *optional*): hyperparameters; defaults to the paper's factors.
    """

    name = "scale_equivariance"
    config_class = ScaleEquivarianceConfig
    subfolder = "scale_equivariance"

    def smallest_target_size(self, height: int, width: int):
        """The images downsampled by the largest factor."""
        factor = max(self.config.scale_factors)
        return height // factor, width // factor

    def draw_plan(
        self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None
    ) -> ScaleEquivariancePlan:
        """Draws the step's factor (uniformly from `scale_factors`) and the samples of the SE term, on the host."""
        generator = host_generator(generator)
        regularized, _ = stochastic_subset(batch_size, self.config.probability, generator)
        return ScaleEquivariancePlan(regularized, int(choose(self.config.scale_factors, generator)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_reconstruction: bool = False,
        plan: Optional[ScaleEquivariancePlan] = None,
    ) -> ScaleEquivarianceOutput:
        r"""
        Runs the VAE on a batch and returns the training loss with its components.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): images in [-1, 1].
            generator (`torch.Generator`, *optional*): drives the draws (when a CPU generator) and the posterior sample.
            return_reconstruction (`bool`, *optional*, defaults to `False`): also return the full-resolution decoded batch.
            plan (`ScaleEquivariancePlan`, *optional*): the factor and the samples of the SE term; drawn when not given.
        """
        if self.validate_inputs:
            self.check_pixel_values(pixel_values)
        cfg = self.config
        batch, _, height, width = pixel_values.shape
        device = pixel_values.device
        if plan is None:
            plan = self.draw_plan(batch, height, width, generator)
        factor, count = plan.factor, int(plan.regularized.numel())
        ratio = downsampling_factor(self.vae)
        latent_height, latent_width = height // ratio, width // ratio
        if latent_height % factor or latent_width % factor:
            raise ValueError(
                f"the downsampling factor {factor} (of `scale_factors`) does not divide the latent size "
                f"{latent_height}x{latent_width} of {height}x{width} images: use factors that divide it."
            )

        self.check_lpips_size(height, width, f" (the largest of `scale_factors`, {max(cfg.scale_factors)})")

        _, z, kl = self.encode(pixel_values, generator)
        decoded = self.vae.decode(z).sample
        pixel, mae, lp = self.pixel_terms(decoded, pixel_values)
        total = (pixel + cfg.kl_weight * kl).sum()

        se_mae = se_lp = mae.new_zeros(0)
        if count:
            if count == batch:  # (the default: every sample; no gather)
                z_se, x_se = z, pixel_values
            else:
                index = plan.regularized.to(device, non_blocking=True)
                z_se, x_se = z.index_select(0, index), pixel_values.index_select(0, index)
            with torch.no_grad():
                target = downsample(x_se, factor, cfg.antialias)  # d_f(x)
            with self.varying_shapes():  # a second, smaller size: kept out of the compiled graphs
                decoded_se = self.vae.decode(downsample(z_se, factor, cfg.antialias)).sample  # D(d_f(z))
                se_pixel, se_mae, se_lp = self.pixel_terms(decoded_se, target)
            total = total + cfg.lambda_se * se_pixel.sum()
        loss = total / batch

        n_se = max(count, 1)
        return ScaleEquivarianceOutput(
            loss=loss,
            rec_mae=mae.mean().detach(),
            rec_lpips=lp.mean().detach(),
            kl=kl.mean().detach(),
            se_mae=(se_mae.sum() / n_se).detach(),
            se_lpips=(se_lp.sum() / n_se).detach(),
            se_fraction=torch.tensor(count / batch, device=device),
            se_factor=torch.tensor(float(factor), device=device),
            reconstruction=decoded if return_reconstruction else None,
        )
