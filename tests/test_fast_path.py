"""The fused, static-shape training step against a plain per-sample reference, and the benchmark's CPU mode."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, fast_config, make_tiny_vae, photo_crops
from diffusers_ssreg import BranchPlan, StateSpaceRegularizer
from diffusers_ssreg.blur import gaussian_blur


def reference_loss(regularizer, pixel_values, plan):
    """
    The loss of the paper (eqs. 22-24, A.5; docs/method.md) written the plain way: one sample at a time, its own encoder
    and decoder passes, the branch chosen with an `if`, the EMA target on its own blurred image.
    Posterior sampling is the caller's business (the test makes it deterministic).
    """
    cfg, vae = regularizer.config, regularizer.vae
    # The step truncates every kernel at the half-width of the largest variance it can draw (static
    # shapes); the reference uses the same width so that the two compute the same blur.
    half_width = int(math.ceil(3 * math.sqrt(cfg.tau_max)))
    A_bar = regularizer.discrete_transition()
    regularized = {int(i): k for k, i in enumerate(plan.regularized)}
    total = 0.0
    for i in range(pixel_values.shape[0]):
        x = pixel_values[i : i + 1]
        if i in regularized:
            k = regularized[i]
            x1 = gaussian_blur(x, plan.tau1[k : k + 1], max_half_width=half_width)
            x2 = gaussian_blur(x, plan.tau2[k : k + 1], max_half_width=half_width)
            z1 = vae.encode(x1).latent_dist.sample()
            with torch.no_grad():
                z2 = regularizer.target_encoder(x2)
            mean1 = z1.mean(dim=(2, 3), keepdim=True)
            centred = torch.einsum("kn,bnhw->bkhw", A_bar, z1 - mean1)
            z2 = z2 - z2.mean(dim=(2, 3), keepdim=True)
            decoded = vae.decode(mean1 + centred).sample
            pixel = cfg.lambda_mae * (decoded - x2).abs().mean()
            total = total + cfg.lambda_z * F.mse_loss(centred, z2) + cfg.lambda_image * pixel
        else:
            posterior = vae.encode(x).latent_dist
            decoded = vae.decode(posterior.sample()).sample
            total = total + cfg.lambda_mae * (decoded - x).abs().mean() + cfg.kl_weight * posterior.kl().sum()
    return total / pixel_values.shape[0]


def _gradients(regularizer):
    named = [(n, p) for n, p in regularizer.named_parameters() if p.requires_grad]
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in named}


@pytest.mark.parametrize("regularized", [[0, 2], [1], [], [0, 1, 2, 3]])
def test_fused_step_matches_the_per_sample_reference(monkeypatch, regularized):
    from diffusers.models.autoencoders import vae as vae_module

    # Deterministic posterior: the fused pass orders samples differently from the reference, so
    # noise could not be matched sample by sample; everything else is compared exactly.
    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    torch.manual_seed(0)
    pixel_values = photo_crops(4, 32)
    regularizer = StateSpaceRegularizer(
        make_tiny_vae(latent_channels=4),
        fast_config(alpha=0.5, kl_weight=1e-3, lambda_z=0.7, freeze_encoder_blocks=1, reference_resolution=None),
    )
    with torch.no_grad():  # a trained A and Δ, not the initial ones, and a target that differs from the encoder
        regularizer.transition_values.mul_(1.3)
        regularizer.log_delta.add_(0.5)
        for p in regularizer.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    index = torch.tensor(regularized, dtype=torch.long)
    plain = torch.tensor([i for i in range(4) if i not in regularized], dtype=torch.long)
    tau1 = torch.rand(len(index)) * 6.0  # pixels², within τ_max = 10 (no resolution scaling here)
    plan = BranchPlan(index, plain, tau1, tau1 + 4.0)

    fast = regularizer(pixel_values, plan=plan)
    fast.loss.backward()
    fast_grads = _gradients(regularizer)
    regularizer.zero_grad(set_to_none=True)

    reference = reference_loss(regularizer, pixel_values, plan)
    reference.backward()
    reference_grads = _gradients(regularizer)

    torch.testing.assert_close(fast.loss, reference, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == reference_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if regularized:  # A and Δ really are trained by the fused step
        assert fast_grads["log_delta"].abs() > 0 and fast_grads["transition_values"].abs().sum() > 0


def test_a_plan_beyond_tau_max_is_refused():
    regularizer = StateSpaceRegularizer(make_tiny_vae(), fast_config(alpha=0.5, reference_resolution=None))
    plan = BranchPlan(torch.tensor([0]), torch.tensor([1, 2, 3]), torch.tensor([8.0]), torch.tensor([12.0]))
    with pytest.raises(ValueError, match="tau_max"):
        regularizer(photo_crops(4, 32), plan=plan)


def test_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_finetune.py's tiny CPU mode: stock, SSReg, alpha 0 and another method, eager and compiled."""
    import json

    script = os.path.join(REPO_ROOT, "benchmarks", "bench_finetune.py")
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--config", "tiny", "--batch_size", "2", "--resolution", "32",
         "--steps", "2", "--warmup", "1", "--mixed_precision", "no", "--variants", "stock,ssreg,plain,spectrum_matching",
         "--compile", "--compiled_variants", "ssreg,spectrum_matching",
         "--output_json", str(out), "--output_md", str(tmp_path / "bench.md")],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["results"]]
    assert labels == ["stock", "ssreg", "plain", "spectrum_matching", "ssreg (compiled)", "spectrum_matching (compiled)"]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["flops_per_step"] > 0 and r["timed_steps"] >= 1 and math.isfinite(r["final_loss"])
        # the first step from the same weights, batch and draws: the compiled step (with its faster blocks, in
        # float32 here) computes the eager step's loss
        assert r["first_loss_rel_diff"] < (1e-12 if not r["compiled"] else 1e-5), r
    assert {"ssreg_eager_over_stock_eager", "ssreg_eager_over_plain_eager", "ssreg_compiled_over_stock_eager",
            "spectrum_matching_eager_over_ssreg_eager", "spectrum_matching_compiled_over_ssreg_compiled",
            "spectrum_matching_compiled_over_stock_eager"} <= set(report["ratios"])  # fmt: skip
    markdown = (tmp_path / "bench.md").read_text()
    assert "| ssreg (compiled) |" in markdown and "| spectrum_matching (compiled) |" in markdown


def test_benchmark_flags_name_every_method():
    """`--regularizer` picks the variants timed beside stock and SSReg; an unknown name is an error naming its flag."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    import bench_finetune

    from diffusers_ssreg import REGULARIZERS

    assert bench_finetune.parse_args([]).variants == "stock,ssreg,plain"
    assert bench_finetune.parse_args(["--regularizer", "eqvae"]).variants == "stock,ssreg,eqvae"
    assert bench_finetune.parse_args(["--regularizer", "all"]).variants.split(",") == ["stock", *REGULARIZERS]
    for argv, flag in ((["--regularizer", "vqgan"], "--regularizer"), (["--variants", "stock,eqvea"], "--variants"),
                       (["--compiled_variants", "ssreg,spectral"], "--compiled_variants")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"{flag}: unknown \['(vqgan|eqvea|spectral)'\]; allowed: .*ssreg, eqvae"):
            bench_finetune.parse_args(argv)
