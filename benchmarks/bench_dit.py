#!/usr/bin/env python
"""
DiT training throughput: the stock compiled `DiTTransformer2DModel` step against train_dit.py's step and loop.

    PYTHONPATH=. python benchmarks/bench_dit.py --device cuda --preset DiT-B/2 --batch_size 256 \
        --latent_size 32 --latent_channels 16 --compile --mixed_precision bf16 --objectives flow ddpm \
        --steps 50 --repeats 3 --time_budget_s 60 --output_json bench_dit.json

Measured in one process, on the same device, images per second (img/s = batch_size * steps / seconds):
  - `bare`: the stock DiT (ImageNet layout: learned-sigma output, 1000 classes + null, its own label
    dropout) under `torch.compile` and autocast, MSE against a fixed target, fused AdamW. No data, no EMA.
  - `step/<objective>`: `diffusers_ssreg.dit.train_step`, the very function train_dit.py calls, on a
    batch already on the device (compiled through Accelerate exactly as `train_dit.py --compile` does).
  - `loop/<objective>`: train_dit.py's loop body: the in-memory latent DataLoader (random original/flip
    choice, host-to-device copy), `train_step`, the EMA update and the loss accumulation.
Each repeat runs every measurement once (warm-up excluded); the table gives the median over repeats.
A tiny CPU run (`--device cpu --transformer_config '{"num_layers": 1, ...}'`) exercises the same code.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args(input_args=None):
    from diffusers_ssreg.dit import DIT_PRESETS, OBJECTIVES

    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", type=str, default="DiT-B/2", choices=list(DIT_PRESETS))
    parser.add_argument("--transformer_config", type=str, default=None, help="JSON overrides of the preset (tiny CPU runs).")
    parser.add_argument("--objectives", type=str, nargs="+", default=["flow"], choices=list(OBJECTIVES))
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--latent_size", type=int, default=32)
    parser.add_argument("--latent_channels", type=int, default=16)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--compile", action="store_true", help="torch.compile (bare: the model; ours: via Accelerate).")
    parser.add_argument("--mixed_precision", type=str, default="bf16", choices=["no", "bf16"])
    parser.add_argument("--warmup_steps", type=int, default=10, help="Untimed steps first (compilation happens here).")
    parser.add_argument("--steps", type=int, default=50, help="Timed steps per measurement.")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds over all measurements; the median is reported.")
    parser.add_argument("--time_budget_s", type=float, default=None, help="Stop a measurement's timed steps after this long.")
    parser.add_argument("--num_cached_samples", type=int, default=None, help="Latents held for the loop (default 32 batches).")
    parser.add_argument("--dataloader_num_workers", type=int, default=2)
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", type=str, default="bench_dit.json")
    parser.add_argument("--output_markdown", type=str, default=None, help="Default: --output_json with .md.")
    args = parser.parse_args(input_args)
    for name in ("batch_size", "latent_size", "latent_channels", "num_classes", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup_steps must be >= 0, got {args.warmup_steps}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu for the tiny check.")
    if args.device == "cpu" and args.mixed_precision == "bf16" and args.compile:
        raise ValueError("--compile with bf16 on the CPU is not a configuration this benchmark measures.")
    args.output_markdown = args.output_markdown or os.path.splitext(args.output_json)[0] + ".md"
    args.num_cached_samples = args.num_cached_samples or 32 * args.batch_size
    if args.num_cached_samples < args.batch_size:
        raise ValueError(f"--num_cached_samples {args.num_cached_samples} is below one batch of {args.batch_size}.")
    return args


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step_fn, args, device) -> dict:
    """Runs `step_fn` `--steps` times (or until `--time_budget_s`), after it was warmed up; img/s and ms/step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    steps = 0
    while steps < args.steps:
        step_fn()
        steps += 1
        if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {"steps": steps, "seconds": seconds, "img_per_s": args.batch_size * steps / seconds,
              "ms_per_step": 1000 * seconds / steps}  # fmt: skip
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def warm_up(step_fn, args, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        step_fn()
    synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# The three measurements
# ----------------------------------------------------------------------------------------------


def bare_step(args, overrides, device):
    """The stock compiled DiT step: model(x, t, y) -> MSE -> backward -> fused AdamW."""
    from diffusers import DiTTransformer2DModel
    from diffusers_ssreg.dit import dit_config

    config = dit_config(args.preset, args.latent_channels, args.latent_size, "ddpm", min(args.num_classes, 1000), overrides)
    model = DiTTransformer2DModel(**config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    forward = torch.compile(model) if args.compile else model
    shape = (args.batch_size, args.latent_channels, args.latent_size, args.latent_size)
    latents = torch.randn(shape, device=device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
    labels = torch.randint(0, min(args.num_classes, 1000), (args.batch_size,), device=device)
    target = torch.randn((args.batch_size, config["out_channels"], args.latent_size, args.latent_size), device=device)
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision == "bf16"):
            output = forward(latents, timestep=timesteps, class_labels=labels).sample
        F.mse_loss(output.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def ours(objective, args, overrides, accelerator, device):
    """train_dit.py's step and loop for one objective: (step_fn on a device batch, loop_fn over the DataLoader)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers_ssreg.dit import DiTTrainingLoss, LatentDataset, create_ema, dit_config, latent_dataloader, train_step
    from diffusers_ssreg.training import NonFiniteGuard

    config = dit_config(args.preset, args.latent_channels, args.latent_size, objective, args.num_classes, overrides)
    transformer = DiTTransformer2DModel(**config)
    channels = args.latent_channels
    model = DiTTrainingLoss(transformer, objective, [0.0] * channels, [1.0] * channels)
    parameters = list(transformer.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0, fused=True)  # as train_dit.py
    lr_scheduler = get_scheduler("constant", optimizer)
    ema = create_ema(transformer, args.ema_decay)
    ema.to(device)

    generator = torch.Generator().manual_seed(args.seed)
    cache = torch.randn((args.num_cached_samples, 2, channels, args.latent_size, args.latent_size), generator=generator)
    cache_labels = torch.randint(0, args.num_classes, (args.num_cached_samples,), generator=generator)
    dataset = LatentDataset(cache.to(torch.float16), cache_labels)
    loader = latent_dataloader(dataset, args.batch_size, args.dataloader_num_workers)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    model.train()
    guard = NonFiniteGuard(5)
    device_batch = {k: v.to(device) for k, v in dataset.__getitems__(list(range(args.batch_size))).items()}
    state = {"iterator": iter(loader), "epoch": 0}
    loss_sum = torch.zeros((), device=device)

    def step():
        return train_step(accelerator, model, optimizer, lr_scheduler, device_batch, parameters, guard)

    def next_batch():
        try:
            return next(state["iterator"])
        except StopIteration:
            state["epoch"] += 1
            loader.set_epoch(state["epoch"])
            state["iterator"] = iter(loader)
            return next(state["iterator"])

    def loop():  # train_dit.py's loop body, minus the periodic logging/checkpointing
        nonlocal loss_sum
        output = train_step(accelerator, model, optimizer, lr_scheduler, next_batch(), parameters, guard)
        loss_sum += output.loss
        ema.step(parameters)

    return step, loop


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def environment(device) -> dict:
    import accelerate
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "device": device.type}  # fmt: skip
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def markdown_table(report: dict) -> str:
    bare = report["summary"]["bare"]["img_per_s"]
    lines = [
        f"DiT throughput, {report['config']['preset']} on {report['config']['latent_channels']}x"
        f"{report['config']['latent_size']}x{report['config']['latent_size']} latents, batch {report['config']['batch_size']}, "
        f"{report['config']['mixed_precision']}, compile={report['config']['compile']}, "
        f"{report['environment']['device_name']} (median of {report['config']['repeats']}):",
        "",
        "| measurement | img/s | ms/step | vs bare | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in report["summary"].items():
        memory = f"{result['peak_memory_gib']:.1f}" if "peak_memory_gib" in result else "-"
        speed = f"{result['img_per_s']:.1f} | {result['ms_per_step']:.2f} | {result['img_per_s'] / bare:.3f}"
        lines.append(f"| {name} | {speed} | {memory} |")
    return "\n".join(lines) + "\n"


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from diffusers_ssreg.dit import load_config_overrides

    torch.manual_seed(args.seed)
    overrides = load_config_overrides("transformer_config", args.transformer_config)
    accelerator = Accelerator(  # what train_dit.py builds (no trackers)
        mixed_precision=args.mixed_precision,
        cpu=args.device == "cpu",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        dynamo_backend="inductor" if args.compile else "no",
    )
    device = accelerator.device

    functions, warmup_seconds = {}, {}
    functions["bare"], num_parameters = bare_step(args, overrides, device)
    for objective in args.objectives:
        functions[f"step/{objective}"], functions[f"loop/{objective}"] = ours(objective, args, overrides, accelerator, device)
    for name, function in functions.items():
        warmup_seconds[name] = warm_up(function, args, device)
        print(f"warm-up {name}: {warmup_seconds[name]:.1f} s", flush=True)

    rounds = {name: [] for name in functions}
    for repeat in range(args.repeats):
        for name, function in functions.items():
            result = measure(function, args, device)
            rounds[name].append(result)
            speed = f"{result['img_per_s']:.1f} img/s ({result['ms_per_step']:.2f} ms/step)"
            print(f"[{repeat + 1}/{args.repeats}] {name}: {speed}", flush=True)
    summary = {}
    for name, results in rounds.items():
        median = statistics.median(r["img_per_s"] for r in results)
        summary[name] = {"img_per_s": median, "ms_per_step": 1000 * args.batch_size / median}
        if "peak_memory_gib" in results[0]:
            summary[name]["peak_memory_gib"] = max(r["peak_memory_gib"] for r in results)
    report = {
        "environment": environment(device),
        "config": {k: v for k, v in vars(args).items() if k not in ("output_json", "output_markdown")},
        "num_parameters": num_parameters,
        "warmup_seconds": warmup_seconds,
        "rounds": rounds,
        "summary": summary,
        "ratios_vs_bare": {name: s["img_per_s"] / summary["bare"]["img_per_s"] for name, s in summary.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    with open(args.output_markdown, "w") as f:
        f.write(table)
    print(table)
    return report


if __name__ == "__main__":
    main(parse_args())
