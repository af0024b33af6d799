#!/usr/bin/env python
"""
Encode an image dataset with a VAE into sharded safetensors latents for DiT training.

    accelerate launch examples/cache_latents.py \
        --pretrained_vae_model_name_or_path flux-vae-ssreg \
        --train_data_dir /data/imagenet/train --resolution 256 --output_dir latents/flux-ssreg-256

Each image is centre-cropped to `--resolution` and encoded twice, as is and flipped horizontally; a
shard holds `latents` `(n, 2, C, h, w)` (original, flipped), `class_labels` `(n,)` and the dataset
`indices`. `latent_stats.json`, written last, holds the per-channel latent mean/std, the class names
and everything train_dit.py needs. Shards already on disk are skipped: re-running the same command
resumes. With several processes (`accelerate launch --num_processes N`), shard k goes to process k mod N.
"""

import argparse
import json
import logging
import math
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_ssreg import data as ssreg_data
from diffusers_ssreg.dit import (
    CACHE_CONFIG_NAME,
    CACHE_STATS_NAME,
    LATENT_DTYPES,
    check_resolution,
    dtype_kwargs,
    latent_statistics_from_shards,
    shard_path,
    vae_downsampling_factor,
    write_latent_shard,
)
from diffusers_ssreg.images import extensions_text
from diffusers_ssreg.training import HelpFormatter, add_deprecated_alias
from diffusers_ssreg.vae import SUPPORTED_VAE_CLASSES, load_vae, load_vae_config


logger = get_logger(__name__, log_level="INFO")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0], formatter_class=HelpFormatter)
    # VAE
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, required=True,
                        help="VAE folder or Hub id: an AutoencoderKL or an AutoencoderKLFlux2 (raw latents are cached).")
    parser.add_argument("--vae_subfolder", type=str, default=None, help="Subfolder of the VAE, e.g. 'vae' in a pipeline repo.")
    parser.add_argument("--revision", type=str, default=None, help="Hub revision of the VAE.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant, e.g. 'fp16'.")
    # data
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help=f"Image folder, one subfolder per class, searched recursively; files read: {extensions_text()} "
                        "(transparent pixels over white, EXIF orientation applied, the first frame of animated ones).")
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` name on the Hub or a local dataset.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    parser.add_argument("--split", type=str, default="train", help="Split of --dataset_name.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image feature).")
    parser.add_argument("--label_column", type=str, default="label", help="Class label column of --dataset_name.")
    parser.add_argument("--no_labels", action="store_true", help="Cache without class labels (unconditional data).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Encode at most N images, drawn at random (seeded).")
    parser.add_argument("--cache_dir", type=str, default=None, help="`datasets` download cache of --dataset_name.")
    parser.add_argument("--resolution", type=int, default=256, help="Images are resized (short side) and centre-cropped to this.")
    parser.add_argument("--patch_size", type=int, default=2, help="DiT patch size the latent size must be divisible by.")
    # encoding
    parser.add_argument("--output_dir", type=str, required=True, help="The latent cache folder.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per encoder call (x2 with the flipped copies).")
    parser.add_argument("--shard_size", type=int, default=2048, help="Images per shard.")
    parser.add_argument("--posterior", type=str, default="mode", choices=["mode", "sample"],
                        help="Cache the posterior mean or a sample.")
    parser.add_argument("--latent_dtype", type=str, default="float16", choices=sorted(LATENT_DTYPES))
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="VAE weight dtype.")
    parser.add_argument("--dataloader_num_workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the posterior samples (per shard).")
    add_deprecated_alias(parser, "--max_samples", "--max_train_samples")

    args = parser.parse_args(input_args)
    if os.path.isdir(args.pretrained_vae_model_name_or_path):  # recorded in the cache: train_dit.py may run elsewhere
        args.pretrained_vae_model_name_or_path = os.path.abspath(args.pretrained_vae_model_name_or_path)
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise ValueError("give exactly one of --train_data_dir (an image folder) or --dataset_name.")
    for name in ("resolution", "patch_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be >= 1, got {args.max_train_samples}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def build_dataset(args, log_summary=True):
    """The image dataset (centre crops, no random flip), its class names {label: name}, and a description."""
    transform = ssreg_data.image_transform(args.resolution, center_crop=True, random_flip=False)
    with_labels = not args.no_labels
    if args.train_data_dir:
        try:
            dataset = ssreg_data.folder_image_dataset(
                args.train_data_dir, transform, with_labels=with_labels, name="--train_data_dir", log_summary=log_summary
            )
        except ValueError as error:
            if with_labels and "class subfolders" in str(error):
                raise ValueError(f"{error} (or pass --no_labels to cache unlabeled latents).") from error
            raise
        id2label = {}
        if with_labels:  # the same sorted subfolder names folder_image_dataset numbered
            for path, label in zip(dataset.items, dataset.labels):
                id2label[int(label)] = os.path.relpath(path, args.train_data_dir).split(os.sep)[0]
        dataset = dataset.random_subset(args.max_train_samples, args.seed)
        description = f"images from `{os.path.basename(os.path.normpath(args.train_data_dir))}`"
        return dataset, id2label, description

    dataset = ssreg_data.hub_image_dataset(
        args.dataset_name, transform, args.split, args.dataset_config_name, args.image_column,
        label_column=None if args.no_labels else args.label_column, cache_dir=args.cache_dir,
        max_samples=args.max_train_samples, seed=args.seed,
    )  # fmt: skip
    id2label = {}
    if with_labels:  # a ClassLabel column carries its names; else the labels are named by their index
        features = getattr(dataset.items, "features", None) or {}
        names = getattr(features.get(args.label_column), "names", None)
        count = len(names) if names else max(int(label) for label in dataset.labels) + 1
        id2label = {i: names[i] if names else str(i) for i in range(count)}
    if os.path.isdir(args.dataset_name):
        description = f"the local dataset `{os.path.basename(os.path.normpath(args.dataset_name))}` ({args.split})"
    else:
        description = f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name}) ({args.split})"
    return dataset, id2label, description


def check_or_write_cache_config(args, num_samples: int, accelerator) -> dict:
    """Writes what determines the cache's content; on a resume, refuses to mix different settings."""
    config = {
        "vae": args.pretrained_vae_model_name_or_path, "vae_subfolder": args.vae_subfolder, "revision": args.revision,
        "variant": args.variant, "train_data_dir": args.train_data_dir, "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name, "split": args.split, "image_column": args.image_column,
        "label_column": None if args.no_labels else (args.label_column if args.dataset_name else "subfolder"),
        "max_samples": args.max_train_samples, "resolution": args.resolution, "num_samples": num_samples,
        "shard_size": args.shard_size, "posterior": args.posterior, "latent_dtype": args.latent_dtype, "seed": args.seed,
    }  # fmt: skip
    path = os.path.join(args.output_dir, CACHE_CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
        different = {k: (existing.get(k), v) for k, v in config.items() if existing.get(k) != v}
        if different:
            raise ValueError(
                f"{args.output_dir!r} already holds a latent cache made with other settings {different} "
                f"(existing, requested): use another --output_dir or delete it."
            )
    elif accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    accelerator.wait_for_everyone()
    return config


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_shard(vae, dataset, indices, args, accelerator, generator, progress):
    """Latents `(n, 2, C, h, w)` (original, flipped) and labels of the images at `indices`."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=args.batch_size,
        num_workers=args.dataloader_num_workers,
        collate_fn=ssreg_data.collate_examples,
    )
    latents, labels = [], []
    for batch in loader:
        pixel_values = batch["pixel_values"].to(accelerator.device, dtype=vae.dtype)
        posterior = vae.encode(torch.cat([pixel_values, pixel_values.flip(-1)])).latent_dist
        z = posterior.mode() if args.posterior == "mode" else posterior.sample(generator=generator)
        original, flipped = z.float().chunk(2)
        latents.append(torch.stack([original, flipped], dim=1).to("cpu", LATENT_DTYPES[args.latent_dtype]))
        if "class_labels" in batch:
            labels.append(batch["class_labels"])
        progress.update(len(pixel_values))
    return torch.cat(latents), (torch.cat(labels) if labels else None)


def check_vae(args):
    """The VAE's config (its class checked) and the latent size; ValueError when --resolution doesn't fit the VAE and the DiT patch."""
    vae_config = load_vae_config(
        args.pretrained_vae_model_name_or_path, args.vae_subfolder, args.revision, flag="--pretrained_vae_model_name_or_path",
        classes=SUPPORTED_VAE_CLASSES,
    )
    return vae_config, check_resolution(args.resolution, vae_downsampling_factor(vae_config), args.patch_size)


def main(args):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # --- every input error surfaces here, before any encoding ---
    vae_config, latent_size = check_vae(args)
    vae_factor = vae_downsampling_factor(vae_config)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    dataset, id2label, description = build_dataset(args, log_summary=accelerator.is_main_process)
    num_samples = len(dataset)
    logger.info(accelerator.state, main_process_only=False)
    num_shards = math.ceil(num_samples / args.shard_size)
    check_or_write_cache_config(args, num_samples, accelerator)

    shards = range(accelerator.process_index, num_shards, accelerator.num_processes)
    todo = [k for k in shards if not os.path.isfile(shard_path(args.output_dir, k, num_shards))]
    logger.info(
        f"{num_samples} images -> {num_shards} shards of {args.shard_size} at {args.resolution}px "
        f"(latents {vae_config['latent_channels']}x{latent_size}x{latent_size}); this process: {len(todo)} to encode, "
        f"{len(shards) - len(todo)} already done.", main_process_only=False,
    )  # fmt: skip

    if todo:
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        vae = load_vae(
            args.pretrained_vae_model_name_or_path, args.vae_subfolder, args.revision, args.variant,
            flag="--pretrained_vae_model_name_or_path", **dtype_kwargs(weight_dtype),
        ).to(accelerator.device).eval()  # fmt: skip
        vae.requires_grad_(False)
        total = sum(min(args.shard_size, num_samples - k * args.shard_size) for k in todo)
        progress = tqdm(total=total, desc="Encoding", unit="img", disable=not accelerator.is_local_main_process)
        for k in todo:
            indices = list(range(k * args.shard_size, min(num_samples, (k + 1) * args.shard_size)))
            generator = torch.Generator(accelerator.device).manual_seed(args.seed * 1_000_003 + k)
            latents, labels = encode_shard(vae, dataset, indices, args, accelerator, generator, progress)
            write_latent_shard(shard_path(args.output_dir, k, num_shards), latents, torch.tensor(indices), labels)
        progress.close()
        skipped = getattr(dataset, "num_skipped", 0)
        if skipped:
            logger.warning(f"{skipped} unreadable images were replaced by a readable neighbour.", main_process_only=False)

    # --- the statistics, written last: their presence marks a complete cache ---
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        paths = [shard_path(args.output_dir, k, num_shards) for k in range(num_shards)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise RuntimeError(f"{len(missing)} shards are missing after encoding, e.g. {missing[0]}: re-run to finish.")
        mean, std, count = latent_statistics_from_shards(paths)
        stats = {
            "num_samples": num_samples, "num_shards": num_shards, "latent_channels": vae_config["latent_channels"],
            "latent_size": latent_size, "resolution": args.resolution, "vae_downsampling_factor": vae_factor,
            "latent_dtype": args.latent_dtype, "posterior": args.posterior, "has_labels": not args.no_labels,
            "num_classes": (max(id2label) + 1) if id2label else 0, "id2label": {str(k): v for k, v in sorted(id2label.items())},
            "latents_mean": mean, "latents_std": std, "statistics_count": count,
            "vae": args.pretrained_vae_model_name_or_path, "vae_subfolder": args.vae_subfolder, "revision": args.revision,
            "scaling_factor": vae_config.get("scaling_factor"), "shift_factor": vae_config.get("shift_factor"),
            "dataset_description": description, "dataset_name": args.dataset_name,
        }  # fmt: skip
        temporary = os.path.join(args.output_dir, CACHE_STATS_NAME + ".tmp")
        with open(temporary, "w") as f:
            json.dump(stats, f, indent=2)
        os.replace(temporary, os.path.join(args.output_dir, CACHE_STATS_NAME))
        logger.info(
            f"Latent cache complete in {args.output_dir}: {num_samples} images, {stats['num_classes']} classes; "
            f"per-channel mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}."
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
