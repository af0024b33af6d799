"""The `ssreg-eval` command line on two tiny random VAEs and a folder of photo crops (CPU, offline)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_flux2_vae, save_unsupported_vae_config
from diffusers_ssreg.evaluation import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE
from diffusers_ssreg.evaluation.cli import main, parse_args, run


torch.set_num_threads(1)
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """
    Three tiny random AutoencoderKL folders (one saved as a pipeline's vae/ subfolder; two with the regularizer folder
    examples/finetune_vae.py saves beside the weights: SSReg with alpha 0, EQ-VAE) and 4 photo crops.
    """
    from diffusers import AutoencoderKL
    from skimage import data

    from diffusers_ssreg import EQVAEConfig, SSRegConfig

    root = tmp_path_factory.mktemp("ssreg_eval")
    images = root / "images"
    images.mkdir()
    for i, photo in enumerate((data.astronaut(), data.chelsea(), data.coffee(), data.rocket())):
        Image.fromarray(photo).resize((96, 80)).save(images / f"{i}.png")
    folders = []
    for seed, folder in ((0, root / "vae_a"), (1, root / "pipeline_b" / "vae"), (2, root / "vae_c")):
        torch.manual_seed(seed)
        AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        ).save_pretrained(str(folder))
        folders.append(folder)
    SSRegConfig(alpha=0.0).save_pretrained(str(root / "vae_a" / "ssreg"))
    EQVAEConfig(scales=(0.5,)).save_pretrained(str(root / "vae_c" / "eqvae"))
    return {"root": root, "images": str(images), "vae_a": str(root / "vae_a"), "pipeline_b": str(root / "pipeline_b"),
            "vae_c": str(root / "vae_c")}  # fmt: skip


def test_compare_three_vaes_writes_a_report_with_figures(workspace, tmp_path):
    out = tmp_path / "report"
    result = run([
        "compare", "--vae", workspace["vae_a"], "--vae", workspace["pipeline_b"], "--vae", workspace["vae_c"],
        "--vae_name", "plain", "--vae_name", "other", "--vae_name", "equivariant",
        "--data_dir", workspace["images"], "--resolution", "64", "--feature_extractor",
        "effnet-lite0", "--lpips_net", "none", "--num_images", "2", "--num_unmask_images", "2", "--num_blur_steps", "6",
        "--output_dir", str(out), "--no_progress", "--device", "cpu",
    ])
    report = (out / "report.md").read_text()
    assert "| model | regularizer | images | PSNR ↑ |" in report  # the method each VAE was fine-tuned with, first
    for needle in ("| plain | ssreg (alpha 0) | 4 |", "| other | – | 4 |", "| equivariant | eqvae | 4 |",
                   "Fourier (reference)", "rFID-EffNetLite0", "coherence", "project-internal",
                   "blur_dynamics.png", "unmasking.png", "latent_spectrum.png", "latent_statistics.png"):
        assert needle in report
    for png in ("blur_dynamics.png", "unmasking.png", "unmasking_psnr.png", "latent_spectrum.png", "latent_statistics.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["other"]["vae"]["subfolder"] == "vae"  # pipeline folder detected
    assert saved["models"]["equivariant"]["vae"]["regularizer"]["config"]["scales"] == [0.5]
    assert saved["models"]["other"]["vae"]["regularizer"] is None
    for name in ("plain", "other", "equivariant"):
        model = saved["models"][name]
        assert set(model["reconstruction"]["metrics"]) == {"PSNR", "SSIM", "rFID-EffNetLite0"}
        assert set(model["latent"]) == {"blur_dynamics", "unmasking", "spectrum", "statistics"}
        assert 0 < model["latent"]["blur_dynamics"]["coherence"] < 0.99
    assert saved["fourier_reference"]["blur_dynamics"]["coherence"] > 0.999
    assert result["report"] == str(out / "report.md")


def test_reconstruction_and_latent_subcommands(workspace, tmp_path):
    run(["reconstruction", "--vae", workspace["vae_a"], "--data_dir", workspace["images"], "--resolution", "32",
          "--feature_extractor", "none", "--lpips_net", "none", "--output_dir", str(tmp_path / "rec"), "--no_progress"])
    saved = json.loads((tmp_path / "rec" / "reconstruction.json").read_text())
    assert set(saved["models"]["vae_a"]["reconstruction"]["metrics"]) == {"PSNR", "SSIM"}
    run(["latent", "--vae", workspace["vae_a"], "--data_dir", workspace["images"], "--resolution", "32",
          "--analyses", "spectrum,statistics", "--output_dir", str(tmp_path / "lat"), "--no_progress"])
    saved = json.loads((tmp_path / "lat" / "latent.json").read_text())
    assert set(saved["models"]["vae_a"]["latent"]) == {"spectrum", "statistics"}
    assert sorted(os.listdir(tmp_path / "lat")) == ["latent.json", "latent_spectrum.png", "latent_statistics.png", "report.md"]


def test_dataset_name_source(workspace, tmp_path):
    run(["reconstruction", "--vae", workspace["vae_a"], "--dataset_name", workspace["images"], "--dataset_split", "train",
          "--cache_dir", str(tmp_path / "hf"), "--resolution", "32", "--max_samples", "3", "--feature_extractor", "none",
          "--lpips_net", "none", "--output_dir", str(tmp_path / "out"), "--no_progress"])
    saved = json.loads((tmp_path / "out" / "reconstruction.json").read_text())
    assert saved["models"]["vae_a"]["reconstruction"]["num_images"] == 3


def test_generation_subcommand(workspace, tmp_path):
    images = np.stack([np.asarray(Image.open(os.path.join(workspace["images"], f"{i}.png"))) for i in range(4)])
    np.savez(tmp_path / "samples.npz", arr_0=np.concatenate([images, images[:, :, ::-1]]))
    result = run(["generation", "--samples", str(tmp_path / "samples.npz"), "--reference", workspace["images"],
                   "--feature_extractor", "effnet-lite0", "--resolution", "64", "--output_dir", str(tmp_path / "gen"),
                   "--no_progress"])
    metrics = json.loads((tmp_path / "gen" / "generation.json").read_text())["metrics"]
    assert set(metrics) == {"FID-EffNetLite0", "sFID-EffNetLite0", "IS-EffNetLite0", "IS-EffNetLite0_std",
                            "precision-EffNetLite0", "recall-EffNetLite0"}
    assert result["num_samples"] == 8 and result["num_reference"] == 4
    assert "FID-EffNetLite0" in (tmp_path / "gen" / "report.md").read_text()
    # --reference_cache: written by the first run, read by the next, same scores
    cached = []
    for name in ("gen_cache_1", "gen_cache_2"):
        cached.append(run(["generation", "--samples", str(tmp_path / "samples.npz"), "--reference", workspace["images"],
                           "--feature_extractor", "effnet-lite0", "--resolution", "64", "--output_dir", str(tmp_path / name),
                           "--reference_cache", str(tmp_path / "reference.safetensors"), "--no_progress"]))
    assert [c["settings"]["reference_cache"]["state"] for c in cached] == ["written", "read"]
    assert cached[0]["metrics"] == cached[1]["metrics"] == result["metrics"]


def test_missing_inception_weights_through_the_cli(workspace, tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(RuntimeError, match=INCEPTION_WEIGHTS_FILE):
            run(["reconstruction", "--vae", workspace["vae_a"], "--data_dir", workspace["images"], "--lpips_net", "none",
                  "--no_download", "--output_dir", str(tmp_path / "out"), "--no_progress"])
    finally:
        torch.hub.set_dir(previous)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--vae", "a", "--output_dir", "o"], "exactly one of --data_dir and --dataset_name"),
        (["compare", "--vae", "a", "--data_dir", "d", "--dataset_name", "n", "--output_dir", "o"], "exactly one"),
        (["latent", "--vae", "a", "--vae", "b", "--vae_name", "x", "--data_dir", "d", "--output_dir", "o"], "--vae_name"),
        (["latent", "--vae", "a", "--data_dir", "d", "--analyses", "blur,fft", "--output_dir", "o"], "--analyses"),
        (["latent", "--vae", "a", "--data_dir", "d", "--num_images", "0", "--output_dir", "o"], "--num_images"),
        (["generation", "--samples", "s", "--reference", "r", "--feature_extractor", "none", "--output_dir", "o"], "nothing"),
    ],
)
def test_bad_arguments_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_bad_vae_path_is_a_clear_error(workspace, tmp_path):
    with pytest.raises(ValueError, match="could not load an AutoencoderKL"):
        run(["latent", "--vae", str(tmp_path / "nope"), "--data_dir", workspace["images"], "--analyses", "statistics",
              "--output_dir", str(tmp_path / "out"), "--no_progress"])


def test_offline_lpips_hint_names_the_cli_flag(workspace, tmp_path, monkeypatch):
    lpips = pytest.importorskip("lpips")

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(RuntimeError, match="or pass --lpips_net none to skip LPIPS") as error:
        run(["reconstruction", "--vae", workspace["vae_a"], "--data_dir", workspace["images"], "--feature_extractor", "none",
             "--output_dir", str(tmp_path / "out"), "--no_progress"])
    assert "ssreg_lambda_lpips" not in str(error.value)  # the training flag means nothing to ssreg-eval


def test_flux2_vae_is_evaluated(workspace, tmp_path):
    vae = make_tiny_flux2_vae(latent_channels=4)
    vae.save_pretrained(tmp_path / "flux2")
    run(["reconstruction", "--vae", str(tmp_path / "flux2"), "--data_dir", workspace["images"], "--resolution", "32",
         "--feature_extractor", "none", "--lpips_net", "none", "--output_dir", str(tmp_path / "rec"), "--no_progress"])
    saved = json.loads((tmp_path / "rec" / "reconstruction.json").read_text())
    assert saved["models"]["flux2"]["reconstruction"]["num_images"] == 4
    run(["latent", "--vae", str(tmp_path / "flux2"), "--data_dir", workspace["images"], "--resolution", "32",
         "--analyses", "statistics", "--output_dir", str(tmp_path / "lat"), "--no_progress"])
    statistics = json.loads((tmp_path / "lat" / "latent.json").read_text())["models"]["flux2"]["latent"]["statistics"]
    assert len(statistics["mean"]) == 4 and statistics["configured_scaling_factor"] is None  # the raw 4-channel latents


def test_another_vae_class_and_the_renamed_subfolder_flag(workspace, tmp_path):
    cosmos = save_unsupported_vae_config(tmp_path / "cosmos")
    with pytest.raises(ValueError, match="--vae '.*cosmos' holds a model of class AutoencoderKLCosmos; supported VAE "
                                         "classes: AutoencoderKL, AutoencoderKLFlux2"):  # fmt: skip
        run(["latent", "--vae", cosmos, "--data_dir", workspace["images"], "--analyses", "statistics",
             "--output_dir", str(tmp_path / "out"), "--no_progress"])
    with pytest.warns(FutureWarning, match="--subfolder is now called --vae_subfolder"):
        args = parse_args(["latent", "--vae", "a", "--vae", "b", "--subfolder", "vae", "--subfolder", "", "--data_dir", "d",
                           "--output_dir", "o"])  # fmt: skip
    assert args.vae_subfolder == ["vae", ""]


def test_main_returns_an_exit_status(workspace, tmp_path, capsys):
    assert main(["latent", "--vae", workspace["vae_a"], "--data_dir", workspace["images"], "--analyses", "bogus",
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "ssreg-eval: error: --analyses" in capsys.readouterr().err
    assert main(["latent", "--vae", workspace["vae_a"], "--data_dir", workspace["images"], "--resolution", "32",
                 "--analyses", "statistics", "--output_dir", str(tmp_path / "out"), "--no_progress"]) == 0


def test_console_entry_point_reports_errors_without_traceback(workspace, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ssreg-eval")  # installed by `pip install -e .`
    command = [script] if os.path.isfile(script) else [sys.executable, "-m", "diffusers_ssreg.evaluation.cli"]
    process = subprocess.run(
        command + ["latent", "--vae", workspace["vae_a"], "--data_dir", str(tmp_path / "missing"), "--output_dir",
                   str(tmp_path / "out")],
        capture_output=True, text=True, env=OFFLINE_ENV, timeout=120,
    )
    assert process.returncode == 2
    assert "ssreg-eval: error:" in process.stderr and "does not exist" in process.stderr
    assert "Traceback" not in process.stderr


def test_core_import_stays_light():
    code = ("import sys, diffusers_ssreg, diffusers_ssreg.evaluation; "
            "print([m for m in ('matplotlib', 'torchmetrics', 'torch_fidelity', 'lpips', 'efficientnet_lite_pytorch') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
