"""Latent-structure analyses: blur dynamics and its coherence score, unmasking, spectra, statistics, figures."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_ssreg.basis import channel_frequency_order
from diffusers_ssreg.evaluation import (
    FourierCoefficientEncoder,
    blur_dynamics,
    blur_variances,
    channel_unmasking,
    fit_exponential,
    latent_power_spectrum,
    latent_statistics,
    latent_statistics_and_spectrum,
    log_to_tensorboard,
    plot_blur_dynamics,
    plot_latent_statistics,
    plot_power_spectrum,
    plot_unmasking,
    plot_unmasking_psnr,
)


torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Fixtures (kept in this file on purpose: no shared conftest)
# --------------------------------------------------------------------------------------------


def photo_images(size=64):
    """Four of scikit-image's bundled photos, resized to size x size, in [-1, 1]."""
    from skimage import data

    images = []
    for photo in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket()):
        image = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float() / 127.5 - 1
        images.append(F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(images).clamp(-1, 1)


def tiny_vae(seed=0, latent_channels=4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1,
    ).eval()


class PeriodicDFTEncoder:
    """Written independently of the package: real parts of the low-order 2D DFT coefficients of the luminance,
    channel n = (w, h) = (n mod W, n div W), as constant 2 x 2 latent maps. Under circular blur every coefficient
    is multiplied by the kernel's frequency response: an exact exponential in τ."""

    def __init__(self, grid=(2, 2)):
        self.grid = grid

    def __call__(self, pixel_values):
        height, width = self.grid
        coefficients = torch.fft.fft2(pixel_values.double().mean(1), norm="forward").real
        channels = torch.stack([coefficients[:, n // width, n % width] for n in range(height * width)], dim=1)
        return channels[:, :, None, None].expand(-1, -1, 2, 2).float()


@pytest.fixture(scope="module")
def photos():
    return photo_images()


# --------------------------------------------------------------------------------------------
# (a) blur dynamics
# --------------------------------------------------------------------------------------------


def test_fit_exponential_recovers_a_shared_rate():
    tau = blur_variances(64)
    t = torch.tensor(tau, dtype=torch.float64)
    rates = torch.tensor([0.002, 0.05, 0.5])
    starts = torch.tensor([[1.0, -2.0, 0.3], [0.5, 1.0, -0.7]])  # (N, C)
    ends = torch.tensor([[0.2, 0.1, 0.0], [-0.4, 0.3, 0.2]])
    values = ends[..., None] + (starts - ends)[..., None] * torch.exp(-rates[None, :, None].double() * t)
    fit = fit_exponential(values, tau)
    assert torch.all(fit.r2 > 0.9999)
    assert torch.allclose(fit.rate, rates, rtol=1e-3)
    assert torch.allclose(fit.fitted, values.float(), atol=1e-5)
    # A trajectory that goes up and down again is not one exponential.
    wiggle = torch.sin(torch.linspace(0, 3 * math.pi, len(tau)))[None, None].expand(3, 1, -1)
    assert float(fit_exponential(wiggle, tau).r2[0]) < 0.6


def test_fit_exponential_flags_static_channels():
    values = torch.ones(2, 2, 5)
    values[:, 1] += torch.linspace(0, 1, 5)
    fit = fit_exponential(values, [0, 1, 2, 4, 8])
    assert fit.static.tolist() == [True, False]
    assert math.isnan(float(fit.r2[0])) and fit.mean_r2 == pytest.approx(float(fit.r2[1]))


def test_blur_variances_span_and_errors():
    tau = blur_variances(256)
    assert len(tau) == 10 and tau[0] == 0 and tau[1] == pytest.approx(0.25) and tau[-1] == pytest.approx(64.0**2)
    assert all(b > a for a, b in zip(tau, tau[1:]))
    with pytest.raises(ValueError, match="num_steps"):
        blur_variances(64, num_steps=2)
    with pytest.raises(ValueError, match="max_sigma_fraction"):
        blur_variances(64, max_sigma_fraction=0.5)
    with pytest.raises(ValueError, match="min_sigma"):
        blur_variances(64, min_sigma=100)


def test_fourier_coefficient_encoders_score_near_perfect_coherence(photos):
    periodic = blur_dynamics(PeriodicDFTEncoder((2, 2)), photos, padding_mode="circular")
    assert periodic.coherence > 0.999
    assert periodic.mean_fit.static.tolist() == [True, False, False, False]  # the DC coefficient does not move
    # The package's reference encoder under the training blur (reflect padding = Neumann boundary).
    reflect = blur_dynamics(FourierCoefficientEncoder((4, 4)), photos)
    assert reflect.coherence > 0.999
    # Its fitted rates are those of the cosine frequencies, λ = |ω|²/2 with ω = π (w, h) / (S - 1), for the
    # channels that decay well within the sequence (channel 3 = (3, 0), channel 15 = (3, 3)).
    for channel, (w, h) in ((3, (3, 0)), (15, (3, 3))):
        expected = (math.pi / 63) ** 2 * (w**2 + h**2) / 2
        assert float(reflect.mean_fit.rate[channel]) == pytest.approx(expected, rel=0.02)


def test_random_encoder_scores_clearly_lower(photos):
    fourier = blur_dynamics(FourierCoefficientEncoder((2, 2)), photos).coherence
    for seed in (0, 1):
        result = blur_dynamics(tiny_vae(seed), photos)
        assert result.coherence < 0.95
        assert result.coherence < fourier - 0.05
        assert result.means.shape == (4, 4, 10) and result.energies.shape == (4, 4, 10)
        assert result.blurred.shape == (10, 3, 64, 64) and result.blurred.dtype == torch.uint8
    summary = result.to_dict()
    assert len(summary["channels"]) == 4 and summary["variances"] == result.variances


def test_blur_dynamics_rejects_bad_input(photos):
    with pytest.raises(ValueError, match="padding_mode"):
        blur_dynamics(FourierCoefficientEncoder(), photos, padding_mode="zeros")
    with pytest.raises(ValueError, match="num_images"):
        blur_dynamics(FourierCoefficientEncoder(), photos, num_images=0)
    with pytest.raises(ValueError, match="variances"):
        blur_dynamics(FourierCoefficientEncoder(), photos, variances=[0.0, 4.0])


# --------------------------------------------------------------------------------------------
# (b) unmasking, (c) spectra, (d) statistics
# --------------------------------------------------------------------------------------------


def test_channel_unmasking_on_a_tiny_vae(photos):
    result = channel_unmasking(tiny_vae(latent_channels=4), photos, num_images=3, num_strip_images=2)
    assert result.order == channel_frequency_order((2, 2))
    assert result.psnr.shape == (3, 4) and result.strip.shape == (2, 4, 3, 64, 64)
    assert torch.isinf(result.psnr_to_reconstruction[:, -1]).all()  # all channels revealed = the reconstruction
    assert result.to_dict()["basis_index"] == [[0, 0], [1, 0], [0, 1], [1, 1]]


def test_channel_unmasking_reveals_the_identity_step_by_step(photos):
    identity = (lambda x: x, lambda z: z)  # "latents" = the RGB channels, grid (1, 3)
    result = channel_unmasking(identity, photos, mask_value="zero", num_images=2)
    assert result.order == [0, 1, 2] and result.grid == (1, 3)
    assert torch.all(result.psnr[:, 1] > result.psnr[:, 0]) and torch.isinf(result.psnr[:, 2]).all()
    with pytest.raises(ValueError, match="permutation"):
        channel_unmasking(identity, photos, order=[0, 0, 1])
    with pytest.raises(ValueError, match="mask_value"):
        channel_unmasking(identity, photos, mask_value="noise")
    with pytest.raises(TypeError, match="autoencoder"):
        channel_unmasking(lambda x: x, photos)


def power_law_images(exponent, size=64, count=4, seed=0):
    """Random fields whose power spectrum falls as f^-exponent, scaled into [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.fft.fft2(torch.randn(count, 3, size, size, generator=generator, dtype=torch.float64))
    f = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.fftfreq(size)[None, :] ** 2)
    field = torch.fft.ifft2(noise * f.clamp_min(1 / size) ** (-exponent / 2)).real
    return (field / field.abs().amax(dim=(1, 2, 3), keepdim=True)).float()


@pytest.mark.parametrize("exponent", [0.0, 2.0])
def test_power_spectrum_slope_of_power_law_fields(exponent):
    images = power_law_images(exponent)
    spectrum = latent_power_spectrum(lambda x: x, images)  # identity "encoder": latents = pixels
    assert spectrum.psd.shape == (3, 32) and spectrum.frequencies[-1] == pytest.approx(0.5)
    assert spectrum.mean_slope == pytest.approx(-exponent, abs=0.2)
    assert spectrum.image_slope == pytest.approx(-exponent, abs=0.2)


def test_latent_statistics_are_exact(photos):
    def encoder(x):
        return torch.cat([x, 2 * x + 1], dim=1)

    stats = latent_statistics(encoder, photos, batch_size=3)
    latents = encoder(photos).double()
    assert torch.allclose(stats.mean.double(), latents.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(stats.std.double(), latents.transpose(0, 1).flatten(1).std(dim=1, unbiased=False), atol=1e-6)
    assert stats.global_mean == pytest.approx(float(latents.mean()), abs=1e-6)
    assert stats.scaling_factor == pytest.approx(1 / float(latents.std(unbiased=False)), rel=1e-5)
    assert stats.shift_factor == pytest.approx(float(latents.mean()), abs=1e-6)
    assert stats.num_images == 4 and stats.latent_shape == (6, 64, 64)


def test_analyses_on_a_tiny_vae_write_their_figures(tmp_path, photos):
    vaes = {"vae-a": tiny_vae(0), "vae-b": tiny_vae(1)}
    blur = {name: blur_dynamics(vae, photos, num_images=2, num_steps=5) for name, vae in vaes.items()}
    blur["Fourier"] = blur_dynamics(FourierCoefficientEncoder((2, 2)), photos, num_images=2, num_steps=5)
    unmask = {name: channel_unmasking(vae, photos, num_images=2) for name, vae in vaes.items()}
    pairs = {name: latent_statistics_and_spectrum(vae, photos, batch_size=2) for name, vae in vaes.items()}
    stats = {name: pair[0] for name, pair in pairs.items()}
    spectra = {name: pair[1] for name, pair in pairs.items()}
    assert stats["vae-a"].configured_scaling_factor == pytest.approx(0.18215)
    figures = {
        "blur_dynamics": plot_blur_dynamics(blur, tmp_path / "blur_dynamics.png"),
        "unmasking": plot_unmasking(unmask, tmp_path / "unmasking.png"),
        "unmasking_psnr": plot_unmasking_psnr(unmask, tmp_path / "unmasking_psnr.png"),
        "spectrum": plot_power_spectrum(spectra, tmp_path / "spectrum.png"),
        "statistics": plot_latent_statistics(stats, tmp_path / "statistics.png"),
    }
    for name in ("blur_dynamics", "unmasking", "unmasking_psnr", "spectrum", "statistics"):
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "logs")) as writer:
        log_to_tensorboard(writer, {"coherence": blur["vae-a"].coherence, "skipped": math.nan}, figures, step=3)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").iterdir())
    with pytest.raises(TypeError, match="BlurDynamicsResult"):
        plot_blur_dynamics({"x": stats["vae-a"]})
