"""Gaussian blur (Sec. 4.2, A.3) and the (τ1, τ2) sampler (A.5) on real photos.

References are independent of the package: scipy.ndimage's Gaussian filter, the adjoint of a
symmetric circular convolution, and the closed-form CDF of the τ1 density.
"""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from conftest import photo_crops
from diffusers_ssreg import gaussian_blur, resolution_scale, sample_tau_pairs


# torch's padding modes in scipy.ndimage's words: torch "reflect" mirrors about the edge pixel.
SCIPY_MODE = {"reflect": "mirror", "circular": "wrap", "replicate": "nearest"}


@pytest.fixture
def photos64():
    return photo_crops(batch_size=3, size=64, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The blur itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("variance", [0.5, 3.0, 10.0])
def test_matches_scipy_gaussian_filter(photos64, padding_mode, variance):
    """Same sampled, normalized kernel of half-width ceil(3σ) and the same boundary as scipy.ndimage."""
    sigma = math.sqrt(variance)
    radius = int(math.ceil(3 * sigma))
    ours = gaussian_blur(photos64, variance, padding_mode=padding_mode).numpy()
    ref = ndimage.gaussian_filter(
        photos64.numpy(), sigma=sigma, mode=SCIPY_MODE[padding_mode], radius=radius, axes=(2, 3)
    )
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_variance_is_additive_away_from_borders(photos64):
    """G_a * G_b = G_(a+b): blurring twice equals one blur of the summed variance (interior only)."""
    a, b = 2.0, 3.0
    twice = gaussian_blur(gaussian_blur(photos64, a), b)
    once = gaussian_blur(photos64, a + b)
    margin = sum(int(math.ceil(3 * math.sqrt(v))) for v in (a, b, a + b))
    inner = (Ellipsis, slice(margin, -margin), slice(margin, -margin))
    error = (twice - once)[inner].abs().max().item()
    assert error < 2e-3  # only the 3σ truncation of the kernels separates them
    # sensitivity: a variance off by 1 is an order of magnitude further away
    wrong = (twice - gaussian_blur(photos64, a + b - 1.0))[inner].abs().max().item()
    assert wrong > 10 * error


def test_variance_zero_is_the_exact_identity(photos64):
    assert torch.equal(gaussian_blur(photos64, 0.0), photos64)
    # also inside a batch that blurs other samples with a wider kernel
    out = gaussian_blur(photos64, torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64))
    assert torch.equal(out[0], photos64[0]) and torch.equal(out[2], photos64[2])
    assert not torch.allclose(out[1], photos64[1])


def test_per_sample_variances_equal_separate_calls(photos64):
    variances = torch.tensor([0.7, 2.5, 6.0], dtype=torch.float64)
    batched = gaussian_blur(photos64, variances)
    half_width = int(math.ceil(3 * math.sqrt(6.0)))  # the batch's kernel half-width
    for i in range(3):
        alone = gaussian_blur(photos64[i : i + 1], variances[i].item(), max_half_width=half_width)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-12)
        # with its own (narrower) kernel, the difference is only the Gaussian tail beyond 3σ
        own = gaussian_blur(photos64[i : i + 1], variances[i].item())
        torch.testing.assert_close(batched[i : i + 1], own, rtol=0, atol=1e-2)
    # and the samples really got different blurs
    assert not torch.allclose(batched[1], gaussian_blur(photos64[1:2], 6.0)[0])


def test_mean_is_preserved(photos64):
    means = photos64.mean(dim=(2, 3))
    circular = gaussian_blur(photos64, 5.0, padding_mode="circular")
    torch.testing.assert_close(circular.mean(dim=(2, 3)), means, rtol=0, atol=1e-12)
    reflect = gaussian_blur(photos64, 5.0, padding_mode="reflect")
    torch.testing.assert_close(reflect.mean(dim=(2, 3)), means, rtol=0, atol=5e-3)
    assert not torch.allclose(reflect, photos64, atol=1e-2)  # it did blur


def test_gradient_is_the_adjoint_blur(photos64):
    """A circular convolution with a symmetric kernel is self-adjoint: d<w, G x>/dx = G w."""
    x = photos64.clone().requires_grad_(True)
    weights = torch.randn_like(photos64)
    (weights * gaussian_blur(x, 3.0, padding_mode="circular")).sum().backward()
    torch.testing.assert_close(x.grad, gaussian_blur(weights, 3.0, padding_mode="circular"), rtol=0, atol=1e-12)


def test_gradcheck_reflect_image_and_variance():
    x = photo_crops(batch_size=2, size=8, dtype=torch.float64)[:, :1].requires_grad_(True)
    variance = torch.tensor([0.8, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda img, var: gaussian_blur(img, var, padding_mode="reflect"), (x, variance))


def test_bfloat16_keeps_dtype(photos64):
    x = photos64.to(torch.bfloat16)
    out = gaussian_blur(x, 3.0)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    reference = gaussian_blur(x.double(), 3.0)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=3e-2)


def test_bad_input():
    x = photo_crops(batch_size=2, size=16)
    with pytest.raises(ValueError, match=r"`variance`.*-1\.0"):
        gaussian_blur(x, -1.0)
    with pytest.raises(ValueError, match=r"`variance`.*nan"):
        gaussian_blur(x, float("nan"))
    with pytest.raises(ValueError, match=r"`variance`.*\(2,\).*\(3,\)"):
        gaussian_blur(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"`images`.*\(3, 16, 16\)"):
        gaussian_blur(x[0], 1.0)
    with pytest.raises(ValueError, match=r"`images`.*list"):
        gaussian_blur([x], 1.0)
    with pytest.raises(ValueError, match=r"`padding_mode`.*'zeros'"):
        gaussian_blur(x, 1.0, padding_mode="zeros")
    # variance 30 needs a half-width of ceil(3 sqrt(30)) = 17 px > 16 px: reflect padding can't provide it
    with pytest.raises(ValueError, match=r"half-width of 17.*reflect.*16x16"):
        gaussian_blur(x, 30.0)
    assert gaussian_blur(x, 30.0, padding_mode="replicate").shape == x.shape


# --------------------------------------------------------------------------------------------
# The τ sampler and resolution scaling
# --------------------------------------------------------------------------------------------


def _tau1_cdf(tau_max, delta_tau):
    """CDF of p(x) = 2/s - 2x/s² on [0, s], s = τ_max - Δ_I: F(x) = 2x/s - x²/s²."""
    s = tau_max - delta_tau

    def cdf(x):
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, s)
        return 2 * x / s - x**2 / s**2

    return cdf


@pytest.mark.parametrize("tau_max, delta_tau", [(10.0, 4.0), (3.0, 1.0)])
def test_tau1_follows_the_linear_density(tau_max, delta_tau):
    generator = torch.Generator().manual_seed(1234)
    tau1, tau2 = sample_tau_pairs(5000, tau_max, delta_tau, generator=generator)
    assert tau1.shape == tau2.shape == (5000,) and tau1.dtype == torch.float32
    samples = tau1.double().numpy()
    assert samples.min() >= 0.0 and samples.max() <= tau_max - delta_tau
    cdf = _tau1_cdf(tau_max, delta_tau)
    assert stats.kstest(samples, cdf).pvalue > 1e-3
    # the test has power: a uniform draw on the same interval is rejected
    uniform = np.random.default_rng(0).uniform(0, tau_max - delta_tau, 5000)
    assert stats.kstest(uniform, cdf).pvalue < 1e-6
    # the density's mean is s / 3
    assert samples.mean() == pytest.approx((tau_max - delta_tau) / 3, rel=0.03)
    torch.testing.assert_close(tau2 - tau1, torch.full_like(tau1, delta_tau), rtol=0, atol=1e-5)


def test_tau_pairs_scale_and_generator():
    base1, base2 = sample_tau_pairs(64, 10.0, 4.0, generator=torch.Generator().manual_seed(7))
    s1, s2 = sample_tau_pairs(64, 10.0, 4.0, scale=0.25, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, 0.25 * base1)
    torch.testing.assert_close(s2, 0.25 * base2)
    torch.testing.assert_close(s2 - s1, torch.full_like(s1, 1.0), rtol=0, atol=1e-6)
    other, _ = sample_tau_pairs(64, 10.0, 4.0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, base1)


def test_tau_pairs_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"delta_tau=5\.0.*tau_max=4\.0"):
        sample_tau_pairs(4, tau_max=4.0, delta_tau=5.0)
    with pytest.raises(ValueError, match=r"delta_tau=0"):
        sample_tau_pairs(4, tau_max=4.0, delta_tau=0)


@pytest.mark.parametrize(
    "height, width, reference, expected",
    [
        (256, 256, 256, 1.0),
        (512, 512, 256, 4.0),
        (128, 128, 256, 0.25),
        (128, 512, 256, 1.0),
        (32, 32, 256, 1 / 64),
        (64, 64, None, 1.0),
    ],
)
def test_resolution_scale(height, width, reference, expected):
    """Variances scale by (R / reference)² with R = sqrt(H W), so a blur covers the same image fraction."""
    assert resolution_scale(height, width, reference) == pytest.approx(expected)


def test_resolution_scaling_blurs_the_same_fraction():
    """A 2x upsampled photo blurred with 4x the variance, then subsampled, equals the blurred photo (interior)."""
    small = photo_crops(batch_size=1, size=64, dtype=torch.float64)
    variance = 2.0
    large = torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest")
    scale = resolution_scale(128, 128, 64)
    assert scale == 4.0
    blurred_large = gaussian_blur(large, variance * scale)
    blurred_small = gaussian_blur(small, variance)
    # average each 2x2 cell back to the small grid; nearest upsampling + blur + box-downsampling = blur
    # of a slightly wider kernel, so compare the interior loosely against a variance-1 mismatch
    down = torch.nn.functional.avg_pool2d(blurred_large, 2)
    inner = (Ellipsis, slice(12, -12), slice(12, -12))
    error = (down - blurred_small)[inner].abs().max().item()
    wrong = (down - gaussian_blur(small, variance + 1.0))[inner].abs().max().item()
    assert error < 0.02 and error < wrong / 4
