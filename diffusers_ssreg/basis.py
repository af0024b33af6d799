"""Transition matrices of the 2D basis-coefficient dynamics under Gaussian blur (Appendix A.4).

Blurring an image is the heat equation dI/dτ = ½ ∇²I (Sec. 4.2, A.3). Projecting the image on a
2D orthogonal basis {φ_n} gives coefficients c_n, and differentiating the projection gives
dc/dτ = A c with A[k, n] = ½ <∇²φ_n, φ_k> (eq. 40). Everything in this module is a pure function
of the basis name and the H x W grid of basis functions: no learnable state lives here.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch


BASES = ("fourier", "chebyshev", "legendre", "hermite", "random")
DISCRETIZATIONS = ("zoh", "euler")

GridLike = Union[Sequence[int], Tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Grids and the channel <-> basis-index mapping (eq. 41)
# --------------------------------------------------------------------------------------------


def default_grid(latent_channels: int) -> Tuple[int, int]:
    """The most square factorization `(H, W)` of `latent_channels` with `W >= H` (16 -> (4, 4), 32 -> (4, 8))."""
    if not isinstance(latent_channels, int) or isinstance(latent_channels, bool) or latent_channels < 1:
        raise ValueError(f"`latent_channels` must be a positive integer, got {latent_channels!r}.")
    height = int(math.isqrt(latent_channels))
    while latent_channels % height:
        height -= 1
    return height, latent_channels // height


def validate_grid(grid: GridLike, latent_channels: Optional[int] = None) -> Tuple[int, int]:
    """Checks that `grid` is a pair of positive ints (H, W), and that H * W == `latent_channels` when given."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ValueError(f"`grid` must be a pair of positive integers (H, W), got {grid!r}.")
    height, width = int(grid[0]), int(grid[1])
    if latent_channels is not None and height * width != latent_channels:
        raise ValueError(
            f"`grid`={tuple(grid)!r} holds {height * width} basis functions but the VAE has "
            f"latent_channels={latent_channels}; choose a grid (H, W) with H * W == {latent_channels} "
            f"(default: {default_grid(latent_channels)})."
        )
    return height, width


def channel_to_basis_index(n: int, grid: GridLike) -> Tuple[int, int]:
    """Eq. 41 (0-based): latent channel n holds basis function (w, h) = (n mod W, n div W)."""
    height, width = validate_grid(grid)
    if not 0 <= n < height * width:
        raise ValueError(f"channel index `n`={n} is outside [0, {height * width}) for grid {grid!r}.")
    return n % width, n // width


def channel_frequency_order(grid: GridLike) -> List[int]:
    """Channels sorted from low to high frequency: by w + h ascending (Appendix A.6), ties by channel index."""
    height, width = validate_grid(grid)
    return sorted(range(height * width), key=lambda n: (n % width + n // width, n))


# --------------------------------------------------------------------------------------------
# 1D inner products of each basis: q(j, k) = <φ_j, φ_k>, p(j, k) = <φ_j, φ_k''>
# --------------------------------------------------------------------------------------------


def _gram_1d(basis: str, size: int) -> torch.Tensor:
    """q(j, k) = <φ_j, φ_k> in the basis' weighted inner product (eqs. 58, 65, 74)."""
    q = torch.zeros(size, size, dtype=torch.float64)
    for k in range(size):
        if basis == "chebyshev":  # eq. 58
            q[k, k] = math.pi if k == 0 else math.pi / 2
        elif basis == "legendre":  # eq. 65
            q[k, k] = 2.0 / (2 * k + 1)
        elif basis == "hermite":  # eq. 74
            q[k, k] = math.sqrt(math.pi) * 2**k * math.factorial(k)
        else:
            raise ValueError(f"no 1D Gram matrix for basis {basis!r}")
    return q


def _second_derivative_1d(basis: str, size: int) -> torch.Tensor:
    """p(j, k) = <φ_j, φ_k''> in the basis' weighted inner product (eqs. 59, 66, 75)."""
    p = torch.zeros(size, size, dtype=torch.float64)
    for k in range(size):
        for j in range(size):
            if basis == "chebyshev":  # eq. 59
                if j <= k - 2 and (j - k) % 2 == 0:
                    p[j, k] = math.pi / 2 * k * (k * k - j * j)
            elif basis == "legendre":  # eq. 66
                if j <= k - 2 and (j - k) % 2 == 0:
                    p[j, k] = k * (k + 1) - j * (j + 1)
            elif basis == "hermite":  # eq. 75
                if k >= 2 and j == k - 2:
                    p[j, k] = 4 * k * (k - 1) * math.sqrt(math.pi) * 2 ** (k - 2) * math.factorial(k - 2)
            else:
                raise ValueError(f"no 1D second-derivative matrix for basis {basis!r}")
    return p


# --------------------------------------------------------------------------------------------
# The transition matrix A (eq. 40) and its discretization (eqs. 18-20)
# --------------------------------------------------------------------------------------------


def transition_matrix(
    basis: str,
    grid: GridLike,
    normalize: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""
    The continuous-time transition matrix A of the basis coefficients under blur (Appendix A.4).

    Args:
        basis (`str`):
            One of `"fourier"`, `"chebyshev"`, `"legendre"`, `"hermite"` or `"random"`.
        grid (`Tuple[int, int]`):
            `(H, W)`: the basis functions form an H x W grid; latent channel n holds basis index
            (w, h) = (n mod W, n div W) (eq. 41).
        normalize (`bool`, *optional*, defaults to `True`):
            Scale A so that max |A_ij| = 1 (Fig. 7 caption).
        seed (`int`, *optional*, defaults to 0):
            Seed of the dense Gaussian draw for `basis="random"` (the Table 4 ablation).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            dtype of the returned tensor (computed in float64).

    Returns:
        `torch.Tensor` of shape `(H * W, H * W)`. Entry `[k, n]` = ½ <∇²φ_n, φ_k> (eq. 40): row k
        is the coefficient that changes, column n the coefficient that drives it.
    """
    if basis not in BASES:
        raise ValueError(f"`basis` must be one of {BASES}, got {basis!r}.")
    height, width = validate_grid(grid)
    size = height * width
    ws = torch.tensor([n % width for n in range(size)])
    hs = torch.tensor([n // width for n in range(size)])

    if basis == "fourier":
        # eq. 46: <φ_(w,h), ∇²φ_(w,h)> = -4 W H π² (w²/W² + h²/H²), zero off the diagonal.
        lap = -4 * width * height * math.pi**2 * (ws.double() ** 2 / width**2 + hs.double() ** 2 / height**2)
        A = torch.diag(0.5 * lap)
    elif basis == "random":
        generator = torch.Generator().manual_seed(seed)
        A = torch.randn(size, size, generator=generator, dtype=torch.float64)
    else:
        # eqs. 55, 60, 71: <φ_(w1,h1), ∇²φ_(w2,h2)> = (H/W) p(w1,w2) q(h1,h2) + (W/H) q(w1,w2) p(h1,h2),
        # where row k = (w1, h1) and column n = (w2, h2).
        pw, qw = _second_derivative_1d(basis, width), _gram_1d(basis, width)
        ph, qh = _second_derivative_1d(basis, height), _gram_1d(basis, height)
        rows_w, cols_w = ws[:, None], ws[None, :]
        rows_h, cols_h = hs[:, None], hs[None, :]
        lap = (height / width) * pw[rows_w, cols_w] * qh[rows_h, cols_h] + (width / height) * qw[
            rows_w, cols_w
        ] * ph[rows_h, cols_h]
        A = 0.5 * lap

    if normalize:
        scale = A.abs().max()
        if scale > 0:  # a 1x1 grid has A = 0: nothing to normalize
            A = A / scale
    return A.to(dtype)


def transition_mask(basis: str, grid: GridLike) -> torch.Tensor:
    """Boolean `(N, N)` mask of the entries of A that are trainable: its nonzero pattern (A.5); dense for "random"."""
    if basis == "random":
        size = validate_grid(grid)[0] * validate_grid(grid)[1]
        return torch.ones(size, size, dtype=torch.bool)
    return transition_matrix(basis, grid, normalize=False, dtype=torch.float64) != 0


def discretize(
    A: torch.Tensor, delta: Union[float, torch.Tensor], method: str = "zoh", diagonal: Optional[bool] = None
) -> torch.Tensor:
    r"""
    Discretizes dc/dτ = A c with step `delta` (eqs. 18-20).

    Args:
        A (`torch.Tensor` of shape `(N, N)`): the continuous transition matrix.
        delta (`float` or 0-dim `torch.Tensor`): the step size Δ > 0 (may carry gradients).
        method (`str`, *optional*, defaults to `"zoh"`):
            `"zoh"`: Ā = exp(A Δ) (zero-order hold); `"euler"`: Ā = I + A Δ (forward Euler).
        diagonal (`bool`, *optional*):
            Whether A is diagonal; then ZOH is an elementwise exp of the diagonal. Detected when `None`.

    Returns:
        `torch.Tensor` of shape `(N, N)`: Ā.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"`method` must be one of {DISCRETIZATIONS}, got {method!r}.")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"`A` must be a square matrix, got shape {tuple(A.shape)}.")
    if not torch.is_tensor(delta):
        if not delta > 0:
            raise ValueError(f"`delta` must be positive, got {delta!r}.")
        delta = torch.tensor(delta, dtype=A.dtype, device=A.device)
    if method == "euler":
        return torch.eye(A.shape[0], dtype=A.dtype, device=A.device) + A * delta
    if diagonal is None:
        diagonal = bool(torch.equal(A, torch.diag(torch.diagonal(A))))
    if diagonal:
        return torch.diag(torch.exp(torch.diagonal(A) * delta))
    return torch.linalg.matrix_exp(A * delta)
