"""StateSpaceRegularizer on a tiny AutoencoderKL and real photo crops (CPU, offline).

Covers training behaviour (loss, gradients, sparsity of A, EMA rule, frozen blocks, parameter
groups), saving/loading, the clean removal of the regularizer (PEFT-style), the export of a stock
VAE, input validation and LPIPS' offline error.
"""

import copy
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import fast_config, make_tiny_vae
from diffusers_ssreg import (
    REGULARIZER_SUBFOLDER,
    SSRegConfig,
    StateSpaceRegularizer,
    transition_mask,
    transition_matrix,
)


# lpips builds its AlexNet through torchvision's deprecated `pretrained=` argument
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


def _train(regularizer, pixel_values, steps, lr=1e-3, seed=0):
    """`steps` AdamW steps with an EMA update after each; returns the losses."""
    optimizer = torch.optim.AdamW(regularizer.parameter_groups(lr))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    regularizer.train()
    for _ in range(steps):
        output = regularizer(pixel_values, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        regularizer.update_ema()
        losses.append(output.loss.item())
    return losses


def _eval_loss(regularizer, pixel_values, seed=123):
    with torch.no_grad():
        return regularizer(pixel_values, generator=torch.Generator().manual_seed(seed)).loss.item()


def _frozen_prefixes(vae, encoder_blocks, decoder_blocks):
    """Parameter-name prefixes of the blocks A.5 freezes, derived from the VAE's block structure."""
    n_up = len(vae.decoder.up_blocks)
    prefixes = [f"encoder.down_blocks.{i}." for i in range(encoder_blocks)]
    prefixes += [f"decoder.up_blocks.{i}." for i in range(n_up - decoder_blocks, n_up)]
    return tuple(prefixes)


# --------------------------------------------------------------------------------------------
# Training behaviour
# --------------------------------------------------------------------------------------------


def test_loss_is_finite_and_falls(photo_batch):
    """30 AdamW steps (lr 1e-3) on real photos, LPIPS (random AlexNet backbone) included."""
    vae = make_tiny_vae()
    regularizer = StateSpaceRegularizer(
        vae, fast_config(lambda_lpips=0.1, freeze_encoder_blocks=1, freeze_decoder_blocks=1)
    )
    assert regularizer.lpips is not None
    before = _eval_loss(regularizer, photo_batch)
    losses = _train(regularizer, photo_batch, steps=30)
    after = _eval_loss(regularizer, photo_batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("basis, latent_channels, use_quant_conv", [("legendre", 8, True), ("fourier", 4, False)])
def test_gradients_reach_encoder_decoder_A_and_delta(photo_batch, basis, latent_channels, use_quant_conv):
    vae = make_tiny_vae(latent_channels=latent_channels, use_quant_conv=use_quant_conv)
    regularizer = StateSpaceRegularizer(vae, fast_config(basis=basis, alpha=1.0))
    assert regularizer.transition_values.numel() > 0
    output = regularizer(photo_batch, generator=torch.Generator().manual_seed(0))
    assert output.reg_fraction.item() == 1.0
    assert output.latent_mse.item() > 0
    output.loss.backward()

    frozen = _frozen_prefixes(vae, 2, 2)
    for name, param in vae.named_parameters():
        if name.startswith(frozen):
            assert param.grad is None, name
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.encoder.conv_out.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert bool((regularizer.transition_values.grad != 0).all())
    assert regularizer.log_delta.grad is not None and regularizer.log_delta.grad.item() != 0.0
    for param in regularizer.target_encoder.parameters():  # stop-gradient target (A.5)
        assert param.grad is None and not param.requires_grad


def test_only_the_nonzero_pattern_of_A_changes(photo_batch):
    vae = make_tiny_vae(latent_channels=16)  # grid (4, 4): Legendre A has 16 nonzero entries of 256
    regularizer = StateSpaceRegularizer(vae, fast_config(basis="legendre", alpha=1.0))
    mask = transition_mask("legendre", (4, 4))
    initial = transition_matrix("legendre", (4, 4))
    torch.testing.assert_close(regularizer.transition_matrix().detach(), initial, rtol=0, atol=0)
    delta_before = regularizer.delta.item()

    _train(regularizer, photo_batch, steps=4)
    A = regularizer.transition_matrix().detach()
    assert torch.equal(A[~mask], torch.zeros(int((~mask).sum())))
    assert bool((A[mask] != initial[mask]).all())
    assert regularizer.delta.item() != delta_before and regularizer.delta.item() > 0


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_target_follows_the_decay_rule(photo_batch, decay):
    """First update copies (diffusers' EMAModel), then target = d * target + (1 - d) * online."""
    vae = make_tiny_vae()
    regularizer = StateSpaceRegularizer(
        vae, fast_config(ema_decay=decay, alpha=0.5, freeze_encoder_blocks=1, freeze_decoder_blocks=1)
    )
    online = {n: p for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))}
    target = dict(regularizer.target_encoder.named_parameters())
    assert set(online) == set(target)
    for name in online:  # starts as a copy of the encoder
        assert torch.equal(online[name], target[name])

    optimizer = torch.optim.AdamW(regularizer.parameter_groups(1e-3))
    generator = torch.Generator().manual_seed(0)
    expected = None
    for step in range(3):
        loss = regularizer(photo_batch, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        for param in target.values():
            assert param.grad is None
        optimizer.step()
        snapshot = {n: p.detach().clone() for n, p in online.items()}
        if expected is None:
            expected = snapshot
        else:
            expected = {n: decay * expected[n] + (1 - decay) * snapshot[n] for n in expected}
        regularizer.update_ema()
        assert int(regularizer.ema_step) == step + 1
        for name in online:
            torch.testing.assert_close(target[name], expected[name], rtol=1e-6, atol=1e-8)
    # the target lags behind the trained encoder
    changed = online["encoder.conv_out.weight"]
    assert not torch.allclose(target["encoder.conv_out.weight"], changed, rtol=0, atol=1e-7)
    assert not regularizer.target_encoder.training


def test_frozen_blocks_stay_bit_identical(photo_batch):
    vae = make_tiny_vae(block_out_channels=(8, 8, 16))
    regularizer = StateSpaceRegularizer(vae, fast_config(alpha=0.5))  # freeze 2 + 2 of 3 + 3 blocks
    frozen = _frozen_prefixes(vae, 2, 2)
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    _train(regularizer, photo_batch, steps=3)
    changed = 0
    for name, param in vae.named_parameters():
        if name.startswith(frozen):
            assert torch.equal(param, before[name]), name
            assert not param.requires_grad
        else:
            changed += not torch.equal(param, before[name])
    assert changed > 0
    # the unfrozen blocks (encoder down block 2, decoder up block 0) did train
    for name in ("encoder.down_blocks.2.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"):
        assert not torch.equal(vae.get_parameter(name), before[name]), name


def test_parameter_groups():
    vae = make_tiny_vae()
    regularizer = StateSpaceRegularizer(
        vae, fast_config(lambda_lpips=0.1, ssm_lr_scale=0.3, freeze_encoder_blocks=1, freeze_decoder_blocks=2)
    )
    groups = regularizer.parameter_groups(2e-4, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["vae", "ssm"]
    vae_group, ssm_group = groups
    assert vae_group["lr"] == 2e-4 and vae_group["weight_decay"] == 0.05
    assert ssm_group["lr"] == pytest.approx(0.3 * 2e-4) and ssm_group["weight_decay"] == 0.0

    frozen = _frozen_prefixes(vae, 1, 2)
    expected_vae = {id(p) for n, p in vae.named_parameters() if not n.startswith(frozen)}
    assert {id(p) for p in vae_group["params"]} == expected_vae
    assert len(vae_group["params"]) == len(expected_vae)
    assert {id(p) for p in ssm_group["params"]} == {id(regularizer.transition_values), id(regularizer.log_delta)}
    excluded = {id(p) for p in regularizer.target_encoder.parameters()}
    excluded |= {id(p) for p in regularizer.lpips.parameters()}
    everything = {id(p) for g in groups for p in g["params"]}
    assert not everything & excluded
    # together, the groups are exactly the regularizer's trainable parameters
    assert everything == {id(p) for p in regularizer.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"`base_lr`.*0"):
        regularizer.parameter_groups(0)


def test_alpha_zero_is_plain_reconstruction(photo_batch):
    vae = make_tiny_vae()
    regularizer = StateSpaceRegularizer(vae, fast_config(alpha=0.0, freeze_encoder_blocks=1, freeze_decoder_blocks=1))
    A_before = regularizer.transition_values.detach().clone()
    log_delta_before = regularizer.log_delta.detach().clone()
    assert [g["name"] for g in regularizer.parameter_groups(1e-3)] == ["vae"]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(regularizer.parameter_groups(1e-3))
    for _ in range(3):
        output = regularizer(photo_batch, generator=generator)
        assert output.latent_mse.item() == 0.0 and output.reg_fraction.item() == 0.0
        assert output.reg_mae.item() == 0.0 and output.rec_mae.item() > 0
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    assert torch.equal(regularizer.transition_values, A_before)
    assert torch.equal(regularizer.log_delta, log_delta_before)
    assert regularizer.transition_values.grad is None and regularizer.log_delta.grad is None


def test_plain_branch_loss_by_hand(photo_batch):
    """alpha = 0: loss = mean(λ_MAE |x - D(z)|_1 + w_KL KL), recomputed from the VAE directly."""
    vae = make_tiny_vae()
    regularizer = StateSpaceRegularizer(vae, fast_config(alpha=0.0, lambda_mae=2.0, kl_weight=1e-3))
    output = regularizer(photo_batch, generator=torch.Generator().manual_seed(3), return_reconstruction=True)
    posterior = vae.encode(photo_batch).latent_dist
    z = posterior.sample(generator=torch.Generator().manual_seed(3))
    decoded = vae.decode(z).sample
    torch.testing.assert_close(output.reconstruction, decoded)
    mae = (decoded - photo_batch).abs().mean(dim=(1, 2, 3))
    expected = (2.0 * mae + 1e-3 * posterior.kl()).mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mean_centering, discretization, reference_resolution",
    [(True, "zoh", None), (False, "euler", None), (True, "zoh", 16)],
)
def test_regularization_branch_by_hand(photo_batch, mean_centering, discretization, reference_resolution):
    """alpha = 1 and τ_max = Δ_I (so τ1 = 0, τ2 = Δ_I): eqs. 22-24 recomputed with numpy/scipy.

    The posterior is made deterministic (logvar = -30) so z1 is the posterior mean. Legendre A is
    upper triangular: applying Ā transposed, forgetting the mean, or adding the KL term would show.
    """
    from scipy import ndimage
    from scipy.linalg import expm

    vae = make_tiny_vae(latent_channels=8)
    with torch.no_grad():  # moments = (mean, logvar): logvar = -30 -> std = exp(-15)
        vae.quant_conv.weight[8:].zero_()
        vae.quant_conv.bias[8:].fill_(-30.0)
    delta_tau = 2.0 if reference_resolution is None else 1.0
    config = fast_config(
        basis="legendre",
        alpha=1.0,
        tau_max=delta_tau,
        delta_tau=delta_tau,
        reference_resolution=reference_resolution,
        mean_centering=mean_centering,
        discretization=discretization,
        lambda_z=0.7,
        lambda_image=1.3,
        lambda_mae=0.9,
    )
    regularizer = StateSpaceRegularizer(vae, config)
    output = regularizer(photo_batch, generator=torch.Generator().manual_seed(0), return_reconstruction=True)

    # τ2 at 32 px: Δ_I (no scaling) or Δ_I (32 / 16)² = 4 Δ_I
    tau2 = delta_tau * (1.0 if reference_resolution is None else (32 / reference_resolution) ** 2)
    pixels = photo_batch.double().numpy()
    target = ndimage.gaussian_filter(
        pixels, sigma=tau2**0.5, mode="mirror", radius=int(np.ceil(3 * tau2**0.5)), axes=(2, 3)
    )
    with torch.no_grad():  # the EMA target is still a copy of the encoder
        z1 = vae.encode(photo_batch).latent_dist.mean.double().numpy()
        z2 = vae.encode(torch.from_numpy(target).float()).latent_dist.mean.double().numpy()
    A = transition_matrix("legendre", (2, 4), dtype=torch.float64).numpy()
    A_bar = expm(0.1 * A) if discretization == "zoh" else np.eye(8) + 0.1 * A  # Δ = delta_init = 0.1
    if mean_centering:  # eq. 24
        mean1 = z1.mean(axis=(2, 3), keepdims=True)
        driven, z2 = z1 - mean1, z2 - z2.mean(axis=(2, 3), keepdims=True)
    else:
        mean1, driven = 0.0, z1
    predicted = np.zeros_like(driven)
    for k in range(8):  # row k of Ā updates channel k from every channel n (mode-1 product)
        for n in range(8):
            predicted[:, k] += A_bar[k, n] * driven[:, n]
    z_hat = mean1 + predicted
    latent_mse = ((predicted - z2) ** 2).mean(axis=(1, 2, 3))
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(z_hat).float()).sample.double().numpy()
    mae = np.abs(decoded - target).mean(axis=(1, 2, 3))

    np.testing.assert_allclose(output.reconstruction.detach().double().numpy(), decoded, rtol=0, atol=2e-5)
    assert output.reg_fraction.item() == 1.0
    assert output.latent_mse.item() == pytest.approx(latent_mse.mean(), rel=1e-4)
    assert output.reg_mae.item() == pytest.approx(mae.mean(), rel=1e-4)
    assert output.loss.item() == pytest.approx((0.7 * latent_mse + 1.3 * 0.9 * mae).mean(), rel=1e-4)


def test_branch_is_drawn_per_sample_with_probability_alpha(photo_batch):
    regularizer = StateSpaceRegularizer(make_tiny_vae(), fast_config(alpha=0.25))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fractions = [regularizer(photo_batch, generator=generator).reg_fraction.item() for _ in range(30)]
    # 120 Bernoulli(0.25) draws: mean 0.25, standard deviation 0.04; mixed batches occur
    assert abs(np.mean(fractions) - 0.25) < 0.12
    assert any(0.0 < f < 1.0 for f in fractions)


def test_lpips_only_built_when_weighted(photo_batch):
    import lpips

    without = StateSpaceRegularizer(make_tiny_vae(), fast_config(lambda_lpips=0.0))
    assert without.lpips is None
    assert not any(isinstance(m, lpips.LPIPS) for m in without.modules())
    output = without(photo_batch, generator=torch.Generator().manual_seed(0))
    assert output.rec_lpips.item() == 0.0 and output.reg_lpips.item() == 0.0

    with_lpips = StateSpaceRegularizer(make_tiny_vae(), fast_config(lambda_lpips=0.1, alpha=0.5))
    assert isinstance(with_lpips.lpips, lpips.LPIPS)
    with_lpips.train()
    assert not with_lpips.lpips.training
    assert not any(p.requires_grad for p in with_lpips.lpips.parameters())
    output = with_lpips(photo_batch, generator=torch.Generator().manual_seed(0))
    assert output.rec_lpips.item() > 0 or output.reg_lpips.item() > 0


# --------------------------------------------------------------------------------------------
# Saving and loading the regularizer's state
# --------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, photo_batch):
    from diffusers import AutoencoderKL

    vae = make_tiny_vae(latent_channels=8)
    regularizer = StateSpaceRegularizer(vae, fast_config(basis="legendre", alpha=0.5, ema_decay=0.9))
    _train(regularizer, photo_batch, steps=3)

    vae_dir, ssreg_dir = tmp_path / "vae", tmp_path / "vae" / REGULARIZER_SUBFOLDER
    vae.save_pretrained(str(vae_dir))
    regularizer.save_pretrained(str(ssreg_dir))
    saved_config = json.loads((ssreg_dir / "ssreg_config.json").read_text())
    assert saved_config["grid"] == [2, 4]  # the resolved default grid of 8 channels

    vae2 = AutoencoderKL.from_pretrained(str(vae_dir))
    loaded = StateSpaceRegularizer.from_pretrained(str(ssreg_dir), vae2)
    assert loaded.vae is vae2
    assert loaded.config == SSRegConfig.from_dict({**regularizer.config.to_dict(), "grid": [2, 4]})
    state, state2 = regularizer.regularizer_state_dict(), loaded.regularizer_state_dict()
    assert state.keys() == state2.keys()
    for key in state:
        assert torch.equal(state[key], state2[key]), key
    assert int(loaded.ema_step) == 3
    torch.testing.assert_close(loaded.transition_matrix(), regularizer.transition_matrix(), rtol=0, atol=0)

    loss = regularizer(photo_batch, generator=torch.Generator().manual_seed(11)).loss
    loss2 = loaded(photo_batch, generator=torch.Generator().manual_seed(11)).loss
    assert torch.equal(loss, loss2)


def test_load_into_a_mismatched_basis_fails(tmp_path):
    regularizer = StateSpaceRegularizer(make_tiny_vae(latent_channels=8), fast_config(basis="legendre"))
    regularizer.save_pretrained(str(tmp_path))
    # Chebyshev/Legendre/Hermite share their pattern on a (2, 4) grid; Fourier's is the diagonal
    for basis in ("fourier", "chebyshev"):  # chebyshev: same pattern as legendre, caught by the saved config
        other = StateSpaceRegularizer(make_tiny_vae(latent_channels=8), fast_config(basis=basis))
        with pytest.raises(ValueError, match=rf"basis='legendre'.*basis='{basis}'"):
            other.load_regularizer_state(str(tmp_path))
    # without the config file, the stored sparsity pattern still catches a different pattern
    os.remove(tmp_path / "ssreg_config.json")
    other = StateSpaceRegularizer(make_tiny_vae(latent_channels=8), fast_config(basis="fourier"))
    with pytest.raises(ValueError, match=r"pattern.*'fourier'"):
        other.load_regularizer_state(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ssreg_config.json"):
        StateSpaceRegularizer.from_pretrained(str(tmp_path / "missing"), make_tiny_vae(latent_channels=8))


def test_save_pretrained_refuses_a_vae_folder(tmp_path):
    vae = make_tiny_vae()
    vae.save_pretrained(str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    regularizer = StateSpaceRegularizer(vae, fast_config())
    with pytest.raises(ValueError, match=r"`save_directory`.*AutoencoderKL"):
        regularizer.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


# --------------------------------------------------------------------------------------------
# Clean removal (PEFT style) and export
# --------------------------------------------------------------------------------------------


def _module_snapshot(model):
    """Per submodule: its plain attributes, parameter/buffer/child names and hook counts."""
    snapshot = {}
    for name, module in model.named_modules():
        plain = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        snapshot[name] = (
            type(module),
            sorted(vars(module)),
            repr(plain),
            sorted(module._parameters),
            sorted(module._buffers),
            sorted(module._modules),
            len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks),
        )
    return snapshot


@pytest.mark.parametrize("latent_channels, use_quant_conv", [(4, True), (8, False), (16, True)])
def test_unwrap_leaves_the_vae_clean(photo_batch, latent_channels, use_quant_conv):
    vae = make_tiny_vae(latent_channels=latent_channels, use_quant_conv=use_quant_conv)
    vae.decoder.conv_out.requires_grad_(False)  # a user's own freeze must survive
    config_before = copy.deepcopy(dict(vae.config))
    keys_before = list(vae.state_dict().keys())
    flags_before = {n: p.requires_grad for n, p in vae.named_parameters()}
    snapshot_before = _module_snapshot(vae)
    with torch.no_grad():
        out_before = vae(photo_batch).sample

    regularizer = StateSpaceRegularizer(vae, fast_config(lambda_lpips=0.1))
    assert any(not p.requires_grad for p in vae.encoder.down_blocks[0].parameters())  # it did freeze
    returned = regularizer.unwrap()

    assert returned is vae
    assert dict(vae.config) == config_before
    assert list(vae.state_dict().keys()) == keys_before
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags_before
    assert _module_snapshot(vae) == snapshot_before
    with torch.no_grad():
        out_after = vae(photo_batch).sample
    assert torch.equal(out_before, out_after)


def test_exported_vae_is_a_stock_autoencoderkl(tmp_path, photo_batch):
    vae = make_tiny_vae()
    regularizer = StateSpaceRegularizer(vae, fast_config(alpha=0.5, freeze_encoder_blocks=1, freeze_decoder_blocks=1))
    _train(regularizer, photo_batch, steps=3)
    vae = regularizer.unwrap()
    vae.eval()
    export_dir, plain_dir = tmp_path / "export", tmp_path / "plain"
    vae.save_pretrained(str(export_dir))
    make_tiny_vae().save_pretrained(str(plain_dir))

    assert sorted(os.listdir(export_dir)) == sorted(os.listdir(plain_dir))
    exported = json.loads((export_dir / "config.json").read_text())
    plain = json.loads((plain_dir / "config.json").read_text())
    assert set(exported) == set(plain)
    assert not any("ssreg" in key for key in exported)
    assert not set(exported) & {f for f in SSRegConfig.__dataclass_fields__}

    torch.save(photo_batch, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = vae(photo_batch).sample
    script = textwrap.dedent(
        """
        import sys
        import torch
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
        pixels = torch.load(sys.argv[2])
        with torch.no_grad():
            torch.save(vae(pixels).sample, sys.argv[3])
        assert "diffusers_ssreg" not in sys.modules, "diffusers_ssreg was imported"
        print("stock-load-ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script, str(export_dir), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stock-load-ok" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_grid_that_does_not_fit_the_latent_channels():
    with pytest.raises(ValueError, match=r"`grid`=\(2, 3\).*latent_channels=4"):
        StateSpaceRegularizer(make_tiny_vae(latent_channels=4), fast_config(grid=(2, 3)))


def test_model_that_is_not_an_autoencoderkl():
    with pytest.raises(TypeError, match=r"`vae`.*Linear"):
        StateSpaceRegularizer(torch.nn.Linear(3, 3), fast_config())


def test_config_that_is_not_an_ssregconfig():
    with pytest.raises(TypeError, match=r"`config`.*dict"):
        StateSpaceRegularizer(make_tiny_vae(), {"alpha": 0.5})


def test_more_frozen_blocks_than_the_vae_has():
    with pytest.raises(ValueError, match=r"`freeze_encoder_blocks`=3.*2"):
        StateSpaceRegularizer(make_tiny_vae(), fast_config(freeze_encoder_blocks=3))


@pytest.fixture(scope="module")
def input_checker():
    return StateSpaceRegularizer(make_tiny_vae(), fast_config())


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda x: x * 1.5, ValueError, r"`pixel_values`.*\[-1, 1\].*\[-1\.\d+, 1\.\d+\]"),
        (lambda x: (x + 1) * 127.5, ValueError, r"`pixel_values`.*\[-1, 1\].*255"),
        (lambda x: x[0], ValueError, r"`pixel_values`.*\(batch_size, 3, height, width\).*\(3, 32, 32\)"),
        (lambda x: x[:, :1], ValueError, r"`pixel_values`.*\(batch_size, 3, height, width\).*\(4, 1, 32, 32\)"),
        (lambda x: x.index_fill(2, torch.tensor([5]), float("nan")), ValueError, r"`pixel_values`.*NaN"),
        (lambda x: ((x + 1) * 127.5).to(torch.uint8), TypeError, r"`pixel_values`.*torch\.uint8"),
        (lambda x: x.long(), TypeError, r"`pixel_values`.*torch\.int64"),
        (lambda x: x.numpy(), TypeError, r"`pixel_values`.*ndarray"),
    ],
    ids=["range", "0-255", "rank", "channels", "nan", "uint8", "int64", "numpy"],
)
def test_bad_pixel_values(input_checker, photo_batch, make, error, pattern):
    with pytest.raises(error, match=pattern):
        input_checker(make(photo_batch))


# --------------------------------------------------------------------------------------------
# LPIPS offline
# --------------------------------------------------------------------------------------------


def test_build_lpips_offline_names_the_weight_file_and_the_cache(tmp_path, monkeypatch):
    import torchvision

    from diffusers_ssreg.losses import build_lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() follows $TORCH_HOME
    weight_file = os.path.basename(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url)
    assert not os.path.exists(os.path.join(tmp_path, "hub", "checkpoints", weight_file))
    with pytest.raises(RuntimeError) as info:
        build_lpips("alex", pretrained_backbone=True)
    message = str(info.value)
    assert weight_file in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert re.search(r"lambda_lpips=0", message)


def test_output_survives_accelerate_mixed_precision(photo_batch, fresh_accelerate_state):
    """A bf16 prepared module's outputs are rebuilt by Accelerate from a mapping: every field must come through."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    regularizer = accelerator.prepare(StateSpaceRegularizer(make_tiny_vae(), fast_config(alpha=1.0)))
    output = regularizer(photo_batch, generator=torch.Generator().manual_seed(0))
    assert type(output).__name__ == "SSRegOutput"
    assert output.loss.dtype == torch.float32 and output.loss.requires_grad
    assert output.reg_fraction.item() == 1.0 and output.latent_mse.item() > 0
    assert set(output.scalars()) >= {"loss", "rec_mae", "kl", "latent_mse", "reg_mae", "reg_lpips", "delta"}
    output.loss.backward()


def test_build_lpips_hides_torchvision_deprecation_notices_of_lpips_own_call():
    """lpips passes torchvision's deprecated `pretrained=`; users should not see that on every run."""
    import warnings

    from diffusers_ssreg.losses import build_lpips

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_lpips("alex", pretrained_backbone=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not [w for w in caught if "pretrained" in str(w.message) or "weight enum" in str(w.message)]
