"""`ssreg-eval`: reconstruction, generation and latent-structure evaluation of diffusers VAEs.

    ssreg-eval reconstruction --vae A [--vae B ...] --data_dir IMAGES --output_dir OUT
    ssreg-eval latent         --vae A [--vae B ...] --data_dir IMAGES --output_dir OUT
    ssreg-eval compare        --vae A --vae B [...] --data_dir IMAGES --output_dir OUT   (both, one report)
    ssreg-eval generation     --samples SAMPLES --reference REFERENCE --output_dir OUT

Every subcommand writes JSON results and `report.md` (a markdown table, one row per model) into
`--output_dir`; the latent analyses also write PNG figures with all VAEs side by side. A VAE folder
written by `examples/finetune_vae.py` is labelled with the regularizer it was fine-tuned with. From Python,
`run([...])` does the same and returns the results dict; `main` is the console entry point.
"""

import argparse
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..images import extensions_text
from ..utils import add_deprecated_alias
from ._utils import resolve_device, save_json


ANALYSES = ("blur", "unmasking", "spectrum", "statistics")
LPIPS_CHOICES = ("vgg", "alex", "squeeze", "none")
EXTRACTOR_CHOICES = ("inception", "effnet-lite0", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="Folder for the JSON results, figures and report.md.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per batch.")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for image folders.")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")


def _add_feature_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--feature_extractor", default=default, choices=EXTRACTOR_CHOICES,
        help="Features for (r)FID/sFID/IS/precision/recall: 'inception' = the standard FID network (needs its weights "
             "file, see --inception_weights); 'effnet-lite0' = offline ImageNet EfficientNet-Lite0, scores labelled "
             "-EffNetLite0 and comparable only to each other; 'none' = skip.",
    )
    parser.add_argument("--inception_weights", default=None,
                        help="Path of weights-inception-2015-12-05-6726825d.pth (else $SSREG_INCEPTION_WEIGHTS, "
                             "torch.hub's cache, or a download).")
    parser.add_argument("--no_download", action="store_true", help="Never try to download the Inception weights.")


def _add_vae_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", action="append", required=True,
                        help="AutoencoderKL or AutoencoderKLFlux2: a Hub id or a local folder; repeat to compare several VAEs.")
    parser.add_argument("--vae_name", action="append", default=None,
                        help="Display name of each --vae (same count; default: the folder or repo name).")
    parser.add_argument("--vae_subfolder", action="append", default=None,
                        help="Subfolder of the VAE inside its repo/folder (e.g. 'vae'); one for all or one per --vae. "
                             "Local pipeline folders with a vae/ subfolder are detected.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the VAE forward passes.")
    data = parser.add_argument_group("data (one of --data_dir / --dataset_name)")
    data.add_argument("--data_dir", default=None,
                      help=f"Folder of images (recursive; files read: {extensions_text()}), or a .npz/.npy array of uint8 images.")
    data.add_argument("--dataset_name", default=None, help="A `datasets` name or path, loaded with datasets.load_dataset.")
    data.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name.")
    data.add_argument("--dataset_split", default="validation", help="Split of --dataset_name.")
    data.add_argument("--image_column", default="image", help="Image column of --dataset_name.")
    data.add_argument("--cache_dir", default=None, help="`datasets` cache folder for --dataset_name.")
    data.add_argument("--resolution", type=int, default=256,
                      help="Resize (short side) and centre-crop every image to this size; 0 keeps the files' size.")
    data.add_argument("--max_samples", type=int, default=None, help="Use at most this many images.")


def _add_reconstruction_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reconstruction")
    group.add_argument("--lpips_net", default="vgg", choices=LPIPS_CHOICES,
                       help="LPIPS backbone ('none' skips LPIPS; the backbone weights come from torchvision's cache).")
    group.add_argument("--sample_posterior", action="store_true", help="Decode posterior samples instead of means.")
    _add_feature_args(parser, default="inception")


def _add_latent_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("latent analyses")
    group.add_argument("--analyses", default=",".join(ANALYSES),
                       help=f"Comma-separated subset of {','.join(ANALYSES)}.")
    group.add_argument("--num_images", type=int, default=8, help="Images along the blur sequence (blur dynamics).")
    group.add_argument("--num_unmask_images", type=int, default=4, help="Images decoded at every unmasking step.")
    group.add_argument("--num_blur_steps", type=int, default=10, help="Blur levels including τ = 0 (Fig. 5 uses 10).")
    group.add_argument("--max_sigma_fraction", type=float, default=0.25,
                       help="Largest blur σ as a fraction of the image size (geometric sequence).")
    group.add_argument("--min_sigma", type=float, default=0.5, help="Smallest nonzero blur σ in pixels.")
    group.add_argument("--mask_value", default="mean", choices=("mean", "zero"),
                       help="Masked channels in unmasking: their spatial mean (default) or zero.")
    group.add_argument("--max_latent_samples", type=int, default=None,
                       help="Images for latent statistics and spectra (default: all, up to --max_samples).")
    group.add_argument("--no_fourier_reference", action="store_true",
                       help="Leave the Fourier-coefficient reference column out of the blur-dynamics figure.")


def parse_args(input_args: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses `ssreg-eval` arguments; cross-argument problems raise a ValueError naming the arguments."""
    parser = argparse.ArgumentParser(prog="ssreg-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    reconstruction = commands.add_parser("reconstruction", help="PSNR, SSIM, LPIPS, rFID of one or more VAEs.")
    latent = commands.add_parser("latent", help="Blur dynamics, channel unmasking, latent spectra and statistics.")
    compare = commands.add_parser("compare", help="Reconstruction and latent analyses of several VAEs in one report.")
    generation = commands.add_parser("generation", help="FID, sFID, IS, precision, recall between two image sets.")
    for sub in (reconstruction, latent, compare):
        _add_vae_and_data(sub)
        _add_common(sub)
        add_deprecated_alias(sub, "--subfolder", "--vae_subfolder")
    _add_reconstruction_args(reconstruction)
    _add_reconstruction_args(compare)
    _add_latent_args(latent)
    _add_latent_args(compare)
    generation.add_argument("--samples", required=True, help="Generated images: a folder or a .npz/.npy file.")
    generation.add_argument("--reference", required=True, help="Reference images: a folder or a .npz/.npy file "
                                                                "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz).")
    generation.add_argument("--resolution", type=int, default=0,
                            help="Resize + centre-crop both sets to this size (default 0: keep the files' size).")
    generation.add_argument("--max_samples", type=int, default=None, help="Use at most this many images of each set.")
    generation.add_argument("--neighborhood", type=int, default=3, help="k of the k-NN manifolds (precision/recall).")
    generation.add_argument("--splits", type=int, default=10, help="Splits of the Inception Score.")
    generation.add_argument("--reference_cache", default=None, metavar="FILE.safetensors",
                            help="Cache of the reference features: read when it matches (same extractor and weights, reference files, "
                                 "resolution, --max_samples), else computed and written. For scoring many models "
                                 "against one reference set.")
    _add_feature_args(generation, default="inception")
    _add_common(generation)
    args = parser.parse_args(input_args)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "num_images", "num_unmask_images", "num_blur_steps", "max_samples",
                 "max_latent_samples", "neighborhood", "splits"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}.")
    if getattr(args, "resolution", 0) is not None and args.resolution < 0:
        raise ValueError(f"--resolution must be >= 0 (0 keeps the files' size), got {args.resolution}.")
    if args.command == "generation" and args.feature_extractor == "none":
        raise ValueError("--feature_extractor none leaves nothing to compute for `generation`.")
    if args.command == "generation":
        return
    if (args.data_dir is None) == (args.dataset_name is None):
        raise ValueError(f"give exactly one of --data_dir and --dataset_name (got --data_dir={args.data_dir!r}, "
                         f"--dataset_name={args.dataset_name!r}).")
    if args.vae_name is not None and len(args.vae_name) != len(args.vae):
        raise ValueError(f"--vae_name was given {len(args.vae_name)} times but --vae {len(args.vae)} times; give one "
                         f"name per VAE or none.")
    if args.vae_subfolder is not None and len(args.vae_subfolder) not in (1, len(args.vae)):
        raise ValueError(f"--vae_subfolder was given {len(args.vae_subfolder)} times for {len(args.vae)} VAEs; give it "
                         f"once (for all) or once per --vae.")
    if hasattr(args, "analyses"):
        analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
        unknown = sorted(set(analyses) - set(ANALYSES))
        if unknown or not analyses:
            raise ValueError(f"--analyses must be a comma-separated subset of {','.join(ANALYSES)}, got {args.analyses!r}.")
        args.analyses = analyses


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_subfolder(pretrained_model_name_or_path: str, subfolder: Optional[str] = None) -> Optional[str]:
    """`subfolder`, or `"vae"` for a local pipeline folder (no config.json at its top, one in vae/)."""
    path = pretrained_model_name_or_path
    if subfolder is None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "vae", "config.json")):
            return "vae"
    return subfolder


def load_vae(pretrained_model_name_or_path: str, subfolder: Optional[str] = None, torch_dtype=torch.float32):
    """
    The VAE at `--vae` (`diffusers_ssreg.vae.load_vae`: its class checked before any weights load); a local
    pipeline folder's `vae/` is found on its own.
    """
    from ..vae import load_vae as load

    subfolder = resolve_subfolder(pretrained_model_name_or_path, subfolder)
    return load(pretrained_model_name_or_path, subfolder, flag="--vae", torch_dtype=torch_dtype)


def saved_regularizer(pretrained_model_name_or_path: str, subfolder: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """
    The regularizer a VAE was fine-tuned with, when its local folder holds the one `examples/finetune_vae.py` saves
    beside it (`ssreg/`, `eqvae/`, ..., `plain/`): `{"name", "label", "subfolder", "config"}`, else None (a Hub id,
    or a VAE trained elsewhere). `label` is the name, marked when SSReg ran with `alpha` 0 (plain fine-tuning).
    """
    import json

    from ..regularizers import REGULARIZERS

    folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
    if not os.path.isdir(folder):
        return None
    for spec in REGULARIZERS.values():
        path = os.path.join(folder, spec.subfolder, spec.config_class.config_name)
        if os.path.isfile(path):
            with open(path) as f:
                config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
            label = f"{spec.name} (alpha 0)" if spec.name == "ssreg" and config.get("alpha") == 0 else spec.name
            return {"name": spec.name, "label": label, "subfolder": spec.subfolder, "config": config}
    return None


def _vae_names(args: argparse.Namespace) -> List[str]:
    names = list(args.vae_name) if args.vae_name else []
    if not names:
        for path in args.vae:
            names.append(os.path.basename(os.path.normpath(path)) or path)
    seen: Dict[str, int] = {}
    unique = []
    for name in names:  # two folders both called "vae" stay apart in the report
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 and names.count(name) == 1 else f"{name}#{seen[name]}")
    return unique


def _data_source(args: argparse.Namespace) -> Tuple[Any, str]:
    from .io import load_dataset_images

    if args.data_dir is not None:
        return args.data_dir, f"`{args.data_dir}`"
    dataset = load_dataset_images(args.dataset_name, split=args.dataset_split, config_name=args.dataset_config_name,
                                  image_column=args.image_column, cache_dir=args.cache_dir)
    return dataset, f"`{args.dataset_name}` ({args.dataset_config_name or 'default'}, split {args.dataset_split})"


# --------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------


def _run_vaes(args: argparse.Namespace, reconstruction: bool, latent: bool) -> Dict[str, Any]:
    from . import latent as latent_analyses
    from . import plots
    from .features import build_feature_extractor
    from .metrics import evaluate_reconstruction
    from .report import write_report

    device = resolve_device(args.device)
    resolution = args.resolution or None
    source, data_description = _data_source(args)
    names = _vae_names(args)
    subfolders = args.vae_subfolder or [None]
    if len(subfolders) == 1:
        subfolders = subfolders * len(args.vae)
    progress = not args.no_progress
    os.makedirs(args.output_dir, exist_ok=True)

    lpips_model = extractor = None
    if reconstruction:
        if args.lpips_net != "none":
            from ..losses import build_lpips

            lpips_model = build_lpips(args.lpips_net, pretrained_backbone=True, how_to_skip="pass --lpips_net none to skip LPIPS")
        if args.feature_extractor != "none":
            extractor = build_feature_extractor(args.feature_extractor, inception_weights=args.inception_weights,
                                                allow_download=not args.no_download)

    results: Dict[str, Dict[str, Any]] = {}
    blur, unmask, spectra, statistics = {}, {}, {}, {}
    for name, path, subfolder in zip(names, args.vae, subfolders):
        subfolder = resolve_subfolder(path, subfolder)
        vae = load_vae(path, subfolder, DTYPES[args.dtype]).to(device).eval()
        entry: Dict[str, Any] = {"vae": {"pretrained_model_name_or_path": path, "subfolder": subfolder,
                                         "latent_channels": vae.config.latent_channels,
                                         "regularizer": saved_regularizer(path, subfolder)}}
        if reconstruction:
            entry["reconstruction"] = evaluate_reconstruction(
                vae, source, batch_size=args.batch_size, resolution=resolution, max_samples=args.max_samples,
                lpips_net=args.lpips_net if lpips_model is not None else None, lpips_model=lpips_model,
                feature_extractor=extractor, sample_posterior=args.sample_posterior, device=device,
                num_workers=args.num_workers, progress=progress, description=f"reconstruction [{name}]",
            )
        if latent:
            entry["latent"] = {}
            if "blur" in args.analyses:
                blur[name] = latent_analyses.blur_dynamics(
                    vae, source, num_images=args.num_images, num_steps=args.num_blur_steps,
                    max_sigma_fraction=args.max_sigma_fraction, min_sigma=args.min_sigma, resolution=resolution,
                    batch_size=args.batch_size, device=device)
                entry["latent"]["blur_dynamics"] = blur[name].to_dict()
            if "unmasking" in args.analyses:
                unmask[name] = latent_analyses.channel_unmasking(
                    vae, source, mask_value=args.mask_value, num_images=args.num_unmask_images,
                    resolution=resolution, device=device)
                entry["latent"]["unmasking"] = unmask[name].to_dict()
            if "spectrum" in args.analyses or "statistics" in args.analyses:
                stats, spectrum = latent_analyses.latent_statistics_and_spectrum(
                    vae, source, batch_size=args.batch_size, resolution=resolution,
                    max_samples=args.max_latent_samples or args.max_samples, device=device,
                    num_workers=args.num_workers, progress=progress)
                if "spectrum" in args.analyses:
                    spectra[name] = spectrum
                    entry["latent"]["spectrum"] = spectrum.to_dict()
                if "statistics" in args.analyses:
                    statistics[name] = stats
                    entry["latent"]["statistics"] = stats.to_dict()
        results[name] = entry
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()

    figures: Dict[str, str] = {}
    extra_rows: Dict[str, Dict[str, Any]] = {}
    figure_dir = args.output_dir
    if blur:
        panels = dict(blur)
        if not args.no_fourier_reference:
            grid = next(iter(blur.values())).grid
            reference = latent_analyses.blur_dynamics(
                latent_analyses.FourierCoefficientEncoder(grid), source, num_images=args.num_images,
                num_steps=args.num_blur_steps, max_sigma_fraction=args.max_sigma_fraction, min_sigma=args.min_sigma,
                resolution=resolution, device="cpu")
            panels["Fourier (reference)"] = reference
            extra_rows["Fourier (reference)"] = {"coherence": reference.coherence,
                                                 "energy_coherence": reference.energy_coherence}
            results_reference = {"blur_dynamics": reference.to_dict()}
        figures["Blur dynamics (Fig. 5)"] = _save(plots.plot_blur_dynamics(panels), figure_dir, "blur_dynamics.png")
    if unmask:
        figures["Channel unmasking (Fig. 6)"] = _save(plots.plot_unmasking(unmask), figure_dir, "unmasking.png")
        figures["Unmasking PSNR"] = _save(plots.plot_unmasking_psnr(unmask), figure_dir, "unmasking_psnr.png")
    if spectra:
        figures["Latent power spectra"] = _save(plots.plot_power_spectrum(spectra), figure_dir, "latent_spectrum.png")
    if statistics:
        figures["Latent statistics"] = _save(plots.plot_latent_statistics(statistics), figure_dir, "latent_statistics.png")

    output = {"command": _command_line(args), "data": data_description, "resolution": resolution, "models": results}
    if blur and not args.no_fourier_reference:
        output["fourier_reference"] = results_reference
    json_name = {(True, False): "reconstruction.json", (False, True): "latent.json"}.get((reconstruction, latent),
                                                                                         "results.json")
    output["json"] = save_json(output, os.path.join(args.output_dir, json_name))
    title = {"reconstruction": "Reconstruction", "latent": "Latent structure", "compare": "VAE comparison"}[args.command]
    output["report"] = write_report(args.output_dir, results, figures, title=title,
                                    data_description=f"{data_description}, resolution {resolution or 'as stored'}",
                                    command=output["command"], extra_rows=extra_rows)
    output["figures"] = figures
    return output


def _save(figure, folder: str, filename: str) -> str:
    from .plots import save_figure

    path = save_figure(figure, os.path.join(folder, filename))
    figure.clear()
    return path


def _run_generation(args: argparse.Namespace) -> Dict[str, Any]:
    from .metrics import evaluate_generation
    from .report import write_report

    result = evaluate_generation(
        args.samples, args.reference, feature_extractor=args.feature_extractor, batch_size=args.batch_size,
        resolution=args.resolution or None, max_samples=args.max_samples, device=args.device,
        num_workers=args.num_workers, neighborhood=args.neighborhood, splits=args.splits,
        inception_weights=args.inception_weights, allow_download=not args.no_download, progress=not args.no_progress,
        reference_cache=args.reference_cache,
    )
    result["command"] = _command_line(args)
    result["samples"], result["reference"] = args.samples, args.reference
    result["json"] = save_json(result, os.path.join(args.output_dir, "generation.json"))
    name = os.path.basename(os.path.normpath(args.samples)) or args.samples
    result["report"] = write_report(
        args.output_dir, {name: {"generation": result}}, title="Generation",
        data_description=f"{result['num_samples']} samples from `{args.samples}` against {result['num_reference']} "
                         f"reference images from `{args.reference}`",
        command=result["command"])
    return result


def _command_line(args: argparse.Namespace) -> str:
    return "ssreg-eval " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", []))


def run(args: Optional[List[str]] = None) -> Dict[str, Any]:
    """Runs one `ssreg-eval` command given its arguments (default `sys.argv[1:]`) and returns the results dict
    (also written to `--output_dir`); errors are raised as exceptions."""
    argv = list(sys.argv[1:] if args is None else args)
    namespace = parse_args(argv)
    namespace._argv = argv
    if namespace.command == "generation":
        output = _run_generation(namespace)
    else:
        output = _run_vaes(namespace, reconstruction=namespace.command in ("reconstruction", "compare"),
                           latent=namespace.command in ("latent", "compare"))
    with open(output["report"]) as f:
        table = [line for line in f.read().splitlines() if line.startswith("|")]
    print("\n".join(table))
    print(f"\nwrote {output['report']} and {output['json']}")
    for path in output.get("figures", {}).values():
        print(f"wrote {path}")
    return output


def main(args: Optional[List[str]] = None) -> int:
    """Console entry point of `ssreg-eval`: input and availability errors print one line and exit with status 2."""
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        print(f"ssreg-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
