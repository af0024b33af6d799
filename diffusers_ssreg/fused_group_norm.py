"""
GroupNorm, optionally followed by SiLU, as Triton kernels for any memory layout: `group_norm_silu(x, ...)`.

Why a kernel of our own: the compiled fine-tuning step runs the VAE in the channels-last layout, where the
convolutions are 1.6-1.9x faster (one NVIDIA H200, docs/benchmarks.md section 4); torch's GroupNorm and the kernels
the compiler generates for it reduce over one group at a time, which in that layout reads memory in strides of the
channel count. Here every kernel walks a tile of (positions x channels) with the unit-stride dimension inside, so
both layouts read memory in order, and one pass computes GroupNorm and SiLU together (forward and backward), in
float32 arithmetic on input of any float type.

The forward is three kernels: per-channel partial sums over a range of positions (shifted by the channel's first
value, so the float32 sums do not cancel), the per-group statistics (the law of total variance over the group's
channels), and the normalisation with the SiLU. The backward is three as well: per-channel partial sums of the
incoming gradient, their per-group combination, and the input gradient. The operators are registered with
`torch.library` (`diffusers_ssreg::group_norm_silu`), so `torch.compile` calls them in place and keeps whatever
memory layout it chose for their inputs; the output has the input's layout.

Without Triton or without a CUDA tensor, `group_norm_silu` falls back to torch's `group_norm` (and `silu`).
Setting `TRITON_INTERPRET=1` before import runs the same kernels on the CPU (slowly), which is how the test suite
checks them.
"""

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels on Linux
    triton = None

__all__ = ["group_norm_silu", "triton_group_norm_available"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ROWS_GRANULE = 256  # positions per program come in multiples of this (every BLOCK_L below divides it)
_PROGRAMS_TARGET = 1024  # enough programs to fill a large GPU several times over, few enough partial sums


def triton_group_norm_available(x: torch.Tensor) -> bool:
    """Whether `group_norm_silu` runs the Triton kernels for `x` (a CUDA tensor, or any tensor in interpreter mode)."""
    return triton is not None and (x.is_cuda or (_INTERPRET and x.device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _partial_sums_kernel(
        X, S1, S2, C, L, sxn, sxc, sxl, rows_per_prog, n_chunks,
        BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # S1[n, chunk, c] = sum over the chunk's positions of (x - x[n, c, 0]); S2 the same of its square
        n = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        base = X + n * sxn
        first = tl.load(base + offs_c * sxc, mask=mask_c, other=0.0).to(tl.float32)
        acc1 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        start = chunk * rows_per_prog
        for l0 in range(0, rows_per_prog, BLOCK_L):
            offs_l = start + l0 + tl.arange(0, BLOCK_L)
            mask = (offs_l < L)[:, None] & mask_c[None, :]
            x = tl.load(base + offs_l[:, None] * sxl + offs_c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - first[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        out = (n * n_chunks + chunk) * C + offs_c
        tl.store(S1 + out, tl.sum(acc1, axis=0), mask=mask_c)
        tl.store(S2 + out, tl.sum(acc2, axis=0), mask=mask_c)

    @triton.jit
    def _group_channel_sums(P1, P2, n, g, C, n_chunks, cpg, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
        # the channels of group g, their mask, and the partial sums P1[n, :, c] and P2[n, :, c] summed over chunks
        offs_j = tl.arange(0, BLOCK_G)
        mask_j = offs_j < cpg
        c = g * cpg + offs_j
        offs_k = tl.arange(0, BLOCK_K)
        mask = (offs_k < n_chunks)[:, None] & mask_j[None, :]
        idx = (n * n_chunks + offs_k[:, None]) * C + c[None, :]
        sum1 = tl.sum(tl.load(P1 + idx, mask=mask, other=0.0), axis=0)
        sum2 = tl.sum(tl.load(P2 + idx, mask=mask, other=0.0), axis=0)
        return c, mask_j, sum1, sum2

    @triton.jit
    def _group_stats_kernel(
        X, S1, S2, W, B, SCALE, SHIFT, MEAN, RSTD, C, L, G, sxn, sxc, n_chunks, cpg, eps,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    ):  # fmt: skip
        # one program per (sample, group): the group's mean and 1/std, and per channel y = x * scale + shift
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        c, mask_j, s1, s2 = _group_channel_sums(S1, S2, n, g, C, n_chunks, cpg, BLOCK_K, BLOCK_G)
        s1 = s1 / L
        s2 = s2 / L
        first = tl.load(X + n * sxn + c * sxc, mask=mask_j, other=0.0).to(tl.float32)
        mean_c = first + s1
        var_c = tl.maximum(s2 - s1 * s1, 0.0)
        mean = tl.sum(tl.where(mask_j, mean_c, 0.0), axis=0) / cpg
        dev = tl.where(mask_j, mean_c - mean, 0.0)
        var = tl.sum(tl.where(mask_j, var_c, 0.0) + dev * dev, axis=0) / cpg
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = tl.zeros((BLOCK_G,), dtype=tl.float32) + rstd
        if HAS_W:
            scale = scale * tl.load(W + c, mask=mask_j, other=1.0).to(tl.float32)
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(B + c, mask=mask_j, other=0.0).to(tl.float32)
        tl.store(SCALE + n * C + c, scale, mask=mask_j)
        tl.store(SHIFT + n * C + c, shift, mask=mask_j)
        tl.store(MEAN + n * G + g, mean)
        tl.store(RSTD + n * G + g, rstd)

    @triton.jit
    def _pointwise_tile(C, L, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        # this program's sample, positions and channels of a (positions x channels) tile, and their masks
        n = tl.program_id(0).to(tl.int64)
        offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        return n, offs_l, offs_c, mask_c, (offs_l < L)[:, None] & mask_c[None, :]

    @triton.jit
    def _normalize_kernel(
        X, Y, SCALE, SHIFT, C, L, sxn, sxc, sxl, syn, syc, syl,
        SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, offs_l, offs_c, mask_c, mask = _pointwise_tile(C, L, BLOCK_L, BLOCK_C)
        scale = tl.load(SCALE + n * C + offs_c, mask=mask_c, other=0.0)
        shift = tl.load(SHIFT + n * C + offs_c, mask=mask_c, other=0.0)
        x = tl.load(X + n * sxn + offs_l[:, None] * sxl + offs_c[None, :] * sxc, mask=mask, other=0.0)
        y = x.to(tl.float32) * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + n * syn + offs_l[:, None] * syl + offs_c[None, :] * syc, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_partial_sums_kernel(
        X, DY, SCALE, SHIFT, MEAN, PA, PB, C, L, cpg, G, sxn, sxc, sxl, sdn, sdc, sdl, rows_per_prog, n_chunks,
        SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # with gy the gradient with respect to the normalised-and-affine value y:
        # PB[n, chunk, c] = sum of gy, PA[n, chunk, c] = sum of gy * (x - mean of the group)
        n = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        scale = tl.load(SCALE + n * C + offs_c, mask=mask_c, other=0.0)
        shift = tl.load(SHIFT + n * C + offs_c, mask=mask_c, other=0.0)
        mean = tl.load(MEAN + n * G + offs_c // cpg, mask=mask_c, other=0.0)
        acc_a = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        start = chunk * rows_per_prog
        for l0 in range(0, rows_per_prog, BLOCK_L):
            offs_l = start + l0 + tl.arange(0, BLOCK_L)
            mask = (offs_l < L)[:, None] & mask_c[None, :]
            x = tl.load(X + n * sxn + offs_l[:, None] * sxl + offs_c[None, :] * sxc, mask=mask, other=0.0)
            x = x.to(tl.float32)
            gy = tl.load(DY + n * sdn + offs_l[:, None] * sdl + offs_c[None, :] * sdc, mask=mask, other=0.0)
            gy = gy.to(tl.float32)
            if SILU:
                y = x * scale[None, :] + shift[None, :]
                s = tl.sigmoid(y)
                gy = gy * s * (1.0 + y * (1.0 - s))
            acc_b += gy
            acc_a += gy * tl.where(mask, x - mean[None, :], 0.0)
        out = (n * n_chunks + chunk) * C + offs_c
        tl.store(PA + out, tl.sum(acc_a, axis=0), mask=mask_c)
        tl.store(PB + out, tl.sum(acc_b, axis=0), mask=mask_c)

    @triton.jit
    def _grad_group_kernel(
        PA, PB, W, RSTD, DWN, DBN, ALPHA, BETA, GAMMA, C, L, G, n_chunks, cpg,
        HAS_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    ):  # fmt: skip
        # dx = rstd * (gy * w - mean_g(gy * w) - xhat * mean_g(gy * w * xhat)), written as
        # dx = ALPHA * gy + BETA * (x - mean) + GAMMA per (sample, channel); DWN/DBN are per-sample dw/db
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        c, mask_j, a, b = _group_channel_sums(PA, PB, n, g, C, n_chunks, cpg, BLOCK_K, BLOCK_G)
        rstd = tl.load(RSTD + n * G + g)
        a = a * rstd  # sum of gy * xhat; b is the sum of gy
        tl.store(DWN + n * C + c, a, mask=mask_j)
        tl.store(DBN + n * C + c, b, mask=mask_j)
        w = tl.zeros((BLOCK_G,), dtype=tl.float32) + 1.0
        if HAS_W:
            w = tl.load(W + c, mask=mask_j, other=0.0).to(tl.float32)
        count = cpg * L
        m1 = tl.sum(tl.where(mask_j, w * b, 0.0), axis=0) / count
        m2 = tl.sum(tl.where(mask_j, w * a, 0.0), axis=0) / count
        tl.store(ALPHA + n * C + c, rstd * w, mask=mask_j)
        tl.store(BETA + n * C + c, tl.zeros((BLOCK_G,), dtype=tl.float32) - rstd * rstd * m2, mask=mask_j)
        tl.store(GAMMA + n * C + c, tl.zeros((BLOCK_G,), dtype=tl.float32) - rstd * m1, mask=mask_j)

    @triton.jit
    def _grad_input_kernel(
        X, DY, DX, SCALE, SHIFT, MEAN, ALPHA, BETA, GAMMA, C, L, cpg, G,
        sxn, sxc, sxl, sdn, sdc, sdl, son, soc, sol,
        SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, offs_l, offs_c, mask_c, mask = _pointwise_tile(C, L, BLOCK_L, BLOCK_C)
        pc = n * C + offs_c
        alpha = tl.load(ALPHA + pc, mask=mask_c, other=0.0)
        beta = tl.load(BETA + pc, mask=mask_c, other=0.0)
        gamma = tl.load(GAMMA + pc, mask=mask_c, other=0.0)
        mean = tl.load(MEAN + n * G + offs_c // cpg, mask=mask_c, other=0.0)
        x = tl.load(X + n * sxn + offs_l[:, None] * sxl + offs_c[None, :] * sxc, mask=mask, other=0.0)
        x = x.to(tl.float32)
        gy = tl.load(DY + n * sdn + offs_l[:, None] * sdl + offs_c[None, :] * sdc, mask=mask, other=0.0)
        gy = gy.to(tl.float32)
        if SILU:
            scale = tl.load(SCALE + pc, mask=mask_c, other=0.0)
            shift = tl.load(SHIFT + pc, mask=mask_c, other=0.0)
            y = x * scale[None, :] + shift[None, :]
            s = tl.sigmoid(y)
            gy = gy * s * (1.0 + y * (1.0 - s))
        dx = alpha[None, :] * gy + beta[None, :] * (x - mean[None, :]) + gamma[None, :]
        tl.store(DX + n * son + offs_l[:, None] * sol + offs_c[None, :] * soc, dx.to(DX.dtype.element_ty), mask=mask)


def _next_pow2(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


# Tile sizes per kernel kind: a tile is (BLOCK_L positions x BLOCK_C channels), `programs` the number of programs
# the reductions aim for (their partial sums). Chosen on one NVIDIA H200 with benchmarks/tune_group_norm.py, where
# they read and write memory at 2.4-4.2 TB/s on the Flux VAE's larger activations (docs/benchmarks.md, section 4).
TILES = {
    "reduce": dict(block_c=128, block_l=32, num_warps=8, programs=1024),
    "pointwise": dict(block_c=128, block_l=32, num_warps=4),
}


def _tile(kind: str, c: int):
    tile = TILES[kind]
    block_c = min(tile["block_c"], _next_pow2(c))
    return block_c, min(tile["block_l"], _ROWS_GRANULE), tile["num_warps"]


def _flat_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """Strides (sample, channel, position) of `t` viewed as (N, C, L); requires the spatial dims to be one stride."""
    return t.stride(0), t.stride(1), t.stride(-1)


def _spatial_flat(t: torch.Tensor) -> bool:
    # the spatial dimensions must form one dimension of stride t.stride(-1) (true for NCHW and channels-last)
    expected = t.stride(-1)
    for dim in range(t.ndim - 1, 1, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


def _chunking(n: int, c_blocks: int, length: int) -> Tuple[int, int]:
    """(positions per program, programs per sample and channel block) of the reduction kernels."""
    granules = triton.cdiv(length, _ROWS_GRANULE)
    per_prog = max(1, (n * c_blocks * granules) // TILES["reduce"]["programs"])
    rows = per_prog * _ROWS_GRANULE
    return rows, triton.cdiv(length, rows)


def _reduction(x):
    """The launch of a reduction kernel over `x`: its grid, its arguments after the tensors, its tiles, and two
    float32 buffers for its partial sums, of shape (N, programs per sample and channel block, C)."""
    n, c = x.shape[:2]
    length = x.numel() // (n * c)
    block_c, block_l, warps = _tile("reduce", c)
    c_blocks = triton.cdiv(c, block_c)
    rows, n_chunks = _chunking(n, c_blocks, length)
    buffers = [torch.empty((n, n_chunks, c), device=x.device, dtype=torch.float32) for _ in range(2)]
    tiles = dict(BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)
    return (n, n_chunks, c_blocks), (rows, n_chunks), tiles, buffers


def _partial_sums(x):
    grid, chunking, tiles, (s1, s2) = _reduction(x)
    n, c = x.shape[:2]
    _partial_sums_kernel[grid](x, s1, s2, c, x.numel() // (n * c), *_flat_strides(x), *chunking, **tiles)
    return s1, s2


def _normalize(x, scale, shift, silu):
    n, c = x.shape[:2]
    length = x.numel() // (n * c)
    block_c, block_l, warps = _tile("pointwise", c)
    y = torch.empty_like(x)
    _normalize_kernel[(n, triton.cdiv(length, block_l), triton.cdiv(c, block_c))](
        x, y, scale, shift, c, length, *_flat_strides(x), *_flat_strides(y),
        SILU=silu, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return y


def _grad_partial_sums(grad, x, scale, shift, mean, num_groups, silu):
    grid, chunking, tiles, (pa, pb) = _reduction(x)
    n, c = x.shape[:2]
    _grad_partial_sums_kernel[grid](
        x, grad, scale, shift, mean, pa, pb, c, x.numel() // (n * c), c // num_groups, num_groups,
        *_flat_strides(x), *_flat_strides(grad), *chunking, SILU=silu, **tiles,
    )  # fmt: skip
    return pa, pb


def _grad_input(grad, x, scale, shift, mean, alpha, beta, gamma, num_groups, silu):
    n, c = x.shape[:2]
    length = x.numel() // (n * c)
    block_c, block_l, warps = _tile("pointwise", c)
    dx = torch.empty_like(x)
    _grad_input_kernel[(n, triton.cdiv(length, block_l), triton.cdiv(c, block_c))](
        x, grad, dx, scale, shift, mean, alpha, beta, gamma, c, length, c // num_groups, num_groups,
        *_flat_strides(x), *_flat_strides(grad), *_flat_strides(dx),
        SILU=silu, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return dx


def _forward(x, weight, bias, num_groups, eps, silu):
    n, c = x.shape[:2]
    length = x.numel() // (n * c)
    s1, s2 = _partial_sums(x)
    n_chunks = s1.shape[1]
    scale, shift = (torch.empty((n, c), device=x.device, dtype=torch.float32) for _ in range(2))
    mean, rstd = (torch.empty((n, num_groups), device=x.device, dtype=torch.float32) for _ in range(2))
    sxn, sxc, _ = _flat_strides(x)
    _group_stats_kernel[(n, num_groups)](
        x, s1, s2, weight if weight is not None else s1, bias if bias is not None else s1,
        scale, shift, mean, rstd, c, length, num_groups, sxn, sxc, n_chunks, c // num_groups, eps,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_K=_next_pow2(n_chunks), BLOCK_G=_next_pow2(c // num_groups), num_warps=1,
    )  # fmt: skip
    return _normalize(x, scale, shift, silu), scale, shift, mean, rstd


def _backward(grad, x, weight, scale, shift, mean, rstd, num_groups, silu):
    n, c = x.shape[:2]
    length = x.numel() // (n * c)
    pa, pb = _grad_partial_sums(grad, x, scale, shift, mean, num_groups, silu)
    n_chunks = pa.shape[1]
    dwn, dbn, alpha, beta, gamma = (torch.empty((n, c), device=x.device, dtype=torch.float32) for _ in range(5))
    _grad_group_kernel[(n, num_groups)](
        pa, pb, weight if weight is not None else pa, rstd, dwn, dbn, alpha, beta, gamma,
        c, length, num_groups, n_chunks, c // num_groups,
        HAS_W=weight is not None, BLOCK_K=_next_pow2(n_chunks), BLOCK_G=_next_pow2(c // num_groups), num_warps=1,
    )  # fmt: skip
    dx = _grad_input(grad, x, scale, shift, mean, alpha, beta, gamma, num_groups, silu)
    return dx, dwn.sum(0), dbn.sum(0)


# `flexible_layout`: the compiler passes inputs in whatever layout it chose (the kernels take any strides), instead
# of copying them back to the layout seen while tracing.
_TAGS = (torch._C.Tag.flexible_layout,) if hasattr(torch._C.Tag, "flexible_layout") else ()


@torch.library.custom_op("diffusers_ssreg::group_norm_silu_fwd", mutates_args=(), tags=_TAGS)
def _group_norm_silu_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int, eps: float,
    silu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _forward(x, weight, bias, num_groups, eps, silu)


@_group_norm_silu_fwd.register_fake
def _(x, weight, bias, num_groups, eps, silu):
    n, c = x.shape[:2]
    stats = [x.new_empty((n, c), dtype=torch.float32) for _ in range(2)]
    stats += [x.new_empty((n, num_groups), dtype=torch.float32) for _ in range(2)]
    return (torch.empty_like(x), *stats)


@torch.library.custom_op("diffusers_ssreg::group_norm_silu_bwd", mutates_args=(), tags=_TAGS)
def _group_norm_silu_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, silu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _backward(grad, x, weight, scale, shift, mean, rstd, num_groups, silu)


@_group_norm_silu_bwd.register_fake
def _(grad, x, weight, scale, shift, mean, rstd, num_groups, silu):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    _, scale, shift, mean, rstd = output
    ctx.save_for_backward(x, weight, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.has_bias = num_groups, silu, bias is not None
    ctx.mark_non_differentiable(scale, shift, mean, rstd)


def _backward_rule(ctx, grad, *unused):
    x, weight, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db = _group_norm_silu_bwd(grad, x, weight, scale, shift, mean, rstd, ctx.num_groups, ctx.silu)
    dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    db = db.to(weight.dtype if weight is not None else x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None, None


_group_norm_silu_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    r"""
    `F.group_norm(x, num_groups, weight, bias, eps)`, followed by `F.silu` when `silu=True`, in the dtype and the
    memory layout of `x`. Runs the Triton kernels when `triton_group_norm_available(x)` and the spatial dimensions
    of `x` are one stride (NCHW, channels-last, and their views are); otherwise torch's own operators.
    """
    supported = (
        triton_group_norm_available(x)
        and x.ndim >= 3
        and x.shape[1] % num_groups == 0
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.numel() > 0
        and _spatial_flat(x)
    )
    if not supported:
        out = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(out) if silu else out
    return _group_norm_silu_fwd(x, weight, bias, num_groups, float(eps), bool(silu))[0]
