#!/usr/bin/env python
"""
Generate N images per class from a DiT pipeline folder (train_dit.py's output) for `ssreg-eval`.

    accelerate launch examples/sample_dit.py --pretrained_model_name_or_path lightningdit-b2-flux-ssreg \
        --num_images_per_class 50 --output_dir samples/lightningdit-b2 --output_npz samples/lightningdit-b2.npz

The folder may hold a `LightningDiTPipeline` (`--preset LightningDiT-*`: its defaults are LightningDiT's sampler,
249 Euler steps on the shifted grid, `--guidance_interval` and `--guidance_channels` apply), a `DiTFlowPipeline` or
a stock `DiTPipeline`.
Images are PNG files `<class>_<index>.png` in `--output_dir` (ssreg-eval reads the folder);
`--output_npz` also packs them into ADM's layout (`arr_0`: uint8 `(N, H, W, 3)`, `labels`: `(N,)`).
Image (class c, index i) always starts from the same noise (a CPU generator seeded by seed, c, i),
whatever the batch size or number of processes; files already written are skipped (re-run to resume).
"""

import argparse
import json
import logging
import os

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from PIL import Image
from tqdm.auto import tqdm

from diffusers_ssreg import lightningdit as ld
from diffusers_ssreg.dit import dtype_kwargs


logger = get_logger(__name__, log_level="INFO")

FLOW_PIPELINES = ("DiTFlowPipeline", "LightningDiTPipeline")
SCHEDULERS = {  # name: (pipeline classes it fits, scheduler class, config overrides)
    "euler": (FLOW_PIPELINES, FlowMatchEulerDiscreteScheduler, {}),
    "heun": (FLOW_PIPELINES, FlowMatchHeunDiscreteScheduler, {}),
    "dpm": (("DiTPipeline",), DPMSolverMultistepScheduler, {"variance_type": None}),
    "ddim": (("DiTPipeline",), DDIMScheduler, {"clip_sample": False}),
    "ddpm": (("DiTPipeline",), DDPMScheduler, {"variance_type": "fixed_small", "clip_sample": False}),
}
DEFAULT_INFERENCE_STEPS = {"LightningDiTPipeline": ld.LightningDiTRecipe.num_inference_steps}  # others: 50
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="A train_dit.py output folder.")
    parser.add_argument("--output_dir", type=str, required=True, help="Folder of the PNG files.")
    parser.add_argument("--output_npz", type=str, default=None, help="Also write the images as an ADM-style .npz.")
    parser.add_argument("--num_images_per_class", type=int, default=50, help="50 x 1000 classes = the 50K of FID-50K.")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="Class indices (default: all trained classes).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per pipeline call (per process).")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Default: 249 for a LightningDiTPipeline (LightningDiT's 250-point grid), else 50.")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="1: no guidance (the paper's setting).")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="LightningDiTPipeline: guide only where sigma (1: noise, 0: data) is in [LOW, HIGH] "
                        "(default: the pipeline's, LightningDiT's 0 0.89).")
    parser.add_argument("--guidance_channels", type=int, default=None,
                        help="LightningDiTPipeline: guide only the first N latent channels (3: LightningDiT's "
                        "inference.py; default: all).")
    parser.add_argument("--scheduler", type=str, default=None, choices=sorted(SCHEDULERS), help="Default: the folder's.")
    parser.add_argument("--torch_dtype", type=str, default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(input_args)
    for name in ("num_images_per_class", "batch_size", "num_inference_steps", "guidance_channels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.guidance_interval is not None and not 0.0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1.0:
        raise ValueError(f"--guidance_interval must be LOW HIGH with 0 <= LOW <= HIGH <= 1, got {args.guidance_interval}.")
    if args.output_npz is not None and not args.output_npz.endswith(".npz"):
        raise ValueError(f"--output_npz must end with .npz, got {args.output_npz!r}.")
    if args.classes is not None and min(args.classes) < 0:
        raise ValueError(f"--classes must be non-negative class indices, got {args.classes}.")
    return args


def image_seed(seed: int, class_label: int, index: int) -> int:
    """The noise seed of image `index` of class `class_label` (independent of batching and processes)."""
    return ((seed * 1_000_003 + class_label) * 1_000_003 + index) % (2**63)


def image_path(output_dir: str, class_label: int, index: int) -> str:
    return os.path.join(output_dir, f"{class_label:04d}_{index:05d}.png")


def set_scheduler(pipeline, name):
    """Replaces the pipeline's scheduler by `name` (from the same config); ValueError when it doesn't fit the objective."""
    if name is None:
        return
    fits, scheduler_class, overrides = SCHEDULERS[name]
    if type(pipeline).__name__ not in fits:
        raise ValueError(f"--scheduler {name} is for a {' or '.join(fits)}, but the folder holds a {type(pipeline).__name__}.")
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **overrides)


def sampler_kwargs(pipeline, args) -> dict:
    """The pipeline call's sampler arguments; ValueError for LightningDiT's options on another pipeline."""
    name = type(pipeline).__name__
    kwargs = {"num_inference_steps": args.num_inference_steps or DEFAULT_INFERENCE_STEPS.get(name, 50)}
    for flag in ("guidance_interval", "guidance_channels"):
        if getattr(args, flag) is None:
            continue
        if name != "LightningDiTPipeline":
            raise ValueError(f"--{flag} applies to a LightningDiTPipeline, but the folder holds a {name}.")
        kwargs[flag] = tuple(args.guidance_interval) if flag == "guidance_interval" else args.guidance_channels
    if "guidance_channels" in kwargs and kwargs["guidance_channels"] > pipeline.transformer.config.in_channels:
        raise ValueError(f"--guidance_channels {args.guidance_channels} exceeds the "
                         f"{pipeline.transformer.config.in_channels} latent channels.")  # fmt: skip
    return kwargs


def main(args):
    accelerator = Accelerator()  # (not PartialState: Accelerator honours ACCELERATE_USE_CPU for several CPU processes)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    pipeline = ld.load_pipeline(args.pretrained_model_name_or_path, **dtype_kwargs(DTYPES[args.torch_dtype]))
    set_scheduler(pipeline, args.scheduler)
    sampler = sampler_kwargs(pipeline, args)
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = ld.pipeline_num_classes(pipeline)
    classes = args.classes if args.classes is not None else list(range(num_classes))
    if max(classes) >= num_classes:
        raise ValueError(f"--classes {classes} go beyond the {num_classes} classes the DiT was trained on.")

    jobs = [(c, i) for c in classes for i in range(args.num_images_per_class)]
    os.makedirs(args.output_dir, exist_ok=True)
    with accelerator.split_between_processes(jobs) as mine:
        todo = [(c, i) for c, i in mine if not os.path.isfile(image_path(args.output_dir, c, i))]
        logger.info(f"{len(jobs)} images in all; this process: {len(todo)} of {len(mine)} to generate.", main_process_only=False)
        progress = tqdm(total=len(todo), desc="Sampling", unit="img", disable=not accelerator.is_local_main_process)
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            generators = [torch.Generator("cpu").manual_seed(image_seed(args.seed, c, i)) for c, i in chunk]
            images = pipeline(
                class_labels=[c for c, _ in chunk], guidance_scale=args.guidance_scale, generator=generators,
                output_type="np", **sampler,
            ).images  # fmt: skip
            for (c, i), image in zip(chunk, images):
                path = image_path(args.output_dir, c, i)
                Image.fromarray(np.round(image * 255).clip(0, 255).astype(np.uint8)).save(path + ".tmp", format="PNG")
                os.replace(path + ".tmp", path)  # a killed run never leaves a truncated PNG behind
            progress.update(len(chunk))
        progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = {
            "pipeline": args.pretrained_model_name_or_path, "pipeline_class": type(pipeline).__name__,
            "scheduler": type(pipeline.scheduler).__name__, **sampler,
            "guidance_scale": args.guidance_scale, "seed": args.seed, "classes": classes,
            "num_images_per_class": args.num_images_per_class, "num_images": len(jobs), "torch_dtype": args.torch_dtype,
        }  # fmt: skip
        with open(os.path.join(args.output_dir, "samples.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if args.output_npz:
            images = np.stack([np.asarray(Image.open(image_path(args.output_dir, c, i)).convert("RGB")) for c, i in jobs])
            labels = np.array([c for c, _ in jobs], dtype=np.int64)
            os.makedirs(os.path.dirname(os.path.abspath(args.output_npz)), exist_ok=True)
            np.savez(args.output_npz, arr_0=images, labels=labels)
            logger.info(f"Wrote {args.output_npz}: arr_0 {images.shape} uint8, labels {labels.shape}.")
        logger.info(f"{len(jobs)} images in {args.output_dir}: score them with `ssreg-eval`.")
    accelerator.wait_for_everyone()  # every process ends the process group together (diffusers_ssreg/training.py)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
