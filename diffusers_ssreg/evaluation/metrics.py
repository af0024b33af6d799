"""Reconstruction metrics (PSNR, SSIM, LPIPS, rFID) and generation metrics (FID, sFID, IS, precision/recall).

The formulas come from maintained libraries where one fits: SSIM maps from torchmetrics, the Inception
Score and k-NN precision/recall from torch-fidelity, LPIPS from `lpips` (through
`diffusers_ssreg.losses.build_lpips`). Written here: the glue (per-image metrics in the diffusers [-1, 1]
convention, streaming feature statistics, labels that keep non-standard feature extractors apart from
published FID, batching over devices, JSON-ready results) and the Fréchet distance (see its comment).
"""

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .. import __version__
from ._utils import check_positive_int, progress_bar, require, resolve_device
from .features import FeatureExtractor, build_feature_extractor
from .io import ImageSource, image_batches, quantize


# --------------------------------------------------------------------------------------------
# Per-image reconstruction metrics
# --------------------------------------------------------------------------------------------


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if not torch.is_tensor(prediction) or not torch.is_tensor(target):
        raise TypeError(
            f"`prediction` and `target` must be tensors, got {type(prediction).__name__} and {type(target).__name__}."
        )
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise ValueError(
            f"`prediction` and `target` must have the same shape (batch_size, channels, height, width), got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}."
        )


def _check_range(value_range) -> Tuple[float, float]:
    if not isinstance(value_range, (tuple, list)) or len(value_range) != 2 or not value_range[1] > value_range[0]:
        raise ValueError(f"`value_range` must be a pair (low, high) with high > low, got {value_range!r}.")
    return float(value_range[0]), float(value_range[1])


def psnr(prediction: torch.Tensor, target: torch.Tensor, value_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """
    Peak signal-to-noise ratio per image, `(batch_size,)` float64: 10 log10(peak² / MSE) with peak = high - low
    of `value_range` (the diffusers [-1, 1] by default; the same dB as on [0, 1] images); `inf` for identical images.
    """
    _check_pair(prediction, target)
    low, high = _check_range(value_range)
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10((high - low) ** 2 / mse)  # mse == 0 -> inf


def ssim(prediction: torch.Tensor, target: torch.Tensor, value_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """
    Structural similarity per image, `(batch_size,)` float64 (Wang et al. 2004), on images mapped from
    `value_range` to [0, 1] (SSIM's luminance term is not shift-invariant; [0, 1] is the usual convention):
    Gaussian window 11 x 11 with σ = 1.5, K1 = 0.01, K2 = 0.03, averaged over the channels and the valid
    region (5-pixel border excluded). This equals `skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)` and Wang's reference code; torchmetrics computes the
    SSIM map but averages over its reflect-padded border too, hence the crop here.
    """
    _check_pair(prediction, target)
    low, high = _check_range(value_range)
    if min(prediction.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {tuple(prediction.shape[-2:])}.")
    tm_ssim = require("torchmetrics.functional.image", "SSIM", "torchmetrics").structural_similarity_index_measure
    dtype = torch.float64 if prediction.device.type == "cpu" else torch.float32
    prediction = (prediction.to(dtype) - low) / (high - low)
    target = (target.to(dtype) - low) / (high - low)
    _, ssim_map = tm_ssim(prediction, target, data_range=1.0, reduction="none", return_full_image=True)
    pad = 5  # (11 - 1) // 2
    return ssim_map[..., pad:-pad, pad:-pad].flatten(1).mean(dim=1).double()


# --------------------------------------------------------------------------------------------
# Feature statistics and distribution metrics
# --------------------------------------------------------------------------------------------


class GaussianStatistics:
    """Streaming mean and covariance of feature vectors (float64 sums), for FID without keeping every feature."""

    def __init__(self):
        self.count = 0
        self._sum = None
        self._outer = None

    def update(self, features: torch.Tensor) -> None:
        """Adds features `(batch_size, D)`."""
        features = features.detach().double().flatten(1)
        if self._sum is None:
            self._sum = features.new_zeros(features.shape[1])
            self._outer = features.new_zeros(features.shape[1], features.shape[1])
        elif features.shape[1] != self._sum.shape[0]:
            raise ValueError(f"features of dim {features.shape[1]} added to statistics of dim {self._sum.shape[0]}.")
        self._sum += features.sum(0)
        self._outer += features.T @ features
        self.count += features.shape[0]

    def compute(self) -> Tuple[np.ndarray, np.ndarray]:
        """`(mu (D,), sigma (D, D))` as float64 numpy arrays (sigma with the unbiased N - 1 normalization)."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors, got {self.count}.")
        mu = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def gaussian_statistics(features: Union[torch.Tensor, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """`(mu, sigma)` of features `(N, D)`, float64, sigma unbiased (as `numpy.cov`)."""
    stats = GaussianStatistics()
    stats.update(torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features))
    return stats.compute()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """
    Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)
    (Heusel et al. 2017).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}; "
            f"both sets must come from the same feature extractor and layer."
        )
    # Written out rather than taken from torch-fidelity / pytorch-fid (general eig or sqrtm of S1 S2): with
    # tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½) it takes two symmetric eigendecompositions, several times faster
    # at D = 2048 and free of the complex round-off the general form has to discard. Same value. In torch
    # (float64, CPU) so that it follows torch's thread settings rather than numpy's BLAS pool.
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    eigenvalues, eigenvectors = torch.linalg.eigh(s1)
    root1 = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    inner = root1 @ s2 @ root1
    tr_covmean = float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, splits: int = 10) -> Tuple[float, float]:
    """
    Inception Score exp(E_x KL(p(y|x) || p(y))) from class logits `(N, K)` (Salimans et al. 2016), mean and
    std over `splits` chunks (torch-fidelity's implementation: fixed shuffle, seed 2020); `splits` is
    capped at N.
    """
    metric_isc = require("torch_fidelity.metric_isc", "the Inception Score", "torch-fidelity")
    logits = torch.as_tensor(logits).detach().cpu()
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"`logits` must have shape (N, num_classes) with N >= 1, got {tuple(logits.shape)}.")
    check_positive_int("splits", splits)
    out = metric_isc.isc_features_to_metric(logits.float(), splits=min(splits, logits.shape[0]))
    return float(out[metric_isc.KEY_METRIC_ISC_MEAN]), float(out[metric_isc.KEY_METRIC_ISC_STD])


def precision_recall(
    sample_features: torch.Tensor, reference_features: torch.Tensor, neighborhood: int = 3, batch_size: int = 10000
) -> Tuple[float, float]:
    """
    Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, k = `neighborhood`
    (3 as in ADM's evaluator), by torch-fidelity: precision = fraction of samples inside the reference
    manifold (the union of balls reaching each reference point's k-th neighbour), recall = fraction of
    reference points inside the sample manifold.
    """
    metric_prc = require("torch_fidelity.metric_prc", "precision/recall", "torch-fidelity")
    sample_features = torch.as_tensor(sample_features).detach().float().flatten(1)
    reference_features = torch.as_tensor(reference_features).detach().float().flatten(1)
    check_positive_int("neighborhood", neighborhood)
    if sample_features.shape[1] != reference_features.shape[1]:
        raise ValueError(
            f"sample features have dim {sample_features.shape[1]} but reference features {reference_features.shape[1]}: "
            f"both sets must come from the same feature extractor."
        )
    for label, features in (("sample", sample_features), ("reference", reference_features)):
        if features.shape[0] <= neighborhood:
            raise ValueError(
                f"precision/recall with `neighborhood`={neighborhood} needs more than {neighborhood} {label} "
                f"features, got {features.shape[0]}."
            )
    return metric_prc.calculate_precision_recall_part(sample_features, reference_features, neighborhood, batch_size)


def generation_metrics_from_features(
    sample_features: Dict[str, torch.Tensor],
    reference_features: Dict[str, torch.Tensor],
    metric_suffix: str = "",
    neighborhood: int = 3,
    splits: int = 10,
    reference_statistics: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
) -> Dict[str, float]:
    """
    FID, sFID, IS and precision/recall from extracted features (dicts with `"pool"` and optionally
    `"spatial"` and `"logits"`, as returned by `extract_features`). Keys: `FID{suffix}`, `sFID{suffix}`
    (when both have `"spatial"`), `IS{suffix}` and `IS{suffix}_std` (when the samples have `"logits"`),
    `precision{suffix}`, `recall{suffix}`.

    `reference_statistics` (`{"pool": (mu, sigma), "spatial": (mu, sigma)}`, e.g. from an ADM reference
    batch) replaces the reference features' own Gaussian statistics for FID / sFID; precision and recall
    always use the reference features.
    """
    for label, features in (("sample_features", sample_features), ("reference_features", reference_features)):
        if not isinstance(features, dict) or "pool" not in features:
            raise ValueError(f"`{label}` must be a dict with a 'pool' entry, got {type(features).__name__}.")
    reference_statistics = reference_statistics or {}
    metrics: Dict[str, float] = {}
    pool_s, pool_r = sample_features["pool"], reference_features["pool"]
    if pool_s.shape[1:] != pool_r.shape[1:]:
        raise ValueError(
            f"sample 'pool' features have shape {tuple(pool_s.shape[1:])} but reference ones {tuple(pool_r.shape[1:])}: "
            f"both sets must come from the same feature extractor."
        )
    for key, name in (("pool", "FID"), ("spatial", "sFID")):
        if key not in sample_features or (key not in reference_features and key not in reference_statistics):
            continue
        reference = reference_statistics.get(key) or gaussian_statistics(reference_features[key])
        metrics[f"{name}{metric_suffix}"] = frechet_distance(*gaussian_statistics(sample_features[key]), *reference)
    if "logits" in sample_features:
        metrics[f"IS{metric_suffix}"], metrics[f"IS{metric_suffix}_std"] = inception_score(sample_features["logits"], splits)
    precision, recall = precision_recall(pool_s, pool_r, neighborhood)
    metrics[f"precision{metric_suffix}"], metrics[f"recall{metric_suffix}"] = precision, recall
    return metrics


def adm_reference_statistics(reference) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """`{"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}` from an ADM reference-batch `.npz` that has them, else None."""
    if not isinstance(reference, (str, os.PathLike)) or not os.fspath(reference).lower().endswith(".npz"):
        return None
    if not os.path.isfile(reference):
        return None
    with np.load(reference) as archive:
        keys = set(archive.keys())
        stats = {}
        if {"mu", "sigma"} <= keys:
            stats["pool"] = (archive["mu"].astype(np.float64), archive["sigma"].astype(np.float64))
        if {"mu_s", "sigma_s"} <= keys:
            stats["spatial"] = (archive["mu_s"].astype(np.float64), archive["sigma_s"].astype(np.float64))
    return stats or None


@torch.inference_mode()
def extract_features(
    images: ImageSource,
    feature_extractor: Union[str, FeatureExtractor, Callable],
    batch_size: int = 50,
    resolution: Optional[int] = None,
    max_samples: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "features",
    **extractor_kwargs,
) -> Dict[str, torch.Tensor]:
    """All features of an image source: dict of CPU float32 tensors `(N, D)` (keys of the extractor)."""
    extractor = build_feature_extractor(feature_extractor, **extractor_kwargs)
    device = resolve_device(device)
    extractor.to(device).eval()
    batches = image_batches(
        images, batch_size=batch_size, resolution=resolution, max_samples=max_samples, num_workers=num_workers
    )
    collected: Dict[str, list] = {}
    for batch in progress_bar(batches, progress, desc=description, total=_num_batches(batches), unit="batch"):
        for key, value in extractor(batch.to(device)).items():
            if value is not None:
                collected.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in collected.items()}


def extractor_weights_fingerprint(extractor: FeatureExtractor) -> Optional[str]:
    """SHA-256 (16 hex digits) of an extractor's parameters and buffers, so that two weight files under one extractor
    name (say, two Inception files) never share cached features; None when it has none (a wrapped function)."""
    state = extractor.state_dict()
    if not state:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes, whatever the dtype (bf16 too)
    return digest.hexdigest()[:16]


def reference_cache_key(reference: ImageSource, extractor: FeatureExtractor, resolution: Optional[int],
                        max_samples: Optional[int]) -> Dict[str, Any]:
    """What a cached reference feature file must match: the extractor and its weights, the image set (a folder's file
    names and sizes, or a file's size and modification time), the resolution and the sample cap."""
    if not isinstance(reference, (str, os.PathLike)):
        raise ValueError(
            f"`reference_cache` needs `reference` to be a folder or an .npz/.npy file, got {type(reference).__name__}: "
            f"other sources have no fingerprint to check a cache against."
        )
    path = os.path.abspath(os.fspath(reference))
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for directory, folders, names in os.walk(path):
            folders.sort()
            for name in sorted(names):
                full = os.path.join(directory, name)
                digest.update(f"{os.path.relpath(full, path)}\0{os.path.getsize(full)}\n".encode())
    elif os.path.isfile(path):
        stat = os.stat(path)
        digest.update(f"{stat.st_size}\0{stat.st_mtime_ns}".encode())
    else:
        raise ValueError(f"`reference` {path!r} does not exist.")
    return {"extractor": extractor.describe().get("name"), "weights": extractor_weights_fingerprint(extractor),
            "reference": path, "fingerprint": digest.hexdigest()[:16], "resolution": resolution,
            "max_samples": max_samples, "version": 2}  # fmt: skip


def cached_reference_features(cache: str, key: Dict[str, Any], compute: Callable[[], Dict[str, torch.Tensor]]):
    """The reference features from the safetensors file `cache` when its key matches `key`, else `compute()`, written
    there atomically (a temporary file renamed into place, so parallel runs sharing one cache never read half a file).
    Returns `(features, "read" | "written")`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    wanted = json.dumps(key, sort_keys=True)
    if os.path.isfile(cache):
        with safe_open(cache, framework="pt") as archive:
            if (archive.metadata() or {}).get("ssreg_reference_key") == wanted:
                return {name: archive.get_tensor(name) for name in archive.keys()}, "read"
    features = compute()
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    temporary = f"{cache}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in features.items()}, temporary, metadata={"ssreg_reference_key": wanted})
    os.replace(temporary, cache)
    return features, "written"


def _num_batches(batches) -> Optional[int]:
    try:
        return len(batches)
    except TypeError:
        return None


def evaluate_generation(
    samples: ImageSource,
    reference: ImageSource,
    feature_extractor: Union[str, FeatureExtractor, Callable] = "inception",
    batch_size: int = 50,
    resolution: Optional[int] = None,
    max_samples: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    neighborhood: int = 3,
    splits: int = 10,
    inception_weights: Optional[str] = None,
    allow_download: bool = True,
    progress: bool = True,
    reference_cache: Optional[str] = None,
) -> Dict[str, Any]:
    r"""
    Generation metrics between generated `samples` and `reference` images: FID, sFID, IS (of the samples),
    precision and recall.

    Args:
        samples, reference: image sources (folder, .npz/.npy, tensor, `datasets` dataset, iterable of
            tensors; see `ImageBatches`).
        feature_extractor (defaults to `"inception"`): `"inception"` (standard; needs the FID weights
            file, see `resolve_inception_weights`), `"effnet-lite0"` (offline, project-internal scores
            labelled `-EffNetLite0`), or any `FeatureExtractor` / callable.
        neighborhood (`int`, defaults to 3): k of the k-NN manifolds of precision/recall.
        splits (`int`, defaults to 10): splits of the Inception Score.
        reference_cache (`str`, *optional*): a `.safetensors` file for the reference features. When it exists and
            was made from the same extractor and weights, reference images (file names and sizes), `resolution` and
            `max_samples`, the features are read from it; otherwise they are computed and written there. For
            scoring many models against one reference set.

    Returns:
        A JSON-ready dict: `metrics` (named with the extractor's suffix), `feature_extractor` (name,
        whether standard, note), `num_samples`, `num_reference`, `settings`.
    """
    start = time.time()
    extractor = build_feature_extractor(feature_extractor, inception_weights=inception_weights, allow_download=allow_download)
    if extractor is None:
        raise ValueError("`feature_extractor` must not be None for generation metrics.")
    # ADM's reference batches carry Inception statistics of the whole reference set (mu, sigma, mu_s, sigma_s)
    # beside 10k images: FID/sFID use those, as ADM's evaluator does; they mean nothing to another extractor.
    reference_statistics = adm_reference_statistics(reference) if extractor.standard else None
    common = dict(batch_size=batch_size, resolution=resolution, max_samples=max_samples, device=device,
                  num_workers=num_workers, progress=progress)
    sample_features = extract_features(samples, extractor, description="samples", **common)
    cache_state = None
    if reference_cache is None:
        reference_features = extract_features(reference, extractor, description="reference", **common)
    else:
        key = reference_cache_key(reference, extractor, resolution, max_samples)
        reference_features, cache_state = cached_reference_features(
            reference_cache, key, lambda: extract_features(reference, extractor, description="reference", **common))
    metrics = generation_metrics_from_features(
        sample_features, reference_features, extractor.metric_suffix, neighborhood=neighborhood, splits=splits,
        reference_statistics=reference_statistics,
    )
    return {
        "metrics": metrics,
        "feature_extractor": extractor.describe(),
        "num_samples": int(sample_features["pool"].shape[0]),
        "num_reference": int(reference_features["pool"].shape[0]),
        "settings": {"resolution": resolution, "neighborhood": neighborhood, "splits": splits,
                     "max_samples": max_samples, "device": str(resolve_device(device)),
                     "reference_statistics": sorted(reference_statistics) if reference_statistics else None,
                     "reference_cache": None if reference_cache is None else {"path": reference_cache, "state": cache_state}},
        "seconds": round(time.time() - start, 2),
        "diffusers_ssreg_version": __version__,
    }


# --------------------------------------------------------------------------------------------
# Reconstruction evaluation loop
# --------------------------------------------------------------------------------------------


def reconstruction_fn(
    vae, sample_posterior: bool = False, generator: Optional[torch.Generator] = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`pixel_values -> reconstruction` for an AutoencoderKL-like model (`encode().latent_dist`, `decode().sample`)
    or a callable."""
    if hasattr(vae, "encode") and hasattr(vae, "decode"):
        from .latent import as_decoder, as_encoder

        encode = as_encoder(vae, sample_posterior=sample_posterior, generator=generator)
        decode = as_decoder(vae)
        return lambda pixel_values: decode(encode(pixel_values))
    if callable(vae):
        return vae
    raise TypeError(f"`vae` must be an AutoencoderKL (or have encode/decode) or a callable, got {type(vae).__name__}.")


def _module_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


@torch.inference_mode()
def evaluate_reconstruction(
    vae,
    images: ImageSource,
    batch_size: int = 16,
    resolution: Optional[int] = None,
    max_samples: Optional[int] = None,
    lpips_net: Optional[str] = "vgg",
    lpips_model: Optional[torch.nn.Module] = None,
    feature_extractor: Union[str, FeatureExtractor, Callable, None] = None,
    sample_posterior: bool = False,
    quantize_outputs: bool = True,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    inception_weights: Optional[str] = None,
    allow_download: bool = True,
    generator: Optional[torch.Generator] = None,
    return_per_image: bool = False,
    progress: bool = True,
    description: str = "reconstruction",
) -> Dict[str, Any]:
    r"""
    Reconstruction metrics of `vae` over `images`: PSNR, SSIM, LPIPS (means over images) and rFID (FID between
    the originals and their reconstructions).

    Args:
        vae: a diffusers `AutoencoderKL` (anything with `encode(...).latent_dist` and `decode(...).sample`),
            or a callable `pixel_values -> reconstruction`.
        images: an image source (see `ImageBatches`).
        lpips_net (`str`, *optional*, defaults to `"vgg"`): LPIPS backbone ("vgg", "alex", "squeeze"); `None`
            skips LPIPS. Needs torchvision's ImageNet backbone weights (see `build_lpips`).
        lpips_model (`torch.nn.Module`, *optional*): an LPIPS module to use instead of building one.
        feature_extractor (*optional*): features for rFID: `"inception"` (standard rFID), `"effnet-lite0"`
            (offline, reported as `rFID-EffNetLite0`), a `FeatureExtractor`/callable, or `None` (no rFID).
        sample_posterior (`bool`, defaults to `False`): decode a posterior sample instead of the mean.
        quantize_outputs (`bool`, defaults to `True`): round reconstructions and inputs to 8 bits first, as when
            they are saved as PNG (inputs read from 8-bit image files do not change).
        device (*optional*): where to run; by default the VAE's device (a callable: CUDA when available).

    Returns:
        A JSON-ready dict: `metrics` (`PSNR` (dB), `SSIM`, `LPIPS`, `rFID{suffix}`), `num_images`,
        `feature_extractor`, `settings`, and `per_image` lists when `return_per_image`.
    """
    start = time.time()
    device = resolve_device(device) if device is not None else (_module_device(vae) or resolve_device(None))
    reconstruct = reconstruction_fn(vae, sample_posterior=sample_posterior, generator=generator)
    skipped = {}
    if lpips_model is None and lpips_net is not None:
        from ..losses import build_lpips

        lpips_model = build_lpips(lpips_net, pretrained_backbone=True, how_to_skip="pass lpips_net=None to skip LPIPS")
    if lpips_model is not None:
        lpips_model = lpips_model.to(device).eval()
    else:
        skipped["LPIPS"] = "lpips_net=None"
    extractor = build_feature_extractor(feature_extractor, inception_weights=inception_weights, allow_download=allow_download)
    if extractor is not None:
        extractor = extractor.to(device).eval()
        stats_real, stats_fake = GaussianStatistics(), GaussianStatistics()
    else:
        skipped["rFID"] = "feature_extractor=None"

    batches = image_batches(
        images, batch_size=batch_size, resolution=resolution, max_samples=max_samples, num_workers=num_workers
    )
    per_image: Dict[str, list] = {"PSNR": [], "SSIM": [], "LPIPS": []}
    for batch in progress_bar(batches, progress, desc=description, total=_num_batches(batches), unit="batch"):
        batch = batch.to(device)
        recon = reconstruct(batch).float().clamp(-1, 1)
        if recon.shape != batch.shape:
            raise ValueError(
                f"the reconstruction has shape {tuple(recon.shape)} but the input {tuple(batch.shape)}; image sizes must "
                f"be multiples of the VAE's downsampling factor (pass `resolution`)."
            )
        if quantize_outputs:  # both, so that identical images stay bit-identical on any device
            batch, recon = quantize(batch), quantize(recon)
        per_image["PSNR"].append(psnr(recon, batch).cpu())
        per_image["SSIM"].append(ssim(recon, batch).cpu())
        if lpips_model is not None:
            per_image["LPIPS"].append(lpips_model(recon, batch).flatten(1).mean(1).double().cpu())
        if extractor is not None:
            stats_real.update(extractor(batch)["pool"])
            stats_fake.update(extractor(recon)["pool"])

    values = {k: torch.cat(v) for k, v in per_image.items() if v}
    metrics: Dict[str, float] = {}
    for key, value in values.items():
        # A perfect reconstruction has PSNR inf; the mean is then inf too, which JSON stores as "inf".
        metrics[key] = float(value.mean())
    num_images = int(values["PSNR"].shape[0])
    if extractor is not None:
        metrics[f"rFID{extractor.metric_suffix}"] = frechet_distance(*stats_real.compute(), *stats_fake.compute())
    result = {
        "metrics": metrics,
        "num_images": num_images,
        "feature_extractor": extractor.describe() if extractor is not None else None,
        "skipped": skipped,
        "settings": {
            "resolution": resolution, "batch_size": batch_size, "max_samples": max_samples,
            "lpips_net": lpips_net if lpips_model is not None else None, "sample_posterior": sample_posterior,
            "quantize_outputs": quantize_outputs, "device": str(device),
        },
        "seconds": round(time.time() - start, 2),
        "diffusers_ssreg_version": __version__,
    }
    if return_per_image:
        result["per_image"] = {k: v.tolist() for k, v in values.items()}
    return result

