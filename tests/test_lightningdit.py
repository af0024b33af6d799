"""LightningDiT: the model, the recipe's objective, the pipeline's sampler and the package-level API (CPU, tiny configs)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_ssreg import dit
from diffusers_ssreg import lightningdit as ld
from diffusers_ssreg.models import LIGHTNINGDIT_PRESETS, LightningDiTTransformer2DModel
from diffusers_ssreg.models.transformer_lightningdit import apply_rotary_emb, rotary_tables
from diffusers_ssreg.pipelines import DiTFlowPipeline, LightningDiTPipeline
from diffusers_ssreg.pipelines.pipeline_lightningdit import lightningdit_timestep_grid


TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}


def tiny_model(channels=4, size=8, num_classes=3, preset="LightningDiT-S/2", randomize=True, seed=0, **overrides):
    """A tiny LightningDiT; `randomize` replaces the zero-initialized AdaLN/output layers so that outputs depend on everything."""
    torch.manual_seed(seed)
    model = ld.build_transformer(preset, channels, size, num_classes, overrides={**TINY, **overrides})
    if randomize:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def model_inputs(batch_size=3, channels=4, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, channels, size, size, generator=generator)
    return latents, torch.rand(batch_size, generator=generator), torch.arange(batch_size) % 4  # label 3: the null class


# --------------------------------------------------------------------------------------------
# Presets and configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,hidden,layers", [("S", 384, 12), ("B", 768, 12), ("L", 1024, 24), ("XL", 1152, 28)])
@pytest.mark.parametrize("patch", [1, 2])
def test_presets_are_dits_sizes_with_patch_1_and_2(size, hidden, layers, patch):
    preset = f"LightningDiT-{size}/{patch}"
    assert preset in ld.PRESETS and ld.is_lightningdit(preset)
    config = ld.lightningdit_config(preset, latent_channels=16, latent_size=32, num_classes=10)
    assert config["num_attention_heads"] * config["attention_head_dim"] == hidden
    assert (config["num_layers"], config["patch_size"]) == (layers, patch)
    assert (config["in_channels"], config["out_channels"], config["num_classes"]) == (16, 16, 10)


def test_the_preset_table_offers_both_kinds():
    assert set(ld.PRESETS) == set(dit.DIT_PRESETS) | set(LIGHTNINGDIT_PRESETS) and len(LIGHTNINGDIT_PRESETS) == 8
    assert type(ld.build_transformer("DiT-S/2", 4, 8, 3, overrides=TINY)) is DiTTransformer2DModel
    assert type(ld.build_transformer("LightningDiT-S/2", 4, 8, 3, overrides=TINY)) is LightningDiTTransformer2DModel
    assert not ld.is_lightningdit("DiT-B/2")
    assert ld.transformer_class(tiny_model().config) is LightningDiTTransformer2DModel
    assert ld.transformer_class(DiTTransformer2DModel(**dit.dit_config("DiT-S/2", 4, 8, "flow", 3, TINY)).config) is DiTTransformer2DModel


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(preset="LightningDiT-H/2"), "unknown preset"),
        (dict(objective="ddpm"), "flow objective only"),
        (dict(overrides={"in_channels": 8}), "channel mismatch"),
        (dict(overrides={"num_layerz": 2}), "unknown LightningDiTTransformer2DModel config keys"),
        (dict(latent_size=9), "not divisible by the DiT patch size"),
        (dict(num_classes=5, overrides={"num_classes": 4}), "do not fit"),
        (dict(overrides={"attention_head_dim": 6}), "divisible by 4"),
    ],
)
def test_config_errors_name_the_problem(kwargs, message):
    arguments = dict(preset="LightningDiT-S/2", latent_channels=4, latent_size=8, num_classes=3, objective="flow")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ld.build_transformer(**{**arguments, "overrides": {**TINY, **arguments.get("overrides", {})}})


def test_recipe_defaults_are_lightningdits_and_dits():
    recipe = ld.recipe_defaults("LightningDiT-B/2")
    assert recipe["learning_rate"] == 2e-4 and (recipe["adam_beta1"], recipe["adam_beta2"]) == (0.9, 0.95)
    assert recipe["adam_weight_decay"] == 0.0 and recipe["max_grad_norm"] is None and recipe["ema_decay"] == 0.9999
    assert recipe["mixed_precision"] == "bf16" and recipe["cosine_loss_weight"] == 1.0 and recipe["objective"] == "flow"
    assert recipe["latent_normalization"] == "channel" and recipe["random_flip"] and recipe["class_dropout_prob"] == 0.1
    original = ld.recipe_defaults("DiT-B/2")
    assert original["learning_rate"] == 1e-4 and original["adam_beta2"] == 0.999 and original["cosine_loss_weight"] == 0.0
    assert set(original) == set(recipe)
    with pytest.raises(ValueError, match="`ema_decay` must be in"):
        ld.LightningDiTRecipe(ema_decay=1.0)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"patch_size": 1}, {"use_qk_norm": True}, {"use_swiglu": False, "use_rmsnorm": False, "use_rope": False}],
)
def test_shapes_and_save_load_round_trip(tmp_path, overrides):
    model = tiny_model(**overrides)
    latents, t, labels = model_inputs()
    with torch.no_grad():
        output = model(latents, t, labels).sample
    assert output.shape == latents.shape and torch.isfinite(output).all() and output.abs().max() > 0
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "LightningDiTTransformer2DModel" and config["num_classes"] == 3
    loaded = LightningDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert not any(k.startswith(("pos_embed", "rope_")) for k in loaded.state_dict())  # recomputed, not stored
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, t, labels).sample, output, atol=0, rtol=0)
    assert ld.is_lightningdit(config) and ld.transformer_class(config) is LightningDiTTransformer2DModel


def test_adaln_zero_initialization_makes_the_model_output_zero():
    model = tiny_model(randomize=False)
    latents, t, labels = model_inputs()
    with torch.no_grad():
        assert torch.equal(model(latents, t, labels).sample, torch.zeros_like(latents))
        block = model.blocks[0]
        hidden = torch.randn(2, 16, model.hidden_size)
        assert torch.equal(block(hidden, torch.randn(2, model.hidden_size)), hidden)  # every block starts as the identity
    # class and time reach the output once the zero-initialized layers move
    model = tiny_model()
    with torch.no_grad():
        base = model(latents, t, labels).sample
        assert not torch.allclose(model(latents, t, (labels + 1) % 4).sample, base)
        assert not torch.allclose(model(latents, 1 - t, labels).sample, base)


def test_gradient_checkpointing_gives_the_same_gradients():
    latents, t, labels = model_inputs()
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(latents, t, labels).sample.square().mean().backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


def test_model_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="must be 8x8"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="not divisible by `patch_size`"):
        LightningDiTTransformer2DModel(sample_size=9, patch_size=2, in_channels=4, **TINY)


# --------------------------------------------------------------------------------------------
# 2D rotary position embedding
# --------------------------------------------------------------------------------------------


def rotated_scores(query, key, query_positions, key_positions, grid=8, head_dim=16):
    """`<R(p_q) query, R(p_k) key>` for (row, col) positions on a `grid` x `grid` token grid."""
    cos, sin = rotary_tables(head_dim, grid)
    index = lambda rc: rc[:, 0] * grid + rc[:, 1]  # noqa: E731 - row-major token index
    rotate = lambda x, p: apply_rotary_emb(x[None, :, None], cos[index(p)][:, None], sin[index(p)][:, None])[0, :, 0]  # noqa: E731
    return (rotate(query, query_positions) * rotate(key, key_positions)).sum(-1)


def test_rope_scores_depend_only_on_position_offsets():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(64, 16, generator=generator), torch.randn(64, 16, generator=generator)
    query_positions = torch.randint(0, 4, (64, 2), generator=generator)
    key_positions = torch.randint(0, 4, (64, 2), generator=generator)
    scores = rotated_scores(query, key, query_positions, key_positions)
    for offset in ([1, 0], [0, 3], [2, 1], [4, 4]):  # shift both positions: the scores stay
        offset = torch.tensor(offset)
        shifted = rotated_scores(query, key, query_positions + offset, key_positions + offset)
        torch.testing.assert_close(shifted, scores, atol=1e-5, rtol=1e-5)  # float32 tables
    for offset in ([1, 0], [0, 1]):  # shift the key only: rows and columns both change the scores
        moved = rotated_scores(query, key, query_positions, key_positions + torch.tensor(offset))
        assert (moved - scores).abs().max() > 1e-2
    # no rotation at the origin; a row move rotates the first half of the channels, a column move the second
    cos, sin = rotary_tables(16, 8)
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[0], torch.zeros(16))
    assert torch.equal(sin[8, 8:], torch.zeros(8)) and sin[8, :8].abs().max() > 0.5  # token (1, 0)
    assert torch.equal(sin[1, :8], torch.zeros(8)) and sin[1, 8:].abs().max() > 0.5  # token (0, 1)


# --------------------------------------------------------------------------------------------
# The fused formulations against the textbook ones (the model must stay the same function)
# --------------------------------------------------------------------------------------------


def textbook_rms_norm(norm, x):
    """RMSNorm as LightningDiT's `models/rmsnorm.py` writes it: normalized in float32, cast back, then scaled."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight


def textbook_attention(attn, x, cos, sin):
    """q, k, v split; QK-norm and the rotation (pairs (x0, x1) -> (-x1, x0) by stack) on q and k one at a time."""
    batch_size, num_tokens, _ = x.shape
    query, key, value = attn.qkv(x).view(batch_size, num_tokens, 3, attn.num_heads, attn.head_dim).unbind(2)
    if attn.q_norm is not None:
        query, key = textbook_rms_norm(attn.q_norm, query), textbook_rms_norm(attn.k_norm, key)

    def rotate(t):
        t32 = t.float()
        pairs = t32.unflatten(-1, (-1, 2))
        return (t32 * cos + torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2) * sin).to(t.dtype)

    query, key = rotate(query).to(value.dtype), rotate(key).to(value.dtype)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return attn.proj(out.transpose(1, 2).reshape(batch_size, num_tokens, -1))


@pytest.mark.parametrize("qk_norm,fused_norm", [(False, True), (True, True), (True, False)])
def test_fused_rotation_and_norms_match_the_textbook_formulas(qk_norm, fused_norm, monkeypatch):
    if not fused_norm:  # a torch without torch.nn.functional.rms_norm
        monkeypatch.delattr(F, "rms_norm", raising=False)
    model = tiny_model(use_qk_norm=qk_norm, attention_head_dim=16)  # 8x8 latents, patch 2: a 4x4 token grid
    cos, sin = rotary_tables(16, 4)
    attn, norm = model.blocks[0].attn, model.blocks[0].norm1
    x = torch.randn(2, 16, model.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, slow = attn(x, (model.rope_cos, model.rope_sin)), textbook_attention(attn, x, cos[:, None], sin[:, None])
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)  # float32: the same numbers up to rounding
        torch.testing.assert_close(norm(x), textbook_rms_norm(norm, x), atol=1e-6, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, slow = attn(x, (model.rope_cos, model.rope_sin)), textbook_attention(attn, x, cos[:, None], sin[:, None])
        assert fast.dtype == slow.dtype == torch.bfloat16
        assert (fast.float() - slow.float()).abs().max() <= 2**-7 * slow.float().abs().max()  # bf16 rounding
        for dtype in (torch.bfloat16, torch.float16):  # half inputs: float32 statistics, the scale applied after the cast
            half = x.to(dtype)
            fast, slow = norm(half), textbook_rms_norm(norm, half)
            assert fast.dtype == slow.dtype == torch.float32
            torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_patch_embedding_gives_a_contiguous_residual_stream():
    model = tiny_model()
    latents = model_inputs()[0]
    with torch.no_grad():
        tokens = model.x_embedder(latents)
        expected = model.x_embedder.proj(latents).flatten(2).transpose(1, 2)  # (batch, tokens, dim), row-major patches
    assert tokens.is_contiguous() and torch.equal(tokens, expected)


# --------------------------------------------------------------------------------------------
# The recipe's objective
# --------------------------------------------------------------------------------------------


def test_velocity_loss_against_a_by_hand_computation():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 3, 4, 5, generator=generator), torch.randn(2, 3, 4, 5, generator=generator)
    mse = ((prediction - target) ** 2).sum() / prediction.numel()
    cosine = (prediction * target).sum(1) / (prediction.norm(dim=1) * target.norm(dim=1))  # across channels, per pixel
    expected = mse + 0.7 * (1 - cosine).sum() / cosine.numel()
    torch.testing.assert_close(ld.velocity_loss(prediction, target, 0.7), expected)
    torch.testing.assert_close(ld.velocity_loss(prediction, target, 0.0), mse)
    torch.testing.assert_close(ld.velocity_loss(target, target), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ld.velocity_loss(3 * target, target, 1.0), 4 * (target**2).mean(), atol=1e-5, rtol=0)


def test_training_loss_against_a_by_hand_computation(monkeypatch):
    model = tiny_model()
    mean, std = [0.5, -0.2, 0.1, 0.0], [2.0, 1.0, 0.5, 1.5]
    module = ld.build_training_module(model, "flow", mean, std, class_dropout_prob=0.1).eval()  # eval: no label dropout
    assert isinstance(module, ld.LightningDiTTrainingLoss) and module.null_class == 3
    sigmas = torch.tensor([0.9, 0.5, 0.05])
    monkeypatch.setattr(ld, "sample_flow_sigmas", lambda batch_size, device, mean, std: sigmas)
    seen = {}
    model.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, x=args[0], out=out.sample), with_kwargs=True)
    raw, labels = torch.randn(3, 4, 8, 8) * 2 + 0.3, torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    loss = module(raw, labels)

    torch.manual_seed(5)
    noise = torch.randn(3, 4, 8, 8)  # the module's only random draw in eval mode with fixed sigmas
    data = (raw - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    t = 1 - sigmas  # LightningDiT's time: 1 is data
    torch.testing.assert_close(seen["timestep"], t)
    torch.testing.assert_close(seen["x"], t.view(3, 1, 1, 1) * data + (1 - t.view(3, 1, 1, 1)) * noise)
    assert torch.equal(seen["class_labels"], labels)
    target, prediction = data - noise, seen["out"]
    cosine = (prediction * target).sum(1) / (prediction.norm(dim=1) * target.norm(dim=1))
    torch.testing.assert_close(loss, ((prediction - target) ** 2).mean() + (1 - cosine).mean())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_module_of_either_kind():
    original = ld.build_transformer("DiT-S/2", 4, 8, 3, overrides=TINY)
    assert isinstance(ld.build_training_module(original, "flow", [0.0] * 4, [1.0] * 4), dit.DiTTrainingLoss)
    with pytest.raises(ValueError, match="cosine_loss_weight must be 0 for a DiT"):
        ld.build_training_module(original, "flow", [0.0] * 4, [1.0] * 4, cosine_loss_weight=1.0)
    with pytest.raises(ValueError, match="flow objective only"):
        ld.build_training_module(tiny_model(), "ddpm", [0.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="latents_mean/latents_std need 4 entries"):
        ld.build_training_module(tiny_model(), "flow", [0.0] * 3, [1.0] * 3)


def test_training_module_compiles_without_graph_breaks():
    module = ld.build_training_module(tiny_model(use_qk_norm=True), "flow", [0.0] * 4, [1.0] * 4).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(torch.randn(2, 4, 8, 8), torch.tensor([0, 2]))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_ema_folder_is_a_lightningdit_folder(tmp_path):
    model = tiny_model()
    ema = ld.create_transformer_ema(model, 0.9999)
    ema.step(model.parameters())  # the first update copies the weights
    ema.save_pretrained(str(tmp_path))
    loaded = LightningDiTTransformer2DModel.from_pretrained(tmp_path)
    for name, parameter in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], parameter)


# --------------------------------------------------------------------------------------------
# FLOPs per image, against PyTorch's own count of the matrix products
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,overrides",
    [("LightningDiT-S/2", {}), ("LightningDiT-S/1", {"use_swiglu": False}), ("DiT-S/2", {})],
)
def test_flops_per_image_match_pytorchs_count(preset, overrides):
    model = ld.build_transformer(preset, 4, 8, 3, overrides={**TINY, "attention_head_dim": 16, **overrides}).eval()
    latents, t, labels = model_inputs(batch_size=2)
    if not ld.is_lightningdit(model):
        t = (t * 1000).long()
    # the math attention backend runs as batched matmuls, which the counter sees (fused CPU kernels it does not)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(latents, t, labels)
    assert ld.forward_flops_per_image(model) == counter.get_total_flops() / 2
    mfu = ld.model_flops_utilization(ld.forward_flops_per_image(model), images_per_second=1000.0, peak_flops=1e12)
    assert mfu == pytest.approx(3 * counter.get_total_flops() / 2 * 1000 / 1e12)


def test_flops_of_lightningdit_b2_on_16x32x32_latents():
    config = ld.lightningdit_config("LightningDiT-B/2", latent_channels=16, latent_size=32, num_classes=1000)
    tokens, dim, ffn = 256, 768, 2048  # 16 x 16 patches; SwiGLU width int(2/3 * 4 * 768)
    per_block = 8 * tokens * dim**2 + 4 * tokens**2 * dim + 6 * tokens * dim * ffn + 12 * dim**2
    expected = 2 * tokens * 4 * 16 * dim + 2 * (256 * dim + dim**2) + 12 * per_block + 4 * dim**2 + 2 * tokens * dim * 4 * 16
    assert ld.forward_flops_per_image(config) == expected


# --------------------------------------------------------------------------------------------
# The sampler: shifted Euler grid, guidance interval, guided channels
# --------------------------------------------------------------------------------------------


class ConstantVelocity(ModelMixin, ConfigMixin):
    """Velocity `(label + 1) * channel_scale` for a class label, 0 for the null class; records every call."""

    @register_to_config
    def __init__(self, in_channels=4, sample_size=4, num_classes=3):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and a dtype
        self.calls = []

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        self.calls.append((timestep.clone(), class_labels.clone()))
        channel_scale = torch.arange(1, self.config.in_channels + 1, dtype=torch.float32).view(1, -1, 1, 1)
        value = torch.where(class_labels == self.config.num_classes, 0.0, class_labels + 1.0).view(-1, 1, 1, 1)
        return Transformer2DModelOutput(sample=(value * channel_scale).expand_as(hidden_states).clone())


def test_timestep_grid_guidance_interval_and_channels_by_hand(tiny_vae):
    field = ConstantVelocity()
    pipeline = LightningDiTPipeline(transformer=field, vae=tiny_vae, scheduler=ld.lightningdit_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    steps, scale, labels = 12, 4.0, [0, 2]
    start = torch.randn(2, 4, 4, 4)

    # LightningDiT's grid by hand: t_k = k / N, then t -> 0.3 t / (1 - 0.7 t); the model sees t_0 .. t_{N-1}
    t = np.array([0.3 * (k / steps) / (1 - 0.7 * (k / steps)) for k in range(steps + 1)])
    np.testing.assert_allclose(lightningdit_timestep_grid(steps), t, rtol=0, atol=1e-12)
    end = pipeline(labels, guidance_scale=scale, num_inference_steps=steps, latents=start, output_type="latent").images
    times = [call[0][0].item() for call in field.calls]
    np.testing.assert_allclose(times, t[:-1], rtol=0, atol=1e-6)
    guided = [len(call[1]) == 4 for call in field.calls]  # conditional + null-class batch
    assert guided == [tk >= 0.11 for tk in t[:-1]] and 0 < sum(guided) < steps  # the interval: t >= 0.11
    assert all(call[1][2:].tolist() == [3, 3] for call in field.calls if len(call[1]) == 4)  # null class = num_classes

    # Euler with constant velocities: x_N = x_0 + sum_k (t_{k+1} - t_k) v_k, v_k = scale * v_cond where guided
    cond = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1)
    weight = sum((t[k + 1] - t[k]) * (scale if guided[k] else 1.0) for k in range(steps))
    torch.testing.assert_close(end, start + weight * cond, atol=1e-5, rtol=0)

    # LightningDiT's first-channels guidance: channels 0-2 guided, channel 3 follows the conditional velocity
    field.calls.clear()
    end = pipeline(labels, guidance_scale=scale, guidance_channels=3, num_inference_steps=steps, latents=start,
                   output_type="latent").images  # fmt: skip
    plain = sum(t[k + 1] - t[k] for k in range(steps))  # = 1
    expected = start + torch.cat([weight * cond[:, :3], plain * cond[:, 3:]], dim=1)
    torch.testing.assert_close(end, expected, atol=1e-5, rtol=0)

    # no guidance (the paper's setting): one conditional pass per step, the full unit time
    field.calls.clear()
    end = pipeline(labels, num_inference_steps=steps, latents=start, output_type="latent").images
    assert len(field.calls) == steps and all(len(call[1]) == 2 for call in field.calls)
    torch.testing.assert_close(end, start + cond, atol=1e-5, rtol=0)


def test_scheduler_shift_is_the_inverse_of_lightningdits():
    scheduler = ld.lightningdit_scheduler(0.3)
    assert scheduler.config.shift == pytest.approx(1 / 0.3)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 9)[:-1].tolist())
    np.testing.assert_allclose(scheduler.sigmas.numpy(), 1 - lightningdit_timestep_grid(8, 0.3), rtol=0, atol=1e-6)


def test_pipeline_input_errors(tiny_vae):
    pipeline = LightningDiTPipeline(transformer=ConstantVelocity(), vae=tiny_vae, scheduler=ld.lightningdit_scheduler())
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 3\)"):
        pipeline([3], num_inference_steps=1)
    with pytest.raises(ValueError, match="`guidance_interval` must be"):
        pipeline([0], guidance_interval=(0.9, 0.1), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`guidance_channels` as a count must be in \[1, 4\]"):
        pipeline([0], guidance_scale=2.0, guidance_channels=5, num_inference_steps=1)
    with pytest.raises(ValueError, match="`guidance_channels` must be channel indices"):
        pipeline([0], guidance_scale=2.0, guidance_channels=[0, 7], num_inference_steps=1)


# --------------------------------------------------------------------------------------------
# The pipeline folder
# --------------------------------------------------------------------------------------------


def test_folder_loads_with_diffusion_pipeline_and_samples_deterministically(tmp_path, tiny_vae_factory):
    vae = tiny_vae_factory(latent_channels=4, use_quant_conv=False).eval()
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    mean, std = [0.3, -0.2, 0.1, 0.5], [1.7, 0.6, 2.2, 0.9]
    built = ld.build_output_pipeline(tiny_model(), vae, "flow", mean, std, {0: "cat", 1: "dog", 2: "fish"})
    built.save_pretrained(tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path)  # the class comes from model_index.json
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline, LightningDiTPipeline) and isinstance(pipeline.transformer, LightningDiTTransformer2DModel)
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler) and pipeline.scheduler.config.shift == pytest.approx(1 / 0.3)
    assert pipeline.labels == {"cat": 0, "dog": 1, "fish": 2} and ld.pipeline_num_classes(pipeline) == 3
    assert type(ld.load_pipeline(str(tmp_path))) is LightningDiTPipeline

    def run(target, output_type, seeds=(0, 1)):
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        return target([0, 2], guidance_scale=3.0, num_inference_steps=3, generator=generator, output_type=output_type).images

    latents = run(pipeline, "latent")
    torch.testing.assert_close(run(pipeline, "latent"), latents, atol=0, rtol=0)  # same generators, same samples
    torch.testing.assert_close(run(built, "latent"), latents)  # the folder holds what was built
    assert not torch.allclose(run(pipeline, "latent", seeds=(2, 3)), latents)
    images = run(pipeline, "pt")
    with torch.no_grad():  # decoded = the source VAE's decode of the de-normalized latents
        expected = (vae.decode(dit.denormalize_latents(latents, mean, std)).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert run(pipeline, "np").shape == (2, 16, 16, 3)


def test_flow_folder_of_the_original_dit_loads_with_diffusion_pipeline_too(tmp_path, tiny_vae):
    transformer = DiTTransformer2DModel(**dit.dit_config("DiT-S/2", 4, 8, "flow", 3, TINY))
    ld.build_output_pipeline(transformer, tiny_vae, "flow", [0.0] * 4, [1.0] * 4).save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is DiTFlowPipeline
    with pytest.raises(ValueError, match="flow objective only"):
        ld.build_output_pipeline(tiny_model(), tiny_vae, "ddpm", [0.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="channel mismatch"):
        ld.build_output_pipeline(tiny_model(channels=8), tiny_vae, "flow", [0.0] * 8, [1.0] * 8)



def test_folder_loaded_in_bfloat16_samples(tmp_path, tiny_vae_factory):
    ld.build_output_pipeline(tiny_model(), tiny_vae_factory(use_quant_conv=False), "flow", [0.0] * 4, [1.0] * 4).save_pretrained(tmp_path)
    pipeline = ld.load_pipeline(str(tmp_path), **dit.dtype_kwargs(torch.bfloat16))
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.transformer.dtype == torch.bfloat16
    latents = pipeline([0, 2], guidance_scale=2.0, num_inference_steps=2, output_type="latent").images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
