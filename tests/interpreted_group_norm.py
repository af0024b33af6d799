"""
The fused GroupNorm + SiLU Triton kernels (`diffusers_ssreg.fused_group_norm`), run by Triton's interpreter on the
CPU. Collected only through `tests/test_fused_group_norm.py`, which runs this file in a process started with
`TRITON_INTERPRET=1` (Triton reads it at import).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import photo_crops
from diffusers_ssreg.fused_group_norm import group_norm_silu, triton_group_norm_available


pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="run by tests/test_fused_group_norm.py with TRITON_INTERPRET=1"
)


def relative_error(a, b):
    """||a - b|| / ||b||; a gradient that is zero up to rounding (a bias that softmax cancels) counts as exact."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 1e-8 else float((a - b).norm())


def reference(x, groups, weight, bias, silu):
    """torch's GroupNorm (then SiLU) in float64, with the gradients of x, weight and bias for `upstream`."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True) if weight is not None else None
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    y = F.group_norm(x64, groups, w64, b64, 1e-6)
    return (F.silu(y) if silu else y), [t for t in (x64, w64, b64) if t is not None]


LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "nchw_view": lambda x: x[:, :, :, 1:],  # a slice: strides of a larger tensor
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_match_torch_in_float32(layout, silu, affine):
    torch.manual_seed(0)
    # 3 x 17 x 20 positions: more than one program per channel block in the reductions; a large offset that
    # float32 sums of squares would lose
    x = LAYOUTS[layout](torch.randn(3, 16, 17, 21) * 2 + 30).requires_grad_(True)
    weight = torch.randn(16, requires_grad=True) if affine else None
    bias = torch.randn(16, requires_grad=True) if affine else None
    assert triton_group_norm_available(x)
    out = group_norm_silu(x, 4, weight, bias, 1e-6, silu=silu)
    expected, inputs = reference(x, 4, weight, bias, silu)
    assert out.dtype == x.dtype and out.stride() == torch.empty_like(x).stride()
    assert relative_error(out, expected) < 1e-5
    upstream = torch.randn_like(out)
    ours = torch.autograd.grad(out, [t for t in (x, weight, bias) if t is not None], upstream)
    theirs = torch.autograd.grad(expected, inputs, upstream.double())
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) < 1e-4


def test_bfloat16_input_and_a_gradient_in_another_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    xb = x.bfloat16().requires_grad_(True)
    out = group_norm_silu(xb, 8, weight, bias, 1e-6, silu=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    expected, inputs = reference(xb, 8, weight, bias, True)
    assert relative_error(out, expected) < 1e-2  # bfloat16 output: 8 bits of mantissa
    upstream = torch.randn(2, 32, 8, 8)  # NCHW gradient of a channels-last output
    ours = torch.autograd.grad(out, [xb, weight, bias], upstream.bfloat16())
    theirs = torch.autograd.grad(expected, inputs, upstream.bfloat16().double())
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) < 2e-2


def test_three_dimensional_input_as_attention_passes_it():
    torch.manual_seed(0)
    tokens = torch.randn(2, 36, 16)  # (batch, positions, channels) -> GroupNorm sees (batch, channels, positions)
    x = tokens.transpose(1, 2).requires_grad_(True)
    out = group_norm_silu(x, 4, None, None, 1e-6)
    expected, inputs = reference(x, 4, None, None, False)
    assert relative_error(out, expected) < 1e-5
    upstream = torch.randn_like(out)
    assert relative_error(torch.autograd.grad(out, x, upstream)[0], torch.autograd.grad(expected, inputs, upstream.double())[0]) < 1e-4


def test_under_torch_compile_the_operator_is_called_in_place():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight, bias = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)

    def fn(x):
        return group_norm_silu(x, 4, weight, bias, 1e-6, silu=True).mul(2)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager = fn(x)
    got = compiled(x)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    upstream = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [x, weight, bias], upstream), torch.autograd.grad(eager, [x, weight, bias], upstream)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_vae_with_the_fused_blocks_matches_the_stock_vae():
    """The whole swap on a tiny VAE, Triton path on: outputs and every parameter's gradient, in training mode."""
    from diffusers import AutoencoderKL

    from diffusers_ssreg.speedups import FusedGroupNorm, apply_training_speedups

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    ).train()  # fmt: skip
    fast = apply_training_speedups(copy.deepcopy(vae))
    assert sum(type(m) is FusedGroupNorm for m in fast.modules()) == sum(
        type(m) is torch.nn.GroupNorm for m in vae.modules()
    )
    images = photo_crops(2, 24).contiguous(memory_format=torch.channels_last)
    expected, got = vae(images).sample, fast(images).sample
    assert relative_error(got, expected) < 1e-5
    a = torch.autograd.grad(got.square().mean(), list(fast.parameters()))
    b = torch.autograd.grad(expected.square().mean(), list(vae.parameters()))
    for (name, _), ga, gb in zip(vae.named_parameters(), a, b):
        assert relative_error(ga, gb) < 1e-4, name
