"""`LightningDiTPipeline`: class-conditional sampling from a `LightningDiTTransformer2DModel`, as LightningDiT samples."""

import inspect
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .pipeline_dit_flow import class_label_tensor, decode_latents, initial_latents


# LightningDiT's sampler settings (configs/config_details.yaml, `sample:`), in this pipeline's terms
TIMESTEP_SHIFT = 0.3  # `timestep_shift: 0.3`; the scheduler's `shift` is its inverse (see `lightningdit_timestep_grid`)
GUIDANCE_INTERVAL = (0.0, 1.0 - 0.11)  # `cfg_interval_start: 0.11` in LightningDiT's time t = 1 - sigma
NUM_INFERENCE_STEPS = 249  # `num_sampling_steps: 250` time points of a fixed-grid Euler solver = 249 steps
LIGHTNINGDIT_GUIDANCE_CHANNELS = 3  # `forward_with_cfg` (models/lightningdit.py L428-434) guides channels [0, 3)


def lightningdit_timestep_grid(num_inference_steps: int, timestep_shift: float = TIMESTEP_SHIFT) -> np.ndarray:
    """
    The `num_inference_steps + 1` times `t` (0: noise, 1: data) of LightningDiT's Euler sampler, by hand: a uniform
    grid on [0, 1] mapped through `t -> s t / (1 + (s - 1) t)` with `s = timestep_shift`
    (transport/integrators.py L94-101; `s` < 1 spends more steps at high noise). In sigma = 1 - t this is
    `sigma -> S sigma / (1 + (S - 1) sigma)` with `S = 1 / s`: diffusers' flow-matching `shift`.
    """
    t = np.linspace(0.0, 1.0, num_inference_steps + 1)
    if timestep_shift > 0:  # LightningDiT applies the shift only when it is positive
        t = timestep_shift * t / (1.0 + (timestep_shift - 1.0) * t)
    return t


class LightningDiTPipeline(DiTPipeline):
    r"""
    Pipeline for class-conditional image generation with a [`LightningDiTTransformer2DModel`], following LightningDiT's
    sampler (`inference.py` and `transport/` of github.com/hustvl/LightningDiT).

    The model predicts the velocity `data - noise` at time `t = 1 - sigma` (0: noise, 1: data). The pipeline
    integrates it from noise to data with the Euler method on LightningDiT's grid: `num_inference_steps + 1`
    uniformly spaced times, shifted towards noise by the scheduler's `shift` (LightningDiT's `timestep_shift` 0.3 is
    `shift = 1 / 0.3`), the last step landing exactly on the data (sigma 0). The normalized latents are
    de-normalized with the statistics in the VAE's config (`latents_mean`/`latents_std`, else
    `scaling_factor`/`shift_factor`) and decoded.

    Classifier-free guidance (`guidance_scale` > 1) combines the conditional and null-class velocities,
    `v = v_null + guidance_scale * (v_cond - v_null)`, only at steps whose sigma lies in `guidance_interval`
    (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval", arXiv 2404.07724); elsewhere `v = v_cond`
    and the null-class pass is skipped.

    Parameters:
        transformer ([`LightningDiTTransformer2DModel`]): the class-conditional velocity model.
        vae ([`AutoencoderKL`]): decodes the de-normalized latents.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): holds the timestep `shift` and performs the Euler steps.
        id2label (`dict[int, str]`, *optional*): class names (saved in `model_index.json`).
    """

    def __init__(self, transformer, vae, scheduler, id2label=None):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label:  # kept in model_index.json when a loaded pipeline is saved again
            self.register_to_config(id2label={str(k): v for k, v in id2label.items()})

    def _set_timesteps(self, num_inference_steps: int, device) -> None:
        """LightningDiT's grid (`num_inference_steps` uniform sigmas from 1, shifted by the scheduler), else the scheduler's own."""
        if "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]  # the scheduler appends the final 0
            self.scheduler.set_timesteps(sigmas=sigmas.tolist(), device=device)
        else:  # e.g. FlowMatchHeunDiscreteScheduler: its own grid and shift
            self.scheduler.set_timesteps(num_inference_steps, device=device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: List[int],
        guidance_scale: float = 1.0,
        guidance_interval: Tuple[float, float] = GUIDANCE_INTERVAL,
        guidance_channels: Optional[Union[int, Sequence[int]]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = NUM_INFERENCE_STEPS,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Args:
            class_labels (`list[int]`): one class index per image, in `[0, num_classes)`.
            guidance_scale (`float`, *optional*, defaults to 1.0): classifier-free guidance when > 1 (the arXiv
                2604.11089 paper evaluates without guidance).
            guidance_interval (`tuple[float, float]`, *optional*, defaults to `(0.0, 0.89)`): guidance applies at the
                steps whose sigma (1: noise, 0: data) lies in `[low, high]`. The default is LightningDiT's
                `cfg_interval_start: 0.11` (configs/config_details.yaml): guidance only once `t = 1 - sigma >= 0.11`.
                `(0.0, 1.0)` guides every step.
            guidance_channels (`int` or `list[int]`, *optional*): latent channels that receive guidance; the others
                take the conditional velocity. `None` (default): all channels, the standard guidance. `3` reproduces
                LightningDiT's `inference.py`, whose `forward_with_cfg` (models/lightningdit.py L420-442, inherited
                from DiT and GLIDE, where the first 3 channels were RGB) guides only channels 0, 1, 2 of the
                normalized latents; every other channel follows the conditional prediction, whatever the number of
                latent channels.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one per image for results that do
                not depend on the batch composition.
            num_inference_steps (`int`, *optional*, defaults to 249): Euler steps (model evaluations without
                guidance). LightningDiT's `num_sampling_steps: 250` counts grid points: 249 steps.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or
                `"latent"` (the normalized latents, before de-normalization and decoding).
            return_dict (`bool`, *optional*, defaults to `True`): return an [`ImagePipelineOutput`].
            latents (`torch.Tensor`, *optional*): starting noise `(batch_size, in_channels, sample_size, sample_size)`.

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        config = self.transformer.config
        channels, size, null_class = config.in_channels, config.sample_size, config.num_classes
        device = self._execution_device
        labels = class_label_tensor(class_labels, null_class, device)
        low, high = guidance_interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"`guidance_interval` must be (low, high) with 0 <= low <= high <= 1, got {guidance_interval}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        channel_mask = self._guidance_channel_mask(guidance_channels, channels, device)
        batch_size = len(labels)
        latents = initial_latents(latents, (batch_size, channels, size, size), generator, device)
        null_labels = torch.full_like(labels, null_class)

        self._set_timesteps(num_inference_steps, device)
        scale = self.scheduler.config.num_train_timesteps
        host_sigmas = (self.scheduler.timesteps.cpu().double() / scale).tolist()  # one read: the guidance decisions
        for timestep, sigma in zip(self.progress_bar(self.scheduler.timesteps), host_sigmas):
            model_time = torch.full((batch_size,), 1.0 - sigma, device=device, dtype=torch.float32)  # t = 1 - sigma
            guide = guidance_scale > 1.0 and low <= sigma <= high
            model_input = latents.to(self.transformer.dtype)
            if guide:  # one pass over [conditional; null class]
                velocity = self.transformer(
                    torch.cat([model_input, model_input]), timestep=model_time.repeat(2),
                    class_labels=torch.cat([labels, null_labels]),
                ).sample.float()  # fmt: skip
                conditional, unconditional = velocity.chunk(2)
                guided = unconditional + guidance_scale * (conditional - unconditional)
                velocity = guided if channel_mask is None else torch.where(channel_mask, guided, conditional)
            else:
                velocity = self.transformer(model_input, timestep=model_time, class_labels=labels).sample.float()
            # the scheduler integrates d x / d sigma = noise - data = -velocity
            latents = self.scheduler.step(-velocity, timestep, latents).prev_sample

        return decode_latents(self, latents, output_type, return_dict)

    @staticmethod
    def _guidance_channel_mask(guidance_channels, channels: int, device) -> Optional[torch.Tensor]:
        """`(1, channels, 1, 1)` booleans of the guided channels; None for all channels."""
        if guidance_channels is None:
            return None
        if isinstance(guidance_channels, int):
            if not 1 <= guidance_channels <= channels:
                raise ValueError(f"`guidance_channels` as a count must be in [1, {channels}], got {guidance_channels}.")
            chosen = list(range(guidance_channels))  # the first channels, as LightningDiT
        else:
            chosen = [int(c) for c in guidance_channels]
            if not chosen or min(chosen) < 0 or max(chosen) >= channels:
                raise ValueError(f"`guidance_channels` must be channel indices in [0, {channels}), got {guidance_channels}.")
        mask = torch.zeros(channels, dtype=torch.bool, device=device)
        mask[chosen] = True
        return mask.view(1, channels, 1, 1)
