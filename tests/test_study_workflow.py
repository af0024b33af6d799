"""studies/small_scale: the study's Snakemake workflow, its tiny config end to end on the CPU, and its dry runs."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "studies", "small_scale")
SNAKEFILE = os.path.join(STUDY, "Snakefile")
CONFIGS = os.path.join(STUDY, "configs")
JOB = os.path.join(STUDY, "scripts", "job.py")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle")
STAGE_OUTPUTS = {  # what each stage's tool leaves in a chain's folder
    "finetune": ("README.md", "config.json", "diffusion_pytorch_model.safetensors", "logs/train_metrics.jsonl"),
    "eval": ("results.json", "report.md"),
    "cache": ("latent_stats.json",),
    "dit": ("README.md", "model_index.json", "samples/final.png", "logs/train_metrics.jsonl"),
    "sample": ("samples.json", "0000_00000.png"),
    "score": ("heldout/generation.json", "train/generation.json"),
}
FIGURES = ("unmasking.png", "blur_dynamics.png", "latent_spectrum.png", "channel_std.png", "training_curves.png",
           "samples.png")  # fmt: skip


def environment():
    """Offline, one thread, this checkout's package and the environment's tools (accelerate, ssreg-eval) first."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=path, PYTHONPATH=pythonpath)


def snakemake(workdir, *args, config=os.path.join(CONFIGS, "tiny.yaml"), photos=None, check=True, timeout=600):
    command = [sys.executable, "-m", "snakemake", "-s", SNAKEFILE, "--configfile", config, *args]
    if photos is not None:
        command += ["--config", f"photos={photos}", "study_dir=study"]
    result = subprocess.run(command, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake exited {result.returncode}:\n{output[-6000:]}")
    return result.returncode, output


def job_counts(output):
    """{rule: count} from the "Job stats" table of a (dry) run."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE) if m.group(1) != "total"}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_config(path, edit, base="tiny.yaml"):
    """A copy of a shipped config with `edit(config)` applied (yaml is Snakemake's own dependency)."""
    import yaml

    with open(os.path.join(CONFIGS, base)) as f:
        config = yaml.safe_load(f)
    edit(config)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image's bundled photos as JPEG files (no download)."""
    from skimage import data as skdata

    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        array = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        Image.fromarray(array).convert("RGB").save(folder / f"{name}.jpg", quality=95)
    return str(folder)


@pytest.fixture(scope="module")
def study(photos, tmp_path_factory):
    """The tiny config (2 arms, 1 seed, a few steps per stage), run once end to end on the CPU."""
    workdir = tmp_path_factory.mktemp("study_run")
    started = time.monotonic()
    _, output = snakemake(workdir, "--cores", "2", photos=photos)
    seconds = time.monotonic() - started
    print(f"tiny study end to end: {seconds:.0f} s")
    return {"workdir": str(workdir), "dir": os.path.join(str(workdir), "study"), "output": output, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# The tiny config end to end
# --------------------------------------------------------------------------------------------


def test_every_job_ran_and_wrote_its_outputs(study):
    counts = job_counts(study["output"])
    assert counts == {"data": 1, "study_config": 1, "vae_config": 1, "base": 1, "eval_base": 1, "finetune": 2,
                      "eval": 2, "cache": 2, "dit": 2, "sample": 2, "score": 4, "unit": 2, "report": 1, "figures": 1,
                      "table1": 1, "all": 1}, counts  # fmt: skip
    out = study["dir"]
    split = read_json(os.path.join(out, "data", "split.json"))
    assert len(split["train"]["photos"]) == 4 and len(split["heldout"]["photos"]) == 2
    assert not set(split["train"]["photos"]) & set(split["heldout"]["photos"])
    for part, count in (("train", 48), ("heldout", 16)):
        assert len([n for n in os.listdir(os.path.join(out, "data", f"{part}_crops")) if n.endswith(".png")]) == count
    assert os.path.isfile(os.path.join(out, "base", "vae", "diffusion_pytorch_model.safetensors"))
    for arm in ("baseline", "ssreg"):
        for stage, files in STAGE_OUTPUTS.items():
            for name in files:
                assert os.path.isfile(os.path.join(out, "arms", arm, "seed0", stage, name)), (arm, stage, name)
        samples = [n for n in os.listdir(os.path.join(out, "arms", arm, "seed0", "sample")) if n.endswith(".png")]
        assert len(samples) == 16
    for name in FIGURES:
        assert os.path.getsize(os.path.join(out, "figures", name)) > 1000, name
    for name in ("units/baseline_seed0.json", "units/ssreg_seed0.png", "table1/table1.md", "table1/dit_loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_the_arms_differ_only_in_their_flags(study):
    """Same data, seeds and settings: the two fine-tunes' commands differ in the arm's flags and folder alone."""
    commands = {}
    for arm in ("baseline", "ssreg"):
        command = read_json(os.path.join(study["dir"], "arms", arm, "seed0", "finetune", ".study_job.json"))["command"]
        text = " ".join(command).replace(f"arms/{arm}/", "arms/ARM/")
        commands[arm] = " ".join(re.sub(r"--ssreg_(alpha|basis) \S+", "", text).split())
        assert "--resume_from_checkpoint latest" in text and "--seed 0" in text
        assert f"--pretrained_model_name_or_path {os.path.join('study', 'base', 'vae')}" in text  # both from the base
    assert commands["baseline"] == commands["ssreg"]


def test_report_holds_the_measured_numbers(study):
    out = study["dir"]
    report = read_json(os.path.join(out, "study_results.json"))
    assert report["missing"] == []
    assert set(report["units"]) == {"base", "baseline/0", "ssreg/0"}
    for arm in ("baseline", "ssreg"):
        unit = report["units"][f"{arm}/0"]
        # every number is the tools' own: compare with the files they wrote
        model = next(iter(read_json(os.path.join(out, "arms", arm, "seed0", "eval", "results.json"))["models"].values()))
        assert unit["rec/PSNR"] == model["reconstruction"]["metrics"]["PSNR"]
        generation = read_json(os.path.join(out, "arms", arm, "seed0", "score", "heldout", "generation.json"))
        assert unit["gen_heldout/FID-EffNetLite0"] == generation["metrics"]["FID-EffNetLite0"]
        with open(os.path.join(out, "arms", arm, "seed0", "dit", "logs", "train_metrics.jsonl")) as f:
            assert unit["dit/loss"] == json.loads(f.read().splitlines()[-1])["loss"]
        # and sane
        assert 5 < unit["rec/PSNR"] < 60 and 0 < unit["rec/SSIM"] <= 1
        assert math.isfinite(unit["rec/rFID-EffNetLite0"]) and unit["rec/rFID-EffNetLite0"] > 0
        assert 0 <= unit["latent/coherence"] <= 1 and unit["latent/channel_std_cv"] >= 0
        assert math.isfinite(unit["latent/psd_slope"]) and unit["latent/unmask_max_step"] > 0
        assert unit["train/kl"] > 0 and unit["train/step"] == 4 and unit["dit/loss"] > 0
        assert unit["cache/num_samples"] == 48  # the training crops (each cached with its flipped copy)
        assert unit["sample/num_images"] == 16 and unit["gen_train/num_reference"] == 16
        for reference in ("heldout", "train"):
            assert 0 <= unit[f"gen_{reference}/precision-EffNetLite0"] <= 1
            assert unit[f"gen_{reference}/FID-EffNetLite0"] >= 0
    # the regularized branch's terms only where it ran
    assert report["units"]["ssreg/0"]["train/latent_mse"] > 0
    assert "train/latent_mse" not in report["units"]["baseline/0"]
    assert report["units"]["base"]["rec/PSNR"] > 5
    psnr = report["measures"]["rec/PSNR"]
    assert psnr["ssreg"]["n"] == 1 and psnr["ssreg"]["mean"] == report["units"]["ssreg/0"]["rec/PSNR"]
    assert psnr["ssreg"]["std"] is None  # one seed: no spread

    with open(os.path.join(out, "study_results.md")) as f:
        markdown = f.read()
    assert "| baseline | 0 | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ |" in markdown and "| ssreg | 0 | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ |" in markdown
    for key in ("rec/PSNR", "latent/channel_std_cv", "latent/unmask_max_step", "latent/psd_slope", "train/kl",
                "dit/loss", "gen_heldout/FID-EffNetLite0"):  # fmt: skip
        assert f"### `{key}`" in markdown, key
    value = report["units"]["ssreg/0"]["rec/PSNR"]
    assert f"| ssreg | 1 | {value:.4f} | 0: {value:.4f} |" in markdown


def test_unit_files_hold_the_tools_numbers(study):
    """Each chain's unit file (scripts/unit.py): the same numbers as the tools' files, the arm's flags and method."""
    out = study["dir"]
    for arm, method in (("baseline", "none"), ("ssreg", "ssreg")):  # an SSReg arm with alpha 0 is a plain fine-tune
        unit = read_json(os.path.join(out, "units", f"{arm}_seed0.json"))
        assert (unit["arm"], unit["seed"], unit["method"], unit["pilot"]) == (arm, 0, method, False)
        chain = os.path.join(out, "arms", arm, "seed0")
        model = next(iter(read_json(os.path.join(chain, "eval", "results.json"))["models"].values()))
        assert unit["measures"]["rec/PSNR"] == model["reconstruction"]["metrics"]["PSNR"]
        generation = read_json(os.path.join(chain, "score", "train", "generation.json"))
        assert unit["measures"]["gen_train/recall-EffNetLite0"] == generation["metrics"]["recall-EffNetLite0"]
        assert unit["finetune_flags"]["ssreg_freeze_encoder_blocks"] == 2 and unit["flags"]["ssreg_alpha"] in (0, 0.25)
        assert unit["wall_seconds"]["finetune"] > 0 and unit["wall_seconds"]["eval"] > 0
        assert unit["vae_sha256"] != unit["base_vae_sha256"]
        assert Image.open(os.path.join(out, "units", f"{arm}_seed0.png")).size == (128, 128)  # 4 x 4 samples of 32 px
    markdown = open(os.path.join(out, "table1", "table1.md")).read()
    assert "| plain fine-tune (`baseline`) | 1 |" in markdown and "| SSReg (`ssreg`) | 1 |" in markdown
    assert "**too few seeds**" in markdown  # one seed each: no spread to judge an ordering by


def test_report_of_a_study_cut_short_lists_what_is_missing(study, tmp_path):
    """A chain without results (failed, or not run yet) is listed as missing; nothing is made up for it."""
    copy = tmp_path / "study"
    shutil.copytree(study["dir"], copy, ignore=shutil.ignore_patterns("checkpoint-*", "*.png", "*.safetensors", "*.pt"))
    shutil.rmtree(copy / "arms" / "ssreg" / "seed0" / "score")
    shutil.rmtree(copy / "arms" / "ssreg" / "seed0" / "sample")
    result = subprocess.run([sys.executable, os.path.join(STUDY, "scripts", "report.py"), str(copy)], env=environment(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = read_json(copy / "study_results.json")
    assert report["missing"] == ["ssreg/0/sample", "ssreg/0/score"]
    assert "gen_heldout/FID-EffNetLite0" not in report["units"]["ssreg/0"] and "rec/PSNR" in report["units"]["ssreg/0"]
    assert "| ssreg | 0 | ✓ | ✓ | ✓ | ✓ | · | · |" in (copy / "study_results.md").read_text()


def test_a_rerun_has_nothing_to_do(study, photos):
    _, output = snakemake(study["workdir"], "--cores", "2", "-n", photos=photos)
    assert "Nothing to be done" in output, output[-3000:]


def test_a_changed_setting_reruns_what_depends_on_it(study, photos, tmp_path):
    """Snakemake re-runs a job whose parameters changed, and everything downstream of it; nothing else."""
    arm = write_config(tmp_path / "arm.yaml", lambda c: c["arms"]["ssreg"]["flags"].update(ssreg_alpha=0.5))
    _, output = snakemake(study["workdir"], "--cores", "2", "-n", config=arm, photos=photos)
    assert job_counts(output) == {"study_config": 1, "finetune": 1, "eval": 1, "cache": 1, "dit": 1, "sample": 1,
                                  "score": 2, "unit": 1, "report": 1, "figures": 1, "table1": 1, "all": 1}, output[-3000:]  # fmt: skip
    assert "output: study/arms/ssreg/seed0/finetune/README.md" in output
    assert re.search(r"params have changed since last execution:\s+finetune", output)

    dit = write_config(tmp_path / "dit.yaml", lambda c: c["dit"].update(max_train_steps=6))
    _, output = snakemake(study["workdir"], "--cores", "2", "-n", config=dit, photos=photos)
    counts = job_counts(output)
    assert counts["dit"] == 2 and counts["sample"] == 2 and counts["score"] == 4, counts
    assert "finetune" not in counts and "cache" not in counts and "base" not in counts


def test_a_training_job_cut_off_resumes_from_its_checkpoint(study, photos):
    """A DiT run whose result is missing runs again, from its last checkpoint (here the final one: no new step)."""
    dit = os.path.join(study["dir"], "arms", "ssreg", "seed0", "dit")
    checkpoint = os.stat(os.path.join(dit, "checkpoint-4")).st_ino
    os.remove(os.path.join(dit, "README.md"))
    snakemake(study["workdir"], "--cores", "2", "study/arms/ssreg/seed0/dit/README.md", photos=photos)
    with open(os.path.join(study["dir"], "logs", "dit", "ssreg", "seed0.log")) as f:
        log = f.read()
    assert re.search(r"Resuming from \S*checkpoint-4", log), log[-3000:]
    assert os.stat(os.path.join(dit, "checkpoint-4")).st_ino == checkpoint  # kept, not made again
    assert os.path.isfile(os.path.join(dit, "README.md"))


# --------------------------------------------------------------------------------------------
# Dry runs: any arm or preset as config, GPUs, SLURM, bad configs
# --------------------------------------------------------------------------------------------


def test_any_flags_make_an_arm_and_the_dit_preset_is_config(photos, tmp_path):
    """An arm is a name and free-form finetune_vae.py flags; the DiT is whatever `dit` says: no code to change."""
    def edit(config):
        config["arms"] = {"eqvae": {"init": "base", "seeds": [3],
                                    "flags": {"regularizer": "eqvae", "eqvae_weight": 0.1, "ssreg_mean_centering": "false",
                                              "some_switch": True, "left_out": False}}}  # fmt: skip
        config["dit"]["preset"] = "LightningDiT-B/2"

    _, output = snakemake(tmp_path, "--cores", "1", "-n", "-p", config=write_config(tmp_path / "c.yaml", edit), photos=photos)
    finetune = next(line for line in output.splitlines() if "finetune_vae.py" in line and "arms/eqvae/seed3" in line)
    for expected in ("--regularizer eqvae", "--eqvae_weight 0.1", "--ssreg_mean_centering false", "--some_switch",
                     "--seed 3", "--pretrained_model_name_or_path"):  # fmt: skip
        assert expected in finetune, (expected, finetune)
    assert "--left_out" not in finetune
    # the fields every regularizer shares, written once as ssreg_* in the shared sections, follow the arm's method
    for flag in ("--eqvae_lambda_lpips", "--eqvae_freeze_encoder_blocks", "--eqvae_freeze_decoder_blocks"):
        assert flag in finetune, (flag, finetune)
    assert "--ssreg_lambda_lpips" not in finetune and "--ssreg_freeze_encoder_blocks" not in finetune
    dit = next(line for line in output.splitlines() if "train_dit.py" in line)
    assert "--preset LightningDiT-B/2" in dit and "--latents_dir study/arms/eqvae/seed3/cache" in dit


def test_gpu_jobs_take_one_gpu_unit_and_a_slot(photos, tmp_path):
    """The short config on GPUs: every GPU job declares gpu=1 and goes through job.py's slot picker."""
    _, output = snakemake(tmp_path, "--cores", "16", "--resources", "gpu=6", "-n", "-p",
                          config=os.path.join(CONFIGS, "short.yaml"), photos=photos)  # fmt: skip
    counts = job_counts(output)
    assert counts["finetune"] == 12 and counts["score"] == 24 and counts["dit"] == 12, counts
    gpu_rules = ("base", "eval_base", "finetune", "eval", "cache", "dit", "sample", "score")
    for block in output.split("rule ")[1:]:
        rule = block.split(":", 1)[0]
        if rule in gpu_rules:
            assert re.search(r"resources: .*\bgpu=1\b", block), block[:2000]
            assert "job.py --gpu --jobs_per_gpu 6 " in block, block[:2000]
        elif rule in ("data", "report", "figures", "vae_config", "study_config"):
            assert not re.search(r"\bgpu=1\b", block), block[:2000]


def test_the_same_workflow_dry_runs_on_slurm(photos, tmp_path):
    """`--profile profiles/slurm`: the SLURM executor plugin (the study extra) submits GPU jobs with gpu=1."""
    import importlib.util

    assert importlib.util.find_spec("snakemake_executor_plugin_slurm"), (
        "snakemake-executor-plugin-slurm is not installed: pip install -e '.[study]'"
    )
    _, output = snakemake(tmp_path, "--profile", os.path.join(STUDY, "profiles", "slurm"), "-n",
                          config=os.path.join(CONFIGS, "full.yaml"), photos=photos)  # fmt: skip
    assert job_counts(output)["finetune"] == 12
    finetune = output.split("rule finetune:", 1)[1].split("rule ", 1)[0]
    assert re.search(r"resources: .*slurm_partition=gpu.*\bgpu=1\b", finetune), finetune


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(photos=None), "config photos: not set"),
        (lambda c: c["arms"]["ssreg"].update(init="pretrained"),
         "config arms.ssreg.init: must be 'base' or 'scratch', got 'pretrained'"),
        (lambda c: c["arms"]["ssreg"].update(seeds=[-1]),
         "config arms.ssreg.seeds: must be a list of non-negative integers"),
        (lambda c: c["arms"]["ssreg"]["flags"].update(output_dir="x"),
         "config arms.ssreg.flags: output_dir: the workflow sets these itself"),
        (lambda c: c["dit"].update(seed=1), "config dit: seed: the workflow sets these itself"),
        (lambda c: c.update(device="tpu"), "config device: must be 'cuda' or 'cpu', got 'tpu'"),
        (lambda c: c.update(jobs_per_gpu=0), "config jobs_per_gpu: must be an integer of at least 1, got 0"),
    ],
)  # fmt: skip
def test_a_bad_config_is_refused_with_its_key(photos, tmp_path, edit, message):
    def apply(config):
        config["photos"] = photos
        edit(config)

    command_config = write_config(tmp_path / "bad.yaml", apply)
    code, output = snakemake(tmp_path, "--cores", "1", "-n", config=command_config, check=False)
    assert code != 0 and message in output, output[-3000:]


# --------------------------------------------------------------------------------------------
# job.py: GPU slots and resuming
# --------------------------------------------------------------------------------------------


def run_job(*args, env=None):
    return subprocess.run([sys.executable, JOB, *args], env=env, capture_output=True, text=True, timeout=60)


def test_job_takes_the_first_free_gpu_slot(tmp_path):
    import fcntl

    locks = str(tmp_path / "locks")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="3,5")
    show = [sys.executable, "-c", "import os; print('GPU=' + os.environ['CUDA_VISIBLE_DEVICES'])"]
    assert "GPU=3" in run_job("--gpu", "--jobs_per_gpu", "2", "--lock_dir", locks, "--", *show, env=env).stdout
    held = []
    for name in ("gpu3-slot0", "gpu5-slot0"):  # jobs running there: every GPU's first slot is filled first
        handle = open(os.path.join(locks, f"{name}.lock"), "a")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(handle)
        expected = "GPU=5" if name == "gpu3-slot0" else "GPU=3"
        assert expected in run_job("--gpu", "--jobs_per_gpu", "2", "--lock_dir", locks, "--", *show, env=env).stdout
    one = dict(os.environ, CUDA_VISIBLE_DEVICES="7")  # one GPU given (a cluster job): used as it is, no lock
    assert "GPU=7" in run_job("--gpu", "--jobs_per_gpu", "1", "--lock_dir", locks, "--", *show, env=one).stdout
    for handle in held:
        handle.close()


def test_job_keeps_a_checkpoint_only_for_the_same_command_and_inputs(tmp_path):
    run, source = tmp_path / "run", tmp_path / "vae.json"
    source.write_text("{}")
    command = [sys.executable, "-c", "print('trained')"]

    def job(*extra):
        result = run_job("--resume_dir", str(run), "--inputs", str(source), "--", *command, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout

    job()
    (run / "checkpoint-2").mkdir()
    assert "starting" not in job() and (run / "checkpoint-2").is_dir()  # a re-run after a crash: resumes
    assert "command or inputs changed" in job("--other") and not (run / "checkpoint-2").exists()  # other settings
    (run / "checkpoint-2").mkdir()
    job("--other")
    os.utime(source, ns=(0, 0))  # the model it starts from was made again
    assert "command or inputs changed" in job("--other") and not (run / "checkpoint-2").exists()
    result = run_job("--jobs_per_gpu", "0", "--", *command)
    assert result.returncode != 0 and "--jobs_per_gpu must be at least 1, got 0" in result.stderr
