"""diffusers_ssreg.dit and the flow pipeline, in-process: presets, normalization, latent cache, objectives, sampler."""

import json
import os

import pytest
import torch
from diffusers import (
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from diffusers_ssreg import dit
from diffusers_ssreg.pipelines import DiTFlowPipeline


TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}


def tiny_transformer(objective="flow", num_classes=3, channels=4, size=8, seed=0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**dit.dit_config("DiT-S/2", channels, size, objective, num_classes, TINY_DIT))


def flux_like_vae(factory, **config):
    """A tiny VAE without quant convs (like Flux's) and with a shift_factor, or with the given config."""
    vae = factory(latent_channels=4, use_quant_conv=False)
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159, **config)
    return vae.eval()


# --------------------------------------------------------------------------------------------
# Presets and input checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,hidden,layers", [("DiT-S/2", 384, 12), ("DiT-B/2", 768, 12), ("DiT-L/2", 1024, 24), ("DiT-XL/2", 1152, 28)]
)
def test_presets_match_the_dit_paper(preset, hidden, layers):
    config = dit.dit_config(preset, latent_channels=16, latent_size=32, objective="flow", num_classes=10)
    assert config["num_attention_heads"] * config["attention_head_dim"] == hidden
    assert config["num_layers"] == layers and config["patch_size"] == 2
    assert (config["in_channels"], config["out_channels"], config["num_embeds_ada_norm"]) == (16, 16, 10)


def test_ddpm_config_is_what_the_stock_pipeline_needs():
    config = dit.dit_config("DiT-B/2", latent_channels=16, latent_size=32, objective="ddpm", num_classes=10)
    assert config["out_channels"] == 32  # epsilon + learned sigma
    assert config["num_embeds_ada_norm"] == dit.STOCK_NULL_CLASS == 1000  # DiTPipeline's null class


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(preset="DiT-M/3"), "unknown DiT preset"),
        (dict(overrides={"in_channels": 16}), "channel mismatch"),
        (dict(latent_size=9), "not divisible by the DiT patch size"),
        (dict(overrides={"num_layerz": 2}), "unknown DiTTransformer2DModel config keys"),
        (dict(objective="ddpm", overrides={"num_embeds_ada_norm": 10}), "num_embeds_ada_norm=1000"),
        (dict(num_classes=1001, objective="ddpm"), "do not fit"),
        (dict(objective="edm"), "`objective` must be one of"),
    ],
)
def test_dit_config_errors(kwargs, message):
    arguments = dict(preset="DiT-S/2", latent_channels=4, latent_size=8, objective="flow", num_classes=3)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dit.dit_config(**arguments)


def test_resolution_must_fit_the_vae_and_the_patch():
    assert dit.check_resolution(256, vae_factor=8, patch_size=2) == 32
    with pytest.raises(ValueError, match=r"multiple of the VAE's downsampling factor 8 times the DiT patch size 2 \(= 16\)"):
        dit.check_resolution(264, vae_factor=8, patch_size=2)


def test_config_overrides_inline_or_file(tmp_path):
    assert dit.load_config_overrides("transformer_config", '{"num_layers": 2}') == {"num_layers": 2}
    path = tmp_path / "dit.json"
    path.write_text('{"num_layers": 3}')
    assert dit.load_config_overrides("transformer_config", str(path)) == {"num_layers": 3}
    with pytest.raises(ValueError, match="--transformer_config must be a JSON object"):
        dit.load_config_overrides("transformer_config", "[1, 2]")


# --------------------------------------------------------------------------------------------
# Latent normalization
# --------------------------------------------------------------------------------------------


def test_vae_statistics_follow_diffusers_conventions(tiny_vae_factory):
    vae = flux_like_vae(tiny_vae_factory)
    mean, std = dit.vae_latent_statistics(vae.config)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(dit.normalize_latents(z, mean, std), (z - 0.1159) * 0.3611)  # SD3 / Flux
    vae.register_to_config(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0], scaling_factor=0.5)
    mean, std = dit.vae_latent_statistics(vae.config)
    expected = (z - torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)) * 0.5 / torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(dit.normalize_latents(z, mean, std), expected)  # SDXL / Playground


@pytest.mark.parametrize("with_post_quant_conv", [False, True])
def test_normalization_round_trips_through_decode(tiny_vae_factory, photo_batch, with_post_quant_conv):
    vae = tiny_vae_factory(latent_channels=4, use_quant_conv=with_post_quant_conv).eval()
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    with torch.no_grad():
        z = vae.encode(photo_batch).latent_dist.mode()
        plain = vae.decode(z).sample
        for mean, std in [dit.vae_latent_statistics(vae.config), ([0.3, -0.2, 0.1, 0.5], [1.7, 0.6, 2.2, 0.9])]:
            normalized = dit.normalize_latents(z, mean, std)
            torch.testing.assert_close(vae.decode(dit.denormalize_latents(normalized, mean, std)).sample, plain, atol=1e-5, rtol=0)
            folded = dit.fold_latent_normalization(vae, mean, std)  # what a DDPM pipeline folder's vae/ holds
            torch.testing.assert_close(folded.decode(normalized / folded.config.scaling_factor).sample, plain, atol=1e-5, rtol=0)
            torch.testing.assert_close(folded.encode(photo_batch).latent_dist.mode(), z)  # the encoder is untouched
            flow_vae = dit.flow_pipeline_vae(vae, mean, std)  # what a flow pipeline folder's vae/ holds
            flow_mean, flow_std = dit.vae_latent_statistics(flow_vae.config)
            decoded = flow_vae.decode(dit.denormalize_latents(normalized, flow_mean, flow_std)).sample
            torch.testing.assert_close(decoded, plain, atol=1e-5, rtol=0)
    assert dit.flow_pipeline_vae(vae, *dit.vae_latent_statistics(vae.config)) is vae  # nothing to record


# --------------------------------------------------------------------------------------------
# Latent cache
# --------------------------------------------------------------------------------------------


def write_cache(folder, sizes=(3, 2), channels=4, size=8, labels=True, stats=True):
    """A cache as cache_latents.py writes it, from random latents; returns the latents `(N, 2, C, h, w)`."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    everything, start = [], 0
    for index, n in enumerate(sizes):
        latents = (torch.randn((n, 2, channels, size, size), generator=generator) * 2 + 0.5).half()
        class_labels = torch.arange(start, start + n) % 3 if labels else None
        dit.write_latent_shard(dit.shard_path(folder, index, len(sizes)), latents, torch.arange(start, start + n), class_labels)
        everything.append(latents)
        start += n
    if stats:
        paths = [dit.shard_path(folder, i, len(sizes)) for i in range(len(sizes))]
        mean, std, _ = dit.latent_statistics_from_shards(paths)
        info = {"num_samples": start, "num_shards": len(sizes), "latent_channels": channels, "latent_size": size,
                "resolution": 2 * size, "latent_dtype": "float16", "has_labels": labels, "num_classes": 3 if labels else 0,
                "id2label": {"0": "a", "1": "b", "2": "c"} if labels else {}, "latents_mean": mean, "latents_std": std}  # fmt: skip
        with open(os.path.join(folder, dit.CACHE_STATS_NAME), "w") as f:
            json.dump(info, f)
    return torch.cat(everything)


def test_cache_round_trip_statistics_and_flips(tmp_path):
    latents = write_cache(tmp_path / "cache")
    dataset = dit.LatentDataset.from_cache(str(tmp_path / "cache"))
    assert len(dataset) == 5 and dataset.latent_channels == 4 and dataset.latent_size == 8 and dataset.num_classes == 3
    torch.testing.assert_close(dataset.latents, latents)
    assert dataset.class_labels.tolist() == [0, 1, 2, 0, 1]
    as_double = latents.double()
    mean, std = (torch.tensor(dataset.metadata[k], dtype=torch.float64) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(mean, as_double.mean(dim=(0, 1, 3, 4)))
    torch.testing.assert_close(std, as_double.std(dim=(0, 1, 3, 4), unbiased=False))
    views = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        batch = dataset.__getitems__([0, 1, 2, 3, 4])
        assert batch["latents"].shape == (5, 4, 8, 8) and batch["class_labels"].tolist() == [0, 1, 2, 0, 1]
        for i in range(5):
            original = torch.equal(batch["latents"][i], latents[i, 0])
            assert original or torch.equal(batch["latents"][i], latents[i, 1])
            views.append(original)
        torch.manual_seed(epoch)  # the views are a function of (seed, epoch, item), not of the global generator
        assert torch.equal(dataset.__getitems__([4, 0])["latents"], batch["latents"][[4, 0]])
    assert 0.25 < sum(views) / len(views) < 0.75  # both the original and the flipped copy are served
    assert views[:5] != views[5:10] and dit.LatentDataset(latents, seed=1).views(0).tolist() != dataset.views(0).tolist()
    loader = dit.latent_dataloader(dataset, batch_size=2)
    assert len(loader) == 2 and next(iter(loader))["latents"].shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="make no full batch"):
        dit.latent_dataloader(dataset, batch_size=6)


def test_cache_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        dit.LatentDataset.from_cache(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        dit.LatentDataset.from_cache(str(tmp_path / "empty"))
    write_cache(tmp_path / "unfinished", stats=False)
    with pytest.raises(ValueError, match="incomplete"):
        dit.LatentDataset.from_cache(str(tmp_path / "unfinished"))
    write_cache(tmp_path / "lost_shard")
    os.remove(dit.shard_path(str(tmp_path / "lost_shard"), 1, 2))
    with pytest.raises(ValueError, match="has 1 shards, 2 expected"):
        dit.LatentDataset.from_cache(str(tmp_path / "lost_shard"))


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def test_label_dropout_is_done_once_by_the_loss():
    transformer = tiny_transformer()
    loss = dit.DiTTrainingLoss(transformer, "flow", [0.0] * 4, [1.0] * 4)
    embedders = [m for m in transformer.modules() if hasattr(m, "token_drop")]
    assert embedders and all(m.dropout_prob == 0.0 for m in embedders)  # diffusers drops per block otherwise
    assert all(m.embedding_table.num_embeddings == 4 for m in embedders)  # 3 classes + the null class 3
    assert loss.null_class == 3
    labels = torch.tensor([0, 1, 2, 1])
    assert torch.equal(dit.drop_class_labels(labels, 3, 0.0), labels)
    assert dit.drop_class_labels(labels, 3, 1.0).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_training_loss_trains_the_transformer(objective):
    transformer = tiny_transformer(objective)
    model = dit.DiTTrainingLoss(transformer, objective, [0.5] * 4, [2.0] * 4).train()
    latents, labels = torch.randn(4, 4, 8, 8).half(), torch.tensor([0, 1, 2, 0])
    loss = model(latents, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in transformer.parameters() if p.requires_grad)


def test_variational_bound_vanishes_for_the_true_posterior():
    """With the exact epsilon and the posterior log-variance (variance output -1), the KL term is 0 (t > 0)."""
    model = dit.DiTTrainingLoss(tiny_transformer("ddpm"), "ddpm", [0.0] * 4, [1.0] * 4)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([1, 500, 999])
    signal, noise_scale = model._at(model.sqrt_alphas_cumprod, timesteps), model._at(model.sqrt_one_minus_alphas_cumprod, timesteps)
    noisy = signal * latents + noise_scale * noise
    bound = model._variational_bound(latents, noisy, noise, -torch.ones_like(noise), timesteps)
    assert bound.abs().max() < 1e-3
    wrong = model._variational_bound(latents, noisy, noise + 0.5, -torch.ones_like(noise), timesteps)
    assert (wrong > bound + 1e-3).all()


def test_flow_helpers():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(dit.flow_interpolate(latents, noise, torch.zeros(2)), latents)
    torch.testing.assert_close(dit.flow_interpolate(latents, noise, torch.ones(2)), noise)
    sigma, step = torch.full((2,), 0.3), 1e-3
    derivative = (dit.flow_interpolate(latents, noise, sigma + step) - dit.flow_interpolate(latents, noise, sigma)) / step
    torch.testing.assert_close(derivative, dit.flow_velocity_target(latents, noise), atol=1e-2, rtol=0)
    torch.manual_seed(0)
    sigmas = dit.sample_flow_sigmas(20000, "cpu")
    assert 0 < sigmas.min() and sigmas.max() < 1
    assert abs(torch.logit(sigmas).mean()) < 0.03 and abs(torch.logit(sigmas).std() - 1) < 0.03


# --------------------------------------------------------------------------------------------
# The flow sampler on an analytic velocity field: Gaussian (sigma 1) to Gaussian (sigma 0)
# --------------------------------------------------------------------------------------------


class GaussianVelocity(ModelMixin, ConfigMixin):
    """The exact marginal velocity of x_sigma = (1 - sigma) x_data + sigma x_noise, both Gaussian and independent."""

    @register_to_config
    def __init__(self, in_channels=2, sample_size=16, num_embeds_ada_norm=1, out_channels=2,
                 data_mean=1.5, data_std=0.4, noise_mean=-0.5, noise_std=2.0):  # fmt: skip
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and a dtype

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        c = self.config
        sigma = (timestep.double() / 1000).view(-1, 1, 1, 1)
        x = hidden_states.double()
        mean = (1 - sigma) * c.data_mean + sigma * c.noise_mean
        variance = (1 - sigma) ** 2 * c.data_std**2 + sigma**2 * c.noise_std**2
        d_variance = -2 * (1 - sigma) * c.data_std**2 + 2 * sigma * c.noise_std**2
        velocity = (c.noise_mean - c.data_mean) + d_variance / (2 * variance) * (x - mean)
        return Transformer2DModelOutput(sample=velocity.float())


@pytest.mark.parametrize(
    "scheduler_class,steps,tolerance",
    [(FlowMatchHeunDiscreteScheduler, 200, 2e-4), (FlowMatchEulerDiscreteScheduler, 1000, 3e-3)],  # 2nd, 1st order
)
def test_flow_sampler_transports_gaussian_to_gaussian_exactly(tiny_vae, scheduler_class, steps, tolerance):
    field = GaussianVelocity()
    c = field.config
    pipeline = DiTFlowPipeline(transformer=field, vae=tiny_vae, scheduler=scheduler_class())
    pipeline.set_progress_bar_config(disable=True)
    start = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = (start - start.mean()) / start.std(unbiased=False) * c.noise_std + c.noise_mean  # exactly N(noise_mean, noise_std^2)
    end = pipeline(class_labels=[0] * 4, latents=start.float(), num_inference_steps=steps, output_type="latent").images.double()
    exact = c.data_mean + c.data_std / c.noise_std * (start - c.noise_mean)  # the flow's map is affine
    assert (end - exact).abs().max() < tolerance * (exact - c.data_mean).abs().max()  # relative to the distance travelled
    assert abs(end.mean() - c.data_mean) < tolerance * c.data_std
    assert abs(end.std(unbiased=False) / c.data_std - 1) < tolerance


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def test_ddpm_folder_loads_as_stock_dit_pipeline(tmp_path, tiny_vae_factory):
    vae = flux_like_vae(tiny_vae_factory)
    mean, std = [0.3, -0.2, 0.1, 0.5], [1.7, 0.6, 2.2, 0.9]
    dit.build_pipeline(tiny_transformer("ddpm"), vae, "ddpm", mean, std, {0: "cat", 1: "dog", 2: "fish"}).save_pretrained(tmp_path)
    pipeline = DiTPipeline.from_pretrained(tmp_path)  # stock diffusers, unchanged
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.labels == {"cat": 0, "dog": 1, "fish": 2} and dit.pipeline_num_classes(pipeline) == 3
    images = pipeline(
        class_labels=[0, 2], guidance_scale=3.0, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # DiTPipeline decodes vae.decode(latents / scaling_factor): the folded decoder undoes the normalization
        decoded = pipeline.vae.decode(dit.normalize_latents(z, mean, std) / pipeline.vae.config.scaling_factor).sample
        torch.testing.assert_close(decoded, vae.decode(z).sample, atol=1e-5, rtol=0)


def test_flow_folder_loads_as_dit_flow_pipeline(tmp_path, tiny_vae_factory):
    vae = flux_like_vae(tiny_vae_factory)
    mean, std = [0.3, -0.2, 0.1, 0.5], [1.7, 0.6, 2.2, 0.9]
    dit.build_pipeline(tiny_transformer("flow"), vae, "flow", mean, std, {0: "cat", 1: "dog", 2: "fish"}).save_pretrained(tmp_path)
    pipeline = dit.load_dit_pipeline(str(tmp_path))
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline, DiTFlowPipeline) and isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipeline.labels == {"cat": 0, "dog": 1, "fish": 2} and dit.pipeline_num_classes(pipeline) == 3
    def run(output_type):
        generator = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipeline([0, 2], guidance_scale=3.0, num_inference_steps=2, generator=generator, output_type=output_type).images

    latents, images = run("latent"), run("pt")
    with torch.no_grad():  # decoded images = plain decode of the de-normalized latents
        expected = (vae.decode(dit.denormalize_latents(latents, mean, std)).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 3\)"):
        pipeline(class_labels=[3], num_inference_steps=1)


def test_build_pipeline_rejects_a_channel_mismatch(tiny_vae_factory):
    with pytest.raises(ValueError, match="channel mismatch"):
        dit.build_pipeline(tiny_transformer(channels=8), tiny_vae_factory(latent_channels=4), "flow", [0.0] * 8, [1.0] * 8)


# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True, gradient_accumulation_steps=2)
    AcceleratorState._reset_state(True)


def test_train_step_accumulates_and_skips_nonfinite_steps_on_the_device(cpu_accelerator):
    from diffusers.optimization import get_scheduler

    from diffusers_ssreg.training import NonFiniteGuard

    transformer = tiny_transformer()
    parameters = list(transformer.parameters())
    model = dit.DiTTrainingLoss(transformer, "flow", [0.0] * 4, [1.0] * 4)
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, fused=True)
    model, optimizer, scheduler = cpu_accelerator.prepare(model, optimizer, get_scheduler("constant", optimizer))
    guard = NonFiniteGuard(max_consecutive=2)
    good = {"latents": torch.randn(2, 4, 8, 8), "class_labels": torch.tensor([0, 2])}
    bad = {"latents": torch.full((2, 4, 8, 8), float("nan")), "class_labels": torch.tensor([0, 2])}
    before = [p.detach().clone() for p in parameters]

    first = dit.train_step(cpu_accelerator, model, optimizer, scheduler, bad, parameters, guard)
    assert first.grad_norm is None  # accumulating: no optimizer step yet
    second = dit.train_step(cpu_accelerator, model, optimizer, scheduler, good, parameters, guard)
    assert not torch.isfinite(second.grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(parameters, before))  # the NaN step was skipped
    for _ in range(2):
        output = dit.train_step(cpu_accelerator, model, optimizer, scheduler, good, parameters, guard)
    assert torch.isfinite(output.grad_norm) and torch.isfinite(output.loss)
    assert any(not torch.equal(p, b) for p, b in zip(parameters, before))
    guard.raise_if_exhausted(2)  # one skipped step, then a finite one: no error
    assert guard.total_skipped == 1
