"""Latent statistics after a fine-tune: the normalization a pipeline applies, recomputed for the new latents.

Fine-tuning moves the latent distribution on purpose, while the VAE's config (or, for FLUX.2, its BatchNorm
buffers) still holds the base model's normalization: a pipeline or a DiT that reads it would see latents at
the wrong scale. `estimate_latent_statistics` encodes a fixed, seeded subset of the training images with the
final weights (the posterior mean, as `Flux2Pipeline` and `examples/cache_latents.py` encode images), on
every process, and sums the per-channel moments over all processes; `apply_latent_statistics` writes what
diffusers' pipelines read:

- `AutoencoderKL` with `latents_mean`/`latents_std` (SDXL style): pipelines apply
  `(z - latents_mean) * scaling_factor / latents_std`; the per-channel mean and std are written,
  `scaling_factor` is kept.
- `AutoencoderKL` with a `shift_factor` (FLUX.1, SD3): `(z - shift_factor) * scaling_factor`;
  `shift_factor` = the mean, `scaling_factor` = 1 / the std.
- `AutoencoderKL` without `shift_factor` (SD 1.x/2.x): `z * scaling_factor`; `scaling_factor` = 1 / the RMS.
- `AutoencoderKLFlux2`: `(patchify(z) - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)`;
  `bn.running_mean` and `bn.running_var` of the 2x2-patchified latents.

Means, stds and the RMS of `AutoencoderKL` are taken over every channel and position (per channel for
`latents_mean`/`latents_std`), stds without Bessel's correction; the FLUX.2 running variance is the unbiased
one, as `torch.nn.BatchNorm2d` keeps it. docs/finetune.md says why these are recomputed by default.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .vae import SUPPORTED_VAE_CLASSES, check_vae_instance


# The AutoencoderKL config keys a pipeline's normalization reads.
AUTOENCODER_KL_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def is_flux2_vae(vae) -> bool:
    """Whether `vae` is an `AutoencoderKLFlux2` (its normalization is its BatchNorm's running statistics)."""
    flux2 = SUPPORTED_VAE_CLASSES.get("AutoencoderKLFlux2")
    return flux2 is not None and isinstance(vae, flux2)


def statistics_patch_size(vae) -> Tuple[int, int]:
    """The patch the normalization is defined on: the config's `patch_size` for FLUX.2, else (1, 1)."""
    if is_flux2_vae(vae):
        p, q = vae.config.patch_size
        return int(p), int(q)
    return 1, 1


def patchify_latents(latents: torch.Tensor, patch_size: Sequence[int] = (2, 2)) -> torch.Tensor:
    """
    `(batch_size, C, h, w)` -> `(batch_size, C * p * q, h / p, w / q)`: channel `c * p * q + i * q + j` holds
    offset (i, j) of every p x q patch of channel c, the order of diffusers' `Flux2Pipeline._patchify_latents`,
    which the FLUX.2 VAE's BatchNorm statistics follow.
    """
    batch_size, channels, height, width = latents.shape
    p, q = int(patch_size[0]), int(patch_size[1])
    if height % p or width % q:
        raise ValueError(f"latents of size {height}x{width} do not divide into patches of {p}x{q}.")
    latents = latents.reshape(batch_size, channels, height // p, p, width // q, q).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch_size, channels * p * q, height // p, width // q)


# --------------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------------


@dataclass
class LatentStatistics:
    """
    Per-channel first and second moments of a VAE's latents, summed over images (and processes), in float64.

    Args:
        sum (`torch.Tensor` of shape `(latent_channels * p * q,)`): the sum of each channel of the
            patchified latents (`patchify_latents` with `patch_size`; for (1, 1), the latent channels).
        sum_of_squares (`torch.Tensor` of the same shape): the sum of squares of each channel.
        count (`int`): values summed per channel.
        num_images (`int`): images encoded.
        num_batches (`int`): batches encoded, on all processes together.
        patch_size (`Tuple[int, int]`): the patch of the statistics' channels.
    """

    sum: torch.Tensor
    sum_of_squares: torch.Tensor
    count: int
    num_images: int
    num_batches: int
    patch_size: Tuple[int, int] = (1, 1)

    @property
    def latent_channels(self) -> int:
        return self.sum.numel() // (self.patch_size[0] * self.patch_size[1])

    # --- per channel of the patchified view (the FLUX.2 BatchNorm's channels) ---

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each channel of the patchified latents."""
        return self.sum / self.count

    @property
    def unbiased_variance(self) -> torch.Tensor:
        """Variance of each channel of the patchified latents, with Bessel's correction (BatchNorm's running_var)."""
        centred = (self.sum_of_squares - self.sum * self.mean).clamp_min(0)
        return centred / max(self.count - 1, 1)

    # --- per latent channel ---

    def _per_latent_channel(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(self.latent_channels, -1).sum(dim=1)

    @property
    def channel_mean(self) -> torch.Tensor:
        """Mean of each latent channel `(latent_channels,)`."""
        return self._per_latent_channel(self.sum) / self._channel_count

    @property
    def channel_std(self) -> torch.Tensor:
        """Standard deviation (no Bessel's correction) of each latent channel `(latent_channels,)`."""
        second = self._per_latent_channel(self.sum_of_squares) / self._channel_count
        return (second - self.channel_mean.pow(2)).clamp_min(0).sqrt()

    @property
    def _channel_count(self) -> int:
        return self.count * self.patch_size[0] * self.patch_size[1]

    # --- over every channel and position ---

    @property
    def global_mean(self) -> float:
        return float(self.sum.sum() / (self.count * self.sum.numel()))

    @property
    def rms(self) -> float:
        """Root mean square of all latent values."""
        return math.sqrt(float(self.sum_of_squares.sum() / (self.count * self.sum.numel())))

    @property
    def global_std(self) -> float:
        """Standard deviation (no Bessel's correction) of all latent values."""
        return math.sqrt(max(self.rms**2 - self.global_mean**2, 0.0))


def latent_moments(latents: torch.Tensor, patch_size: Sequence[int] = (1, 1)) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """`(sum, sum_of_squares, count)` per channel of the patchified `latents` `(batch_size, C, h, w)`, in float64."""
    z = patchify_latents(latents.double(), patch_size)
    return z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3)), z.shape[0] * z.shape[2] * z.shape[3]


def statistics_indices(dataset_size: int, num_images: int, seed: int = 0) -> List[int]:
    """`min(num_images, dataset_size)` distinct dataset indices, a seeded uniform draw (the same on every process)."""
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
    return order[: min(num_images, dataset_size)].tolist()


def _eager():
    """Runs compiled modules uncompiled: a pass of its own shapes is not worth a compile (torch >= 2.6)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


@torch.no_grad()
def estimate_latent_statistics(
    vae,
    dataset: torch.utils.data.Dataset,
    num_batches: int,
    batch_size: int,
    accelerator=None,
    seed: int = 0,
    sample_posterior: bool = False,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
) -> LatentStatistics:
    r"""
    The latent moments of `vae` over a fixed number of batches of `dataset`, reduced over all processes.

    The images are `statistics_indices(len(dataset), num_batches * batch_size * num_processes, seed)`, the
    same draw on every process; process k encodes every num_processes-th of them, from the k-th on, in
    batches of `batch_size` (so at most `num_batches` batches each), and the per-channel sums of all
    processes are added with `accelerator.reduce`. Compiled modules run uncompiled here, under
    `accelerator.autocast()` when an accelerator is given.

    Args:
        vae (`AutoencoderKL` or `AutoencoderKLFlux2`): the autoencoder, on the device it runs on.
        dataset (`torch.utils.data.Dataset`): items are `{"pixel_values": (3, H, W)}` in [-1, 1] (or tensors).
        num_batches (`int`): batches per process.
        batch_size (`int`): images per batch.
        accelerator (`accelerate.Accelerator`, *optional*): the run's accelerator; without it, one process.
        seed (`int`, *optional*, defaults to 0): seeds the choice of images.
        sample_posterior (`bool`, *optional*, defaults to `False`): a posterior sample instead of its mean.
        num_workers (`int`, *optional*, defaults to 0): DataLoader workers.
        collate_fn (`Callable`, *optional*): the DataLoader's collate function.
        generator (`torch.Generator`, *optional*): for `sample_posterior`.

    Returns:
        `LatentStatistics`: over the patchified latents for `AutoencoderKLFlux2` (its `patch_size`), over
        the latent channels otherwise.
    """
    check_vae_instance(vae, "vae")
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    num_processes = accelerator.num_processes if accelerator is not None else 1
    process_index = accelerator.process_index if accelerator is not None else 0
    indices = statistics_indices(len(dataset), num_batches * batch_size * num_processes, seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices[process_index::num_processes]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )
    parameter = next(vae.parameters())
    patch_size = statistics_patch_size(vae)
    channels = vae.config.latent_channels * patch_size[0] * patch_size[1]
    total = torch.zeros(channels, dtype=torch.float64, device=parameter.device)
    total_sq = torch.zeros_like(total)
    count = images = batches = 0
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    was_training = vae.training
    vae.eval()
    try:
        with _eager(), autocast:
            for batch in loader:
                pixel_values = batch["pixel_values"] if isinstance(batch, dict) else batch
                pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
                posterior = vae.encode(pixel_values).latent_dist
                z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
                batch_sum, batch_sq, batch_count = latent_moments(z, patch_size)
                total += batch_sum
                total_sq += batch_sq
                count, images, batches = count + batch_count, images + len(pixel_values), batches + 1
    finally:
        vae.train(was_training)
    counters = torch.tensor([count, images, batches], dtype=torch.float64, device=total.device)
    reduced = torch.cat([total, total_sq, counters])
    if num_processes > 1:
        reduced = accelerator.reduce(reduced, reduction="sum")
    reduced = reduced.cpu()
    count, images, batches = (int(round(v)) for v in reduced[-3:].tolist())
    if count == 0:
        raise ValueError("no image was encoded for the latent statistics: the dataset is empty.")
    return LatentStatistics(
        sum=reduced[:channels], sum_of_squares=reduced[channels : 2 * channels], count=count, num_images=images,
        num_batches=batches, patch_size=patch_size,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The normalization a pipeline reads
# --------------------------------------------------------------------------------------------


def latent_normalization(vae) -> Dict[str, Any]:
    """
    The normalization `vae` carries for its pipeline, JSON-ready: `scaling_factor`, `shift_factor`,
    `latents_mean`, `latents_std` of an `AutoencoderKL` config (None where absent); `bn.running_mean`,
    `bn.running_var` (lists) and `batch_norm_eps` of an `AutoencoderKLFlux2`.
    """
    check_vae_instance(vae, "vae")
    if is_flux2_vae(vae):
        return {
            "bn.running_mean": [float(v) for v in vae.bn.running_mean.double().tolist()],
            "bn.running_var": [float(v) for v in vae.bn.running_var.double().tolist()],
            "batch_norm_eps": float(vae.config.batch_norm_eps),
        }
    return {key: vae.config.get(key) for key in AUTOENCODER_KL_KEYS}


def normalization_from_statistics(vae, statistics: LatentStatistics) -> Dict[str, Any]:
    """
    The values `apply_latent_statistics` writes into `vae` for `statistics` (see the table of the module's
    docstring), as `latent_normalization` returns them.
    """
    check_vae_instance(vae, "vae")
    expected = statistics_patch_size(vae)
    if tuple(statistics.patch_size) != expected or statistics.latent_channels != vae.config.latent_channels:
        raise ValueError(
            f"`statistics` are over {statistics.latent_channels} latent channels in patches of {statistics.patch_size}, "
            f"but the VAE has {vae.config.latent_channels} latent channels and patches of {expected}."
        )
    values = latent_normalization(vae)
    if is_flux2_vae(vae):
        values["bn.running_mean"] = statistics.mean.tolist()
        values["bn.running_var"] = statistics.unbiased_variance.tolist()
        return values
    if values["latents_mean"] is not None and values["latents_std"] is not None:
        values["latents_mean"] = statistics.channel_mean.tolist()
        values["latents_std"] = statistics.channel_std.tolist()
    elif values["shift_factor"] is not None:
        values["shift_factor"] = statistics.global_mean
        values["scaling_factor"] = _inverse(statistics.global_std)
    else:  # `z * scaling_factor`, nothing subtracted: a unit second moment needs 1 / RMS
        values["scaling_factor"] = _inverse(statistics.rms)
    return values


def _inverse(value: float) -> float:
    return 1.0 / value if value > 0 else math.inf


@torch.no_grad()
def apply_latent_statistics(vae, statistics: LatentStatistics) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """
    Writes the normalization of `statistics` into `vae` in place: its config (`AutoencoderKL`) or its
    BatchNorm buffers, `num_batches_tracked` set to the batches encoded (`AutoencoderKLFlux2`), so that
    `save_pretrained` exports it. Returns `(before, after)`, each as `latent_normalization` gives it.
    """
    before = latent_normalization(vae)
    after = normalization_from_statistics(vae, statistics)
    if any(not math.isfinite(v) for v in _numbers(after)):
        raise ValueError(f"the latent statistics are not finite (degenerate latents?): {after}.")
    if is_flux2_vae(vae):
        bn = vae.bn
        bn.running_mean.copy_(torch.tensor(after["bn.running_mean"], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor(after["bn.running_var"], dtype=torch.float64))
        bn.num_batches_tracked.fill_(statistics.num_batches)
    else:
        vae.register_to_config(**{key: after[key] for key in AUTOENCODER_KL_KEYS if after[key] != before[key]})
    return before, latent_normalization(vae)  # as stored (the BatchNorm buffers hold float32)


def _numbers(values: Dict[str, Any]) -> List[float]:
    out = []
    for value in values.values():
        if isinstance(value, (list, tuple)):
            out += [float(v) for v in value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
    return out


# --------------------------------------------------------------------------------------------
# The model card's paragraph
# --------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{float(v):.5g}" for v in value) + "]"
    return f"{float(value):.6g}"


def format_normalization(values: Dict[str, Any]) -> str:
    """A one-line summary for logs: `key=value` pairs, long lists shortened to their first values and length."""
    parts = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)) and len(value) > 4:
            value = _fmt(value[:4])[:-1] + f", ... ({len(value)} values)]"
        else:
            value = _fmt(value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _item(key: str, value) -> str:
    """One bullet; a long list folded into a `<details>` block."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return (
            f"- <details><summary><code>{key}</code> ({len(value)} values)</summary>\n\n  `{_fmt(value)}`\n  </details>"
        )
    return f"- `{key}` = {_fmt(value)}"


def describe_normalization(vae, base: Dict[str, Any], statistics: Optional[LatentStatistics] = None) -> str:
    """
    Markdown for the model card: the normalization `vae` exports, the formula its pipeline applies, how it was
    obtained, and the base model's values (`base`, from `latent_normalization` before the update).
    """
    current = latent_normalization(vae)
    if is_flux2_vae(vae):
        p, q = statistics_patch_size(vae)
        formula = (
            f"`latents = (patchify(z) - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)` on the "
            f"{p}x{q}-patchified latents ({len(current['bn.running_mean'])} channels, `batch_norm_eps` = "
            f"{_fmt(current['batch_norm_eps'])}), as `Flux2Pipeline` does"
        )
        target = "mean 0 and variance 1 in every channel"
        keys = ["bn.running_mean", "bn.running_var"]
    else:
        keys = [k for k in AUTOENCODER_KL_KEYS if current[k] is not None or base.get(k) is not None]
        if current["latents_mean"] is not None and current["latents_std"] is not None:
            formula = "`latents = (z - latents_mean) * scaling_factor / latents_std`"
            target = "mean 0 and standard deviation `scaling_factor` (the base model's, kept) in every channel"
        elif current["shift_factor"] is not None:
            formula = "`latents = (z - shift_factor) * scaling_factor`"
            target = "mean 0 and standard deviation 1 over all channels and positions"
        else:
            formula = "`latents = z * scaling_factor`"
            target = "a mean square of 1 (no mean is subtracted)"
    current_lines = [_item(k, current[k]) for k in keys]
    if statistics is None:
        return "\n".join([
            f"A pipeline normalizes the latents as {formula}. These values are the base model's, copied unchanged "
            "(the run used `--no_recompute_latent_statistics`); fine-tuning moved the latents, so they may not "
            "match them:", "", *current_lines,
        ])  # fmt: skip
    return "\n".join([
        f"A pipeline normalizes the latents as {formula}. These values were recomputed after fine-tuning, over "
        f"{statistics.num_images} training images (the posterior mean of the final encoder), so that the "
        f"normalized latents have {target}:", "", *current_lines, "",
        "The base model's values, for reference:", "", *[_item(k, base.get(k)) for k in keys],
    ])  # fmt: skip
