"""examples/finetune_vae.py end to end, through real `accelerate launch` subprocesses (CPU, offline)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import finetune_vae  # noqa: E402

from conftest import accelerate_launch, save_unsupported_vae_config  # noqa: E402


TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)
FAST = ["--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3", "--num_validation_images", "2",
        "--ssreg_lambda_lpips", "0", "--ssreg_freeze_encoder_blocks", "1", "--ssreg_freeze_decoder_blocks", "1",
        "--ssreg_alpha", "0.5", "--report_to", "tensorboard", "--logging_steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny VAE config folder and a small folder of real photo crops (scikit-image), with one broken file."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("finetune")
    config_dir = root / "tiny_vae"
    AutoencoderKL(**TINY_VAE).save_config(config_dir)
    images = root / "images" / "nested"
    images.mkdir(parents=True)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for i in range(12):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
        Image.fromarray(photo[top : top + 96, left : left + 96]).save(images / f"photo_{i:02d}.png")
    (images / "corrupt.jpg").write_bytes(b"\x00garbage")
    return {"root": root, "config": str(config_dir), "images": str(root / "images")}


def launch(args, num_processes=1, check=True, background=False):
    return accelerate_launch("examples/finetune_vae.py", args, num_processes, check, background)


def base_args(workspace, output_dir, steps):
    return ["--model_config_name_or_path", workspace["config"], "--train_data_dir", workspace["images"],
            "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--seed", "3", *FAST]  # fmt: skip


# Each other method's own flags for a few-step run on the tiny VAE (its shared fields through its own prefix),
# with a non-default value that must reach its saved config: (extra flags, (field, value) to find saved).
METHOD_FLAGS = {
    "eqvae": (["--eqvae_low_resolution_probability", "1"], ("low_resolution_probability", 1.0)),
    "scale_equivariance": (["--se_lambda_se", "0.5"], ("lambda_se", 0.5)),
    "spectrum_matching": (["--sm_dsm_mask_levels", "0,8"], ("dsm_mask_levels", [0, 8])),
    "none": (["--plain_kl_weight", "1e-5"], ("kl_weight", 1e-5)),
}
# A term each method logs beside the loss (train_metrics.jsonl).
METHOD_TERMS = {"eqvae": "eq_mae", "scale_equivariance": "se_mae", "spectrum_matching": "esm", "none": "rec_mae"}


def method_args(workspace, output_dir, steps, regularizer):
    """`base_args` for `--regularizer <regularizer>`: the shared fields through that method's own flags."""
    from diffusers_ssreg import REGULARIZERS

    prefix = REGULARIZERS[regularizer].flag_prefix
    return ["--model_config_name_or_path", workspace["config"], "--train_data_dir", workspace["images"],
            "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--seed", "3", "--resolution", "32",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--num_validation_images", "1", "--report_to", "none",
            "--logging_steps", "1", "--regularizer", regularizer, f"--{prefix}lambda_lpips", "0",
            f"--{prefix}freeze_encoder_blocks", "1", f"--{prefix}freeze_decoder_blocks", "1",
            *METHOD_FLAGS[regularizer][0]]  # fmt: skip


def vae_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def read_metrics(output):
    return [json.loads(line) for line in (output / "logs" / "train_metrics.jsonl").read_text().splitlines()]


def test_train_checkpoint_resume_and_export(workspace, tmp_path):
    output = tmp_path / "run"
    result = launch(base_args(workspace, output, 4) + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "2"])
    log = result.stdout + result.stderr
    assert "used 12 images, skipped 1: 1 unreadable [UnidentifiedImageError: 1] (e.g." in log and "corrupt.jpg" in log
    assert sorted(p for p in os.listdir(output) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    for sub in ("vae", "ssreg"):
        assert os.path.isdir(output / "checkpoint-4" / sub)
    assert not (output / "checkpoint-4" / "model.safetensors").exists()  # save_pretrained folders instead
    # the exported VAE is the VAE alone, with a card, the regularizer apart
    config = json.loads((output / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and not any("ssreg" in k or "tau" in k for k in config)
    card = (output / "README.md").read_text()
    assert "library_name: diffusers" in card and "ssreg" in card and "| `alpha` | `0.5` |" in card
    assert (output / "ssreg" / "ssreg_config.json").is_file()
    assert any(name.startswith("reconstruction-") for name in os.listdir(output / "validation"))
    assert any(name.startswith("blur-dynamics-") for name in os.listdir(output / "validation"))
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(output / "logs") for name in files)

    # resume from latest: continues at step 4 up to 6 (the schedule length stays the run's own)
    resumed = launch(base_args(workspace, output, 6) + ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in resumed.stdout + resumed.stderr and "checkpoint-4" in resumed.stdout + resumed.stderr
    assert json.loads((output / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6
    metrics = read_metrics(output)
    assert [m["step"] for m in metrics] == [2, 4, 6] and all(m["loss"] > 0 for m in metrics)

    # resuming a finished run trains no extra step
    before = vae_weights(output)
    launch(base_args(workspace, output, 6) + ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"])
    assert max_difference(before, vae_weights(output)) == 0.0
    assert not (output / "checkpoint-7").exists()

    # stock diffusers loads the export in a process that never imports diffusers_ssreg
    probe = (
        "import sys, torch; from diffusers import AutoencoderKL;"
        f"vae = AutoencoderKL.from_pretrained({str(output)!r});"
        "x = torch.zeros(1, 3, 32, 32); print(vae.decode(vae.encode(x).latent_dist.mode()).sample.shape);"
        "assert 'diffusers_ssreg' not in sys.modules"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 3, 32, 32])" in out.stdout


def test_every_regularizer_trains_checkpoints_and_exports_a_stock_vae(workspace, tmp_path):
    """
    `--regularizer X` for the four other methods, two steps each (a checkpoint after each, validation at step 1
    and at the end): a stock AutoencoderKL folder, the method's config in its own subfolder and on the card. EQ-VAE
    is then resumed from its step-1 checkpoint (the load hook of a stateless method) to bit-identical weights.
    """
    from diffusers_ssreg import REGULARIZERS, load_regularizer

    outputs = {}
    for name in METHOD_FLAGS:
        spec, output = REGULARIZERS[name], tmp_path / name
        launch(method_args(workspace, output, 2, name) + ["--checkpointing_steps", "1"])
        outputs[name] = output
        config = json.loads((output / "config.json").read_text())
        assert config["_class_name"] == "AutoencoderKL" and not any(name in k for k in config), name
        assert [p for p in os.listdir(output) if p in {s.subfolder for s in REGULARIZERS.values()}] == [spec.subfolder]
        saved = json.loads((output / spec.subfolder / spec.config_class.config_name).read_text())
        field, value = METHOD_FLAGS[name][1]
        assert saved["_regularizer"] == name and saved[field] == value and saved["freeze_encoder_blocks"] == 1, saved
        for step in (1, 2):
            assert sorted(os.listdir(output / f"checkpoint-{step}" / spec.subfolder)) == [spec.config_class.config_name]
            assert (output / f"checkpoint-{step}" / "vae" / "config.json").is_file()
        card = (output / "README.md").read_text()
        assert f"(`--regularizer {name}`)" in card and f"(`{spec.config_class.__name__}`)" in card, name
        assert f"| `{field}` | `{value}` |" in card and "state-space parameters" not in card, name
        metrics = read_metrics(output)
        assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics), name
        assert METHOD_TERMS[name] in metrics[0], (name, metrics[0])
        assert sorted(p for p in os.listdir(output / "validation") if p.startswith("metrics-")) == [
            "metrics-000001.json", "metrics-000002.json"
        ]  # fmt: skip
        vae = AutoencoderKL.from_pretrained(output)
        regularizer = load_regularizer(str(output), vae, subfolder=spec.subfolder)
        assert isinstance(regularizer, spec.regularizer_class) and regularizer.config.to_dict()[field] == saved[field]

    # the load hook of a stateless method: resumed at step 1, the run ends on the very same weights
    before = vae_weights(outputs["eqvae"])
    result = launch(method_args(workspace, outputs["eqvae"], 2, "eqvae") + ["--resume_from_checkpoint", "checkpoint-1"])
    assert "Resuming from" in result.stdout + result.stderr
    assert max_difference(before, vae_weights(outputs["eqvae"])) < 1e-6

    # stock diffusers loads every export in a process that never imports diffusers_ssreg
    probe = (
        "import sys, torch; from diffusers import AutoencoderKL\n"
        f"for folder in {[str(p) for p in outputs.values()]!r}:\n"
        "    vae = AutoencoderKL.from_pretrained(folder); x = torch.zeros(1, 3, 32, 32)\n"
        "    print(vae.decode(vae.encode(x).latent_dist.mode()).sample.shape)\n"
        "assert 'diffusers_ssreg' not in sys.modules"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("torch.Size([1, 3, 32, 32])") == len(outputs)


def test_bad_regularizer_flags_fail_naming_the_flag(workspace, tmp_path, capsys):
    """Bad values of the generated flags, another method's flag, an unknown method, a checkpoint of another method."""
    for name, extra, match in (
        ("eqvae", ["--eqvae_scales", "0,2"], r"invalid --eqvae_\* flag --eqvae_scales: `scales` must be .*\(0, 1\]"),
        ("scale_equivariance", ["--se_probability", "2"], r"--se_probability: `probability` must be <= 1"),
        ("spectrum_matching", ["--sm_pre_blur", "sometimes"], r"--sm_pre_blur: `pre_blur` must be one of"),
        ("none", ["--ssreg_alpha", "0"], r"--ssreg_alpha is for --regularizer ssreg, but --regularizer is none"),
    ):
        with pytest.raises(ValueError, match=match):
            finetune_vae.parse_args(method_args(workspace, tmp_path / "bad", 2, name) + extra)
    with pytest.raises(SystemExit):
        finetune_vae.parse_args(["--regularizer", "vqgan"])
    assert "--regularizer: invalid choice: 'vqgan'" in capsys.readouterr().err
    (tmp_path / "bad" / "checkpoint-4" / "ssreg").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"saved with --regularizer ssreg, but this run has --regularizer eqvae"):
        finetune_vae.parse_args(method_args(workspace, tmp_path / "bad", 8, "eqvae") + ["--resume_from_checkpoint", "latest"])
    # LPIPS could not measure the smallest images a method compares: refused before training
    args = finetune_vae.parse_args(
        method_args(workspace, tmp_path / "small", 2, "scale_equivariance")
        + ["--se_lambda_lpips", "0.1", "--se_lpips_net", "alex", "--se_lpips_pretrained_backbone", "false"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"LPIPS \('alex'\) needs images of at least 31x31.*8x8.*--resolution 32"):
        finetune_vae.main(args)
    assert not (tmp_path / "small").exists() or not any(p.startswith("checkpoint") for p in os.listdir(tmp_path / "small"))


def test_interrupted_run_with_gradient_accumulation_resumes_at_the_right_batch(workspace, tmp_path):
    # 10 training images in micro-batches of 2: 5 per epoch, so with 2 per update an epoch is 3 updates (2 + 2 + 1);
    # checkpoint-5 lies mid-epoch (epoch 1, after 4 micro-batches). Resumed there, the run must see the very same
    # batches as an uninterrupted one: bit-identical weights.
    steps = ["--checkpointing_steps", "5", "--gradient_accumulation_steps", "2", "--validation_steps", "4"]
    straight = tmp_path / "straight"
    launch(base_args(workspace, straight, 12) + steps)
    state = json.loads((straight / "checkpoint-5" / "training_state.json").read_text())
    assert (state["epoch"], state["epoch_samples"], state["samples_seen"]) == (1, 8, 18)

    # Ctrl-C (SIGINT to the whole process group) once the first checkpoint is complete.
    interrupted = tmp_path / "interrupted"
    process = launch(base_args(workspace, interrupted, 12) + steps, background=True)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-5").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, "the run finished before it could be interrupted:\n" + output[-2000:]
    assert not (interrupted / "diffusion_pytorch_model.safetensors").exists()
    assert not any(p.endswith(".tmp") for p in os.listdir(interrupted) if p.startswith("checkpoint-12"))

    launch(base_args(workspace, interrupted, 12) + steps + ["--resume_from_checkpoint", "checkpoint-5"])
    assert max_difference(vae_weights(straight), vae_weights(interrupted)) < 1e-6
    a = load_file(straight / "ssreg" / "ssreg_state.safetensors")
    b = load_file(interrupted / "ssreg" / "ssreg_state.safetensors")
    assert max_difference(a, b) < 1e-6
    assert [m["step"] for m in read_metrics(interrupted)] == [2, 4, 6, 8, 10, 12]  # each step once
    assert [m["lr"] for m in read_metrics(interrupted)] == [m["lr"] for m in read_metrics(straight)]


def test_resume_on_another_process_count_keeps_the_schedule_and_the_data_position(workspace, tmp_path):
    # The same total batch of 4 either way: 2 processes x 2 or 1 process x 4. Uninterrupted runs on 2 and on 1
    # process, each resumed from its step-3 checkpoint on the other count; every step logs its learning rate.
    every_step = ["--logging_steps", "1", "--checkpointing_steps", "3", "--validation_steps", "100"]
    two = base_args(workspace, tmp_path / "two", 6) + every_step + ["--random_resized_crop_scale", "0.3", "1"]
    result = launch(two, num_processes=2)
    log = result.stdout + result.stderr
    assert "MULTI_CPU" in log and "Num processes: 2" in log
    checksums = json.loads((tmp_path / "two" / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert (tmp_path / "two" / "checkpoint-3" / "random_states_1.pkl").is_file()  # written by rank 1
    one = base_args(workspace, tmp_path / "one", 6) + every_step + ["--train_batch_size", "4"]
    launch(one)
    uninterrupted = {name: read_metrics(tmp_path / name) for name in ("two", "one")}
    states = {name: json.loads((tmp_path / name / "checkpoint-6" / "training_state.json").read_text()) for name in uninterrupted}
    lr = [m["lr"] for m in uninterrupted["two"]]
    assert [m["step"] for m in uninterrupted["two"]] == [1, 2, 3, 4, 5, 6]
    assert lr == [m["lr"] for m in uninterrupted["one"]] and len(set(lr[2:])) == 4  # the cosine decay is on

    resume = ["--resume_from_checkpoint", "checkpoint-3"]
    result = launch(two + ["--train_batch_size", "4"] + resume)  # 2 -> 1 process
    assert "saved by 2 process(es)" in result.stdout + result.stderr
    launch(one + ["--train_batch_size", "2"] + resume, num_processes=2)  # 1 -> 2 processes
    for name in ("two", "one"):
        resumed = read_metrics(tmp_path / name)
        assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # each step once after the resume
        assert [m["lr"] for m in resumed] == lr, name
        state = json.loads((tmp_path / name / "checkpoint-6" / "training_state.json").read_text())
        position = ("epoch", "epoch_samples", "samples_seen")
        assert [state[k] for k in position] == [states[name][k] for k in position] == [2, 8, 24]
        AutoencoderKL.from_pretrained(tmp_path / name)


def test_deterministic_runs_give_the_same_weights_and_another_seed_does_not(workspace, tmp_path):
    # DataLoader workers draw the augmentation; --deterministic turns on torch's deterministic kernels (on a GPU
    # the part that matters; on the CPU it shows the seeding alone reproduces the run, workers included).
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        args = base_args(workspace, tmp_path / name, 3) + ["--deterministic", "--dataloader_num_workers", "2"]
        args[args.index("--seed") + 1] = seed
        result = launch(args)
        assert "Deterministic kernels only (CUBLAS_WORKSPACE_CONFIG=:4096:8)" in result.stdout + result.stderr
        runs[name] = vae_weights(tmp_path / name)
    assert max_difference(runs["a"], runs["b"]) == 0.0
    assert max_difference(runs["a"], runs["c"]) > 0.0


def test_push_to_hub_creates_the_repo_before_training_and_uploads_after(workspace, tmp_path, monkeypatch):
    import huggingface_hub

    import diffusers_ssreg.hub as hub

    calls = []
    output = tmp_path / "push"

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def fake_create_repo(repo_id, **kwargs):
        checkpoints = [p for p in os.listdir(output) if p.startswith("checkpoint")] if output.exists() else []
        calls.append(("create_repo", repo_id, kwargs, checkpoints))
        return Repo(repo_id)

    def fake_upload_folder(**kwargs):
        uploaded = sorted(
            os.path.relpath(os.path.join(d, f), kwargs["folder_path"]) for d, _, fs in os.walk(kwargs["folder_path"]) for f in fs
        )
        calls.append(("upload_folder", kwargs, uploaded))

    monkeypatch.setattr(hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub, "upload_folder", fake_upload_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the Hub calls are faked
    args = finetune_vae.parse_args(
        base_args(workspace, output, 2) + ["--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id",
                                           "someone/tiny-ssreg", "--report_to", "none"]
    )  # fmt: skip
    finetune_vae.main(args)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "someone/tiny-ssreg" and calls[0][2]["exist_ok"] is True
    assert calls[0][3] == []  # created before the first checkpoint: before any training
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/tiny-ssreg" and upload["folder_path"] == str(output)
    assert any(p.startswith("checkpoint-") for p in upload["ignore_patterns"])
    card = (output / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # trained from a local config: no Hub base model
    assert "someone/tiny-ssreg" in card and "diffusers-ssreg" in card

    # An unreachable Hub or a missing token fails before training, and says how to push later.
    def unreachable(repo_id, **kwargs):
        raise ConnectionError("Hub unreachable")

    monkeypatch.setattr(hub, "create_repo", unreachable)
    fresh = tmp_path / "unreachable"
    args = finetune_vae.parse_args(base_args(workspace, fresh, 2) + ["--push_to_hub", "--report_to", "none"])
    with pytest.raises(RuntimeError, match=r"could not create or reach the Hub repository 'unreachable'.*hf upload unreachable"):
        finetune_vae.main(args)
    assert not any(p.startswith("checkpoint") for p in os.listdir(fresh)) if fresh.exists() else True

    # An upload that fails after training says the model is saved and how to push it.
    def failing_upload(**kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub, "upload_folder", failing_upload)
    late = tmp_path / "late"
    args = finetune_vae.parse_args(base_args(workspace, late, 1) + ["--push_to_hub", "--hub_model_id", "someone/x",
                                                                     "--report_to", "none"])  # fmt: skip
    with pytest.raises(RuntimeError, match=r"The model is saved in .*late.*hf upload someone/x"):
        finetune_vae.main(args)
    AutoencoderKL.from_pretrained(late)


def test_checks_before_any_work(workspace, tmp_path, monkeypatch):
    """Offline push, a missing checkpoint, a validation folder without a readable image: errors before a model is built."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"--push_to_hub needs the Hugging Face Hub, but offline mode is on.*hf upload"):
        finetune_vae.parse_args(base_args(workspace, tmp_path / "o", 2) + ["--push_to_hub"])
    with pytest.raises(ValueError, match=r"`resume_from_checkpoint`='/nonexistent/checkpoint-3' is not 'latest' or an existing"):
        finetune_vae.parse_args(base_args(workspace, tmp_path / "o", 2) + ["--resume_from_checkpoint", "/nonexistent/checkpoint-3"])

    unreadable = tmp_path / "validation"
    unreadable.mkdir()
    whole = open(os.path.join(workspace["images"], "nested", "photo_00.png"), "rb").read()
    for i in range(2):  # headers intact, pixels cut off: found by the scan, unreadable when decoded
        (unreadable / f"cut_{i}.png").write_bytes(whole[: len(whole) // 3])
    args = finetune_vae.parse_args(base_args(workspace, tmp_path / "v", 2) + ["--validation_data_dir", str(unreadable)])
    with pytest.raises(ValueError, match=r"--validation_data_dir holds no readable image \(--validation_data_dir '.*validation'\)"):
        finetune_vae.build_datasets(args)
    (unreadable / "notes.txt").write_text("x")
    for name in os.listdir(unreadable):
        if name.endswith(".png"):
            (unreadable / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"--validation_data_dir '.*validation' holds no images.*2 unreadable"):
        finetune_vae.build_datasets(args)


def test_another_vae_class_is_refused_by_name(workspace, tmp_path):
    cosmos = save_unsupported_vae_config(tmp_path / "cosmos")
    for flag in ("--pretrained_model_name_or_path", "--model_config_name_or_path"):
        args = base_args(workspace, tmp_path / "o", 2)[2:] + [flag, cosmos]
        supported = "supported VAE classes: AutoencoderKL, AutoencoderKLFlux2"
        with pytest.raises(ValueError, match=rf"{flag} '.*cosmos' holds a model of class AutoencoderKLCosmos; {supported}"):
            finetune_vae.main(finetune_vae.parse_args(args))


def test_help_shows_real_defaults_and_renamed_flags_still_work(capsys):
    with pytest.raises(SystemExit):
        finetune_vae.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text.split("options:", 1)[1]
    assert "default: None" not in text
    for flag, shown in (("--train_batch_size", "(default: 32; the offline demo: 8)"),
                        ("--learning_rate", "(default: 1e-05; the offline demo: 0.001)"),
                        ("--resolution", "(default: 256; the offline demo: 64)"), ("--seed", "(default: 0)")):  # fmt: skip
        assert shown in options.split(f"{flag} {flag[2:].upper()}", 1)[1].split(" --", 1)[0], flag
    assert "The demo changes these defaults: --resolution 64, --train_batch_size 8" in text
    assert "--subfolder" not in text and "--use_torch_compile" not in text  # hidden aliases
    with pytest.warns(FutureWarning) as warned:
        args = finetune_vae.parse_args(["--subfolder", "vae", "--use_torch_compile"])
    assert args.vae_subfolder == "vae" and args.compile is True
    assert sorted(str(w.message).split(";")[0] for w in warned) == [
        "--subfolder is now called --vae_subfolder", "--use_torch_compile is now called --compile"
    ]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--pretrained_model_name_or_path", "/does/not/exist"], "could not load an AutoencoderKL"),
        (["--resolution", "33"], "not divisible by the VAE's downsampling factor 2"),
        (["--ssreg_grid", "3x3"], "grid"),
        (["--ssreg_basis", "wavelet"], "basis"),
        (["--ssreg_alpha", "2"], "alpha"),
        (["--train_batch_size", "0"], "train_batch_size"),
        (["--dataset_name", "x"], "either --dataset_name or --train_data_dir"),
        (["--random_resized_crop_scale", "0.5", "0.2"], "random_resized_crop_scale"),
        (["--deterministic", "--compile"], "--deterministic with --compile"),
    ],
)
def test_bad_input_fails_before_training(workspace, tmp_path, extra, match):
    args = base_args(workspace, tmp_path / "bad", 2)
    if extra[0] == "--pretrained_model_name_or_path":
        args = args[2:]  # drop --model_config_name_or_path
    with pytest.raises((ValueError, TypeError), match=match):
        finetune_vae.main(finetune_vae.parse_args(args + extra))
    assert not any(p.startswith("checkpoint") for p in os.listdir(tmp_path / "bad")) if (tmp_path / "bad").exists() else True


def test_bad_data_and_models(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    args = base_args(workspace, tmp_path / "o", 2)
    args[args.index("--train_data_dir") + 1] = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        finetune_vae.main(finetune_vae.parse_args(args))
    # a folder holding another diffusers model is not an AutoencoderKL
    from diffusers import UNet2DModel

    UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2, layers_per_block=1).save_pretrained(tmp_path / "unet")  # fmt: skip
    args = base_args(workspace, tmp_path / "o", 2)[2:] + ["--pretrained_model_name_or_path", str(tmp_path / "unet")]
    with pytest.raises(ValueError, match="AutoencoderKL"):
        finetune_vae.main(finetune_vae.parse_args(args))


def test_nan_steps_are_skipped_then_stop_the_run(workspace, tmp_path, monkeypatch):
    import diffusers_ssreg.regularizer as regularizer_module

    real_l1, calls = regularizer_module.per_sample_l1, {"n": 0}

    def poisoned_l1(prediction, target):  # steps 1-2 are healthy, every later loss is NaN
        calls["n"] += 1
        value = real_l1(prediction, target)
        return value * float("nan") if calls["n"] > 2 else value

    monkeypatch.setattr(regularizer_module, "per_sample_l1", poisoned_l1)
    output = tmp_path / "nan"
    args = finetune_vae.parse_args(
        base_args(workspace, output, 10) + ["--checkpointing_steps", "2", "--max_nonfinite_steps", "2",
                                            "--report_to", "none", "--validation_steps", "100"]
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="2 non-finite steps in a row"):
        finetune_vae.main(args)
    assert not (output / "diffusion_pytorch_model.safetensors").exists()  # no export of a broken run
    weights = load_file(output / "checkpoint-2" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
