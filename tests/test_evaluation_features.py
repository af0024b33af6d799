"""Feature extractors of diffusers_ssreg.evaluation: the offline EfficientNet-Lite0, the FID Inception path and its errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_ssreg.evaluation import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    CallableFeatureExtractor,
    EfficientNetLite0FeatureExtractor,
    InceptionFeatureExtractor,
    build_feature_extractor,
    resolve_inception_weights,
)


torch.set_num_threads(1)


def chelsea(size=96):
    """scikit-image's bundled photo of a cat, `(1, 3, size, size)` in [-1, 1]."""
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1).float() / 127.5 - 1
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)


@pytest.fixture
def no_inception_weights(tmp_path, monkeypatch):
    """An empty torch.hub cache and no $SSREG_INCEPTION_WEIGHTS."""
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path
    torch.hub.set_dir(previous)


def test_effnet_lite0_builds_offline_with_features_of_the_right_shape():
    extractor = EfficientNetLite0FeatureExtractor()
    assert extractor.name == "EffNetLite0" and not extractor.standard
    assert extractor.metric_suffix == "-EffNetLite0"
    assert "project-internal" in extractor.describe()["note"]
    images = torch.cat([chelsea(), chelsea().flip(-1)])
    with torch.no_grad():
        features = extractor(images)
    assert features["pool"].shape == (2, 1280)
    assert features["spatial"].shape == (2, 7 * 14 * 14)
    assert features["logits"].shape == (2, 1000)
    # The ImageNet weights are really loaded: the cat is classified as one of the domestic cats (281-285).
    assert 281 <= int(features["logits"][0].argmax()) <= 285


def test_inception_missing_weights_give_a_clear_error(no_inception_weights):
    with pytest.raises(RuntimeError) as error:
        resolve_inception_weights(allow_download=False)
    message = str(error.value)
    for needle in (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_ENV, "--inception_weights", "effnet-lite0", "not comparable"):
        assert needle in message
    with pytest.raises(RuntimeError, match=INCEPTION_WEIGHTS_FILE):
        build_feature_extractor("inception", allow_download=False)


def test_inception_weights_path_that_does_not_exist(no_inception_weights, monkeypatch):
    missing = str(no_inception_weights / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        InceptionFeatureExtractor(weights_path=missing)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, missing)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV):
        resolve_inception_weights()


def test_inception_path_with_a_local_weights_file(no_inception_weights, monkeypatch):
    # A random-weights file with the right keys stands in for the real one (which can't be downloaded here):
    # it exercises loading from a local path, the sFID hook and the output shapes.
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        network = inception.FeatureExtractorInceptionV3("random", ["2048"])
    path = no_inception_weights / "random-inception.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}, path)
    del network
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    with pytest.warns(UserWarning, match="not the standard"):
        extractor = build_feature_extractor("inception", allow_download=False)
    assert extractor.standard and extractor.metric_suffix == ""
    with torch.no_grad():
        features = extractor(torch.cat([chelsea(64), -chelsea(64)]))
    assert features["pool"].shape == (2, 2048)
    assert features["spatial"].shape == (2, 7 * 17 * 17)  # ADM's sFID layout: mixed_6/conv, first 7 channels
    assert features["logits"].shape == (2, 1008)
    assert all(torch.isfinite(v).all() for v in features.values())


def test_callable_extractors_are_labelled_and_checked():
    extractor = build_feature_extractor(lambda x: x.mean(dim=(2, 3)), name="ChannelMean")
    assert isinstance(extractor, CallableFeatureExtractor) and extractor.metric_suffix == "-ChannelMean"
    assert extractor(torch.zeros(2, 3, 8, 8))["pool"].shape == (2, 3)
    with pytest.raises(ValueError, match="reserved"):
        CallableFeatureExtractor(lambda x: x, name="Inception")
    with pytest.raises(ValueError, match="pool"):
        CallableFeatureExtractor(lambda x: {"features": x}, name="Bad")(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="feature_extractor"):
        build_feature_extractor("resnet50")
    with pytest.raises(TypeError, match="feature_extractor"):
        build_feature_extractor(3.5)
