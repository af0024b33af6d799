#!/usr/bin/env python
"""
Runs one job of the study's workflow: picks the GPU it may use and decides whether a training run resumes.

    python job.py [--gpu --jobs_per_gpu K] [--resume_dir DIR --inputs FILE ...] -- COMMAND ...

`--gpu`: Snakemake's `--resources gpu=N` caps how many GPU jobs run at once, but for local runs it does not
say *which* GPU a job gets (https://github.com/snakemake/snakemake/issues/281). This picks one: every GPU of
the machine (those of `CUDA_VISIBLE_DEVICES`, else those `nvidia-smi` lists) has `K` slots, each an
exclusive lock file; the job takes the first free slot and runs with `CUDA_VISIBLE_DEVICES` set to that GPU
alone. The lock is held by the command itself (it inherits the open file), so it is released however the
command ends, a crash or a kill included. When a single GPU is visible (one GPU, or a cluster job that was
given one GPU) there is nothing to choose and no lock is taken.

`--resume_dir`: the training scripts resume from the last checkpoint in their output folder
(`--resume_from_checkpoint latest`), which is what a re-run after a crash or Ctrl-C should do. But a re-run
because the job's command or its inputs changed (Snakemake re-runs a job whose parameters changed, and every
job downstream of a re-run one) must start over, never continue a checkpoint made with other settings or from
another model. So the command and the modification times of `--inputs` are recorded in DIR; when they differ
from the recorded ones, DIR is emptied first.

Then the command replaces this process (`os.execvp`): signals reach it directly.
"""

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


STAMP = ".study_job.json"


def visible_gpus():
    """The GPUs this job may choose from: `CUDA_VISIBLE_DEVICES` when set, else every GPU `nvidia-smi` lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def take_gpu_slot(gpus, jobs_per_gpu, lock_dir, poll_s=5.0):
    """Locks the first free (GPU, slot) pair, waiting while all are taken. Returns (gpu, open lock file)."""
    os.makedirs(lock_dir, exist_ok=True)
    said = False
    while True:
        for slot in range(jobs_per_gpu):  # fill every GPU's first slot before any second one
            for gpu in gpus:
                handle = open(os.path.join(lock_dir, f"gpu{gpu}-slot{slot}.lock"), "a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                return gpu, handle
        if not said:
            print(f"job.py: all {len(gpus)} x {jobs_per_gpu} GPU slots are taken; waiting for one", flush=True)
            said = True
        time.sleep(poll_s)


def stamp_of(command, inputs):
    return {"command": command, "inputs": {path: os.stat(path).st_mtime_ns for path in sorted(inputs)}}


def prepare_resume_dir(directory, stamp):
    """Empties `directory` unless it holds the work of this very command on these very inputs."""
    path = os.path.join(directory, STAMP)
    recorded = None
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f)
    if recorded != stamp and os.path.isdir(directory) and os.listdir(directory):
        why = "no record of how it was made" if recorded is None else "its command or inputs changed"
        print(f"job.py: starting {directory} over ({why})", flush=True)
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(stamp, f, indent=1)
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="Run on one GPU slot (see above).")
    parser.add_argument("--jobs_per_gpu", type=int, default=1, help="How many jobs may share one GPU.")
    parser.add_argument("--lock_dir", default=os.path.join(tempfile.gettempdir(), f"ssreg-study-gpu-locks-{os.getuid()}"),
                        help="Where the slot locks live (on the machine itself: they stand for its GPUs).")
    parser.add_argument("--resume_dir", default=None, help="The training run's output folder (see above).")
    parser.add_argument("--inputs", nargs="*", default=[], help="Files the run is made from.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run.")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given (put it after --)")
    if args.jobs_per_gpu < 1:
        parser.error(f"--jobs_per_gpu must be at least 1, got {args.jobs_per_gpu}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.resume_dir:
        prepare_resume_dir(args.resume_dir, stamp_of(args.command, args.inputs))
    if args.gpu:
        gpus = visible_gpus()
        if len(gpus) > 1:
            gpu, handle = take_gpu_slot(gpus, args.jobs_per_gpu, args.lock_dir)
            os.set_inheritable(handle.fileno(), True)  # the command holds the lock until it ends
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            print(f"job.py: GPU {gpu}", flush=True)
    sys.stdout.flush()
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    main()
