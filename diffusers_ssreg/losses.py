"""Pixel and perceptual distances, with LPIPS' offline handling."""

import os
import warnings

import torch


# torchvision file names of the LPIPS backbones, for the error message when they can't be fetched.
_BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


# The smallest square side (pixels) each LPIPS backbone accepts: below it a pooling layer of its feature
# stack has no output and lpips raises a shape error (measured with lpips 0.1.4 on square inputs).
LPIPS_MIN_SIZE = {"vgg": 16, "alex": 31, "squeeze": 17}


def _require(module: str, extra: str = "train"):
    try:
        return __import__(module)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"`{module}` is needed for this feature: install it with `pip install diffusers-ssreg[{extra}]`."
        ) from error


TRAINING_WITHOUT_LPIPS = "train without LPIPS (lambda_lpips=0 / --ssreg_lambda_lpips 0)"


def build_lpips(net: str = "vgg", pretrained_backbone: bool = True, how_to_skip: str = TRAINING_WITHOUT_LPIPS) -> torch.nn.Module:
    """
    A frozen `lpips.LPIPS` module in eval mode (Zhang et al. 2018).

    The calibrated linear heads ship with the `lpips` package; the ImageNet backbone comes from
    torchvision's download cache. When it can't be fetched (offline), this raises a `RuntimeError`
    saying where to put the file, or `how_to_skip` LPIPS (the caller's own flag). `pretrained_backbone=False`
    builds a random backbone: only for offline tests, never for a real training run.
    """
    lpips = _require("lpips")
    try:
        with warnings.catch_warnings():
            # lpips builds its backbone with torchvision's old `pretrained=` argument; torchvision warns about that on
            # every construction. It is lpips' call, not the user's, so the two deprecation notices are hidden here.
            warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"LPIPS could not load the ImageNet weights of its '{net}' backbone ({error}). Without internet, "
            f"download {_BACKBONE_FILES.get(net, net)} from torchvision's model zoo on a connected machine and put "
            f"it in {cache} (set $TORCH_HOME to use another cache), or {how_to_skip}."
        ) from error
    model.eval()
    model.requires_grad_(False)
    return model


def per_sample_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample: `(batch_size,)`, computed in float32."""
    return (prediction.float() - target.float()).abs().flatten(1).mean(dim=1)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: `(batch_size,)`, computed in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def per_sample_lpips(lpips_model: torch.nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS distance per sample, `(batch_size,)`; both images in [-1, 1]."""
    return lpips_model(prediction, target).flatten(1).mean(dim=1).float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the samples where `mask` is 1, 0 when none: no host sync, no NaN."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
