"""benchmarks/small_scale_study.py: the tiny preset end to end on the CPU (real subprocesses, offline), resume, errors."""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types

import numpy as np
import pytest
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "small_scale_study.py")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle")
STAGE_OUTPUTS = {  # what each stage's script leaves in the unit folder
    "finetune": ("config.json", "diffusion_pytorch_model.safetensors", "logs/train_metrics.jsonl"),
    "eval": ("results.json", "report.md", "blur_dynamics.png"),
    "cache": ("latent_stats.json", "cache_config.json"),
    "dit": ("model_index.json", "transformer/config.json", "samples/final.png"),
    "sample": ("samples.json", "0000_00000.png"),
    "score": ("heldout/generation.json", "train/generation.json"),
}


def load_study_module():
    spec = importlib.util.spec_from_file_location("small_scale_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["small_scale_study"] = module  # the crop workers pickle its functions by module name
    spec.loader.exec_module(module)
    return module


def run_study(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, SCRIPT, *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_photos(folder, names=PHOTOS):
    """scikit-image's bundled photos as JPEG files (no download)."""
    from skimage import data as skdata

    os.makedirs(folder, exist_ok=True)
    for name in names:
        array = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        Image.fromarray(array).convert("RGB").save(os.path.join(folder, f"{name}.jpg"), quality=95)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(str(tmp_path_factory.mktemp("photos")))


@pytest.fixture(scope="module")
def study(photos, tmp_path_factory):
    """The tiny preset (2 arms, 1 seed, a few steps per stage), run once end to end."""
    out = str(tmp_path_factory.mktemp("study") / "study")
    started = time.monotonic()
    result = run_study("--data_dir", photos, "--output_dir", out, "--preset", "tiny")
    seconds = time.monotonic() - started
    print(f"tiny study end to end: {seconds:.0f} s")
    return {"out": out, "log": result.stdout + result.stderr, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# The tiny preset end to end
# --------------------------------------------------------------------------------------------


def test_every_unit_ran_and_wrote_its_outputs(study):
    out, log = study["out"], study["log"]
    assert "14 launched, 14 finished, 0 failed" in log, log[-3000:]
    split = json.load(open(os.path.join(out, "data", "done.json")))
    assert len(split["train_photos"]) == 4 and len(split["heldout_photos"]) == 2
    assert not set(split["train_photos"]) & set(split["heldout_photos"])
    assert len(os.listdir(os.path.join(out, "data", "train_crops"))) == 48
    assert len(os.listdir(os.path.join(out, "data", "heldout_crops"))) == 16

    base = json.load(open(os.path.join(out, "base", "done.json")))
    assert base["status"] == "done" and os.path.isfile(os.path.join(out, "base", "vae", "config.json"))
    assert os.path.isfile(os.path.join(out, "base", "eval", "done.json"))
    for arm in ("baseline", "ssreg"):
        finetune = json.load(open(os.path.join(out, "arms", arm, "seed0", "finetune", "done.json")))
        assert finetune["base_sha"] == base["vae_sha"]  # both arms start from the one shared base
        for stage, files in STAGE_OUTPUTS.items():
            folder = os.path.join(out, "arms", arm, "seed0", stage)
            marker = json.load(open(os.path.join(folder, "done.json")))
            assert marker["status"] == "done" and marker["plan_hash"] == base["plan_hash"]
            assert marker["data_fingerprint"] == split["fingerprint"]
            if stage != "finetune":
                assert marker["vae_sha"] == finetune["vae_sha"]
            for name in files:
                assert os.path.isfile(os.path.join(folder, name)), (stage, name)
        samples = [n for n in os.listdir(os.path.join(out, "arms", arm, "seed0", "sample")) if n.endswith(".png")]
        assert len(samples) == 16
    # same seeds and data order across arms: the arms differ only in their ssreg flags
    commands = {arm: json.load(open(os.path.join(out, "arms", arm, "seed0", "finetune", "done.json")))["commands"][0]
                for arm in ("baseline", "ssreg")}  # fmt: skip
    strip = lambda c: " ".join(re.sub(r"--ssreg_(alpha|basis) \S+|arms/\w+/", "", c).split())  # noqa: E731
    assert strip(commands["baseline"]) == strip(commands["ssreg"])
    assert "--resume_from_checkpoint latest" in commands["ssreg"] and "--seed 0" in commands["ssreg"]


def test_report_has_a_table_per_measure_with_numbers(study):
    out = study["out"]
    results = json.load(open(os.path.join(out, "study_results.json")))
    assert results["warnings"] == []
    measures = results["measures"]
    for key in ("rec/PSNR", "rec/SSIM", "rec/rFID-EffNetLite0", "latent/coherence", "latent/unmask_psnr@3", "train/kl",
                "gen_heldout/FID-EffNetLite0", "gen_heldout/precision-EffNetLite0", "gen_heldout/recall-EffNetLite0",
                "gen_train/FID-EffNetLite0", "gen_train/precision-EffNetLite0", "gen_train/recall-EffNetLite0"):  # fmt: skip
        for arm in ("baseline", "ssreg"):
            entry = measures[key][arm]
            assert entry["n"] == 1 and np.isfinite(entry["mean"]), (key, arm, entry)
    assert "base" in measures["rec/PSNR"] and "base" in measures["latent/coherence"]
    assert "baseline" not in measures.get("train/latent_mse", {})  # alpha 0 has no regularization branch
    markdown = open(os.path.join(out, "study_results.md")).read()
    for heading in ("### `rec/PSNR`", "### `latent/coherence`", "### `gen_heldout/FID-EffNetLite0`",
                    "### `gen_train/recall-EffNetLite0`", "## Summary (mean ± std over seeds)"):  # fmt: skip
        assert heading in markdown, heading
    table = markdown.split("### `rec/PSNR`")[1].split("###")[0]
    assert re.search(r"\| ssreg \| 1 \| -?\d+\.\d+ \| 0: -?\d+\.\d+ \|", table), table
    assert re.search(r"\| baseline \| 0 \| ✓ \| ✓ \| ✓ \| ✓ \| ✓ \| ✓ \|", markdown)


def test_rerun_skips_every_unit(study, photos):
    out = study["out"]
    markers = [os.path.join(d, "done.json") for d, _, names in os.walk(out) if "done.json" in names]
    before = {m: os.path.getmtime(m) for m in markers}
    result = run_study("--data_dir", photos, "--output_dir", out, "--preset", "tiny")
    log = result.stdout
    assert "0 launched, 0 finished, 0 failed" in log and "every selected unit is done" in log
    assert len(re.findall(r"skip  \S+ \(done", log)) == 14
    assert {m: os.path.getmtime(m) for m in markers} == before


def test_time_budget_leaves_what_does_not_fit(study, photos):
    result = run_study("--data_dir", photos, "--output_dir", study["out"], "--preset", "tiny", "--arms", "legendre",
                       "--time_budget_s", "1")  # fmt: skip
    log = result.stdout
    assert "0 launched" in log
    assert re.search(r"finetune/legendre/0 .*left for the next run", log), log
    assert re.search(r"score/legendre/0 .*waits for sample/legendre/0", log), log
    assert not os.path.exists(os.path.join(study["out"], "arms", "legendre", "seed0", "finetune", "done.json"))


def test_pack_carries_results_but_no_weights(study, tmp_path):
    run_study("--output_dir", study["out"], "--preset", "tiny", "--stage", "report", "--pack_dir", tmp_path, "--pack_base")
    with tarfile.open(tmp_path / "study_results.tar.gz") as archive:
        names = archive.getnames()
    assert "study_results.json" in names and "arms/ssreg/seed0/score/done.json" in names
    assert "arms/ssreg/seed0/eval/results.json" in names and "data/done.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".bin", ".pkl")) or "checkpoint-" in n or "_crops/" in n]
    # of the fine-tune's validation figures, only the last step's travel (the GPU tool returns files of 16 MiB at most)
    validation = sorted(n for n in names if n.startswith("arms/ssreg/seed0/finetune/validation/") and n.endswith(".png"))
    steps = {n.rsplit("-", 1)[1] for n in validation}
    assert validation and len(steps) == 1, validation
    assert "arms/ssreg/seed0/finetune/validation/metrics-000001.json" in names  # every step's metrics do travel
    parts = sorted(p for p in os.listdir(tmp_path) if p.startswith("base_vae.tar.part"))
    data = b"".join(open(tmp_path / p, "rb").read() for p in parts)
    (tmp_path / "base.tar").write_bytes(data)
    with tarfile.open(tmp_path / "base.tar") as archive:
        assert "base/vae/diffusion_pytorch_model.safetensors" in archive.getnames() and "base/done.json" in archive.getnames()


# --------------------------------------------------------------------------------------------
# Errors: before any work
# --------------------------------------------------------------------------------------------


def test_bad_arm_is_a_clear_error(tmp_path):
    result = run_study("--data_dir", tmp_path, "--output_dir", tmp_path / "s", "--preset", "tiny", "--arms", "ssreg", "fourier",
                       check=False)  # fmt: skip
    assert result.returncode == 2
    assert "argument --arms: invalid choice: 'fourier'" in result.stderr and "baseline" in result.stderr
    result = run_study("--data_dir", tmp_path, "--output_dir", tmp_path / "s", "--preset", "tiny", "--only", "ssreg/5",
                       check=False)  # fmt: skip
    assert result.returncode == 2 and "--only 'ssreg/5' is not in the selection" in result.stderr
    assert not os.path.exists(tmp_path / "s" / "plan.json")


def test_another_plan_in_the_same_folder_is_refused(study, photos):
    result = run_study("--data_dir", photos, "--output_dir", study["out"], "--preset", "full", "--stage", "data", check=False)
    assert result.returncode != 0 and "made with another plan" in result.stderr and "preset (tiny -> full)" in result.stderr


def test_expect_base_fails_without_a_base(photos, tmp_path):
    result = run_study("--data_dir", photos, "--output_dir", tmp_path / "s", "--preset", "tiny", "--expect_base", check=False)
    assert result.returncode != 0 and "--expect_base" in result.stderr and "base/done.json" in result.stderr


def test_adopt_base_from_a_plan_with_the_same_base_settings(study, tmp_path):
    """A plan that differs only in fine-tune/DiT settings reuses the finished base; other base settings are refused."""
    module = load_study_module()
    tiny = module.PRESETS["tiny"]
    other = module.Study(str(tmp_path / "other"), dataclasses.replace(tiny, finetune_steps=6, dit_steps=3), "tiny", "cpu", 0)
    assert other.plan_hash != read_json(os.path.join(study["out"], "plan.json"))["plan_hash"]
    module.adopt_base(study["out"], other)
    source_marker = read_json(os.path.join(study["out"], "base", "done.json"))
    marker = read_json(str(tmp_path / "other" / "base" / "done.json"))
    assert marker["plan_hash"] == other.plan_hash and marker["vae_sha"] == source_marker["vae_sha"]
    assert marker["adopted_from"]["plan_hash"] == source_marker["plan_hash"] and marker["results"] == source_marker["results"]
    assert read_json(str(tmp_path / "other" / "base" / "eval" / "done.json"))["plan_hash"] == other.plan_hash
    module.adopt_base(study["out"], other)  # again: nothing to do
    different = module.Study(str(tmp_path / "d"), dataclasses.replace(tiny, base_steps=5), "tiny", "cpu", 0)
    with pytest.raises(SystemExit, match="other base settings .*base_steps"):
        module.adopt_base(study["out"], different)
    assert not os.path.exists(tmp_path / "d" / "base")


def test_score_units_share_the_reference_features(study):
    """The reference crops' features are computed by the first chain's score and read by every later one."""
    states = {}
    for arm in ("baseline", "ssreg"):
        for reference in ("heldout", "train"):
            path = os.path.join(study["out"], "arms", arm, "seed0", "score", reference, "generation.json")
            states[arm, reference] = read_json(path)["settings"]["reference_cache"]["state"]
    assert sorted(states.values()) == ["read", "read", "written", "written"], states
    assert {states["ssreg", "heldout"], states["baseline", "heldout"]} == {"read", "written"}


def test_units_share_the_cores(tmp_path, monkeypatch):
    """Each of N parallel units gets cores // N OpenMP threads (six default pools of 16 spinning threads starved the GPU)."""
    module = load_study_module()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "5")  # what the user set is kept
    monkeypatch.setattr(module.os, "cpu_count", lambda: 16)
    runner_study = module.Study(str(tmp_path / "s"), module.PRESETS["tiny"], "tiny", "cpu", 0)
    args = types.SimpleNamespace(devices=["0", "0", "0", "0", "0", "0"], time_budget_s=None, retry_failed=False)
    env = module.Runner(runner_study, [], set(), args).env("0")
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "5" and env["CUDA_VISIBLE_DEVICES"] == "0"


def test_units_waiting_for_a_module_start_once_it_is_installed(tmp_path, monkeypatch):
    """The GPU study installs some wheels while it already runs: a unit deferred for a missing module is re-checked."""
    module = load_study_module()
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "ssreg_study_probe_module_" + str(os.getpid())
    unit = module.Unit("score/ssreg/0", "score", "ssreg", 0, "arms/ssreg/seed0/score", [], needs=(name,))
    runner_study = module.Study(str(tmp_path / "s"), module.PRESETS["tiny"], "tiny", "cpu", 0)
    args = types.SimpleNamespace(devices=None, time_budget_s=None, retry_failed=False)
    runner = module.Runner(runner_study, [unit], {unit.name}, args)
    assert runner.pick() is None and "not importable" in runner.missing[unit.name]
    (tmp_path / f"{name}.py").write_text("")
    assert runner.pick() is unit and unit.name not in runner.missing


# --------------------------------------------------------------------------------------------
# Pieces: the hold-out split, the crops, the statistics over seeds
# --------------------------------------------------------------------------------------------


def test_split_and_crops_are_deterministic(tmp_path):
    study = load_study_module()
    assert study.heldout_indices(54, 8) == [3, 10, 16, 23, 30, 37, 43, 50]
    photos = write_photos(str(tmp_path / "photos"), PHOTOS[:4])
    preset = study.PRESETS["tiny"]
    first = study.prepare_data(photos, str(tmp_path / "a"), preset)
    second = study.prepare_data(photos, str(tmp_path / "b"), preset)
    assert first["fingerprint"] == second["fingerprint"]
    assert first["heldout_photos"] == ["chelsea.jpg", "rocket.jpg"]  # sorted names: astronaut chelsea coffee rocket
    crops = sorted(os.listdir(tmp_path / "a" / "data" / "train_crops"))
    assert crops[:2] == ["00000_astronaut.png", "00001_coffee.png"]  # interleaved: any prefix covers every photo
    assert Image.open(tmp_path / "a" / "data" / "train_crops" / crops[0]).size == (32, 32)


def test_report_statistics_over_seeds(tmp_path):
    study = load_study_module()
    out = tmp_path / "s"
    for seed, psnr in enumerate((20.0, 21.0, 22.5)):
        study.write_json(str(out / "arms" / "ssreg" / f"seed{seed}" / "eval" / "done.json"), {
            "unit": f"eval/ssreg/{seed}", "stage": "eval", "arm": "ssreg", "seed": seed, "status": "done",
            "results": {"rec/PSNR": psnr},
        })  # fmt: skip
    study.write_json(str(out / "arms" / "random_a" / "seed0" / "finetune" / "done.json"), {
        "unit": "finetune/random_a/0", "stage": "finetune", "arm": "random_a", "seed": 0, "status": "diverged",
        "diverged_at_step": 17, "results": {"diverged": 1},
    })  # fmt: skip
    report = study.write_report(str(out))
    entry = report["measures"]["rec/PSNR"]["ssreg"]
    assert entry["n"] == 3 and entry["mean"] == pytest.approx(21.1666667) and entry["std"] == pytest.approx(1.2583057)
    markdown = (out / "study_results.md").read_text()
    assert "| ssreg | 3 | 21.1667 ± 1.2583 | 0: 20.0000, 1: 21.0000, 2: 22.5000 |" in markdown
    assert "`finetune/random_a/0` (step 17)" in markdown and "| random_a | 0 | diverged |" in markdown


# --------------------------------------------------------------------------------------------
# benchmarks/study_figures.py: the arms side by side
# --------------------------------------------------------------------------------------------


FIGURES_SCRIPT = os.path.join(ROOT, "benchmarks", "study_figures.py")
FIGURE_FILES = ("unmasking.png", "blur_dynamics.png", "latent_spectrum.png", "channel_std.png", "training_curves.png",
                "samples.png")  # fmt: skip


def run_figures(*args, check=True):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, FIGURES_SCRIPT, *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def assert_figures_written(folder, stdout, names=FIGURE_FILES):
    """Every figure is a PNG of nonzero size (under ~300 KB) with something drawn on it, and its path was printed."""
    for name in names:
        path = os.path.join(str(folder), name)
        assert os.path.isfile(path), (name, stdout[-3000:])
        assert f"wrote {path}" in stdout, (path, stdout[-3000:])
        assert 0 < os.path.getsize(path) <= 300 * 1024, (name, os.path.getsize(path))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200, (name, image.size)
            pixels = np.asarray(image.convert("L"))
        assert (pixels < 200).mean() > 0.01, f"{name} is (nearly) blank"


def copy_study_results(source, target):
    """The study's small result files only (no weights, crops or checkpoints), like a --pack_dir archive holds."""
    def ignore(directory, names):
        return [n for n in names if n == "data" or n.startswith("checkpoint-") or n.endswith((".safetensors", ".bin"))]

    shutil.copytree(source, target, ignore=ignore)
    return target


def test_study_figures_from_the_study_folder(study, tmp_path):
    out = tmp_path / "figures"
    result = run_figures(study["out"], "--output_dir", out)
    assert_figures_written(out, result.stdout)
    assert "found: base, baseline (1), ssreg (1)" in result.stdout, result.stdout
    assert "6 figure(s) in" in result.stdout and "not drawn" not in result.stdout
    # alpha 0 has no SSReg branch: its latent_mse (always 0) is left out of the training curves, and that is said
    assert "baseline has no latent_mse" in result.stdout and "ssreg has no latent_mse" not in result.stdout


def test_study_figures_from_a_packed_study(study, tmp_path):
    run_study("--output_dir", study["out"], "--preset", "tiny", "--stage", "report", "--pack_dir", tmp_path / "pack")
    archive = tmp_path / "pack" / "study_results.tar.gz"
    out = tmp_path / "figures"
    result = run_figures(archive, "--output_dir", out)
    assert f"(extracted from {archive})" in result.stdout
    assert_figures_written(out, result.stdout)
    assert "found: base, baseline (1), ssreg (1)" in result.stdout


def test_study_figures_skip_missing_pieces_and_show_seeds(study, tmp_path):
    """A study cut short: missing results are skipped and said; an arm with two seeds is drawn too."""
    root = copy_study_results(study["out"], tmp_path / "partial")
    shutil.copytree(root / "arms" / "baseline" / "seed0", root / "arms" / "baseline" / "seed1")
    os.remove(root / "arms" / "ssreg" / "seed0" / "eval" / "results.json")
    os.remove(root / "arms" / "ssreg" / "seed0" / "dit" / "samples" / "final.png")
    os.remove(root / "arms" / "baseline" / "seed1" / "eval" / "done.json")
    out = tmp_path / "figures"
    result = run_figures(root, "--output_dir", out)
    log = result.stdout
    assert "found: base, baseline (2), ssreg (1)" in log, log
    assert "skip ssreg/seed0: no eval/results.json" in log and "skip ssreg/seed0: no dit/samples/final.png" in log
    assert "skip baseline/seed1: eval/done.json is missing" in log  # as in the tables: unfinished units don't count
    assert "unmasking: no unmasking results for ssreg" in log and "samples: no DiT samples for ssreg" in log
    assert_figures_written(out, log)  # the base, baseline (and ssreg's training log) are still drawn


def test_study_figures_bad_study_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_study"
    result = run_figures(missing, "--output_dir", tmp_path / "figures", check=False)
    assert result.returncode == 2 and f"argument STUDY: '{missing}' does not exist" in result.stderr, result.stderr
    not_an_archive = tmp_path / "study_results.tar.gz"
    not_an_archive.write_text("not a tarball")
    result = run_figures(not_an_archive, "--output_dir", tmp_path / "figures", check=False)
    assert result.returncode == 2 and f"argument STUDY: '{not_an_archive}' is a file but not a tar archive" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_figures(tmp_path / "empty", "--output_dir", tmp_path / "figures", check=False)
    assert result.returncode == 2 and "is not a study: no arms/, base/ or study_results.json" in result.stderr
    (tmp_path / "bare" / "arms" / "ssreg" / "seed0").mkdir(parents=True)  # a study with no result in it yet
    result = run_figures(tmp_path / "bare", "--output_dir", tmp_path / "figures", check=False)
    assert result.returncode == 1 and "no figure could be drawn" in result.stderr
    assert "skip ssreg/seed0: no eval/results.json" in result.stdout
    result = run_figures("--output_dir", tmp_path / "figures", check=False)
    assert result.returncode == 2 and "the following arguments are required: STUDY" in result.stderr
    assert not os.path.exists(tmp_path / "figures")


def test_study_figures_frequency_order_matches_the_basis():
    spec = importlib.util.spec_from_file_location("study_figures", FIGURES_SCRIPT)
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    from diffusers_ssreg.basis import channel_frequency_order, channel_to_basis_index

    for grid in ((1, 1), (2, 2), (4, 4), (2, 8), (8, 2)):
        assert figures.frequency_order(grid) == channel_frequency_order(grid), grid
        assert [figures.basis_index(n, grid) for n in range(grid[0] * grid[1])] == \
            [tuple(channel_to_basis_index(n, grid)) for n in range(grid[0] * grid[1])]  # fmt: skip
    assert figures.frequency_order((4, 4)) == [0, 1, 4, 2, 5, 8, 3, 6, 9, 12, 7, 10, 13, 11, 14, 15]


def test_set_changes_the_plan_and_is_recorded(tmp_path):
    """--set KEY=VALUE: typed like the preset's field, part of the plan (another hash), shown in the report."""
    module = load_study_module()
    tiny = module.PRESETS["tiny"]
    changed, overrides = module.apply_overrides(tiny, ["finetune_steps=6", "finetune_freeze=1,0", "allow_tf32=true", "finetune_lr=0.5"])
    assert overrides == {"finetune_steps": 6, "finetune_freeze": (1, 0), "allow_tf32": True, "finetune_lr": 0.5}
    assert (changed.finetune_steps, changed.finetune_freeze, changed.allow_tf32, changed.finetune_lr) == (6, (1, 0), True, 0.5)
    assert changed.base_steps == tiny.base_steps
    plain = module.Study(str(tmp_path / "a"), tiny, "tiny", "cpu", 0)
    assert module.Study(str(tmp_path / "a"), tiny, "tiny", "cpu", 0, {}).plan_hash == plain.plan_hash
    assert "overrides" not in plain.plan
    # the published short study (docs/results.md) keeps its plan hash: no --set, no change of the preset
    assert module.Study(str(tmp_path / "s"), module.PRESETS["short"], "short", "cuda", 3).plan_hash == "4a6fbb4574054e27"
    study = module.Study(str(tmp_path / "b"), changed, "tiny", "cpu", 0, overrides)
    assert study.plan_hash != plain.plan_hash and module.base_hash(study.plan) != module.base_hash(plain.plan)
    study.check_or_write_plan()
    module.write_report(str(tmp_path / "b"))
    header = (tmp_path / "b" / "study_results.md").read_text().splitlines()[2]
    assert "(preset `tiny`, `--set allow_tf32=true finetune_freeze=1,0 finetune_lr=0.5 finetune_steps=6`)" in header
    other, other_overrides = module.apply_overrides(tiny, ["finetune_steps=7"])
    with pytest.raises(SystemExit, match="made with another plan .*finetune_steps"):
        module.Study(str(tmp_path / "b"), other, "tiny", "cpu", 0, other_overrides).check_or_write_plan()
    # only the fine-tune changes: the base settings are the same, so --adopt_base accepts the base of the plain plan
    only_finetune = module.Study(str(tmp_path / "c"), other, "tiny", "cpu", 0, other_overrides)
    assert module.base_hash(only_finetune.plan) == module.base_hash(plain.plan)


@pytest.mark.parametrize("item, message", [
    ("finetune_steps=3.5", "finetune_steps must be an integer (the preset has 4)"),
    ("fine_steps=3", "unknown setting 'fine_steps'; settable: resolution,"),
    ("finetune_freeze=2", "finetune_freeze must be 2 comma-separated integers"),
    ("finetune_steps", "expected KEY=VALUE"),
    ("finetune_lr=-1", "finetune_lr must not be negative"),
    ("allow_tf32=maybe", "allow_tf32 must be true or false"),
    ("workers=2", "unknown setting 'workers'"),
])  # fmt: skip
def test_bad_set_is_a_clear_error(tmp_path, item, message):
    result = run_study("--output_dir", tmp_path / "s", "--preset", "tiny", "--set", item, "--dry_run", check=False)
    assert result.returncode == 2 and f"--set {item!r}: {message}" in result.stderr
    assert not os.path.exists(tmp_path / "s" / "plan.json")


def test_report_derives_channel_evenness_and_unmasking_steps(tmp_path):
    """latent/channel_std_cv and latent/unmask_max_step: from the eval unit's results.json, also for markers written
    before these measures existed (the 2026-11-24 GPU study)."""
    module = load_study_module()
    latent = {"statistics": {"std": [1.0, 1.0, 2.0, 2.0]}, "unmasking": {"psnr": [10.0, 14.0, 15.5, 15.0]}}
    assert module.latent_extras(latent) == {"channel_std_cv": pytest.approx(0.5 / 1.5), "unmask_max_step": pytest.approx(4.0)}
    assert module.latent_extras({}) == {}
    folder = tmp_path / "s" / "arms" / "ssreg" / "seed0" / "eval"
    module.write_json(str(folder / "done.json"), {"unit": "eval/ssreg/0", "stage": "eval", "arm": "ssreg", "seed": 0,
                                                  "status": "done", "results": {"rec/PSNR": 20.0}})  # fmt: skip
    module.write_json(str(folder / "results.json"), {"models": {"ssreg/0": {"latent": latent}}})
    report = module.write_report(str(tmp_path / "s"))
    assert report["measures"]["latent/channel_std_cv"]["ssreg"]["values"]["0"] == pytest.approx(1 / 3)
    assert report["measures"]["latent/unmask_max_step"]["ssreg"]["mean"] == pytest.approx(4.0)
    assert "| ssreg | 1 | 4.0000 | 0: 4.0000 |" in (tmp_path / "s" / "study_results.md").read_text()
