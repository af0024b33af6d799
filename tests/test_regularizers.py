"""EQ-VAE, scale equivariance, spectrum matching and the plain baseline on a tiny AutoencoderKL (CPU, offline).

Each method's transform and loss is recomputed by hand (numpy / scipy, not the package's code) on a
small case; gradients reach what they should and nothing else; every method passes the PEFT-style
clean-removal test and a save/load round trip; the registry turns each one into flags; bad config
values name the field.
"""

import argparse
import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from conftest import make_tiny_vae, photo_crops
from diffusers_ssreg import (
    REGULARIZERS,
    EQVAEConfig,
    EQVAERegularizer,
    PlainFinetune,
    PlainFinetuneConfig,
    ScaleEquivarianceConfig,
    ScaleEquivarianceRegularizer,
    SpectrumMatchingConfig,
    SpectrumMatchingRegularizer,
    SSRegConfig,
    StateSpaceRegularizer,
    add_regularizer_arguments,
    build_regularizer,
    load_regularizer,
    regularizer_config_from_args,
    regularizer_from_args,
)
from diffusers_ssreg.regularizers.eqvae import EQVAE_SCALES, EQVAEPlan, equivariance_transform
from diffusers_ssreg.regularizers.scale_equivariance import ScaleEquivariancePlan, downsample
from diffusers_ssreg.regularizers.spectrum_matching import SpectrumMatchingPlan, block_dct_lowpass, esm_loss


pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")

NAMES = list(REGULARIZERS)
OFFLINE = dict(lambda_lpips=0.0, lpips_net="alex", lpips_pretrained_backbone=False)


def _config(name, **overrides):
    """The method's config for CPU tests: LPIPS off (or a random AlexNet), one block frozen on each side."""
    kwargs = dict(OFFLINE, freeze_encoder_blocks=1, freeze_decoder_blocks=1)
    kwargs.update(overrides)
    return REGULARIZERS[name].config_class(**kwargs)


@pytest.fixture
def deterministic_posterior(monkeypatch):
    """z = posterior mean: the by-hand computations then need no noise matching."""
    from diffusers.models.autoencoders import vae as vae_module

    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _np(t):
    return t.detach().double().cpu().numpy()


def _bilinear(images, out_h, out_w):
    """Bilinear resize of `(..., H, W)` with half-pixel centres and edge clamping, written out in numpy."""

    def weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        frac = src - low
        matrix = np.zeros((n_out, n_in))
        matrix[np.arange(n_out), low] += 1 - frac
        matrix[np.arange(n_out), high] += frac
        return matrix

    rows, cols = weights(images.shape[-2], out_h), weights(images.shape[-1], out_w)
    return np.einsum("ij,...jk,lk->...il", rows, images, cols)


def _rot90(images, k):
    """k quarter turns from the last axis towards the second to last."""
    return np.rot90(images, k, axes=(-1, -2)).copy()


def _decode(vae, latents_np):
    with torch.no_grad():
        return _np(vae.decode(torch.from_numpy(latents_np).float()).sample)


def _encode(vae, images_np):
    """(posterior mean, KL per sample) of float64 images."""
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(images_np).float()).latent_dist
        return _np(posterior.mean), _np(posterior.kl())


def _l1(a, b):
    return np.abs(a - b).mean(axis=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# EQ-VAE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, turns", [((12, 12), 1), ((8, 8), 2), ((31, 31), 3), ((16, 16), 1), ((10, 14), 0)])
def test_eqvae_target_is_the_rotated_resized_image(size, turns):
    images = photo_crops(2, 32)
    expected = _rot90(_bilinear(_np(images), *size), turns)
    got = equivariance_transform(images, size, turns)
    np.testing.assert_allclose(_np(got), expected, rtol=0, atol=2e-6)


def test_eqvae_rotation_direction_on_a_tiny_image():
    """One quarter turn takes the top-right pixel to the top-left (the authors' `torch.rot90(dims=[-1, -2])`)."""
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert equivariance_transform(image, (2, 2), 1).flatten().tolist() == [3.0, 1.0, 4.0, 2.0]


def test_eqvae_loss_by_hand(deterministic_posterior):
    """Branches [eq, low, eq, plain], s = 0.75, one quarter turn: every term recomputed from the VAE with numpy."""
    vae = make_tiny_vae(latent_channels=4)
    regularizer = EQVAERegularizer(vae, _config("eqvae", lambda_mae=0.9, kl_weight=1e-3))
    pixels = photo_crops(4, 32)
    plan = EQVAEPlan(torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3]), scale=0.75, quarter_turns=1)
    output = regularizer(pixels, plan=plan, return_reconstruction=True)

    x = _np(pixels)
    z, kl = _encode(vae, x)  # latents (4, 4, 16, 16)
    # equivariance: D(rot(resize(z, 12))) against rot(resize(x, 24))
    eq = [0, 2]
    decoded_eq = _decode(vae, _rot90(_bilinear(z[eq], 12, 12), 1))
    target_eq = _rot90(_bilinear(x[eq], 24, 24), 1)
    # low-resolution prior preservation: the image resized to 24 px, encoded and reconstructed
    x_low = _bilinear(x[[1]], 24, 24)
    z_low, kl_low = _encode(vae, x_low)
    decoded_low = _decode(vae, z_low)
    # plain
    decoded_plain = _decode(vae, z[[3]])
    per_sample = np.concatenate(
        [
            0.9 * _l1(decoded_eq, target_eq) + 1e-3 * kl[eq],
            0.9 * _l1(decoded_low, x_low) + 1e-3 * kl_low,
            0.9 * _l1(decoded_plain, x[[3]]) + 1e-3 * kl[[3]],
        ]
    )
    assert output.loss.item() == pytest.approx(per_sample.mean(), rel=1e-5)
    assert output.eq_mae.item() == pytest.approx(_l1(decoded_eq, target_eq).mean(), rel=1e-5)
    assert output.low_res_mae.item() == pytest.approx(_l1(decoded_low, x_low).mean(), rel=1e-5)
    assert output.rec_mae.item() == pytest.approx(_l1(decoded_plain, x[[3]]).mean(), rel=1e-5)
    assert output.eq_fraction.item() == 0.5 and output.low_res_fraction.item() == 0.25
    # the decoder's output of every sample, in the input's order, at its branch's size
    assert [tuple(r.shape) for r in output.reconstruction] == [(3, 24, 24)] * 3 + [(3, 32, 32)]
    np.testing.assert_allclose(_np(output.reconstruction[2]), decoded_eq[1], atol=2e-5)
    np.testing.assert_allclose(_np(output.reconstruction[1]), decoded_low[0], atol=2e-5)


def test_eqvae_branches_are_drawn_per_sample_with_the_papers_probabilities():
    regularizer = EQVAERegularizer(make_tiny_vae(), _config("eqvae"))
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(3)
    scales, turns = set(), set()
    for _ in range(400):
        plan = regularizer.draw_plan(8, 32, 32, generator)
        together = torch.cat([plan.equivariant, plan.low_resolution, plan.plain])
        assert sorted(together.tolist()) == list(range(8))
        counts += [plan.equivariant.numel(), plan.low_resolution.numel(), plan.plain.numel()]
        scales.add(plan.scale)
        turns.add(plan.quarter_turns)
    fractions = counts / counts.sum()
    # p_prior = 0.5 to the equivariance branch; of the rest, p_prior_s = 0.25 at low resolution
    np.testing.assert_allclose(fractions, [0.5, 0.125, 0.375], atol=0.02)
    assert scales <= set(EQVAE_SCALES) and len(scales) > 15
    assert turns == {1, 2, 3}


# --------------------------------------------------------------------------------------------
# Scale equivariance (FT-SE)
# --------------------------------------------------------------------------------------------


def test_scale_equivariance_target_is_the_downsampled_image():
    """Bilinear (half-pixel) downsampling by 2 averages 2x2 blocks; by 4 it averages the central 2x2 of each 4x4 block."""
    images = photo_crops(3, 32)
    x = _np(images).reshape(3, 3, 16, 2, 16, 2)
    np.testing.assert_allclose(_np(downsample(images, 2)), x.mean(axis=(3, 5)), atol=1e-6)
    x4 = _np(images).reshape(3, 3, 8, 4, 8, 4)[:, :, :, 1:3, :, 1:3]
    np.testing.assert_allclose(_np(downsample(images, 4)), x4.mean(axis=(3, 5)), atol=1e-6)


@pytest.mark.parametrize("factor, regularized", [(2, [0, 1, 2, 3]), (4, [1, 3])])
def test_scale_equivariance_loss_by_hand(deterministic_posterior, factor, regularized):
    vae = make_tiny_vae(latent_channels=4)
    regularizer = ScaleEquivarianceRegularizer(vae, _config("scale_equivariance", lambda_se=0.7, kl_weight=1e-3))
    pixels = photo_crops(4, 32)
    output = regularizer(pixels, plan=ScaleEquivariancePlan(torch.tensor(regularized), factor))

    def block_mean(a, f):  # bilinear downsampling written out (see the test above)
        b, c, h, w = a.shape
        blocks = a.reshape(b, c, h // f, f, w // f, f)
        middle = slice(f // 2 - 1, f // 2 + 1)
        return blocks[:, :, :, middle, :, middle].mean(axis=(3, 5))

    x = _np(pixels)
    z, kl = _encode(vae, x)
    full = _l1(_decode(vae, z), x) + 1e-3 * kl
    se = _l1(_decode(vae, block_mean(z[regularized], factor)), block_mean(x[regularized], factor))
    assert output.loss.item() == pytest.approx((full.sum() + 0.7 * se.sum()) / 4, rel=1e-5)
    assert output.se_mae.item() == pytest.approx(se.mean(), rel=1e-5)
    assert output.se_fraction.item() == len(regularized) / 4 and output.se_factor.item() == factor


def test_scale_equivariance_refuses_a_factor_that_does_not_divide_the_latent():
    regularizer = ScaleEquivarianceRegularizer(make_tiny_vae(), _config("scale_equivariance", scale_factors=(3,)))
    with pytest.raises(ValueError, match=r"factor 3.*`scale_factors`.*16x16"):
        regularizer(photo_crops(2, 32))


# --------------------------------------------------------------------------------------------
# Spectrum matching (ESM, DSM)
# --------------------------------------------------------------------------------------------


def _band_distribution_by_hand(images, num_bins, delta=0.0):
    """utils_DCT.py's pipeline in numpy/scipy: channel-mean DCT power, DC dropped, radial bands, (f^delta), log1p, normalize."""
    eps = 1e-8
    power = np.maximum((dctn(images, type=2, norm="ortho", axes=(-2, -1)) ** 2).mean(axis=1), eps)
    power[:, 0, 0] = 0.0
    h, w = power.shape[1:]
    radius = np.sqrt(np.arange(h)[:, None] ** 2 + np.arange(w)[None, :] ** 2)
    bins = np.clip(np.floor(radius / max(radius.max(), 1.0) * num_bins).astype(int), 0, num_bins - 1)
    bands = np.zeros((power.shape[0], num_bins))
    for b in range(num_bins):
        count = max((bins == b).sum(), 1)
        bands[:, b] = power[:, bins == b].sum(axis=1) / (count + eps)
    bands = bands * np.arange(1, num_bins + 1) ** delta
    logged = np.maximum(np.log(bands + eps + 1.0), 0.0)
    return logged / (logged.sum(axis=1, keepdims=True) + eps)


def _kl(p, q, eps=1e-8):
    return (p * (np.log(p + eps) - np.log(q + eps))).sum(axis=1)


def test_esm_loss_matches_a_by_hand_computation():
    images = photo_crops(3, 16)  # at the latent's size: the bicubic resize is the identity
    latents = torch.randn(3, 4, 16, 16) * 0.7 + 0.2
    got = esm_loss(images, latents, num_bins=16, delta=1.0)
    expected = _kl(_band_distribution_by_hand(_np(images), 16, delta=1.0), _band_distribution_by_hand(_np(latents), 16))
    np.testing.assert_allclose(_np(got), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_esm_loss_is_zero_when_the_latent_spectrum_is_the_flattened_image_spectrum(delta):
    """z built in the DCT domain with the image's channel-mean power times (band index)^delta: the loss vanishes."""
    images = photo_crops(2, 16)
    x = _np(images)
    power = (dctn(x, type=2, norm="ortho", axes=(-2, -1)) ** 2).mean(axis=1)  # (2, 16, 16)
    radius = np.sqrt(np.arange(16)[:, None] ** 2 + np.arange(16)[None, :] ** 2)
    band = np.clip(np.floor(radius / radius.max() * 16), 0, 15) + 1
    magnitude = np.sqrt(power * band**delta)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(2, 4, 16, 16))  # channels differ, power does not
    coefficients = signs * magnitude[:, None]
    coefficients[:, :, 0, 0] = 0.0
    latents = torch.from_numpy(idctn(coefficients, type=2, norm="ortho", axes=(-2, -1))).float()
    matched = esm_loss(images, latents, num_bins=16, delta=delta)
    assert matched.abs().max().item() < 1e-6
    other = esm_loss(images, torch.randn(2, 4, 16, 16), num_bins=16, delta=delta)
    assert (other > 1e-3).all()
    unflattened = esm_loss(images, latents, num_bins=16, delta=delta + 1.0)  # the wrong target
    assert (unflattened > 1e-4).all()


def test_dsm_mask_by_hand():
    """Each 8x8 block's DCT loses its k highest anti-diagonals (u + v >= 15 - k); k = 0 leaves the image as it is."""
    images = photo_crops(4, 32)
    levels = torch.tensor([0, 8, 10, 12])
    got = _np(block_dct_lowpass(images, levels, 8))
    x = _np(images).reshape(4, 3, 4, 8, 4, 8).transpose(0, 1, 2, 4, 3, 5)
    coefficients = dctn(x, type=2, norm="ortho", axes=(-2, -1))
    u = np.arange(8)
    for i, k in enumerate(levels.tolist()):
        if k:
            coefficients[i][..., (u[:, None] + u[None, :]) >= 15 - k] = 0.0
    expected = idctn(coefficients, type=2, norm="ortho", axes=(-2, -1)).transpose(0, 1, 2, 4, 3, 5).reshape(4, 3, 32, 32)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert torch.equal(block_dct_lowpass(images, levels, 8)[0], images[0])
    # level 12 keeps 6 of 64 coefficients per block, level 8 keeps 28: the higher the level, the stronger the low-pass
    same = images[1:2].expand(2, -1, -1, -1)
    strong, mild = _np(block_dct_lowpass(same, torch.tensor([12, 8]), 8) - same)
    assert np.abs(strong).mean() > np.abs(mild).mean() > 0


def test_spectrum_matching_loss_by_hand(deterministic_posterior):
    """ESM + DSM in one forward: λ_MAE |M_k(x) - D(M_k(z))|_1 + w_KL KL + esm_weight · KL(p_x || p_z)."""
    vae = make_tiny_vae(latent_channels=4, block_out_channels=(8, 8, 16))  # factor 4: 32 px -> 8 px latents
    config = _config(
        "spectrum_matching", esm_weight=0.5, delta=1.0, num_bins=4, pre_blur="never", kl_weight=1e-3,
        dsm_mask_levels=(0, 8, 10, 12),
    )  # fmt: skip
    regularizer = SpectrumMatchingRegularizer(vae, config)
    pixels = photo_crops(4, 32)
    levels = torch.tensor([0, 8, 12, 10])
    output = regularizer(pixels, plan=SpectrumMatchingPlan(levels))

    x = _np(pixels)
    z, kl = _encode(vae, x)
    with torch.no_grad():  # the image at the latent's size (8 px) by torch's bicubic resize
        small = _np(torch.nn.functional.interpolate(pixels, size=(8, 8), mode="bicubic", align_corners=False))
    esm = _kl(_band_distribution_by_hand(small, 4, delta=1.0), _band_distribution_by_hand(z, 4))

    def lowpass(a):  # the DSM mask in numpy, as in test_dsm_mask_by_hand
        b, c, h, w = a.shape
        blocks = a.reshape(b, c, h // 8, 8, w // 8, 8).transpose(0, 1, 2, 4, 3, 5)
        coefficients = dctn(blocks, type=2, norm="ortho", axes=(-2, -1))
        u = np.arange(8)
        for i, k in enumerate(levels.tolist()):
            if k:
                coefficients[i][..., (u[:, None] + u[None, :]) >= 15 - k] = 0.0
        return idctn(coefficients, type=2, norm="ortho", axes=(-2, -1)).transpose(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    pixel = _l1(_decode(vae, lowpass(z)), lowpass(x))
    assert output.loss.item() == pytest.approx((pixel + 1e-3 * kl + 0.5 * esm).mean(), rel=1e-5)
    assert output.esm.item() == pytest.approx(esm.mean(), rel=1e-4)
    assert output.dsm_fraction.item() == 0.75
    assert output.rec_mae.item() == pytest.approx(pixel[0], rel=1e-5)


@pytest.mark.parametrize(
    "pre_blur, factor, expected", [("auto", 8, False), ("auto", 2, True), ("never", 2, False), ("always", 8, True)]
)
def test_spectrum_matching_pre_blur_rule(pre_blur, factor, expected):
    """auto: the reference code's rule at 256 px (no blur for the factor-8 VAE whose latent is 32 px high)."""
    blocks = {2: (8, 16), 8: (8, 8, 16, 16)}[factor]
    regularizer = SpectrumMatchingRegularizer(
        make_tiny_vae(block_out_channels=blocks), _config("spectrum_matching", pre_blur=pre_blur)
    )
    assert regularizer.pre_blur() is expected


@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_lpips_minimum_sizes(net):
    """`LPIPS_MIN_SIZE` is the smallest square side each backbone accepts: one pixel less fails inside lpips."""
    from diffusers_ssreg.losses import LPIPS_MIN_SIZE, build_lpips

    model, size = build_lpips(net, pretrained_backbone=False), LPIPS_MIN_SIZE[net]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size), torch.zeros(1, 3, size, size)).shape[0] == 1
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, size - 1, size - 1), torch.zeros(1, 3, size - 1, size - 1))


@pytest.mark.parametrize(
    "name, overrides, size, pattern",
    [
        ("eqvae", {}, 64, r"LPIPS \('alex'\) needs.*31x31.*eqvae compares 16x16.*64x64.*smallest of `scales`, 0\.25"),
        ("scale_equivariance", {}, 64, r"31x31.*scale_equivariance compares 16x16.*largest of `scale_factors`, 4"),
        ("none", {}, 24, r"31x31.*none compares 24x24"),
        ("ssreg", {"lpips_net": "vgg"}, 8, r"LPIPS \('vgg'\) needs.*16x16.*ssreg compares 8x8"),
    ],
)
def test_images_too_small_for_lpips_fail_before_any_work(name, overrides, size, pattern):
    regularizer = build_regularizer(name, make_tiny_vae(), _config(name, lambda_lpips=0.1, **overrides))
    with pytest.raises(ValueError, match=pattern):
        regularizer(photo_crops(2, size))


def test_dsm_refuses_a_block_size_that_does_not_divide_the_latent():
    regularizer = SpectrumMatchingRegularizer(
        make_tiny_vae(block_out_channels=(8, 8, 16)), _config("spectrum_matching", dsm_mask_levels=(0, 8))
    )
    with pytest.raises(ValueError, match=r"`dsm_block_size`=8.*latent size 6x6"):
        regularizer(photo_crops(2, 24))


# --------------------------------------------------------------------------------------------
# The plain baseline
# --------------------------------------------------------------------------------------------


def test_plain_finetune_is_ssreg_with_alpha_zero_bit_for_bit():
    pixels = photo_crops(4, 32)
    plain = PlainFinetune(make_tiny_vae(), _config("none", kl_weight=1e-3))
    ssreg = StateSpaceRegularizer(make_tiny_vae(), _config("ssreg", alpha=0.0, kl_weight=1e-3))
    for seed in range(3):
        a = plain(pixels, generator=torch.Generator().manual_seed(seed))
        b = ssreg(pixels, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a.loss, b.loss)
    assert not any(True for _ in plain.buffers()) and plain.target_encoder is None
    assert [g["name"] for g in plain.parameter_groups(1e-4)] == ["vae"]


# --------------------------------------------------------------------------------------------
# Gradients reach what they should, and nothing else
# --------------------------------------------------------------------------------------------


def _frozen(name, vae, encoder_blocks=1, decoder_blocks=1):
    n_up = len(vae.decoder.up_blocks)
    prefixes = [f"encoder.down_blocks.{i}." for i in range(encoder_blocks)]
    prefixes += [f"decoder.up_blocks.{i}." for i in range(n_up - decoder_blocks, n_up)]
    return name.startswith(tuple(prefixes))


@pytest.mark.parametrize(
    "name, overrides, plan",
    [
        ("eqvae", {"scales": (0.5,)}, EQVAEPlan(torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3]), 0.5, 3)),
        ("scale_equivariance", {"scale_factors": (2,)}, ScaleEquivariancePlan(torch.tensor([0, 2]), 2)),
        ("spectrum_matching", {"dsm_mask_levels": (0, 8)}, SpectrumMatchingPlan(torch.tensor([0, 8, 8, 0]))),
        ("none", {}, None),
    ],
)
def test_gradients_reach_the_trainable_vae_weights_only(name, overrides, plan):
    vae = make_tiny_vae(latent_channels=4, block_out_channels=(8, 16, 16))
    regularizer = build_regularizer(name, vae, _config(name, lambda_lpips=0.1, **overrides))
    assert regularizer.lpips is not None  # AlexNet LPIPS: images of 31 px and more, hence 64 px crops
    regularizer(photo_crops(4, 64), generator=torch.Generator().manual_seed(0), plan=plan).loss.backward()
    for param_name, param in vae.named_parameters():
        if _frozen(param_name, vae):
            assert param.grad is None and not param.requires_grad, param_name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    own = {id(p) for p in vae.parameters()}
    for param_name, param in regularizer.named_parameters():  # LPIPS: frozen, no gradient
        if id(param) not in own:
            assert param.grad is None and not param.requires_grad, param_name
    groups = regularizer.parameter_groups(1e-4)
    assert [g["name"] for g in groups] == ["vae"]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for n, p in vae.named_parameters() if not _frozen(n, vae)}


def test_esm_gradient_reaches_the_encoder_only():
    """With the pixel and KL terms weighed 0, only ESM remains: encoder gradients, none for the decoder."""
    vae = make_tiny_vae(latent_channels=4)
    config = _config("spectrum_matching", lambda_mae=0.0, kl_weight=0.0, freeze_encoder_blocks=0, freeze_decoder_blocks=0)
    SpectrumMatchingRegularizer(vae, config)(photo_crops(4, 32)).loss.backward()
    for param_name, param in vae.named_parameters():
        if param_name.startswith(("encoder.", "quant_conv.")):
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
        else:
            assert param.grad is None or not param.grad.any(), param_name


# --------------------------------------------------------------------------------------------
# Clean removal (PEFT style), save / load
# --------------------------------------------------------------------------------------------


def _module_snapshot(model):
    """Per submodule: its plain attributes, parameter/buffer/child names and hook counts."""
    snapshot = {}
    for module_name, module in model.named_modules():
        plain = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        snapshot[module_name] = (
            type(module),
            sorted(vars(module)),
            repr(plain),
            sorted(module._parameters),
            sorted(module._buffers),
            sorted(module._modules),
            len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks),
        )
    return snapshot


@pytest.mark.parametrize("name", NAMES)
def test_unload_leaves_the_vae_clean(name):
    pixels = photo_crops(2, 64)  # AlexNet LPIPS measures the smallest (down)scaled images from 31 px up
    vae = make_tiny_vae(latent_channels=4)
    vae.decoder.conv_out.requires_grad_(False)  # a user's own freeze must survive
    config_before = copy.deepcopy(dict(vae.config))
    keys_before = list(vae.state_dict().keys())
    flags_before = {n: p.requires_grad for n, p in vae.named_parameters()}
    snapshot_before = _module_snapshot(vae)
    with torch.no_grad():
        out_before = vae(pixels).sample

    overrides = {"eqvae": {"scales": (0.5,)}, "scale_equivariance": {"scale_factors": (2,)}}.get(name, {})
    regularizer = build_regularizer(name, vae, _config(name, lambda_lpips=0.1, **overrides))
    assert any(not p.requires_grad for p in vae.encoder.down_blocks[0].parameters())  # it did freeze
    regularizer(pixels, generator=torch.Generator().manual_seed(0)).loss.backward()
    vae.zero_grad(set_to_none=True)
    returned = regularizer.unload()

    assert returned is vae
    assert dict(vae.config) == config_before
    assert list(vae.state_dict().keys()) == keys_before
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags_before
    assert _module_snapshot(vae) == snapshot_before
    with torch.no_grad():
        assert torch.equal(vae(pixels).sample, out_before)
    assert regularizer.unwrap() is vae  # the earlier name still works


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(tmp_path, name):
    pixels = photo_crops(4, 32)
    overrides = {"dsm_mask_levels": (0, 8, 10)} if name == "spectrum_matching" else {}
    regularizer = build_regularizer(name, make_tiny_vae(), _config(name, kl_weight=1e-4, **overrides))
    spec = REGULARIZERS[name]
    vae_dir = tmp_path / "vae"
    regularizer.vae.save_pretrained(str(vae_dir))
    with pytest.raises(ValueError, match=rf"`save_directory`.*AutoencoderKL.*'{spec.subfolder}'"):
        regularizer.save_pretrained(str(vae_dir))
    folder = vae_dir / spec.subfolder
    regularizer.save_pretrained(str(folder))
    saved = json.loads((folder / spec.config_class.config_name).read_text())
    assert saved["_regularizer"] == name  # the record names the method

    from diffusers import AutoencoderKL

    loaded = load_regularizer(str(vae_dir), AutoencoderKL.from_pretrained(str(vae_dir)), subfolder=spec.subfolder)
    assert type(loaded) is spec.regularizer_class
    assert loaded.config_to_save() == regularizer.config_to_save()
    state, state2 = regularizer.regularizer_state_dict(), loaded.regularizer_state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    a = regularizer(pixels, generator=torch.Generator().manual_seed(5)).loss
    b = loaded(pixels, generator=torch.Generator().manual_seed(5)).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # (a reloaded AutoencoderKL differs in the last bits)
    # the folder of one method is not another's
    other = next(n for n in NAMES if n != name)
    with pytest.raises(FileNotFoundError, match=REGULARIZERS[other].config_class.config_name):
        REGULARIZERS[other].regularizer_class.from_pretrained(str(folder), make_tiny_vae())
    with pytest.raises(ValueError, match=rf"regularizer '{name}', not '{other}'"):
        REGULARIZERS[other].config_class.from_json_file(str(folder / spec.config_class.config_name))


# --------------------------------------------------------------------------------------------
# Configs: the papers' defaults, validation, JSON
# --------------------------------------------------------------------------------------------


def test_defaults_are_each_papers_setting():
    eq = EQVAEConfig()  # train_eqvae/configs/eqvae_config.yaml and autoencoder.py of the authors' code
    assert (eq.equivariance_probability, eq.low_resolution_probability) == (0.5, 0.25)
    assert eq.scales == tuple(k / 32 for k in range(8, 32)) and eq.quarter_turns == (1, 2, 3) and not eq.antialias
    se = ScaleEquivarianceConfig()  # factors 2 and 4 (Skorokhodov et al.); the rest assumed, see docs/method.md
    assert se.scale_factors == (2, 4) and (se.lambda_se, se.probability, se.antialias) == (1.0, 1.0, False)
    sm = SpectrumMatchingConfig()  # ESM-AE of the authors' README and utils_DCT.py
    assert (sm.esm_weight, sm.delta, sm.num_bins, sm.pre_blur) == (0.01, 1.0, 16, "auto")
    assert (sm.pre_blur_kernel_size, sm.pre_blur_sigma, sm.dsm_mask_levels, sm.dsm_block_size) == (7, 1.2, (), 8)
    # what the paper's Table 1 holds fixed: the same reconstruction loss and frozen blocks for every method
    shared = ("lambda_mae", "lambda_lpips", "kl_weight", "lpips_net", "freeze_encoder_blocks", "freeze_decoder_blocks")
    for spec in REGULARIZERS.values():
        config = spec.config_class()
        assert tuple(getattr(config, f) for f in shared) == (1.0, 0.1, 1e-6, "vgg", 2, 2), spec.name


@pytest.mark.parametrize("name", NAMES)
def test_config_json_round_trip(tmp_path, name):
    config = _config(name, kl_weight=3e-6)
    path = config.save_pretrained(str(tmp_path))
    assert os.path.basename(path) == config.config_name
    loaded = type(config).from_pretrained(str(tmp_path))
    assert loaded == config
    assert dataclasses.asdict(loaded) == dataclasses.asdict(config)


@pytest.mark.parametrize(
    "config_class, kwargs, pattern",
    [
        (EQVAEConfig, {"equivariance_probability": 1.5}, r"`equivariance_probability`.*1\.5"),
        (EQVAEConfig, {"low_resolution_probability": -0.1}, r"`low_resolution_probability`.*-0\.1"),
        (EQVAEConfig, {"scales": (0.5, 1.5)}, r"`scales`.*1\.5"),
        (EQVAEConfig, {"scales": ()}, r"`scales`.*\(\)"),
        (EQVAEConfig, {"quarter_turns": (4,)}, r"`quarter_turns`.*\(4,\)"),
        (EQVAEConfig, {"kl_weight": -1.0}, r"`kl_weight`.*-1\.0"),
        (ScaleEquivarianceConfig, {"scale_factors": (1,)}, r"`scale_factors`.*\(1,\)"),
        (ScaleEquivarianceConfig, {"scale_factors": (2.0,)}, r"`scale_factors`.*\(2\.0,\)"),
        (ScaleEquivarianceConfig, {"lambda_se": -1}, r"`lambda_se`.*-1"),
        (ScaleEquivarianceConfig, {"probability": 2.0}, r"`probability`.*2\.0"),
        (ScaleEquivarianceConfig, {"freeze_decoder_blocks": -1}, r"`freeze_decoder_blocks`.*-1"),
        (SpectrumMatchingConfig, {"esm_weight": -0.01}, r"`esm_weight`.*-0\.01"),
        (SpectrumMatchingConfig, {"delta": float("inf")}, r"`delta`.*inf"),
        (SpectrumMatchingConfig, {"num_bins": 0}, r"`num_bins`.*0"),
        (SpectrumMatchingConfig, {"pre_blur": "sometimes"}, r"`pre_blur`.*'sometimes'"),
        (SpectrumMatchingConfig, {"pre_blur_kernel_size": 6}, r"`pre_blur_kernel_size`.*6"),
        (SpectrumMatchingConfig, {"pre_blur_sigma": 0.0}, r"`pre_blur_sigma`.*0\.0"),
        (SpectrumMatchingConfig, {"dsm_mask_levels": (0, 15)}, r"`dsm_mask_levels`.*14.*\(0, 15\)"),
        (SpectrumMatchingConfig, {"dsm_block_size": 1}, r"`dsm_block_size`.*1"),
        (PlainFinetuneConfig, {"lambda_mae": "1"}, r"`lambda_mae`.*'1'"),
        (PlainFinetuneConfig, {"lpips_net": "resnet"}, r"`lpips_net`.*'resnet'"),
    ],
)
def test_bad_config_values_name_the_field(config_class, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_class(**kwargs)


def test_a_bool_field_refuses_other_types():
    with pytest.raises(TypeError, match=r"`antialias`.*'yes'"):
        EQVAEConfig(antialias="yes")


def test_a_regularizer_refuses_another_methods_config():
    with pytest.raises(TypeError, match=r"`config` must be an EQVAEConfig, got SSRegConfig"):
        EQVAERegularizer(make_tiny_vae(), SSRegConfig())
    with pytest.raises(ValueError, match=r"unknown regularizer 'vqgan'.*'eqvae'"):
        build_regularizer("vqgan", make_tiny_vae())


# --------------------------------------------------------------------------------------------
# One flag: --regularizer and each method's prefixed fields
# --------------------------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser()
    add_regularizer_arguments(parser)
    return parser


def test_flags_build_the_chosen_methods_config():
    parser = _parser()
    args = parser.parse_args(["--regularizer", "eqvae", "--eqvae_scales", "0.5,0.75", "--eqvae_quarter_turns", "1"])
    config = regularizer_config_from_args(args, defaults={"freeze_encoder_blocks": 0})
    assert isinstance(config, EQVAEConfig)
    assert config.scales == (0.5, 0.75) and config.quarter_turns == (1,) and config.freeze_encoder_blocks == 0

    args = parser.parse_args(["--regularizer", "spectrum_matching", "--sm_dsm_mask_levels", "0,8,10,12", "--sm_esm_weight", "0"])
    config = regularizer_config_from_args(args)
    assert config.dsm_mask_levels == (0, 8, 10, 12) and config.esm_weight == 0.0

    args = parser.parse_args(["--regularizer", "scale_equivariance", "--se_scale_factors", "2", "--se_antialias", "true"])
    config = regularizer_config_from_args(args)
    assert config.scale_factors == (2,) and config.antialias is True

    args = parser.parse_args(["--regularizer", "none", "--plain_kl_weight", "0"])
    regularizer = regularizer_from_args(args, make_tiny_vae(), defaults=OFFLINE)
    assert isinstance(regularizer, PlainFinetune) and regularizer.config.kl_weight == 0.0

    args = parser.parse_args(["--ssreg_alpha", "0.5"])  # the default is SSReg, with the flags it always had
    assert args.regularizer == "ssreg" and regularizer_config_from_args(args) == SSRegConfig(alpha=0.5)


def test_flags_of_another_method_or_bad_values_are_clear_errors():
    parser = _parser()
    with pytest.raises(ValueError, match=r"--eqvae_scales is for --regularizer eqvae, but --regularizer is ssreg"):
        regularizer_config_from_args(parser.parse_args(["--eqvae_scales", "0.5"]))
    with pytest.raises(ValueError, match=r"--sm_\* flag.*`pre_blur`.*'sometimes'"):
        regularizer_config_from_args(parser.parse_args(["--regularizer", "spectrum_matching", "--sm_pre_blur", "sometimes"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--regularizer", "vqgan"])
    help_text = parser.format_help()
    for spec in REGULARIZERS.values():
        assert f"--{spec.flag_prefix}kl_weight" in help_text and spec.name in help_text
    assert "--eqvae_scales" in help_text and "(default: 0.25,0.28125," in help_text


# --------------------------------------------------------------------------------------------
# torch.compile sees the full-resolution shape only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eqvae", "scale_equivariance"])
def test_compiled_modules_see_only_the_full_resolution(name):
    """The downscaled branches run uncompiled: the compiler is only ever handed full-resolution inputs.

    A recording backend (dynamo tracing, no Inductor) collects the spatial size of every input a
    compiled module was traced for; with `eager_varying_shapes=False` the scaled sizes do reach it.
    """
    import torch._dynamo

    def run(eager_varying_shapes):
        torch._dynamo.reset()
        seen = set()

        def recorder(graph_module, example_inputs):
            # activations only: convolution weights (the other 4-D inputs) are 1x1 or 3x3
            activations = [t for t in example_inputs if torch.is_tensor(t) and t.ndim == 4 and t.shape[-1] > 3]
            seen.update(tuple(t.shape[-2:]) for t in activations)
            return graph_module.forward

        regularizer = build_regularizer(name, make_tiny_vae(), _config(name))
        regularizer.eager_varying_shapes = eager_varying_shapes
        for module in (regularizer.vae.encoder, regularizer.vae.decoder):
            module.compile(backend=recorder)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            regularizer(photo_crops(4, 32), generator=generator).loss.backward()
        torch._dynamo.reset()
        return {size[0] for size in seen}

    full = {32, 16}  # image and latent sides of 32 px images through a factor-2 VAE
    assert run(True) <= full
    assert run(False) - full  # the scaled branches' sizes, when they are handed to the compiler


@pytest.mark.parametrize("name", NAMES)
def test_compile_modules_compiles_what_each_method_runs(name, monkeypatch):
    """`finetune.compile_modules` (the scripts' --compile) compiles encoder, decoder, SSReg's EMA target and LPIPS when on."""
    from diffusers_ssreg.finetune import compile_modules

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *args, **kwargs: compiled.append(module))
    for lpips in (0.0, 0.1):
        compiled.clear()
        regularizer = build_regularizer(name, make_tiny_vae(), _config(name, lambda_lpips=lpips))
        compile_modules(regularizer)
        expected = [regularizer.vae.encoder, regularizer.vae.decoder]
        expected += [regularizer.target_encoder] if name == "ssreg" else []
        expected += [regularizer.lpips] if lpips else []
        assert len(compiled) == len(expected) and all(a is b for a, b in zip(compiled, expected)), (name, lpips)


@pytest.mark.parametrize("name", NAMES)
def test_every_output_survives_accelerate_mixed_precision(name, fresh_accelerate_state):
    """A bf16 prepared module's outputs are rebuilt by Accelerate from a mapping: every field must come through."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    overrides = {"spectrum_matching": {"dsm_mask_levels": (0, 8)}}.get(name, {})
    regularizer = accelerator.prepare(build_regularizer(name, make_tiny_vae(), _config(name, **overrides)))
    output = regularizer(photo_crops(4, 32), generator=torch.Generator().manual_seed(0))
    assert type(output) is REGULARIZERS[name].regularizer_class.forward.__annotations__["return"]
    assert output.loss.dtype == torch.float32
    assert output.loss.requires_grad and torch.isfinite(output.loss)
    scalars = output.scalars()
    assert {"loss", "rec_mae", "rec_lpips", "kl"} <= set(scalars)
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in scalars.values())
    output.loss.backward()
