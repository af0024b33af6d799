"""What `examples/finetune_vae.py` needs beyond the shared training layer: the demo default, VAE
loading with clear errors, validation (metrics, reconstruction grid, blur-dynamics plot) and the card,
for whichever regularizer `--regularizer` chose (`diffusers_ssreg.regularizers`)."""

import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
from diffusers import AutoencoderKL

from .speedups import SPEEDUPS, apply_training_speedups


logger = logging.getLogger(__name__)

FLUX_VAE = "black-forest-labs/FLUX.1-schnell"

# Flags whose default differs between a real run and the offline demo: name -> (real, demo).
DEMO_FLAGS = {
    "resolution": (256, 64),
    "train_batch_size": (32, 8),
    "learning_rate": (1e-5, 1e-3),
    "max_train_steps": (None, 400),
    "latent_statistics_batches": (100, 20),
}
# The demo trains a random-init VAE from scratch on CPU: nothing is pretrained, so no block is frozen,
# and LPIPS is off (its VGG backbone needs a download). These fields are shared by every regularizer's
# config; every flag can still override them.
DEMO_REGULARIZER_DEFAULTS = {"freeze_encoder_blocks": 0, "freeze_decoder_blocks": 0, "lambda_lpips": 0.0}
DEMO_SSREG_DEFAULTS = DEMO_REGULARIZER_DEFAULTS  # the earlier name

FLUX_COMMAND = (
    "accelerate launch examples/finetune_vae.py --pretrained_model_name_or_path "
    f"{FLUX_VAE} --vae_subfolder vae --train_data_dir /path/to/images --resolution 256 "
    "--train_batch_size 32 --learning_rate 1e-5 --max_train_steps 50000 --mixed_precision bf16 "
    "--output_dir flux-vae-ssreg"
)


def default_output_dir(regularizer_name: str) -> str:
    """`--output_dir` when none is given: `<subfolder>-vae` (`ssreg-vae`, `eqvae-vae`, ..., `plain-vae`), one per method."""
    from .regularizers import get_regularizer_spec

    return f"{get_regularizer_spec(regularizer_name).subfolder}-vae"


def demo_vae(seed: int = 0) -> AutoencoderKL:
    """A small random-init VAE of the Flux VAE's architecture (16 latent channels, factor 8, no quant convs)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def check_checkpoint_regularizer(checkpoint: str, regularizer_name: str) -> None:
    """
    Raises a ValueError, before any work, when `checkpoint` (a `checkpoint-<step>` folder) holds the state of
    another `--regularizer` than `regularizer_name` (each method saves into its own subfolder).
    """
    from .regularizers import REGULARIZERS, get_regularizer_spec

    if os.path.isdir(os.path.join(checkpoint, get_regularizer_spec(regularizer_name).subfolder)):
        return
    saved = [spec.name for spec in REGULARIZERS.values() if os.path.isdir(os.path.join(checkpoint, spec.subfolder))]
    if saved:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} was saved with --regularizer {saved[0]}, but this run has "
            f"--regularizer {regularizer_name}: resume with --regularizer {saved[0]} (and its flags), or train into "
            f"another --output_dir."
        )


def compile_modules(
    regularizer, activation_memory_budget: Optional[float] = None, speedups: Sequence[str] = SPEEDUPS
) -> None:
    """
    `torch.compile` the modules that carry the step's FLOPs, in place: those `regularizer.modules_to_compile()`
    names (`LatentRegularizer`: encoder, decoder, the EMA target of a method that has one, LPIPS when on).

    `activation_memory_budget` in (0, 1] lets the compiler recompute cheap activations in the backward
    instead of saving them (torch._functorch's min-cut partitioner): 1 saves everything, lower values
    trade a little compute for memory.

    `speedups` (any of `diffusers_ssreg.speedups.SPEEDUPS`, all by default) swaps the named diffusers blocks for
    equivalents that compile to faster kernels (`apply_training_speedups`; `regularizer.unload()` puts the stock
    blocks back). With any of them on, the modules' weights are also made channels-last, the compiler is told to run
    every convolution channels-last, and cuDNN to pick its fastest algorithm per shape unless the regularizer's sizes
    vary per step (docs/benchmarks.md).
    """
    if activation_memory_budget is not None:
        if not 0 < activation_memory_budget <= 1:
            raise ValueError(f"`activation_memory_budget` must be in (0, 1], got {activation_memory_budget!r}.")
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = activation_memory_budget
    speedups, channels_last = _speedups_for(regularizer, tuple(speedups))
    if speedups:
        import torch._inductor.config as inductor_config

        apply_training_speedups(regularizer, speedups)
        if channels_last:
            # Channels-last from the start: the compiler traces the graph with the layouts the step runs in. Told
            # only to optimise the layout (below), it converted the convolutions but left some gradients NCHW,
            # and cuDNN's backward copied them (13 ms of a 198 ms step on one H200). `unload()` restores NCHW.
            regularizer.to(memory_format=torch.channels_last)
        # The compiler keeps an NCHW graph NCHW when one of its convolutions has twice as many input as output
        # channels (the VAE's last convolutions and its channel-halving blocks do); cuDNN then transposes around
        # every bf16 convolution.
        inductor_config.force_layout_optimization = True
        # cuDNN's autotuning runs once per new shape: it pays when the step's shapes repeat
        torch.backends.cudnn.benchmark = not getattr(regularizer, "sizes_vary_per_step", False)
    for module in regularizer.modules_to_compile():
        module.compile()


def _speedups_for(regularizer, speedups: tuple) -> Tuple[tuple, bool]:
    """
    The speed-ups `compile_modules` applies to `regularizer`, and whether it makes the weights channels-last. A
    regularizer whose sizes vary per step (EQ-VAE: one of 24 sizes) keeps the per-channel GroupNorm and NCHW
    weights: with the fused GroupNorm kernels its step ran at half the speed on one H200 (docs/benchmarks.md).
    """
    if not getattr(regularizer, "sizes_vary_per_step", False):
        return speedups, bool(speedups)
    swapped = ("group_norm" if name == "fused_group_norm" else name for name in speedups)
    return tuple(dict.fromkeys(swapped)), False


def load_vae(args) -> AutoencoderKL:
    """
    The VAE named by --pretrained_model_name_or_path or --model_config_name_or_path (random init): an
    `AutoencoderKL` or `AutoencoderKLFlux2`, its class checked before any weights load (`diffusers_ssreg.vae`):
    every error names the flag.
    """
    from .vae import load_vae as load

    if args.pretrained_model_name_or_path:
        return load(args.pretrained_model_name_or_path, args.vae_subfolder, args.revision, args.variant)
    return load(
        args.model_config_name_or_path, args.vae_subfolder, args.revision, from_config=True,
        flag="--model_config_name_or_path",
    )  # fmt: skip


def demo_description() -> str:
    """What the offline demo changes, for `--help`."""
    flags = ", ".join(f"--{name} {demo}" for name, (_, demo) in DEMO_FLAGS.items())
    fields = ", ".join(f"--ssreg_{name} {value}" for name, value in DEMO_REGULARIZER_DEFAULTS.items())
    return (
        "With no model and no data arguments the script runs an offline demo: a small random-init VAE of the Flux "
        f"architecture trained on scikit-image's sample photos. The demo changes these defaults: {flags}, {fields} "
        "(the same fields of any other --regularizer, e.g. --eqvae_lambda_lpips; any flag given still wins). "
        "For the real Flux VAE:\n  " + FLUX_COMMAND
    )


def weights_checksum(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names and exact bytes): equal on every rank of a healthy DDP run."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        # reshape(-1): a 0-dim buffer (e.g. a BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixel_values: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Posterior-mean reconstructions in [-1, 1], in chunks, on the VAE's device."""
    device = next(vae.parameters()).device
    outputs = []
    for chunk in pixel_values.split(batch_size):
        chunk = chunk.to(device)
        latents = vae.encode(chunk).latent_dist.mode()
        outputs.append(vae.decode(latents).sample.clamp(-1, 1).float().cpu())
    return torch.cat(outputs)


def validate_and_log(regularizer, pixel_values: torch.Tensor, accelerator, step: int, output_dir: str) -> Dict[str, float]:
    """PSNR/SSIM/LPIPS on the fixed batch, a reconstruction grid and the blur-dynamics plot, to disk and trackers."""
    from torchvision.utils import make_grid, save_image

    from .evaluation.latent import blur_dynamics
    from .evaluation.metrics import psnr, ssim
    from .evaluation.plots import plot_blur_dynamics

    vae = regularizer.vae
    was_training = vae.training
    vae.eval()
    with accelerator.autocast():
        recon = reconstruct(vae, pixel_values)
    metrics = {
        "psnr": psnr(recon, pixel_values).mean().item(),
        "ssim": ssim(recon, pixel_values).mean().item(),
    }
    if regularizer.lpips is not None:
        with torch.no_grad():
            device = next(regularizer.lpips.parameters()).device
            values = regularizer.lpips(recon.to(device), pixel_values.to(device))
        metrics["lpips"] = values.mean().item()

    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    shown = min(8, len(pixel_values))
    grid = make_grid(torch.cat([pixel_values[:shown], recon[:shown]]).add(1).div(2).clamp(0, 1), nrow=shown)
    save_image(grid, os.path.join(folder, f"reconstruction-{step:06d}.png"))

    with accelerator.autocast():
        dynamics = blur_dynamics(vae, pixel_values, num_images=min(4, len(pixel_values)))
    figure = plot_blur_dynamics({f"step {step}": dynamics})
    figure.savefig(os.path.join(folder, f"blur-dynamics-{step:06d}.png"), dpi=100)
    metrics["blur_coherence"] = float(dynamics.coherence)
    with open(os.path.join(folder, f"metrics-{step:06d}.json"), "w") as f:
        json.dump({"step": step, **metrics}, f, indent=2)

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/reconstruction", grid, step)
            tracker.writer.add_figure("validation/blur_dynamics", figure, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/reconstruction": wandb.Image(grid), "validation/blur_dynamics": wandb.Image(figure)})
    import matplotlib.pyplot as plt

    plt.close(figure)
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
    logger.info(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    vae.train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


# What the card says of each method: (its name, its paper's arXiv id, what it trains the VAE to do, Hub tags).
METHOD_CARDS = {
    "ssreg": (
        "**Structured State-Space Regularization**",
        "2604.11089",
        "Its latent channels are trained to evolve like 2D {basis} coefficients when the input image is blurred, "
        "which the paper reports makes the latent space easier for a diffusion model to learn.",
        ["ssreg", "state-space-regularization"],
    ),
    "eqvae": (
        "**EQ-VAE** equivariance regularization",
        "2502.09509",
        "Decoding a downscaled and rotated latent is trained to give the same transform of the image, so that "
        "the latent space follows spatial transforms of the image.",
        ["eq-vae", "equivariance-regularization"],
    ),
    "scale_equivariance": (
        "**scale equivariance** (FT-SE)",
        "2502.14831",
        "The decoder is trained to reconstruct a downsampled image from the equally downsampled latent, which "
        "damps the latents' high-frequency content.",
        ["scale-equivariance"],
    ),
    "spectrum_matching": (
        "**Spectrum Matching**",
        "2603.14645",
        "The latents' frequency content is matched to the image's: ESM pushes their DCT power spectrum towards "
        "the flattened image spectrum; DSM, when on, reconstructs low-passed images from equally low-passed latents.",
        ["spectrum-matching"],
    ),
    "none": (
        "plain reconstruction fine-tuning (no latent regularizer)",
        None,
        "It is the baseline the latent regularizers are compared with: the same reconstruction loss, frozen blocks "
        "and schedule, without regularization.",
        ["plain-finetune"],
    ),
}


def transition_summary(regularizer) -> str:
    """A one-line description of the learned A: its diagonal (or norm) and how far it moved from the init."""
    from .basis import transition_matrix

    learned = regularizer.transition_matrix().detach().float().cpu()
    initial = transition_matrix(regularizer.config.basis, regularizer.grid, seed=regularizer.config.random_seed)
    change = (learned - initial).norm() / initial.norm().clamp_min(1e-12)
    diagonal = ", ".join(f"{v:.3f}" for v in torch.diagonal(learned).tolist())
    return f"diagonal [{diagonal}]; relative change from the initial A: {change:.3e}"


def regularizer_card_fields(regularizer) -> dict:
    """The card's fields that depend on the method: its name, description, config table, tags and learned state."""
    from .regularizers import get_regularizer_spec

    spec = get_regularizer_spec(regularizer.name)
    method, arxiv, description, tags = METHOD_CARDS.get(spec.name, (spec.title, None, "", []))
    paper = f"[arXiv {arxiv}](https://arxiv.org/abs/{arxiv})" if arxiv else None
    config = regularizer.config_to_save()
    fields = {
        "regularizer_name": spec.name,
        "method": f"{method} ({paper})" if paper else method,
        "method_description": description.format(basis=getattr(config, "basis", "")),
        "config_class": type(config).__name__,
        "regularizer_subfolder": spec.subfolder,
        "config_file": type(config).config_name,
        "regularizer_config": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
        "tags": tags,
        "extra_lr": None,
        "state_space": None,
        "citation_note": None,
    }
    if spec.name == "none":
        fields["citation_note"] = "The baseline of the comparison of latent regularizers in Table 1 of:"
    elif spec.name != "ssreg":
        fields["citation_note"] = f"Cite the method's own paper, {paper}; the comparison of latent regularizers follows Table 1 of:"
    if spec.name == "ssreg" and config.alpha == 0:
        fields["method_description"] = (
            "With `alpha` = 0 no sample took the regularization branch: this is plain reconstruction fine-tuning, "
            "the loss of `--regularizer none`."
        )
    if spec.name == "ssreg":
        fields["state_space"] = {
            "basis": config.basis,
            "delta": f"{regularizer.delta.item():.5f}",
            "grid": f"{regularizer.grid[0]} x {regularizer.grid[1]}",
            "summary": transition_summary(regularizer),
        }
    return fields


def write_vae_model_card(
    args, regularizer, metrics: Optional[Dict[str, float]], data_description, total_batch, accelerator,
    base_normalization=None, latent_statistics=None,
):  # fmt: skip
    """
    Renders model_cards/vae_card.md into `output_dir/README.md`. `base_normalization` (the base model's
    `latent_statistics.latent_normalization`) and `latent_statistics` (when they were recomputed) describe the
    exported latent normalization beside the base model's.
    """
    from .hub import render_model_card
    from .latent_statistics import describe_normalization, latent_normalization

    vae = regularizer.vae
    if base_normalization is None:
        base_normalization = latent_normalization(vae)
    base = args.pretrained_model_name_or_path
    method = regularizer_card_fields(regularizer)
    tags = method.pop("tags")
    if method["state_space"] is not None:
        method["extra_lr"] = f"A and Δ at {args.learning_rate * regularizer.config.ssm_lr_scale:.3g}"
    card = render_model_card(
        "vae_card.md",
        base_model=base if base and not os.path.isdir(base) else None,
        tags=[type(vae).__name__.lower(), "vae", *tags],
        model_name=os.path.basename(os.path.normpath(args.output_dir)),
        repo_id=args.hub_model_id or args.output_dir,
        demo_note=(
            "This checkpoint comes from the offline demo: a small random-init VAE trained for a few minutes on "
            "scikit-image's sample photos. It is a smoke test, not a useful model."
            if args.demo
            else None
        ),
        latent_channels=vae.config.latent_channels,
        downsampling_factor=2 ** (len(vae.config.block_out_channels) - 1),
        vae_class=type(vae).__name__,
        latent_normalization=describe_normalization(vae, base_normalization, latent_statistics),
        base_model_name=base or ("random init (demo)" if args.demo else args.model_config_name_or_path),
        dataset_description=data_description,
        max_train_steps=args.max_train_steps,
        total_batch_size=total_batch,
        train_batch_size=args.train_batch_size,
        num_processes=accelerator.num_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        resolution=args.resolution,
        learning_rate=args.learning_rate,
        lr_schedule=(
            f"warm-up from {args.lr_warmup_start} over {args.lr_warmup_ratio:.0%} of steps, constant, cosine to "
            f"{args.lr_min} over the last {args.lr_decay_ratio:.0%}"
        ),
        max_grad_norm=args.max_grad_norm,
        mixed_precision=accelerator.mixed_precision,
        metrics={k: f"{v:.4f}" for k, v in (metrics or {}).items()},
        metrics_description="posterior-mean reconstructions; PSNR in dB on [0, 1] pixels",
        **method,
    )
    card.save(os.path.join(args.output_dir, "README.md"))
