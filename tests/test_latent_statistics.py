"""Latent statistics after a fine-tune (`diffusers_ssreg.latent_statistics`, `finetune_vae.py --recompute_latent_statistics`).

The estimated moments are checked against numpy on the very same images (one process, two simulated
shards, and two real CPU processes through `accelerate launch`); each diffusers convention's written
values give normalized latents of the intended scale; the FLUX.2 BatchNorm statistics survive a save and
stock reload and follow `Flux2Pipeline`'s patch order.
"""

import ast
import contextlib
import json
import os

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from test_finetune_script import FAST, TINY_VAE, finetune_vae, launch, workspace  # noqa: F401 (a fixture)

from conftest import make_tiny_flux2_vae, make_tiny_vae, photo_crops
from diffusers_ssreg.latent_statistics import (
    LatentStatistics,
    apply_latent_statistics,
    describe_normalization,
    estimate_latent_statistics,
    latent_normalization,
    patchify_latents,
)


SEED = 5


def photo_dataset(count=6, size=32):
    return [{"pixel_values": image} for image in photo_crops(count, size)]


def chosen_images(dataset, num_images, seed=SEED):
    """The images the estimate must use: a seeded uniform draw without replacement, written out here."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    return torch.stack([dataset[int(i)]["pixel_values"] for i in order])


def posterior_means(vae, pixels):
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mode().double().numpy()


def patchify_by_hand(z, p=2, q=2):
    """Channel c*p*q + i*q + j at (y, x) = z[c, p*y + i, q*x + j], written with loops."""
    n, c, h, w = z.shape
    out = np.zeros((n, c * p * q, h // p, w // q))
    for channel in range(c):
        for i in range(p):
            for j in range(q):
                out[:, channel * p * q + i * q + j] = z[:, channel, i::p, j::q]
    return out


# --------------------------------------------------------------------------------------------
# The FLUX.2 patch order
# --------------------------------------------------------------------------------------------


def _pipeline_function(name):
    """A static method of diffusers' Flux2Pipeline, compiled from its source (the module needs transformers)."""
    path = os.path.join(os.path.dirname(diffusers.__file__), "pipelines", "flux2", "pipeline_flux2.py")
    if not os.path.isfile(path):
        pytest.skip("this diffusers has no FLUX.2 pipeline source to compare with")
    tree = ast.parse(open(path).read())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def test_patchify_follows_the_flux2_pipeline():
    z = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    ours = patchify_latents(z, (2, 2))
    np.testing.assert_array_equal(ours.numpy(), patchify_by_hand(z.numpy()))
    torch.testing.assert_close(ours, _pipeline_function("_patchify_latents")(z), rtol=0, atol=0)
    torch.testing.assert_close(_pipeline_function("_unpatchify_latents")(ours), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="5x8 do not divide into patches of 2x2"):
        patchify_latents(z[:, :, :5], (2, 2))


# --------------------------------------------------------------------------------------------
# The estimate against numpy on the same images
# --------------------------------------------------------------------------------------------


def test_flux2_statistics_match_a_by_hand_computation_on_the_same_batches():
    vae, dataset = make_tiny_flux2_vae(latent_channels=4), photo_dataset()
    statistics = estimate_latent_statistics(vae, dataset, num_batches=2, batch_size=2, seed=SEED)
    z = patchify_by_hand(posterior_means(vae, chosen_images(dataset, 4)))  # (4, 16, 8, 8)
    values = z.transpose(1, 0, 2, 3).reshape(16, -1)
    assert (statistics.num_images, statistics.num_batches, statistics.count, statistics.patch_size) == (4, 2, 256, (2, 2))
    np.testing.assert_allclose(statistics.mean.numpy(), values.mean(axis=1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(statistics.unbiased_variance.numpy(), values.var(axis=1, ddof=1), rtol=1e-6)

    before, after = apply_latent_statistics(vae, statistics)
    assert before["bn.running_mean"] == [0.0] * 16 and before["bn.running_var"] == [1.0] * 16  # a fresh BatchNorm
    np.testing.assert_allclose(vae.bn.running_mean.numpy(), values.mean(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vae.bn.running_var.numpy(), values.var(axis=1, ddof=1), rtol=1e-6)
    assert int(vae.bn.num_batches_tracked) == 2 and after == latent_normalization(vae)
    # what Flux2Pipeline then feeds its transformer: mean 0, variance 1 in every patch channel
    normalized = (values - vae.bn.running_mean.double().numpy()[:, None]) / np.sqrt(
        vae.bn.running_var.double().numpy()[:, None] + vae.config.batch_norm_eps
    )
    np.testing.assert_allclose(normalized.mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(normalized.var(axis=1, ddof=1), 1, atol=0.05)  # eps 1e-4 against variances ~1e-2


@pytest.mark.parametrize("convention", ["shift", "no_shift", "latents_mean"])
def test_autoencoderkl_statistics_in_each_diffusers_convention(convention):
    vae, dataset = make_tiny_vae(latent_channels=4), photo_dataset()
    if convention == "shift":  # FLUX.1 / SD3
        vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    elif convention == "latents_mean":  # SDXL style
        vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scaling_factor=0.5)
    statistics = estimate_latent_statistics(vae, dataset, num_batches=1, batch_size=3, seed=SEED)
    z = posterior_means(vae, chosen_images(dataset, 3))
    before, after = apply_latent_statistics(vae, statistics)
    config = vae.config
    if convention == "shift":
        assert (before["shift_factor"], before["scaling_factor"]) == (0.1159, 0.3611)
        np.testing.assert_allclose([config.shift_factor, config.scaling_factor], [z.mean(), 1 / z.std()], rtol=1e-6)
        normalized = (z - config.shift_factor) * config.scaling_factor
        np.testing.assert_allclose([normalized.mean(), normalized.std()], [0, 1], atol=1e-6)
    elif convention == "no_shift":  # `z * scaling_factor`, nothing subtracted: unit mean square
        assert config.shift_factor is None and before["scaling_factor"] == 0.18215
        np.testing.assert_allclose(config.scaling_factor, 1 / np.sqrt(np.mean(z**2)), rtol=1e-6)
        np.testing.assert_allclose(np.mean((z * config.scaling_factor) ** 2), 1, rtol=1e-6)
    else:
        per_channel = z.transpose(1, 0, 2, 3).reshape(4, -1)
        np.testing.assert_allclose(config.latents_mean, per_channel.mean(axis=1), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(config.latents_std, per_channel.std(axis=1), rtol=1e-6)
        assert config.scaling_factor == 0.5 and config.shift_factor is None  # the pipeline's target scale, kept
        normalized = (per_channel - np.array(config.latents_mean)[:, None]) * 0.5 / np.array(config.latents_std)[:, None]
        np.testing.assert_allclose(normalized.std(axis=1), 0.5, rtol=1e-6)


class FakeAccelerator:
    """Process `process_index` of `num_processes`, without a process group: `reduce` returns this process's share."""

    def __init__(self, process_index, num_processes):
        self.process_index, self.num_processes = process_index, num_processes

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()


def test_the_processes_share_the_images_without_overlap():
    vae, dataset = make_tiny_vae(latent_channels=4), photo_dataset()
    parts = [estimate_latent_statistics(vae, dataset, 1, 2, FakeAccelerator(k, 3), seed=SEED) for k in range(3)]
    whole = estimate_latent_statistics(vae, dataset, 3, 2, seed=SEED)  # the same 6 images on one process
    assert [p.num_images for p in parts] == [2, 2, 2] and whole.num_images == 6
    torch.testing.assert_close(sum(p.sum for p in parts), whole.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(p.sum_of_squares for p in parts), whole.sum_of_squares, rtol=1e-12, atol=1e-12)


def test_bad_input():
    vae = make_tiny_flux2_vae(latent_channels=4)
    with pytest.raises(ValueError, match="`num_batches` must be a positive integer, got 0"):
        estimate_latent_statistics(vae, photo_dataset(), 0, 2)
    with pytest.raises(ValueError, match="no image was encoded"):
        estimate_latent_statistics(vae, [], 1, 2)
    with pytest.raises(TypeError, match="supported class"):
        estimate_latent_statistics(torch.nn.Linear(2, 2), photo_dataset(), 1, 2)
    kl = estimate_latent_statistics(make_tiny_vae(latent_channels=4), photo_dataset(), 1, 2)
    with pytest.raises(ValueError, match=r"patches of \(1, 1\), but the VAE has 4 latent channels and patches of \(2, 2\)"):
        apply_latent_statistics(vae, kl)
    degenerate = LatentStatistics(torch.zeros(4), torch.zeros(4), 10, 1, 1)
    with pytest.raises(ValueError, match="not finite"):
        apply_latent_statistics(make_tiny_vae(latent_channels=4), degenerate)


# --------------------------------------------------------------------------------------------
# The FLUX.2 BatchNorm round trip
# --------------------------------------------------------------------------------------------


def test_flux2_batchnorm_statistics_round_trip(tmp_path):
    vae, dataset = make_tiny_flux2_vae(latent_channels=4), photo_dataset()
    apply_latent_statistics(vae, estimate_latent_statistics(vae, dataset, 1, 4, seed=SEED))
    vae.save_pretrained(tmp_path / "vae")
    reloaded = AutoencoderKLFlux2.from_pretrained(tmp_path / "vae")
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(reloaded.bn, key), getattr(vae.bn, key)), key
    # normalize as Flux2Pipeline encodes, de-normalize as it decodes: the latents come back
    z = reloaded.encode(photo_crops(2, 32)).latent_dist.mode().detach()
    mean = reloaded.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reloaded.bn.running_var.view(1, -1, 1, 1) + reloaded.config.batch_norm_eps)
    normalized = (patchify_latents(z) - mean) / std
    back = _pipeline_function("_unpatchify_latents")(normalized * std + mean)
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-6)
    assert normalized.abs().mean() > 0.1  # not a degenerate map


def test_model_card_paragraph_names_new_and_base_values():
    vae = make_tiny_vae(latent_channels=4)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    base = latent_normalization(vae)
    assert "copied unchanged" in describe_normalization(vae, base) and "0.3611" in describe_normalization(vae, base)
    statistics = estimate_latent_statistics(vae, photo_dataset(), 1, 4, seed=SEED)
    apply_latent_statistics(vae, statistics)
    text = describe_normalization(vae, base, statistics)
    assert "`latents = (z - shift_factor) * scaling_factor`" in text and "over 4 training images" in text
    new, reference = text.split("The base model's values, for reference:")
    assert f"`scaling_factor` = {vae.config.scaling_factor:.6g}" in new and "`scaling_factor` = 0.3611" in reference
    assert "`shift_factor` = 0.1159" in reference


# --------------------------------------------------------------------------------------------
# finetune_vae.py
# --------------------------------------------------------------------------------------------


def script_args(workspace, config_dir, output, steps, *extra):  # noqa: F811 (the imported fixture's name)
    return ["--model_config_name_or_path", str(config_dir), "--train_data_dir", workspace["images"], "--output_dir",
            str(output), "--max_train_steps", str(steps), "--seed", str(SEED), *FAST, "--report_to", "none",
            "--validation_steps", "100", "--latent_statistics_batches", "2", *extra]  # fmt: skip


def by_hand_latents(arguments, vae, num_processes):
    """The posterior means of the images the script's statistics used, rebuilt from its arguments."""
    from accelerate import PartialState

    PartialState()  # the script's logger needs Accelerate's state
    args = finetune_vae.parse_args(arguments)
    train, _, _ = finetune_vae.build_datasets(args, log_summary=False)
    train.set_epoch(0)
    count = args.latent_statistics_batches * args.train_batch_size * num_processes
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:count]
    pixels = torch.stack([train[int(i)]["pixel_values"] for i in order])
    return posterior_means(vae.eval(), pixels)


def test_finetune_recomputes_shift_and_scale_of_an_autoencoderkl(workspace, tmp_path):  # noqa: F811
    config_dir = tmp_path / "flux1_like"
    AutoencoderKL(**TINY_VAE, shift_factor=0.1159, scaling_factor=0.3611).save_config(config_dir)
    output = tmp_path / "run"
    arguments = script_args(workspace, config_dir, output, 2)
    finetune_vae.main(finetune_vae.parse_args(arguments))
    vae = AutoencoderKL.from_pretrained(output)
    z = by_hand_latents(arguments, vae, num_processes=1)
    assert z.shape[0] == 4  # 2 batches of 2
    np.testing.assert_allclose([vae.config.shift_factor, vae.config.scaling_factor], [z.mean(), 1 / z.std()], rtol=1e-5)
    card = (output / "README.md").read_text()
    assert "recomputed after fine-tuning, over 4 training images" in card
    assert "`shift_factor` = 0.1159" in card.split("for reference:")[1] and "`scaling_factor` = 0.3611" in card

    kept = tmp_path / "kept"
    finetune_vae.main(finetune_vae.parse_args(script_args(workspace, config_dir, kept, 1, "--no_recompute_latent_statistics")))
    config = json.loads((kept / "config.json").read_text())
    assert (config["shift_factor"], config["scaling_factor"]) == (0.1159, 0.3611)
    assert "copied unchanged" in (kept / "README.md").read_text()


def test_finetune_of_a_flux2_vae_on_two_processes_writes_its_batchnorm_statistics(workspace, tmp_path):  # noqa: F811
    config_dir = tmp_path / "flux2_config"
    make_tiny_flux2_vae(latent_channels=4).save_config(config_dir)
    output = tmp_path / "run"
    arguments = script_args(workspace, config_dir, output, 2, "--checkpointing_steps", "1")
    result = launch(arguments, num_processes=2)
    log = result.stdout + result.stderr
    assert "Num processes: 2" in log and "Latent statistics over 8 images" in log
    checksums = json.loads((output / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    vae = AutoencoderKLFlux2.from_pretrained(output)  # stock diffusers, the exported folder
    z = patchify_by_hand(by_hand_latents(arguments, vae, num_processes=2))  # 2 batches x 2 images x 2 processes
    values = z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)
    assert z.shape == (8, 16, 8, 8)
    np.testing.assert_allclose(vae.bn.running_mean.numpy(), values.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(vae.bn.running_var.numpy(), values.var(axis=1, ddof=1), rtol=1e-4)
    assert int(vae.bn.num_batches_tracked) == 4
    config = json.loads((output / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and not any("ssreg" in k for k in config)
    card = (output / "README.md").read_text()
    assert "from diffusers import AutoencoderKLFlux2" in card and "Flux2Pipeline" in card
    assert "`bn.running_mean` (16 values)" in card.replace("<code>", "`").replace("</code>", "`")

    # a FLUX.2 checkpoint resumes (its VAE reloaded as its own class), here on one process
    finetune_vae.main(finetune_vae.parse_args(script_args(workspace, config_dir, output, 2, "--resume_from_checkpoint",
                                                          "checkpoint-1")))  # fmt: skip
    resumed = AutoencoderKLFlux2.from_pretrained(output)
    assert int(resumed.bn.num_batches_tracked) == 2  # recomputed again, now 2 batches on one process
    assert not torch.equal(resumed.bn.running_var, torch.ones_like(resumed.bn.running_var))
