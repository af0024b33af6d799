"""Evaluation of SSReg VAEs: reconstruction and generation metrics, latent-structure analyses, figures, reports.

Importing this package needs only the core dependencies; torchmetrics, torch-fidelity, lpips, matplotlib,
tqdm, datasets and the EfficientNet-Lite0 packages are imported when a function needs them (install
them with `pip install diffusers-ssreg[train]`). The command-line front end is `ssreg-eval`
(`diffusers_ssreg.evaluation.cli`); docs/evaluation.md explains every number and figure.
"""

from .features import (
    FEATURE_EXTRACTORS,
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    CallableFeatureExtractor,
    EfficientNetLite0FeatureExtractor,
    FeatureExtractor,
    InceptionFeatureExtractor,
    build_feature_extractor,
    resolve_inception_weights,
)
from .io import (
    ImageBatches,
    ImageFolderDataset,
    first_images,
    image_batches,
    list_image_files,
    load_dataset_images,
    save_image_folder,
    save_npz,
)
from .latent import (
    BlurDynamicsResult,
    ExponentialFit,
    FourierCoefficientEncoder,
    LatentStatisticsResult,
    PowerSpectrumResult,
    UnmaskingResult,
    as_decoder,
    as_encoder,
    blur_dynamics,
    blur_variances,
    channel_unmasking,
    fit_exponential,
    latent_power_spectrum,
    latent_statistics,
    latent_statistics_and_spectrum,
    radial_power_spectrum,
    spectral_slope,
)
from .metrics import (
    GaussianStatistics,
    evaluate_generation,
    evaluate_reconstruction,
    extract_features,
    frechet_distance,
    gaussian_statistics,
    generation_metrics_from_features,
    inception_score,
    precision_recall,
    psnr,
    ssim,
)
from .report import markdown_table, write_report


_PLOTS = ("log_to_tensorboard", "plot_blur_dynamics", "plot_latent_statistics", "plot_power_spectrum",
          "plot_unmasking", "plot_unmasking_psnr", "save_figure")


def __getattr__(name):
    # The plotting functions live in `plots`, imported on first use (it is light, but keeps the namespace
    # import free of any matplotlib lookup).
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FEATURE_EXTRACTORS",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "BlurDynamicsResult",
    "CallableFeatureExtractor",
    "EfficientNetLite0FeatureExtractor",
    "ExponentialFit",
    "FeatureExtractor",
    "FourierCoefficientEncoder",
    "GaussianStatistics",
    "ImageBatches",
    "ImageFolderDataset",
    "InceptionFeatureExtractor",
    "LatentStatisticsResult",
    "PowerSpectrumResult",
    "UnmaskingResult",
    "as_decoder",
    "as_encoder",
    "blur_dynamics",
    "blur_variances",
    "build_feature_extractor",
    "channel_unmasking",
    "evaluate_generation",
    "evaluate_reconstruction",
    "extract_features",
    "first_images",
    "fit_exponential",
    "frechet_distance",
    "gaussian_statistics",
    "generation_metrics_from_features",
    "image_batches",
    "inception_score",
    "latent_power_spectrum",
    "latent_statistics",
    "latent_statistics_and_spectrum",
    "list_image_files",
    "load_dataset_images",
    "markdown_table",
    "precision_recall",
    "psnr",
    "radial_power_spectrum",
    "resolve_inception_weights",
    "save_image_folder",
    "save_npz",
    "spectral_slope",
    "ssim",
    "write_report",
    *_PLOTS,
]
