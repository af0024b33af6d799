"""Shared fixtures of the CPU test suite: a tiny AutoencoderKL factory and real photo crops in [-1, 1].

Everything here runs offline: the Hugging Face Hub is switched off before diffusers is imported,
and the photos are scikit-image's bundled sample images (part of the installed package).
"""

import os


os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / huggingface_hub are imported anywhere

from typing import Sequence

import numpy as np
import pytest
import torch


# --------------------------------------------------------------------------------------------
# Real photos (scikit-image's bundled sample data: no download)
# --------------------------------------------------------------------------------------------

# (name, top, left) of a textured region of each photo; crops of up to 128 px fit in all of them.
PHOTO_REGIONS = (
    ("astronaut", 100, 150),
    ("chelsea", 80, 150),
    ("coffee", 150, 200),
    ("rocket", 150, 250),
    ("immunohistochemistry", 200, 200),
    ("cat", 100, 200),
)


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as float64 RGB in [-1, 1], shape `(height, width, 3)`."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.float64) / 127.5 - 1.0


def photo_crops(
    batch_size: int = 4, size: int = 32, dtype: torch.dtype = torch.float32, grayscale: bool = False
) -> torch.Tensor:
    """`(batch_size, 3 or 1, size, size)` crops of different real photos, in [-1, 1]."""
    if not 1 <= batch_size <= len(PHOTO_REGIONS):
        raise ValueError(f"batch_size must be in [1, {len(PHOTO_REGIONS)}], got {batch_size}")
    crops = []
    for name, top, left in PHOTO_REGIONS[:batch_size]:
        crop = load_photo(name)[top : top + size, left : left + size]
        if grayscale:  # ITU-R 601 luma
            crop = crop @ np.array([0.299, 0.587, 0.114])[:, None]
        crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
    return torch.stack(crops).to(dtype).clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Tiny AutoencoderKL
# --------------------------------------------------------------------------------------------


def make_tiny_vae(
    latent_channels: int = 4,
    use_quant_conv: bool = True,
    block_out_channels: Sequence[int] = (8, 16),
    seed: int = 0,
):
    """A few-thousand-parameter `AutoencoderKL` (downsampling 2**(len(block_out_channels)-1)), seeded."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv=use_quant_conv,
    )


def make_tiny_flux2_vae(latent_channels: int = 8, block_out_channels: Sequence[int] = (8, 16), seed: int = 0):
    """A few-thousand-parameter `AutoencoderKLFlux2` (quant convs, BatchNorm over 2x2 patches), seeded."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    return AutoencoderKLFlux2(
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )


def save_unsupported_vae_config(folder) -> str:
    """A folder holding only the `config.json` of an `AutoencoderKLCosmos`, a VAE class the package refuses."""
    import json

    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": "AutoencoderKLCosmos", "_diffusers_version": "0.42.1", "latent_channels": 16}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def fast_config(**overrides):
    """An `SSRegConfig` for CPU tests: LPIPS off unless asked for (then AlexNet with a random backbone)."""
    from diffusers_ssreg import SSRegConfig

    kwargs = dict(lambda_lpips=0.0, lpips_net="alex", lpips_pretrained_backbone=False)
    kwargs.update(overrides)
    return SSRegConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """One intra-op thread: the machine is small and shared; results are then reproducible too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def tiny_vae_factory():
    """`make_tiny_vae(latent_channels=4, use_quant_conv=True, block_out_channels=(8, 16), seed=0)`."""
    return make_tiny_vae


@pytest.fixture
def tiny_vae():
    """A tiny 4-latent-channel AutoencoderKL with quant convs."""
    return make_tiny_vae()


@pytest.fixture
def photo_batch():
    """`(4, 3, 32, 32)` float32 crops of four real photos in [-1, 1]."""
    return photo_crops(batch_size=4, size=32)


@pytest.fixture
def photo_crops_factory():
    """`photo_crops(batch_size=4, size=32, dtype=torch.float32, grayscale=False)`."""
    return photo_crops


# --------------------------------------------------------------------------------------------
# Example scripts through a real `accelerate launch`
# --------------------------------------------------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerate_launch(script: str, args: Sequence[str], num_processes: int = 1, check: bool = True, background: bool = False):
    """
    Runs `accelerate launch <script> <args>` on the CPU (a gloo group when `num_processes` > 1) offline.
    Returns the `CompletedProcess` (raising with the output tail when `check` fails), or with
    `background` the `Popen`, in its own process group so a test can Ctrl-C launcher and script together.
    """
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    if num_processes > 1:  # torchrun-style processes; ACCELERATE_USE_CPU makes them one gloo group on CPU
        command += ["--multi_gpu"]
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        command += ["--cpu"]
    command += [os.path.join(REPO_ROOT, script), *args]
    if background:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state reset around a test that needs its own Accelerator settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
