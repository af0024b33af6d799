"""Latent-structure analyses: blur dynamics (Fig. 5), channel unmasking (Fig. 6, A.6), latent power spectra
and latent statistics.

Every analysis takes either a diffusers `AutoencoderKL` (posterior mean by default) or a plain callable
`encoder(pixel_values) -> latents (batch_size, latent_channels, h, w)`, so that reference "encoders"
such as `FourierCoefficientEncoder` go through exactly the same code as a VAE.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..basis import channel_frequency_order, channel_to_basis_index, default_grid, validate_grid
from ..blur import PADDING_MODES, gaussian_blur
from ._utils import check_positive_int, progress_bar, resolve_device
from .io import ImageSource, first_images, image_batches, to_uint8


Encoder = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Encoders and decoders
# --------------------------------------------------------------------------------------------


def _module_device_dtype(model) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device, parameter.dtype
    return None, None


def as_encoder(model, sample_posterior: bool = False, generator: Optional[torch.Generator] = None) -> Encoder:
    """
    `pixel_values -> latents` (float32) for an `AutoencoderKL` (posterior mean, or a sample when
    `sample_posterior`), any model with `encode` returning `.latent_dist`/`.latents`/a tensor, or a callable.
    Latents are the raw encoder output: no `scaling_factor` / `shift_factor` applied.
    """
    device, dtype = _module_device_dtype(model)

    def prepare(pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(device=device or pixel_values.device, dtype=dtype or pixel_values.dtype)

    if hasattr(model, "encode"):

        def encode(pixel_values: torch.Tensor) -> torch.Tensor:
            out = model.encode(prepare(pixel_values))
            if hasattr(out, "latent_dist"):
                dist = out.latent_dist
                return (dist.sample(generator=generator) if sample_posterior else dist.mode()).float()
            for attribute in ("latents", "latent", "sample"):
                if hasattr(out, attribute):
                    return getattr(out, attribute).float()
            if torch.is_tensor(out):
                return out.float()
            raise TypeError(f"cannot read latents from the {type(out).__name__} returned by `encode`.")

        return encode
    if callable(model):
        return lambda pixel_values: model(prepare(pixel_values)).float()
    raise TypeError(
        f"the encoder must be an AutoencoderKL, have an `encode` method, or be callable; got {type(model).__name__}."
    )


def as_decoder(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """`latents -> pixel_values` (float32) for a model with `decode` (diffusers `.sample` output) or a callable."""
    device, dtype = _module_device_dtype(model)
    decode_fn = getattr(model, "decode", None) or (model if callable(model) else None)
    if decode_fn is None:
        raise TypeError(f"the decoder must have a `decode` method or be callable; got {type(model).__name__}.")

    def decode(latents: torch.Tensor) -> torch.Tensor:
        out = decode_fn(latents.to(device=device or latents.device, dtype=dtype or latents.dtype))
        return (out.sample if hasattr(out, "sample") else out).float()

    return decode


def _split_autoencoder(model) -> Tuple[Encoder, Callable[[torch.Tensor], torch.Tensor]]:
    if isinstance(model, (tuple, list)) and len(model) == 2 and all(callable(m) for m in model):
        return as_encoder(model[0]), as_decoder(model[1])
    if hasattr(model, "encode") and hasattr(model, "decode"):
        return as_encoder(model), as_decoder(model)
    raise TypeError(
        f"channel unmasking needs an autoencoder (an AutoencoderKL, or a pair (encode, decode) of callables); "
        f"got {type(model).__name__}."
    )


def _analysis_device(model, device) -> torch.device:
    if device is not None:
        return resolve_device(device)
    model_device, _ = _module_device_dtype(model[0] if isinstance(model, (tuple, list)) else model)
    return model_device or torch.device("cpu")


def _grid_for(latent_channels: int, grid) -> Tuple[int, int]:
    return validate_grid(tuple(grid), latent_channels) if grid is not None else default_grid(latent_channels)


class FourierCoefficientEncoder:
    r"""
    A reference "encoder" that literally returns 2D Fourier coefficients of the image: channel n holds the
    real part of the DFT coefficient (w, h) = (n mod W, n div W) (eq. 41) of the luminance (mean of RGB)
    of the image mirrored to a period 2(H-1) x 2(W-1) (the whole-sample symmetric extension that reflect
    padding implies), as a `(batch_size, H * W, 1, 1)` latent.

    Under `gaussian_blur(..., padding_mode="reflect")` every coefficient is multiplied by the blur
    kernel's frequency response, ≈ exp(-τ |ω|² / 2) with ω = (π w / (width - 1), π h / (height - 1)): exactly
    the Fourier state-space dynamics of Sec. 4.2 with a Neumann boundary (A.3). It is the "Fourier
    coefficients for reference" column of Fig. 5, and the perfect score of `blur_dynamics`.

    Args:
        grid (`Tuple[int, int]`): `(H, W)` of the basis grid; `H * W` channels.
    """

    def __init__(self, grid: Sequence[int] = (2, 2)):
        self.grid = validate_grid(tuple(grid))

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = self.grid
        luminance = pixel_values.float().mean(dim=1)
        if min(luminance.shape[-2:]) < max(height, width) + 1:
            raise ValueError(f"images of size {tuple(luminance.shape[-2:])} are too small for a {self.grid} grid.")
        mirrored = torch.cat([luminance, luminance.flip(-1)[..., 1:-1]], dim=-1)
        mirrored = torch.cat([mirrored, mirrored.flip(-2)[..., 1:-1, :]], dim=-2)
        coefficients = torch.fft.fft2(mirrored.double(), norm="forward").real
        channels = [coefficients[:, n // width, n % width] for n in range(height * width)]
        return torch.stack(channels, dim=1)[:, :, None, None].float()


# --------------------------------------------------------------------------------------------
# (a) Blur dynamics (Fig. 5) and its coherence score
# --------------------------------------------------------------------------------------------


def blur_variances(
    height: int,
    width: Optional[int] = None,
    num_steps: int = 10,
    max_sigma_fraction: float = 0.25,
    min_sigma: float = 0.5,
) -> List[float]:
    """
    The blur sequence of `blur_dynamics`: τ_0 = 0, then `num_steps - 1` variances (pixels²) spaced
    geometrically from `min_sigma`² to (`max_sigma_fraction` x min(height, width))².

    The range is deliberately wide: the DFT coefficient of frequency f (cycles per image) decays as
    exp(-2 π² f² τ / S²), i.e. around σ ≈ S / (4.4 f); a sequence spanning σ = 0.5 px .. S/4 sees every
    channel's decay, whereas the training range (τ ≤ 10 at 256², A.5) is sub-pixel in the latent grid.
    """
    width = height if width is None else width
    check_positive_int("num_steps", num_steps)
    if num_steps < 3:
        raise ValueError(f"`num_steps` must be >= 3 (a fit of an exponential needs 3 points), got {num_steps}.")
    if not 0 < max_sigma_fraction < 1 / 3:
        raise ValueError(
            f"`max_sigma_fraction` must be in (0, 1/3) (reflect padding needs 3σ < image size), got {max_sigma_fraction!r}."
        )
    max_sigma = max_sigma_fraction * min(height, width)
    if not 0 < min_sigma < max_sigma:
        raise ValueError(f"`min_sigma` must be in (0, {max_sigma:.3g}) for {height}x{width} images, got {min_sigma!r}.")
    sigmas = np.geomspace(min_sigma, max_sigma, num_steps - 1)
    return [0.0] + [float(s**2) for s in sigmas]


@dataclass
class ExponentialFit:
    """
    Least-squares fit of trajectories `(N, C, T)` by y_nc(τ) = b_nc + k_nc exp(-λ_c τ): one rate λ_c per
    channel shared by all N images (the state-space model has one A for every image), with a free start
    and end value per image.

    Attributes:
        r2 (`torch.Tensor` `(C,)`): 1 - SS_res / SS_tot pooled over images; NaN for static channels.
        rate (`torch.Tensor` `(C,)`): λ_c in 1 / pixel² of blur variance.
        fitted (`torch.Tensor` `(N, C, T)`): the fitted trajectories.
        static (`torch.Tensor` `(C,)` bool): channels that do not move along the sequence (RMS change
            < 1e-4 of the RMS of all values): their R² is undefined and they are left out of averages.
    """

    r2: torch.Tensor
    rate: torch.Tensor
    fitted: torch.Tensor
    static: torch.Tensor

    @property
    def mean_r2(self) -> float:
        """Mean R² over the channels that move (NaN when none does)."""
        moving = self.r2[~self.static]
        return float(moving.mean()) if moving.numel() else math.nan


def fit_exponential(values: torch.Tensor, variances: Sequence[float], num_rates: int = 512) -> ExponentialFit:
    """Fits `values` `(N, C, T)` along `variances` `(T,)` with one exponential rate per channel (see `ExponentialFit`)."""
    y = torch.as_tensor(values).detach().double().cpu()
    tau = torch.as_tensor(list(variances), dtype=torch.float64)
    if y.ndim != 3 or y.shape[-1] != tau.numel():
        raise ValueError(f"`values` must have shape (N, C, {tau.numel()}) to match `variances`, got {tuple(y.shape)}.")
    if tau.numel() < 3 or not torch.all(tau[1:] > tau[:-1]) or tau[0] < 0:
        raise ValueError(f"`variances` must be >= 3 increasing non-negative values, got {tau.tolist()}.")
    positive = tau[tau > 0]
    rates = torch.logspace(math.log10(0.01 / float(tau.max())), math.log10(100.0 / float(positive.min())), num_rates,
                           dtype=torch.float64)
    ss_tot = (y - y.mean(-1, keepdim=True)).pow(2).sum(dim=(0, 2))  # (C,)

    def residual(rate: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SS_res and the fitted values for one rate per channel: rate (C,) -> ((C,), (N, C, T))."""
        design = torch.stack([torch.ones_like(rate)[:, None].expand(-1, tau.numel()),
                              torch.exp(-rate[:, None] * tau[None, :])], dim=-1)  # (C, T, 2)
        fitted = torch.einsum("cts,ncs->nct", design @ torch.linalg.pinv(design), y)  # least squares for (b, k)
        return (y - fitted).pow(2).sum(dim=(0, 2)), fitted

    # Coarse: a log grid of rates, every channel at once. Fine: golden-section search on log λ between the
    # grid neighbours of the best rate (vectorized over channels, so no per-channel scipy call).
    grid_res = torch.stack([residual(rate.expand(y.shape[1]))[0] for rate in rates])  # (R, C)
    best = grid_res.argmin(dim=0)
    log_rates = rates.log()
    low = log_rates[(best - 1).clamp_min(0)]
    high = log_rates[(best + 1).clamp_max(num_rates - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        left_better = residual(a.exp())[0] < residual(b.exp())[0]
        high, low = torch.where(left_better, b, high), torch.where(left_better, low, a)
    best_rate = ((low + high) / 2).exp()
    best_res, fitted = residual(best_rate)
    on_grid = grid_res.min(dim=0)
    worse = on_grid.values < best_res  # keep the grid point if the refinement did not improve on it
    if worse.any():
        best_rate = torch.where(worse, rates[on_grid.indices], best_rate)
        best_res, fitted = residual(best_rate)
    scale = y.pow(2).mean().sqrt()
    static = (ss_tot / (y.shape[0] * y.shape[2])).sqrt() <= 1e-4 * scale
    r2 = 1 - best_res / ss_tot.clamp_min(1e-300)
    r2 = torch.where(static, torch.full_like(r2, math.nan), r2)
    return ExponentialFit(r2=r2.float(), rate=best_rate.float(), fitted=fitted.float(), static=static)


@dataclass
class BlurDynamicsResult:
    """
    Output of `blur_dynamics`.

    Attributes:
        variances (`List[float]`): the blur sequence τ_t (pixels²).
        means (`torch.Tensor` `(N, C, T)`): spatial mean of each latent channel along the sequence (Fig. 5).
        energies (`torch.Tensor` `(N, C, T)`): mean square of the mean-centred channel C(z) (eq. 24).
        mean_fit, energy_fit (`ExponentialFit`): the single-exponential fits of the two.
        grid (`Tuple[int, int]`): basis grid of the channels (eq. 41).
        image_size (`Tuple[int, int]`): (height, width) of the images.
        blurred (`torch.Tensor` `(T, 3, H, W)` uint8): the blur sequence of the first image, for the figure.
    """

    variances: List[float]
    means: torch.Tensor
    energies: torch.Tensor
    mean_fit: ExponentialFit
    energy_fit: ExponentialFit
    grid: Tuple[int, int]
    image_size: Tuple[int, int]
    blurred: torch.Tensor = field(repr=False)

    @property
    def coherence(self) -> float:
        """Mean over moving channels of the R² of the spatial-mean trajectories: 1 = Fourier-like (Fig. 5)."""
        return self.mean_fit.mean_r2

    @property
    def energy_coherence(self) -> float:
        """Mean over moving channels of the R² of the centred-energy trajectories."""
        return self.energy_fit.mean_r2

    def equivalent_frequency(self) -> torch.Tensor:
        """
        Per channel, the frequency (cycles per image side) whose Fourier coefficient decays at the fitted
        rate of the spatial mean: f = S sqrt(λ / (2 π²)) with S = sqrt(H W).
        """
        size = math.sqrt(self.image_size[0] * self.image_size[1])
        return size * torch.sqrt(self.mean_fit.rate / (2 * math.pi**2))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary (per-channel scores, rates and the mean trajectories)."""
        channels = []
        frequency = self.equivalent_frequency()
        for n in range(self.means.shape[1]):
            w, h = channel_to_basis_index(n, self.grid)
            channels.append({
                "channel": n, "basis_index": [w, h], "static": bool(self.mean_fit.static[n]),
                "mean_r2": float(self.mean_fit.r2[n]), "mean_rate": float(self.mean_fit.rate[n]),
                "equivalent_frequency": float(frequency[n]),
                "energy_r2": float(self.energy_fit.r2[n]), "energy_rate": float(self.energy_fit.rate[n]),
            })
        return {
            "coherence": self.coherence,
            "energy_coherence": self.energy_coherence,
            "num_images": int(self.means.shape[0]),
            "variances": self.variances,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "channels": channels,
            "mean_trajectories": self.means.mean(0).tolist(),
        }


@torch.inference_mode()
def blur_dynamics(
    encoder,
    images: ImageSource,
    variances: Optional[Sequence[float]] = None,
    num_images: int = 8,
    num_steps: int = 10,
    max_sigma_fraction: float = 0.25,
    min_sigma: float = 0.5,
    padding_mode: str = "reflect",
    grid: Optional[Sequence[int]] = None,
    resolution: Optional[int] = None,
    batch_size: int = 10,
    sample_posterior: bool = False,
    device: Union[str, torch.device, None] = None,
) -> BlurDynamicsResult:
    r"""
    How latent channels evolve as the input image is progressively blurred (Fig. 5), with a coherence
    score: does each channel follow the Fourier state-space dynamics, i.e. one exponential in τ?

    For each image I and each τ_t of the blur sequence, z_t = E(G_τt * I); the spatial mean of every
    channel and the mean square of its centred part C(z_t) (eq. 24) form trajectories over t, fitted by
    `fit_exponential` (one decay rate per channel for all images, free start/end per image). The score
    per channel is the pooled R²; `coherence` averages it over channels. Fourier coefficients
    (`FourierCoefficientEncoder`) score 1; an encoder whose channels mix many scales scores lower,
    because over a wide geometric τ range a single exponential cannot follow a multi-scale decay.

    Args:
        encoder: an `AutoencoderKL` or a callable `pixel_values -> latents`.
        images: an image source; the first `num_images` are used.
        variances (`Sequence[float]`, *optional*): the blur variances (pixels², increasing, first usually 0);
            by default `blur_variances(H, W, num_steps, max_sigma_fraction, min_sigma)`.
        padding_mode (`str`, defaults to `"reflect"`): blur boundary, as in training (`gaussian_blur`).
        grid (`Tuple[int, int]`, *optional*): basis grid of the channels; default `default_grid(C)`.
        batch_size (`int`, defaults to 10): blurred images encoded at once.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {PADDING_MODES}, got {padding_mode!r}.")
    check_positive_int("batch_size", batch_size)
    device = _analysis_device(encoder, device)
    encode = as_encoder(encoder, sample_posterior=sample_posterior)
    pixel_values = first_images(images, num_images, resolution=resolution)
    height, width = pixel_values.shape[-2:]
    if variances is None:
        variances = blur_variances(height, width, num_steps, max_sigma_fraction, min_sigma)
    variances = [float(v) for v in variances]
    tau = torch.tensor(variances, dtype=torch.float32, device=device)

    means, energies, blurred_first = [], [], None
    for index, image in enumerate(pixel_values.to(device)):
        sequence = gaussian_blur(image[None].expand(len(variances), -1, -1, -1), tau, padding_mode=padding_mode)
        if index == 0:
            blurred_first = to_uint8(sequence).cpu()
        latents = torch.cat([encode(chunk) for chunk in sequence.split(batch_size)])  # (T, C, h, w)
        spatial_mean = latents.mean(dim=(2, 3), keepdim=True)
        means.append(spatial_mean.flatten(1).T.cpu())  # (C, T)
        energies.append((latents - spatial_mean).pow(2).mean(dim=(2, 3)).T.cpu())
    means, energies = torch.stack(means).float(), torch.stack(energies).float()
    grid = _grid_for(means.shape[1], grid)
    return BlurDynamicsResult(
        variances=variances,
        means=means,
        energies=energies,
        mean_fit=fit_exponential(means, variances),
        energy_fit=fit_exponential(energies, variances),
        grid=grid,
        image_size=(int(height), int(width)),
        blurred=blurred_first,
    )


# --------------------------------------------------------------------------------------------
# (b) Channel unmasking (Fig. 6, A.6)
# --------------------------------------------------------------------------------------------


MASK_VALUES = ("mean", "zero")


@dataclass
class UnmaskingResult:
    """
    Output of `channel_unmasking`.

    Attributes:
        order (`List[int]`): channels in the order they are revealed.
        psnr (`torch.Tensor` `(N, C)`): PSNR (dB) to the input image after revealing the first k = 1..C channels.
        psnr_to_reconstruction (`torch.Tensor` `(N, C)`): PSNR to the full reconstruction (k = C).
        strip (`torch.Tensor` `(n, C, 3, H, W)` uint8): decoded images of the first images at every step.
        originals (`torch.Tensor` `(n, 3, H, W)` uint8): those input images.
        grid, mask_value: as given.
    """

    order: List[int]
    psnr: torch.Tensor
    psnr_to_reconstruction: torch.Tensor
    strip: torch.Tensor = field(repr=False)
    originals: torch.Tensor = field(repr=False)
    grid: Tuple[int, int] = (1, 1)
    mask_value: str = "mean"

    @property
    def mean_psnr(self) -> torch.Tensor:
        """`(C,)`: PSNR per step, averaged over images (finite values)."""
        return torch.stack([_finite_mean(column) for column in self.psnr.T])

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary."""
        return {
            "order": self.order,
            "basis_index": [list(channel_to_basis_index(n, self.grid)) for n in self.order],
            "mask_value": self.mask_value,
            "grid": list(self.grid),
            "num_images": int(self.psnr.shape[0]),
            "psnr": self.mean_psnr.tolist(),
            "psnr_to_reconstruction": [float(_finite_mean(c)) for c in self.psnr_to_reconstruction.T],
        }


def _finite_mean(values: torch.Tensor) -> torch.Tensor:
    finite = values[torch.isfinite(values)]
    return finite.mean() if finite.numel() else values.new_tensor(math.inf)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from .metrics import psnr

    return psnr(a, b).float().cpu()


@torch.inference_mode()
def channel_unmasking(
    vae,
    images: ImageSource,
    order: Union[str, Sequence[int]] = "frequency",
    grid: Optional[Sequence[int]] = None,
    mask_value: str = "mean",
    num_images: int = 4,
    num_strip_images: int = 2,
    resolution: Optional[int] = None,
    sample_posterior: bool = False,
    device: Union[str, torch.device, None] = None,
) -> UnmaskingResult:
    r"""
    Decodes latents with channels revealed one at a time in low-to-high frequency order (Fig. 6, A.6).

    With the grid (H, W), channel n is basis (w, h) = (n mod W, n div W) (eq. 41), and `order="frequency"`
    sorts by w + h ascending (`channel_frequency_order`); `"reverse"` is high-to-low, or pass a permutation.
    At step k the first k channels of the order keep their values and the others are masked:
    `mask_value="mean"` (default) replaces a masked channel by its own spatial mean, i.e. by what the
    mean-centred state-space model (eq. 24) lets blurring drive it to; `"zero"` sets it to 0. The paper
    does not say which it used.

    Args:
        vae: an `AutoencoderKL`, or a pair `(encode, decode)` of callables.
        images: an image source; the first `num_images` are decoded at every step.
        num_strip_images (`int`, defaults to 2): how many of them to keep as images for the figure.
    """
    if mask_value not in MASK_VALUES:
        raise ValueError(f"`mask_value` must be one of {MASK_VALUES}, got {mask_value!r}.")
    device = _analysis_device(vae, device)
    encode, decode = _split_autoencoder(vae)
    if sample_posterior:
        encode = as_encoder(vae[0] if isinstance(vae, (tuple, list)) else vae, sample_posterior=True)
    pixel_values = first_images(images, num_images, resolution=resolution).to(device)
    latents = encode(pixel_values)
    channels = latents.shape[1]
    grid = _grid_for(channels, grid)
    if isinstance(order, str):
        if order not in ("frequency", "reverse"):
            raise ValueError(f"`order` must be 'frequency', 'reverse' or a permutation of range({channels}), got {order!r}.")
        order_list = channel_frequency_order(grid)
        order_list = order_list[::-1] if order == "reverse" else order_list
    else:
        order_list = [int(n) for n in order]
        if sorted(order_list) != list(range(channels)):
            raise ValueError(f"`order` must be a permutation of range({channels}), got {list(order)}.")
    fill = latents.mean(dim=(2, 3), keepdim=True).expand_as(latents) if mask_value == "mean" else torch.zeros_like(latents)
    keep = min(num_strip_images, pixel_values.shape[0])
    decoded_steps, psnrs = [], []
    for k in range(1, channels + 1):
        mask = torch.zeros(channels, dtype=torch.bool, device=latents.device)
        mask[order_list[:k]] = True
        decoded = decode(torch.where(mask[None, :, None, None], latents, fill)).clamp(-1, 1)
        if decoded.shape != pixel_values.shape:
            raise ValueError(f"the decoder returned shape {tuple(decoded.shape)} for inputs {tuple(pixel_values.shape)}.")
        decoded_steps.append(decoded)
        psnrs.append(_psnr(decoded, pixel_values))
    full = decoded_steps[-1]
    return UnmaskingResult(
        order=order_list,
        psnr=torch.stack(psnrs, dim=1),
        psnr_to_reconstruction=torch.stack([_psnr(d, full) for d in decoded_steps], dim=1),
        strip=torch.stack([to_uint8(d[:keep]).cpu() for d in decoded_steps], dim=1),
        originals=to_uint8(pixel_values[:keep]).cpu(),
        grid=grid,
        mask_value=mask_value,
    )


# --------------------------------------------------------------------------------------------
# (c) Latent power spectrum and (d) latent statistics
# --------------------------------------------------------------------------------------------


def radial_power_spectrum(maps: torch.Tensor, window: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Radially averaged power spectral density of `maps` `(B, C, h, w)` after removing each map's mean.

    Returns `(frequencies (F,), psd (B, C, F))`: frequencies in cycles per pixel, bins k / n for
    k = 1 .. n // 2 with n = min(h, w) (the DC bin is dropped); PSD = |FFT|² / (h w) averaged within each
    annulus. `window="hann"` applies a 2D Hann window first (less leakage from the borders).
    """
    if maps.ndim != 4:
        raise ValueError(f"`maps` must have shape (B, C, h, w), got {tuple(maps.shape)}.")
    height, width = maps.shape[-2:]
    size = min(height, width)
    if size < 4:
        raise ValueError(f"maps of size {height}x{width} are too small for a power spectrum (need >= 4).")
    x = maps.double() - maps.double().mean(dim=(2, 3), keepdim=True)
    if window == "hann":
        x = x * torch.outer(torch.hann_window(height, periodic=False, dtype=x.dtype, device=x.device),
                            torch.hann_window(width, periodic=False, dtype=x.dtype, device=x.device))
    elif window is not None:
        raise ValueError(f"`window` must be None or 'hann', got {window!r}.")
    power = torch.fft.fft2(x).abs().pow(2) / (height * width)
    fy = torch.fft.fftfreq(height, dtype=x.dtype, device=x.device)
    fx = torch.fft.fftfreq(width, dtype=x.dtype, device=x.device)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    bins = torch.round(radius * size).long().flatten()
    num_bins = size // 2
    valid = (bins >= 1) & (bins <= num_bins)
    flat = power.flatten(2)[..., valid]
    index = (bins[valid] - 1).expand(*flat.shape[:2], -1)
    sums = torch.zeros(*flat.shape[:2], num_bins, dtype=x.dtype, device=x.device).scatter_add_(-1, index, flat)
    counts = torch.bincount(bins[valid] - 1, minlength=num_bins).clamp_min(1)
    frequencies = torch.arange(1, num_bins + 1, dtype=torch.float64) / size
    return frequencies, (sums / counts).cpu()


def spectral_slope(frequencies: torch.Tensor, psd: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of log10 PSD against log10 frequency, per row of `psd` `(..., F)` (NaN if < 2 positive bins)."""
    log_f = torch.log10(torch.as_tensor(frequencies, dtype=torch.float64))
    rows = torch.as_tensor(psd, dtype=torch.float64).reshape(-1, log_f.numel())
    slopes = []
    for row in rows:
        ok = row > 0
        if ok.sum() < 2:
            slopes.append(math.nan)
            continue
        slopes.append(float(np.polyfit(log_f[ok].numpy(), torch.log10(row[ok]).numpy(), 1)[0]))
    return torch.tensor(slopes, dtype=torch.float32).reshape(psd.shape[:-1])


@dataclass
class PowerSpectrumResult:
    """
    Output of `latent_power_spectrum`.

    Attributes:
        frequencies (`torch.Tensor` `(F,)`): cycles per latent pixel.
        psd (`torch.Tensor` `(C, F)`): radially averaged PSD of each mean-centred channel, mean over images.
        slope (`torch.Tensor` `(C,)`): log-log slope of each channel's PSD.
        image_frequencies, image_psd, image_slope: the same for the images' luminance (cycles per image pixel).
        latent_size, image_size, grid, num_images: shapes and counts.
    """

    frequencies: torch.Tensor
    psd: torch.Tensor
    slope: torch.Tensor
    image_frequencies: torch.Tensor
    image_psd: torch.Tensor
    image_slope: float
    latent_size: Tuple[int, int]
    image_size: Tuple[int, int]
    grid: Tuple[int, int]
    num_images: int

    @property
    def mean_slope(self) -> float:
        """Mean of the per-channel slopes."""
        return float(self.slope[torch.isfinite(self.slope)].mean())

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary."""
        return {
            "mean_slope": self.mean_slope,
            "slope": self.slope.tolist(),
            "image_slope": self.image_slope,
            "frequencies_cycles_per_latent_pixel": self.frequencies.tolist(),
            "psd": self.psd.tolist(),
            "image_frequencies_cycles_per_pixel": self.image_frequencies.tolist(),
            "image_psd": self.image_psd.tolist(),
            "latent_size": list(self.latent_size),
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "num_images": self.num_images,
        }


@dataclass
class LatentStatisticsResult:
    """
    Output of `latent_statistics`: per-channel and global moments of the raw latents, and the diffusers
    normalization they imply: `latents = (z - shift_factor) * scaling_factor` has mean 0 and std 1
    (Flux/SD3 convention); `scaling_factor_without_shift` = 1 / RMS(z) is the SD-1.x convention.
    """

    mean: torch.Tensor
    std: torch.Tensor
    global_mean: float
    global_std: float
    rms: float
    scaling_factor: float
    shift_factor: float
    scaling_factor_without_shift: float
    configured_scaling_factor: Optional[float]
    configured_shift_factor: Optional[float]
    num_images: int
    latent_shape: Tuple[int, int, int]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary."""
        out = {k: getattr(self, k) for k in (
            "global_mean", "global_std", "rms", "scaling_factor", "shift_factor", "scaling_factor_without_shift",
            "configured_scaling_factor", "configured_shift_factor", "num_images")}
        out.update(mean=self.mean.tolist(), std=self.std.tolist(), latent_shape=list(self.latent_shape))
        return out


@torch.inference_mode()
def latent_statistics_and_spectrum(
    encoder,
    images: ImageSource,
    batch_size: int = 16,
    resolution: Optional[int] = None,
    max_samples: Optional[int] = None,
    grid: Optional[Sequence[int]] = None,
    window: Optional[str] = None,
    sample_posterior: bool = False,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    progress: bool = False,
) -> Tuple[LatentStatisticsResult, PowerSpectrumResult]:
    """Both `latent_statistics` and `latent_power_spectrum` from one encoding pass over `images`."""
    device = _analysis_device(encoder, device)
    encode = as_encoder(encoder, sample_posterior=sample_posterior)
    batches = image_batches(images, batch_size=batch_size, resolution=resolution, max_samples=max_samples,
                            num_workers=num_workers)
    total = sum_sq = count_pixels = None
    psd_sum = image_psd_sum = None
    frequencies = image_frequencies = None
    num_images, latent_shape, image_size = 0, None, None
    total_batches = batches.num_images and -(-batches.num_images // batch_size)
    for batch in progress_bar(batches, progress, desc="latents", total=total_batches, unit="batch"):
        batch = batch.to(device)
        latents = encode(batch)
        z = latents.double()
        if total is None:
            total = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
            sum_sq = torch.zeros_like(total)
            count_pixels = 0
            latent_shape, image_size = tuple(z.shape[1:]), tuple(batch.shape[-2:])
        total += z.sum(dim=(0, 2, 3))
        sum_sq += z.pow(2).sum(dim=(0, 2, 3))
        count_pixels += z.shape[0] * z.shape[2] * z.shape[3]
        frequencies, psd = radial_power_spectrum(z, window)
        image_frequencies, image_psd = radial_power_spectrum(batch.double().mean(1, keepdim=True), window)
        psd_sum = psd.sum(0) if psd_sum is None else psd_sum + psd.sum(0)
        image_psd_sum = image_psd.sum(0)[0] if image_psd_sum is None else image_psd_sum + image_psd.sum(0)[0]
        num_images += batch.shape[0]

    mean = total / count_pixels
    var = (sum_sq / count_pixels - mean.pow(2)).clamp_min(0)
    global_mean = float(total.sum() / (count_pixels * len(total)))
    global_sq = float(sum_sq.sum() / (count_pixels * len(total)))
    global_std = math.sqrt(max(global_sq - global_mean**2, 0.0))
    config = getattr(encoder, "config", None)
    stats = LatentStatisticsResult(
        mean=mean.float().cpu(),
        std=var.sqrt().float().cpu(),
        global_mean=global_mean,
        global_std=global_std,
        rms=math.sqrt(global_sq),
        scaling_factor=1.0 / global_std if global_std > 0 else math.inf,
        shift_factor=global_mean,
        scaling_factor_without_shift=1.0 / math.sqrt(global_sq) if global_sq > 0 else math.inf,
        configured_scaling_factor=getattr(config, "scaling_factor", None),
        configured_shift_factor=getattr(config, "shift_factor", None),
        num_images=num_images,
        latent_shape=latent_shape,
    )
    psd = (psd_sum / num_images).float()
    image_psd = (image_psd_sum / num_images).float()
    spectrum = PowerSpectrumResult(
        frequencies=frequencies.float(),
        psd=psd,
        slope=spectral_slope(frequencies, psd),
        image_frequencies=image_frequencies.float(),
        image_psd=image_psd,
        image_slope=float(spectral_slope(image_frequencies, image_psd[None])[0]),
        latent_size=latent_shape[1:],
        image_size=image_size,
        grid=_grid_for(latent_shape[0], grid),
        num_images=num_images,
    )
    return stats, spectrum


def latent_statistics(encoder, images: ImageSource, **kwargs) -> LatentStatisticsResult:
    """
    Per-channel mean and std of the raw latents over `images` (all positions), the global moments, and
    the `scaling_factor` / `shift_factor` they imply. Keyword arguments as `latent_statistics_and_spectrum`.
    """
    return latent_statistics_and_spectrum(encoder, images, **kwargs)[0]


def latent_power_spectrum(encoder, images: ImageSource, **kwargs) -> PowerSpectrumResult:
    """
    Radially averaged power spectrum of every mean-centred latent channel (mean over `images`) and its
    log-log slope, beside the images' own spectrum (the spectral view of latent "diffusability", e.g.
    Skorokhodov et al. 2025, ref. [54] of the paper). Keyword arguments as `latent_statistics_and_spectrum`.
    """
    return latent_statistics_and_spectrum(encoder, images, **kwargs)[1]
