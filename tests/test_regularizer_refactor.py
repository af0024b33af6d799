"""StateSpaceRegularizer on the regularizer base class computes bit for bit what it computed before.

The reference is the implementation as released at commit 1010e47, kept verbatim (code unchanged)
in tests/data/ssreg_regularizer_1010e47.py and loaded inside the package, so it runs against the
same basis, blur and loss functions. Both regularizers are built from identically seeded VAEs and
trained side by side for a few AdamW steps with identically seeded draws; every loss, logged
term, gradient, updated weight, EMA target and saved state must be exactly equal (torch.equal).
"""

import importlib.util
import os

import pytest
import torch

from conftest import fast_config, make_tiny_vae, photo_crops
from diffusers_ssreg import StateSpaceRegularizer


pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")

LEGACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ssreg_regularizer_1010e47.py")


def _legacy_class():
    """The 1010e47 StateSpaceRegularizer, as a module of the package (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location("diffusers_ssreg._regularizer_1010e47", LEGACY_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StateSpaceRegularizer


def _build(cls, config, latent_channels, seed=0):
    vae = make_tiny_vae(latent_channels=latent_channels, seed=seed)
    torch.manual_seed(123)  # LPIPS' random backbone draws from the global RNG
    return cls(vae, config)


def _step_record(regularizer, optimizer, pixel_values, generator):
    output = regularizer(pixel_values, generator=generator, return_reconstruction=True)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in regularizer.named_parameters() if p.grad is not None}
    optimizer.step()
    regularizer.update_ema()
    fields = {k: v.detach().clone() for k, v in output.items() if torch.is_tensor(v)}
    return fields, grads


@pytest.mark.parametrize(
    "overrides, latent_channels",
    [
        (dict(alpha=0.5, lambda_lpips=0.1, freeze_encoder_blocks=1, freeze_decoder_blocks=1), 4),
        (dict(basis="legendre", alpha=1.0, discretization="euler", mean_centering=False, ema_decay=0.9), 8),
        (dict(alpha=0.25, kl_weight=1e-3, reference_resolution=16), 16),
        (dict(alpha=0.0), 4),
    ],
    ids=["fourier-lpips", "legendre-euler-uncentred", "fourier-16ch-scaled", "alpha0"],
)
def test_seeded_training_is_bit_identical_to_the_1010e47_implementation(tmp_path, overrides, latent_channels):
    legacy_cls = _legacy_class()
    config = fast_config(**overrides)
    old = _build(legacy_cls, config, latent_channels)
    new = _build(StateSpaceRegularizer, config, latent_channels)
    assert [n for n, _ in old.named_parameters()] == [n for n, _ in new.named_parameters()]
    assert [n for n, _ in old.named_buffers()] == [n for n, _ in new.named_buffers()]

    pixel_values = photo_crops(4, 32)
    optimizers = [torch.optim.AdamW(r.parameter_groups(1e-3, weight_decay=0.01)) for r in (old, new)]
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    old.train(), new.train()
    for _ in range(3):
        torch.manual_seed(11)
        old_fields, old_grads = _step_record(old, optimizers[0], pixel_values, generators[0])
        torch.manual_seed(11)
        new_fields, new_grads = _step_record(new, optimizers[1], pixel_values, generators[1])
        assert old_fields.keys() == new_fields.keys()
        for key in old_fields:
            assert torch.equal(old_fields[key], new_fields[key]), key
        assert old_grads.keys() == new_grads.keys()
        for name in old_grads:
            assert torch.equal(old_grads[name], new_grads[name]), name
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name

    old.save_pretrained(str(tmp_path / "old"))
    new.save_pretrained(str(tmp_path / "new"))
    old_state, new_state = old.regularizer_state_dict(), new.regularizer_state_dict()
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        assert torch.equal(old_state[key], new_state[key]), key
    # a state saved by the earlier release (no structure metadata) loads into today's regularizer
    reloaded = StateSpaceRegularizer.from_pretrained(str(tmp_path / "old"), make_tiny_vae(latent_channels=latent_channels))
    for key, value in reloaded.regularizer_state_dict().items():
        assert torch.equal(value, old_state[key]), key
