"""
diffusers_ssreg.fused_group_norm: the Triton kernels against torch's GroupNorm (and SiLU), run on the CPU by
Triton's interpreter in a separate process (`TRITON_INTERPRET=1` must be set before Triton is imported), and the
fallback to torch's operators where the kernels do not apply.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_ssreg.fused_group_norm import group_norm_silu, triton_group_norm_available


TESTS = Path(__file__).parent


def test_the_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "interpreted_group_norm.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


def test_without_cuda_torch_operators_run():
    x = torch.randn(2, 8, 5, 5)
    assert not triton_group_norm_available(x)  # this process does not interpret Triton
    weight, bias = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(group_norm_silu(x, 4, weight, bias, 1e-6, silu=True), F.silu(F.group_norm(x, 4, weight, bias, 1e-6)))
    torch.testing.assert_close(group_norm_silu(x, 4, weight, bias, 1e-6), F.group_norm(x, 4, weight, bias, 1e-6))
