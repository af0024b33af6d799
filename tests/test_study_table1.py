"""studies/small_scale: the Table-1 study's parts. Its tiny config for real on the CPU (five arms fine-tuned and
evaluated, the pilot scored into its unit file), its dry runs, and the merged report on synthetic unit files."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_study_workflow import CONFIGS, STUDY, environment, job_counts, photos, read_json, write_config  # noqa: E402, F401


TINY = os.path.join(CONFIGS, "tiny_table1.yaml")
TABLE1 = os.path.join(CONFIGS, "table1.yaml")
SCRIPTS = os.path.join(STUDY, "scripts")
ARMS = ("none", "ssreg", "eqvae", "scale_equivariance", "spectrum_matching")
METHOD_TERMS = {"none": (), "ssreg": ("latent_mse",), "eqvae": ("eq_mae",), "scale_equivariance": ("se_mae",),
                "spectrum_matching": ("esm",)}  # fmt: skip
OTHER_TERMS = ("latent_mse", "eq_mae", "se_mae", "esm")


def snakemake(workdir, *args, config=None, photos=None, settings=(), check=True):  # noqa: F811
    """Snakemake on `config` (tiny_table1.yaml), with photos, study_dir and `settings` in one --config (a second
    --config would replace the first); the targets come first (--configfile takes several values)."""
    command = [sys.executable, "-m", "snakemake", "-s", os.path.join(STUDY, "Snakefile"), *args, "--configfile",
               config or TINY, "--config", f"photos={photos}", "study_dir=study", *settings]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake exited {result.returncode}:\n{output[-6000:]}")
    return result.returncode, output


def run_script(name, *args):
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args], env=environment(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The tiny Table-1 config for real: every arm fine-tuned and evaluated; the pilot and ssreg/0 scored into unit files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table1(photos, tmp_path_factory):  # noqa: F811
    """Every arm of tiny_table1.yaml fine-tuned and evaluated, and the pilot to its unit file. (An arm's own unit
    file is made and checked by the end-to-end run of tests/test_study_workflow.py.)"""
    workdir = tmp_path_factory.mktemp("table1_run")
    evals = [f"study/arms/{arm}/seed0/eval/results.json" for arm in ARMS]
    started = time.monotonic()
    _, output = snakemake(workdir, "pilot", *evals, "--cores", "2", photos=photos)
    seconds = time.monotonic() - started
    print(f"tiny Table-1 run (5 fine-tunes and evals, the pilot's chain): {seconds:.0f} s")
    return {"workdir": str(workdir), "dir": os.path.join(str(workdir), "study"), "output": output, "photos": photos}


def test_every_arm_fine_tunes_and_evaluates_with_its_own_method(table1):
    counts = job_counts(table1["output"])
    assert counts == {"data": 1, "vae_config": 1, "base": 1, "eval_base": 1, "finetune": 5, "eval": 5, "cache": 1,
                      "dit": 1, "sample": 1, "score": 2, "score_real": 3, "unit": 1, "pilot": 1}, counts  # fmt: skip
    for arm in ARMS:
        chain = os.path.join(table1["dir"], "arms", arm, "seed0")
        with open(os.path.join(chain, "finetune", "logs", "train_metrics.jsonl")) as f:
            last = json.loads(f.read().splitlines()[-1])
        assert last["step"] == 4
        for term in OTHER_TERMS:  # each arm trained its own regularizer's terms, and no other's
            assert (term in last and last[term] > 0) == (term in METHOD_TERMS[arm]), (arm, term, last)
        model = next(iter(read_json(os.path.join(chain, "eval", "results.json"))["models"].values()))
        assert 5 < model["reconstruction"]["metrics"]["PSNR"] < 60
        assert model["latent"]["unmasking"]["psnr"] and model["latent"]["statistics"]["std"]
    command = read_json(os.path.join(table1["dir"], "arms", "eqvae", "seed0", "finetune", ".study_job.json"))["command"]
    assert "--regularizer" in command and "eqvae" in command and "--eqvae_freeze_encoder_blocks" in command


def test_the_pilots_unit_file_holds_the_tools_numbers_and_a_small_grid(table1):
    out = table1["dir"]
    unit = read_json(os.path.join(out, "units", "base_seed0.json"))
    assert (unit["arm"], unit["seed"], unit["method"], unit["pilot"]) == ("base", 0, "none", True)
    chain = os.path.join(out, "arms", "base", "seed0")
    measures = unit["measures"]
    model = next(iter(read_json(os.path.join(out, "base", "eval", "results.json"))["models"].values()))
    assert measures["rec/PSNR"] == model["reconstruction"]["metrics"]["PSNR"]
    assert measures["rec/rFID-EffNetLite0"] == model["reconstruction"]["metrics"]["rFID-EffNetLite0"]
    for reference in ("train", "heldout"):
        generation = read_json(os.path.join(chain, "score", reference, "generation.json"))
        for name in ("FID", "sFID", "precision", "recall"):
            assert measures[f"gen_{reference}/{name}-EffNetLite0"] == generation["metrics"][f"{name}-EffNetLite0"]
        assert 0 <= measures[f"gen_{reference}/precision-EffNetLite0"] <= 1
    for key in ("latent/channel_std_cv", "latent/psd_slope", "latent/unmask_psnr@3", "latent/unmask_max_step"):
        assert math.isfinite(measures[key]), key
    with open(os.path.join(chain, "dit", "logs", "train_metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert unit["curves"]["dit"] == {"step": [r["step"] for r in logged], "loss": [r["loss"] for r in logged]}
    with open(os.path.join(out, "base", "vae", "logs", "train_metrics.jsonl")) as f:
        assert unit["curves"]["vae"]["kl"][-1] == json.loads(f.read().splitlines()[-1])["kl"] == measures["train/kl"]
    for stage in ("data", "base", "eval_base", "cache", "dit", "sample", "score_heldout", "score_train"):
        assert unit["wall_seconds"][stage] is not None and unit["wall_seconds"][stage] >= 0, stage
    assert "finetune" not in unit["wall_seconds"] and unit["vae_sha256"] == unit["base_vae_sha256"]
    study = unit["settings"]["study"]
    assert study["dit"]["max_train_steps"] == 4 and study["dit"]["preset"] == "LightningDiT-B/2"  # from `generation`
    assert study["sample"]["num_images_per_class"] == study["score"]["max_samples"] == 16 and "arms" not in study
    assert unit["data"]["train"]["crops"] == 48 and len(unit["base_vae_sha256"]) == 64 and unit["device"] == "cpu"
    assert unit["code"]["diffusers_ssreg_version"] and unit["feature_extractor"] == "EffNetLite0"
    grid = Image.open(os.path.join(out, "units", "base_seed0.png"))
    assert grid.size == (4 * 32, 4 * 32) and unit["grid"]["file"] == "base_seed0.png"
    assert os.path.getsize(os.path.join(out, "units", "base_seed0.json")) < 100_000

    # the real crops scored like samples: other crops of the training photos against both references, the held-out
    # crops against the training crops (generation.num_samples of them: 16)
    assert sorted(unit["real"]) == ["heldout", "real"]
    for source, references in (("real", ("train", "heldout")), ("heldout", ("train",))):
        generation = {r: read_json(os.path.join(out, "real", source, r, "generation.json")) for r in references}
        expected = {f"gen_{r}/{k}": v for r in references for k, v in generation[r]["metrics"].items()}
        assert unit["real"][source] == {"crops": 16, "measures": expected}, source
    split = read_json(os.path.join(out, "data", "split.json"))
    assert split["real"]["photos"] == split["train"]["photos"] and split["real"]["crops"] == 16
    train, real = (sorted(n for n in os.listdir(os.path.join(out, "data", f"{p}_crops")) if n.endswith(".png"))
                   for p in ("train", "real"))  # fmt: skip
    assert real == train[:16]  # crop i of both parts comes from the same photo ...
    for name in real[:4]:  # ... at another place and scale
        pixels = [Image.open(os.path.join(out, "data", f"{p}_crops", name)).tobytes() for p in ("train", "real")]
        assert pixels[0] != pixels[1], name


def test_the_merged_report_and_figures_from_the_unit_files_alone(table1, tmp_path):
    copy = tmp_path / "brought_back"  # the unit files without the study folder they came from
    copy.mkdir()
    for name in os.listdir(os.path.join(table1["dir"], "units")):
        with open(os.path.join(table1["dir"], "units", name), "rb") as f:
            (copy / name).write_bytes(f.read())
    result = run_script("report.py", "--units", str(copy), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "out" / "table1.md").read_text()
    psnr = read_json(copy / "base_seed0.json")["measures"]["rec/PSNR"]
    assert f"| base VAE (no fine-tune) | 1 | {psnr:.4f} |" in markdown
    fmt_value = load_report().fmt_value
    real = read_json(copy / "base_seed0.json")["real"]
    fid = fmt_value(real["real"]["measures"]["gen_train/FID-EffNetLite0"])
    assert f"| real: other crops of the training photos (16 crops) | – | – | – | – | {fid} |" in markdown
    recall = fmt_value(real["heldout"]["measures"]["gen_train/recall-EffNetLite0"])
    row = r"^\| real: the held-out crops \(16 crops\) \| – \|( – \|){3}.*\| " + re.escape(recall) + r" \|$"
    assert re.search(row, markdown, re.MULTILINE), markdown
    assert markdown.count("| real: the held-out crops") == 1  # not scored against themselves: no row there
    assert "No verdict: no SSReg arm among the units." in markdown
    result = run_script("figures.py", "--units", str(copy), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    for name in ("samples_base.png", "dit_loss.png"):
        assert os.path.getsize(tmp_path / "out" / name) > 1000, name


def test_only_selects_the_units_and_a_rerun_has_nothing_to_do(table1):
    evals = [f"study/arms/{arm}/seed0/eval/results.json" for arm in ARMS]
    _, output = snakemake(table1["workdir"], "pilot", *evals, "--cores", "1", "-n", photos=table1["photos"])
    assert "Nothing to be done" in output, output[-3000:]
    _, output = snakemake(table1["workdir"], "units", "--cores", "1", "-n", photos=table1["photos"], settings=["only=eqvae/0"])
    counts = job_counts(output)  # eqvae/0 is fine-tuned and evaluated already: only its generation chain is left
    assert counts == {"cache": 1, "dit": 1, "sample": 1, "score": 2, "unit": 1, "units": 1}, counts
    _, output = snakemake(table1["workdir"], "units", "--cores", "1", "-n", photos=table1["photos"],
                          settings=["only=[eqvae, ssreg/0]"])  # fmt: skip
    assert job_counts(output)["unit"] == 2


# --------------------------------------------------------------------------------------------
# Dry runs: the GPU config's commands, the pilot, selections and their errors
# --------------------------------------------------------------------------------------------


def test_table1_config_runs_lightningdit_with_its_recipe_and_the_generation_settings(photos, tmp_path):  # noqa: F811
    _, output = snakemake(tmp_path, "pilot", "--cores", "16", "--resources", "gpu=4", "-n", "-p", config=TABLE1, photos=photos)
    counts = job_counts(output)
    assert counts == {"data": 1, "vae_config": 1, "base": 1, "eval_base": 1, "cache": 1, "dit": 1, "sample": 1,
                      "score": 2, "score_real": 3, "unit": 1, "pilot": 1}, counts  # fmt: skip
    lines = output.splitlines()
    dit = next(line for line in lines if "train_dit.py" in line)
    for expected in ("--preset LightningDiT-B/2", "--max_train_steps 6000", "--train_batch_size 256", "--unconditional",
                     "--latents_dir study/arms/base/seed0/cache", "--mixed_precision bf16"):  # fmt: skip
        assert expected in dit, (expected, dit)
    for recipe in ("--learning_rate", "--adam_beta", "--cosine_loss_weight", "--logit_", "--lr_scheduler", "--random_flip"):
        assert recipe not in dit, (recipe, dit)  # left to the preset's recipe
    sample = next(line for line in lines if "sample_dit.py" in line)
    assert "--num_images_per_class 5000" in sample and "--num_inference_steps 249" in sample
    assert all("--max_samples 5000" in line for line in lines if " generation --samples" in line)
    assert "--resolution 128" in next(line for line in lines if "prepare_data.py" in line)
    base = next(line for line in lines if "finetune_vae.py" in line)
    assert "--regularizer none" in base and "--plain_freeze_encoder_blocks 0" in base and "--plain_lambda_lpips 0" in base
    assert "--deterministic" in base  # every run in parts trains the same base (README.md)

    _, output = snakemake(tmp_path, "--cores", "16", "--resources", "gpu=4", "-n", config=TABLE1, photos=photos)
    counts = job_counts(output)  # everything: 5 arms x 3 seeds, their unit files and both reports (no pilot)
    assert counts["finetune"] == 15 and counts["unit"] == 15 and counts["table1"] == 1 and counts["dit"] == 15, counts


@pytest.mark.parametrize(
    "extra, message",
    [
        (["only=ssreg/7"], "config only: 'ssreg/7': arm 'ssreg' has the seeds [0]"),
        (["only=esm"], "config only: 'esm': no arm 'esm'"),
        (["generation={dit_steps: 0}"], "config generation.dit_steps: must be a positive integer, got 0"),
        (["generation={steps: 3}"], "config generation.steps: unknown"),
        (["dit={max_train_steps: 9}"], "config dit.max_train_steps: '9', but generation.dit_steps sets it to 4"),
    ],
)  # fmt: skip
def test_a_bad_selection_or_generation_setting_is_refused(photos, tmp_path, extra, message):  # noqa: F811
    code, output = snakemake(tmp_path, "units", "--cores", "1", "-n", photos=photos, settings=extra, check=False)
    assert code != 0 and message in output, output[-3000:]


def test_a_bad_real_crops_count_is_refused(photos, tmp_path):  # noqa: F811
    config = write_config(tmp_path / "c.yaml", lambda c: c["data"].update(real_crops="many"))
    code, output = snakemake(tmp_path, "--cores", "1", "-n", config=config, photos=photos, check=False)
    assert code != 0 and "config data.real_crops: must be a non-negative integer (0: none), got 'many'" in output, output[-3000:]


def test_an_arm_may_not_take_the_pilots_name(photos, tmp_path):  # noqa: F811
    config = write_config(tmp_path / "c.yaml", lambda c: c["arms"].update(base=c["arms"].pop("none")), base="tiny_table1.yaml")
    code, output = snakemake(tmp_path, "--cores", "1", "-n", config=config, photos=photos, check=False)
    assert code != 0 and "config arms: the arm name 'base' is the base VAE's own chain" in output, output[-3000:]


# --------------------------------------------------------------------------------------------
# The merged report on synthetic unit files: statistics, the verdict, merging
# --------------------------------------------------------------------------------------------


def unit_file(folder, arm, seed, measures, method=None, settings="s1", base="b1", grid=True):
    """A unit file as scripts/unit.py writes it, with the given measures."""
    unit = {"format": "ssreg-small-scale-unit", "format_version": 1, "arm": arm, "seed": seed,
            "method": method or arm, "pilot": arm == "base", "init": "base", "flags": {}, "finetune_flags": {},
            "settings": {"study": {"dit": {"preset": "LightningDiT-B/2", "max_train_steps": 6000}}},
            "settings_sha256": settings, "base_vae_sha256": base, "vae_sha256": "v",
            "data": {p: {"crops": 10, "photos": 2, "fingerprint": "f"} for p in ("train", "heldout")},
            "feature_extractor": "EffNetLite0", "measures": measures,
            "curves": {"dit": {"step": [50, 100], "loss": [1.0 + seed, 0.5 + seed]}, "vae": {"step": []}},
            "wall_seconds": {"dit": 100.0 + seed}, "device": "cpu", "code": {"commit": "abc"},
            "grid": {"file": f"{arm}_seed{seed}.png"}}  # fmt: skip
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{arm}_seed{seed}.json")
    with open(path, "w") as f:
        json.dump(unit, f)
    if grid:
        Image.new("RGB", (64, 64), (40 * seed, 90, 200)).save(os.path.join(folder, f"{arm}_seed{seed}.png"))
    return path


def scores(psnr, rfid, gfid, heldout=None):
    return {"rec/PSNR": psnr, "rec/SSIM": 0.5, "rec/rFID-EffNetLite0": rfid, "gen_train/FID-EffNetLite0": gfid,
            "gen_heldout/FID-EffNetLite0": gfid + 1 if heldout is None else heldout, "gen_train/precision-EffNetLite0": 0.4,
            "gen_train/recall-EffNetLite0": 0.3, "latent/channel_std_cv": 0.2, "dit/loss": 0.5}  # fmt: skip


def load_report():
    sys.path.insert(0, SCRIPTS)
    import report

    return report


def test_table1_statistics_and_verdicts_from_synthetic_units(tmp_path):
    import numpy as np
    from scipy import stats

    # Two runs, brought back into two folders: ssreg seeds 0 and 1 in one, seed 2 and the others in the other.
    ssreg = {0: (20.0, 10.0, 30.0), 1: (20.2, 12.0, 31.0), 2: (20.4, 14.0, 29.0)}
    none = {0: (19.0, 11.0, 40.0), 1: (19.1, 13.0, 41.0), 2: (19.2, 12.0, 42.0)}  # PSNR here: SSReg higher (paper: lower)
    eqvae = {0: (20.2, 11.0, 31.0), 1: (20.1, 13.0, 30.0), 2: (20.3, 12.0, 32.0)}
    for seed, values in ssreg.items():
        unit_file(str(tmp_path / ("run1" if seed < 2 else "run2")), "ssreg", seed, scores(*values))
    for seed in range(3):
        unit_file(str(tmp_path / "run2"), "none", seed, scores(*none[seed]))
        unit_file(str(tmp_path / "run2"), "eqvae", seed, scores(*eqvae[seed]))
    unit_file(str(tmp_path / "run2"), "scale_equivariance", 0, scores(20.0, 12.0, 35.0))  # one seed: no spread
    unit_file(str(tmp_path / "run2"), "spectrum_matching", 0, scores(20.0, 12.0, 45.0))
    unit_file(str(tmp_path / "run2"), "spectrum_matching", 1, scores(20.1, 12.5, 46.0))
    unit_file(str(tmp_path / "run2"), "base", 0, scores(19.5, 12.0, 50.0), method="none")
    # the same unit copied into a third folder counts once
    unit_file(str(tmp_path / "copy"), "none", 0, scores(*none[0]))
    result = run_script("report.py", "--units", str(tmp_path / "run1"), str(tmp_path / "run2"), str(tmp_path / "copy"),
                        "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = read_json(tmp_path / "out" / "table1.json")
    markdown = (tmp_path / "out" / "table1.md").read_text()

    psnr = report["arms"]["ssreg"]["measures"]["rec/PSNR"]
    values = [v[0] for v in ssreg.values()]
    assert psnr["n"] == 3 and psnr["mean"] == pytest.approx(np.mean(values)) and psnr["std"] == pytest.approx(np.std(values, ddof=1))
    assert report["arms"]["none"]["seeds"] == [0, 1, 2] and len(report["units"]) == 13
    assert f"| SSReg (`ssreg`) | 3 | {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} |" in markdown
    assert "| FT-SE (scale equivariance) (`scale_equivariance`) | 1 | 20.0000 | " in markdown
    rows = [line.split(" | ")[0] for line in markdown.split("## Generation")[0].splitlines() if line.startswith("| ")][1:]
    assert rows == ["| base VAE (no fine-tune)", "| plain fine-tune (`none`)", "| EQ-VAE (`eqvae`)",
                    "| FT-SE (scale equivariance) (`scale_equivariance`)", "| spectrum matching (ESM) (`spectrum_matching`)",
                    "| SSReg (`ssreg`)"]  # fmt: skip

    verdicts = {(v["arm"], v["claim"], v["measure"].split("/")[0]): v for v in report["verdicts"]}
    assert not any(v["arm"] == "base" for v in report["verdicts"])  # the base VAE is no method of the table
    gfid = verdicts[("none", "gFID", "gen_train")]
    assert gfid["paper"] == "better" and gfid["observed"] == "better" and gfid["verdict"] == "holds"
    expected = stats.ttest_ind([v[2] for v in ssreg.values()], [v[2] for v in none.values()], equal_var=False)
    assert gfid["p"] == pytest.approx(expected.pvalue) and gfid["difference"] == pytest.approx(30.0 - 41.0)
    assert gfid["ci95"][0] < gfid["difference"] < gfid["ci95"][1] < 0
    psnr_none = verdicts[("none", "PSNR", "rec")]  # the paper: SSReg 31.55 < 31.70; here significantly higher
    assert psnr_none["paper"] == "worse" and psnr_none["observed"] == "better" and psnr_none["verdict"] == "reversed"
    assert verdicts[("none", "rFID", "rec")]["verdict"] == "not resolved"  # 12 ± 2 against 12 ± 1
    assert verdicts[("eqvae", "gFID", "gen_train")]["verdict"] == "not resolved"  # 30 ± 1 against 31 ± 1
    assert verdicts[("scale_equivariance", "gFID", "gen_train")]["verdict"] == "too few seeds"
    sm = verdicts[("spectrum_matching", "gFID", "gen_train")]
    assert sm["paper"] is None and sm["verdict"] == "no paper claim" and sm["p"] < 0.05
    assert "**holds**" in markdown and "**reversed**" in markdown and "**not resolved**" in markdown

    result = run_script("figures.py", "--units", str(tmp_path / "run1"), str(tmp_path / "run2"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    for arm in ("ssreg", "none", "eqvae", "base"):
        assert os.path.getsize(tmp_path / "out" / f"samples_{arm}.png") > 1000, arm
    assert os.path.getsize(tmp_path / "out" / "dit_loss.png") > 1000


def test_verdict_logic():
    report = load_report()
    # the paper's direction (↓: lower is better), clearly reproduced, clearly reversed, within the spread
    assert report.verdict(13.33, 16.08, [10.0, 10.1, 9.9], [20.0, 20.2, 19.8], "↓")["verdict"] == "holds"
    assert report.verdict(13.33, 16.08, [20.0, 20.2, 19.8], [10.0, 10.1, 9.9], "↓")["verdict"] == "reversed"
    within = report.verdict(13.33, 16.08, [10.0, 12.0, 14.0], [11.0, 13.0, 15.0], "↓")
    assert within["verdict"] == "not resolved" and within["observed"] == "better" and within["p"] > 0.05
    assert report.verdict(31.55, 31.70, [30.0], [29.0, 29.5], "↑")["verdict"] == "too few seeds"
    exact = report.verdict(31.55, 31.70, [30.0, 30.0], [31.0, 31.0], "↑")  # no spread: the difference is exact
    assert exact["verdict"] == "holds" and exact["p"] == 0.0 and exact["observed"] == "worse"
    assert report.verdict(None, 16.08, [1.0, 2.0], [3.0, 4.0], "↓")["verdict"] == "no paper claim"
    assert report.verdict(13.33, 16.08, [10.0, 10.1], [20.0, 20.2], "↓", alpha=1e-9)["verdict"] == "not resolved"


def test_units_that_cannot_share_a_table_are_refused(tmp_path):
    unit_file(str(tmp_path / "a"), "ssreg", 0, scores(20.0, 10.0, 30.0))
    unit_file(str(tmp_path / "a"), "none", 0, scores(19.0, 10.0, 40.0), settings="s2")
    result = run_script("report.py", "--units", str(tmp_path / "a"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "made under 2 different settings or crops" in result.stderr, result.stderr

    unit_file(str(tmp_path / "b"), "ssreg", 0, scores(20.0, 10.0, 30.0))
    unit_file(str(tmp_path / "c"), "ssreg", 0, scores(20.5, 10.0, 30.0))
    result = run_script("report.py", "--units", str(tmp_path / "b"), str(tmp_path / "c"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "unit ssreg/0 twice with different results" in result.stderr, result.stderr

    unit_file(str(tmp_path / "d"), "ssreg", 0, scores(20.0, 10.0, 30.0))
    unit_file(str(tmp_path / "d"), "none", 0, scores(19.0, 10.0, 40.0), base="b2")
    result = run_script("report.py", "--units", str(tmp_path / "d"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "The base VAE's weights differ between runs (2 versions" in (tmp_path / "out" / "table1.md").read_text()

    result = run_script("report.py", "--units", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "is neither a file nor a folder" in result.stderr
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "other.json").write_text("{}")
    result = run_script("report.py", "--units", str(tmp_path / "e"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "no unit file" in result.stderr
    assert re.search(r"--units needs --output_dir", run_script("report.py", "--units", str(tmp_path / "d")).stderr)
