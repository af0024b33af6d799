#!/usr/bin/env python
"""
Generate N images per class from a DiT pipeline folder (train_dit.py's output) for `ssreg-eval`.

    accelerate launch examples/sample_dit.py --pretrained_model_name_or_path dit-b2-flux-ssreg \
        --num_images_per_class 50 --output_dir samples/dit-b2-flux-ssreg --output_npz samples/dit-b2-flux-ssreg.npz

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

from diffusers_ssreg.dit import dtype_kwargs, load_dit_pipeline, pipeline_num_classes


logger = get_logger(__name__, log_level="INFO")

SCHEDULERS = {  # name: (pipeline class it fits, scheduler class, config overrides)
    "euler": ("DiTFlowPipeline", FlowMatchEulerDiscreteScheduler, {}),
    "heun": ("DiTFlowPipeline", FlowMatchHeunDiscreteScheduler, {}),
    "dpm": ("DiTPipeline", DPMSolverMultistepScheduler, {"variance_type": None}),
    "ddim": ("DiTPipeline", DDIMScheduler, {"clip_sample": False}),
    "ddpm": ("DiTPipeline", DDPMScheduler, {"variance_type": "fixed_small", "clip_sample": False}),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="A train_dit.py output folder.")
    parser.add_argument("--output_dir", type=str, required=True, help="Folder of the PNG files.")
    parser.add_argument("--output_npz", type=str, default=None, help="Also write the images as an ADM-style .npz.")
    parser.add_argument("--num_images_per_class", type=int, default=50, help="50 x 1000 classes = the 50K of FID-50K.")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="Class indices (default: all trained classes).")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per pipeline call (per process).")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="1: no guidance (the paper's setting).")
    parser.add_argument("--scheduler", type=str, default=None, choices=sorted(SCHEDULERS), help="Default: the folder's.")
    parser.add_argument("--torch_dtype", type=str, default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(input_args)
    for name in ("num_images_per_class", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
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
    if type(pipeline).__name__ != fits:
        raise ValueError(f"--scheduler {name} is for a {fits}, but the folder holds a {type(pipeline).__name__}.")
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **overrides)


def main(args):
    accelerator = Accelerator()  # (not PartialState: Accelerator honours ACCELERATE_USE_CPU for several CPU processes)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    pipeline = load_dit_pipeline(args.pretrained_model_name_or_path, **dtype_kwargs(DTYPES[args.torch_dtype]))
    set_scheduler(pipeline, args.scheduler)
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = pipeline_num_classes(pipeline)
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
                num_inference_steps=args.num_inference_steps, output_type="np",
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
            "scheduler": type(pipeline.scheduler).__name__, "num_inference_steps": args.num_inference_steps,
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


if __name__ == "__main__":
    main(parse_args())
