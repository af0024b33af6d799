"""`DiTFlowPipeline`: class-conditional sampling from a DiT trained with the rectified-flow objective."""

from typing import List, Optional, Union

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..dit import denormalize_latents, vae_latent_statistics


class DiTFlowPipeline(DiTPipeline):
    r"""
    Pipeline for class-conditional image generation with a DiT that predicts the rectified-flow velocity
    `noise - latents` (trained by `examples/train_dit.py --objective flow`).

    Same components and folder layout as [`DiTPipeline`]; what differs:
      - the sampler integrates the velocity from sigma 1 (noise) to 0 (data) with a flow-matching
        scheduler ([`FlowMatchEulerDiscreteScheduler`] saved by default; [`FlowMatchHeunDiscreteScheduler`]
        also works), the DiT receiving `timestep = sigma * 1000`;
      - the null class for classifier-free guidance is `transformer.config.num_embeds_ada_norm` (the number
        of training classes), not a hard-coded 1000;
      - the latent normalization is undone before decoding, read from the VAE's config with diffusers'
        conventions: `latents * latents_std / scaling_factor + latents_mean` when the config has
        `latents_mean`/`latents_std`, else `latents / scaling_factor + shift_factor` (`DiTPipeline` ignores
        `shift_factor`, which is wrong for the Flux VAE's 0.1159).

    Parameters:
        transformer ([`DiTTransformer2DModel`]): the class-conditional velocity model.
        vae ([`AutoencoderKL`]): decodes the de-normalized latents.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): the flow-matching sampler.
        id2label (`dict[int, str]`, *optional*): class names (saved in `model_index.json`).
    """

    def __init__(self, transformer, vae, scheduler, id2label=None):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label:  # kept in model_index.json when a loaded pipeline is saved again
            self.register_to_config(id2label={str(k): v for k, v in id2label.items()})

    @torch.no_grad()
    def __call__(
        self,
        class_labels: List[int],
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 50,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Args:
            class_labels (`list[int]`): one class index per image, in `[0, num_embeds_ada_norm)`.
            guidance_scale (`float`, *optional*, defaults to 1.0): classifier-free guidance on the velocity
                when > 1 (the paper evaluates without guidance).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one per image for
                results that do not depend on the batch composition.
            num_inference_steps (`int`, *optional*, defaults to 50): scheduler steps.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or
                `"latent"` (the normalized latents, before de-normalization and decoding).
            return_dict (`bool`, *optional*, defaults to `True`): return an [`ImagePipelineOutput`].
            latents (`torch.Tensor`, *optional*): starting noise `(batch_size, in_channels, sample_size, sample_size)`.

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        config = self.transformer.config
        channels, size, null_class = config.in_channels, config.sample_size, config.num_embeds_ada_norm
        device = self._execution_device
        labels = class_label_tensor(class_labels, null_class, device)
        batch_size = len(labels)
        latents = initial_latents(latents, (batch_size, channels, size, size), generator, device)

        do_guidance = guidance_scale > 1.0
        if do_guidance:
            labels = torch.cat([labels, torch.full_like(labels, null_class)])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if do_guidance else latents
            timestep = t.to(device=device, dtype=torch.float32).expand(model_input.shape[0])
            velocity = self.transformer(
                model_input.to(self.transformer.dtype), timestep=timestep, class_labels=labels
            ).sample[:, :channels].float()
            if do_guidance:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(velocity, t, latents).prev_sample

        return decode_latents(self, latents, output_type, return_dict)


# The steps both flow pipelines (this one and LightningDiTPipeline) share around their sampling loop.


def class_label_tensor(class_labels, num_classes: int, device) -> torch.Tensor:
    """The class labels as a long tensor, each checked to lie in `[0, num_classes)` (`num_classes` is the null class)."""
    labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"`class_labels` must lie in [0, {num_classes}), got {labels.tolist()}.")
    return labels


def initial_latents(latents: Optional[torch.Tensor], shape, generator, device) -> torch.Tensor:
    """Float32 starting noise of `shape`: drawn with `generator`, or the given `latents` checked against `shape`."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    if latents.shape != shape:
        raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
    return latents.to(device=device, dtype=torch.float32)


def decode_latents(pipeline, latents: torch.Tensor, output_type: str, return_dict: bool):
    """De-normalizes with the VAE's latent statistics, decodes and converts to `output_type` (`"latent"`: as is)."""
    if output_type == "latent":
        images = latents
    else:
        mean, std = vae_latent_statistics(pipeline.vae.config)
        images = pipeline.vae.decode(denormalize_latents(latents, mean, std).to(pipeline.vae.dtype)).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = pipeline.numpy_to_pil(images)
    pipeline.maybe_free_model_hooks()
    if not return_dict:
        return (images,)
    return ImagePipelineOutput(images=images)
