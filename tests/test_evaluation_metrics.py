"""Metrics of diffusers_ssreg.evaluation against values computed independently here (CPU, offline)."""

import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from diffusers_ssreg.evaluation import (
    CallableFeatureExtractor,
    GaussianStatistics,
    adm_reference_statistics,
    evaluate_generation,
    evaluate_reconstruction,
    frechet_distance,
    gaussian_statistics,
    generation_metrics_from_features,
    inception_score,
    precision_recall,
    psnr,
    save_image_folder,
    save_npz,
    ssim,
)


torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Fixtures (kept in this file on purpose: no shared conftest)
# --------------------------------------------------------------------------------------------


def photo_crops(size=64, count=8):
    """`count` crops (size x size, in [-1, 1]) of scikit-image's bundled photos."""
    from skimage import data

    crops = []
    for photo in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket()):
        image = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float() / 127.5 - 1
        image = F.interpolate(image[None], size=(2 * size, 2 * size), mode="bilinear", antialias=True)[0]
        crops += [image[:, :size, :size], image[:, size:, size:]]
    return torch.stack(crops[:count]).clamp(-1, 1)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).eval()


def pooled_pixels(pixel_values):
    """A tiny deterministic feature extractor: 4x4 average-pooled pixels (48 dims)."""
    return F.adaptive_avg_pool2d(pixel_values, 4).flatten(1)


@pytest.fixture(scope="module")
def photos():
    return photo_crops()


# --------------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------------


def test_psnr_exact_cases(photos):
    target = photos[:2]
    for offset in (0.02, 0.1):
        prediction = target + offset
        expected = 10 * math.log10(2.0**2 / offset**2)  # MSE = offset², peak-to-peak 2
        assert torch.allclose(psnr(prediction, target), torch.full((2,), expected, dtype=torch.float64), atol=1e-9)
    assert torch.isinf(psnr(target, target)).all()


def test_psnr_matches_skimage_on_unit_range(photos):
    from skimage.metrics import peak_signal_noise_ratio

    generator = torch.Generator().manual_seed(0)
    target = photos[:3]
    prediction = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(-1, 1)
    ours = psnr(prediction, target)
    for i in range(3):
        reference = peak_signal_noise_ratio(((target[i] + 1) / 2).double().numpy(), ((prediction[i] + 1) / 2).double().numpy(),
                                            data_range=1.0)
        assert ours[i].item() == pytest.approx(reference, abs=1e-6)


def test_ssim_exact_cases():
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64), atol=1e-12)
    # Two constant images a, b: variances vanish and SSIM = (2ab + C1) / (a² + b² + C1) on [0, 1], C1 = 0.01².
    a, b = 0.25, -0.5
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    a01, b01, c1 = (a + 1) / 2, (b + 1) / 2, 0.01**2
    expected = (2 * a01 * b01 + c1) / (a01**2 + b01**2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_skimage(photos):
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(1)
    target = photos[:2]
    prediction = (target + 0.15 * torch.randn(target.shape, generator=generator)).clamp(-1, 1)
    ours = ssim(prediction, target)
    for i in range(2):
        reference = structural_similarity(
            ((target[i] + 1) / 2).permute(1, 2, 0).double().numpy(),
            ((prediction[i] + 1) / 2).permute(1, 2, 0).double().numpy(),
            channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        )
        assert ours[i].item() == pytest.approx(reference, abs=1e-6)


def test_psnr_ssim_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(2, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="value_range"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), value_range=(1, -1))


# --------------------------------------------------------------------------------------------
# FID, IS, precision/recall
# --------------------------------------------------------------------------------------------


def closed_form_frechet(mu1, s1, mu2, s2):
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½), with scipy's sqrtm (independent of torch-fidelity's eigvals)."""
    root1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(root1 @ s2 @ root1).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * cross))


def random_spd(dim, rng):
    m = rng.normal(size=(dim, dim))
    return m @ m.T + 0.5 * np.eye(dim)


def test_gaussian_statistics_match_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 3
    mu, sigma = gaussian_statistics(torch.from_numpy(features))
    assert np.allclose(mu, features.mean(0), atol=1e-10)
    assert np.allclose(sigma, np.cov(features, rowvar=False), atol=1e-9)
    streaming = GaussianStatistics()
    for chunk in np.array_split(features, 7):
        streaming.update(torch.from_numpy(chunk))
    mu2, sigma2 = streaming.compute()
    assert np.allclose(mu2, mu, atol=1e-10) and np.allclose(sigma2, sigma, atol=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    features = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    stats = gaussian_statistics(features)
    assert abs(frechet_distance(*stats, *stats)) < 1e-6


def test_fid_between_gaussians_equals_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = random_spd(5, rng), random_spd(5, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed_form_frechet(mu1, s1, mu2, s2), rel=1e-6)
    # Diagonal covariances: |mu1 - mu2|² + sum (sqrt(a_i) - sqrt(b_i))².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0**2 * 3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(3), np.array([1.0, -1.0, 0.5])
    s1, s2 = random_spd(3, rng), random_spd(3, rng)
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    estimate = frechet_distance(*gaussian_statistics(torch.from_numpy(x)), *gaussian_statistics(torch.from_numpy(y)))
    assert estimate == pytest.approx(closed_form_frechet(mu1, s1, mu2, s2), rel=0.05)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(100, 10))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes = 8
    logits = 60.0 * F.one_hot(torch.arange(200) % classes, classes).float()
    mean, _ = inception_score(logits, splits=1)
    assert mean == pytest.approx(classes, rel=1e-6)


def brute_force_precision_recall(samples, reference, k):
    """Kynkäänniemi et al. 2019 by the definition, with numpy."""
    def radii(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.linalg.norm(samples[:, None] - reference[None], axis=-1)  # (S, R)
    precision = np.mean((cross <= radii(reference)[None, :]).any(axis=1))
    recall = np.mean((cross.T <= radii(samples)[None, :]).any(axis=1))
    return precision, recall


def test_precision_recall_on_constructed_point_clouds():
    # Reference: 10 points on a line, spacing 1 (every 1-NN radius is 1). Samples: 3 inside, 2 far away.
    reference = torch.tensor([[float(i), 0.0] for i in range(10)])
    samples = torch.tensor([[0.5, 0.0], [1.5, 0.0], [2.5, 0.0], [100.0, 0.0], [101.0, 0.0]])
    precision, recall = precision_recall(samples, reference, neighborhood=1)
    assert precision == pytest.approx(3 / 5)  # 0.5, 1.5, 2.5 lie within 1 of a reference point
    assert recall == pytest.approx(4 / 10)  # sample radii are 1: reference points 0, 1, 2, 3 are covered
    # Identical sets: everything covered; far-apart sets: nothing.
    cloud = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(cloud, cloud) == (1.0, 1.0)
    assert precision_recall(cloud + 100, cloud) == (0.0, 0.0)
    # Random clouds against the definition, k = 3.
    rng = np.random.default_rng(3)
    s, r = rng.normal(size=(60, 5)), rng.normal(loc=0.5, size=(80, 5))
    expected = brute_force_precision_recall(s, r, 3)
    assert precision_recall(torch.from_numpy(s), torch.from_numpy(r), neighborhood=3) == pytest.approx(expected)


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="same feature extractor"):
        precision_recall(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))


def test_generation_metrics_from_features_labels_and_values():
    generator = torch.Generator().manual_seed(0)
    features = {"pool": torch.randn(64, 8, generator=generator), "spatial": torch.randn(64, 12, generator=generator),
                "logits": torch.zeros(64, 5)}
    metrics = generation_metrics_from_features(features, features, metric_suffix="-Tiny")
    assert set(metrics) == {"FID-Tiny", "sFID-Tiny", "IS-Tiny", "IS-Tiny_std", "precision-Tiny", "recall-Tiny"}
    assert abs(metrics["FID-Tiny"]) < 1e-6 and abs(metrics["sFID-Tiny"]) < 1e-6
    assert metrics["IS-Tiny"] == pytest.approx(1.0)
    assert metrics["precision-Tiny"] == metrics["recall-Tiny"] == 1.0
    with pytest.raises(ValueError, match="same feature extractor"):
        generation_metrics_from_features(features, {"pool": torch.randn(64, 9)})


def test_precomputed_reference_statistics_replace_the_reference_features(tmp_path):
    generator = torch.Generator().manual_seed(0)
    samples = {"pool": torch.randn(64, 4, generator=generator), "spatial": torch.randn(64, 3, generator=generator)}
    reference = {"pool": torch.randn(64, 4, generator=generator) + 5}  # far away: ignored for FID below
    stats = {"pool": gaussian_statistics(samples["pool"]), "spatial": gaussian_statistics(samples["spatial"])}
    metrics = generation_metrics_from_features(samples, reference, reference_statistics=stats)
    assert abs(metrics["FID"]) < 1e-6 and abs(metrics["sFID"]) < 1e-6
    assert metrics["precision"] == 0.0  # precision/recall still use the reference features
    # ADM's reference-batch layout: images plus whole-set statistics.
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(4), sigma=np.eye(4), mu_s=np.ones(3), sigma_s=np.eye(3))
    read = adm_reference_statistics(str(path))
    assert set(read) == {"pool", "spatial"} and np.array_equal(read["spatial"][0], np.ones(3))
    np.savez(tmp_path / "plain.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert adm_reference_statistics(str(tmp_path / "plain.npz")) is None and adm_reference_statistics("folder") is None


# --------------------------------------------------------------------------------------------
# End-to-end: generation and reconstruction
# --------------------------------------------------------------------------------------------


def test_evaluate_generation_over_folder_npz_and_iterator(tmp_path, photos):
    folder = tmp_path / "reference"
    save_image_folder(photos, str(folder))
    npz = save_npz(photos, str(tmp_path / "samples.npz"))
    extractor = CallableFeatureExtractor(pooled_pixels, name="Pool4")
    result = evaluate_generation(npz, str(folder), feature_extractor=extractor, batch_size=3, progress=False)
    metrics = result["metrics"]
    assert result["num_samples"] == result["num_reference"] == len(photos)
    assert set(metrics) == {"FID-Pool4", "precision-Pool4", "recall-Pool4"}  # no spatial/logits from this extractor
    assert abs(metrics["FID-Pool4"]) < 1e-6  # the npz and the PNG folder hold the same 8-bit images
    assert metrics["precision-Pool4"] == metrics["recall-Pool4"] == 1.0
    assert result["feature_extractor"]["standard"] is False
    # An iterator of tensors, shifted: FID > 0.
    shifted = evaluate_generation(iter([(photos * 0.5)[:4], (photos * 0.5)[4:]]), str(folder), feature_extractor=extractor,
                                  progress=False)
    assert shifted["metrics"]["FID-Pool4"] > 0.01


def test_evaluate_reconstruction_of_the_identity_is_perfect(tmp_path, photos):
    from diffusers_ssreg.losses import build_lpips

    save_image_folder(photos, str(tmp_path / "images"))
    lpips_model = build_lpips("alex", pretrained_backbone=False)  # random backbone: offline; LPIPS(x, x) = 0 anyway
    result = evaluate_reconstruction(
        lambda x: x, str(tmp_path / "images"), batch_size=3, lpips_model=lpips_model,
        feature_extractor=CallableFeatureExtractor(pooled_pixels, name="Pool4"), progress=False, return_per_image=True,
    )
    metrics = result["metrics"]
    assert math.isinf(metrics["PSNR"]) and metrics["SSIM"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["LPIPS"] == pytest.approx(0.0, abs=1e-6)
    assert abs(metrics["rFID-Pool4"]) < 1e-6
    assert result["num_images"] == len(photos) and len(result["per_image"]["PSNR"]) == len(photos)


def test_evaluate_reconstruction_of_a_tiny_vae(photos):
    result = evaluate_reconstruction(tiny_vae(), photos[:4], batch_size=2, lpips_net=None,
                                     feature_extractor=CallableFeatureExtractor(pooled_pixels, name="Pool4"), progress=False)
    metrics = result["metrics"]
    assert set(metrics) == {"PSNR", "SSIM", "rFID-Pool4"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["PSNR"] < 40 and -1 <= metrics["SSIM"] <= 1
    assert result["skipped"] == {"LPIPS": "lpips_net=None"}


def test_evaluate_reconstruction_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        os.makedirs(tmp_path / "empty")
        evaluate_reconstruction(lambda x: x, str(tmp_path / "empty"), lpips_net=None, progress=False)
    with pytest.raises(ValueError, match="reconstruction has shape"):
        evaluate_reconstruction(lambda x: x[..., :-1], torch.zeros(2, 3, 16, 16), lpips_net=None, progress=False)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        evaluate_reconstruction(42, torch.zeros(2, 3, 16, 16), lpips_net=None, progress=False)


def test_reference_features_cache_is_read_when_it_matches_and_rebuilt_when_not(tmp_path, photos):
    """Scoring many models against one reference set: its features are computed once, and only reused for the same
    extractor, images, resolution and sample cap."""
    from safetensors import safe_open

    folder = tmp_path / "reference"
    save_image_folder(photos, str(folder))
    samples = save_npz(photos * 0.5, str(tmp_path / "samples.npz"))
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return pooled_pixels(x)

    extractor = CallableFeatureExtractor(counting, name="Pool4")
    cache = str(tmp_path / "cache" / "reference.safetensors")
    plain = evaluate_generation(samples, str(folder), feature_extractor=extractor, batch_size=4, progress=False)
    calls.clear()
    first = evaluate_generation(samples, str(folder), feature_extractor=extractor, batch_size=4, progress=False,
                                reference_cache=cache)
    assert first["settings"]["reference_cache"]["state"] == "written" and sum(calls) == 2 * len(photos)
    calls.clear()
    second = evaluate_generation(samples, str(folder), feature_extractor=extractor, batch_size=4, progress=False,
                                 reference_cache=cache)
    assert second["settings"]["reference_cache"]["state"] == "read" and sum(calls) == len(photos)  # samples only
    assert second["metrics"] == first["metrics"] == plain["metrics"]
    with safe_open(cache, framework="pt") as archive:
        assert set(archive.keys()) == {"pool"} and "Pool4" in archive.metadata()["ssreg_reference_key"]
    # Another sample cap, or a changed reference set: recomputed and rewritten, never a stale read.
    capped = evaluate_generation(samples, str(folder), feature_extractor=extractor, batch_size=4, progress=False,
                                 max_samples=5, reference_cache=cache)
    assert capped["settings"]["reference_cache"]["state"] == "written" and capped["num_reference"] == 5
    os.remove(next(folder.iterdir()))
    fewer = evaluate_generation(samples, str(folder), feature_extractor=extractor, batch_size=4, progress=False,
                                reference_cache=cache)
    assert fewer["settings"]["reference_cache"]["state"] == "written" and fewer["num_reference"] == len(photos) - 1
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp" in p]
    with pytest.raises(ValueError, match="`reference_cache` needs `reference` to be a folder"):
        evaluate_generation(samples, torch.as_tensor(photos), feature_extractor=extractor, reference_cache=cache,
                            progress=False)


def test_reference_cache_is_keyed_by_the_extractor_weights(tmp_path, photos):
    """Two weight files under one extractor name (e.g. two Inception files) must never share cached features."""
    from diffusers_ssreg.evaluation.features import FeatureExtractor
    from diffusers_ssreg.evaluation.metrics import extractor_weights_fingerprint

    class Projection(FeatureExtractor):
        name = "Proj"

        def __init__(self, seed):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 4 * 4, 8)
            torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(seed))
            torch.nn.init.zeros_(self.linear.bias)
            self.norm = torch.nn.BatchNorm1d(8)  # a 0-dim int64 buffer too (num_batches_tracked)
            self.scale = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))

        def forward(self, x):
            return {"pool": self.linear(pooled_pixels(x))}

    a, same, other = Projection(0), Projection(0), Projection(1)
    assert extractor_weights_fingerprint(a) == extractor_weights_fingerprint(same) != extractor_weights_fingerprint(other)
    assert extractor_weights_fingerprint(CallableFeatureExtractor(pooled_pixels, name="Pool4")) is None
    folder = tmp_path / "reference"
    save_image_folder(photos, str(folder))
    samples = save_npz(photos * 0.5, str(tmp_path / "samples.npz"))
    cache = str(tmp_path / "reference.safetensors")
    states = [evaluate_generation(samples, str(folder), feature_extractor=e, batch_size=4, progress=False,
                                  reference_cache=cache)["settings"]["reference_cache"]["state"] for e in (a, same, other)]
    assert states == ["written", "read", "written"]
