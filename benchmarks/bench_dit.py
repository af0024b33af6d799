#!/usr/bin/env python
"""
DiT training throughput: the bare compiled model step against train_dit.py's step and loop, for one or more presets.

    PYTHONPATH=. python benchmarks/bench_dit.py --device cuda --preset DiT-B/2,LightningDiT-B/2 --batch_size 256 \
        --latent_size 32 --latent_channels 16 --compile --mixed_precision bf16 --objectives flow \
        --steps 50 --repeats 3 --time_budget_s 60 --output_json bench_dit.json

Measured in one process, on the same device, for every preset, images per second (img/s = batch_size * steps /
seconds) and model FLOPs utilization (MFU = 3 x forward FLOPs per image x img/s / the device's dense bf16 peak):
  - `bare`: the model alone under `torch.compile` and autocast, MSE against a fixed target, fused AdamW; no data,
    no EMA. DiT-*: the stock `DiTTransformer2DModel` (ImageNet layout: learned-sigma output, 1000 classes + null,
    its own label dropout); LightningDiT-*: `LightningDiTTransformer2DModel` (velocity output, times in [0, 1]).
  - `step/<objective>`: `diffusers_ssreg.dit.train_step`, the very function train_dit.py calls, on a batch already
    on the device, with train_dit.py's training module (`lightningdit.build_training_module`: LightningDiT's loss for
    LightningDiT-*), compiled through Accelerate exactly as `train_dit.py --compile` does.
  - `loop/<objective>`: train_dit.py's loop body: the in-memory latent DataLoader (random original/flip
    choice, host-to-device copy), `train_step`, the EMA update and the loss accumulation.
LightningDiT-* presets train the flow objective only (other objectives are skipped for them). Each repeat runs every
measurement once (warm-up excluded); the table gives the median over repeats. A tiny CPU run (`--device cpu
--transformer_config '{"num_layers": 1, ...}'`) exercises the same code.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F


# Dense bf16 peak of the GPUs this may run on (datasheet, TFLOP/s), as benchmarks/bench_finetune.py reports MFU against.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def parse_presets(value: str):
    """`--preset`: one preset name or several, comma-separated."""
    from diffusers_ssreg.lightningdit import PRESETS

    presets = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if not presets or unknown:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {unknown or value!r}; choose from {list(PRESETS)}.")
    return presets


def parse_args(input_args=None):
    from diffusers_ssreg.dit import OBJECTIVES

    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", type=parse_presets, default=["DiT-B/2"],
                        help="A preset or several, comma-separated (e.g. DiT-B/2,LightningDiT-B/2), measured in one run.")
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
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The device's dense bf16 peak for MFU (default: the datasheet value of an H100, H200 or A100).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", type=str, default="bench_dit.json")
    parser.add_argument("--output_markdown", type=str, default=None, help="Default: --output_json with .md.")
    args = parser.parse_args(input_args)
    for name in ("batch_size", "latent_size", "latent_channels", "num_classes", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ValueError(f"--peak_tflops must be positive, got {args.peak_tflops}.")
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


def bare_step(preset, args, overrides, device):
    """The bare compiled model step: model(x, t, y) -> MSE -> backward -> fused AdamW. Returns (step, model config)."""
    from diffusers_ssreg import lightningdit as ld

    if ld.is_lightningdit(preset):  # velocity output, flow times in [0, 1]
        num_classes = args.num_classes
        model = ld.build_transformer(preset, args.latent_channels, args.latent_size, num_classes, "flow", overrides)
        timesteps = torch.rand((args.batch_size,), device=device)
    else:  # the stock ImageNet DiT: learned sigma, 1000 classes, integer timesteps
        num_classes = min(args.num_classes, 1000)
        model = ld.build_transformer(preset, args.latent_channels, args.latent_size, num_classes, "ddpm", overrides)
        timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    forward = torch.compile(model) if args.compile else model
    shape = (args.batch_size, args.latent_channels, args.latent_size, args.latent_size)
    latents = torch.randn(shape, device=device)
    labels = torch.randint(0, num_classes, (args.batch_size,), device=device)
    out_channels = model.config.out_channels or args.latent_channels
    target = torch.randn((args.batch_size, out_channels, args.latent_size, args.latent_size), device=device)
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision == "bf16"):
            output = forward(latents, timestep=timesteps, class_labels=labels).sample
        F.mse_loss(output.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.config


def ours(preset, objective, args, overrides, accelerator, device):
    """train_dit.py's step and loop for a preset and objective: (step_fn on a device batch, loop_fn, model config)."""
    from diffusers.optimization import get_scheduler

    from diffusers_ssreg import lightningdit as ld
    from diffusers_ssreg.dit import LatentDataset, latent_dataloader, train_step
    from diffusers_ssreg.training import NonFiniteGuard

    channels = args.latent_channels
    transformer = ld.build_transformer(preset, channels, args.latent_size, args.num_classes, objective, overrides)
    model = ld.build_training_module(transformer, objective, [0.0] * channels, [1.0] * channels)  # the preset's loss
    parameters = list(transformer.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0, fused=True)  # as train_dit.py
    lr_scheduler = get_scheduler("constant", optimizer)
    ema = ld.create_transformer_ema(transformer, args.ema_decay)
    ema.to(device)

    generator = torch.Generator().manual_seed(args.seed)
    cache = torch.randn((args.num_cached_samples, 2, channels, args.latent_size, args.latent_size), generator=generator)
    cache_labels = torch.randint(0, args.num_classes, (args.num_cached_samples,), generator=generator)
    dataset = LatentDataset(cache.to(torch.float16), cache_labels, seed=args.seed)
    loader = latent_dataloader(dataset, args.batch_size, args.dataloader_num_workers, seed=args.seed)
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
            dataset.set_epoch(state["epoch"])
            loader.set_epoch(state["epoch"])
            state["iterator"] = iter(loader)
            return next(state["iterator"])

    def loop():  # train_dit.py's loop body, minus the periodic logging/checkpointing
        nonlocal loss_sum
        output = train_step(accelerator, model, optimizer, lr_scheduler, next_batch(), parameters, guard)
        loss_sum += output.loss
        ema.step(parameters)

    return step, loop, transformer.config


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


def peak_tflops(args, environment_info) -> float:
    """`--peak_tflops`, else the datasheet dense bf16 peak of the device (NaN when unknown: no MFU)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if environment_info["device"] != "cuda":
        return float("nan")
    return next((v for k, v in PEAK_TFLOPS.items() if k in environment_info["device_name"]), float("nan"))


def markdown_table(report: dict) -> str:
    config = report["config"]
    size = config["latent_size"]
    lines = [
        f"DiT training throughput on {config['latent_channels']}x{size}x{size} latents, batch {config['batch_size']}, "
        f"{config['mixed_precision']}, compile={config['compile']}, {report['environment']['device_name']} "
        f"(median of {config['repeats']}; MFU against {report['peak_tflops']} TFLOP/s):",
        "",
        "| preset | measurement | img/s | ms/step | vs bare | MFU | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for preset, measurements in report["presets"].items():
        for name, result in measurements["summary"].items():
            memory = f"{result['peak_memory_gib']:.1f}" if "peak_memory_gib" in result else "-"
            mfu = f"{100 * result['mfu']:.1f} %" if math.isfinite(result["mfu"]) else "-"
            speed = f"{result['img_per_s']:.1f} | {result['ms_per_step']:.2f} | {result['vs_bare']:.3f}"
            lines.append(f"| {preset} | {name} | {speed} | {mfu} | {memory} |")
    return "\n".join(lines) + "\n"


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from diffusers_ssreg import lightningdit as ld
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
    environment_info = environment(device)
    peak = peak_tflops(args, environment_info)

    functions, configs, warmup_seconds = {}, {}, {}
    for preset in args.preset:
        functions[preset, "bare"], configs[preset, "bare"] = bare_step(preset, args, overrides, device)
        for objective in args.objectives:
            if ld.is_lightningdit(preset) and objective != "flow":
                print(f"{preset} trains the flow objective only: {objective} skipped.", flush=True)
                continue
            step, loop, config = ours(preset, objective, args, overrides, accelerator, device)
            functions[preset, f"step/{objective}"], functions[preset, f"loop/{objective}"] = step, loop
            configs[preset, f"step/{objective}"] = configs[preset, f"loop/{objective}"] = config
    for key, function in functions.items():
        warmup_seconds[key] = warm_up(function, args, device)
        print(f"warm-up {' '.join(key)}: {warmup_seconds[key]:.1f} s", flush=True)

    rounds = {key: [] for key in functions}
    for repeat in range(args.repeats):
        for key, function in functions.items():
            result = measure(function, args, device)
            rounds[key].append(result)
            speed = f"{result['img_per_s']:.1f} img/s ({result['ms_per_step']:.2f} ms/step)"
            print(f"[{repeat + 1}/{args.repeats}] {' '.join(key)}: {speed}", flush=True)

    presets = {}
    for (preset, name), results in rounds.items():
        median = statistics.median(r["img_per_s"] for r in results)
        flops = ld.forward_flops_per_image(configs[preset, name])
        entry = {"img_per_s": median, "ms_per_step": 1000 * args.batch_size / median, "forward_flops_per_image": flops,
                 "mfu": ld.model_flops_utilization(flops, median, peak * 1e12) if math.isfinite(peak) else float("nan")}  # fmt: skip
        if "peak_memory_gib" in results[0]:
            entry["peak_memory_gib"] = max(r["peak_memory_gib"] for r in results)
        summary = presets.setdefault(preset, {"summary": {}, "rounds": {}, "warmup_seconds": {}})
        summary["summary"][name], summary["rounds"][name] = entry, results
        summary["warmup_seconds"][name] = warmup_seconds[preset, name]
    for measurements in presets.values():
        bare = measurements["summary"]["bare"]["img_per_s"]
        for entry in measurements["summary"].values():
            entry["vs_bare"] = entry["img_per_s"] / bare
    report = {
        "environment": environment_info,
        "config": {k: v for k, v in vars(args).items() if k not in ("output_json", "output_markdown")},
        "peak_tflops": peak,
        "presets": presets,
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
