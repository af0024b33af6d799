#!/usr/bin/env python
"""
Throughput of a VAE fine-tuning step, side by side in one process on the same data:

  (a) stock   the plain diffusers step: encode, sample, decode, L1 + KL, AdamW (all weights trainable)
  (b) ssreg   our training step: StateSpaceRegularizer forward with alpha 0.25 and LPIPS, the clip +
              AdamW + scheduler step of examples/finetune_vae.py (training.optimizer_step), EMA update
  (c) plain   the same as (b) with alpha 0 (plain reconstruction fine-tuning through the regularizer)
  (d) eqvae, scale_equivariance, spectrum_matching, none
              the same step as (b) through each other regularizer of `--regularizer` (its paper's setting,
              with the shared fields of (b): LPIPS on, the same frozen blocks)

Each variant runs eager and, with --compile, under torch.compile. Reports img/s, peak GPU memory,
model FLOP utilization and the ratios b/a, b/c and d/b as JSON and a markdown table.

    python benchmarks/bench_finetune.py --device cuda --config flux --batch_size 32 --resolution 256 --compile
    python benchmarks/bench_finetune.py --regularizer eqvae --compile          # stock, ssreg and eqvae
    python benchmarks/bench_finetune.py --device cpu --config tiny --steps 2     # what the test suite runs

The LPIPS module gets a random VGG backbone by default, so the benchmark runs offline
(`--lpips_pretrained_backbone` to use the ImageNet one): the compute is identical.
"""

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import torch
from diffusers import AutoencoderKL


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from diffusers_ssreg import REGULARIZERS, build_regularizer  # noqa: E402
from diffusers_ssreg.finetune import compile_modules  # noqa: E402
from diffusers_ssreg.speedups import SPEEDUPS, parse_speedups  # noqa: E402
from diffusers_ssreg.training import NonFiniteGuard, optimizer_step  # noqa: E402


# Dense bf16 peak of the GPUs this may run on (datasheet, TFLOP/s): MFU is reported against it.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

# "stock" is plain diffusers; "plain" is SSReg with alpha 0; every other name is a `--regularizer` method.
VARIANTS = ("stock", "plain", *REGULARIZERS)

TINY_CONFIG = dict(
    block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4, norm_num_groups=4, layers_per_block=1,
)  # fmt: skip


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="flux", choices=["flux", "tiny"], help="flux: the 83.8M Flux VAE architecture.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per variant.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per variant (compilation happens here).")
    parser.add_argument("--time_budget_s", type=float, default=120.0, help="Stop timing a variant after this long.")
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--regularizer", default=None,
        help=f"Regularizer(s) to time beside stock and ssreg, comma-separated, or 'all': any of {', '.join(REGULARIZERS)}. "
        "Sets the default of --variants to stock,ssreg,<these>.",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=None,
        help=f"Variants run eagerly, comma-separated ('' for none), of {', '.join(VARIANTS)} "
        "(default: stock,ssreg,plain, or stock,ssreg,<--regularizer>).",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="Also run variants under torch.compile.")
    parser.add_argument("--compiled_variants", default=None, help="Variants run compiled (default: --variants).")
    parser.add_argument(
        "--sweep", default=None,
        help="Eager scaling sweep instead of the main comparison: 'BATCHxRES,...' e.g. '8x256,16x256,32x256,4x512,8x512'.",
    )  # fmt: skip
    parser.add_argument("--sweep_plot", default=None, help="PNG of the sweep: img/s and peak memory per setting.")
    parser.add_argument(
        "--channels_last", action="store_true",
        help="Our variants (every regularizer step) run channels_last; the stock baseline stays as diffusers users run it.",
    )  # fmt: skip
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--activation_memory_budget", type=float, default=None,
                        help="Compiled runs: torch._functorch activation memory budget in (0, 1] (see compile_modules).")
    parser.add_argument(
        "--compile_speedups", type=parse_speedups, default=",".join(SPEEDUPS),
        help="Compiled regularizer variants: the blocks swapped for faster equivalents, as finetune_vae.py's flag "
        f"(of {', '.join(SPEEDUPS)}, or 'none'). The stock variants never use them. (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--lpips_pretrained_backbone", action="store_true")
    parser.add_argument("--profile", action="store_true", help="Print torch.profiler's top kernels of two ssreg steps.")
    parser.add_argument("--profile_json", default=None, help="With --profile: every kernel's time per step, as JSON.")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--output_md", default=None)
    args = parser.parse_args(input_args)
    if args.resolution % 8 and args.config == "flux":
        raise ValueError(f"--resolution must be divisible by 8 for the Flux VAE, got {args.resolution}.")
    methods = []
    if args.regularizer is not None:
        methods = list(REGULARIZERS) if args.regularizer == "all" else split_names(args.regularizer)
        check_names("--regularizer", methods, REGULARIZERS)
    if args.variants is None:
        args.variants = ",".join(dict.fromkeys(["stock", "ssreg", *methods] if methods else ["stock", "ssreg", "plain"]))
    check_names("--variants", split_names(args.variants), VARIANTS)
    if args.compiled_variants is not None:
        check_names("--compiled_variants", split_names(args.compiled_variants), VARIANTS)
    return args


def split_names(text: str):
    """`"a, b,,c"` -> `["a", "b", "c"]`."""
    return [name.strip() for name in text.split(",") if name.strip()]


def check_names(flag: str, names, allowed) -> None:
    """A ValueError naming `flag` when `names` holds anything outside `allowed`."""
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"{flag}: unknown {unknown}; allowed: {', '.join(allowed)}.")


def build_vae(args, channels_last: bool = False) -> AutoencoderKL:
    torch.manual_seed(0)
    if args.config == "flux":
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(HERE, "configs", "flux_vae")))
    else:
        vae = AutoencoderKL(**TINY_CONFIG)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae = vae.to(args.device)
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    return vae


def autocast(args):
    if args.mixed_precision == "no":
        return torch.autocast(device_type=torch.device(args.device).type, enabled=False)
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The three steps
# ----------------------------------------------------------------------------------------------


def make_stock_step(args, compile_):
    """Plain diffusers fine-tuning as users write it today: the reference every other number is divided by."""
    vae = build_vae(args)
    # As a user runs plain diffusers: torch's defaults, whatever an earlier variant of this process set.
    import torch._inductor.config as inductor_config

    inductor_config.force_layout_optimization = False
    torch.backends.cudnn.benchmark = False
    if compile_:
        vae.encoder.compile()
        vae.decoder.compile()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-5, fused=args.device != "cpu")

    def step(pixel_values):
        with autocast(args):
            posterior = vae.encode(pixel_values).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = (reconstruction.float() - pixel_values).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, vae


def make_regularizer_step(args, compile_, name):
    """
    A regularizer's step (`name`: a `--regularizer` method, or "plain" for SSReg with alpha 0) through the same
    pieces as examples/finetune_vae.py (Accelerate-free but identical math). Every method gets the shared fields
    of the SSReg step (LPIPS on, the paper's frozen blocks) and its paper's setting otherwise.
    """
    vae = build_vae(args, args.channels_last)
    method = "ssreg" if name == "plain" else name
    shared = dict(lpips_pretrained_backbone=args.lpips_pretrained_backbone,
                  freeze_encoder_blocks=min(2, len(vae.encoder.down_blocks)) if args.config == "flux" else 1,
                  freeze_decoder_blocks=min(2, len(vae.decoder.up_blocks)) if args.config == "flux" else 1)  # fmt: skip
    if method == "ssreg":
        shared["alpha"] = 0.0 if name == "plain" else 0.25
    regularizer = build_regularizer(method, vae, REGULARIZERS[method].config_class(**shared)).to(args.device)
    regularizer.validate_inputs = False
    if args.channels_last:
        regularizer = regularizer.to(memory_format=torch.channels_last)
    if compile_:
        compile_modules(regularizer, args.activation_memory_budget, args.compile_speedups)
    optimizer = torch.optim.AdamW(regularizer.parameter_groups(1e-5), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    guard = NonFiniteGuard(5)
    clipper = _Clipper()

    def step(pixel_values):
        if args.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        with autocast(args):
            output = regularizer(pixel_values)
        output.loss.backward()
        optimizer_step(clipper, optimizer, scheduler, trainable, 50.0, guard)
        regularizer.update_ema()
        return output.loss

    return step, regularizer


class _Clipper:
    """The one Accelerator method `optimizer_step` uses, for a single process without Accelerate."""

    @staticmethod
    def clip_grad_norm_(parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# Seed of the first step of every variant: an eager and a compiled copy of one variant draw the same branches and
# noise on the same batch from the same weights, so their first losses differ by kernel rounding only.
FIRST_STEP_SEED = 1234


def count_flops(step, pixel_values):
    """
    FLOPs of one training step (forward + backward + optimizer), counted by torch's FlopCounterMode, and the
    step's loss (the first step of a fresh model, drawn with `FIRST_STEP_SEED`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    torch.manual_seed(FIRST_STEP_SEED)
    with counter:
        loss = step(pixel_values)
    return float(counter.get_total_flops()), float(loss.detach())


def peak_tflops(device) -> float:
    if torch.device(device).type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))


def run_variant(args, name, compile_, pixel_batches, flops_cache):
    label = f"{name}{' (compiled)' if compile_ else ''}"
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    def make(compiled):
        if name == "stock":
            return make_stock_step(args, compiled)
        return make_regularizer_step(args, compiled, name)

    if name not in flops_cache:  # FLOPs don't depend on compilation: count once, on an eager copy
        counting_step, counting_model = make(False)
        flops_cache[name], flops_cache[("first_loss", name)] = count_flops(counting_step, pixel_batches[0])
        del counting_step, counting_model
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    step, model = make(compile_)
    start = time.perf_counter()
    torch.manual_seed(FIRST_STEP_SEED)
    first_loss = float("nan")
    for i in range(args.warmup):
        loss = step(pixel_batches[i % len(pixel_batches)])
        if i == 0:
            first_loss = float(loss.detach())
    synchronize(args.device)
    warmup_s = time.perf_counter() - start

    times, begin = [], time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(pixel_batches[i % len(pixel_batches)])
        synchronize(args.device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - begin > args.time_budget_s:
            break
    total = sum(times)
    images_per_s = len(times) * args.batch_size / total
    median = sorted(times)[len(times) // 2]
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if torch.device(args.device).type == "cuda" else float("nan")
    flops = flops_cache.get(name, float("nan"))
    mfu = flops / median / (peak_tflops(args.device) * 1e12) if math.isfinite(flops) else float("nan")
    result = {
        "variant": name, "compiled": compile_, "label": label, "timed_steps": len(times),
        "images_per_s": images_per_s, "median_step_s": median, "peak_memory_gib": peak_memory,
        "flops_per_step": flops, "tflops_per_image": flops / args.batch_size / 1e12, "mfu": mfu,
        "warmup_s": warmup_s, "final_loss": float(loss.detach()), "first_loss": first_loss,
        "eager_first_loss": flops_cache.get(("first_loss", name), float("nan")),
    }  # fmt: skip
    # The compiled step's first loss against the eager step's, same weights, batch and draws
    result["first_loss_rel_diff"] = abs(first_loss - result["eager_first_loss"]) / abs(result["eager_first_loss"])
    print(
        f"{label:20s} {images_per_s:8.2f} img/s  median {median * 1e3:8.1f} ms  peak {peak_memory:6.1f} GiB  "
        f"MFU {mfu:6.1%}  warm-up {warmup_s:6.1f} s  first loss {first_loss:.5f} (eager {result['eager_first_loss']:.5f})",
        flush=True,
    )
    if args.profile and name == "ssreg" and compile_ == bool(args.compile):
        profile_step(args, step, pixel_batches[0])
    del step, model
    gc.collect()
    return result


def profile_step(args, step, pixel_values):
    """
    torch.profiler over two steps: prints the top kernels and, with --profile_json, writes every kernel's time
    per step (summed by name, in microseconds) and the step's total kernel time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step(pixel_values)
        synchronize(args.device)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    if args.profile_json:
        rows = []
        for event in prof.key_averages():
            device_us = getattr(event, "self_device_time_total", 0) or 0
            if device_us > 0 and event.device_type.name in ("CUDA", "PrivateUse1"):
                rows.append({"kernel": event.key, "us_per_step": device_us / 2, "calls_per_step": event.count / 2})
        rows.sort(key=lambda r: -r["us_per_step"])
        with open(args.profile_json, "w") as f:
            json.dump({"total_us_per_step": sum(r["us_per_step"] for r in rows), "kernels": rows}, f, indent=1)


def sweep(args):
    """Eager img/s and peak memory of each variant over batch sizes and resolutions (docs/benchmarks.md's plot)."""
    rows = []
    for item in args.sweep.split(","):
        batch, resolution = (int(v) for v in item.lower().split("x"))
        settings = argparse.Namespace(**{**vars(args), "batch_size": batch, "resolution": resolution, "profile": False})
        generator = torch.Generator().manual_seed(0)
        batches = [(torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(args.device)]
        for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
            try:
                result = run_variant(settings, name, False, batches, {})
            except torch.cuda.OutOfMemoryError:
                result = {"variant": name, "images_per_s": float("nan"), "peak_memory_gib": float("nan"), "error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append({"batch_size": batch, "resolution": resolution, **result})
            print(f"sweep {batch}x{resolution} {name}: {result['images_per_s']:.1f} img/s, {result['peak_memory_gib']:.1f} GiB", flush=True)
    report = {"settings": vars(args), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "sweep": rows,
              "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"}  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if args.sweep_plot:
        plot_sweep(rows, args.sweep_plot)
    return report


def plot_sweep(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["variant"] for r in rows}):
        for resolution, marker in ((256, "o"), (512, "s")):
            points = [r for r in rows if r["variant"] == name and r["resolution"] == resolution]
            if not points:
                continue
            x = [r["batch_size"] for r in points]
            speed.plot(x, [r["images_per_s"] for r in points], marker=marker, label=f"{name} {resolution}px")
            memory.plot(x, [r["peak_memory_gib"] for r in points], marker=marker, label=f"{name} {resolution}px")
    for axis, label in ((speed, "images / s"), (memory, "peak GPU memory (GiB)")):
        axis.set_xlabel("batch size")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    speed.legend(fontsize=8)
    figure.suptitle("Eager fine-tuning step, Flux VAE architecture, bf16")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(args):
    if args.sweep:
        return sweep(args)
    generator = torch.Generator().manual_seed(0)
    pixel_batches = [
        (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator) * 2 - 1).to(args.device)
        for _ in range(4)
    ]
    eager_variants = split_names(args.variants)
    compiled_variants = eager_variants if args.compiled_variants is None else split_names(args.compiled_variants)
    runs = [(name, False) for name in eager_variants] + ([(name, True) for name in compiled_variants] if args.compile else [])
    if args.compile:
        # Static graphs for every variant: without this, a second batch size of a module (EQ-VAE's branches pass
        # 28 and 12 of 32 samples at full resolution) would turn its compiled graph dynamic, also for the
        # variants timed after it.
        torch._dynamo.config.automatic_dynamic_shapes = False
    modes = sorted({compiled for _, compiled in runs})
    results, flops_cache = [], {}
    for name, compile_ in runs:
        try:
            results.append(run_variant(args, name, compile_, pixel_batches, flops_cache))
        except torch.cuda.OutOfMemoryError as error:  # a variant that doesn't fit is a result too
            print(f"{name} (compiled={compile_}): out of memory: {str(error).splitlines()[0]}", flush=True)
            results.append({"variant": name, "compiled": compile_, "label": f"{name}{' (compiled)' if compile_ else ''}",
                            "error": "out of memory", "images_per_s": float("nan"), "median_step_s": float("nan"),
                            "peak_memory_gib": float("nan"), "tflops_per_image": float("nan"), "mfu": float("nan"),
                            "flops_per_step": float("nan")})  # fmt: skip
            gc.collect()
            torch.cuda.empty_cache()
    for r in results:  # eager FLOP counts also hold for the compiled runs
        if not math.isfinite(r["flops_per_step"]) and math.isfinite(flops_cache.get(r["variant"], float("nan"))):
            r["flops_per_step"] = flops_cache[r["variant"]]
            r["tflops_per_image"] = r["flops_per_step"] / args.batch_size / 1e12
            r["mfu"] = r["flops_per_step"] / r["median_step_s"] / (peak_tflops(args.device) * 1e12)

    def find(name, compiled):
        return next((r for r in results if r["variant"] == name and r["compiled"] == compiled), None)

    ratios = {}
    for compiled in modes:
        b, a, c = find("ssreg", compiled), find("stock", False), find("plain", compiled)
        tag = "compiled" if compiled else "eager"
        if b and a:
            ratios[f"ssreg_{tag}_over_stock_eager"] = b["images_per_s"] / a["images_per_s"]
        if b and c:
            ratios[f"ssreg_{tag}_over_plain_{tag}"] = b["images_per_s"] / c["images_per_s"]
        stock_compiled = find("stock", True)
        if b and compiled and stock_compiled:
            ratios["ssreg_compiled_over_stock_compiled"] = b["images_per_s"] / stock_compiled["images_per_s"]
        for method in REGULARIZERS:  # each other method's step against SSReg's, in the same mode
            d = find(method, compiled)
            if method != "ssreg" and b and d:
                ratios[f"{method}_{tag}_over_ssreg_{tag}"] = d["images_per_s"] / b["images_per_s"]
            if method != "ssreg" and a and d:
                ratios[f"{method}_{tag}_over_stock_eager"] = d["images_per_s"] / a["images_per_s"]
    report = {
        "settings": vars(args),
        "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "ratios": ratios,
    }
    lines = [
        "| variant | img/s | median step (ms) | peak memory (GiB) | TFLOP/image | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['images_per_s']:.1f} | {r['median_step_s'] * 1e3:.0f} | {r['peak_memory_gib']:.1f} | "
            f"{r['tflops_per_image']:.2f} | {r['mfu']:.1%} |"
        )
    lines += [""] + [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    table = "\n".join(lines)
    print(table, flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if args.output_md:
        with open(args.output_md, "w") as f:
            f.write(table + "\n")
    return report


if __name__ == "__main__":
    main(parse_args())
