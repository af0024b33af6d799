"""SpectrumMatchingRegularizer: Encoding and Decoding Spectrum Matching (ESM, DSM) of an autoencoder's latents.

"Spectrum Matching: a Unified Perspective for Superior Diffusability in Latent Diffusion"
(arXiv 2603.14645; code: github.com/forever208/SpectrumMatching) matches the frequency content of
the latents to that of images:

- **ESM** (branch `SDVAE_and_ESM`, `utils_DCT.py: latent_spectral_reg_dct`): the radially binned,
  channel-averaged 2D DCT power spectrum of the latent z is pushed, as a distribution over bands,
  towards the spectrum of the image downsampled to the latent's size, flattened by f^δ:
  loss = KL(p_x || p_z) with p = normalize(log(1 + band power)), the target's band power times
  (band index)^δ.
- **DSM** (branch `DSM`, `modules/vae.py: VAE.forward`): per step a mask level k; the k highest
  anti-diagonals of every 8x8 block DCT are zeroed in both z and x, and the decoder reconstructs the
  low-passed image from the low-passed latent.

Data flow of one `forward`:

    plan            per sample, a DSM mask level drawn uniformly from `dsm_mask_levels` (0: no mask)
    z               = posterior sample of E(x)                                   (one encoder pass)
    esm_i           = KL(p_x || p_z) of sample i                                  (gradients reach the encoder)
    loss_i          = λ_MAE |M_k(x) - D(M_k(z))|_1 + λ_LPIPS LPIPS + w_KL KL + esm_weight · esm_i
    loss            = mean over the batch of loss_i

Everything is static-shaped: masks are multiplications, spectra small matrix products.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import RegularizerConfig, _check_int, _check_number
from .base import LatentRegularizer, RegularizerOutput, downsampling_factor, host_generator


PRE_BLUR_MODES = ("auto", "always", "never")
# The reference code's epsilon of every clamp, log and normalization of the spectra.
SPECTRUM_EPS = 1e-8


@dataclass
class SpectrumMatchingConfig(RegularizerConfig):
    """
    Configuration of a `SpectrumMatchingRegularizer`. Defaults are ESM-AE as the authors' README sets it
    (`esm_weight=0.01`, `delta=1.0`) with the constants of their `utils_DCT.py`; DSM-AE is
    `esm_weight=0, dsm_mask_levels=(0, 8, 10, 12)`. The reconstruction loss and the frozen blocks are the
    fields shared by every regularizer (docs/method.md).
    """

    regularizer_name: ClassVar[str] = "spectrum_matching"
    config_name: ClassVar[str] = "spectrum_matching_config.json"

    esm_weight: float = field(default=0.01, metadata={"help": "Weight of the ESM spectrum loss KL(p_x || p_z); 0: no ESM."})
    delta: float = field(default=1.0, metadata={"help": "Flattening of the target: band power times (band index)^delta."})
    num_bins: int = field(default=16, metadata={"help": "Number of radial frequency bands of the spectra."})
    pre_blur: str = field(
        default="auto",
        metadata={"help": f"Blur the image before downsampling it: one of {PRE_BLUR_MODES}; auto: unless the VAE's factor is 8."},
    )
    pre_blur_kernel_size: int = field(default=7, metadata={"help": "Kernel size (odd) of that blur."})
    pre_blur_sigma: float = field(default=1.2, metadata={"help": "Standard deviation (pixels) of that blur."})
    dsm_mask_levels: Tuple[int, ...] = field(
        default=(),
        metadata={"help": "DSM mask levels k, one drawn per sample (k highest block-DCT anti-diagonals zeroed); empty: no DSM."},
    )
    dsm_block_size: int = field(default=8, metadata={"help": "DSM: block size of the block DCT."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.dsm_mask_levels, list):
            self.dsm_mask_levels = tuple(self.dsm_mask_levels)
        _check_number("esm_weight", self.esm_weight, low=0.0)
        _check_number("delta", self.delta)
        if not math.isfinite(self.delta):
            raise ValueError(f"`delta` must be finite, got {self.delta!r}.")
        _check_int("num_bins", self.num_bins, low=1)
        if self.pre_blur not in PRE_BLUR_MODES:
            raise ValueError(f"`pre_blur` must be one of {PRE_BLUR_MODES}, got {self.pre_blur!r}.")
        _check_int("pre_blur_kernel_size", self.pre_blur_kernel_size, low=1)
        if self.pre_blur_kernel_size % 2 == 0:
            raise ValueError(f"`pre_blur_kernel_size` must be odd, got {self.pre_blur_kernel_size!r}.")
        _check_number("pre_blur_sigma", self.pre_blur_sigma, low=0.0, low_open=True)
        _check_int("dsm_block_size", self.dsm_block_size, low=2)
        top = 2 * self.dsm_block_size - 2
        if not isinstance(self.dsm_mask_levels, tuple) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= top for k in self.dsm_mask_levels
        ):
            raise ValueError(
                f"`dsm_mask_levels` must be a tuple of ints in [0, {top}] (2 * dsm_block_size - 2), got {self.dsm_mask_levels!r}."
            )


@dataclass
class SpectrumMatchingOutput(RegularizerOutput):
    """
    Output of `SpectrumMatchingRegularizer.forward`.

    Args:
        loss, kl: see `RegularizerOutput` (KL over every sample).
        rec_mae, rec_lpips: pixel L1 / LPIPS of the unmasked samples (all of them without DSM).
        esm (`torch.Tensor`): the ESM loss KL(p_x || p_z), mean over the batch.
        dsm_mae (`torch.Tensor`): pixel L1 between M_k(x) and D(M_k(z)) of the masked samples.
        dsm_lpips (`torch.Tensor`): LPIPS of the same pairs.
        dsm_fraction (`torch.Tensor`): fraction of the batch with a mask (k > 0).
        reconstruction (`torch.Tensor`, *optional*): the decoded batch, with `return_reconstruction=True`.
    """

    esm: torch.Tensor = None
    dsm_mae: torch.Tensor = None
    dsm_lpips: torch.Tensor = None
    dsm_fraction: torch.Tensor = None
    reconstruction: Optional[torch.Tensor] = None


@dataclass
class SpectrumMatchingPlan:
    """
    Args:
        mask_levels (`torch.LongTensor` of shape `(batch_size,)`): each sample's DSM mask level (0: none).
    """

    mask_levels: torch.Tensor


# --------------------------------------------------------------------------------------------
# Spectra (written by hand: a DCT-II as a matrix product keeps shapes static and needs no FFT package)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def dct_matrix(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix `(size, size)`: row k is sqrt(2/N) c_k cos(π (2i + 1) k / 2N), c_0 = 1/√2 (cached)."""
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd
        n = torch.arange(size, dtype=torch.float64)
        matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size)) * math.sqrt(2.0 / size)
        matrix[0] /= math.sqrt(2.0)
        return matrix.to(device=device, dtype=dtype)


def dct_2d(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D DCT-II of the last two axes `(..., H, W)`: entry (u, v) is vertical frequency u, horizontal v."""
    rows = dct_matrix(x.shape[-2], x.device, x.dtype)
    cols = dct_matrix(x.shape[-1], x.device, x.dtype)
    return rows @ x @ cols.T


def radial_bins(height: int, width: int, num_bins: int) -> torch.Tensor:
    """Band of each DCT frequency (u, v): floor(r / r_max · num_bins) with r = sqrt(u² + v²), clamped; `(height, width)` long."""
    u = torch.arange(height, dtype=torch.float32)[:, None]
    v = torch.arange(width, dtype=torch.float32)[None, :]
    radius = torch.sqrt(u**2 + v**2)
    bins = torch.floor(radius / radius.max().clamp_min(1.0) * num_bins).long()
    return bins.clamp(0, num_bins - 1)


@functools.lru_cache(maxsize=32)
def _band_averaging(height: int, width: int, num_bins: int, device=None) -> torch.Tensor:
    """`(height * width, num_bins)`: averages each band (its count includes DC) and drops the DC term (cached)."""
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd
        bins = radial_bins(height, width, num_bins).flatten()
        counts = torch.bincount(bins, minlength=num_bins).float().clamp_min(1.0)
        averaging = F.one_hot(bins, num_bins).float() / (counts + SPECTRUM_EPS)
        averaging[0] = 0.0  # the DC coefficient (u, v) = (0, 0) carries no power (set to 0 by the reference code)
        return averaging.to(device)


def band_power(x: torch.Tensor, num_bins: int) -> torch.Tensor:
    """
    Mean DCT power per radial band `(batch_size, num_bins)` of `x` `(batch_size, channels, h, w)`:
    the channel mean of the squared DCT coefficients (at least eps), DC set to 0, averaged over each band.
    """
    batch, _, height, width = x.shape
    power = dct_2d(x.float()).pow(2).mean(dim=1).clamp_min(SPECTRUM_EPS)  # (B, h, w)
    return power.reshape(batch, -1) @ _band_averaging(height, width, num_bins, x.device)


def band_distribution(power: torch.Tensor) -> torch.Tensor:
    """A band spectrum as a distribution over bands: log(1 + power), normalized to sum 1 (scale-free)."""
    logged = torch.log(power + SPECTRUM_EPS + 1.0).clamp_min(0.0)
    return logged / (logged.sum(dim=1, keepdim=True) + SPECTRUM_EPS)


def gaussian_blur_2d(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Depthwise 2D Gaussian blur with zero padding, the anti-aliasing blur of the reference code."""
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, kernel_size, kernel_size)
    return F.conv2d(x, kernel, padding=kernel_size // 2, groups=x.shape[1])


def spectrum_target_image(
    pixel_values: torch.Tensor, latent_size: Tuple[int, int], blur: bool, kernel_size: int = 7, sigma: float = 1.2
) -> torch.Tensor:
    """The image brought to the latent's size: optionally blurred, then bicubic (`align_corners=False`), in float32."""
    x = pixel_values.float()
    if blur:
        x = gaussian_blur_2d(x, kernel_size, sigma)
    return F.interpolate(x, size=latent_size, mode="bicubic", align_corners=False)


def esm_loss(
    pixel_values: torch.Tensor,
    latents: torch.Tensor,
    num_bins: int = 16,
    delta: float = 1.0,
    blur: bool = False,
    kernel_size: int = 7,
    sigma: float = 1.2,
) -> torch.Tensor:
    r"""
    The ESM loss per sample `(batch_size,)`: KL(p_x || p_z) between band distributions, where p_z is the
    latent's and p_x the downsampled image's with its band power times (band index + 1)^delta.

    Args:
        pixel_values (`torch.Tensor` of shape `(batch_size, 3, H, W)`): the images in [-1, 1] (no gradient needed).
        latents (`torch.Tensor` of shape `(batch_size, latent_channels, h, w)`): the latents (gradients flow).
    """
    with torch.autocast(latents.device.type, enabled=False):  # spectra in float32 even under mixed precision
        with torch.no_grad():
            image = spectrum_target_image(pixel_values, tuple(latents.shape[-2:]), blur, kernel_size, sigma)
            band = torch.arange(1, num_bins + 1, device=latents.device, dtype=torch.float32)
            p_x = band_distribution(band_power(image, num_bins) * band**delta)
        p_z = band_distribution(band_power(latents.float(), num_bins))
        return (p_x * (torch.log(p_x + SPECTRUM_EPS) - torch.log(p_z + SPECTRUM_EPS))).sum(dim=1)


def block_dct_lowpass(x: torch.Tensor, mask_levels: torch.Tensor, block_size: int = 8) -> torch.Tensor:
    """
    DSM's shared spectral mask: in every `block_size`² block's DCT, zero the `k` highest anti-diagonals
    (coefficients (u, v) with u + v >= 2·block_size - 1 - k), k = `mask_levels[i]` per sample; k = 0 returns
    the sample unchanged. `x` is `(batch_size, channels, H, W)` with H, W multiples of `block_size`.
    """
    batch, channels, height, width = x.shape
    with torch.autocast(x.device.type, enabled=False):
        basis = dct_matrix(block_size, x.device, torch.float32)
        blocks = x.float().reshape(batch, channels, height // block_size, block_size, width // block_size, block_size)
        coefficients = torch.einsum("ui,bcpiqj,vj->bcpuqv", basis, blocks, basis)
        index = torch.arange(block_size, device=x.device)
        diagonal = index[:, None] + index[None, :]
        levels = mask_levels.to(x.device)
        keep = (diagonal[None] < (2 * block_size - 1 - levels)[:, None, None]).float()  # (B, b, b)
        coefficients = coefficients * keep[:, None, None, :, None, :]
        low = torch.einsum("ui,bcpuqv,vj->bcpiqj", basis, coefficients, basis).reshape(batch, channels, height, width)
    return torch.where((levels == 0).view(batch, 1, 1, 1), x, low.to(x.dtype))


# --------------------------------------------------------------------------------------------
# The regularizer
# --------------------------------------------------------------------------------------------


class SpectrumMatchingRegularizer(LatentRegularizer):
    r"""
    Spectrum Matching (ESM and DSM) attached to a diffusers `AutoencoderKL`.

    Stateless: it holds a reference to the VAE and LPIPS only.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder to regularize.
        config (`SpectrumMatchingConfig`, *optional*): hyperparameters; defaults to ESM-AE.
    """

    name = "spectrum_matching"
    config_class = SpectrumMatchingConfig
    subfolder = "spectrum_matching"

    def pre_blur(self) -> bool:
        """Whether the image is blurred before it is downsampled to the latent's size (`pre_blur`; auto: unless factor 8)."""
        if self.config.pre_blur == "auto":  # the reference code: blur unless the 256-px latent is 32 px high
            return downsampling_factor(self.vae) != 8
        return self.config.pre_blur == "always"

    def draw_plan(
        self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None
    ) -> SpectrumMatchingPlan:
        """Draws each sample's DSM mask level uniformly from `dsm_mask_levels` on the host (all 0 without DSM)."""
        levels = self.config.dsm_mask_levels
        if not levels:
            return SpectrumMatchingPlan(torch.zeros(batch_size, dtype=torch.long))
        choice = torch.randint(len(levels), (batch_size,), generator=host_generator(generator))
        return SpectrumMatchingPlan(torch.tensor(levels, dtype=torch.long)[choice])

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_reconstruction: bool = False,
        plan: Optional[SpectrumMatchingPlan] = None,
    ) -> SpectrumMatchingOutput:
        r"""
        Runs the VAE on a batch and returns the training loss with its components.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): images in [-1, 1].
            generator (`torch.Generator`, *optional*): drives the mask draw (when a CPU generator) and the posterior sample.
            return_reconstruction (`bool`, *optional*, defaults to `False`): also return the decoded batch.
            plan (`SpectrumMatchingPlan`, *optional*): each sample's DSM mask level; drawn when not given.
        """
        if self.validate_inputs:
            self.check_pixel_values(pixel_values)
        cfg = self.config
        batch, _, height, width = pixel_values.shape
        device = pixel_values.device
        if plan is None:
            plan = self.draw_plan(batch, height, width, generator)
        self.check_lpips_size(height, width)
        if plan.mask_levels.shape != (batch,):
            raise ValueError(f"`plan.mask_levels` must have shape ({batch},), got {tuple(plan.mask_levels.shape)}.")
        masked = plan.mask_levels > 0
        n_masked = int(masked.sum()) if plan.mask_levels.device.type == "cpu" else None

        _, z, kl = self.encode(pixel_values, generator)
        spectrum = dict(num_bins=cfg.num_bins, delta=cfg.delta, blur=self.pre_blur(), kernel_size=cfg.pre_blur_kernel_size)
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.esm_weight > 0):  # weight 0: measured for the logs
            esm = esm_loss(pixel_values, z, sigma=cfg.pre_blur_sigma, **spectrum)

        decoder_input, target = z, pixel_values
        if cfg.dsm_mask_levels:
            block = cfg.dsm_block_size
            if height % block or width % block or z.shape[-2] % block or z.shape[-1] % block:
                raise ValueError(
                    f"`dsm_block_size`={block} must divide the image size {height}x{width} and the latent size "
                    f"{z.shape[-2]}x{z.shape[-1]}."
                )
            levels = plan.mask_levels.to(device, non_blocking=True)
            decoder_input = block_dct_lowpass(z, levels, block)
            with torch.no_grad():
                target = block_dct_lowpass(pixel_values, levels, block)

        decoded = self.vae.decode(decoder_input).sample
        pixel, mae, lp = self.pixel_terms(decoded, target)
        loss = (pixel + cfg.kl_weight * kl + cfg.esm_weight * esm).sum() / batch

        is_masked = masked.to(device, non_blocking=True).float()
        n_masked = float(is_masked.sum()) if n_masked is None else n_masked
        n_plain = batch - n_masked
        return SpectrumMatchingOutput(
            loss=loss,
            rec_mae=((mae * (1 - is_masked)).sum() / max(n_plain, 1)).detach(),
            rec_lpips=((lp * (1 - is_masked)).sum() / max(n_plain, 1)).detach(),
            kl=kl.mean().detach(),
            esm=esm.mean().detach(),
            dsm_mae=((mae * is_masked).sum() / max(n_masked, 1)).detach(),
            dsm_lpips=((lp * is_masked).sum() / max(n_masked, 1)).detach(),
            dsm_fraction=torch.tensor(n_masked / batch, device=device),
            reconstruction=decoded if return_reconstruction else None,
        )
