"""
The LightningDiT recipe on cached latents, and one entry point for both DiT kinds (the original and LightningDiT).

The arXiv 2604.11089 paper scores a latent space by training DiT-B/2 "following LightningDiT, applying its
modifications to the original DiT model" for 80K steps (Sec. 5). LightningDiT is Yao et al., "Reconstruction vs.
Generation" (arXiv 2501.01423), code at github.com/hustvl/LightningDiT; the sources cited below are files of
that repository. What this module reproduces, each default with its source:

  - the model: `LightningDiTTransformer2DModel` (`diffusers_ssreg.models`), presets `LightningDiT-{S,B,L,XL}/{1,2}`;
  - the objective: the linear path `x_t = t * data + (1 - t) * noise` (t: 0 noise, 1 data), the velocity target
    `data - noise`, logit-normal t, MSE plus the velocity-direction (cosine) term (`LightningDiTTrainingLoss`);
  - the optimization: AdamW lr 2e-4, betas (0.9, 0.95), no weight decay, no clipping, EMA 0.9999, bf16, label
    dropout 0.1 (`LightningDiTRecipe`);
  - the data: channel-wise latent normalization with the cache's statistics, random horizontal flips from the
    cache's flipped copies (`diffusers_ssreg.dit.LatentDataset`);
  - the sampler: Euler on a shifted grid, guidance interval (`diffusers_ssreg.pipelines.LightningDiTPipeline`).

The scripts use this module through a handful of calls that work for every `--preset`: `build_transformer`,
`recipe_defaults`, `build_training_module`, `create_transformer_ema`, `build_output_pipeline`, `load_pipeline`,
and for throughput `forward_flops_per_image` / `model_flops_utilization`.
"""

import inspect
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from .dit import (
    DIT_PRESETS,
    NUM_TRAIN_TIMESTEPS,
    OBJECTIVES,
    DiTTrainingLoss,
    build_pipeline,
    dit_config,
    drop_class_labels,
    flow_interpolate,
    flow_pipeline_vae,
    sample_flow_sigmas,
)
from .models.transformer_lightningdit import (
    LIGHTNINGDIT_PRESETS,
    LightningDiTTransformer2DModel,
    lightningdit_forward_flops,
)
from .pipelines.pipeline_lightningdit import (
    GUIDANCE_INTERVAL,
    NUM_INFERENCE_STEPS,
    TIMESTEP_SHIFT,
    LightningDiTPipeline,
)


# --------------------------------------------------------------------------------------------
# Presets of both kinds: the table the scripts offer as `--preset` choices
# --------------------------------------------------------------------------------------------

PRESETS = (*DIT_PRESETS, *LIGHTNINGDIT_PRESETS)  # "DiT-B/2": diffusers' DiTTransformer2DModel; "LightningDiT-B/2": ours


def is_lightningdit(preset_or_model) -> bool:
    """Whether a preset name, a transformer or a transformer config is LightningDiT (else the original DiT)."""
    if isinstance(preset_or_model, str):
        check_preset(preset_or_model)
        return preset_or_model in LIGHTNINGDIT_PRESETS
    if isinstance(preset_or_model, torch.nn.Module):
        return isinstance(preset_or_model, LightningDiTTransformer2DModel)
    config = dict(preset_or_model)  # a config: its saved class name, else the key only LightningDiT has
    if "_class_name" in config:
        return config["_class_name"] == LightningDiTTransformer2DModel.__name__
    return "num_classes" in config


def check_preset(preset: str) -> None:
    """ValueError naming the known presets for an unknown one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}.")


def lightningdit_config(
    preset: str, latent_channels: int, latent_size: int, num_classes: int, overrides: Optional[dict] = None
) -> dict:
    """
    The `LightningDiTTransformer2DModel` config of a preset for latents `(latent_channels, latent_size, latent_size)`
    and `num_classes` classes (the null class is `num_classes`); `overrides` (e.g. `{"num_layers": 2}`) last.
    LightningDiT's defaults (configs/config_details.yaml `model:`): SwiGLU, RoPE, RMSNorm on, QK-norm off.
    """
    if preset not in LIGHTNINGDIT_PRESETS:
        raise ValueError(f"unknown LightningDiT preset {preset!r}; choose one of {list(LIGHTNINGDIT_PRESETS)}.")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}.")
    config = dict(LIGHTNINGDIT_PRESETS[preset], in_channels=latent_channels, out_channels=latent_channels,
                  sample_size=latent_size, num_classes=num_classes)  # fmt: skip
    known = set(inspect.signature(LightningDiTTransformer2DModel.__init__).parameters) - {"self"}
    unknown = set(overrides or {}) - known - {"_class_name"}
    if unknown:
        raise ValueError(f"unknown LightningDiTTransformer2DModel config keys in the overrides: {sorted(unknown)}.")
    config.update({k: v for k, v in (overrides or {}).items() if k != "_class_name"})
    if config["in_channels"] != latent_channels:
        raise ValueError(
            f"channel mismatch: the DiT's in_channels is {config['in_channels']} but the latents have "
            f"{latent_channels} channels (the VAE's latent_channels): they must be equal."
        )
    if config.get("out_channels") not in (None, latent_channels):
        raise ValueError(f"LightningDiT predicts a velocity: out_channels must be {latent_channels}, got {config['out_channels']}.")
    if config["sample_size"] != latent_size:
        raise ValueError(f"the DiT's sample_size {config['sample_size']} differs from the latent size {latent_size}.")
    if latent_size % config["patch_size"]:
        raise ValueError(
            f"the latent size {latent_size} is not divisible by the DiT patch size {config['patch_size']}: choose a "
            f"resolution divisible by the VAE's downsampling factor times {config['patch_size']}."
        )
    if num_classes > config["num_classes"]:
        raise ValueError(f"{num_classes} classes do not fit in num_classes={config['num_classes']} class embeddings.")
    return config


def transformer_config(
    preset: str,
    latent_channels: int,
    latent_size: int,
    num_classes: int,
    objective: str = "flow",
    overrides: Optional[dict] = None,
) -> Tuple[type, dict]:
    """`(model class, config)` of any preset: `diffusers_ssreg.dit.dit_config` for DiT-*, `lightningdit_config` else."""
    check_preset(preset)
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
    if preset in LIGHTNINGDIT_PRESETS:
        if objective != "flow":
            raise ValueError(
                f"{preset} trains with LightningDiT's flow objective only (no learned sigma): `objective` must be "
                f"'flow', got {objective!r}."
            )
        return LightningDiTTransformer2DModel, lightningdit_config(preset, latent_channels, latent_size, num_classes, overrides)
    return DiTTransformer2DModel, dit_config(preset, latent_channels, latent_size, objective, num_classes, overrides)


def build_transformer(
    preset: str,
    latent_channels: int,
    latent_size: int,
    num_classes: int,
    objective: str = "flow",
    overrides: Optional[dict] = None,
):
    """A freshly initialized transformer of any preset (`DiTTransformer2DModel` or `LightningDiTTransformer2DModel`)."""
    model_class, config = transformer_config(preset, latent_channels, latent_size, num_classes, objective, overrides)
    return model_class(**config)


def transformer_class(preset_or_config):
    """The model class of a preset name or of a saved config (its `_class_name`): for `from_pretrained` and EMAs."""
    return LightningDiTTransformer2DModel if is_lightningdit(preset_or_config) else DiTTransformer2DModel


# --------------------------------------------------------------------------------------------
# The recipe's defaults, each with its source
# --------------------------------------------------------------------------------------------


@dataclass
class LightningDiTRecipe:
    """LightningDiT's training and sampling settings (sources: files of github.com/hustvl/LightningDiT)."""

    # optimization
    learning_rate: float = 2e-4  # configs/config_details.yaml L46 `optimizer: lr: 0.0002`
    adam_beta1: float = 0.9  # train.py L118 `betas=(0.9, beta2)`
    adam_beta2: float = 0.95  # configs/config_details.yaml L47 `beta2: 0.95`
    adam_weight_decay: float = 0.0  # train.py L118 `weight_decay=0`
    max_grad_norm: Optional[float] = None  # train.py L209: clips only if the config sets it; no released config does
    ema_decay: float = 0.9999  # train.py L304 `update_ema(decay=0.9999)` every step, first a copy (L158)
    mixed_precision: str = "bf16"  # run_train.sh `PRECISION=${PRECISION:-bf16}` (accelerate launch --mixed_precision)
    lr_scheduler: str = "constant"  # train.py: no scheduler
    # objective
    objective: str = "flow"  # configs/config_details.yaml L51-53 `path_type: Linear`, `prediction: velocity`
    class_dropout_prob: float = 0.1  # models/lightningdit.py L288 `class_dropout_prob=0.1` (null class = num_classes)
    logit_mean: float = 0.0  # transport/transport.py L155 `sample_logit_normal(0, 1)` (config `use_lognorm: true`)
    logit_std: float = 1.0
    cosine_loss_weight: float = 1.0  # train.py L204 `loss = cos_loss.mean() + mse_loss` (config `use_cosine_loss: true`)
    # data
    latent_normalization: str = "channel"  # config `latent_norm: true`, `latent_multiplier: 1.0`; datasets/img_latent_dataset.py L83-85
    random_flip: bool = True  # datasets/img_latent_dataset.py L77: the latent or its flipped copy, 50 % each
    # sampling (configs/config_details.yaml `sample:`)
    timestep_shift: float = TIMESTEP_SHIFT  # L86 `timestep_shift: 0.3` (transport/integrators.py L96-101)
    guidance_interval: Tuple[float, float] = GUIDANCE_INTERVAL  # L84 `cfg_interval_start: 0.11`, as sigma <= 0.89
    num_inference_steps: int = NUM_INFERENCE_STEPS  # L74 `num_sampling_steps: 250` grid points = 249 Euler steps

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {self.class_dropout_prob}.")
        if not self.logit_std > 0:
            raise ValueError(f"`logit_std` must be positive, got {self.logit_std}.")
        if self.cosine_loss_weight < 0:
            raise ValueError(f"`cosine_loss_weight` must be >= 0, got {self.cosine_loss_weight}.")
        if not self.timestep_shift > 0:
            raise ValueError(f"`timestep_shift` must be positive, got {self.timestep_shift}.")


# What train_dit.py uses for the original DiT (its flags' defaults): DiT's lr 1e-4, Adam's betas, EMA 0.9999.
DIT_DEFAULTS = dict(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, max_grad_norm=None,
                    ema_decay=0.9999, mixed_precision=None, lr_scheduler="constant", objective="flow",
                    class_dropout_prob=0.1, logit_mean=0.0, logit_std=1.0, cosine_loss_weight=0.0,
                    latent_normalization="channel", random_flip=True)  # fmt: skip


def recipe_defaults(preset: str) -> dict:
    """
    The training defaults of a preset, keyed by train_dit.py's flag names: LightningDiT's recipe for
    LightningDiT-* (`LightningDiTRecipe`), the original DiT's for DiT-* (`cosine_loss_weight` 0: plain MSE).
    `mixed_precision` None means Accelerate's configuration decides.
    """
    check_preset(preset)
    if preset in LIGHTNINGDIT_PRESETS:
        recipe = asdict(LightningDiTRecipe())
        return {k: recipe[k] for k in DIT_DEFAULTS}
    return dict(DIT_DEFAULTS)


# --------------------------------------------------------------------------------------------
# The objective: linear flow, velocity target, logit-normal times, MSE + cosine
# --------------------------------------------------------------------------------------------


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor, cosine_loss_weight: float = 1.0) -> torch.Tensor:
    """
    LightningDiT's loss (transport/transport.py L194-197, train.py L202-204): the MSE over every element plus
    `cosine_loss_weight` times the mean over samples and pixels of `1 - cos(prediction, target)`, the cosine
    taken across channels at each pixel. Tensors `(batch_size, channels, height, width)`.
    """
    loss = F.mse_loss(prediction, target)
    if cosine_loss_weight:
        loss = loss + cosine_loss_weight * (1.0 - F.cosine_similarity(prediction, target, dim=1)).mean()
    return loss


class LightningDiTTrainingLoss(torch.nn.Module):
    """
    The whole training forward of LightningDiT, the module handed to `accelerator.prepare` (and `torch.compile`):
    normalization, label dropout, noise, times, the model, the loss. Same call as `dit.DiTTrainingLoss`.

    Per sample: `t ~ sigmoid(N(-logit_mean, logit_std))` (LightningDiT's t; `logit_mean`/`logit_std` describe
    sigma = 1 - t, as the rest of the package), `x_t = t * data + (1 - t) * noise` (transport/path.py ICPlan
    L114-124), target `data - noise` (L126-131), the model sees `(x_t, t, label)` (transport.py L188).

    Args:
        transformer (`LightningDiTTransformer2DModel`): trained in place.
        latents_mean, latents_std (`Sequence[float]`): the per-channel normalization `(latents - mean) / std`.
        class_dropout_prob (`float`, defaults to 0.1): labels replaced by the null class for guidance.
        logit_mean, logit_std (`float`, defaults to 0 and 1): the logit-normal distribution of sigma.
        cosine_loss_weight (`float`, defaults to 1.0): weight of the velocity-direction term (0: MSE only).
    """

    def __init__(self, transformer, latents_mean, latents_std, class_dropout_prob=0.1, logit_mean=0.0, logit_std=1.0,
                 cosine_loss_weight=1.0):  # fmt: skip
        super().__init__()
        if not isinstance(transformer, LightningDiTTransformer2DModel):
            raise TypeError(f"`transformer` must be a LightningDiTTransformer2DModel, got {type(transformer).__name__}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
        if not logit_std > 0:
            raise ValueError(f"`logit_std` must be positive, got {logit_std}.")
        if cosine_loss_weight < 0:
            raise ValueError(f"`cosine_loss_weight` must be >= 0, got {cosine_loss_weight}.")
        self.transformer = transformer
        self.null_class = transformer.config.num_classes
        self.class_dropout_prob, self.logit_mean, self.logit_std = class_dropout_prob, logit_mean, logit_std
        self.cosine_loss_weight = cosine_loss_weight
        channels = transformer.config.in_channels
        if len(latents_mean) != channels or len(latents_std) != channels:
            raise ValueError(f"latents_mean/latents_std need {channels} entries, got {len(latents_mean)}/{len(latents_std)}.")
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """`latents`: raw cached latents `(batch_size, C, h, w)`; `class_labels`: `(batch_size,)`. Returns the scalar loss."""
        latents = (latents.float() - self.latents_mean) / self.latents_std
        class_labels = drop_class_labels(class_labels, self.null_class, self.class_dropout_prob if self.training else 0.0)
        noise = torch.randn_like(latents)
        sigmas = sample_flow_sigmas(latents.shape[0], latents.device, self.logit_mean, self.logit_std)
        model_input = flow_interpolate(latents, noise, sigmas)  # = t * latents + (1 - t) * noise with t = 1 - sigma
        prediction = self.transformer(model_input, timestep=1.0 - sigmas, class_labels=class_labels).sample
        return velocity_loss(prediction.float(), latents - noise, self.cosine_loss_weight)


def build_training_module(
    transformer,
    objective: str,
    latents_mean: Sequence[float],
    latents_std: Sequence[float],
    class_dropout_prob: float = 0.1,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    cosine_loss_weight: Optional[float] = None,
) -> torch.nn.Module:
    """
    The training module of either kind, called `module(latents, class_labels) -> loss` by `dit.train_step`:
    `LightningDiTTrainingLoss` for a LightningDiT (`cosine_loss_weight` None: the recipe's 1.0), else
    `dit.DiTTrainingLoss` (whose objectives have no cosine term: a non-zero weight is refused).
    """
    if isinstance(transformer, LightningDiTTransformer2DModel):
        if objective != "flow":
            raise ValueError(f"a LightningDiT trains with the flow objective only, got objective={objective!r}.")
        weight = LightningDiTRecipe.cosine_loss_weight if cosine_loss_weight is None else cosine_loss_weight
        return LightningDiTTrainingLoss(transformer, latents_mean, latents_std, class_dropout_prob, logit_mean, logit_std, weight)
    if cosine_loss_weight:
        raise ValueError(f"the cosine loss term is LightningDiT's: cosine_loss_weight must be 0 for a DiT, got {cosine_loss_weight}.")
    return DiTTrainingLoss(transformer, objective, latents_mean, latents_std, class_dropout_prob, logit_mean, logit_std)


def create_transformer_ema(transformer, decay: float = 0.9999):
    """
    diffusers' `EMAModel` at a constant `decay` for either kind (the first update copies the weights, as DiT and
    LightningDiT initialize their EMA); `save_pretrained` writes a folder of the transformer's own class.
    """
    from diffusers.training_utils import EMAModel

    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the EMA decay must be in [0, 1), got {decay}.")
    return EMAModel(transformer.parameters(), decay=decay, min_decay=decay, model_cls=type(transformer),
                    model_config=transformer.config, foreach=True)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The output folder: a diffusers pipeline of the right kind
# --------------------------------------------------------------------------------------------


def lightningdit_scheduler(timestep_shift: float = TIMESTEP_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """The Euler scheduler of a LightningDiT folder: LightningDiT's `timestep_shift` s is diffusers' `shift` = 1 / s."""
    if not timestep_shift > 0:
        raise ValueError(f"`timestep_shift` must be positive, got {timestep_shift}.")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0 / timestep_shift)


def build_lightningdit_pipeline(
    transformer: LightningDiTTransformer2DModel,
    vae: AutoencoderKL,
    latents_mean: Sequence[float],
    latents_std: Sequence[float],
    id2label: Optional[Dict[int, str]] = None,
    timestep_shift: float = TIMESTEP_SHIFT,
) -> LightningDiTPipeline:
    """
    A `LightningDiTPipeline` for a LightningDiT trained on `(latents - mean) / std`: `vae` (the VAE the latents
    came from) keeps its weights and gets the normalization in its config (`dit.flow_pipeline_vae`).
    """
    if vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"channel mismatch: the VAE has {vae.config.latent_channels} latent channels, the DiT "
            f"{transformer.config.in_channels} in_channels."
        )
    id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
    pipeline = LightningDiTPipeline(transformer=transformer, vae=flow_pipeline_vae(vae, latents_mean, latents_std),
                                    scheduler=lightningdit_scheduler(timestep_shift), id2label=id2label or None)  # fmt: skip
    if id2label:  # saved in model_index.json and handed back to __init__ by from_pretrained
        pipeline.register_to_config(id2label={str(k): v for k, v in sorted(id2label.items())})
    return pipeline


def build_output_pipeline(
    transformer,
    vae: AutoencoderKL,
    objective: str,
    latents_mean: Sequence[float],
    latents_std: Sequence[float],
    id2label: Optional[Dict[int, str]] = None,
):
    """The pipeline a transformer of either kind samples with: `LightningDiTPipeline`, else `dit.build_pipeline`'s."""
    if isinstance(transformer, LightningDiTTransformer2DModel):
        if objective != "flow":
            raise ValueError(f"a LightningDiT trains with the flow objective only, got objective={objective!r}.")
        return build_lightningdit_pipeline(transformer, vae, latents_mean, latents_std, id2label)
    return build_pipeline(transformer, vae, objective, latents_mean, latents_std, id2label)


PIPELINE_CLASSES = ("DiTPipeline", "DiTFlowPipeline", "LightningDiTPipeline")


def load_pipeline(folder: str, **kwargs):
    """Loads a pipeline folder of any of the three kinds with the class its model_index.json names."""
    from diffusers import DiffusionPipeline

    with open(os.path.join(folder, "model_index.json")) as f:
        class_name = json.load(f)["_class_name"]
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{folder!r} holds a {class_name}, not one of {list(PIPELINE_CLASSES)}.")
    return DiffusionPipeline.from_pretrained(folder, **kwargs)  # diffusers_ssreg.pipelines registered our classes


def pipeline_num_classes(pipeline) -> int:
    """How many classes a pipeline's DiT was trained on: its id2label, else its class-embedding count (either kind)."""
    if getattr(pipeline, "labels", None):
        return max(pipeline.labels.values()) + 1
    config = pipeline.transformer.config
    return int(config.num_classes if "num_classes" in config else config.num_embeds_ada_norm)


# --------------------------------------------------------------------------------------------
# Compute: FLOPs per image and model FLOPs utilization
# --------------------------------------------------------------------------------------------


def dit_forward_flops(config) -> int:
    """
    FLOPs of the matrix products of one forward pass of diffusers' `DiTTransformer2DModel` per image (2 per
    multiply-add), counted as `lightningdit_forward_flops` does, with diffusers' layout: separate q, k, v
    projections (the same FLOPs as a fused one), a GELU MLP of width `4 D`, and in every block its own timestep
    MLP `256 -> D -> D` besides the AdaLN `D -> 6D`; the final layer recomputes block 0's conditioning once more.
    """
    config = dict(config)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    patch, tokens = config["patch_size"], (config["sample_size"] // config["patch_size"]) ** 2
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    timestep_mlp = 2 * (256 * dim + dim * dim)
    per_block = 8 * tokens * dim * dim + 4 * tokens * tokens * dim + 16 * tokens * dim * dim + 12 * dim * dim + timestep_mlp
    return int(
        2 * tokens * patch * patch * in_channels * dim
        + config["num_layers"] * per_block
        + timestep_mlp + 2 * dim * 2 * dim  # final layer: conditioning again, then its modulation
        + 2 * tokens * dim * patch * patch * out_channels
    )


def forward_flops_per_image(transformer_or_config) -> int:
    """Forward-pass FLOPs per image of a transformer (or config) of either kind; a training step is ~3x this."""
    config = transformer_or_config.config if isinstance(transformer_or_config, torch.nn.Module) else transformer_or_config
    return lightningdit_forward_flops(config) if is_lightningdit(transformer_or_config) else dit_forward_flops(config)


def model_flops_utilization(flops_per_image: float, images_per_second: float, peak_flops: float, training=True) -> float:
    """
    MFU: achieved model FLOPs over the device's peak (`peak_flops` per second, e.g. the bf16 dense peak from the
    vendor's datasheet). A training step counts 3x the forward FLOPs (forward + backward of activations and weights).
    """
    if not peak_flops > 0 or images_per_second < 0:
        raise ValueError(f"`peak_flops` must be positive and `images_per_second` >= 0, got {peak_flops}, {images_per_second}.")
    return (3.0 if training else 1.0) * flops_per_image * images_per_second / peak_flops


__all__ = [
    "PRESETS",
    "LightningDiTRecipe",
    "LightningDiTTrainingLoss",
    "build_lightningdit_pipeline",
    "build_output_pipeline",
    "build_training_module",
    "build_transformer",
    "create_transformer_ema",
    "dit_forward_flops",
    "forward_flops_per_image",
    "is_lightningdit",
    "lightningdit_config",
    "lightningdit_scheduler",
    "load_pipeline",
    "model_flops_utilization",
    "pipeline_num_classes",
    "recipe_defaults",
    "transformer_class",
    "transformer_config",
    "velocity_loss",
]
