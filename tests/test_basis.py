"""Transition matrices (App. A.4), grids (eq. 41), frequency order (A.6) and discretization (eqs. 18-20).

Expected values are computed here from the paper's formulas written out by hand, from the basis
functions themselves (Gauss quadrature of numpy's Chebyshev/Legendre/Hermite polynomials), from
a DFT of a really blurred photo, and from scipy's matrix exponential: never from the package.
"""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev, hermite, legendre
from scipy.linalg import expm

from conftest import photo_crops
from diffusers_ssreg import (
    BASES,
    channel_frequency_order,
    channel_to_basis_index,
    default_grid,
    discretize,
    gaussian_blur,
    transition_mask,
    transition_matrix,
)
from diffusers_ssreg.basis import validate_grid


POLYNOMIAL_BASES = ("chebyshev", "legendre", "hermite")
GRIDS = [(2, 3), (3, 2), (3, 3), (4, 4), (2, 4), (1, 7)]


# --------------------------------------------------------------------------------------------
# The appendix formulas, written out by hand
# --------------------------------------------------------------------------------------------


def q_appendix(basis, j, k):
    """<φ_j, φ_k> in the weighted inner product: eqs. 58 (Chebyshev), 65 (Legendre), 74 (Hermite)."""
    if j != k:
        return 0.0
    if basis == "chebyshev":
        return math.pi if k == 0 else math.pi / 2
    if basis == "legendre":
        return 2.0 / (2 * k + 1)
    if basis == "hermite":
        return math.sqrt(math.pi) * 2**k * math.factorial(k)
    raise AssertionError(basis)


def p_appendix(basis, j, k):
    """<φ_j, φ_k''> in the weighted inner product: eqs. 59, 66, 75."""
    if basis == "chebyshev":
        return math.pi / 2 * k * (k**2 - j**2) if (j <= k - 2 and (k - j) % 2 == 0) else 0.0
    if basis == "legendre":
        return float(k * (k + 1) - j * (j + 1)) if (j <= k - 2 and (k - j) % 2 == 0) else 0.0
    if basis == "hermite":
        if k < 2 or j != k - 2:
            return 0.0
        return 4 * k * (k - 1) * math.sqrt(math.pi) * 2 ** (k - 2) * math.factorial(k - 2)
    raise AssertionError(basis)


def iota(n, width):
    """Eq. 41 with 0-based n: n -> (n mod W, n div W)."""
    return n % width, n // width


def A_appendix(basis, height, width):
    """Unnormalized A, entry [k, n] = 1/2 <∇²φ_n, φ_k> (eq. 40), by explicit loops over rows and columns."""
    size = height * width
    A = np.zeros((size, size))
    for k in range(size):  # row: the coefficient that changes
        w1, h1 = iota(k, width)
        for n in range(size):  # column: the coefficient that drives it
            w2, h2 = iota(n, width)
            if basis == "fourier":  # eq. 46
                lap = -4 * width * height * math.pi**2 * (w1**2 / width**2 + h1**2 / height**2) if k == n else 0.0
            else:  # eqs. 55, 60, 71: (H/W) p(w1,w2) q(h1,h2) + (W/H) q(w1,w2) p(h1,h2)
                lap = (height / width) * p_appendix(basis, w1, w2) * q_appendix(basis, h1, h2) + (
                    width / height
                ) * q_appendix(basis, w1, w2) * p_appendix(basis, h1, h2)
            A[k, n] = 0.5 * lap
    return A


# --------------------------------------------------------------------------------------------
# The same inner products from the polynomials themselves (Gauss quadrature, exact for polynomials)
# --------------------------------------------------------------------------------------------

_QUADRATURE = {
    # basis: (polynomial class, nodes/weights of its weight function ω)
    "chebyshev": (chebyshev.Chebyshev, chebyshev.chebgauss),  # ω = 1/sqrt(1-u²) (eq. 53)
    "legendre": (legendre.Legendre, legendre.leggauss),  # ω = 1
    "hermite": (hermite.Hermite, hermite.hermgauss),  # physicists' H_m, ω = exp(-u²) (the norm of eq. 74)
}


def _polynomials(basis, degree, points=16):
    cls, rule = _QUADRATURE[basis]
    nodes, weights = rule(points)
    values = np.stack([cls.basis(m)(nodes) for m in range(degree)])
    second = np.stack([cls.basis(m).deriv(2)(nodes) for m in range(degree)])
    return values, second, weights


@pytest.mark.parametrize("basis", POLYNOMIAL_BASES)
def test_appendix_1d_inner_products_match_the_polynomials(basis):
    """Eqs. 58-59, 65-66, 74-75 (as written out above) are the true weighted inner products."""
    degree = 6
    values, second, weights = _polynomials(basis, degree)
    for j in range(degree):
        for k in range(degree):
            q = np.sum(weights * values[j] * values[k])
            p = np.sum(weights * values[j] * second[k])
            np.testing.assert_allclose(q, q_appendix(basis, j, k), rtol=1e-10, atol=1e-9)
            np.testing.assert_allclose(p, p_appendix(basis, j, k), rtol=1e-10, atol=1e-8)


def _laplacian_inner_product_2d(basis, height, width, row, col):
    """<φ_row, ∇²φ_col> on [0, W] x [0, H] by 2D tensor-product quadrature in pixel coordinates (x, y).

    φ_(w,h)(x, y) = φ_w(a x / W - b) φ_h(a y / H - b) (eqs. 47, 61-62, 69) with (a, b) = (2, 1) on
    [-1, 1] and (4, 2) for Hermite; ∂²/∂x² = (a/W)² d²/du² (chain rule) and dx dy = (W/a)(H/a) du dv.
    """
    a = 4.0 if basis == "hermite" else 2.0
    values, second, weights = _polynomials(basis, max(height, width))
    (w1, h1), (w2, h2) = iota(row, width), iota(col, width)
    u_part = values[w1][:, None] * weights[:, None]  # axis 0: u (x), axis 1: v (y)
    v_part = values[h1][None, :] * weights[None, :]
    lap_col = (a / width) ** 2 * second[w2][:, None] * values[h2][None, :] + (a / height) ** 2 * values[w2][
        :, None
    ] * second[h2][None, :]
    return (width / a) * (height / a) * np.sum(u_part * v_part * lap_col)


@pytest.mark.parametrize("basis", POLYNOMIAL_BASES)
@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (3, 4)])
def test_separable_sum_matches_2d_quadrature(basis, grid):
    """The separable form (H/W) p q + (W/H) q p equals the 2D integral of φ_k ∇²φ_n in (x, y)."""
    height, width = grid
    expected = A_appendix(basis, height, width)
    size = height * width
    for k in range(size):
        for n in range(size):
            integral = 0.5 * _laplacian_inner_product_2d(basis, height, width, k, n)
            np.testing.assert_allclose(expected[k, n], integral, rtol=1e-9, atol=1e-8)


# --------------------------------------------------------------------------------------------
# transition_matrix against the appendix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("basis", ("fourier",) + POLYNOMIAL_BASES)
@pytest.mark.parametrize("grid", GRIDS)
def test_transition_matrix_entries_match_appendix(basis, grid):
    height, width = grid
    expected = A_appendix(basis, height, width)
    raw = transition_matrix(basis, grid, normalize=False, dtype=torch.float64).numpy()
    assert raw.shape == (height * width, height * width)
    np.testing.assert_allclose(raw, expected, rtol=1e-12, atol=1e-12)

    normalized = transition_matrix(basis, grid, dtype=torch.float64).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(normalized, expected / scale, rtol=1e-12, atol=1e-15)
    assert np.abs(normalized).max() == pytest.approx(1.0, abs=1e-12)  # Fig. 7 caption


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (4, 4)])
def test_fourier_is_diagonal_with_zero_dc_and_eq41_order(grid):
    """Fourier A is diagonal, A_00 = 0, and A_nn ∝ -(w²/W² + h²/H²) with (w, h) = (n mod W, n div W)."""
    height, width = grid
    A = transition_matrix("fourier", grid, normalize=False, dtype=torch.float64).numpy()
    assert np.count_nonzero(A - np.diag(np.diag(A))) == 0
    assert A[0, 0] == 0.0
    indices = [iota(n, width) for n in range(A.shape[0])]
    diag = np.array([-(w**2 / width**2 + h**2 / height**2) for w, h in indices])
    # one common positive factor, 2 π² W H (eq. 46 times 1/2)
    np.testing.assert_allclose(np.diag(A), 2 * math.pi**2 * width * height * diag, rtol=1e-12)


def test_non_square_grids_put_w_on_the_width_axis():
    """(2, 3) and (3, 2) differ: channel n holds (w, h) = (n mod W, n div W), w weighted by 1/W² (eq. 46)."""
    a = transition_matrix("fourier", (2, 3), normalize=False, dtype=torch.float64).diagonal()
    b = transition_matrix("fourier", (3, 2), normalize=False, dtype=torch.float64).diagonal()
    # by hand, A_nn = -2 π² W H (w²/W² + h²/H²), W H = 6:
    # grid (H, W) = (2, 3): channel 1 = (1, 0) -> -2π² 6/9 = -4π²/3; channel 3 = (0, 1) -> -2π² 6/4 = -3π²
    # grid (H, W) = (3, 2): channel 1 = (1, 0) -> -2π² 6/4 = -3π²; channel 2 = (0, 1) -> -2π² 6/9 = -4π²/3
    assert a[1].item() == pytest.approx(-4 * math.pi**2 / 3)
    assert a[3].item() == pytest.approx(-3 * math.pi**2)
    assert b[1].item() == pytest.approx(-3 * math.pi**2)
    assert b[2].item() == pytest.approx(-4 * math.pi**2 / 3)


# --------------------------------------------------------------------------------------------
# Sparsity patterns
# --------------------------------------------------------------------------------------------


def _expected_pattern(basis, height, width):
    size = height * width
    pattern = np.zeros((size, size), dtype=bool)
    for k in range(size):
        w1, h1 = iota(k, width)
        for n in range(size):
            w2, h2 = iota(n, width)
            if basis == "fourier":
                pattern[k, n] = k == n and (w1, h1) != (0, 0)
            elif basis == "hermite":  # eq. 75: only degree k - 2 along one axis, same degree on the other
                pattern[k, n] = (h1 == h2 and w1 == w2 - 2) or (w1 == w2 and h1 == h2 - 2)
            else:  # eqs. 59, 66: lower degree of the same parity along one axis
                pattern[k, n] = (h1 == h2 and w1 <= w2 - 2 and (w2 - w1) % 2 == 0) or (
                    w1 == w2 and h1 <= h2 - 2 and (h2 - h1) % 2 == 0
                )
    return pattern


@pytest.mark.parametrize("basis", ("fourier",) + POLYNOMIAL_BASES)
@pytest.mark.parametrize("grid", GRIDS)
def test_sparsity_patterns(basis, grid):
    height, width = grid
    expected = _expected_pattern(basis, height, width)
    assert np.array_equal(transition_mask(basis, grid).numpy(), expected)
    assert np.array_equal(transition_matrix(basis, grid).numpy() != 0, expected)
    if basis != "fourier":  # nonzero only where the row's degree is lower than the column's
        for k, n in zip(*np.nonzero(expected)):
            assert sum(iota(k, width)) < sum(iota(n, width))


def test_legendre_4x4_pattern_by_hand():
    """A few entries of the 4 x 4 Legendre A, worked out by hand from eqs. 60, 65, 66 (W = H = 4)."""
    A = transition_matrix("legendre", (4, 4), normalize=False, dtype=torch.float64)
    # row (0,0), column (2,0): ½ [p(0,2) q(0,0) + q(0,2) p(0,0)] = ½ * (2*3 - 0) * 2 = 6
    assert A[0, 2].item() == pytest.approx(6.0)
    # row (1,0), column (3,0): ½ p(1,3) q(0,0) = ½ * (3*4 - 1*2) * 2 = 10
    assert A[1, 3].item() == pytest.approx(10.0)
    # row (1,1)=5, column (1,3)=13: ½ q(1,1) p(1,3) = ½ * (2/3) * 10 = 10/3
    assert A[5, 13].item() == pytest.approx(10.0 / 3.0)
    # row (0,0), column (1,0): odd degree difference -> 0; row (2,0), column (0,0): higher row degree -> 0
    assert A[0, 1].item() == 0.0 and A[2, 0].item() == 0.0
    # per axis the 1D nonzero pairs are (0, 2) and (1, 3): 2 pairs x 4 lines x 2 axes = 16 entries
    assert int(transition_mask("legendre", (4, 4)).sum()) == 16


def test_random_basis_dense_normalized_and_seeded():
    A0 = transition_matrix("random", (2, 3), seed=0)
    assert A0.shape == (6, 6)
    assert bool((A0 != 0).all())
    assert A0.abs().max().item() == pytest.approx(1.0)
    assert torch.equal(A0, transition_matrix("random", (2, 3), seed=0))
    assert not torch.allclose(A0, transition_matrix("random", (2, 3), seed=1))
    assert bool(transition_mask("random", (2, 3)).all())


def test_one_by_one_grid_is_zero_and_finite():
    for basis in BASES:
        A = transition_matrix(basis, (1, 1))
        assert A.shape == (1, 1) and torch.isfinite(A).all()
    assert transition_matrix("fourier", (1, 1)).item() == 0.0


def test_unknown_basis_raises():
    with pytest.raises(ValueError, match=r"`basis`.*'wavelet'"):
        transition_matrix("wavelet", (2, 2))


# --------------------------------------------------------------------------------------------
# Physics check (docs/method.md, "The transition matrix"): circular blur of a real photo in the DFT domain
# --------------------------------------------------------------------------------------------


def _decay_rates(image, variance, height, width, max_half_width):
    """log|F_blurred / F_orig| / t at the DFT indices (w, h) of the grid, in channel order n (eq. 41)."""
    x = torch.from_numpy(image)[None, None]
    blurred = gaussian_blur(x, variance, padding_mode="circular", max_half_width=max_half_width)[0, 0].numpy()
    F0, Fb = np.fft.fft2(image), np.fft.fft2(blurred)  # index [row = y frequency h, column = x frequency w]
    rates = []
    for n in range(height * width):
        w, h = iota(n, width)
        rates.append(np.log(np.abs(Fb[h, w] / F0[h, w])) / variance)
    return np.array(rates)


@pytest.mark.parametrize("variance", [2.0, 5.0, 10.0])
@pytest.mark.parametrize("wide_kernel", [True, False])
def test_fourier_A_matches_circular_blur_of_a_photo(variance, wide_kernel):
    """Under circular blur of variance t, DFT coefficient (w, h) decays as exp(A_nn t), one common factor.

    On an S x S periodic image the exact factor is exp(-2 π² t (w² + h²) / S²). With a square
    grid the normalized A_nn = -(w² + h²) / max(w² + h²), so the common factor must be
    2 π² / S² * max(w² + h²), the normalization constant of the grid.
    """
    S, grid = 128, (4, 4)
    height, width = grid
    image = photo_crops(batch_size=1, size=S, dtype=torch.float64, grayscale=True)[0, 0].numpy()
    # wide: a kernel out to 8 σ, where the sampled Gaussian's DFT is exp(-2π² t f²) to ~1e-13;
    # default: the library's ceil(3 σ) kernel, whose truncation lowers the variance by ~1-3 %.
    half_width = int(math.ceil(8 * math.sqrt(variance))) if wide_kernel else None
    rates = _decay_rates(image, variance, height, width, half_width)

    A = transition_matrix("fourier", grid, dtype=torch.float64).diagonal().numpy()
    norm_constant = max(iota(n, width)[0] ** 2 + iota(n, width)[1] ** 2 for n in range(height * width))
    factor = 2 * math.pi**2 / S**2 * norm_constant
    rtol = 1e-9 if wide_kernel else 0.03
    assert abs(rates[0]) < 1e-9  # DC: blur preserves the mean, A_00 = 0
    np.testing.assert_allclose(rates[1:] / A[1:], factor, rtol=rtol)
    np.testing.assert_allclose(rates, factor * A, rtol=rtol, atol=1e-12)
    # the same factor is max|A| before normalization divided by S² (2 π² W H / W² = 2 π² on a square grid)
    raw_max = transition_matrix("fourier", grid, normalize=False, dtype=torch.float64).abs().max().item()
    assert raw_max / S**2 == pytest.approx(factor, rel=1e-12)


def test_fourier_A_matches_circular_blur_on_a_non_square_grid():
    """Grid (H, W) = (2, 4) on a 64 x 128 photo (S_h = 32 H, S_w = 32 W): rates = A_raw / (S_h S_w).

    Swapping the roles of w and h (or of H and W) would break this: the x and y frequencies decay
    at different rates.
    """
    height, width = 2, 4
    image = photo_crops(batch_size=1, size=128, dtype=torch.float64, grayscale=True)[0, 0, :64].numpy()
    variance = 6.0
    rates = _decay_rates(image, variance, height, width, max_half_width=int(math.ceil(8 * math.sqrt(variance))))
    indices = [iota(n, width) for n in range(height * width)]
    exact = np.array([-2 * math.pi**2 * (w**2 / 128**2 + h**2 / 64**2) for w, h in indices])
    np.testing.assert_allclose(rates, exact, rtol=1e-9, atol=1e-12)
    raw = transition_matrix("fourier", (height, width), normalize=False, dtype=torch.float64).diagonal().numpy()
    np.testing.assert_allclose(rates, raw / (64 * 128), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Grids, eq. 41 mapping and frequency order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels, grid", [(16, (4, 4)), (4, (2, 2)), (32, (4, 8)), (12, (3, 4)), (7, (1, 7)), (1, (1, 1)), (8, (2, 4))]
)
def test_default_grid(channels, grid):
    assert default_grid(channels) == grid


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "16"])
def test_default_grid_rejects_non_positive_int(bad):
    with pytest.raises(ValueError, match="latent_channels"):
        default_grid(bad)


@pytest.mark.parametrize("bad", [(0, 4), (4,), (2, 2, 1), (2.0, 2), "4x4", (True, 4), None])
def test_validate_grid_rejects(bad):
    with pytest.raises(ValueError, match="grid"):
        validate_grid(bad)


def test_validate_grid_checks_channel_count():
    assert validate_grid([2, 3], 6) == (2, 3)
    with pytest.raises(ValueError, match=r"grid.*\(2, 3\).*latent_channels=4"):
        validate_grid((2, 3), 4)


def test_eq41_mapping_on_non_square_grids():
    # worked out by hand: n -> (n mod W, n div W)
    assert [channel_to_basis_index(n, (2, 3)) for n in range(6)] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert [channel_to_basis_index(n, (3, 2)) for n in range(6)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="6"):
        channel_to_basis_index(6, (2, 3))
    with pytest.raises(ValueError):
        channel_to_basis_index(-1, (2, 3))


def test_channel_frequency_order_by_hand():
    # (2, 3): w+h per channel = [0, 1, 2, 1, 2, 3]; (3, 2): [0, 1, 1, 2, 2, 3]
    assert channel_frequency_order((2, 3)) == [0, 1, 3, 2, 4, 5]
    assert channel_frequency_order((3, 2)) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("grid", [(4, 4), (2, 4), (4, 8), (1, 7)])
def test_channel_frequency_order_sorted_by_w_plus_h(grid):
    height, width = grid
    order = channel_frequency_order(grid)
    assert sorted(order) == list(range(height * width))
    keys = [sum(iota(n, width)) for n in order]
    assert keys == sorted(keys)
    for a, b in zip(order, order[1:]):  # ties broken by channel index
        if sum(iota(a, width)) == sum(iota(b, width)):
            assert a < b
    if grid == (4, 4):  # three low-frequency channels first (A.6): (0,0), (1,0), (0,1)
        assert order[:3] == [0, 1, 4]


# --------------------------------------------------------------------------------------------
# Discretization (eqs. 18-20)
# --------------------------------------------------------------------------------------------


def test_zoh_and_euler_agree_to_second_order():
    # a non-diagonal, non-nilpotent A
    A = transition_matrix("legendre", (3, 3), dtype=torch.float64)
    A = A + transition_matrix("fourier", (3, 3), dtype=torch.float64)
    half_A2 = 0.5 * np.linalg.norm((A @ A).numpy())
    ratios = []
    for delta in (1e-1, 1e-2, 1e-3):
        err = np.linalg.norm((discretize(A, delta, "zoh") - discretize(A, delta, "euler")).numpy())
        ratios.append(err / delta**2)
    # err = ||A²|| Δ² / 2 + O(Δ³)
    assert ratios[-1] == pytest.approx(half_A2, rel=1e-2)
    assert ratios[-2] == pytest.approx(half_A2, rel=1e-1)
    np.testing.assert_allclose(
        discretize(A, 0.3, "euler").numpy(), np.eye(9) + 0.3 * A.numpy(), rtol=0, atol=1e-15
    )


def test_zoh_of_diagonal_is_elementwise_exp():
    A = transition_matrix("fourier", (2, 3), dtype=torch.float64)
    delta = 0.37
    expected = np.diag(np.exp(np.diag(A.numpy()) * delta))
    for diagonal in (None, True, False):
        A_bar = discretize(A, delta, "zoh", diagonal=diagonal).numpy()
        np.testing.assert_allclose(A_bar, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("basis", ["chebyshev", "legendre", "hermite", "random"])
def test_zoh_equals_scipy_expm(basis):
    A = transition_matrix(basis, (3, 2), dtype=torch.float64)
    for delta in (0.1, 1.7):
        np.testing.assert_allclose(discretize(A, delta, "zoh").numpy(), expm(A.numpy() * delta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("basis, method", [("legendre", "zoh"), ("fourier", "zoh"), ("legendre", "euler")])
def test_gradients_flow_to_delta(basis, method):
    A = transition_matrix(basis, (3, 3), dtype=torch.float64)
    delta = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    discretize(A, delta, method).sum().backward()
    # d/dΔ exp(AΔ) = A exp(AΔ); d/dΔ (I + AΔ) = A
    An = A.numpy()
    expected = (An @ expm(An * 0.25)).sum() if method == "zoh" else An.sum()
    assert delta.grad is not None
    assert delta.grad.item() == pytest.approx(expected, rel=1e-8)
    assert delta.grad.item() != 0.0


def test_discretize_rejects_bad_input():
    A = torch.eye(3)
    with pytest.raises(ValueError, match=r"`method`.*'rk4'"):
        discretize(A, 0.1, "rk4")
    with pytest.raises(ValueError, match=r"`A`.*\(3, 2\)"):
        discretize(torch.zeros(3, 2), 0.1)
    with pytest.raises(ValueError, match=r"`delta`.*-0\.1"):
        discretize(A, -0.1)
