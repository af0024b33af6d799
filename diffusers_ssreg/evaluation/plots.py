"""Figures of the latent analyses (PNG via matplotlib) and their logging to TensorBoard.

Every `plot_*` function takes a mapping `{label: result}` so that several VAEs appear side by side,
returns a matplotlib `Figure` (built without pyplot, so no global backend is touched) and writes a
PNG when `path` is given.
"""

import math
import os
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from ..basis import channel_frequency_order, channel_to_basis_index
from ._utils import require
from .latent import BlurDynamicsResult, LatentStatisticsResult, PowerSpectrumResult, UnmaskingResult


def _figure(width: float, height: float):
    figure_module = require("matplotlib.figure", "plotting", "matplotlib")
    return figure_module.Figure(figsize=(width, height), layout="constrained")


def save_figure(figure, path: str, dpi: int = 110) -> str:
    """Writes `figure` as a PNG to `path` (creating the folder) and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _finish(figure, path: Optional[str]):
    if path is not None:
        save_figure(figure, path)
    return figure


def _check_results(results: Mapping, kind, name: str) -> None:
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"`results` must be a non-empty mapping {{label: {kind.__name__}}}, got {results!r}.")
    for label, result in results.items():
        if not isinstance(result, kind):
            raise TypeError(f"`results[{label!r}]` must be a {kind.__name__} (from `{name}`), got {type(result).__name__}.")


def _strip(images: torch.Tensor) -> np.ndarray:
    """uint8 images `(n, 3, H, W)` side by side as one `(H, n W, 3)` array with 2-pixel white gaps."""
    n, _, height, width = images.shape
    canvas = np.full((height, n * width + 2 * (n - 1), 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        canvas[:, i * (width + 2) : i * (width + 2) + width] = image.permute(1, 2, 0).numpy()
    return canvas


def plot_blur_dynamics(
    results: Mapping[str, BlurDynamicsResult], path: Optional[str] = None, num_channels: int = 4, max_images: int = 4
):
    """
    Fig. 5: the blur sequence of the first image (top), then for the first `num_channels` channels in
    low-to-high frequency order (rows) and each model (columns), the spatial-mean trajectories of up
    to `max_images` images (solid) with their single-exponential fit (dashed) and the channel's R².
    """
    _check_results(results, BlurDynamicsResult, "blur_dynamics")
    columns = len(results)
    first = next(iter(results.values()))
    rows = min(num_channels, max(r.means.shape[1] for r in results.values()))
    figure = _figure(max(3.2 * columns, 8), 1.6 + 2.1 * rows)
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=[1.2] + [2] * rows)
    ax = figure.add_subplot(grid[0, :])
    ax.imshow(_strip(first.blurred))
    width = first.blurred.shape[-1] + 2
    ax.set_xticks([i * width + width / 2 for i in range(len(first.variances))])
    ax.set_xticklabels([f"τ={v:.3g}" for v in first.variances], fontsize=7)
    ax.set_yticks([])
    ax.set_title("blur sequence (variance τ in pixels²)", fontsize=9)
    for column, (label, result) in enumerate(results.items()):
        order = channel_frequency_order(result.grid)
        steps = np.arange(len(result.variances))
        for row in range(rows):
            ax = figure.add_subplot(grid[row + 1, column])
            if row >= len(order):
                ax.axis("off")
                continue
            channel = order[row]
            w, h = channel_to_basis_index(channel, result.grid)
            for image in range(min(max_images, result.means.shape[0])):
                line = ax.plot(steps, result.means[image, channel].numpy(), "-o", markersize=2.5, linewidth=1.2)
                ax.plot(steps, result.mean_fit.fitted[image, channel].numpy(), "--", linewidth=0.9,
                        color=line[0].get_color(), alpha=0.8)
            r2 = float(result.mean_fit.r2[channel])
            score = "static" if bool(result.mean_fit.static[channel]) else f"R²={r2:.3f}"
            ax.set_title(f"{label}\nch {channel} (w={w}, h={h})  {score}" if row == 0 else
                         f"ch {channel} (w={w}, h={h})  {score}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == rows - 1:
                ax.set_xlabel("blur step t", fontsize=8)
            if column == 0:
                ax.set_ylabel("spatial mean", fontsize=8)
    figure.suptitle("Latent channel dynamics along a blur sequence (solid: encoder, dashed: one exponential in τ)",
                    fontsize=10)
    return _finish(figure, path)


def plot_unmasking(results: Mapping[str, UnmaskingResult], path: Optional[str] = None, image_index: int = 0):
    """Fig. 6: per model (rows), the input and the decodes with 1, 2, ..., C channels revealed in the result's order."""
    _check_results(results, UnmaskingResult, "channel_unmasking")
    steps = max(r.strip.shape[1] for r in results.values())
    figure = _figure(1.25 * (steps + 1) + 0.5, 1.45 * len(results) + 0.6)
    axes = figure.subplots(len(results), steps + 1, squeeze=False)
    for row, (label, result) in enumerate(results.items()):
        if image_index >= result.strip.shape[0]:
            raise ValueError(f"`image_index`={image_index} but only {result.strip.shape[0]} strip images were kept.")
        psnr = result.mean_psnr
        axes[row, 0].imshow(result.originals[image_index].permute(1, 2, 0).numpy())
        axes[row, 0].set_title("input", fontsize=7)
        axes[row, 0].set_ylabel(label, fontsize=8)
        for k in range(steps):
            ax = axes[row, k + 1]
            if k < result.strip.shape[1]:
                ax.imshow(result.strip[image_index, k].permute(1, 2, 0).numpy())
                w, h = channel_to_basis_index(result.order[k], result.grid)
                ax.set_title(f"+ch{result.order[k]} ({w},{h})\n{float(psnr[k]):.1f} dB", fontsize=6)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    figure.suptitle("Channel unmasking, low-to-high frequency (w+h) order; masked channels = "
                    f"{next(iter(results.values())).mask_value}", fontsize=9)
    return _finish(figure, path)


def plot_unmasking_psnr(results: Mapping[str, UnmaskingResult], path: Optional[str] = None):
    """PSNR to the input against the number of revealed channels, one line per model."""
    _check_results(results, UnmaskingResult, "channel_unmasking")
    figure = _figure(5.5, 3.6)
    ax = figure.add_subplot()
    for label, result in results.items():
        psnr = result.mean_psnr.numpy()
        ax.plot(np.arange(1, len(psnr) + 1), psnr, "-o", markersize=3, label=label)
    ax.set_xlabel("channels revealed (low-to-high frequency)")
    ax.set_ylabel("PSNR to input (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(figure, path)


def plot_power_spectrum(results: Mapping[str, PowerSpectrumResult], path: Optional[str] = None):
    """
    Per model (three to a row), the radially averaged PSD of each centred latent channel (coloured by frequency group
    w + h, dark = low) against cycles per image, each curve divided by its value at 1 cycle per image so
    that the decays can be compared; the images' own spectrum is the dashed black line.
    """
    _check_results(results, PowerSpectrumResult, "latent_power_spectrum")
    colormaps = require("matplotlib.cm", "plotting", "matplotlib")
    columns = min(len(results), 3)  # many models wrap onto several rows
    rows = math.ceil(len(results) / columns)
    figure = _figure(4.2 * columns, 3.8 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(results) :]:
        ax.axis("off")
    for ax, (label, result) in zip(axes, results.items()):
        latent_cycles = (result.frequencies * result.latent_size[1]).numpy()
        image_cycles = (result.image_frequencies * result.image_size[1]).numpy()
        groups = [sum(channel_to_basis_index(n, result.grid)) for n in range(result.psd.shape[0])]
        top = max(groups) or 1
        for channel, psd in enumerate(result.psd):
            psd = psd.numpy()
            color = colormaps.viridis(0.85 * groups[channel] / top)
            ax.loglog(latent_cycles, psd / max(psd[0], 1e-30), color=color, linewidth=1.1,
                      label=f"ch{channel} slope {float(result.slope[channel]):.2f}" if result.psd.shape[0] <= 8 else None)
        image_psd = result.image_psd.numpy()
        ax.loglog(image_cycles, image_psd / max(image_psd[0], 1e-30), "k--", linewidth=1.2,
                  label=f"image slope {result.image_slope:.2f}")
        ax.set_title(f"{label}: mean slope {result.mean_slope:.2f}", fontsize=9)
        ax.set_xlabel("cycles per image")
        ax.set_ylabel("PSD / PSD at 1 cycle")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    return _finish(figure, path)


def plot_latent_statistics(results: Mapping[str, LatentStatisticsResult], path: Optional[str] = None):
    """Per-channel mean ± std of the raw latents, one colour per model, with the implied scaling/shift in the legend."""
    _check_results(results, LatentStatisticsResult, "latent_statistics")
    figure = _figure(6.5, 3.6)
    ax = figure.add_subplot()
    offset = np.linspace(-0.2, 0.2, len(results)) if len(results) > 1 else [0.0]
    for shift, (label, result) in zip(offset, results.items()):
        channels = np.arange(result.mean.shape[0])
        ax.errorbar(channels + shift, result.mean.numpy(), yerr=result.std.numpy(), fmt="o", capsize=3, markersize=4,
                    label=f"{label} (scale {result.scaling_factor:.3g}, shift {result.shift_factor:.3g})")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("latent channel")
    ax.set_ylabel("mean ± std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _finish(figure, path)


def log_to_tensorboard(
    writer,
    scalars: Optional[Dict[str, float]] = None,
    figures: Optional[Dict[str, object]] = None,
    step: int = 0,
    prefix: str = "eval",
) -> None:
    """
    Logs `scalars` and matplotlib `figures` to TensorBoard: `writer` is a `SummaryWriter` or an accelerate
    TensorBoard tracker (`accelerator.get_tracker("tensorboard")`, whose `.writer` is used). Non-finite
    scalars are skipped.
    """
    writer = getattr(writer, "writer", writer)
    if not hasattr(writer, "add_scalar") or not hasattr(writer, "add_figure"):
        raise TypeError(f"`writer` must be a tensorboard SummaryWriter or an accelerate tracker, got {type(writer).__name__}.")
    for key, value in (scalars or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    for key, figure in (figures or {}).items():
        writer.add_figure(f"{prefix}/{key}", figure, step, close=False)
