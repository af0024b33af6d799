"""What the example scripts share: flags, the LR schedule, atomic checkpoints, resume, the NaN guard, and
the training loop itself (`TrainingLoop`).

Written against Accelerate's `save_state`/`load_state` and diffusers' conventions
(`checkpoint-<step>` folders, `--resume_from_checkpoint latest`, `--checkpoints_total_limit`).

The learning rate is a function of the optimizer step alone (the number of optimizer updates taken,
the same on every process), and the data position is counted in samples: a checkpoint resumes on any
number of processes with the schedule it was on (docs/finetune.md says exactly what carries over).
"""

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .utils import HelpFormatter, add_deprecated_alias  # noqa: F401  (the scripts' flag helpers, re-exported)


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
METRICS_LOG_NAME = "train_metrics.jsonl"


# --------------------------------------------------------------------------------------------
# The command-line flags every training script shares (diffusers' example-script names)
# --------------------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """Adds the optimization, logging, checkpoint and Hub flags; `defaults` overrides their defaults per script."""
    group = parser.add_argument_group("training (shared by the example scripts)")
    add = group.add_argument
    add("--output_dir", type=str, default="output", help="Where checkpoints, logs and the trained model go.")
    add("--seed", type=int, default=0, help="Seeds data order, augmentation and the model's random draws.")
    add("--train_batch_size", type=int, default=32, help="Per-device batch size.")
    add("--max_train_steps", type=int, default=None, help="Optimizer steps to train.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    add("--gradient_checkpointing", action="store_true", help="Recompute activations in the backward to save memory.")
    add("--learning_rate", type=float, default=1e-4, help="Base learning rate.")
    add("--adam_beta1", type=float, default=0.9, help="AdamW's beta1.")
    add("--adam_beta2", type=float, default=0.999, help="AdamW's beta2.")
    add("--adam_weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay.")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW's epsilon.")
    add("--max_grad_norm", type=float, default=None, help="Clip gradients to this norm (default: no clipping).")
    add("--max_nonfinite_steps", type=int, default=5, help="Stop after this many NaN/inf steps in a row.")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Autocast precision (default: Accelerate's configuration).")  # fmt: skip
    add("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    add("--deterministic", action="store_true",
        help="Only deterministic kernels (torch.use_deterministic_algorithms, cuDNN without autotuning): the same "
             "seed, data, hardware and software give bit-identical weights. Slower; eager only (not with --compile).")  # fmt: skip
    add("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes per device.")
    add("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    add("--logging_dir", type=str, default="logs", help="Tracker and train_metrics.jsonl folder, inside --output_dir.")
    add("--logging_steps", type=int, default=10, help="Read losses back from the device every N steps.")
    add("--validation_steps", type=int, default=None, help="Validate every N steps (default: 10 times a run).")
    add("--num_validation_images", type=int, default=8, help="Images in the validation grid.")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints (default: all).")
    add("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    add("--push_to_hub", action="store_true",
        help="Upload the result (no checkpoints or logs); the Hub repo is created before training.")  # fmt: skip
    add("--hub_model_id", type=str, default=None, help="Hub repo id (default: the output folder's name).")
    add("--hub_token", type=str, default=None, help="Hub token (default: the one `hf auth login` stored).")
    add("--hub_private", action="store_true", help="Create the Hub repo private.")
    unknown = set(defaults) - {a.dest for a in group._group_actions}
    if unknown:
        raise ValueError(f"no shared training flags named {sorted(unknown)}")
    parser.set_defaults(**defaults)


def check_training_arguments(args, positive=(), optional_positive=()) -> None:
    """
    Cross-argument checks of the shared flags (plus the script's own `positive` ones): ValueError before
    any work. `--resume_from_checkpoint` must name a complete checkpoint folder (or be `latest`), and
    `--push_to_hub` needs the Hub not to be in offline mode.
    """
    for name in ("train_batch_size", "gradient_accumulation_steps", "logging_steps", "checkpointing_steps",
                 "num_validation_images", "max_nonfinite_steps", *positive):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit", *optional_positive):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise ValueError(f"--max_grad_norm must be positive, got {args.max_grad_norm}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.deterministic and getattr(args, "compile", False):
        raise ValueError("--deterministic with --compile: the compiler autotunes its kernels in every run, so two "
                         "compiled runs need not match bit for bit. Drop one of the two flags.")  # fmt: skip
    resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)  # a missing folder fails here
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = os.path.basename(os.path.normpath(args.output_dir))
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ValueError("--hub_token with --report_to wandb would expose the token: use `hf auth login`.")
    if args.push_to_hub:
        from .hub import check_not_offline

        check_not_offline(folder=args.output_dir, repo_id=args.hub_model_id)


def setup_accelerator(args, dynamo_backend=None, **dataloader_options):
    """
    The `Accelerator` of a training script from the shared flags (diffusers' example-script setup):
    logging, tracker and project folders, a seedable sampler with one data order for all ranks, device-specific
    seeds (each rank draws its own noise), TF32 and deterministic kernels when asked. With `--push_to_hub` the Hub
    repository is created now, before any work (as diffusers' scripts do). `dynamo_backend` compiles the prepared
    model through Accelerate; `dataloader_options` go to `DataLoaderConfiguration`. Returns
    `(accelerator, logging_dir)`.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    if args.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first call
        # (https://docs.nvidia.com/cuda/cublas/#results-reproducibility); cuDNN's autotuning may pick another
        # algorithm in each run, so it stays off.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # One data order for every process, seeded by --seed: the seedable sampler would otherwise take each
        # process's own (device-specific) seed, and the processes would shard different permutations.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, **dataloader_options),
        dynamo_backend=dynamo_backend,
    )
    logger.info("%s", accelerator.state)
    set_seed(args.seed, device_specific=True, deterministic=args.deterministic)
    if args.deterministic:
        logger.info("Deterministic kernels only (CUBLAS_WORKSPACE_CONFIG=%s)", os.environ["CUBLAS_WORKSPACE_CONFIG"])
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.push_to_hub and accelerator.is_main_process:
        from .hub import create_hub_repo

        args.hub_model_id = create_hub_repo(args.hub_model_id, args.hub_token, args.hub_private, folder=args.output_dir)
    return accelerator, logging_dir


# --------------------------------------------------------------------------------------------
# Learning-rate schedule (Table 2, A.5): a function of the optimizer step
# --------------------------------------------------------------------------------------------


def paper_lr_factor(
    step: int,
    num_training_steps: int,
    base_lr: float,
    warmup_start_lr: float = 1e-7,
    min_lr: float = 1e-6,
    warmup_ratio: float = 0.1,
    decay_ratio: float = 0.5,
) -> float:
    """
    Multiplier of the base LR at `step` (A.5): linear warm-up from `warmup_start_lr` over the first
    `warmup_ratio` of training, constant, then cosine down to `min_lr` over the last `decay_ratio`.
    """
    warmup_steps = int(round(warmup_ratio * num_training_steps))
    decay_steps = int(round(decay_ratio * num_training_steps))
    decay_start = num_training_steps - decay_steps
    start, floor = warmup_start_lr / base_lr, min_lr / base_lr
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def get_paper_scheduler(optimizer: torch.optim.Optimizer, num_training_steps: int, base_lr: float, **kwargs):
    """A `LambdaLR` applying `paper_lr_factor` to every parameter group (A and Δ keep their 0.1x ratio)."""
    if num_training_steps < 1:
        raise ValueError(f"`num_training_steps` must be >= 1, got {num_training_steps}.")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: paper_lr_factor(step, num_training_steps, base_lr, **kwargs)
    )


def set_scheduler_step(lr_scheduler, step: int) -> None:
    """
    Puts a `LambdaLR` (`get_paper_scheduler`, every diffusers `get_scheduler` schedule) at optimizer step
    `step`, learning rates included. On resume the schedule is set from the checkpoint's global step, never
    from a restored scheduler counter (which counts in whatever unit the saving run stepped it).
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # an AcceleratedScheduler's inner one
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"expected a LambdaLR (the LR as a function of the step), got {type(scheduler).__name__}.")
    values = [base_lr * factor(step) for factor, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, value in zip(scheduler.optimizer.param_groups, values):
        group["lr"] = value
    scheduler.last_epoch, scheduler._step_count, scheduler._last_lr = step, step + 1, values


# --------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed (atomic on POSIX)
# --------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete `checkpoint-<step>` folders in `output_dir`, oldest first (unfinished `.tmp` folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def checkpoint_step(path: str) -> int:
    """The global step encoded in a `checkpoint-<step>` folder name."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise ValueError(f"{path!r} is not a `checkpoint-<step>` folder.")
    return int(match.group(1))


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """
    The checkpoint folder to resume from: `"latest"` picks the newest complete one in `output_dir`
    (None when there is none: a fresh start); a path must be a complete checkpoint folder.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} is not 'latest' or an existing folder.")
    checkpoint_step(path)
    return path


def prune_checkpoints(output_dir: str, total_limit: Optional[int]) -> None:
    """Removes the oldest complete checkpoints so that at most `total_limit` remain."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        logger.info("Removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int] = None, extra=None) -> str:
    """
    Saves `accelerator.save_state` as `output_dir/checkpoint-<step>` atomically: every process writes
    into `checkpoint-<step>.tmp`, then the main process renames it and only then removes checkpoints
    beyond `total_limit`. A crash or Ctrl-C mid-save leaves a `.tmp` folder, which resume never
    picks (and the next save replaces), beside the previous checkpoints, which it still has.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    if accelerator.is_main_process:
        with open(os.path.join(temporary, TRAINING_STATE_NAME), "w") as f:
            json.dump({"global_step": step, **(extra or {})}, f, indent=2)
        _fsync_tree(temporary)
        if os.path.isdir(final):  # re-saving the same step (e.g. the final save): replace it
            shutil.rmtree(final)
        os.replace(temporary, final)
        # Only now, with the new checkpoint complete, do old ones go: a crash mid-save keeps them.
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(root: str) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())


def read_training_state(checkpoint: str) -> dict:
    """The `training_state.json` of a checkpoint (at least `global_step`)."""
    path = os.path.join(checkpoint, TRAINING_STATE_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"global_step": checkpoint_step(checkpoint)}


def log_metrics(accelerator, logging_dir: str, step: int, metrics: dict) -> None:
    """`accelerator.log` under `train/`, plus a plain-text copy in `logging_dir/train_metrics.jsonl` (any tracker, or none)."""
    accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        os.makedirs(logging_dir, exist_ok=True)
        with open(os.path.join(logging_dir, METRICS_LOG_NAME), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def peak_memory_logs(accelerator) -> Dict[str, float]:
    """
    `peak_memory_gib`: this process's peak allocated CUDA memory (`torch.cuda.max_memory_allocated`), in GiB; with
    several processes also every rank's, `peak_memory_gib_rank<i>` (gathered: call it on every process).
    """
    peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    logs = {"peak_memory_gib": peak}
    if accelerator.num_processes > 1:
        peaks = accelerator.gather(torch.tensor([peak], dtype=torch.float64, device=accelerator.device)).tolist()
        logs.update({f"peak_memory_gib_rank{rank}": value for rank, value in enumerate(peaks)})
    return logs


def read_metrics_log(path: str) -> List[dict]:
    """
    The entries of a `train_metrics.jsonl` (`path`: the file, or the logging folder holding it), in order; a line
    cut short by a run stopped mid-write is skipped. An absent file has no entries.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_LOG_NAME)
    entries = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
    return entries


def truncate_metrics_log(logging_dir: str, step: int) -> None:
    """Drops the `train_metrics.jsonl` entries after `step` (a resumed run logs those steps again): each step once."""
    path = os.path.join(logging_dir, METRICS_LOG_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash mid-write
            continue
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        logger.info("Resuming at step %d: dropped %d later entries of %s.", step, len(lines) - len(kept), path)


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------


class NonFiniteGuard:
    """
    Skips optimizer steps whose gradient norm is NaN/inf and stops the run after `max_consecutive`
    of them in a row. The gradient norm is the all-reduced one, so every rank takes the same decision.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"`max_consecutive` must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0
        self._run = self._skipped = None  # device-side counters of `flag`

    def check(self, grad_norm: torch.Tensor, step: int) -> bool:
        """True when the step may be taken; False to skip it. Raises after too many skips in a row."""
        if bool(torch.isfinite(grad_norm)):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        logger.warning("Non-finite loss/gradient at step %d: step skipped (%d in a row).", step, self.consecutive)
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} non-finite steps in a row (last at step {step}): stopping. The last checkpoint "
                f"is intact; lower the learning rate or check the data before resuming."
            )
        return False


    # --- device-side variant: no host sync per step ---

    def flag(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Records one step's gradient norm on the device and returns its found-inf flag (1.0 = skip)."""
        found = (~torch.isfinite(grad_norm)).float()
        if self._run is None:
            self._run, self._skipped = found.clone(), found.clone()
        else:
            self._run = self._run * found + found  # consecutive non-finite steps, reset by a finite one
            self._skipped = self._skipped + found
        return found

    def raise_if_exhausted(self, step: int) -> None:
        """Reads the device-side counts back (one sync: call at logging/checkpoint steps) and stops when exhausted."""
        if self._run is None:
            return
        run, skipped = (int(v) for v in torch.stack([self._run, self._skipped]).tolist())
        if skipped > self.total_skipped:
            logger.warning("%d non-finite step(s) skipped up to step %d (%d in a row now).", skipped - self.total_skipped, step, run)
        self.total_skipped, self.consecutive = skipped, run
        if run >= self.max_consecutive:
            raise FloatingPointError(
                f"{run} non-finite steps in a row (last at step {step}): stopping. The last checkpoint "
                f"is intact; lower the learning rate or check the data before resuming."
            )


def optimizer_step(accelerator, optimizer, lr_scheduler, parameters, max_grad_norm: Optional[float], guard: NonFiniteGuard):
    """
    Clips gradients (to `max_grad_norm`; None measures the norm without clipping, as `--max_grad_norm` documents),
    steps the optimizer unless the gradient norm is NaN/inf, steps the scheduler and zeroes the gradients; returns
    the (all-reduced) gradient norm. With a fused optimizer the skip happens on the device (its `found_inf` input,
    as GradScaler uses it): no host sync per step.
    """
    grad_norm = accelerator.clip_grad_norm_(parameters, math.inf if max_grad_norm is None else max_grad_norm)
    found_inf = guard.flag(grad_norm)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner.defaults.get("fused"):
        inner.found_inf = found_inf
        optimizer.step()
        inner.found_inf = None
    elif not bool(found_inf):  # unfused optimizers take no found_inf: decide on the host
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP/FSDP and `torch.compile` wrappers."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------------------------
# Data position: counted in samples, so that it survives a change of process count
# --------------------------------------------------------------------------------------------


@dataclass
class DataPosition:
    """
    Where a run is in its data: the epoch, and the samples of that epoch already trained on by all
    processes together. With Accelerate's seedable sampler the epoch's sample order is one permutation,
    whatever the number of processes, and every micro-batch consumes the next `batch_size * num_processes`
    samples of it; so the position in samples means the same on any number of processes.
    """

    epoch: int = 0
    epoch_samples: int = 0

    def batches_to_skip(self, batches_per_epoch: int, samples_per_batch: int) -> Tuple[int, int, int]:
        """
        `(epoch, micro-batches to skip, samples that fall short of a whole micro-batch)` for a run whose
        micro-batches take `samples_per_batch` samples (all processes) and whose epochs hold
        `batches_per_epoch` of them. Samples short of a whole micro-batch are trained on again.
        """
        skip, remainder = divmod(self.epoch_samples, samples_per_batch)
        if skip >= batches_per_epoch:  # the saving run had finished this epoch (or what is left is not a batch)
            return self.epoch + 1, 0, 0
        return self.epoch, skip, remainder


def resume_position(
    state: dict, batches_per_epoch: int, samples_per_batch: int, accumulation_steps: int
) -> Tuple[int, int, int]:
    """
    `(epoch, micro-batches to skip, samples short of a whole batch)` to resume at from a checkpoint's
    `training_state.json`. Checkpoints without a recorded position (older ones) are taken to have been
    saved with the current process count and batch size, as they could only be resumed before.
    """
    if "epoch" in state and "epoch_samples" in state:
        position = DataPosition(state["epoch"], state["epoch_samples"])
        return position.batches_to_skip(batches_per_epoch, samples_per_batch)
    # The loop makes ceil(batches / accumulation) updates an epoch: the last one takes what is left.
    updates_per_epoch = math.ceil(batches_per_epoch / accumulation_steps)
    step = state["global_step"]
    return step // updates_per_epoch, (step % updates_per_epoch) * accumulation_steps, 0


# --------------------------------------------------------------------------------------------
# The training loop both scripts share
# --------------------------------------------------------------------------------------------


StepFunction = Callable[[dict], Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]]


class TrainingLoop:
    r"""
    The training loop of the example scripts: resume, skipping to the data position, gradient
    accumulation, the NaN guard, logging, checkpoint and validation cadence, Ctrl-C, the final checkpoint,
    then the atomic export, the model card and the push. A script passes what is its own as functions.

    The learning rate is a function of the optimizer step: pass the scheduler unprepared (not through
    `accelerator.prepare`, which would step it once per process) and step it once per update
    (`optimizer_step` does). On resume it is set from the checkpoint's global step (`set_scheduler_step`).

    Args:
        accelerator (`accelerate.Accelerator`): from `setup_accelerator`.
        args (`argparse.Namespace`): the shared flags (`add_training_arguments`), `max_train_steps` set.
        train_dataloader: the prepared training DataLoader.
        lr_scheduler (`torch.optim.lr_scheduler.LambdaLR`): the unprepared scheduler.
        step (`Callable`): one micro-batch, `step(batch) -> (scalars, grad_norm)`: forward and backward under
            `accelerator.accumulate`, and on the last micro-batch of an update (`accelerator.sync_gradients`)
            `optimizer_step`. `scalars` is a dict of detached device tensors to log (their mean over the
            logging window), `grad_norm` the update's gradient norm or None. No host sync needed.
        logging_dir (`str`): where `train_metrics.jsonl` goes.
        after_update (`Callable[[int], None]`, *optional*): after every optimizer update, with the new step (the EMA).
        validate (`Callable[[int], None]`, *optional*): on the main process every `--validation_steps` before the
            last step (the script validates the final model itself), and at step 1 with `validate_first_step`.
        on_epoch (`Callable[[int], None]`, *optional*): at the start of every epoch (e.g. `dataset.set_epoch`).
        tracker_name (`str`, *optional*): the project name for `accelerator.init_trackers`.
        tracker_config (`dict`, *optional*): hyperparameters for the trackers (ints, floats, strings, bools).
    """

    def __init__(
        self,
        accelerator,
        args,
        train_dataloader,
        lr_scheduler,
        step: StepFunction,
        logging_dir: str,
        after_update: Optional[Callable[[int], None]] = None,
        validate: Optional[Callable[[int], None]] = None,
        validate_first_step: bool = False,
        on_epoch: Optional[Callable[[int], None]] = None,
        tracker_name: Optional[str] = None,
        tracker_config: Optional[dict] = None,
    ):
        if args.max_train_steps is None or args.max_train_steps < 1:
            raise ValueError(f"`max_train_steps` must be set to >= 1 before the loop, got {args.max_train_steps}.")
        if len(train_dataloader) == 0:
            raise ValueError(
                f"the training data make no full batch of {args.train_batch_size} per process on "
                f"{accelerator.num_processes} process(es): lower --train_batch_size or add data."
            )
        self.accelerator, self.args, self.train_dataloader = accelerator, args, train_dataloader
        self.lr_scheduler, self.step_fn, self.logging_dir = lr_scheduler, step, logging_dir
        self.after_update, self.on_epoch = after_update, on_epoch
        self.validate, self.validate_first_step = validate, validate_first_step
        self.tracker_name, self.tracker_config = tracker_name, tracker_config
        self.guard = NonFiniteGuard(args.max_nonfinite_steps)
        self.global_step = 0
        self.samples_seen = 0
        self.position = DataPosition()
        self.validation_steps = args.validation_steps or max(1, args.max_train_steps // 10)

    # --- sizes ---

    @property
    def samples_per_batch(self) -> int:
        """Samples in one micro-batch of all processes together."""
        return self.args.train_batch_size * self.accelerator.num_processes

    @property
    def total_batch_size(self) -> int:
        """Samples per optimizer update: per-device batch x processes x accumulation."""
        return self.samples_per_batch * self.args.gradient_accumulation_steps

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer updates per epoch: one every `gradient_accumulation_steps` micro-batches, and one at its end."""
        return math.ceil(len(self.train_dataloader) / self.args.gradient_accumulation_steps)

    # --- resume ---

    def _resume(self) -> Tuple[int, int]:
        """Loads `--resume_from_checkpoint`; returns `(first_epoch, micro-batches to skip)`."""
        args, accelerator = self.args, self.accelerator
        checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if args.resume_from_checkpoint and checkpoint is None:
            logger.info("No checkpoint found in the output folder: starting a new run.")
        state = read_training_state(checkpoint) if checkpoint else {"global_step": 0}
        self.global_step = state["global_step"]
        self._init_trackers(resumed=checkpoint is not None)
        if checkpoint is None:
            set_scheduler_step(self.lr_scheduler, 0)
            return 0, 0
        logger.info("Resuming from %s (step %d)", checkpoint, self.global_step)
        accelerator.load_state(checkpoint)
        set_scheduler_step(self.lr_scheduler, self.global_step)  # the LR of this step, whatever counted before
        epoch, skip, short = resume_position(
            state, len(self.train_dataloader), self.samples_per_batch, args.gradient_accumulation_steps
        )
        saved_processes = state.get("num_processes", accelerator.num_processes)
        if short:
            logger.warning(
                "The checkpoint's data position (%d samples into epoch %d) is not a whole number of this run's "
                "micro-batches of %d samples: the last %d samples before it are trained on again.",
                state["epoch_samples"], state["epoch"], self.samples_per_batch, short,
            )  # fmt: skip
        saved_total_batch = state.get("total_batch_size", self.total_batch_size)
        if saved_processes != accelerator.num_processes or saved_total_batch != self.total_batch_size:
            logger.info(
                "The checkpoint was saved by %d process(es) with a total batch of %s; this run has %d and %d. The LR "
                "schedule continues at step %d; the data continue at sample %d of epoch %d (docs/finetune.md).",
                saved_processes, saved_total_batch, accelerator.num_processes, self.total_batch_size,
                self.global_step, skip * self.samples_per_batch, epoch,
            )  # fmt: skip
        self.samples_seen = state.get("samples_seen", self.global_step * self.total_batch_size)
        self.position = DataPosition(epoch, skip * self.samples_per_batch)
        if accelerator.is_main_process:
            truncate_metrics_log(self.logging_dir, self.global_step)
        return epoch, skip

    def _init_trackers(self, resumed: bool) -> None:
        if self.tracker_name is None or self.args.report_to == "none" or not self.accelerator.is_main_process:
            return
        # A resumed run hides the tensorboard events the interrupted run wrote after its checkpoint.
        init_kwargs = {"tensorboard": {"purge_step": self.global_step + 1}} if resumed else {}
        self.accelerator.init_trackers(self.tracker_name, config=self.tracker_config or {}, init_kwargs=init_kwargs)

    def training_state(self) -> dict:
        """What `training_state.json` records beside the global step: the data position and the run's shape."""
        return {
            "epoch": self.position.epoch,
            "epoch_samples": self.position.epoch_samples,
            "samples_seen": self.samples_seen,
            "num_processes": self.accelerator.num_processes,
            "train_batch_size": self.args.train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "total_batch_size": self.total_batch_size,
        }

    def save_checkpoint(self) -> str:
        args = self.args
        return save_checkpoint(
            self.accelerator, args.output_dir, self.global_step, args.checkpoints_total_limit, self.training_state()
        )

    # --- the loop ---

    def run(self) -> int:
        """Trains up to `--max_train_steps` (resuming first when asked); returns the global step reached."""
        args, accelerator = self.args, self.accelerator
        epoch, skip = self._resume()
        progress = _progress_bar(args.max_train_steps, self.global_step, not accelerator.is_local_main_process)
        sums, count, last_log_time, grad_norm = None, 0, time.perf_counter(), None
        try:
            while self.global_step < args.max_train_steps:
                if self.on_epoch is not None:
                    self.on_epoch(epoch)
                self.train_dataloader.set_epoch(epoch)
                loader = accelerator.skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
                batches, batches_in_update, updates_this_epoch = skip, 0, 0
                skip = 0
                for batch in loader:
                    scalars, step_grad_norm = self.step_fn(batch)
                    sums = scalars if sums is None else {k: sums[k] + v for k, v in scalars.items()}
                    count, batches, batches_in_update = count + 1, batches + 1, batches_in_update + 1
                    if not accelerator.sync_gradients:
                        continue
                    grad_norm = step_grad_norm if step_grad_norm is not None else grad_norm
                    self.global_step += 1
                    updates_this_epoch += 1
                    self.samples_seen += batches_in_update * self.samples_per_batch
                    self.position = DataPosition(epoch, batches * self.samples_per_batch)
                    batches_in_update = 0
                    if self.after_update is not None:
                        self.after_update(self.global_step)
                    progress.update(1)
                    step = self.global_step

                    if step % args.logging_steps == 0 or step == args.max_train_steps:
                        self.guard.raise_if_exhausted(step)  # with the losses below: the host syncs of a logging step
                        logs = {k: (v / count).item() for k, v in accelerator.reduce(sums, reduction="mean").items()}
                        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
                        if grad_norm is not None:
                            logs["grad_norm"] = float(grad_norm)
                        logs["img_per_s"] = count * self.samples_per_batch / (time.perf_counter() - last_log_time)
                        if accelerator.device.type == "cuda":
                            logs.update(peak_memory_logs(accelerator))
                        log_metrics(accelerator, self.logging_dir, step, logs)
                        progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{logs['lr']:.2e}")
                        sums, count, last_log_time = None, 0, time.perf_counter()
                    if step % args.checkpointing_steps == 0:
                        self.guard.raise_if_exhausted(step)  # never checkpoint a run that must stop
                        self.save_checkpoint()
                    # The final model is validated by the script after the loop, not here.
                    due = step % self.validation_steps == 0 or (self.validate_first_step and step == 1)
                    if due and self.validate is not None and accelerator.is_main_process and step < args.max_train_steps:
                        self.validate(step)
                    if step >= args.max_train_steps:
                        break
                if updates_this_epoch == 0 and self.global_step < args.max_train_steps:
                    raise RuntimeError(f"epoch {epoch} gave no training batch: check the data and --train_batch_size.")
                epoch += 1
        except KeyboardInterrupt:
            logger.warning(
                f"Interrupted at step {self.global_step}. Checkpoints already saved are complete; resume with "
                f"--resume_from_checkpoint latest."
            )
            accelerator.end_training()
            raise
        progress.close()

        accelerator.wait_for_everyone()
        self.guard.raise_if_exhausted(self.global_step)
        if self.global_step % args.checkpointing_steps:
            self.save_checkpoint()
        return self.global_step

    # --- the result ---

    def finish(self, write: Callable[[str], None], write_card: Optional[Callable[[], None]] = None) -> None:
        """
        On the main process: `write(folder)` writes the result into a temporary folder, moved into
        `--output_dir` entry by entry (`export_atomically`); then `write_card()` and, with `--push_to_hub`,
        the upload. Ends the trackers on every process.
        """
        args = self.args
        if self.accelerator.is_main_process:
            export_atomically(args.output_dir, write)
            if write_card is not None:
                write_card()
            if args.push_to_hub:
                from .hub import push_folder

                repo_id = push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, create=False)
                logger.info(f"Pushed to https://huggingface.co/{repo_id}")
        # Every process waits for the main one to finish writing, so that all of them destroy the process group
        # together, as torch.distributed asks. Without this wait, a 2-process gloo run once had its second process
        # abort at exit ("terminate called without an active exception") while the first was still writing.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def _progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(range(total), initial=initial, desc="Steps", disable=disable)


def export_atomically(output_dir: str, write: Callable[[str], None]) -> None:
    """
    Runs `write(folder)` on a temporary folder inside `output_dir`, then moves each written entry into
    `output_dir` (replacing an older one): a crash mid-write never leaves a half-written model there.
    """
    temporary = os.path.join(output_dir, ".export.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    write(temporary)
    for name in os.listdir(temporary):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(temporary, name), target)
    os.rmdir(temporary)
