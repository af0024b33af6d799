"""What the example scripts share: the paper's LR schedule, atomic checkpoints, resume, the NaN guard.

Written against Accelerate's `save_state`/`load_state` and diffusers' conventions
(`checkpoint-<step>` folders, `--resume_from_checkpoint latest`, `--checkpoints_total_limit`).
"""

import argparse
import json
import logging
import os
import math
import re
import shutil
from typing import List, Optional

import torch


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"


# --------------------------------------------------------------------------------------------
# The command-line flags every training script shares (diffusers' example-script names)
# --------------------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """Adds the optimization, logging, checkpoint and Hub flags; `defaults` overrides their defaults per script."""
    group = parser.add_argument_group("training (shared by the example scripts)")
    add = group.add_argument
    add("--output_dir", type=str, default="output")
    add("--seed", type=int, default=0)
    add("--train_batch_size", type=int, default=32, help="Per-device batch size.")
    add("--max_train_steps", type=int, default=None)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--learning_rate", type=float, default=1e-4)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=0.0)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=None, help="Clip gradients to this norm (None: no clipping).")
    add("--max_nonfinite_steps", type=int, default=5, help="Stop after this many NaN/inf steps in a row.")
    add("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    add("--allow_tf32", action="store_true")
    add("--dataloader_num_workers", type=int, default=0)
    add("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    add("--logging_dir", type=str, default="logs")
    add("--logging_steps", type=int, default=10, help="Read losses back from the device every N steps.")
    add("--validation_steps", type=int, default=None, help="Validate every N steps (default: 10 times a run).")
    add("--num_validation_images", type=int, default=8)
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", type=str, default=None, help="Default: the output folder's name.")
    add("--hub_token", type=str, default=None)
    add("--hub_private", action="store_true")
    unknown = set(defaults) - {a.dest for a in group._group_actions}
    if unknown:
        raise ValueError(f"no shared training flags named {sorted(unknown)}")
    parser.set_defaults(**defaults)


def check_training_arguments(args, positive=(), optional_positive=()) -> None:
    """Cross-argument checks of the shared flags (plus the script's own `positive` ones): ValueError before any work."""
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
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = os.path.basename(os.path.normpath(args.output_dir))
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ValueError("--hub_token with --report_to wandb would expose the token: use `huggingface-cli login`.")


def setup_accelerator(args, dynamo_backend=None, **dataloader_options):
    """
    The `Accelerator` of a training script from the shared flags (diffusers' example-script setup):
    logging, tracker and project folders, a seedable sampler, device-specific seeds (each rank draws
    its own noise) and TF32 when asked. `dynamo_backend` compiles the prepared model through Accelerate;
    `dataloader_options` go to `DataLoaderConfiguration`. Returns `(accelerator, logging_dir)`.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, **dataloader_options),
        dynamo_backend=dynamo_backend,
    )
    logger.info("%s", accelerator.state)
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, logging_dir


# --------------------------------------------------------------------------------------------
# Learning-rate schedule (Table 2, A.5)
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


def log_metrics(accelerator, logging_dir: str, step: int, metrics: dict) -> None:
    """`accelerator.log` under `train/`, plus a plain-text copy in `logging_dir/train_metrics.jsonl` (any tracker, or none)."""
    accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        os.makedirs(logging_dir, exist_ok=True)
        with open(os.path.join(logging_dir, "train_metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def resume_training(accelerator, output_dir: str, resume_from_checkpoint, updates_per_epoch: int, accumulation_steps: int):
    """
    Loads the checkpoint named by `--resume_from_checkpoint` (`"latest"` or a path; nothing for None or
    an empty folder) and returns `(global_step, first_epoch, batches_to_skip)` for the training loop.
    """
    checkpoint = resolve_resume_checkpoint(output_dir, resume_from_checkpoint)
    if resume_from_checkpoint and checkpoint is None:
        logger.info("No checkpoint found in the output folder: starting a new run.")
    if checkpoint is None:
        return 0, 0, 0
    logger.info("Resuming from %s", checkpoint)
    accelerator.load_state(checkpoint)
    global_step = read_training_state(checkpoint)["global_step"]
    return global_step, global_step // updates_per_epoch, (global_step % updates_per_epoch) * accumulation_steps


def read_training_state(checkpoint: str) -> dict:
    """The `training_state.json` of a checkpoint (at least `global_step`)."""
    path = os.path.join(checkpoint, TRAINING_STATE_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"global_step": checkpoint_step(checkpoint)}


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
