#!/usr/bin/env python
"""
Scaling over several GPUs and resuming on another number of processes, for examples/finetune_vae.py and
examples/train_dit.py, through real `accelerate launch` runs.

    python3 benchmarks/bench_multigpu.py --device cuda --num_processes 1,2 \
        --model_config_name_or_path benchmarks/configs/flux_vae --compile dit \
        --output_json bench_multigpu.json --output_md bench_multigpu.md

A thin driver over the example scripts: every number comes from a run of the script itself (`accelerate launch
--num_processes N`, with `--multi_gpu` when N > 1; on `--device cpu` a gloo group of CPU processes) and is read
back from what the script writes: `logs/train_metrics.jsonl` (learning rate, img/s and peak memory of every
step), `rank_checksums.json` (a SHA-256 of each rank's final weights) and the checkpoints' `training_state.json`.

First the data, always: crops of scikit-image's sample photographs written as JPEG class folders (`--num_images`),
and for the DiT a random-init VAE of `--model_config_name_or_path` and its latents, cached by
examples/cache_latents.py on one process.
Then the phases, in order (`--phases` picks some; a resume phase runs its script's measured runs too). Every run of
a script has its own time limit (`--phase_timeout_s`, and what is left of `--time_budget_s`); a failed or timed-out
run is recorded in its row while the others go on:

- `finetune`: finetune_vae.py on the random-init VAE for each process count, the total batch fixed
  (`--finetune_total_batch_size`, the paper's 32: each process takes 32 / N), `--finetune_steps` steps.
- `finetune_resume`: the checkpoint the largest count's run wrote halfway, resumed on the smallest count to the
  end, and the smallest count's, resumed on the largest. Each resumed run's logged learning rate at every step is
  compared with the uninterrupted run on the largest count (and so is the smallest count's uninterrupted run).
- `dit`: train_dit.py for each `--dit_presets` entry and process count, the batch per process fixed
  (`--dit_batch_size`; the total grows with the count), on the cached latents.
- `dit_resume`: the same resume cases for the first preset.

img/s is the script's own per-step figure (`img_per_s` with `--logging_steps 1`: images of the step over the time
between two logged steps, the host synchronized at each), summed over the steps after `--finetune_warmup_steps`
/ `--dit_warmup_steps` as images over seconds; the step after a checkpoint save or a validation is left out.
Scaling efficiency is img/s on N processes over N times img/s on the smallest count. Peak memory per rank is the
`peak_memory_gib_rank<i>` (`peak_memory_gib` on one process) of the last logged step, on CUDA only. Resumed runs
are not compiled: the learning rate does not depend on it. LPIPS runs with a random VGG backbone (no download),
at the cost of the ImageNet one. The exit status is 1 when any phase failed or any resume check did not pass.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing: the scripts get the same path

PHASES = ("finetune", "finetune_resume", "dit", "dit_resume")
COMPILABLE = ("finetune", "dit")
METRICS_LOG = os.path.join("logs", "train_metrics.jsonl")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def parse_counts(value: str):
    """`--num_processes`: comma-separated process counts, e.g. `1,2`."""
    try:
        counts = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated process counts >= 1 such as '1,2', got {value!r}.")
    return counts


def parse_names(value: str):
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--num_processes", type=parse_counts, default=[1, 2], help="Process counts, e.g. 1,2 or 1,2,4,8.")
    parser.add_argument("--phases", type=parse_names, default=list(PHASES), help=f"Comma-separated, of {', '.join(PHASES)}.")
    parser.add_argument("--compile", type=str, nargs="*", default=[], choices=COMPILABLE,
                        help="Pass --compile to these scripts' measured runs (not to the resumed ones).")  # fmt: skip
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "bf16"],
                        help="Both scripts' --mixed_precision (default: bf16 on cuda, no on cpu).")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataloader_num_workers", type=int, default=4, help="Data-loader workers per process.")
    # data
    parser.add_argument("--num_images", type=int, default=1024, help="Photo crops written for both scripts.")
    parser.add_argument("--model_config_name_or_path", type=str, default=os.path.join(ROOT, "benchmarks", "configs", "flux_vae"),
                        help="The VAE architecture (a config folder), random init: fine-tuned, and the DiT's encoder.")  # fmt: skip
    # finetune_vae.py
    parser.add_argument("--resolution", type=int, default=256, help="finetune_vae.py's --resolution.")
    parser.add_argument("--finetune_total_batch_size", type=int, default=32, help="Total batch; each process takes total / N.")
    parser.add_argument("--finetune_steps", type=int, default=30)
    parser.add_argument("--finetune_warmup_steps", type=int, default=5, help="Steps left out of img/s at the start.")
    parser.add_argument("--finetune_extra_args", type=str, default="",
                        help="More finetune_vae.py flags, one string (one flag alone: --finetune_extra_args=--flag).")  # fmt: skip
    # train_dit.py
    parser.add_argument("--dit_presets", type=parse_names, default=["DiT-B/2", "LightningDiT-B/2"], help="Comma-separated.")
    parser.add_argument("--dit_resolution", type=int, default=256, help="Resolution of the cached images (latents: / 8 for Flux).")
    parser.add_argument("--dit_batch_size", type=int, default=256, help="train_dit.py's --train_batch_size (per process).")
    parser.add_argument("--dit_steps", type=int, default=40)
    parser.add_argument("--dit_warmup_steps", type=int, default=10, help="Steps left out of img/s at the start.")
    parser.add_argument("--dit_transformer_config", type=str, default=None, help="train_dit.py's --transformer_config.")
    parser.add_argument("--dit_extra_args", type=str, default="",
                        help="More train_dit.py flags, one string (one flag alone: --dit_extra_args=--flag).")  # fmt: skip
    # limits and output
    parser.add_argument("--phase_timeout_s", type=float, default=600.0, help="Time limit of one run of a script.")
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="Time limit of the whole command: later runs get what is left, or are skipped.")  # fmt: skip
    parser.add_argument("--lr_tolerance", type=float, default=1e-12, help="Largest LR difference a resume check passes with.")
    parser.add_argument("--work_dir", type=str, default=None, help="Runs, data and logs (default: a temporary folder).")
    parser.add_argument("--keep_work_dir", action="store_true", help="Keep --work_dir (checkpoints included) at the end.")
    parser.add_argument("--output_json", type=str, default="bench_multigpu.json")
    parser.add_argument("--output_md", type=str, default=None, help="Default: --output_json with .md.")
    args = parser.parse_args(input_args)
    check_args(args)
    return args


def check_args(args) -> None:
    """Every bad value as a ValueError naming the flag, before any run."""
    from diffusers_ssreg.lightningdit import PRESETS

    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        raise ValueError(f"--phases {','.join(args.phases)!r}: unknown {unknown}; choose from {', '.join(PHASES)}.")
    for name in ("num_images", "resolution", "finetune_total_batch_size", "dit_resolution", "dit_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("finetune", "dit"):
        steps, warmup = getattr(args, f"{name}_steps"), getattr(args, f"{name}_warmup_steps")
        if steps < 2:
            raise ValueError(f"--{name}_steps must be >= 2 (a checkpoint is written halfway), got {steps}.")
        if not 0 <= warmup < steps - 2:
            raise ValueError(f"--{name}_warmup_steps must be in [0, {steps - 2}) for --{name}_steps {steps}, got {warmup}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.phase_timeout_s <= 0 or (args.time_budget_s is not None and args.time_budget_s <= 0):
        raise ValueError(f"--phase_timeout_s and --time_budget_s must be positive, got {args.phase_timeout_s}, {args.time_budget_s}.")
    bad = [n for n in args.num_processes if args.finetune_total_batch_size % n]
    if bad and any(p.startswith("finetune") for p in args.phases):
        raise ValueError(f"--finetune_total_batch_size {args.finetune_total_batch_size} is not divisible by the process "
                         f"count(s) {bad} of --num_processes: each process must take the same share.")  # fmt: skip
    unknown = [p for p in args.dit_presets if p not in PRESETS]
    if unknown or not args.dit_presets:
        raise ValueError(f"--dit_presets {args.dit_presets}: unknown {unknown}; choose from {list(PRESETS)}.")
    if "dit" in args.phases and args.num_images < args.dit_batch_size * args.num_processes[-1]:
        raise ValueError(f"--num_images {args.num_images} makes no batch of --dit_batch_size {args.dit_batch_size} on "
                         f"{args.num_processes[-1]} processes: at least {args.dit_batch_size * args.num_processes[-1]}.")  # fmt: skip
    if args.device == "cpu" and args.mixed_precision == "bf16":
        raise ValueError("--mixed_precision bf16 is for --device cuda; on cpu use no.")
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    if not os.path.isdir(args.model_config_name_or_path):
        raise ValueError(f"--model_config_name_or_path {args.model_config_name_or_path!r} is not a folder holding a VAE config.json.")
    args.model_config_name_or_path = os.path.abspath(args.model_config_name_or_path)
    args.work_dir = os.path.abspath(args.work_dir) if args.work_dir else None
    for name in ("finetune_extra_args", "dit_extra_args"):
        shlex.split(getattr(args, name))  # unbalanced quotes fail here
    args.output_md = args.output_md or os.path.splitext(args.output_json)[0] + ".md"


# ----------------------------------------------------------------------------------------------
# Running a script: `accelerate launch` in its own process group, with a time limit
# ----------------------------------------------------------------------------------------------


class Clock:
    """The command's elapsed time and what is left of `--time_budget_s` for the next run."""

    def __init__(self, phase_timeout_s: float, budget_s=None):
        self.start, self.phase_timeout_s, self.budget_s = time.perf_counter(), phase_timeout_s, budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def limit(self) -> float:
        if self.budget_s is None:
            return self.phase_timeout_s
        return min(self.phase_timeout_s, self.budget_s - self.elapsed())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: str, script_args, num_processes: int, args):
    """`accelerate launch` of `script` on `num_processes` processes of `args.device`, and its environment."""
    env = dict(os.environ)  # keeps the caller's settings (NCCL's included)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]  # fmt: skip
    if num_processes > 1:
        command.append("--multi_gpu")
        if args.device == "cpu":  # torchrun-style processes in one gloo group
            env["ACCELERATE_USE_CPU"] = "1"
    elif args.device == "cpu":
        command.append("--cpu")
    return command + [os.path.join(ROOT, script), *script_args], env


def run_logged(command, env, log_path: str, limit_seconds: float):
    """Runs `command` with its output in `log_path`; returns `(status, seconds, error)`: status ok, error or timeout."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, limit_seconds))
        except subprocess.TimeoutExpired:
            stop_group(process)
            return "timeout", time.perf_counter() - started, f"stopped after the time limit of {limit_seconds:.0f} s"
    seconds = time.perf_counter() - started
    if code != 0:
        return "error", seconds, f"exit status {code}: {error_summary(log_path)}"
    return "ok", seconds, None


def stop_group(process) -> None:
    """SIGTERM to the launcher's process group (the launcher and every rank), then SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


ERROR_LINE = re.compile(r"^\s*(\[rank\d+\]:\s*)?([\w.]*(Error|Exception)\b.*|.*\berror: .*)$")
LAUNCHER_ERRORS = ("CalledProcessError", "ChildFailedError")  # the launcher's report that a rank failed


def error_summary(log_path: str, lines: int = 2) -> str:
    """The last lines of a run's log that name an error (a script's, not the launcher's report of it), else its last lines."""
    with open(log_path, errors="replace") as f:
        text = [line.rstrip() for line in f if line.strip()]
    errors = [line.strip() for line in text if ERROR_LINE.match(line) and not any(e in line for e in LAUNCHER_ERRORS)]
    return " | ".join((errors or text)[-lines:])[-600:]


# ----------------------------------------------------------------------------------------------
# Reading what the scripts wrote
# ----------------------------------------------------------------------------------------------


def read_metrics(output_dir: str):
    """The entries of `logs/train_metrics.jsonl` (a line cut short by a stopped run is skipped)."""
    from diffusers_ssreg.training import read_metrics_log

    return read_metrics_log(os.path.join(output_dir, METRICS_LOG))


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def throughput(metrics, total_batch: int, warmup: int, left_out):
    """Images over seconds of the logged steps after `warmup`, `left_out` steps excluded; `(img/s, steps)`."""
    kept = [m for m in metrics if m["step"] > warmup and m["step"] not in left_out and m.get("img_per_s")]
    if not kept:
        return None, 0
    seconds = sum(total_batch / m["img_per_s"] for m in kept)
    return len(kept) * total_batch / seconds, len(kept)


def peak_memory_per_rank(metrics, num_processes: int):
    """Each rank's peak CUDA memory (GiB) at the last logged step, or None when not logged (CPU)."""
    if not metrics:
        return None
    last = metrics[-1]
    if num_processes > 1 and f"peak_memory_gib_rank{num_processes - 1}" in last:
        return [last[f"peak_memory_gib_rank{rank}"] for rank in range(num_processes)]
    return [last["peak_memory_gib"]] if "peak_memory_gib" in last and num_processes == 1 else None


# ----------------------------------------------------------------------------------------------
# The phases
# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.clock = Clock(args.phase_timeout_s, args.time_budget_s)
        self.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_multigpu_")
        os.makedirs(self.work_dir, exist_ok=True)
        self.images = os.path.join(self.work_dir, "images")
        self.vae = os.path.join(self.work_dir, "vae")
        self.latents = os.path.join(self.work_dir, "latents")
        self.rows = []
        self.report = {
            "settings": {k: v for k, v in vars(args).items()},
            "command": shlex.join([os.path.relpath(sys.argv[0], os.getcwd()) if sys.argv[0] else "", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"),
            "environment": environment(args.device),
            "work_dir": self.work_dir,
            "rows": self.rows,
        }

    # --- bookkeeping ---

    def say(self, text: str) -> None:
        print(f"[{self.clock.elapsed():7.1f} s] {text}", flush=True)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        status = row["status"] + (f": {row['error']}" if row.get("error") else "")
        self.say(f"{row['phase']} | {row['name']}: {status}")
        return row

    def run(self, script, script_args, num_processes, output_dir):
        """Launches one script run (or skips it when the time budget is spent); `(status, seconds, error)`."""
        limit = self.clock.limit()
        if limit < 10:
            return "skipped", 0.0, "the time budget (--time_budget_s) is spent"
        self.say(f"  accelerate launch --num_processes {num_processes} {script} -> {output_dir} (limit {limit:.0f} s)")
        command, env = launch_command(script, script_args, num_processes, self.args)
        os.makedirs(os.path.dirname(output_dir), exist_ok=True)
        return run_logged(command, env, output_dir + ".log", limit)

    # --- data ---

    def data(self) -> bool:
        args, row = self.args, {"phase": "data", "name": "images, VAE and latent cache", "status": "ok", "error": None}
        started = time.perf_counter()
        try:
            write_photo_crops(self.images, args.num_images, max(args.resolution, args.dit_resolution), args.seed)
            needs_latents = any(p in args.phases for p in ("dit", "dit_resume"))
            if needs_latents:
                save_random_vae(args.model_config_name_or_path, self.vae, args.seed)
                cache = ["--pretrained_vae_model_name_or_path", self.vae, "--train_data_dir", self.images,
                         "--resolution", str(args.dit_resolution), "--output_dir", self.latents, "--batch_size", "64",
                         "--dataloader_num_workers", str(args.dataloader_num_workers), "--seed", str(args.seed),
                         "--mixed_precision", args.mixed_precision]  # fmt: skip
                done = self.latents + ".args.json"  # a cache made with these very arguments is reused
                if read_json(done) != [args.model_config_name_or_path, args.seed, *cache]:
                    status, _, error = self.run("examples/cache_latents.py", cache, 1, self.latents)
                    row.update(status=status, error=error)
                    if status == "ok":
                        with open(done, "w") as f:
                            json.dump([args.model_config_name_or_path, args.seed, *cache], f)
        except Exception as error:  # a failed phase is a row, never the end of the command
            row.update(status="error", error=f"{type(error).__name__}: {error}")
        row["wall_s"] = time.perf_counter() - started
        return self.add(row)["status"] == "ok"

    # --- throughput runs (they are also the uninterrupted runs the resume checks compare with) ---

    def finetune_args(self, num_processes, output_dir, steps, compile_):
        args = self.args
        holdout = 2
        repeats = math.ceil((steps + 2) * args.finetune_total_batch_size / max(1, args.num_images - holdout)) + 1
        flags = ["--model_config_name_or_path", args.model_config_name_or_path, "--train_data_dir", self.images,
                 "--resolution", str(args.resolution), "--train_batch_size", str(args.finetune_total_batch_size // num_processes),
                 "--max_train_steps", str(steps), "--train_data_repeats", str(repeats), "--seed", str(args.seed),
                 "--mixed_precision", args.mixed_precision, "--logging_steps", "1", "--checkpointing_steps", str(steps // 2),
                 "--validation_steps", str(steps), "--num_validation_images", str(holdout), "--report_to", "none",
                 "--no_recompute_latent_statistics", "--dataloader_num_workers", str(args.dataloader_num_workers),
                 "--ssreg_lpips_pretrained_backbone", "false", "--output_dir", output_dir]  # fmt: skip
        return flags + (["--compile"] if compile_ else []) + shlex.split(args.finetune_extra_args)

    def dit_args(self, preset, num_processes, output_dir, steps, compile_):
        args = self.args
        flags = ["--latents_dir", self.latents, "--preset", preset, "--train_batch_size", str(args.dit_batch_size),
                 "--max_train_steps", str(steps), "--seed", str(args.seed), "--mixed_precision", args.mixed_precision,
                 "--lr_scheduler", "cosine", "--lr_warmup_steps", str(max(1, steps // 5)), "--logging_steps", "1",
                 "--checkpointing_steps", str(steps // 2), "--validation_steps", str(steps), "--num_validation_images", "1",
                 "--validation_inference_steps", "1", "--report_to", "none",
                 "--dataloader_num_workers", str(args.dataloader_num_workers), "--output_dir", output_dir]  # fmt: skip
        if args.dit_transformer_config:
            flags += ["--transformer_config", args.dit_transformer_config]
        return flags + (["--compile"] if compile_ else []) + shlex.split(args.dit_extra_args)

    def measure(self, script, model, num_processes, output_dir, script_args, steps, warmup, left_out, batch_per_process):
        shutil.rmtree(output_dir, ignore_errors=True)
        status, seconds, error = self.run(script, script_args, num_processes, output_dir)
        metrics = read_metrics(output_dir)
        state = read_json(os.path.join(output_dir, f"checkpoint-{steps}", "training_state.json"), {})
        total_batch = state.get("total_batch_size", batch_per_process * num_processes)
        img_per_s, timed = throughput(metrics, total_batch, warmup, left_out)
        checksums = read_json(os.path.join(output_dir, "rank_checksums.json"))
        return self.add({
            "phase": "finetune" if script.endswith("finetune_vae.py") else "dit", "name": f"{model}, {num_processes} process(es)",
            "script": script, "model": model, "num_processes": num_processes, "batch_per_process": batch_per_process,
            "total_batch": total_batch, "steps": steps, "steps_logged": len(metrics), "steps_timed": timed,
            "img_per_s": img_per_s, "scaling_efficiency": None,
            "peak_memory_gib_per_rank": peak_memory_per_rank(metrics, num_processes),
            "rank_checksums": checksums,
            "checksums_identical": (len(checksums) == num_processes and len(set(checksums)) == 1) if checksums else None,
            "status": status, "error": error, "wall_s": seconds, "output_dir": output_dir,
        })  # fmt: skip

    def finetune(self):
        args = self.args
        steps = args.finetune_steps
        left_out = {2} | {k + 1 for k in range(steps // 2, steps, steps // 2)}  # after step 1's validation, after saves
        runs = {}
        for n in args.num_processes:
            output = os.path.join(self.work_dir, "finetune", f"np{n}")
            flags = self.finetune_args(n, output, steps, "finetune" in args.compile)
            runs[n] = self.measure("examples/finetune_vae.py", "VAE", n, output, flags, steps,
                                   args.finetune_warmup_steps, left_out, args.finetune_total_batch_size // n)  # fmt: skip
        set_scaling(runs)
        return runs

    def dit(self):
        args = self.args
        steps = args.dit_steps
        left_out = {k + 1 for k in range(steps // 2, steps, steps // 2)}
        runs = {}
        for preset in args.dit_presets:
            runs[preset] = {}
            for n in args.num_processes:
                output = os.path.join(self.work_dir, "dit", preset.replace("/", "_"), f"np{n}")
                flags = self.dit_args(preset, n, output, steps, "dit" in args.compile)
                runs[preset][n] = self.measure("examples/train_dit.py", preset, n, output, flags, steps,
                                               args.dit_warmup_steps, left_out, args.dit_batch_size)  # fmt: skip
            set_scaling(runs[preset])
        return runs

    # --- resume across process counts ---

    def resume(self, phase, model, runs, make_args, steps, same_total_batch):
        """Resumes the smallest count's halfway checkpoint on the largest count and the other way round."""
        low, high = self.args.num_processes[0], self.args.num_processes[-1]
        half = steps // 2
        reference = runs[high]
        cases = [(f"uninterrupted on {low} vs on {high}", None, low)]
        cases += [(f"{high} -> {low} processes", high, low), (f"{low} -> {high} processes", low, high)]
        for name, source, target in cases:
            row = {"phase": phase, "name": f"{model}, {name}", "model": model, "case": name, "steps": steps,
                   "reference": f"uninterrupted on {high}", "status": "ok", "error": None}  # fmt: skip
            if reference["status"] != "ok" or runs[source or target]["status"] != "ok":
                row.update(status="skipped", error="needs the uninterrupted runs, which did not finish")
                self.add(row)
                continue
            if source is None:  # the other uninterrupted run, against the reference
                lrs, seconds, resumed_steps = lr_by_step(read_metrics(runs[target]["output_dir"])), 0.0, None
                state = read_json(os.path.join(runs[target]["output_dir"], f"checkpoint-{steps}", "training_state.json"))
            else:
                output = os.path.join(self.work_dir, phase, model.replace("/", "_"), f"resume_{source}to{target}")
                shutil.rmtree(output, ignore_errors=True)
                checkpoint = os.path.join(runs[source]["output_dir"], f"checkpoint-{half}")
                flags = make_args(target, output) + ["--resume_from_checkpoint", checkpoint]
                status, seconds, error = self.run(runs[source]["script"], flags, target, output)
                resumed = read_metrics(output)
                resumed_steps = [m["step"] for m in resumed]
                first = {s: lr for s, lr in lr_by_step(read_metrics(runs[source]["output_dir"])).items() if s <= half}
                lrs = {**first, **lr_by_step(resumed)}
                state = read_json(os.path.join(output, f"checkpoint-{steps}", "training_state.json"))
                row.update(status=status, error=error, output_dir=output)
            expected = lr_by_step(read_metrics(reference["output_dir"]))
            complete = sorted(lrs) == list(range(1, steps + 1)) and sorted(expected) == list(range(1, steps + 1))
            difference = max((abs(lrs[s] - expected[s]) for s in expected if s in lrs), default=None)
            reference_state = read_json(os.path.join(reference["output_dir"], f"checkpoint-{steps}", "training_state.json"))
            position = None
            if same_total_batch and state and reference_state:
                keys = ("epoch", "epoch_samples", "samples_seen")
                position = all(state[k] == reference_state[k] for k in keys)
            row.update(
                wall_s=seconds, resumed_steps=resumed_steps, steps_complete=complete, max_abs_lr_difference=difference,
                data_position_matches=position,
                passed=bool(row["status"] == "ok" and complete and difference is not None
                            and difference <= self.args.lr_tolerance and position is not False
                            and (resumed_steps is None or resumed_steps == list(range(half + 1, steps + 1)))),
            )  # fmt: skip
            self.add(row)

    # --- output ---

    def write(self) -> None:
        with open(self.args.output_json, "w") as f:
            json.dump(self.report, f, indent=2, default=str)
        with open(self.args.output_md, "w") as f:
            f.write(markdown(self.report))


def set_scaling(runs: dict) -> None:
    """Scaling efficiency of each count against the smallest: img/s(N) / (N / N_0 x img/s(N_0))."""
    base_count = min(runs)
    base = runs[base_count]["img_per_s"]
    for n, row in runs.items():
        if base and row["img_per_s"]:
            row["scaling_efficiency"] = row["img_per_s"] / (base * n / base_count)


def lr_by_step(metrics) -> dict:
    return {m["step"]: m["lr"] for m in metrics if "lr" in m}


def write_photo_crops(folder: str, count: int, size: int, seed: int) -> None:
    """`count` random square crops (`size` px, JPEG) of scikit-image's sample photographs, one class folder per photo."""
    import numpy as np
    from PIL import Image

    from diffusers_ssreg.data import EMBEDDED_TRAIN_PHOTOS, embedded_photos

    marker = os.path.join(folder, f"done-{count}-{size}-{seed}")
    if os.path.isfile(marker):
        return
    shutil.rmtree(folder, ignore_errors=True)
    photos = embedded_photos("train")
    rng = np.random.default_rng(seed)
    for i in range(count):
        k = i % len(photos)
        photo, name = photos[k], EMBEDDED_TRAIN_PHOTOS[k]
        short = min(photo.size)
        side = int(rng.integers(min(size, short), short + 1))
        left, top = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        crop.save(os.path.join(folder, name, f"{i:05d}.jpg"), quality=95)
    open(marker, "w").close()


def save_random_vae(config_folder: str, folder: str, seed: int) -> None:
    """A random-init VAE of the config's architecture, saved for examples/cache_latents.py and train_dit.py."""
    import torch

    from diffusers_ssreg.vae import load_vae

    torch.manual_seed(seed)
    load_vae(config_folder, from_config=True, flag="--model_config_name_or_path").save_pretrained(folder)


def collect_logs(work_dir: str, folder: str) -> str:
    """Copies every run's log and `train_metrics.jsonl` (not the checkpoints) to `folder`, mirroring the runs' paths."""
    for directory, _, names in os.walk(work_dir):
        for name in names:
            if name.endswith(".log") or name == os.path.basename(METRICS_LOG):
                relative = os.path.relpath(os.path.join(directory, name), work_dir)
                os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
                shutil.copyfile(os.path.join(directory, name), os.path.join(folder, relative))
    return folder


def environment(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info.update(gpus=torch.cuda.device_count(), gpu_name=torch.cuda.get_device_name(0))
    return info


# ----------------------------------------------------------------------------------------------
# The markdown table
# ----------------------------------------------------------------------------------------------


def number(value, form="{:.1f}") -> str:
    return "–" if value is None else form.format(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    device = f"{env.get('gpus', '')} x {env['gpu_name']}" if env.get("gpu_name") else env["device"]
    lines = [f"Device: {device}, torch {env['torch']}, {report['date']}. Command: `{report['command']}`", ""]
    measured = [r for r in report["rows"] if r["phase"] in ("finetune", "dit")]
    if measured:
        lines += ["| script | model | processes | batch per process | total batch | img/s | scaling efficiency | "
                  "peak memory per rank (GiB) | ranks' weights identical | status |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|---|"]  # fmt: skip
        for r in measured:
            memory = " / ".join(f"{m:.1f}" for m in r["peak_memory_gib_per_rank"]) if r["peak_memory_gib_per_rank"] else "–"
            same = {True: "yes", False: "**no**", None: "–"}[r["checksums_identical"]]
            status = r["status"] + (f" ({r['error']})" if r["error"] else "")
            lines.append(
                f"| {os.path.basename(r['script'])} | {r['model']} | {r['num_processes']} | {r['batch_per_process']} | "
                f"{r['total_batch']} | {number(r['img_per_s'])} | {number(r['scaling_efficiency'], '{:.2f}')} | {memory} | "
                f"{same} | {status} |"
            )
        lines.append("")
    resumed = [r for r in report["rows"] if r["phase"].endswith("_resume")]
    if resumed:
        lines += ["| script | model | case | steps | max abs LR difference vs the reference | data position | result |",
                  "|---|---|---|---:|---:|---|---|"]  # fmt: skip
        for r in resumed:
            script = "finetune_vae.py" if r["phase"] == "finetune_resume" else "train_dit.py"
            position = {True: "same", False: "**differs**", None: "–"}[r.get("data_position_matches")]
            result = "pass" if r.get("passed") else "**fail**"
            if r["status"] != "ok":
                result = f"{r['status']} ({r['error']})"
            lines.append(
                f"| {script} | {r['model']} | {r['case']} | {r['steps']} | {number(r.get('max_abs_lr_difference'), '{:.1e}')} "
                f"| {position} | {result} |"
            )
        lines.append("")
    other = [r for r in report["rows"] if r["phase"] == "data" and r["status"] != "ok"]
    lines += [f"- {r['name']}: {r['status']} ({r['error']})" for r in other]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(args) -> int:
    bench = Bench(args)
    bench.say(f"work folder {bench.work_dir}; phases {', '.join(args.phases)}; process counts {args.num_processes}")
    data_ok = bench.data()
    two_counts = len(args.num_processes) > 1
    for phase in ("finetune_resume", "dit_resume"):
        if phase in args.phases and not two_counts:
            bench.add({"phase": phase, "name": "resume", "status": "skipped", "error": "needs two process counts"})
    if "finetune" in args.phases or "finetune_resume" in args.phases:
        if not data_ok:
            bench.add({"phase": "finetune", "name": "finetune_vae.py", "status": "skipped", "error": "no data"})
        else:
            runs = bench.finetune()
            if "finetune_resume" in args.phases and two_counts:
                make = lambda n, out: bench.finetune_args(n, out, args.finetune_steps, False)  # noqa: E731
                bench.resume("finetune_resume", "VAE", runs, make, args.finetune_steps, same_total_batch=True)
    if "dit" in args.phases or "dit_resume" in args.phases:
        if not data_ok:
            bench.add({"phase": "dit", "name": "train_dit.py", "status": "skipped", "error": "no latent cache"})
        else:
            runs = bench.dit()
            if "dit_resume" in args.phases and two_counts:
                preset = args.dit_presets[0]
                make = lambda n, out: bench.dit_args(preset, n, out, args.dit_steps, False)  # noqa: E731
                bench.resume("dit_resume", preset, runs[preset], make, args.dit_steps, same_total_batch=False)
    bench.write()
    print(markdown(bench.report), flush=True)
    failed = [r for r in bench.rows if r["status"] != "ok" or r.get("passed") is False or r.get("checksums_identical") is False]
    bench.say(f"done: {len(bench.rows)} rows, {len(failed)} not ok; {args.output_json}, {args.output_md}")
    logs = collect_logs(bench.work_dir, os.path.splitext(args.output_json)[0] + "_logs")
    bench.say(f"the runs' logs and train_metrics.jsonl files are in {logs}")
    if not args.keep_work_dir and args.work_dir is None:
        shutil.rmtree(bench.work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
