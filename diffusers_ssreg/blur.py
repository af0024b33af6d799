"""Gaussian blur as the heat equation, and the (τ1, τ2) sampler of the regularizer (Sec. 4.2, A.3, A.5).

τ is the blur VARIANCE in pixels² (σ = sqrt(τ)); τ = 0 is the identity. The boundary is reflect
padding, i.e. the heat equation with a Neumann boundary (A.3).
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


PADDING_MODES = ("reflect", "circular", "replicate")


def _as_variance_tensor(variance, batch_size: int, device, dtype) -> torch.Tensor:
    variance = torch.as_tensor(variance, device=device, dtype=dtype)
    if variance.ndim == 0:
        variance = variance.expand(batch_size)
    if variance.ndim != 1 or variance.shape[0] != batch_size:
        raise ValueError(
            f"`variance` must be a scalar or have shape (batch_size,) = ({batch_size},), got shape {tuple(variance.shape)}."
        )
    return variance


def gaussian_kernels_1d(variance: torch.Tensor, half_width: int) -> torch.Tensor:
    """Sampled, normalized 1D Gaussian kernels of shape `(batch_size, 2 * half_width + 1)`; variance 0 gives a delta."""
    offsets = torch.arange(-half_width, half_width + 1, device=variance.device, dtype=variance.dtype)
    safe = variance.clamp_min(1e-12)[:, None]
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2 * safe))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(variance.dtype).expand_as(kernels)
    return torch.where(variance[:, None] > 0, kernels, delta)


def gaussian_blur(
    images: torch.Tensor,
    variance: Union[float, torch.Tensor],
    padding_mode: str = "reflect",
    max_half_width: Optional[int] = None,
) -> torch.Tensor:
    r"""
    Blurs `images` with a Gaussian of the given variance (pixels²), separably and differentiably.

    Args:
        images (`torch.Tensor` of shape `(batch_size, channels, height, width)`): the images.
        variance (`float` or `torch.Tensor` of shape `()` or `(batch_size,)`):
            τ = σ², one per sample allowed; 0 leaves a sample unchanged.
        padding_mode (`str`, *optional*, defaults to `"reflect"`):
            Boundary: `"reflect"` (Neumann heat equation, A.3), `"circular"` (periodic) or `"replicate"`.
        max_half_width (`int`, *optional*):
            Kernel half-width to use; by default ceil(3 σ_max) over the batch. Pass a fixed value to
            keep tensor shapes static (e.g. under `torch.compile`).

    Returns:
        `torch.Tensor` of the same shape and dtype as `images`.
    """
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(
            f"`images` must be a tensor of shape (batch_size, channels, height, width), got "
            f"{type(images).__name__} of shape {tuple(getattr(images, 'shape', ()))}."
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {PADDING_MODES}, got {padding_mode!r}.")
    batch, channels, height, width = images.shape
    compute_dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    variance = _as_variance_tensor(variance, batch, images.device, compute_dtype)
    if max_half_width is None:
        if torch.any(variance < 0) or not torch.all(torch.isfinite(variance)):
            raise ValueError(f"`variance` must be finite and >= 0, got {variance.tolist()}.")
        max_half_width = int(math.ceil(3 * math.sqrt(float(variance.detach().max())))) if batch else 0
    if max_half_width == 0:
        return images
    if padding_mode == "reflect" and max_half_width >= min(height, width):
        raise ValueError(
            f"a blur of variance {float(variance.max()):.3g} needs a kernel half-width of {max_half_width} px, "
            f"which reflect padding cannot provide on {height}x{width} images; use a smaller variance or larger images."
        )

    kernels = gaussian_kernels_1d(variance, max_half_width).to(images.dtype)  # (B, K)
    size = kernels.shape[1]
    # One grouped convolution per axis: every (sample, channel) plane gets its sample's kernel.
    weight = kernels.repeat_interleave(channels, dim=0)  # (B * C, K)
    planes = images.reshape(1, batch * channels, height, width)
    pad = max_half_width
    planes = F.pad(planes, (pad, pad, 0, 0), mode=padding_mode)
    planes = F.conv2d(planes, weight.view(batch * channels, 1, 1, size), groups=batch * channels)
    planes = F.pad(planes, (0, 0, pad, pad), mode=padding_mode)
    planes = F.conv2d(planes, weight.view(batch * channels, 1, size, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)


def resolution_scale(height: int, width: int, reference_resolution: Optional[int]) -> float:
    """Factor (R / reference)² applied to blur variances at resolution R = sqrt(H W); 1 when reference is None."""
    if reference_resolution is None:
        return 1.0
    return (math.sqrt(height * width) / reference_resolution) ** 2


def sample_tau_pairs(
    batch_size: int,
    tau_max: float = 10.0,
    delta_tau: float = 4.0,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    Draws (τ1, τ2 = τ1 + Δ_I) per sample (A.5).

    τ1 has the linearly decaying density p(x) = 2/(τ_max - Δ_I) - 2x/(τ_max - Δ_I)² on
    [0, τ_max - Δ_I]; by inverse CDF, τ1 = (τ_max - Δ_I)(1 - sqrt(1 - u)) with u ~ U(0, 1).
    Both are multiplied by `scale` (see `resolution_scale`).

    Returns:
        `(tau1, tau2)`, each a float32 tensor of shape `(batch_size,)`.
    """
    if not delta_tau > 0 or not tau_max >= delta_tau:
        raise ValueError(f"need 0 < delta_tau <= tau_max, got delta_tau={delta_tau!r}, tau_max={tau_max!r}.")
    span = tau_max - delta_tau
    u = torch.rand(batch_size, generator=generator, device=device if generator is None else generator.device)
    tau1 = span * (1 - torch.sqrt(1 - u))
    tau1 = tau1.to(device) if device is not None else tau1
    return tau1 * scale, (tau1 + delta_tau) * scale
