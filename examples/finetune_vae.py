#!/usr/bin/env python
"""
Fine-tune a diffusers AutoencoderKL or AutoencoderKLFlux2 with SSReg (arXiv 2604.11089) or another latent regularizer.

    accelerate launch examples/finetune_vae.py \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-schnell --vae_subfolder vae \
        --train_data_dir /path/to/images --output_dir flux-vae-ssreg

`--regularizer {ssreg,eqvae,scale_equivariance,spectrum_matching,none}` picks the method (default ssreg;
none is plain reconstruction fine-tuning); each method's fields are flags with its own prefix
(`--ssreg_*`, `--eqvae_*`, `--se_*`, `--sm_*`, `--plain_*`; docs/method.md). With no model and no data
arguments it runs an offline demo: a small random-init Flux-architecture VAE trained on real
photographs shipped with scikit-image. The result is a stock VAE folder of the base model's class
(`AutoencoderKL.from_pretrained(output_dir)`) whose latent normalization is recomputed for the new
latents (`--recompute_latent_statistics`), the regularizer's config and state in a subfolder named
after the method (`output_dir/ssreg`, `output_dir/eqvae`, ...) and Accelerate checkpoints in
`output_dir/checkpoint-*`.
"""

import argparse
import json
import math
import os
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from diffusers_ssreg import data as ssreg_data
from diffusers_ssreg.finetune import (
    DEMO_FLAGS,
    DEMO_REGULARIZER_DEFAULTS,
    check_checkpoint_regularizer,
    compile_modules,
    default_output_dir,
    demo_description,
    demo_vae,
    load_vae,
    validate_and_log,
    weights_checksum,
    write_vae_model_card,
)
from diffusers_ssreg.images import extensions_text
from diffusers_ssreg.latent_statistics import (
    apply_latent_statistics,
    estimate_latent_statistics,
    format_normalization,
    latent_normalization,
)
from diffusers_ssreg.regularizers import (
    add_regularizer_arguments,
    build_regularizer,
    get_regularizer_spec,
    regularizer_config_from_args,
)
from diffusers_ssreg.speedups import SPEEDUPS, parse_speedups
from diffusers_ssreg.training import (
    HelpFormatter,
    TrainingLoop,
    add_deprecated_alias,
    add_training_arguments,
    check_training_arguments,
    get_paper_scheduler,
    optimizer_step,
    resolve_resume_checkpoint,
    setup_accelerator,
    unwrap,
)


logger = get_logger(__name__, log_level="INFO")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=demo_description(), formatter_class=HelpFormatter
    )
    # model
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="Hub id or folder of the VAE: an AutoencoderKL or an AutoencoderKLFlux2.")
    parser.add_argument("--vae_subfolder", type=str, default=None, help="Subfolder of the VAE, e.g. 'vae' in a pipeline repo.")
    parser.add_argument("--revision", type=str, default=None, help="Hub revision of the model.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant, e.g. 'fp16'.")
    parser.add_argument("--model_config_name_or_path", type=str, default=None, help="Start from this config, random init.")
    # data
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` name on the Hub or a local dataset.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    parser.add_argument("--train_split", type=str, default="train", help="Split of --dataset_name to train on.")
    parser.add_argument("--validation_split", type=str, default=None, help="Split of --dataset_name for validation.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image feature).")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help=f"Folder of images, searched recursively; files read: {extensions_text()} (transparent "
                        "pixels over white, EXIF orientation applied, the first frame of animated ones).")
    parser.add_argument("--validation_data_dir", type=str, default=None,
                        help="Folder of held-out validation images (default: the first training images are held out).")
    parser.add_argument("--cache_dir", type=str, default=None, help="`datasets` download cache of --dataset_name.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Train on at most N images, drawn at random (seeded).")
    parser.add_argument("--train_data_repeats", type=int, default=1,
                        help="Visit a small --train_data_dir this many times per epoch (each with fresh random crops).")
    parser.add_argument("--resolution", type=int, default=None, help="Training resolution.")
    parser.add_argument("--center_crop", action="store_true", help="Center instead of random crops.")
    parser.add_argument("--random_resized_crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="Train on random crops covering MIN..MAX of each image's area, resized to --resolution "
                        "(many crops from few large photos) instead of resize + crop.")
    parser.add_argument("--no_random_flip", action="store_true", help="Disable random horizontal flips.")
    parser.add_argument("--num_train_epochs", type=int, default=1, help="Epochs to train when --max_train_steps is not given.")
    parser.add_argument("--lr_warmup_start", type=float, default=1e-7, help="LR at step 0 of the warm-up.")
    parser.add_argument("--lr_min", type=float, default=1e-6, help="LR at the end of the cosine decay.")
    parser.add_argument("--lr_warmup_ratio", type=float, default=0.1, help="Fraction of the steps spent warming up.")
    parser.add_argument("--lr_decay_ratio", type=float, default=0.5, help="Fraction of the steps spent in the cosine decay.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder, decoder, LPIPS and SSReg's EMA target.")
    parser.add_argument("--activation_memory_budget", type=float, default=None,
                        help="With --compile: fraction of activations kept for the backward (0, 1]; "
                        "lower recomputes more and saves memory.")
    parser.add_argument("--compile_speedups", type=parse_speedups, default=",".join(SPEEDUPS),
                        help="With --compile: the diffusers blocks swapped for faster equivalents while training "
                        f"(comma-separated, of {', '.join(SPEEDUPS)}; 'none' for the stock blocks; the saved model is "
                        "stock either way; docs/benchmarks.md). (default: %(default)s)")
    parser.add_argument("--recompute_latent_statistics", action="store_true", default=True,
                        help="At the end, estimate the latent normalization (scaling_factor/shift_factor, latents_mean/"
                        "latents_std, or the FLUX.2 VAE's BatchNorm statistics) over the training data with the final "
                        "weights and write it into the exported config (docs/finetune.md). (default: on)")
    parser.add_argument("--no_recompute_latent_statistics", dest="recompute_latent_statistics", action="store_false",
                        help="Export the base model's latent normalization unchanged. (default: off)")
    parser.add_argument("--latent_statistics_batches", type=int, default=None,
                        help="Batches of --train_batch_size training images per process for the latent statistics.")
    parser.add_argument("--channels_last", action="store_true",
                        help="channels_last memory format. Not needed with --compile: the compiled graphs run their "
                        "convolutions channels-last already (docs/benchmarks.md).")
    # None = the real-run or demo default of DEMO_FLAGS (the help texts state both); the paper's clipping norm
    add_training_arguments(parser, output_dir=None, train_batch_size=None, learning_rate=None, max_grad_norm=50.0)
    for name, (default, demo) in DEMO_FLAGS.items():
        action = next(a for a in parser._actions if a.dest == name)
        action.help = f"{action.help or ''} (default: {default or '--num_train_epochs epochs'}; the offline demo: {demo})".strip()
    next(a for a in parser._actions if a.dest == "output_dir").help += " (default: <method>-vae, e.g. ssreg-vae, plain-vae)"
    add_regularizer_arguments(parser)
    add_deprecated_alias(parser, "--subfolder", "--vae_subfolder")
    add_deprecated_alias(parser, "--use_torch_compile", "--compile")

    args = parser.parse_args(input_args)
    args.demo = not any(
        [args.pretrained_model_name_or_path, args.model_config_name_or_path, args.dataset_name, args.train_data_dir]
    )
    for name, (default, demo_default) in DEMO_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, demo_default if args.demo else default)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.regularizer)

    # --- cross-argument checks: fail before any work ---
    if args.pretrained_model_name_or_path and args.model_config_name_or_path:
        raise ValueError("give either --pretrained_model_name_or_path or --model_config_name_or_path, not both.")
    if args.dataset_name and args.train_data_dir:
        raise ValueError("give either --dataset_name or --train_data_dir, not both.")
    if not args.demo and not (args.dataset_name or args.train_data_dir):
        raise ValueError("a model was given but no data: pass --train_data_dir or --dataset_name (or neither, for the demo).")
    if args.validation_split and not args.dataset_name:
        raise ValueError("--validation_split needs --dataset_name.")
    check_training_arguments(
        args, positive=("resolution", "num_train_epochs", "train_data_repeats", "latent_statistics_batches"),
        optional_positive=("max_train_samples",),
    )
    if args.random_resized_crop_scale is not None:
        low, high = args.random_resized_crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"--random_resized_crop_scale needs 0 < MIN <= MAX <= 1, got {low} {high}.")
        if args.center_crop:
            raise ValueError("--random_resized_crop_scale and --center_crop exclude each other.")
    # the chosen method's config from its --<prefix>* flags; a flag of another method is an error
    args.regularizer_config = regularizer_config_from_args(args, defaults=DEMO_REGULARIZER_DEFAULTS if args.demo else None)
    checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        check_checkpoint_regularizer(checkpoint, args.regularizer)
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def build_datasets(args, log_summary=True):
    """The training dataset, the fixed validation batch `(N, 3, R, R)` and a description of the data."""
    flip, count = not args.no_random_flip, args.num_validation_images
    if args.demo:
        train_transform = ssreg_data.random_scale_crop_transform(args.resolution, random_flip=flip)
        photos = ssreg_data.embedded_photos("train")
        train = ssreg_data.ImageDataset(photos, train_transform, length=64 * len(photos), seed=args.seed)
        per_image = max(1, math.ceil(count / len(ssreg_data.EMBEDDED_VALIDATION_PHOTOS)))
        validation = ssreg_data.fixed_crops(ssreg_data.embedded_photos("validation"), args.resolution, per_image, args.seed)
        return train, validation[:count], "the offline demo's scikit-image photographs"

    if args.random_resized_crop_scale:
        train_transform = ssreg_data.random_scale_crop_transform(args.resolution, tuple(args.random_resized_crop_scale), flip)
    else:
        train_transform = ssreg_data.image_transform(args.resolution, args.center_crop, flip)
    eval_transform = ssreg_data.image_transform(args.resolution, center_crop=True, random_flip=False)
    if args.train_data_dir:
        train_flag = "--train_data_dir"
        train = ssreg_data.folder_image_dataset(
            args.train_data_dir, train_transform, seed=args.seed, name=train_flag, log_summary=log_summary
        ).random_subset(args.max_train_samples, args.seed)
        description = f"images from `{os.path.basename(os.path.normpath(args.train_data_dir))}`"
    else:
        train_flag = "--dataset_name"
        train = ssreg_data.hub_image_dataset(
            args.dataset_name, train_transform, args.train_split, args.dataset_config_name, args.image_column,
            cache_dir=args.cache_dir, max_samples=args.max_train_samples, seed=args.seed,
        )  # fmt: skip
        description = f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name}) ({args.train_split})"
    if args.validation_data_dir:
        held_out = ssreg_data.folder_image_dataset(
            args.validation_data_dir, eval_transform, name="--validation_data_dir", log_summary=log_summary
        )
        validation, _ = ssreg_data.read_images(held_out, count, "--validation_data_dir")
    elif args.validation_split:
        held_out = ssreg_data.hub_image_dataset(
            args.dataset_name, eval_transform, args.validation_split, args.dataset_config_name, args.image_column,
            cache_dir=args.cache_dir, max_samples=count, seed=args.seed,
        )  # fmt: skip
        validation, _ = ssreg_data.read_images(held_out, count, "--validation_split")
    else:  # hold out the first readable training images
        if len(train.items) <= count:
            raise ValueError(f"the training data has {len(train.items)} images, too few to hold out {count} for validation.")
        as_validation = ssreg_data.ImageDataset(train.items, eval_transform, load=train.load, source=train.source)
        validation, held = ssreg_data.read_images(as_validation, count, train_flag)
        train = train.subset(sorted(set(range(len(train.items))) - set(held)))
        logger.info(f"No validation data given: holding out the first {len(held)} readable training images.")
    train.length = len(train.items) * (args.train_data_repeats if args.train_data_dir else 1)
    return train, validation, description


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main(args):
    accelerator, logging_dir = setup_accelerator(args)  # seeds are rank-specific: ranks draw their own branches
    if args.demo:
        logger.info("No model and no data given: running the OFFLINE DEMO. " + demo_description())

    # --- model, regularizer and data: every input error surfaces here, before training ---
    vae = demo_vae() if args.demo else load_vae(args)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {factor}.")
    spec = get_regularizer_spec(args.regularizer)
    regularizer = build_regularizer(args.regularizer, vae, args.regularizer_config)
    regularizer.check_lpips_size(args.resolution, args.resolution, f" (--resolution {args.resolution})")
    regularizer.validate_inputs = False  # the data pipeline guarantees [-1, 1]; avoids a host sync per step
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.channels_last:
        regularizer.to(memory_format=torch.channels_last)
    if args.compile:
        compile_modules(regularizer, args.activation_memory_budget, args.compile_speedups)
    train_dataset, validation_batch, data_description = build_datasets(args, accelerator.is_main_process)

    # --- checkpoints hold save_pretrained folders, not raw state dicts (diffusers' convention) ---
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                reg = unwrap(accelerator, model)
                reg.vae.save_pretrained(os.path.join(output_dir, "vae"))
                reg.save_pretrained(os.path.join(output_dir, reg.subfolder))
                if weights:
                    weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            reg = unwrap(accelerator, models.pop())
            loaded = type(reg.vae).from_pretrained(input_dir, subfolder="vae")
            reg.vae.load_state_dict(loaded.state_dict())  # in place: the optimizer keeps its parameters
            reg.load_regularizer_state(os.path.join(input_dir, reg.subfolder))

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
    # The scheduler is not prepared: it is stepped once per optimizer update, a function of that step alone.
    regularizer, prepared_optimizer, train_dataloader = accelerator.prepare(regularizer, optimizer, train_dataloader)
    raw = unwrap(accelerator, regularizer)
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    lr_scheduler = get_paper_scheduler(
        optimizer, args.max_train_steps, args.learning_rate, warmup_start_lr=args.lr_warmup_start,
        min_lr=args.lr_min, warmup_ratio=args.lr_warmup_ratio, decay_ratio=args.lr_decay_ratio,
    )  # fmt: skip
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def train_step(batch):
        with accelerator.accumulate(regularizer):
            pixel_values = batch["pixel_values"]
            if args.channels_last:
                pixel_values = pixel_values.to(memory_format=torch.channels_last)
            output = regularizer(pixel_values)
            accelerator.backward(output.loss)
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = optimizer_step(accelerator, prepared_optimizer, lr_scheduler, trainable, args.max_grad_norm, loop.guard)
        return output.scalars(), grad_norm

    def on_epoch(epoch):
        regularizer.train()
        train_dataset.set_epoch(epoch)

    tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    tracker_config.update({f"{args.regularizer}/{k}": str(v) for k, v in args.regularizer_config.to_dict().items()})
    loop = TrainingLoop(
        accelerator, args, train_dataloader, lr_scheduler, train_step, logging_dir,
        after_update=lambda step: raw.update_ema(),
        validate=lambda step: validate_and_log(raw, validation_batch, accelerator, step, args.output_dir),
        validate_first_step=True, on_epoch=on_epoch, tracker_name=f"finetune_vae_{args.regularizer}", tracker_config=tracker_config,
    )  # fmt: skip
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}; validation images = {len(validation_batch)}")
    logger.info(f"  Epochs = {math.ceil(args.max_train_steps / updates_per_epoch)}; total batch size = "
                f"{loop.total_batch_size}; optimization steps = {args.max_train_steps}")
    logger.info(f"  Trainable VAE params = {sum(p.numel() for p in raw.parameter_groups(1.0)[0]['params']):,}")
    logger.info(f"  Regularizer: {spec.title}: {args.regularizer_config}")
    global_step = loop.run()

    # --- the result: a stock AutoencoderKL folder, the regularizer beside it, a model card ---
    checksums = gather_object([weights_checksum(raw.vae)])  # every rank must hold the same weights
    metrics = None
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "rank_checksums.json"), "w") as f:
            json.dump(checksums, f)
        if len(set(checksums)) > 1:
            raise RuntimeError(f"ranks ended with different weights: {checksums}")
        metrics = validate_and_log(raw, validation_batch, accelerator, global_step, args.output_dir)

    # --- the latent normalization of the new latents, over the training data, all processes reduced ---
    base_normalization, statistics = latent_normalization(raw.vae), None
    if args.recompute_latent_statistics:
        started = time.perf_counter()
        train_dataset.set_epoch(0)
        statistics = estimate_latent_statistics(
            raw.vae, train_dataset, args.latent_statistics_batches, args.train_batch_size, accelerator, seed=args.seed,
            num_workers=args.dataloader_num_workers, collate_fn=ssreg_data.collate_examples,
        )  # fmt: skip
        _, normalization = apply_latent_statistics(raw.vae, statistics)
        logger.info(f"Latent statistics over {statistics.num_images} images ({time.perf_counter() - started:.1f} s): "
                    f"{format_normalization(normalization)}")

    def write(folder):
        raw.save_pretrained(os.path.join(folder, raw.subfolder))  # its config names the method
        raw.unwrap().save_pretrained(folder)  # the very same VAE, only its latent normalization updated

    def write_card():
        write_vae_model_card(
            args, raw, metrics, data_description, loop.total_batch_size, accelerator, base_normalization, statistics
        )
        logger.info(f"Saved the fine-tuned VAE to {args.output_dir} (load it with {type(raw.vae).__name__}.from_pretrained).")

    loop.finish(write, write_card)


if __name__ == "__main__":
    main(parse_args())
