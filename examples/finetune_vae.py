#!/usr/bin/env python
"""
Fine-tune a diffusers AutoencoderKL with Structured State-Space Regularization (arXiv 2604.11089).

    accelerate launch examples/finetune_vae.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-schnell --subfolder vae \
        --train_data_dir /path/to/images --output_dir flux-vae-ssreg

With no model and no data arguments it runs an offline demo: a small random-init Flux-architecture
VAE trained on real photographs shipped with scikit-image. The result is a stock `AutoencoderKL`
folder (`AutoencoderKL.from_pretrained(output_dir)`), the regularizer's state in `output_dir/ssreg`
and Accelerate checkpoints in `output_dir/checkpoint-*`.
"""

import argparse
import json
import math
import os
import shutil
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffusers_ssreg import REGULARIZER_SUBFOLDER, StateSpaceRegularizer
from diffusers_ssreg import data as ssreg_data
from diffusers_ssreg.config import add_config_arguments, config_from_args
from diffusers_ssreg.hub import push_folder
from diffusers_ssreg.training import (
    NonFiniteGuard,
    add_training_arguments,
    check_training_arguments,
    get_paper_scheduler,
    log_metrics,
    optimizer_step,
    resume_training,
    setup_accelerator,
    save_checkpoint,
    unwrap,
)
from diffusers_ssreg.finetune import (
    DEMO_FLAGS,
    compile_modules,
    DEMO_SSREG_DEFAULTS,
    FLUX_COMMAND,
    demo_vae,
    load_vae,
    validate_and_log,
    weights_checksum,
    write_vae_model_card,
)


logger = get_logger(__name__, log_level="INFO")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    # model
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="Hub id or folder of an AutoencoderKL.")
    parser.add_argument("--subfolder", type=str, default=None, help="Subfolder of the VAE, e.g. 'vae' in a pipeline repo.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None, help="Weight variant, e.g. 'fp16'.")
    parser.add_argument("--model_config_name_or_path", type=str, default=None, help="Start from this config, random init.")
    # data
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` name on the Hub or a local dataset.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_split", type=str, default="train")
    parser.add_argument("--validation_split", type=str, default=None, help="Split of --dataset_name for validation.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image feature).")
    parser.add_argument("--train_data_dir", type=str, default=None, help="Folder of images (recursive; jpg, png, webp).")
    parser.add_argument("--validation_data_dir", type=str, default=None, help="Folder of held-out validation images.")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--train_data_repeats", type=int, default=1,
                        help="Visit a small --train_data_dir this many times per epoch (each with fresh random crops).")
    parser.add_argument("--resolution", type=int, default=None, help="Training resolution (default 256; demo 64).")
    parser.add_argument("--center_crop", action="store_true", help="Center instead of random crops.")
    parser.add_argument("--random_resized_crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="Train on random crops covering MIN..MAX of each image's area, resized to --resolution "
                        "(many crops from few large photos) instead of resize + crop.")
    parser.add_argument("--no_random_flip", action="store_true", help="Disable random horizontal flips.")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--lr_warmup_start", type=float, default=1e-7, help="LR at step 0 of the warm-up.")
    parser.add_argument("--lr_min", type=float, default=1e-6, help="LR at the end of the cosine decay.")
    parser.add_argument("--lr_warmup_ratio", type=float, default=0.1)
    parser.add_argument("--lr_decay_ratio", type=float, default=0.5)
    parser.add_argument("--use_torch_compile", action="store_true", help="torch.compile the encoder, decoder, EMA target and LPIPS.")
    parser.add_argument("--activation_memory_budget", type=float, default=None,
                        help="With --use_torch_compile: fraction of activations kept for the backward (0, 1]; "
                        "lower recomputes more and saves memory.")
    parser.add_argument("--channels_last", action="store_true",
                        help="channels_last memory format (measured slower for the Flux VAE: docs/benchmarks.md).")
    # None = the real-run or demo default of DEMO_FLAGS; the paper's clipping norm
    add_training_arguments(parser, output_dir="ssreg-vae", train_batch_size=None, learning_rate=None, max_grad_norm=50.0)
    add_config_arguments(parser)

    args = parser.parse_args(input_args)
    args.demo = not any(
        [args.pretrained_model_name_or_path, args.model_config_name_or_path, args.dataset_name, args.train_data_dir]
    )
    for name, (default, demo_default) in DEMO_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, demo_default if args.demo else default)

    # --- cross-argument checks: fail before any work ---
    if args.pretrained_model_name_or_path and args.model_config_name_or_path:
        raise ValueError("give either --pretrained_model_name_or_path or --model_config_name_or_path, not both.")
    if args.dataset_name and args.train_data_dir:
        raise ValueError("give either --dataset_name or --train_data_dir, not both.")
    if not args.demo and not (args.dataset_name or args.train_data_dir):
        raise ValueError("a model was given but no data: pass --train_data_dir or --dataset_name (or neither, for the demo).")
    if args.validation_split and not args.dataset_name:
        raise ValueError("--validation_split needs --dataset_name.")
    check_training_arguments(args, positive=("resolution", "num_train_epochs", "train_data_repeats"))
    if args.random_resized_crop_scale is not None:
        low, high = args.random_resized_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"--random_resized_crop_scale needs 0 < MIN <= MAX <= 1, got {low} {high}.")
        if args.center_crop:
            raise ValueError("--random_resized_crop_scale and --center_crop exclude each other.")
    args.ssreg_config = config_from_args(args, defaults=DEMO_SSREG_DEFAULTS if args.demo else None)
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def build_datasets(args):
    """The training dataset and the fixed validation batch `(N, 3, R, R)`."""
    flip = not args.no_random_flip
    if args.demo:
        train_transform = ssreg_data.random_scale_crop_transform(args.resolution, random_flip=flip)
        photos = ssreg_data.embedded_photos("train")
        train = ssreg_data.ImageDataset(photos, train_transform, length=64 * len(photos), seed=args.seed)
        per_image = max(1, math.ceil(args.num_validation_images / len(ssreg_data.EMBEDDED_VALIDATION_PHOTOS)))
        validation = ssreg_data.fixed_crops(ssreg_data.embedded_photos("validation"), args.resolution, per_image, args.seed)
        return train, validation[: args.num_validation_images], "the offline demo's scikit-image photographs"

    if args.random_resized_crop_scale:
        train_transform = ssreg_data.random_scale_crop_transform(args.resolution, tuple(args.random_resized_crop_scale), flip)
    else:
        train_transform = ssreg_data.image_transform(args.resolution, args.center_crop, flip)
    eval_transform = ssreg_data.image_transform(args.resolution, center_crop=True, random_flip=False)
    if args.train_data_dir:
        train = ssreg_data.folder_image_dataset(args.train_data_dir, train_transform, seed=args.seed)
        train.length = len(train.items) * args.train_data_repeats
        description = f"images from `{os.path.basename(os.path.normpath(args.train_data_dir))}`"
    else:
        train = ssreg_data.hub_image_dataset(
            args.dataset_name, train_transform, args.train_split, args.dataset_config_name, args.image_column,
            cache_dir=args.cache_dir, max_samples=args.max_train_samples, seed=args.seed,
        )  # fmt: skip
        description = f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name}) ({args.train_split})"
    if args.validation_data_dir:
        held_out = ssreg_data.folder_image_dataset(args.validation_data_dir, eval_transform)
    elif args.validation_split:
        held_out = ssreg_data.hub_image_dataset(
            args.dataset_name, eval_transform, args.validation_split, args.dataset_config_name, args.image_column,
            cache_dir=args.cache_dir, max_samples=args.num_validation_images, seed=args.seed,
        )  # fmt: skip
    else:  # hold out the first images of the training data
        count = args.num_validation_images
        if len(train.items) <= count:
            raise ValueError(f"the training data has {len(train.items)} images, too few to hold out {count} for validation.")
        held_items = train.items.select(range(count)) if hasattr(train.items, "select") else train.items[:count]
        train.items = train.items.select(range(count, len(train.items))) if hasattr(train.items, "select") else train.items[count:]
        train.length = len(train.items) * (args.train_data_repeats if args.train_data_dir else 1)
        held_out = ssreg_data.ImageDataset(held_items, eval_transform, load=train.load)
        logger.info(f"No validation data given: holding out the first {count} training images.")
    validation = torch.stack([held_out[i]["pixel_values"] for i in range(min(len(held_out), args.num_validation_images))])
    return train, validation, description


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main(args):
    accelerator, logging_dir = setup_accelerator(args)  # seeds are rank-specific: ranks draw their own branches
    if args.demo:
        logger.info(
            "No model and no data given: running the OFFLINE DEMO (a small random-init Flux-architecture VAE on "
            "scikit-image's sample photos). To fine-tune the real Flux VAE:\n  " + FLUX_COMMAND
        )

    # --- model and regularizer: every input error surfaces here, before training ---
    vae = demo_vae() if args.demo else load_vae(args)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {factor}.")
    regularizer = StateSpaceRegularizer(vae, args.ssreg_config)
    regularizer.validate_inputs = False  # the data pipeline guarantees [-1, 1]; avoids a host sync per step
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.channels_last:
        regularizer.to(memory_format=torch.channels_last)
    if args.use_torch_compile:
        compile_modules(regularizer, args.activation_memory_budget)
    train_dataset, validation_batch, data_description = build_datasets(args)

    if accelerator.is_main_process:
        os.makedirs(logging_dir, exist_ok=True)

    # --- checkpoints hold save_pretrained folders, not raw state dicts (diffusers' convention) ---
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                reg = unwrap(accelerator, model)
                reg.vae.save_pretrained(os.path.join(output_dir, "vae"))
                reg.save_pretrained(os.path.join(output_dir, REGULARIZER_SUBFOLDER))
                if weights:
                    weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            reg = unwrap(accelerator, models.pop())
            loaded = AutoencoderKL.from_pretrained(input_dir, subfolder="vae")
            reg.vae.load_state_dict(loaded.state_dict())  # in place: the optimizer keeps its parameters
            reg.load_regularizer_state(os.path.join(input_dir, REGULARIZER_SUBFOLDER))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(
        regularizer.parameter_groups(args.learning_rate),
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=True,  # also lets a NaN/inf step be skipped on the device (training.optimizer_step)
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=ssreg_data.collate_examples,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch's iterator never draws from the global RNG, so a
        # resumed run's model randomness continues exactly where the checkpoint left it.
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(train_dataloader) == 0:
        raise ValueError(f"{len(train_dataset)} training images make no full batch of {args.train_batch_size}.")
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    # Accelerate steps the scheduler once per process per update: count in those units (as diffusers does).
    lr_scheduler = get_paper_scheduler(
        optimizer, args.max_train_steps * accelerator.num_processes, args.learning_rate,
        warmup_start_lr=args.lr_warmup_start, min_lr=args.lr_min,
        warmup_ratio=args.lr_warmup_ratio, decay_ratio=args.lr_decay_ratio,
    )  # fmt: skip
    regularizer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        regularizer, optimizer, train_dataloader, lr_scheduler
    )
    raw = unwrap(accelerator, regularizer)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    validation_steps = args.validation_steps or max(1, args.max_train_steps // 10)

    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        tracker_config.update({f"ssreg/{k}": str(v) for k, v in args.ssreg_config.to_dict().items()})
        accelerator.init_trackers("finetune_vae_ssreg", config=tracker_config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}; validation images = {len(validation_batch)}")
    logger.info(f"  Epochs = {num_epochs}; total batch size = {total_batch}; optimization steps = {args.max_train_steps}")
    logger.info(f"  Trainable VAE params = {sum(p.numel() for p in raw.parameter_groups(1.0)[0]['params']):,}")
    logger.info(f"  SSReg: {args.ssreg_config}")

    global_step, first_epoch, skip_batches = resume_training(
        accelerator, args.output_dir, args.resume_from_checkpoint, updates_per_epoch, args.gradient_accumulation_steps
    )

    guard = NonFiniteGuard(args.max_nonfinite_steps)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    sums, count, last_log_time = None, 0, time.perf_counter()
    try:
        for epoch in range(first_epoch, num_epochs):
            regularizer.train()
            train_dataset.set_epoch(epoch)
            train_dataloader.set_epoch(epoch)
            loader = train_dataloader
            if epoch == first_epoch and skip_batches:
                loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            for batch in loader:
                if global_step >= args.max_train_steps:  # resumed from the final checkpoint: nothing left
                    break
                with accelerator.accumulate(regularizer):
                    pixel_values = batch["pixel_values"]
                    if args.channels_last:
                        pixel_values = pixel_values.to(memory_format=torch.channels_last)
                    output = regularizer(pixel_values)
                    accelerator.backward(output.loss)
                    if accelerator.sync_gradients:
                        grad_norm = optimizer_step(
                            accelerator, optimizer, lr_scheduler, trainable, args.max_grad_norm, guard
                        )
                scalars = output.scalars()
                sums = scalars if sums is None else {k: sums[k] + v for k, v in scalars.items()}
                count += 1
                if not accelerator.sync_gradients:
                    continue
                raw.update_ema()
                global_step += 1
                progress.update(1)

                if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                    guard.raise_if_exhausted(global_step)  # the one host sync of a logging step
                    means = {k: (v / count).item() for k, v in accelerator.reduce(sums, reduction="mean").items()}
                    means["lr"] = lr_scheduler.get_last_lr()[0]
                    means["grad_norm"] = float(grad_norm)
                    if torch.cuda.is_available():
                        means["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    means["img_per_s"] = count * args.train_batch_size * accelerator.num_processes / (
                        time.perf_counter() - last_log_time
                    )
                    log_metrics(accelerator, logging_dir, global_step, means)
                    progress.set_postfix(loss=f"{means['loss']:.4f}", latent=f"{means['latent_mse']:.4f}", lr=f"{means['lr']:.2e}")
                    sums, count, last_log_time = None, 0, time.perf_counter()
                if global_step % args.checkpointing_steps == 0:
                    guard.raise_if_exhausted(global_step)
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                last = global_step >= args.max_train_steps  # the final validation runs after the loop
                if accelerator.is_main_process and not last and (global_step % validation_steps == 0 or global_step == 1):
                    validate_and_log(raw, validation_batch, accelerator, global_step, args.output_dir)
                if last:
                    break
    except KeyboardInterrupt:
        logger.warning(
            f"Interrupted at step {global_step}. Checkpoints already saved are complete; resume with "
            f"--resume_from_checkpoint latest."
        )
        accelerator.end_training()
        raise

    # --- the result: a stock AutoencoderKL folder, the regularizer beside it, a model card ---
    accelerator.wait_for_everyone()
    guard.raise_if_exhausted(global_step)
    if global_step % args.checkpointing_steps:
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
    checksums = gather_object([weights_checksum(raw.vae)])  # every rank must hold the same weights
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "rank_checksums.json"), "w") as f:
            json.dump(checksums, f)
        if len(set(checksums)) > 1:
            raise RuntimeError(f"ranks ended with different weights: {checksums}")
    if accelerator.is_main_process:
        metrics = validate_and_log(raw, validation_batch, accelerator, global_step, args.output_dir)
        vae = raw.unwrap()
        export_tmp = os.path.join(args.output_dir, ".export.tmp")
        shutil.rmtree(export_tmp, ignore_errors=True)
        vae.save_pretrained(export_tmp)  # written aside, then moved in: never a half-written VAE in output_dir
        for name in os.listdir(export_tmp):
            os.replace(os.path.join(export_tmp, name), os.path.join(args.output_dir, name))
        os.rmdir(export_tmp)
        raw.save_pretrained(os.path.join(args.output_dir, REGULARIZER_SUBFOLDER))
        write_vae_model_card(args, raw, metrics, data_description, total_batch, accelerator)
        logger.info(f"Saved the fine-tuned VAE to {args.output_dir} (load it with AutoencoderKL.from_pretrained).")
        if args.push_to_hub:
            repo_id = push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
            logger.info(f"Pushed to https://huggingface.co/{repo_id}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
