"""PlainFinetune: no latent regularization, the baseline of every comparison (`--regularizer none`).

Each sample's loss is the shared plain reconstruction loss λ_MAE·|x - D(z)|_1 + λ_LPIPS·LPIPS + w_KL·KL
with z a posterior sample of E(x), with the same frozen blocks as every other method (A.5). It is
the loss of `StateSpaceRegularizer` with `alpha=0`, without building A, Δ or the EMA target encoder.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..config import RegularizerConfig
from .base import LatentRegularizer, RegularizerOutput


@dataclass
class PlainFinetuneConfig(RegularizerConfig):
    """Configuration of `PlainFinetune`: only the fields every regularizer shares (the paper's Flux setting)."""

    regularizer_name: ClassVar[str] = "none"
    config_name: ClassVar[str] = "plain_config.json"


@dataclass
class PlainFinetuneOutput(RegularizerOutput):
    """
    Output of `PlainFinetune.forward` (every sample is a plain reconstruction).

    Args:
        loss, rec_mae, rec_lpips, kl: see `RegularizerOutput`.
        reconstruction (`torch.Tensor`, *optional*): the decoded batch, with `return_reconstruction=True`.
    """

    reconstruction: Optional[torch.Tensor] = None


class PlainFinetune(LatentRegularizer):
    r"""
    Plain reconstruction fine-tuning of a diffusers `AutoencoderKL` through the same protocol as the regularizers.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder to fine-tune.
        config (`PlainFinetuneConfig`, *optional*): loss weights and frozen blocks; defaults to the paper's Flux setting.
    """

    name = "none"
    config_class = PlainFinetuneConfig
    subfolder = "plain"

    def draw_plan(self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None) -> None:
        """Nothing to draw: every sample takes the same branch."""
        return None

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_reconstruction: bool = False,
        plan: None = None,
    ) -> PlainFinetuneOutput:
        r"""
        Runs the VAE on a batch and returns the reconstruction loss with its components.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): images in [-1, 1].
            generator (`torch.Generator`, *optional*): drives the posterior sample.
            return_reconstruction (`bool`, *optional*, defaults to `False`): also return the decoded batch.
            plan: unused (every regularizer's `forward` takes one).
        """
        if self.validate_inputs:
            self.check_pixel_values(pixel_values)
        batch, _, height, width = pixel_values.shape
        self.check_lpips_size(height, width)
        _, z, kl = self.encode(pixel_values, generator)
        decoded = self.vae.decode(z).sample
        pixel, mae, lp = self.pixel_terms(decoded, pixel_values)
        loss = (pixel + self.config.kl_weight * kl).sum() / batch
        return PlainFinetuneOutput(
            loss=loss,
            rec_mae=mae.mean().detach(),
            rec_lpips=lp.mean().detach(),
            kl=kl.mean().detach(),
            reconstruction=decoded if return_reconstruction else None,
        )
