"""diffusers_ssreg.speedups: the faster blocks compute what diffusers' blocks compute, and come off again."""

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.upsampling import Upsample2D

from conftest import fast_config, make_tiny_vae, photo_crops
from diffusers_ssreg import StateSpaceRegularizer
from diffusers_ssreg.speedups import (
    SPEEDUPS,
    FusedGroupNorm,
    GroupNormFromChannelStats,
    NearestUpsample2D,
    ResnetBlock2DWithoutCopy,
    apply_training_speedups,
    group_norm_from_channel_stats,
    parse_speedups,
    remove_training_speedups,
)


def relative_error(a, b):
    """
    ||a - b|| / ||b||: float32 sums in another order differ elementwise where the gradient is near zero (a
    gradient that is zero up to rounding, e.g. of a bias a GroupNorm cancels, counts as exact below 1e-8).
    """
    return float((a - b).norm() / b.norm()) if b.norm() > 1e-8 else float((a - b).norm())


def attention_vae():
    """A tiny `AutoencoderKL` with mid-block attention and nearest upsampling (the Flux VAE's blocks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    )  # fmt: skip


@pytest.mark.parametrize("shape", [(2, 32, 9, 7), (3, 16, 20), (2, 8, 3, 4, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_from_channel_stats_matches_torch(shape, affine):
    torch.manual_seed(0)
    # a large common offset: the per-channel form must not lose the variance to cancellation
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 40).requires_grad_(True)
    weight = torch.randn(shape[1], dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(shape[1], dtype=torch.float64, requires_grad=True) if affine else None
    groups = 4
    reference = F.group_norm(x, groups, weight, bias, 1e-6)
    ours = group_norm_from_channel_stats(x, groups, weight, bias, 1e-6)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    upstream = torch.randn_like(reference)
    inputs = [x] + ([weight, bias] if affine else [])
    for a, b in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(reference, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_group_norm_from_channel_stats_in_channels_last_and_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 6)
    weight, bias = torch.randn(16), torch.randn(16)
    reference = F.group_norm(x, 4, weight, bias, 1e-6)
    ours = group_norm_from_channel_stats(x.contiguous(memory_format=torch.channels_last), 4, weight, bias, 1e-6)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    # the output dtype follows torch's group_norm (CPU autocast keeps bfloat16; CUDA autocast returns float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = group_norm_from_channel_stats(x.bfloat16(), 4, weight, bias, 1e-6)
        assert ours.dtype == F.group_norm(x.bfloat16(), 4, weight, bias, 1e-6).dtype
    assert group_norm_from_channel_stats(x.bfloat16(), 4, weight.bfloat16(), bias.bfloat16(), 1e-6).dtype == torch.bfloat16


def test_apply_and_remove_keep_weights_and_results():
    vae = attention_vae()
    fast = apply_training_speedups(copy.deepcopy(vae))
    classes = {type(m) for m in fast.modules()}
    assert {FusedGroupNorm, NearestUpsample2D, ResnetBlock2DWithoutCopy} <= classes
    assert not classes & {torch.nn.GroupNorm, GroupNormFromChannelStats, Upsample2D, torch.nn.SiLU}
    # the SiLU after each resnet norm and after the encoder's and decoder's output norm runs inside the norm
    assert fast.decoder.conv_norm_out.fused_silu and type(fast.decoder.conv_act) is torch.nn.Identity
    assert fast.encoder.down_blocks[0].resnets[0].norm2.fused_silu
    assert not fast.decoder.mid_block.attentions[0].group_norm.fused_silu
    assert all(type(p) is AttnProcessor for p in fast.attn_processors.values())
    assert fast.state_dict().keys() == vae.state_dict().keys()

    images = photo_crops(2, 32)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = images.contiguous(memory_format=layout)
        expected, got = vae(x).sample, fast(x).sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        grad_expected = torch.autograd.grad(expected.square().sum(), vae.decoder.up_blocks[0].upsamplers[0].conv.weight)
        grad_got = torch.autograd.grad(got.square().sum(), fast.decoder.up_blocks[0].upsamplers[0].conv.weight)
        assert relative_error(grad_got[0], grad_expected[0]) < 1e-4

    apply_training_speedups(fast)  # twice is the same as once; the original processor is still the one restored
    remove_training_speedups(fast)
    assert [type(m) for m in fast.modules()] == [type(m) for m in vae.modules()]
    assert all(type(p) is AttnProcessor2_0 for p in fast.attn_processors.values())
    for key, value in vae.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    assert not any("fused_silu" in vars(m) for m in fast.modules())

    # without the fused kernels, the per-channel GroupNorm (and diffusers' SiLU modules) stay
    plain = apply_training_speedups(copy.deepcopy(vae), ["group_norm"])
    assert {type(m) for m in plain.modules()} >= {GroupNormFromChannelStats, torch.nn.SiLU}
    assert FusedGroupNorm not in {type(m) for m in plain.modules()}


def test_resnet_block_without_copy_keeps_the_layout_and_the_result():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=None, groups=8).train()
    fast = apply_training_speedups(copy.deepcopy(block), ["resnet_layout"])
    assert type(fast) is ResnetBlock2DWithoutCopy
    layouts = []
    fast.conv_shortcut.register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    expected, got = block(x, None), fast(x, None)
    assert layouts == [True], "the shortcut convolution's input was copied out of the channels-last layout"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(got)
    a = torch.autograd.grad(got, [x, *fast.parameters()], upstream)
    b = torch.autograd.grad(expected, [x, *block.parameters()], upstream)
    for got_grad, expected_grad in zip(a, b):
        assert relative_error(got_grad, expected_grad) < 1e-5
    remove_training_speedups(fast)
    assert type(fast) is ResnetBlock2D


def test_upsampling_keeps_channels_last_forward_and_backward():
    torch.manual_seed(0)
    stock = Upsample2D(8, use_conv=True, out_channels=8)
    fast = apply_training_speedups(copy.deepcopy(stock), ["upsample"])
    assert type(fast) is NearestUpsample2D
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 5, 6).contiguous(memory_format=layout).requires_grad_(True)
        expected, got = stock(x), fast(x)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        upstream = torch.randn_like(got).contiguous(memory_format=layout)
        grad = torch.autograd.grad(got, x, upstream)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(expected, x, upstream)[0], rtol=1e-5, atol=1e-5)
        # a channels-last input gets a channels-last gradient (an NCHW one makes cuDNN copy in the blocks before)
        assert grad.is_contiguous(memory_format=layout)


def test_the_compiled_fast_blocks_match_the_stock_model():
    """Inside torch.compile (the aot_eager backend traces what Inductor would) the per-channel GroupNorm runs."""
    vae = attention_vae()
    fast = apply_training_speedups(copy.deepcopy(vae))
    calls = []
    images = photo_crops(2, 32)
    expected = vae(images).sample
    expected_grads = torch.autograd.grad(expected.abs().mean(), list(vae.parameters()))
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=False)
    torch._dynamo.reset()
    from diffusers_ssreg import speedups

    spy = speedups.group_norm_from_channel_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return spy(*args, **kwargs)

    speedups.group_norm_from_channel_stats = counting
    try:
        got = compiled(images).sample
    finally:
        speedups.group_norm_from_channel_stats = spy
    assert calls, "the per-channel GroupNorm did not run under torch.compile"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad(got.abs().mean(), list(fast.parameters()))
    for a, b in zip(got_grads, expected_grads):
        assert relative_error(a, b) < 1e-4


def test_compile_modules_applies_and_unload_removes_them(monkeypatch):
    import torch._inductor.config as inductor_config

    from diffusers_ssreg.finetune import compile_modules

    monkeypatch.setattr(inductor_config, "force_layout_optimization", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    regularizer = StateSpaceRegularizer(make_tiny_vae(), fast_config(alpha=0.25, reference_resolution=None))
    compile_modules(regularizer)  # (compilation itself happens at the first call)
    assert inductor_config.force_layout_optimization and torch.backends.cudnn.benchmark
    # the weights are channels-last while training, NCHW again in the exported VAE
    assert regularizer.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not regularizer.vae.decoder.conv_in.weight.is_contiguous()
    # the EMA target encoder is a copy of the encoder: it gets the faster blocks too
    assert any(type(m) is FusedGroupNorm for m in regularizer.target_encoder.modules())
    vae = regularizer.unload()
    assert all(p.is_contiguous() for p in vae.parameters())
    fast_classes = (FusedGroupNorm, GroupNormFromChannelStats, NearestUpsample2D, ResnetBlock2DWithoutCopy)
    assert not any(type(m) in fast_classes for m in regularizer.modules())
    assert not any(type(m) is torch.nn.Identity for m in regularizer.modules())
    assert vae is regularizer.vae

    # EQ-VAE's sizes change every step: no cuDNN autotuning; no speed-ups asked for: nothing set at all
    from diffusers_ssreg import REGULARIZERS, build_regularizer

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    compile_modules(build_regularizer("eqvae", make_tiny_vae(), REGULARIZERS["eqvae"].config_class(lambda_lpips=0.0)))
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(inductor_config, "force_layout_optimization", False)
    plain = StateSpaceRegularizer(make_tiny_vae(), fast_config(reference_resolution=None))
    compile_modules(plain, speedups=())
    assert not inductor_config.force_layout_optimization
    assert not any(type(m) in (GroupNormFromChannelStats, FusedGroupNorm) for m in plain.modules())


def test_parse_speedups():
    assert parse_speedups("group_norm, attention") == ("group_norm", "attention")
    assert parse_speedups(",".join(SPEEDUPS)) == SPEEDUPS
    assert parse_speedups("none") == () and parse_speedups("") == ()
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown speed-up 'groupnorm' in 'groupnorm'; allowed: .*upsample"):
        parse_speedups("groupnorm")
    with pytest.raises(ValueError, match=r"`speedups` has \['channels_last'\]; allowed: fused_group_norm, group_norm"):
        apply_training_speedups(make_tiny_vae(), ["channels_last"])


def test_the_flux2_vae_takes_the_same_blocks():
    from conftest import make_tiny_flux2_vae

    vae = make_tiny_flux2_vae()
    fast = apply_training_speedups(copy.deepcopy(vae))
    assert any(type(m) is FusedGroupNorm and m.fused_silu for m in fast.modules())
    assert any(type(m) is NearestUpsample2D for m in fast.modules())
    images = photo_crops(2, 32)
    torch.testing.assert_close(fast.decode(fast.encode(images).latent_dist.mode()).sample,
                               vae.decode(vae.encode(images).latent_dist.mode()).sample, rtol=1e-5, atol=1e-5)  # fmt: skip
    remove_training_speedups(fast)
    assert [type(m) for m in fast.modules()] == [type(m) for m in vae.modules()]
