#!/usr/bin/env python
"""
Train a class-conditional DiT on cached VAE latents: the generation benchmark of arXiv 2604.11089.

    accelerate launch examples/train_dit.py --latents_dir latents/flux-ssreg-256 --preset LightningDiT-B/2 \
        --train_batch_size 32 --max_train_steps 80000 --output_dir lightningdit-b2-flux-ssreg

`--preset LightningDiT-*` trains the paper's model (Sec. 5: DiT-B/2 with LightningDiT's changes) with
LightningDiT's recipe as defaults (`diffusers_ssreg.lightningdit.LightningDiTRecipe`: AdamW 2e-4 betas
(0.9, 0.95), EMA 0.9999, bf16, logit-normal times, MSE + cosine loss) and saves a `LightningDiTPipeline`.
`--preset DiT-*` trains diffusers' own `DiTTransformer2DModel`: `--objective ddpm` (DiT's epsilon + learned
sigma) saves a stock `DiTPipeline`, `--objective flow` (rectified flow, logit-normal timesteps) a
`DiTFlowPipeline`. Every flag left unset takes the preset's default; all pipelines decode with the latent
normalization undone (docs/dit.md). The exported transformer holds the EMA weights; `checkpoint-*` folders
hold Accelerate state with `transformer/` and `transformer_ema/` subfolders.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from PIL import Image

from diffusers_ssreg import lightningdit as ld
from diffusers_ssreg.dit import (
    NORMALIZATIONS,
    OBJECTIVES,
    LatentDataset,
    latent_dataloader,
    load_config_overrides,
    train_step,
    vae_latent_statistics,
    write_normalization_file,
)
from diffusers_ssreg.finetune import weights_checksum
from diffusers_ssreg.hub import render_model_card
from diffusers_ssreg.training import (
    HelpFormatter,
    TrainingLoop,
    add_deprecated_alias,
    add_training_arguments,
    check_training_arguments,
    setup_accelerator,
    unwrap,
)
from diffusers_ssreg.vae import load_vae_config


logger = get_logger(__name__, log_level="INFO")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def recipe_help(text: str, flag: str) -> str:
    """`text` followed by the flag's default for each kind of preset (`lightningdit.recipe_defaults`)."""
    ours, dit = ld.recipe_defaults("LightningDiT-B/2")[flag], ld.recipe_defaults("DiT-B/2")[flag]
    if ours == dit:
        return f"{text} (default: {ours})"
    dit = "Accelerate's configuration" if dit is None else dit
    return f"{text} (default: {ours} for LightningDiT-*, {dit} for DiT-*)"


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0], formatter_class=HelpFormatter)
    # data and model
    parser.add_argument("--latents_dir", type=str, default=None,
                        help="The latent cache written by examples/cache_latents.py (its --output_dir). Required.")
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="The VAE of the exported pipeline (default: the VAE the cache was made with).")
    parser.add_argument("--vae_subfolder", type=str, default=None, help="Subfolder of the VAE, e.g. 'vae' in a pipeline repo.")
    parser.add_argument("--preset", type=str, default="DiT-B/2", choices=list(ld.PRESETS),
                        help="DiT-*: diffusers' DiTTransformer2DModel; LightningDiT-*: the paper's model and recipe (docs/dit.md).")
    parser.add_argument("--transformer_config", type=str, default=None,
                        help="JSON (a string or a file) of transformer config overrides, e.g. '{\"num_layers\": 2}'.")
    parser.add_argument("--objective", type=str, default=None, choices=list(OBJECTIVES),
                        help=recipe_help("flow: rectified flow, velocity, logit-normal sigmas (LightningDiT trains only "
                                         "this); ddpm: epsilon + learned sigma (DiT).", "objective"))
    parser.add_argument("--latent_normalization", type=str, default=None, choices=list(NORMALIZATIONS),
                        help=recipe_help("channel: the cache's per-channel mean/std; vae: the VAE's scaling_factor and "
                                         "shift_factor.", "latent_normalization"))
    parser.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                        help=recipe_help("Train on the cached flipped latent half of the time.", "random_flip"))
    parser.add_argument("--class_dropout_prob", type=float, default=None,
                        help=recipe_help("Label dropout for classifier-free guidance.", "class_dropout_prob"))
    parser.add_argument("--unconditional", action="store_true", help="Ignore class labels (one class).")
    parser.add_argument("--logit_mean", type=float, default=None,
                        help=recipe_help("Flow: mean of the logit-normal sigmas.", "logit_mean"))
    parser.add_argument("--logit_std", type=float, default=None,
                        help=recipe_help("Flow: std of the logit-normal sigmas.", "logit_std"))
    parser.add_argument("--cosine_loss_weight", type=float, default=None,
                        help=recipe_help("LightningDiT: weight of the velocity-direction (cosine) loss term.", "cosine_loss_weight"))
    # optimization
    parser.add_argument("--lr_scheduler", type=str, default=None,
                        help=recipe_help("A diffusers get_scheduler name.", "lr_scheduler"))
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps of --lr_scheduler.")
    parser.add_argument("--ema_decay", type=float, default=None,
                        help=recipe_help("Constant EMA decay (0 exports the raw weights).", "ema_decay"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward (through Accelerate).")
    parser.add_argument("--validation_guidance_scale", type=float, default=1.0, help="Guidance of the sample grids.")
    parser.add_argument("--validation_inference_steps", type=int, default=50, help="Sampling steps of the sample grids.")
    add_training_arguments(
        parser, output_dir="dit-output", max_train_steps=80_000, learning_rate=None, adam_beta1=None, adam_beta2=None,
        adam_weight_decay=None, dataloader_num_workers=2, logging_steps=100, num_validation_images=16,
        checkpointing_steps=5000,
    )  # DiT: batch 32 per device (256 in total), 80K steps as the paper, no clipping
    for flag in ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "mixed_precision"):
        action = next(a for a in parser._actions if a.dest == flag)
        action.help = recipe_help(action.help.split(" (default")[0], flag)
    add_deprecated_alias(parser, "--cache_dir", "--latents_dir")

    args = parser.parse_args(input_args)
    # --- the preset's defaults for every flag left unset (LightningDiT's recipe or the original DiT's) ---
    args.recipe_defaults = {}
    for flag, value in ld.recipe_defaults(args.preset).items():
        if getattr(args, flag) is None and value is not None:
            setattr(args, flag, value)
            args.recipe_defaults[flag] = value
    # --- cross-argument checks: fail before any work ---
    if args.latents_dir is None:
        raise ValueError("--latents_dir is required: the latent cache folder written by examples/cache_latents.py.")
    check_training_arguments(args, positive=("max_train_steps", "validation_inference_steps"))
    if ld.is_lightningdit(args.preset) and args.objective != "flow":
        raise ValueError(f"--preset {args.preset} trains LightningDiT's flow objective only: --objective must be flow, "
                         f"got {args.objective!r}.")  # fmt: skip
    if not ld.is_lightningdit(args.preset) and args.cosine_loss_weight:
        raise ValueError(f"--cosine_loss_weight is LightningDiT's loss term: it must be 0 for --preset {args.preset}, "
                         f"got {args.cosine_loss_weight}.")  # fmt: skip
    if args.cosine_loss_weight < 0:
        raise ValueError(f"--cosine_loss_weight must be >= 0, got {args.cosine_loss_weight}.")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    if not args.logit_std > 0:
        raise ValueError(f"--logit_std must be positive, got {args.logit_std}.")
    if args.validation_guidance_scale > 1 and args.class_dropout_prob == 0:
        raise ValueError("--validation_guidance_scale > 1 needs a null class: train with --class_dropout_prob > 0.")
    args.transformer_overrides = load_config_overrides("transformer_config", args.transformer_config)
    return args


# ----------------------------------------------------------------------------------------------
# Inputs: every error surfaces here, before a model is built
# ----------------------------------------------------------------------------------------------


def prepare_inputs(args):
    """The in-memory latents, the VAE's location and config, the transformer class and config, the normalization, class names."""
    dataset = LatentDataset.from_cache(args.latents_dir, random_flip=args.random_flip, seed=args.seed)
    meta = dataset.metadata
    if args.unconditional:
        dataset.class_labels = torch.zeros(len(dataset), dtype=torch.long)
        num_classes, id2label = 1, {0: "unconditional"}  # the pipeline then samples class 0 only
    else:
        if dataset.class_labels is None:
            raise ValueError(
                f"the latent cache {args.latents_dir!r} has no class labels, but the DiT is class-conditional: re-cache "
                f"with labels (class subfolders or --label_column), or pass --unconditional."
            )
        num_classes = dataset.num_classes
        id2label = {int(k): v for k, v in meta.get("id2label", {}).items()}
        # Without names in the cache, name the classes by index: sample_dit reads the class count from here.
        id2label = id2label or {i: str(i) for i in range(num_classes)}
    vae_location = dict(
        pretrained_model_name_or_path=args.pretrained_vae_model_name_or_path or meta["vae"],
        subfolder=args.vae_subfolder if args.pretrained_vae_model_name_or_path else meta.get("vae_subfolder"),
        revision=None if args.pretrained_vae_model_name_or_path else meta.get("revision"),
    )
    flag = "--pretrained_vae_model_name_or_path" if args.pretrained_vae_model_name_or_path else "the cache's VAE"
    vae_config = load_vae_config(**vae_location, flag=flag)
    if vae_config["latent_channels"] != dataset.latent_channels:
        raise ValueError(
            f"channel mismatch: the VAE {vae_location['pretrained_model_name_or_path']!r} has "
            f"{vae_config['latent_channels']} latent channels but the cached latents have {dataset.latent_channels}: "
            f"use the VAE the cache was made with."
        )
    model_class, config = ld.transformer_config(
        args.preset, dataset.latent_channels, dataset.latent_size, num_classes, args.objective, args.transformer_overrides
    )
    if args.latent_normalization == "channel":
        mean, std = meta["latents_mean"], meta["latents_std"]
    else:
        mean, std = vae_latent_statistics(vae_config)
    return dataset, vae_location, vae_config, (model_class, config), (mean, std), num_classes, id2label


# ----------------------------------------------------------------------------------------------
# Sample grids and the model card
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def log_validation(pipeline, ema, args, accelerator, step, num_classes, name=None):
    """A grid of EMA samples (fixed classes and noise) saved to output_dir/samples and logged to tensorboard."""
    parameters = list(pipeline.transformer.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        labels = [i % num_classes for i in range(args.num_validation_images)]
        generator = torch.Generator(accelerator.device).manual_seed(args.seed)
        with accelerator.autocast():
            images = pipeline(
                class_labels=labels, guidance_scale=args.validation_guidance_scale, generator=generator,
                num_inference_steps=args.validation_inference_steps, output_type="pil",
            ).images  # fmt: skip
    finally:
        ema.restore(parameters)
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    images += [Image.new("RGB", images[0].size)] * (rows * cols - len(images))
    grid = make_image_grid(images, rows, cols)
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    path = os.path.join(args.output_dir, "samples", name or f"step-{step:07d}.png")
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")
    return path


def write_model_card(args, meta, vae_location, config, num_classes, total_batch, grid_path, accelerator, pipeline_class):
    """README.md of the pipeline folder, from model_cards/dit_card.md."""
    flow = args.objective == "flow"
    lightningdit = ld.is_lightningdit(args.preset)
    vae_name = vae_location["pretrained_model_name_or_path"]
    card = render_model_card(
        "dit_card.md",
        base_model=None if os.path.isdir(vae_name) else vae_name,
        tags=["dit", "class-conditional", "image-generation", "flow-matching" if flow else "ddpm"]
        + (["lightningdit"] if lightningdit else []),
        datasets=[meta["dataset_name"]] if meta.get("dataset_name") and not os.path.isdir(meta["dataset_name"]) else None,
        model_name=os.path.basename(os.path.normpath(args.hub_model_id or args.output_dir)),
        repo_id=args.hub_model_id or args.output_dir,
        objective=args.objective,
        pipeline_class=pipeline_class,
        lightningdit=lightningdit,
        recipe=ld.LightningDiTRecipe() if lightningdit else None,
        transformer_class=ld.transformer_class(args.preset).__name__,
        preset=args.preset,
        transformer_config={k: v for k, v in config.items() if not k.startswith("_")},
        vae_name=vae_name,
        resolution=meta["resolution"],
        latent_shape=f"{meta['latent_channels']}x{meta['latent_size']}x{meta['latent_size']}",
        latent_normalization=args.latent_normalization,
        num_classes=num_classes,
        dataset_description=meta.get("dataset_description", "cached latents"),
        max_train_steps=args.max_train_steps,
        total_batch_size=total_batch,
        learning_rate=args.learning_rate,
        adam_betas=(args.adam_beta1, args.adam_beta2),
        adam_weight_decay=args.adam_weight_decay,
        lr_scheduler=args.lr_scheduler,
        logit_normal=(args.logit_mean, args.logit_std),
        cosine_loss_weight=args.cosine_loss_weight,
        random_flip=args.random_flip,
        ema_decay=args.ema_decay,
        class_dropout_prob=args.class_dropout_prob,
        mixed_precision=accelerator.mixed_precision,
        sample_grid=os.path.relpath(grid_path, args.output_dir) if grid_path else None,
    )
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main(args):
    dataset, vae_location, vae_config, (model_class, config), (mean, std), num_classes, id2label = prepare_inputs(args)
    meta = dataset.metadata
    # seeds are rank-specific: every rank draws its own noise, timesteps and label dropout
    accelerator, logging_dir = setup_accelerator(
        args, dynamo_backend="inductor" if args.compile else None, non_blocking=True
    )

    # --- models: the transformer (fp32 weights; autocast does bf16), its EMA, the VAE for samples and the export ---
    transformer = model_class(**config)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    model = ld.build_training_module(
        transformer, args.objective, mean, std, args.class_dropout_prob, args.logit_mean, args.logit_std,
        args.cosine_loss_weight,
    )  # fmt: skip
    ema = ld.create_transformer_ema(transformer, args.ema_decay)
    ema.to(accelerator.device)
    if accelerator.is_main_process:  # only the main process samples and exports
        os.makedirs(args.output_dir, exist_ok=True)
        vae = AutoencoderKL.from_pretrained(**vae_location).to(accelerator.device).eval()
        vae.requires_grad_(False)

    # --- checkpoints hold save_pretrained folders, not raw state dicts (diffusers' convention) ---
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for wrapped in models:
                unwrap(accelerator, wrapped).transformer.save_pretrained(os.path.join(output_dir, "transformer"))
                if weights:
                    weights.pop()
            ema.save_pretrained(os.path.join(output_dir, "transformer_ema"))

    def load_model_hook(models, input_dir):
        while models:
            raw = unwrap(accelerator, models.pop())
            loaded = model_class.from_pretrained(input_dir, subfolder="transformer")
            raw.transformer.load_state_dict(loaded.state_dict())  # in place: the optimizer keeps its parameters
        loaded_ema = EMAModel.from_pretrained(os.path.join(input_dir, "transformer_ema"), model_class, foreach=True)
        ema.load_state_dict(loaded_ema.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    parameters = list(transformer.parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True,  # fused: NaN steps skipped on the device
    )  # fmt: skip
    # In optimizer steps, and not prepared: stepped once per update, whatever the number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
    )
    train_dataloader = latent_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, seed=args.seed)
    model, prepared_optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    validation_pipeline = None
    if accelerator.is_main_process:  # shares `transformer`: samples see the EMA weights swapped in
        validation_pipeline = ld.build_output_pipeline(transformer, vae, args.objective, mean, std, id2label)
        validation_pipeline.set_progress_bar_config(disable=True)

    def step(batch):
        output = train_step(
            accelerator, model, prepared_optimizer, lr_scheduler, batch, parameters, loop.guard, args.max_grad_norm
        )
        return {"loss": output.loss}, output.grad_norm

    loop = TrainingLoop(
        accelerator, args, train_dataloader, lr_scheduler, step, logging_dir,
        after_update=lambda step: ema.step(parameters), on_epoch=dataset.set_epoch,
        validate=lambda step: log_validation(validation_pipeline, ema, args, accelerator, step, num_classes),
        tracker_name="train_dit",
        tracker_config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
    )  # fmt: skip
    logger.info("***** Running training *****")
    logger.info(f"  Latents = {len(dataset)} x {tuple(dataset.latents.shape[2:])} (x2 flips), classes = {num_classes}")
    logger.info(f"  {args.preset} ({args.objective}), {sum(p.numel() for p in parameters) / 1e6:.1f}M parameters: {config}")
    logger.info(f"  Defaults of {args.preset} for the flags left unset: {args.recipe_defaults}")
    logger.info(f"  Latent normalization = {args.latent_normalization}: mean {np.round(mean, 4).tolist()}, "
                f"std {np.round(std, 4).tolist()}")
    logger.info(f"  Epochs = {math.ceil(args.max_train_steps / loop.updates_per_epoch)}; total batch size = "
                f"{loop.total_batch_size}; optimization steps = {args.max_train_steps}")
    model.train()
    global_step = loop.run()

    checksums = gather_object([weights_checksum(transformer)])  # every rank must hold the same weights
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "rank_checksums.json"), "w") as f:
            json.dump(checksums, f)
        if len(set(checksums)) > 1:
            raise RuntimeError(f"ranks ended with different weights: {checksums}")

    # --- the result: a pipeline folder with the EMA weights, a model card, optionally on the Hub ---
    grid_path = None
    if accelerator.is_main_process:
        grid_path = log_validation(validation_pipeline, ema, args, accelerator, global_step, num_classes, "final.png")
        ema.copy_to(parameters)

    def write(folder):
        validation_pipeline.save_pretrained(folder)
        write_normalization_file(
            folder, args.objective, args.latent_normalization, mean, std, vae_config, type(validation_pipeline).__name__
        )

    def write_card():
        pipeline_class = type(validation_pipeline).__name__
        write_model_card(args, meta, vae_location, config, num_classes, loop.total_batch_size, grid_path, accelerator,
                         pipeline_class)  # fmt: skip
        logger.info(f"Saved a {pipeline_class} to {args.output_dir} (EMA weights); sample it with examples/sample_dit.py.")

    loop.finish(write, write_card)


if __name__ == "__main__":
    main(parse_args())
