"""Class-conditional DiT on cached VAE latents: what cache_latents.py, train_dit.py, sample_dit.py and bench_dit.py share.

The generation half of the paper's evaluation (Sec. 5, "DiT-B/2 trained with the LightningDiT recipe"):
presets mapping DiT-S/B/L/XL to diffusers' `DiTTransformer2DModel`, the latent normalization (per-channel
statistics or the VAE's `scaling_factor`/`shift_factor`), the sharded safetensors latent cache, the two
training objectives (DDPM epsilon with learned sigma, rectified flow with logit-normal timesteps), the
train step, and the export of a diffusers pipeline folder.

Latent normalization is one per-channel affine map everywhere: `normalized = (latents - mean) / std`.
  - `"channel"`: mean/std measured on the cached latents (LightningDiT's `latent_stats`).
  - `"vae"`: from the VAE's config with diffusers' conventions: SD3/Flux `(z - shift_factor) * scaling_factor`
    (mean = shift_factor, std = 1 / scaling_factor), or SDXL's `latents_mean`/`latents_std` when the config
    has them (mean = latents_mean, std = latents_std / scaling_factor).
"""

import copy
import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .training import optimizer_step


# --------------------------------------------------------------------------------------------
# Presets (DiT paper, Table 1); the table doubles as the scripts' `--preset` choices
# --------------------------------------------------------------------------------------------

DIT_PRESETS = {
    "DiT-S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2),  # hidden 384
    "DiT-B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),  # hidden 768
    "DiT-L/2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, patch_size=2),  # hidden 1024
    "DiT-XL/2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2),  # hidden 1152
}
OBJECTIVES = ("flow", "ddpm")
NORMALIZATIONS = ("channel", "vae")
# The stock DiTPipeline hard-codes the null (unconditional) class to 1000: a DDPM DiT always gets 1000
# class embeddings (+1 null row) whatever the dataset's class count, so that `DiTPipeline` guidance works.
STOCK_NULL_CLASS = 1000
NUM_TRAIN_TIMESTEPS = 1000  # DDPM steps; flow timesteps are sigma * 1000 (diffusers' FlowMatch convention)
DDPM_BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # DiT / ADM's linear schedule


def dit_config(
    preset: str,
    latent_channels: int,
    latent_size: int,
    objective: str = "flow",
    num_classes: int = STOCK_NULL_CLASS,
    overrides: Optional[dict] = None,
) -> dict:
    """
    The `DiTTransformer2DModel` config of a preset for latents `(latent_channels, latent_size, latent_size)`.

    DDPM: `out_channels = 2 * latent_channels` (epsilon + learned sigma, what `DiTPipeline` expects) and
    `num_embeds_ada_norm = 1000` (the stock null class). Flow: `out_channels = latent_channels` (velocity)
    and `num_embeds_ada_norm = num_classes` (the null class is `num_classes`). `overrides` (e.g.
    `{"num_layers": 2}` for tests) are applied last and validated like the rest.
    """
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {list(DIT_PRESETS)}.")
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
    config = dict(
        DIT_PRESETS[preset],
        in_channels=latent_channels,
        out_channels=2 * latent_channels if objective == "ddpm" else latent_channels,
        sample_size=latent_size,
        num_embeds_ada_norm=STOCK_NULL_CLASS if objective == "ddpm" else num_classes,
        norm_type="ada_norm_zero",
    )
    known = set(inspect.signature(DiTTransformer2DModel.__init__).parameters) - {"self"}
    unknown = set(overrides or {}) - known - {"_class_name"}
    if unknown:
        raise ValueError(f"unknown DiTTransformer2DModel config keys in the overrides: {sorted(unknown)}.")
    config.update(overrides or {})
    config.pop("_class_name", None)
    check_dit_config(config, latent_channels, latent_size, objective, num_classes)
    return config


def load_config_overrides(name: str, value: Optional[str]) -> dict:
    """A `--<name>` JSON object given inline or as a file path (None gives an empty dict)."""
    if value is None:
        return {}
    try:
        if os.path.isfile(value):
            with open(value) as f:
                loaded = json.load(f)
        else:
            loaded = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object or a JSON file, got {value!r}: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"--{name} must be a JSON object, got {type(loaded).__name__}.")
    return loaded


def check_dit_config(config: dict, latent_channels: int, latent_size: int, objective: str, num_classes: int) -> None:
    """Raises a ValueError naming the field when a DiT config cannot train on these latents with this objective."""
    if config["in_channels"] != latent_channels:
        raise ValueError(
            f"channel mismatch: the DiT's in_channels is {config['in_channels']} but the latents have "
            f"{latent_channels} channels (the VAE's latent_channels): they must be equal."
        )
    expected_out = 2 * latent_channels if objective == "ddpm" else latent_channels
    if config.get("out_channels") != expected_out:
        raise ValueError(
            f"the {objective} objective needs out_channels={expected_out} (latent_channels={latent_channels}"
            f"{', x2 for the learned sigma' if objective == 'ddpm' else ''}), got {config.get('out_channels')}."
        )
    if config["sample_size"] != latent_size:
        raise ValueError(f"the DiT's sample_size {config['sample_size']} differs from the latent size {latent_size}.")
    patch = config["patch_size"]
    if latent_size % patch:
        raise ValueError(
            f"the latent size {latent_size} is not divisible by the DiT patch size {patch}: choose a resolution "
            f"divisible by the VAE's downsampling factor times {patch}."
        )
    if objective == "ddpm" and config["num_embeds_ada_norm"] != STOCK_NULL_CLASS:
        raise ValueError(
            f"the ddpm objective needs num_embeds_ada_norm={STOCK_NULL_CLASS}: the stock DiTPipeline uses class "
            f"{STOCK_NULL_CLASS} as the null class for guidance; got {config['num_embeds_ada_norm']}."
        )
    if num_classes > config["num_embeds_ada_norm"]:
        raise ValueError(
            f"{num_classes} classes do not fit in num_embeds_ada_norm={config['num_embeds_ada_norm']} class embeddings."
        )


def disable_internal_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """
    Turns off the label dropout inside diffusers' DiT: every block owns a `LabelEmbedding` that, in train
    mode, drops labels independently of the other blocks. Training drops labels once, consistently, in
    `drop_class_labels` instead. The null-class embedding row (index `num_embeds_ada_norm`) is kept.
    """
    for module in transformer.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0


def drop_class_labels(class_labels: torch.Tensor, null_class: int, prob: float) -> torch.Tensor:
    """Replaces each label by `null_class` with probability `prob` (classifier-free guidance, Ho & Salimans 2022)."""
    if prob <= 0:
        return class_labels
    drop = torch.rand(class_labels.shape, device=class_labels.device) < prob
    return torch.where(drop, torch.full_like(class_labels, null_class), class_labels)


# --------------------------------------------------------------------------------------------
# Latent normalization: normalized = (latents - mean) / std, per channel
# --------------------------------------------------------------------------------------------


def vae_downsampling_factor(vae_config) -> int:
    """Spatial downsampling of an AutoencoderKL: 2 ** (number of blocks - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, vae_factor: int, patch_size: int) -> int:
    """The latent size for `resolution`; ValueError unless divisible by the VAE factor times the patch size."""
    multiple = vae_factor * patch_size
    if resolution < multiple or resolution % multiple:
        raise ValueError(
            f"--resolution {resolution} must be a multiple of the VAE's downsampling factor {vae_factor} times the "
            f"DiT patch size {patch_size} (= {multiple}); e.g. {max(multiple, multiple * round(resolution / multiple))}."
        )
    return resolution // vae_factor


def vae_latent_statistics(vae_config) -> Tuple[List[float], List[float]]:
    """Per-channel (mean, std) that diffusers' pipelines use for a VAE config (SDXL or SD3/Flux convention)."""
    channels = vae_config["latent_channels"]
    scaling = vae_config.get("scaling_factor") or 1.0
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:  # SDXL / Playground: (z - mean) * scaling / std
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"latents_mean/latents_std must have {channels} entries, got {len(mean)}/{len(std)}.")
        return [float(m) for m in mean], [float(s) / scaling for s in std]
    shift = vae_config.get("shift_factor") or 0.0  # SD3 / Flux: (z - shift) * scaling; SD-VAE has no shift
    return [float(shift)] * channels, [1.0 / scaling] * channels


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def normalize_latents(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """`(latents - mean) / std` per channel; `latents` is `(batch_size, latent_channels, height, width)`."""
    return ((latents.float() - _channel_view(mean, latents)) / _channel_view(std, latents)).to(latents.dtype)


def denormalize_latents(latents: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of `normalize_latents`: `latents * std + mean` per channel."""
    return (latents.float() * _channel_view(std, latents) + _channel_view(mean, latents)).to(latents.dtype)


def flow_pipeline_vae(vae: AutoencoderKL, mean: Sequence[float], std: Sequence[float]) -> AutoencoderKL:
    """
    The VAE of a flow pipeline folder: the same weights, with the normalization written into standard
    config keys so that `vae_latent_statistics(vae.config)` returns (mean, std): the VAE's own when they
    already match, else `latents_mean`/`latents_std` with `scaling_factor` 1 and no `shift_factor`.
    """
    current_mean, current_std = vae_latent_statistics(vae.config)
    if list(current_mean) == [float(m) for m in mean] and list(current_std) == [float(s) for s in std]:
        return vae
    vae = copy.deepcopy(vae)
    vae.register_to_config(
        latents_mean=[float(m) for m in mean], latents_std=[float(s) for s in std], scaling_factor=1.0, shift_factor=None
    )
    return vae


@torch.no_grad()
def fold_latent_normalization(vae: AutoencoderKL, mean: Sequence[float], std: Sequence[float]) -> AutoencoderKL:
    """
    A copy of `vae` whose `decode` takes normalized latents, for the stock `DiTPipeline` (which only divides
    by `scaling_factor` and ignores `shift_factor`): the de-normalization `z = z_n * std + mean` becomes a
    1x1 `post_quant_conv` (composed with the VAE's own when it has one: exact, a 1x1 conv has no border),
    `scaling_factor` 1 and no `shift_factor`. The encoder is untouched, so `encode` still returns raw latents.
    """
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    config.update(use_post_quant_conv=True, scaling_factor=1.0, shift_factor=None, latents_mean=None, latents_std=None)
    folded = AutoencoderKL.from_config(config).to(device=vae.device)
    if vae.dtype != folded.dtype:
        folded = folded.to(dtype=vae.dtype)
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("post_quant_conv.")}
    missing, unexpected = folded.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"post_quant_conv.weight", "post_quant_conv.bias"}:
        raise RuntimeError(f"unexpected state when folding the normalization: missing {missing}, unexpected {unexpected}")
    channels = vae.config.latent_channels
    scale = torch.as_tensor(std, dtype=torch.float64)
    shift = torch.as_tensor(mean, dtype=torch.float64)
    if vae.post_quant_conv is not None:  # W (z_n * std + mean) + b
        weight = vae.post_quant_conv.weight.double().view(channels, channels)
        bias = vae.post_quant_conv.bias.double()
    else:
        weight, bias = torch.eye(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    folded.post_quant_conv.weight.copy_((weight * scale[None, :]).view(channels, channels, 1, 1))
    folded.post_quant_conv.bias.copy_(weight @ shift + bias)
    return folded.eval()


# --------------------------------------------------------------------------------------------
# Latent cache: sharded safetensors, each shard holding (original, flipped) latent pairs
# --------------------------------------------------------------------------------------------

CACHE_CONFIG_NAME = "cache_config.json"  # what determines the content: compared on resume
CACHE_STATS_NAME = "latent_stats.json"  # written last: the cache is complete when it exists
SHARD_TEMPLATE = "latents-{index:05d}-of-{count:05d}.safetensors"
LATENT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_path(cache_dir: str, index: int, count: int) -> str:
    """Path of shard `index` of `count`."""
    return os.path.join(cache_dir, SHARD_TEMPLATE.format(index=index, count=count))


def write_latent_shard(path: str, latents: torch.Tensor, indices: torch.Tensor, class_labels=None) -> None:
    """
    Writes one shard atomically (temporary file, then rename). `latents`: `(n, 2, C, h, w)` with the
    horizontally flipped image's latent at `[:, 1]`; per-channel sums (float64) ride along for the statistics.
    """
    if latents.ndim != 5 or latents.shape[1] != 2:
        raise ValueError(f"`latents` must be (n, 2, C, h, w) (original, flipped), got {tuple(latents.shape)}.")
    as_double = latents.double()
    tensors = {
        "latents": latents.contiguous(),
        "indices": indices.long().contiguous(),
        "channel_sum": as_double.sum(dim=(0, 1, 3, 4)),
        "channel_sum_sq": (as_double**2).sum(dim=(0, 1, 3, 4)),
    }
    if class_labels is not None:
        tensors["class_labels"] = class_labels.long().contiguous()
    temporary = path + ".tmp"
    save_file(tensors, temporary)
    os.replace(temporary, path)


def latent_statistics_from_shards(paths: Sequence[str]) -> Tuple[List[float], List[float], int]:
    """Per-channel (mean, std) over every latent of every shard (original and flipped), and the latent count."""
    total = total_sq = None
    count = 0
    for path in paths:
        with safe_open(path, framework="pt") as f:
            channel_sum, channel_sum_sq = f.get_tensor("channel_sum"), f.get_tensor("channel_sum_sq")
            shape = f.get_slice("latents").get_shape()
        total = channel_sum if total is None else total + channel_sum
        total_sq = channel_sum_sq if total_sq is None else total_sq + channel_sum_sq
        count += shape[0] * shape[1] * shape[3] * shape[4]
    if count == 0:
        raise ValueError("no latents to compute statistics from.")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist(), count


class LatentDataset(torch.utils.data.Dataset):
    """
    Cached latents held in memory, served a whole batch at a time (`__getitems__`): one gather, no
    per-item Python. Each item is the original latent or its flipped copy, chosen at random.

    The choice for item i in epoch e is a function of (`seed`, e, i) alone (call `set_epoch` every epoch):
    no draw from the global random generator, so a resumed run, any number of processes and any data-loader
    workers and prefetching all serve the views an uninterrupted run serves. The epoch lives in shared memory,
    which persistent data-loader workers see too.

    Args:
        latents (`torch.Tensor`): `(num_samples, num_views, latent_channels, height, width)`, views = 1 or 2
            (original, horizontally flipped image).
        class_labels (`torch.Tensor`, *optional*): `(num_samples,)` int64.
        metadata (`dict`, *optional*): the cache's `latent_stats.json`.
        random_flip (`bool`, defaults to `True`): pick a random view per item (else always the original).
        seed (`int`, defaults to 0): seeds the views of every epoch.
    """

    def __init__(
        self, latents: torch.Tensor, class_labels=None, metadata: Optional[dict] = None, random_flip=True, seed: int = 0
    ):
        if latents.ndim != 5 or latents.shape[1] not in (1, 2):
            raise ValueError(f"`latents` must be (num_samples, 1 or 2 views, C, h, w), got {tuple(latents.shape)}.")
        if len(latents) == 0:
            raise ValueError("the latent dataset is empty.")
        if class_labels is not None and len(class_labels) != len(latents):
            raise ValueError(f"{len(class_labels)} class labels for {len(latents)} latents.")
        self.latents, self.class_labels = latents, class_labels
        self.metadata = dict(metadata or {})
        self.random_flip = random_flip and latents.shape[1] == 2
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._views = (None, None)  # (epoch, the epoch's view of every item)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose random views `__getitems__` serves."""
        self._epoch.fill_(int(epoch))

    def views(self, epoch: int) -> torch.Tensor:
        """The view (0: original, 1: flipped) of every item in `epoch`, `(num_samples,)` int64."""
        if self._views[0] != epoch:
            generator = torch.Generator().manual_seed(hash((self.seed, epoch)) % (2**63))
            self._views = (epoch, torch.randint(0, 2, (len(self.latents),), generator=generator))
        return self._views[1]

    @classmethod
    def from_cache(cls, cache_dir: str, random_flip: bool = True, seed: int = 0) -> "LatentDataset":
        """Loads every shard of a complete cache written by `examples/cache_latents.py` into memory."""
        if not os.path.isdir(cache_dir):
            raise ValueError(f"latent cache folder {cache_dir!r} does not exist: run examples/cache_latents.py first.")
        shards = sorted(n for n in os.listdir(cache_dir) if n.startswith("latents-") and n.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"latent cache folder {cache_dir!r} is empty (no latents-*.safetensors shards).")
        stats_path = os.path.join(cache_dir, CACHE_STATS_NAME)
        if not os.path.isfile(stats_path):
            raise ValueError(
                f"latent cache {cache_dir!r} is incomplete (no {CACHE_STATS_NAME}): re-run examples/cache_latents.py "
                f"with the same arguments to finish it."
            )
        with open(stats_path) as f:
            metadata = json.load(f)
        if len(shards) != metadata["num_shards"]:
            raise ValueError(f"latent cache {cache_dir!r} has {len(shards)} shards, {metadata['num_shards']} expected.")
        sizes = []
        for name in shards:
            with safe_open(os.path.join(cache_dir, name), framework="pt") as f:
                sizes.append(f.get_slice("latents").get_shape())
        total = sum(s[0] for s in sizes)
        latents = torch.empty((total, *sizes[0][1:]), dtype=LATENT_DTYPES[metadata["latent_dtype"]])
        labels = torch.empty(total, dtype=torch.long) if metadata["has_labels"] else None
        start = 0
        for name, size in zip(shards, sizes):
            shard = load_file(os.path.join(cache_dir, name))
            latents[start : start + size[0]] = shard["latents"]
            if labels is not None:
                labels[start : start + size[0]] = shard["class_labels"]
            start += size[0]
        return cls(latents, labels, metadata, random_flip, seed)

    @property
    def latent_channels(self) -> int:
        return self.latents.shape[2]

    @property
    def latent_size(self) -> int:
        return self.latents.shape[-1]

    @property
    def num_classes(self) -> int:
        if "num_classes" in self.metadata:
            return int(self.metadata["num_classes"])
        return int(self.class_labels.max()) + 1 if self.class_labels is not None else 0

    def __len__(self) -> int:
        return len(self.latents)

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.random_flip:
            view = self.views(int(self._epoch))[index]
        else:
            view = torch.zeros(len(index), dtype=torch.long)
        batch = {"latents": self.latents[index, view]}
        if self.class_labels is not None:
            batch["class_labels"] = self.class_labels[index]
        return batch

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _batch_collate(batch):
    return batch  # `__getitems__` already returns a collated batch


def latent_dataloader(
    dataset: LatentDataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, pin_memory=None, seed: int = 0
):
    """
    A DataLoader of whole batches gathered in one indexing op; `drop_last` so every step has `batch_size`. It has
    its own generator (seeded by `seed`): starting an epoch's iterator never draws from the global random
    generator, so a resumed run's model randomness continues exactly where the checkpoint left it.
    """
    if len(dataset) < batch_size:
        raise ValueError(f"{len(dataset)} cached latents make no full batch of {batch_size}: lower --train_batch_size.")
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=_batch_collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def ddpm_noise_scheduler() -> DDPMScheduler:
    """The training schedule of DiT/ADM: 1000 steps, linear betas 1e-4 -> 0.02, learned-range variance."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, variance_type="learned_range", clip_sample=False, **DDPM_BETAS
    )


def ddpm_inference_scheduler() -> DPMSolverMultistepScheduler:
    """The sampler saved in DDPM pipeline folders (DiTPipeline drops the sigma channels before stepping)."""
    return DPMSolverMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, **DDPM_BETAS)


def flow_inference_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The sampler saved in flow pipeline folders: Euler from sigma 1 (noise) to 0 (data), no shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


def flow_interpolate(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow path `x_sigma = (1 - sigma) * latents + sigma * noise` (sigma 0: data, 1: noise)."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_sigma / d sigma = noise - latents: what the flow DiT predicts (and FlowMatch schedulers integrate)."""
    return noise - latents


def sample_flow_sigmas(batch_size: int, device, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Logit-normal sigmas `sigmoid(N(logit_mean, logit_std))` (SD3, LightningDiT), via diffusers' helper."""
    from diffusers.training_utils import compute_density_for_timestep_sampling  # training-only imports stay lazy

    return compute_density_for_timestep_sampling(
        "logit_normal", batch_size, logit_mean=logit_mean, logit_std=logit_std, device=device
    )


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise (ADM's `normal_kl`)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of `x` in [-1, 1] under a Gaussian discretized into 256 bins (ADM; DiT applies it to latents)."""
    def cdf(v):  # tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiTTrainingLoss(torch.nn.Module):
    """
    The whole training forward of a class-conditional DiT, the module handed to `accelerator.prepare`
    (and to `torch.compile`): normalization, label dropout, noise, timesteps, the DiT, the loss.

    Args:
        transformer (`DiTTransformer2DModel`): trained in place; its internal label dropout is switched off.
        objective (`str`): `"flow"` (rectified flow, velocity target, logit-normal sigmas) or `"ddpm"`
            (epsilon MSE + the variational bound for the learned sigma, DiT/ADM's hybrid loss).
        latents_mean, latents_std (`Sequence[float]`): the per-channel normalization.
        class_dropout_prob (`float`, defaults to 0.1): label dropout for classifier-free guidance (DiT).
        logit_mean, logit_std (`float`): the logit-normal sigma distribution of the flow objective.
    """

    def __init__(
        self, transformer, objective, latents_mean, latents_std, class_dropout_prob=0.1, logit_mean=0.0, logit_std=1.0
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
        self.transformer, self.objective = transformer, objective
        self.null_class = transformer.config.num_embeds_ada_norm
        self.class_dropout_prob, self.logit_mean, self.logit_std = class_dropout_prob, logit_mean, logit_std
        disable_internal_label_dropout(transformer)
        channels = transformer.config.in_channels
        if len(latents_mean) != channels or len(latents_std) != channels:
            raise ValueError(f"latents_mean/latents_std need {channels} entries, got {len(latents_mean)}/{len(latents_std)}.")
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if objective == "ddpm":  # ADM's q(x_{t-1} | x_t, x_0) tables, computed in float64
            betas = ddpm_noise_scheduler().betas.double()
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
            tables = {
                "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
                "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
                "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
                "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
                "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
                "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
                "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
                "log_betas": torch.log(betas),
            }
            for name, table in tables.items():
                self.register_buffer(name, table.float(), persistent=False)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """`latents`: raw cached latents `(batch_size, C, h, w)`; `class_labels`: `(batch_size,)`. Returns the scalar loss."""
        latents = (latents.float() - self.latents_mean) / self.latents_std
        class_labels = drop_class_labels(class_labels, self.null_class, self.class_dropout_prob if self.training else 0.0)
        noise = torch.randn_like(latents)
        if self.objective == "flow":
            sigmas = sample_flow_sigmas(latents.shape[0], latents.device, self.logit_mean, self.logit_std)
            model_input = flow_interpolate(latents, noise, sigmas)
            prediction = self.transformer(model_input, timestep=sigmas * NUM_TRAIN_TIMESTEPS, class_labels=class_labels).sample
            return F.mse_loss(prediction.float(), flow_velocity_target(latents, noise))
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), device=latents.device)
        signal, noise_scale = self._at(self.sqrt_alphas_cumprod, timesteps), self._at(self.sqrt_one_minus_alphas_cumprod, timesteps)
        noisy = signal * latents + noise_scale * noise
        output = self.transformer(noisy, timestep=timesteps, class_labels=class_labels).sample.float()
        epsilon, variance_values = output.chunk(2, dim=1)
        mse = ((noise - epsilon) ** 2).mean(dim=(1, 2, 3))
        return (mse + self._variational_bound(latents, noisy, epsilon.detach(), variance_values, timesteps)).mean()

    @staticmethod
    def _at(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return table[timesteps].view(-1, 1, 1, 1)

    def _variational_bound(self, latents, noisy, frozen_epsilon, variance_values, timesteps) -> torch.Tensor:
        """ADM's `_vb_terms_bpd` with the mean frozen: trains only the interpolated log-variance (IDDPM eq. 15)."""
        min_log = self._at(self.posterior_log_variance_clipped, timesteps)
        max_log = self._at(self.log_betas, timesteps)
        fraction = (variance_values + 1.0) / 2.0
        model_log_variance = fraction * max_log + (1.0 - fraction) * min_log
        predicted_latents = self._at(self.sqrt_recip_alphas_cumprod, timesteps) * noisy - self._at(
            self.sqrt_recipm1_alphas_cumprod, timesteps
        ) * frozen_epsilon
        coef1, coef2 = self._at(self.posterior_mean_coef1, timesteps), self._at(self.posterior_mean_coef2, timesteps)
        model_mean = coef1 * predicted_latents + coef2 * noisy
        true_mean = coef1 * latents + coef2 * noisy
        kl = normal_kl(true_mean, min_log, model_mean, model_log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(latents, model_mean, 0.5 * model_log_variance).mean(dim=(1, 2, 3))
        return torch.where(timesteps == 0, nll / math.log(2.0), kl)


# --------------------------------------------------------------------------------------------
# The train step (shared by train_dit.py and bench_dit.py) and the EMA
# --------------------------------------------------------------------------------------------


@dataclass
class DiTStepOutput:
    """What `train_step` returns; tensors stay on the device (reading them is the caller's host sync)."""

    loss: torch.Tensor  # scalar, detached
    grad_norm: Optional[torch.Tensor]  # all-reduced; None while accumulating


def train_step(
    accelerator,
    model,
    optimizer,
    lr_scheduler,
    batch: Dict[str, torch.Tensor],
    parameters: Sequence[torch.nn.Parameter],
    guard,
    max_grad_norm: Optional[float] = None,
) -> DiTStepOutput:
    """
    One micro-batch of training: forward + backward of the prepared `DiTTrainingLoss`, then, on the last
    micro-batch of an accumulation, `training.optimizer_step` (clipping, a NaN/inf step skipped on the
    device by the fused optimizer, LR step). No host sync: call `guard.raise_if_exhausted` now and then.
    """
    grad_norm = None
    with accelerator.accumulate(model):
        loss = model(batch["latents"], batch["class_labels"])
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            clip = max_grad_norm if max_grad_norm is not None else math.inf  # inf: the norm only, for the guard
            grad_norm = optimizer_step(accelerator, optimizer, lr_scheduler, parameters, clip, guard)
    return DiTStepOutput(loss.detach(), grad_norm)


def create_ema(transformer: DiTTransformer2DModel, decay: float = 0.9999):
    """diffusers' EMAModel at a constant `decay` (DiT's 0.9999: no warm-up; the first update copies the weights)."""
    from diffusers.training_utils import EMAModel

    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the EMA decay must be in [0, 1), got {decay}.")
    return EMAModel(
        transformer.parameters(),
        decay=decay,
        min_decay=decay,
        model_cls=DiTTransformer2DModel,
        model_config=transformer.config,
        foreach=True,
    )


# --------------------------------------------------------------------------------------------
# Pipelines: stock DiTPipeline (DDPM) or DiTFlowPipeline (flow), one folder layout
# --------------------------------------------------------------------------------------------

NORMALIZATION_FILE = "latent_normalization.json"


def build_pipeline(
    transformer: DiTTransformer2DModel,
    vae: AutoencoderKL,
    objective: str,
    latents_mean: Sequence[float],
    latents_std: Sequence[float],
    id2label: Optional[Dict[int, str]] = None,
):
    """
    The pipeline a DiT trained on normalized latents samples with. DDPM: the stock `DiTPipeline` with the
    normalization folded into the VAE's decode (`fold_latent_normalization`). Flow: `DiTFlowPipeline` with
    the normalization in the VAE's config (`flow_pipeline_vae`). `vae` is the VAE the latents came from.
    """
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"channel mismatch: the VAE has {vae.config.latent_channels} latent channels, the DiT "
            f"{transformer.config.in_channels} in_channels."
        )
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
    if objective == "ddpm":
        from diffusers import DiTPipeline

        pipeline = DiTPipeline(transformer=transformer, vae=fold_latent_normalization(vae, latents_mean, latents_std),
                               scheduler=ddpm_inference_scheduler(), id2label=id2label or None)  # fmt: skip
    elif objective == "flow":
        from .pipelines import DiTFlowPipeline

        pipeline = DiTFlowPipeline(transformer=transformer, vae=flow_pipeline_vae(vae, latents_mean, latents_std),
                                   scheduler=flow_inference_scheduler(), id2label=id2label or None)  # fmt: skip
    else:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
    if id2label:  # saved in model_index.json and handed back to __init__ by from_pretrained
        pipeline.register_to_config(id2label={str(k): v for k, v in sorted(id2label.items())})
    return pipeline


def write_normalization_file(
    folder: str, objective: str, mode: str, latents_mean, latents_std, source_vae_config, pipeline_class=None
) -> None:
    """
    Records in the pipeline folder how latents were normalized (the VAE folder holds the working copy);
    `pipeline_class` names the flow pipeline that decodes with them (default `DiTFlowPipeline`).
    """
    info = {
        "objective": objective,
        "latent_normalization": mode,
        "latents_mean": list(latents_mean),
        "latents_std": list(latents_std),
        "source_vae_scaling_factor": source_vae_config.get("scaling_factor"),
        "source_vae_shift_factor": source_vae_config.get("shift_factor"),
        "vae_decode": "post_quant_conv de-normalizes (DiTPipeline)"
        if objective == "ddpm"
        else f"vae config ({pipeline_class or 'DiTFlowPipeline'})",
    }
    with open(os.path.join(folder, NORMALIZATION_FILE), "w") as f:
        json.dump(info, f, indent=2)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` where diffusers renamed `torch_dtype` (0.42 warns), else `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_dit_pipeline(folder: str, **kwargs):
    """Loads a pipeline folder with the class its model_index.json names (DiTPipeline or DiTFlowPipeline)."""
    with open(os.path.join(folder, "model_index.json")) as f:
        class_name = json.load(f)["_class_name"]
    if class_name == "DiTPipeline":
        from diffusers import DiTPipeline as pipeline_class
    elif class_name == "DiTFlowPipeline":
        from .pipelines import DiTFlowPipeline as pipeline_class
    else:
        raise ValueError(f"{folder!r} holds a {class_name}, not a DiTPipeline or DiTFlowPipeline.")
    return pipeline_class.from_pretrained(folder, **kwargs)


def pipeline_num_classes(pipeline) -> int:
    """How many classes a pipeline's DiT was trained on: the ids of its id2label, else its class-embedding count."""
    if getattr(pipeline, "labels", None):
        return max(pipeline.labels.values()) + 1
    return int(pipeline.transformer.config.num_embeds_ada_norm)
