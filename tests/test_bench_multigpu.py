"""benchmarks/bench_multigpu.py on the CPU: 1 and 2 gloo processes of the real scripts, a tiny VAE and a tiny DiT."""

import json
import os
import subprocess
import sys
import time

import pytest
from diffusers import AutoencoderKL


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_multigpu  # noqa: E402


TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
)  # fmt: skip
TINY_DIT = '{"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}'
STEPS = 4  # a checkpoint at step 2, resumed to step 4


def tiny_flags(config, work_dir, output_json):
    """A few steps of each script: 16 photo crops, finetune at 32 px (total batch 4), the DiT on 8x8 latents."""
    return ["--device", "cpu", "--num_processes", "1,2", "--model_config_name_or_path", str(config),
            "--num_images", "16", "--resolution", "32", "--finetune_total_batch_size", "4",
            "--finetune_steps", str(STEPS), "--finetune_warmup_steps", "1",
            "--finetune_extra_args", "--ssreg_lambda_lpips 0 --ssreg_freeze_encoder_blocks 1 --ssreg_freeze_decoder_blocks 1",
            "--dit_presets", "DiT-S/2", "--dit_resolution", "16", "--dit_batch_size", "4", "--dit_steps", str(STEPS),
            "--dit_warmup_steps", "1", "--dit_transformer_config", TINY_DIT, "--dataloader_num_workers", "0",
            "--work_dir", str(work_dir), "--output_json", str(output_json)]  # fmt: skip


def run_bench(flags):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_multigpu.py"), *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("multigpu")
    AutoencoderKL(**TINY_VAE).save_config(root / "tiny_vae")
    output = root / "bench.json"
    result = run_bench(tiny_flags(root / "tiny_vae", root / "work", output))
    return {"root": root, "result": result, "report": json.loads(output.read_text()), "md": (root / "bench.md").read_text()}


def test_every_row_equal_checksums_and_the_schedule_kept_across_process_counts(bench):
    result, report = bench["result"], bench["report"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(r["phase"], r["name"]): r for r in report["rows"]}
    cases = ("uninterrupted on 1 vs on 2", "2 -> 1 processes", "1 -> 2 processes")
    assert sorted(rows) == sorted(
        [("data", "images, VAE and latent cache")]
        + [("finetune", f"VAE, {n} process(es)") for n in (1, 2)]
        + [("finetune_resume", f"VAE, {case}") for case in cases]
        + [("dit", f"DiT-S/2, {n} process(es)") for n in (1, 2)]
        + [("dit_resume", f"DiT-S/2, {case}") for case in cases]
    )  # fmt: skip
    assert all(r["status"] == "ok" and r["error"] is None for r in rows.values()), report["rows"]

    for phase, model, batches in (("finetune", "VAE", (4, 2)), ("dit", "DiT-S/2", (4, 4))):
        one, two = rows[(phase, f"{model}, 1 process(es)")], rows[(phase, f"{model}, 2 process(es)")]
        assert (one["batch_per_process"], two["batch_per_process"]) == batches
        assert two["total_batch"] == 2 * batches[1] and two["steps_logged"] == STEPS
        # both ranks of the 2-process run hashed the same final weights
        assert len(two["rank_checksums"]) == 2 and two["checksums_identical"] is True
        assert len(one["rank_checksums"]) == 1 and one["checksums_identical"] is True
        # img/s over the steps after warm-up, the step after a validation or a checkpoint left out
        assert one["steps_timed"] == (1 if phase == "finetune" else 2) and one["img_per_s"] > 0
        assert two["scaling_efficiency"] == pytest.approx(two["img_per_s"] / (2 * one["img_per_s"]))
        assert one["peak_memory_gib_per_rank"] is None  # CUDA only
        with open(two["output_dir"] + ".log") as f:
            assert "Num processes: 2" in f.read()  # a real 2-process group (gloo)

    for phase, model in (("finetune_resume", "VAE"), ("dit_resume", "DiT-S/2")):
        reference = bench_multigpu.read_metrics(rows[(phase[: -len("_resume")], f"{model}, 2 process(es)")]["output_dir"])
        assert len({m["lr"] for m in reference}) > 2  # the schedule moves: the check can fail
        for case in cases:
            row = rows[(phase, f"{model}, {case}")]
            assert row["passed"] is True and row["steps_complete"] is True, row
            assert row["max_abs_lr_difference"] <= 1e-12
            if case != cases[0]:
                assert row["resumed_steps"] == [3, 4]  # resumed from checkpoint-2, each later step logged once
            # the same total batch either way for the fine-tune: the data position is the uninterrupted run's
            assert row["data_position_matches"] is (True if phase == "finetune_resume" else None)

    md = bench["md"]
    assert "| finetune_vae.py | VAE | 2 | 2 | 4 |" in md and "| train_dit.py | DiT-S/2 | 2 | 4 | 8 |" in md
    assert md.count("| pass |") == 6 and "**fail**" not in md
    logs = bench["root"] / "bench_logs"
    assert (logs / "finetune" / "np2.log").is_file() and (logs / "dit" / "DiT-S_2" / "np2" / "logs" / "train_metrics.jsonl").is_file()


def test_a_failing_run_is_a_row_and_the_next_ones_still_run(bench):
    """A run that fails (an unknown flag) is recorded with its error; the DiT after it runs, and the outputs are written."""
    root = bench["root"]
    output = root / "broken.json"
    flags = tiny_flags(root / "tiny_vae", root / "work", output)
    flags[flags.index("--num_processes") + 1] = "1"
    at = flags.index("--finetune_extra_args")
    flags[at : at + 2] = ["--finetune_extra_args=--no_such_flag"]  # one flag alone: argparse needs the = form
    result = run_bench(flags + ["--phases", "finetune,dit"])
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(r["phase"], r["name"]): r for r in json.loads(output.read_text())["rows"]}
    broken = rows[("finetune", "VAE, 1 process(es)")]
    assert broken["status"] == "error" and "unrecognized arguments: --no_such_flag" in broken["error"]
    assert broken["img_per_s"] is None
    assert rows[("dit", "DiT-S/2, 1 process(es)")]["status"] == "ok"  # the run went on
    assert rows[("data", "images, VAE and latent cache")]["status"] == "ok"
    assert "error (exit status" in (root / "broken.md").read_text()


def test_bad_arguments_fail_before_any_run(tmp_path):
    config = tmp_path / "vae"
    AutoencoderKL(**TINY_VAE).save_config(config)
    base = ["--device", "cpu", "--model_config_name_or_path", str(config), "--output_json", str(tmp_path / "x.json")]
    for extra, match in (
        (["--num_processes", "1,3"], r"--finetune_total_batch_size 32 is not divisible by the process count\(s\) \[3\]"),
        (["--dit_presets", "DiT-Z/2"], r"--dit_presets \['DiT-Z/2'\]: unknown"),
        (["--phases", "finetune,speed"], r"--phases 'finetune,speed': unknown \['speed'\]"),
        (["--num_images", "100"], r"--num_images 100 makes no batch of --dit_batch_size 256 on 2 processes"),
        (["--finetune_steps", "4", "--finetune_warmup_steps", "3"], r"--finetune_warmup_steps must be in \[0, 2\)"),
        (["--mixed_precision", "bf16"], r"--mixed_precision bf16 is for --device cuda"),
        (["--model_config_name_or_path", str(tmp_path / "none")], r"--model_config_name_or_path .*none' is not a folder"),
    ):
        with pytest.raises(ValueError, match=match):
            bench_multigpu.parse_args(base + extra)
    with pytest.raises(SystemExit):
        bench_multigpu.parse_args(base + ["--num_processes", "0,2"])
    assert not (tmp_path / "x.json").exists()


def test_a_run_past_its_time_limit_is_stopped_with_its_children(tmp_path):
    """The launcher and the ranks it started (here: a process and its child) are stopped together at the limit."""
    pid_file = tmp_path / "child.pid"
    program = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    started = time.perf_counter()
    status, seconds, error = bench_multigpu.run_logged([sys.executable, "-c", program], dict(os.environ), str(tmp_path / "run.log"), 3)
    assert status == "timeout" and "time limit of 3 s" in error and 3 <= seconds < 30 and time.perf_counter() - started < 30
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and process_alive(child):
        time.sleep(0.1)
    assert not process_alive(child)
    assert bench_multigpu.Clock(600, budget_s=5).limit() <= 5  # the whole command's budget caps every run


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False
