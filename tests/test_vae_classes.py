"""The supported VAE classes, AutoencoderKL and AutoencoderKLFlux2, through every regularizer (CPU, offline).

For the FLUX.2 VAE: diffusers' encode/decode leave its BatchNorm alone, so the regularizers see the same
posterior latents as for an AutoencoderKL and training never touches the BatchNorm's statistics; every
regularizer attaches, trains and unloads cleanly; both classes save to folders that stock diffusers reloads
in a process that never imports the package; the class check names the supported classes.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_flux2_vae, make_tiny_vae, photo_crops, save_unsupported_vae_config
from diffusers_ssreg import REGULARIZERS, StateSpaceRegularizer, build_regularizer
from diffusers_ssreg.basis import channel_to_basis_index
from diffusers_ssreg.latent_statistics import apply_latent_statistics, estimate_latent_statistics
from diffusers_ssreg.vae import SUPPORTED_VAE_CLASSES, check_vae_instance, load_vae, load_vae_config


pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")

NAMES = list(REGULARIZERS)


def _config(name, **overrides):
    kwargs = dict(lambda_lpips=0.0, lpips_net="alex", lpips_pretrained_backbone=False, freeze_encoder_blocks=1,
                  freeze_decoder_blocks=1)  # fmt: skip
    kwargs.update(overrides)
    return REGULARIZERS[name].config_class(**kwargs)


def _bn_state(vae):
    return {k: v.clone() for k, v in vae.bn.state_dict().items()}


def _module_snapshot(model):
    """Per submodule: its plain attributes, parameter/buffer/child names and hook counts."""
    snapshot = {}
    for module_name, module in model.named_modules():
        plain = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        snapshot[module_name] = (type(module), sorted(vars(module)), repr(plain), sorted(module._parameters),
                                 sorted(module._buffers), sorted(module._modules),
                                 len(module._forward_hooks) + len(module._forward_pre_hooks))  # fmt: skip
    return snapshot


def test_flux2_encode_and_decode_work_on_the_latents_before_the_batchnorm():
    """What the regularizers rely on: encode gives the posterior of quant_conv(encoder(x)), decode inverts neither BN nor patches."""
    vae = make_tiny_flux2_vae().train()
    pixels = photo_crops(2, 32)

    def refuse(*args, **kwargs):
        raise AssertionError("the BatchNorm was called")

    vae.bn.forward = refuse  # any use of the BatchNorm by encode/decode would fail here
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
        moments = vae.quant_conv(vae.encoder(pixels))
        torch.testing.assert_close(posterior.mean, moments.chunk(2, dim=1)[0], rtol=0, atol=0)
        assert posterior.mean.shape == (2, 8, 16, 16)  # the raw latent channels, not 4 x 8 patchified ones
        decoded = vae.decode(posterior.mean).sample
        torch.testing.assert_close(decoded, vae.decoder(vae.post_quant_conv(posterior.mean)), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_every_regularizer_trains_a_flux2_vae_and_unloads_cleanly(name):
    pixels = photo_crops(2, 64)
    vae = make_tiny_flux2_vae(latent_channels=8)
    apply_latent_statistics(vae, estimate_latent_statistics(vae, photo_crops(4, 32), 1, 4))  # non-trivial BN buffers
    vae.decoder.conv_out.requires_grad_(False)  # a user's own freeze must survive
    config_before, keys_before = copy.deepcopy(dict(vae.config)), list(vae.state_dict())
    flags_before = {n: p.requires_grad for n, p in vae.named_parameters()}
    snapshot_before, bn_before = _module_snapshot(vae), _bn_state(vae)
    with torch.no_grad():
        out_before = vae(pixels).sample

    overrides = {"eqvae": {"scales": (0.5,)}, "scale_equivariance": {"scale_factors": (2,)}}.get(name, {})
    regularizer = build_regularizer(name, vae, _config(name, **overrides))
    regularizer.train()
    optimizer = torch.optim.SGD([g for g in regularizer.parameter_groups(1e-3)], lr=1e-3)
    for step in range(2):
        output = regularizer(pixels, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(output.loss) and output.loss.dtype == torch.float32
        output.loss.backward()
        assert vae.encoder.conv_out.weight.grad is not None and vae.encoder.conv_out.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in vae.encoder.down_blocks[0].parameters())  # the frozen block
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        regularizer.update_ema()
    # training moved the weights, never the BatchNorm's statistics (no forward pass runs it)
    assert not torch.equal(vae.encoder.conv_out.weight, make_tiny_flux2_vae(latent_channels=8).encoder.conv_out.weight)
    for key, value in _bn_state(vae).items():
        assert torch.equal(value, bn_before[key]), key

    returned = regularizer.unload()
    assert returned is vae
    assert dict(vae.config) == config_before
    assert list(vae.state_dict()) == keys_before
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags_before
    assert _module_snapshot(vae) == snapshot_before
    with torch.no_grad():
        assert not torch.equal(vae(pixels).sample, out_before)  # trained, not restored: the weights are the VAE's


def test_unload_of_an_untrained_flux2_regularizer_gives_identical_outputs():
    pixels = photo_crops(2, 32)
    vae = make_tiny_flux2_vae()
    with torch.no_grad():
        before = vae(pixels).sample
    regularizer = StateSpaceRegularizer(vae, _config("ssreg"))
    regularizer(pixels, generator=torch.Generator().manual_seed(0)).loss.backward()
    vae.zero_grad(set_to_none=True)
    assert regularizer.unload() is vae
    with torch.no_grad():
        assert torch.equal(vae(pixels).sample, before)


def test_ssreg_default_grid_of_the_32_channel_flux2_vae_is_4_rows_by_8_columns():
    regularizer = StateSpaceRegularizer(make_tiny_flux2_vae(latent_channels=32, block_out_channels=(8, 16)), _config("ssreg"))
    assert regularizer.grid == (4, 8)
    assert [channel_to_basis_index(n, regularizer.grid) for n in (0, 7, 8, 31)] == [(0, 0), (7, 0), (0, 1), (7, 3)]
    A = regularizer.transition_matrix().detach()
    assert torch.equal(A, torch.diag(torch.diagonal(A)))  # Fourier: diagonal, DC entry 0
    assert A[0, 0] == 0 and A.min() == -1.0
    explicit = StateSpaceRegularizer(make_tiny_flux2_vae(latent_channels=32), _config("ssreg", grid=(8, 4)))
    assert explicit.grid == (8, 4)


def test_regularizers_refuse_another_class_naming_the_supported_ones():
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny(encoder_block_out_channels=(4,), decoder_block_out_channels=(4,), num_encoder_blocks=(1,),
                           num_decoder_blocks=(1,), latent_channels=4)  # fmt: skip
    for name in NAMES:
        with pytest.raises(TypeError, match=r"`vae` must be a diffusers autoencoder of a supported class "
                                            r"\(AutoencoderKL, AutoencoderKLFlux2\), got .*AutoencoderTiny"):  # fmt: skip
            build_regularizer(name, tiny, _config(name))
    with pytest.raises(TypeError, match="AutoencoderTiny"):
        check_vae_instance(tiny)
    assert set(SUPPORTED_VAE_CLASSES) == {"AutoencoderKL", "AutoencoderKLFlux2"}


def test_class_check_of_the_loading_helper(tmp_path):
    flux2 = make_tiny_flux2_vae()
    flux2.save_pretrained(tmp_path / "flux2")
    loaded = load_vae(str(tmp_path / "flux2"))
    assert type(loaded) is type(flux2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), flux2.state_dict().values()))
    assert type(load_vae(str(tmp_path / "flux2"), from_config=True)).__name__ == "AutoencoderKLFlux2"
    cosmos = save_unsupported_vae_config(tmp_path / "cosmos")
    with pytest.raises(ValueError, match=r"--vae '.*cosmos' holds a model of class AutoencoderKLCosmos; supported VAE "
                                         r"classes: AutoencoderKL, AutoencoderKLFlux2\."):  # fmt: skip
        load_vae(cosmos, flag="--vae")
    # a caller that rebuilds the VAE as an AutoencoderKL (the DiT scripts) keeps the default: AutoencoderKL only
    with pytest.raises(ValueError, match="holds a model of class AutoencoderKLFlux2; supported VAE classes: AutoencoderKL\\."):
        load_vae_config(str(tmp_path / "flux2"))
    assert load_vae_config(str(tmp_path / "flux2"), classes=SUPPORTED_VAE_CLASSES)["latent_channels"] == 8


STOCK_RELOAD = """
import json, sys
import torch
from safetensors.torch import load_file
import diffusers

torch.set_num_threads(1)  # the test's own thread count: the same reduction order
folder, expected_path = sys.argv[1], sys.argv[2]
expected = load_file(expected_path)
info = json.load(open(expected_path + ".json"))
vae = getattr(diffusers, info["class"]).from_pretrained(folder).eval()
assert type(vae).__name__ == info["class"], type(vae)
with torch.no_grad():
    latents = vae.encode(expected["pixels"]).latent_dist.mode()
    decoded = vae.decode(latents).sample
torch.testing.assert_close(latents, expected["latents"], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(decoded, expected["decoded"], rtol=1e-5, atol=1e-5)
for key, value in info["config"].items():
    assert vae.config[key] == value, (key, vae.config[key], value)
if hasattr(vae, "bn"):
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(vae.bn, key), expected["bn." + key]), key
assert "diffusers_ssreg" not in sys.modules
print("stock reload ok", type(vae).__name__)
"""


@pytest.mark.parametrize("kind", ["AutoencoderKL", "AutoencoderKLFlux2"])
def test_trained_vae_saves_and_reloads_in_stock_diffusers(tmp_path, kind):
    from safetensors.torch import save_file

    pixels = photo_crops(2, 32)
    vae = make_tiny_vae(latent_channels=4) if kind == "AutoencoderKL" else make_tiny_flux2_vae(latent_channels=4)
    if kind == "AutoencoderKL":
        vae.register_to_config(shift_factor=0.1)  # the FLUX.1 convention: shift and scale are recomputed
    regularizer = StateSpaceRegularizer(vae, _config("ssreg", alpha=0.5))
    optimizer = torch.optim.AdamW(regularizer.parameter_groups(1e-3))
    regularizer(pixels, generator=torch.Generator().manual_seed(0)).loss.backward()
    optimizer.step()
    vae = regularizer.unload()
    apply_latent_statistics(vae, estimate_latent_statistics(vae, photo_crops(4, 32), 1, 4))
    vae.save_pretrained(tmp_path / "vae")
    regularizer.save_pretrained(tmp_path / "vae" / "ssreg")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["_class_name"] == kind and not any("ssreg" in k or "tau" in k or "alpha" in k for k in saved)

    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        expected = {"pixels": pixels, "latents": latents, "decoded": vae.decode(latents).sample}
    config = {}
    if kind == "AutoencoderKL":
        config = {"scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}
        assert config["shift_factor"] != 0.1 and config["scaling_factor"] != 0.18215  # recomputed
    else:
        expected.update({f"bn.{k}": getattr(vae.bn, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")})
        assert not torch.equal(vae.bn.running_var, torch.ones_like(vae.bn.running_var))
    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "expected.safetensors"))
    (tmp_path / "expected.safetensors.json").write_text(json.dumps({"class": kind, "config": config}))

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    script = tmp_path / "reload.py"
    script.write_text(STOCK_RELOAD)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "vae"), str(tmp_path / "expected.safetensors")],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stock reload ok {kind}" in result.stdout
