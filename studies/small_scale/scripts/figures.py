#!/usr/bin/env python
"""
Comparison figures of a small-scale study (studies/small_scale/Snakefile): the arms side by side.

    python studies/small_scale/scripts/figures.py STUDY --output_dir STUDY/figures

STUDY is a study folder (the config's `study_dir`: the one holding `arms/`, `base/`, `study_config.json`). The
workflow runs this last (rule `figures`). The figures read only small result files:

    base/eval/results.json, arms/<arm>/seed<k>/eval/results.json   (ssreg-eval compare: latent analyses)
    arms/<arm>/seed<k>/finetune/logs/train_metrics.jsonl           (fine-tune log, one JSON per logged step)
    arms/<arm>/seed<k>/dit/samples/final.png                       (a grid of DiT samples)

and write, under --output_dir:

    unmasking.png          decode PSNR vs channels unmasked in low-to-high frequency order (paper Fig. 6)
    blur_dynamics.png      per arm, the channels' spatial-mean trajectories vs blur variance (Fig. 5)
    latent_spectrum.png    channel-averaged latent power spectrum vs frequency (log-log)
    channel_std.png        per-channel latent std, channels in frequency order
    training_curves.png    rec_mae, kl and latent_mse vs fine-tune step
    samples.png            the DiT sample grids (first seed of each arm)

Where an arm has several seeds, a line is their mean and the shaded band their min-max range. A study
cut short is fine: missing pieces are skipped, and each skip is said on stdout.

    python studies/small_scale/scripts/figures.py --units FOLDER [FOLDER ...] --output_dir OUT

draws from unit files instead (`units/<arm>_seed<k>.json` and `.png`, scripts/unit.py), from any number of runs:

    samples_<arm>.png      the arm's sample grids, one per seed
    dit_loss.png           the DiT's training loss vs step, per arm (mean over seeds, band = min-max)
"""

import argparse
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


BASE = "base"
FIGURE_NAMES = ("unmasking.png", "blur_dynamics.png", "latent_spectrum.png", "channel_std.png", "training_curves.png",
                "samples.png")  # fmt: skip
TRAINING_KEYS = (  # (key in train_metrics.jsonl, axis label, log scale)
    ("rec_mae", "reconstruction MAE", True),
    ("kl", "KL", True),
    ("latent_mse", "latent MSE (SSReg branch)", True),
)
MAX_FILE_BYTES = 300 * 1024
DPIS = (120, 100, 85, 72, 60, 50)  # tried in turn until a figure fits in MAX_FILE_BYTES


def say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Reading the study
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One arm and seed (or the base VAE): what it left behind."""

    label: str  # arm name, or "base"
    seed: Optional[int]
    init: Optional[str] = None  # the config's arm init: "base" (fine-tune of the base VAE) or "scratch"
    latent: Optional[dict] = None  # results.json -> models -> <model> -> latent
    train_log: List[dict] = field(default_factory=list)  # finetune/logs/train_metrics.jsonl
    samples: Optional[str] = None  # dit/samples/final.png


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def as_floats(values) -> np.ndarray:
    """A JSON list of numbers (which may hold "nan"/"inf" strings or null) as a float array."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def read_latent(path: str, where: str) -> Optional[dict]:
    """The `latent` section of the single model in an `ssreg-eval compare` results.json (None, said, if unusable)."""
    if not os.path.isfile(path):
        say(f"  skip {where}: no eval/results.json")
        return None
    try:
        models = read_json(path)["models"]
        latent = next(iter(models.values()))["latent"]
    except (ValueError, KeyError, StopIteration, TypeError) as error:
        say(f"  skip {where}: eval/results.json has no latent analyses ({type(error).__name__}: {error})")
        return None
    return latent


def read_train_log(path: str, where: str) -> List[dict]:
    if not os.path.isfile(path):
        say(f"  skip {where}: no finetune/logs/train_metrics.jsonl")
        return []
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(path)), "README.md")):
        # as in the study's tables: only finished runs count (the model card is the last file a run writes)
        say(f"  skip {where}: finetune/README.md is missing (the run did not finish)")
        return []
    from diffusers_ssreg.training import read_metrics_log  # (a line cut off by a killed run is skipped)

    rows = [row for row in read_metrics_log(path) if isinstance(row, dict) and "step" in row]
    if not rows:
        say(f"  skip {where}: finetune/logs/train_metrics.jsonl has no logged step")
    return rows


def read_config_arms(root: str) -> Dict[str, dict]:
    """The config's arms in its order, {arm: {"init": "base" | "scratch", ...}} (from study_config.json)."""
    try:
        arms = read_json(os.path.join(root, "study_config.json"))["arms"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {arm: info if isinstance(info, dict) else {} for arm, info in arms.items()} if isinstance(arms, dict) else {}


def arm_order(planned: List[str], found: List[str]) -> List[str]:
    """The config's arm order, then any other arm folder, alphabetically."""
    for arm in planned:
        if arm not in found:
            say(f"  skip arm {arm}: in the config but no arms/{arm}/ folder (not run)")
    return [a for a in planned if a in found] + sorted(a for a in found if a not in planned)


def load_study(root: str) -> Dict[str, List[Run]]:
    """{label: [Run per seed, by seed]}, the base first (label "base", one run) when it was evaluated."""
    say(f"reading {root}")
    runs: Dict[str, List[Run]] = {}
    base_latent = read_latent(os.path.join(root, "base", "eval", "results.json"), "base")
    if base_latent is not None:
        runs[BASE] = [Run(BASE, None, latent=base_latent)]
    arms_dir = os.path.join(root, "arms")
    found = sorted(d for d in os.listdir(arms_dir) if os.path.isdir(os.path.join(arms_dir, d))) if os.path.isdir(arms_dir) else []
    found = [d for d in found if d != BASE]  # arms/base/: the base VAE's own chain (the workflow's `pilot`), no arm
    config_arms = read_config_arms(root)
    for arm in arm_order(list(config_arms), found):
        seeds = []
        for name in os.listdir(os.path.join(arms_dir, arm)):
            match = re.fullmatch(r"seed(\d+)", name)
            if match and os.path.isdir(os.path.join(arms_dir, arm, name)):
                seeds.append(int(match.group(1)))
        if not seeds:
            say(f"  skip arm {arm}: no seed folder")
            continue
        for seed in sorted(seeds):
            folder = os.path.join(arms_dir, arm, f"seed{seed}")
            where = f"{arm}/seed{seed}"
            samples = os.path.join(folder, "dit", "samples", "final.png")
            run = Run(arm, seed, init=config_arms.get(arm, {}).get("init"),
                      latent=read_latent(os.path.join(folder, "eval", "results.json"), where),
                      train_log=read_train_log(os.path.join(folder, "finetune", "logs", "train_metrics.jsonl"), where),
                      samples=samples if os.path.isfile(samples) else None)  # fmt: skip
            if run.samples is None:
                say(f"  skip {where}: no dit/samples/final.png")
            runs.setdefault(arm, []).append(run)
    return runs


# --------------------------------------------------------------------------------------------
# Figure helpers
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(figure, path: str) -> str:
    """Writes a PNG under MAX_FILE_BYTES: the first dpi of DPIS that fits, as RGB or, failing that, a 256-colour palette."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    data = b""
    for dpi in DPIS:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
        data = buffer.getvalue()
        if len(data) > MAX_FILE_BYTES:  # photos (the samples) compress badly: try an adaptive palette
            image = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
            buffer = io.BytesIO()
            image.save(buffer, format="png", optimize=True)
            data = min(data, buffer.getvalue(), key=len)
        if len(data) <= MAX_FILE_BYTES:
            break
    with open(path, "wb") as f:
        f.write(data)
    say(f"wrote {path} ({len(data) / 1024:.0f} KiB)")
    return path


def colors_for(labels: List[str]) -> Dict[str, object]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    arms = [label for label in labels if label != BASE]
    colors = {arm: palette[i % len(palette)] for i, arm in enumerate(arms)}
    colors[BASE] = (0.0, 0.0, 0.0)
    return colors


def style(label: str) -> dict:
    return {"linestyle": "--", "linewidth": 1.6} if label == BASE else {"linestyle": "-", "linewidth": 1.4}


def legend_label(label: str, n: int) -> str:
    if label == BASE:
        return "base (shared init)"
    return f"{label} ({n} seed{'s' if n != 1 else ''})"


def plot_mean_band(ax, x, curves: List[np.ndarray], label: str, color, legend: str, marker: Optional[str] = None):
    """The mean of `curves` (one per seed) as a line, their min-max range as a band when there are several."""
    stack = np.vstack(curves)
    with warnings.catch_warnings():  # a column of NaN (e.g. the infinite last unmasking step) stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, low, high = np.nanmean(stack, axis=0), np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
    ax.plot(x, mean, color=color, marker=marker, markersize=3.5, label=legend, **style(label))
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)


def frequency_order(grid) -> List[int]:
    """Channels of a (H, W) basis grid from low to high frequency: by w + h, ties by index (channel n = (n mod W, n div W))."""
    height, width = int(grid[0]), int(grid[1])
    return sorted(range(height * width), key=lambda n: (n % width + n // width, n))


def basis_index(channel: int, grid) -> tuple:
    width = int(grid[1])
    return channel % width, channel // width


def section(runs: List[Run], name: str) -> List[dict]:
    """The `latent[name]` sections of the runs that have one."""
    return [r.latent[name] for r in runs if r.latent and isinstance(r.latent.get(name), dict)]


def available(figure: str, runs: Dict[str, List[Run]], select, what: str, with_base: bool = True) -> Dict[str, list]:
    """label -> `select(its runs)` for the labels where that is not empty; says each label left out, and says when
    nothing is left (then the figure is skipped)."""
    kept = {}
    for label, label_runs in runs.items():
        if label == BASE and not with_base:
            continue
        chosen = select(label_runs)
        if chosen:
            kept[label] = chosen
        else:
            say(f"  {figure}: no {what} for {label}")
    if not kept:
        say(f"  {figure}: nothing to draw, skipped")
    return kept


# --------------------------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------------------------


def figure_unmasking(runs: Dict[str, List[Run]], path: str) -> Optional[str]:
    """PSNR to the input (left) and to the full reconstruction (right) vs the number of channels unmasked."""
    data = available("unmasking", runs, lambda r: [u for u in section(r, "unmasking") if u.get("psnr")], "unmasking results")
    if not data:
        return None
    colors = colors_for(list(runs))
    figure = new_figure(11.5, 4.4)
    axes = figure.subplots(1, 2)
    first = next(iter(data.values()))[0]
    for ax, key, ylabel in ((axes[0], "psnr", "PSNR to the input image (dB)"),
                            (axes[1], "psnr_to_reconstruction", "PSNR to the full reconstruction (dB)")):  # fmt: skip
        for label, sections in data.items():
            curves = [as_floats(u[key]) for u in sections if u.get(key)]
            if not curves or len({len(c) for c in curves}) != 1:
                continue
            curves = [np.where(np.isfinite(c), c, np.nan) for c in curves]  # all channels: identical decode, PSNR inf
            steps = np.arange(1, len(curves[0]) + 1)
            plot_mean_band(ax, steps, curves, label, colors[label], legend_label(label, len(curves)), marker="o")
        ax.set_xlabel("channels unmasked (low-to-high frequency order)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if first.get("order") and first.get("grid"):  # tick k: the channel added at step k, with its basis index (w, h)
            order = first["order"]
            ax.set_xticks(np.arange(1, len(order) + 1))
            ax.set_xticklabels([f"{k}\n{w},{h}" for k, (w, h) in
                                enumerate((basis_index(n, first["grid"]) for n in order), start=1)], fontsize=6.5)  # fmt: skip
    axes[1].text(0.98, 0.03, "tick: k, then (w, h) of the channel added\nlast step = full decode (∞ dB, not drawn)",
                 transform=axes[1].transAxes, ha="right", va="bottom", fontsize=7, color="0.35")
    axes[0].legend(fontsize=7.5, loc="lower right")
    masked = first.get("mask_value", "?")
    figure.suptitle(f"Channel unmasking (paper Fig. 6): channels revealed one at a time, the others set to their {masked}\n"
                    "mean over seeds, band = min-max", fontsize=10)
    return save(figure, path)


def figure_blur_dynamics(runs: Dict[str, List[Run]], path: str) -> Optional[str]:
    """One panel per arm (first seed with results) and the base: each channel's spatial mean along the blur sequence."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    usable = available("blur_dynamics", runs, lambda label_runs: [
        r for r in label_runs if r.latent and r.latent.get("blur_dynamics", {}).get("mean_trajectories")], "blur dynamics")
    if not usable:
        return None
    panels = [(label, kept[0], [float(r.latent["blur_dynamics"].get("coherence", "nan")) for r in kept])
              for label, kept in usable.items()]  # fmt: skip
    rows = math.ceil(len(panels) / 4)
    columns = math.ceil(len(panels) / rows)
    figure = new_figure(3.6 * columns + 0.6, 3.0 * rows + 0.9)
    axes = figure.subplots(rows, columns, squeeze=False)
    top_group = 1
    for label, run, _ in panels:
        grid = run.latent["blur_dynamics"].get("grid", [1, 1])
        top_group = max(top_group, int(grid[0]) + int(grid[1]) - 2)
    for ax, (label, run, coherences) in zip(axes.flat, panels):
        blur = run.latent["blur_dynamics"]
        variances = as_floats(blur["variances"])
        grid = blur.get("grid", [1, len(blur["mean_trajectories"])])
        statics = {c.get("channel"): c.get("static", False) for c in blur.get("channels", [])}
        for channel in reversed(frequency_order(grid)):  # low frequencies drawn last, on top
            trajectory = as_floats(blur["mean_trajectories"][channel])
            group = sum(basis_index(channel, grid))
            ax.plot(variances, trajectory, color=colormaps["viridis"](0.9 * group / top_group), linewidth=1.1,
                    linestyle=":" if statics.get(channel) else "-", marker="o", markersize=2)
        ax.set_xscale("symlog", linthresh=max(float(variances[variances > 0].min()), 1e-3) if (variances > 0).any() else 1.0)
        name = label if run.seed is None else f"{label}, seed {run.seed}"
        title = f"{name}\ncoherence {coherences[0]:.3f}"
        if len(coherences) > 1:
            title += f"  ({len(coherences)} seeds: {min(coherences):.3f}–{max(coherences):.3f})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("blur variance τ (pixels², symlog)", fontsize=8)
        ax.set_ylabel("channel spatial mean", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    groups = [Line2D([], [], color=colormaps["viridis"](0.9 * g / top_group), label=f"w+h = {g}") for g in range(top_group + 1)]
    figure.legend(handles=groups, loc="outside right center", fontsize=7.5, title="channel\nfrequency", title_fontsize=7.5)
    images = panels[0][1].latent["blur_dynamics"].get("num_images", "the")
    figure.suptitle(f"Blur dynamics (paper Fig. 5): each latent channel's spatial mean, averaged over {images} images, "
                    "as the input is blurred\ncoherence = mean R² of one-exponential fits over the moving channels "
                    "(1 = Fourier-like); dotted = static channel", fontsize=10)
    return save(figure, path)


def figure_latent_spectrum(runs: Dict[str, List[Run]], path: str) -> Optional[str]:
    """Channel-averaged PSD of the centred latents vs cycles per image: as measured (left) and relative to its first bin (right)."""
    data = available("latent_spectrum", runs, lambda r: [
        s for s in section(r, "spectrum") if s.get("psd") and s.get("frequencies_cycles_per_latent_pixel")], "spectrum")
    if not data:
        return None
    colors = colors_for(list(runs))
    figure = new_figure(11.5, 4.4)
    axes = figure.subplots(1, 2)
    image_reference = None
    for label, sections in data.items():
        side = [int(s.get("latent_size", [1, 1])[1]) for s in sections]
        frequencies = as_floats(sections[0]["frequencies_cycles_per_latent_pixel"]) * side[0]
        curves = [np.nanmean(np.vstack([as_floats(c) for c in s["psd"]]), axis=0) for s in sections]
        if len({len(c) for c in curves}) != 1:
            say(f"  latent_spectrum: {label}'s seeds disagree on the frequency bins; only the first seed drawn")
            curves = curves[:1]
        slopes = [float(s.get("mean_slope", "nan")) for s in sections]
        legend = legend_label(label, len(curves)) + f", slope {np.nanmean(slopes):.2f}"
        plot_mean_band(axes[0], frequencies, curves, label, colors[label], legend, marker="o")
        plot_mean_band(axes[1], frequencies, [c / c[0] for c in curves], label, colors[label], legend, marker="o")
        if image_reference is None and sections[0].get("image_psd") and sections[0].get("image_frequencies_cycles_per_pixel"):
            s = sections[0]
            image_frequencies = as_floats(s["image_frequencies_cycles_per_pixel"]) * int(s.get("image_size", [1, 1])[1])
            image_reference = (image_frequencies, as_floats(s["image_psd"]), float(s.get("image_slope", "nan")))
    if image_reference is not None:
        frequencies, psd, slope = image_reference
        keep = frequencies <= axes[1].get_xlim()[1]
        axes[1].plot(frequencies[keep], psd[keep] / psd[0], color="0.5", linestyle=":", linewidth=1.6,
                     label=f"input images' luminance, slope {slope:.2f}")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    bins = sorted({float(f) for sections in data.values() for f in
                   as_floats(sections[0]["frequencies_cycles_per_latent_pixel"]) * int(sections[0].get("latent_size", [1, 1])[1])})
    for ax, ylabel in ((axes[0], "PSD, mean over channels"), (axes[1], "PSD / PSD at the lowest frequency")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(bins))  # the measured bins, as plain numbers
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("spatial frequency (cycles per image)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("as measured (scale differs between VAEs)", fontsize=9)
    axes[1].set_title("relative: the shape of the decay", fontsize=9)
    axes[1].legend(fontsize=7)
    figure.suptitle("Latent power spectrum: radially averaged PSD of the mean-centred channels, averaged over channels\n"
                    "mean over seeds, band = min-max; slope = mean of the per-channel log-log slopes", fontsize=10)
    return save(figure, path)


def figure_channel_std(runs: Dict[str, List[Run]], path: str) -> Optional[str]:
    """Per-channel std of the raw latents, channels in low-to-high frequency order: as measured and relative to the mean."""
    for label, label_runs in runs.items():
        if section(label_runs, "statistics") and not any(isinstance(s.get("std"), list) for s in section(label_runs, "statistics")):
            say(f"  channel_std: {label}'s results.json has only global statistics (no per-channel std): left out")
    data = available("channel_std", runs, lambda r: [
        s for s in section(r, "statistics") if isinstance(s.get("std"), list) and s["std"]], "per-channel latent statistics")
    if not data:
        return None
    channels = len(next(iter(data.values()))[0]["std"])
    grid = None
    for label_runs in runs.values():  # the basis grid, from any analysis that recorded it
        for name in ("unmasking", "blur_dynamics", "spectrum"):
            for s in section(label_runs, name):
                if s.get("grid") and int(s["grid"][0]) * int(s["grid"][1]) == channels:
                    grid = s["grid"]
    order = frequency_order(grid) if grid else list(range(channels))
    if grid is None:
        say("  channel_std: no basis grid recorded: channels drawn in index order")
    colors = colors_for(list(runs))
    figure = new_figure(11.5, 4.6)
    axes = figure.subplots(1, 2)
    x = np.arange(channels)
    for label, stats in data.items():
        curves = [as_floats(s["std"])[order] for s in stats if len(s["std"]) == channels]
        if not curves:
            say(f"  channel_std: {label} has another channel count, left out")
            continue
        cv = np.mean([np.std(c) / np.mean(c) for c in curves])  # spread of the stds across channels
        legend = legend_label(label, len(curves)) + f", CV {cv:.2f}"
        plot_mean_band(axes[0], x, curves, label, colors[label], legend, marker="o")
        plot_mean_band(axes[1], x, [c / np.mean(c) for c in curves], label, colors[label], legend, marker="o")
    ticks = [f"{n}\n{w},{h}" for n, (w, h) in ((n, basis_index(n, grid)) for n in order)] if grid else [str(n) for n in order]
    for ax, ylabel in ((axes[0], "latent std of the channel"), (axes[1], "std / mean std over channels")):
        ax.set_xticks(x)
        ax.set_xticklabels(ticks, fontsize=6.5)
        ax.set_xlabel("channel, then basis (w, h); low-to-high frequency order" if grid else "channel")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="0.5", linewidth=0.8)
    axes[0].set_title("as measured", fontsize=9)
    axes[1].set_title("relative to the VAE's mean std (flat = even)", fontsize=9)
    axes[1].legend(fontsize=7)
    figure.suptitle("Per-channel std of the raw latents (held-out crops)\nmean over seeds, band = min-max; "
                    "CV = std of the channel stds / their mean (lower = more even)", fontsize=10)
    return save(figure, path)


INIT_TITLES = {"base": "fine-tunes of the base VAE", "scratch": "trained from scratch", None: "arms of unknown init"}


def step_statistics(label_runs: List[Run], key: str):
    """Steps, and per step the mean, min and max of `key` over the seeds that logged it (None if never nonzero)."""
    by_step: Dict[int, List[float]] = {}
    for run in label_runs:
        for row in run.train_log:
            value = row.get(key)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                try:
                    by_step.setdefault(int(row["step"]), []).append(float(value))
                except (TypeError, ValueError):
                    continue
    values = np.array([v for vs in by_step.values() for v in vs])
    if not values.size or not np.any(np.nan_to_num(values) != 0):  # alpha 0: no SSReg branch, latent_mse is 0
        return None
    steps = np.array(sorted(by_step))
    mean, low, high = (np.array([f(by_step[s]) for s in steps]) for f in (np.mean, np.min, np.max))
    return steps, mean, low, high


def figure_training_curves(runs: Dict[str, List[Run]], path: str) -> Optional[str]:
    """rec_mae, kl and latent_mse vs step of each arm's VAE training, one row per kind of arm (fine-tune / scratch)."""
    logs = available("training_curves", runs, lambda r: [run for run in r if run.train_log], "fine-tune log", with_base=False)
    if not logs:
        return None
    for label, label_runs in logs.items():
        lengths = sorted({len(r.train_log) for r in label_runs})
        if len(lengths) > 1:
            say(f"  training_curves: {label}'s seeds logged different numbers of steps {lengths}: "
                "each step's mean is over the seeds that logged it")
    groups: Dict[Optional[str], List[str]] = {}  # the fine-tunes (600 steps) and the scratch runs (2100) on their own rows
    for label, label_runs in logs.items():
        groups.setdefault(label_runs[0].init, []).append(label)
    colors = colors_for(list(runs))
    figure = new_figure(13.5, 3.3 * len(groups) + 0.7)
    axes = figure.subplots(len(groups), len(TRAINING_KEYS), squeeze=False)
    for row, (init, labels) in zip(axes, groups.items()):
        for ax, (key, ylabel, log_scale) in zip(row, TRAINING_KEYS):
            drawn = False
            for label in labels:
                statistics = step_statistics(logs[label], key)
                if statistics is None:
                    say(f"  training_curves: {label} has no {key} (not logged, or 0 throughout)")
                    continue
                steps, mean, low, high = statistics
                ax.plot(steps, mean, color=colors[label], label=legend_label(label, len(logs[label])), **style(label))
                if len(logs[label]) > 1:
                    ax.fill_between(steps, low, high, color=colors[label], alpha=0.2, linewidth=0)
                drawn = True
            if log_scale and drawn:
                ax.set_yscale("log")
            ax.set_title(f"{key} — {INIT_TITLES.get(init, init)}", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
            if drawn:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, f"no arm here logged a nonzero {key}\n(alpha 0: no SSReg branch)" if key == "latent_mse"
                        else f"no arm here logged {key}", transform=ax.transAxes, ha="center", va="center", color="0.4")
    figure.suptitle("VAE training logs (finetune/logs/train_metrics.jsonl) per logged step\n"
                    "mean over seeds, band = min-max", fontsize=10)
    return save(figure, path)


def figure_samples(runs: Dict[str, List[Run]], path: str) -> Optional[str]:
    """Each arm's DiT sample grid (first seed that has one), one row per arm."""
    from PIL import Image

    with_samples = available("samples", runs, lambda r: [run for run in r if run.samples], "DiT samples", with_base=False)
    if not with_samples:
        return None
    grids = [(label, kept[0]) for label, kept in with_samples.items()]
    images = [np.asarray(Image.open(run.samples).convert("RGB")) for _, run in grids]
    aspect = max(image.shape[1] / image.shape[0] for image in images)
    width = 9.0
    figure = new_figure(width, len(grids) * (width / aspect + 0.35) + 0.4)
    axes = figure.subplots(len(grids), 1, squeeze=False)[:, 0]
    for ax, (label, run), image in zip(axes, grids, images):
        ax.imshow(image, interpolation="lanczos")
        ax.set_title(f"{label}  (seed {run.seed})", fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle("DiT samples (dit/samples/final.png), first seed of each arm", fontsize=10)
    return save(figure, path)


FIGURES = {
    "unmasking.png": figure_unmasking,
    "blur_dynamics.png": figure_blur_dynamics,
    "latent_spectrum.png": figure_latent_spectrum,
    "channel_std.png": figure_channel_std,
    "training_curves.png": figure_training_curves,
    "samples.png": figure_samples,
}


def make_figures(root: str, output_dir: str) -> List[str]:
    """Draws every figure it can from the study folder `root` into `output_dir`."""
    runs = load_study(root)
    if not runs:
        return []
    labels = ", ".join(f"{label} ({len(r)})" if label != BASE else label for label, r in runs.items())
    say(f"found: {labels}")
    written = []
    for name, draw in FIGURES.items():
        say(f"{name}:")
        path = draw(runs, os.path.join(output_dir, name))
        if path:
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Figures from unit files (scripts/unit.py): runs made apart, merged
# --------------------------------------------------------------------------------------------


def load_unit_runs(paths: List[str]) -> Dict[str, List[dict]]:
    """{arm: [unit, by seed]} of the unit files under `paths` (report.py's reader: duplicates and mixed settings
    handled there), each unit with `grid_path`, the PNG beside its JSON (None when it is missing)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import report

    units = report.load_units(paths)
    report.check_comparable(units)
    arms: Dict[str, List[dict]] = {}
    for arm in report.arm_table(units):
        for unit in sorted((u for u in units if u["arm"] == arm), key=lambda u: u["seed"]):
            grid = os.path.join(os.path.dirname(unit["path"]), (unit.get("grid") or {}).get("file", ""))
            unit["grid_path"] = grid if os.path.isfile(grid) else None
            arms.setdefault(arm, []).append(unit)
    return arms


def unit_title(arm: str, units: List[dict]) -> str:
    return "base VAE (no fine-tune)" if units[0].get("pilot") else f"{arm} ({units[0].get('method', '?')})"


def figure_unit_samples(arm: str, units: List[dict], path: str) -> Optional[str]:
    """One arm's sample grids side by side, one per seed."""
    from PIL import Image

    with_grid = [u for u in units if u["grid_path"]]
    for unit in units:
        if not unit["grid_path"]:
            say(f"  skip {arm}/seed{unit['seed']}: no sample grid beside {unit['path']}")
    if not with_grid:
        return None
    figure = new_figure(max(4.5, 3.2 * len(with_grid) + 0.2), 3.9)
    axes = figure.subplots(1, len(with_grid), squeeze=False)[0]
    for ax, unit in zip(axes, with_grid):
        ax.imshow(np.asarray(Image.open(unit["grid_path"]).convert("RGB")), interpolation="lanczos")
        gen = unit["measures"]
        fid = next((v for k, v in gen.items() if k.startswith("gen_train/FID-")), None)
        ax.set_title(f"seed {unit['seed']}" + (f"  (gFID {fid:.1f})" if isinstance(fid, (int, float)) else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(f"DiT samples: {unit_title(arm, units)}\nthe first scored samples of each seed", fontsize=9)
    return save(figure, path)


def figure_dit_loss(arms: Dict[str, List[dict]], path: str) -> Optional[str]:
    """The DiT's training loss vs step per arm: mean over seeds, band = min-max (steps every seed logged)."""
    curves = {}
    for arm, units in arms.items():
        logged = [u["curves"]["dit"] for u in units if (u.get("curves") or {}).get("dit", {}).get("loss")]
        if not logged:
            say(f"  dit_loss: {arm} has no DiT loss curve")
            continue
        steps = sorted(set.intersection(*(set(c["step"]) for c in logged)))
        if not steps:
            say(f"  dit_loss: {arm}'s seeds logged no step in common")
            continue
        stack = [as_floats([dict(zip(c["step"], c["loss"]))[s] for s in steps]) for c in logged]
        curves[arm] = (np.array(steps), stack, len(logged))
    if not curves:
        return None
    colors = colors_for([a for a in curves if not arms[a][0].get("pilot")] + [BASE])
    figure = new_figure(7.5, 4.6)
    ax = figure.subplots()
    for arm, (steps, stack, n) in curves.items():
        label = BASE if arms[arm][0].get("pilot") else arm
        legend = "base VAE (no fine-tune)" if label == BASE else f"{arm} ({n} seed{'s' if n != 1 else ''})"
        plot_mean_band(ax, steps, stack, label, colors[label], legend)
    ax.set_yscale("log")
    ax.set_xlabel("DiT training step")
    ax.set_ylabel("training loss (logged window)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.suptitle("DiT training loss on each arm's latents (mean over seeds, band = min-max)", fontsize=10)
    return save(figure, path)


def make_unit_figures(paths: List[str], output_dir: str) -> List[str]:
    """Draws the unit-file figures into `output_dir`: one sample figure per arm and the DiT loss curves."""
    arms = load_unit_runs(paths)
    say("found: " + ", ".join(f"{arm} ({len(units)})" for arm, units in arms.items()))
    written = []
    for arm, units in arms.items():
        drawn = figure_unit_samples(arm, units, os.path.join(output_dir, f"samples_{arm}.png"))
        if drawn:
            written.append(drawn)
    drawn = figure_dit_loss(arms, os.path.join(output_dir, "dit_loss.png"))
    if drawn:
        written.append(drawn)
    return written


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("study", metavar="STUDY", nargs="?", help="a study folder (the config's study_dir)")
    parser.add_argument("--units", nargs="+", metavar="PATH", default=None,
                        help="instead of STUDY: unit files or folders holding them (see above)")
    parser.add_argument("--output_dir", required=True, help="where the PNG figures go (created)")
    args = parser.parse_args(argv)
    if args.units is not None:
        if args.study is not None:
            parser.error("give either STUDY or --units, not both")
        return args
    if args.study is None:
        parser.error("give STUDY (a study folder) or --units PATH ...")
    if not os.path.isdir(args.study) or not any(os.path.exists(os.path.join(args.study, n)) for n in ("arms", "base")):
        parser.error(f"argument STUDY: {args.study!r} is not a study folder (no arms/ or base/ in it)")
    return args


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(argv)
    if args.units is not None:
        try:
            written = make_unit_figures(args.units, args.output_dir)
        except ValueError as error:
            print(f"figures.py: error: {error}", file=sys.stderr)
            return 1
        if not written:
            print("figures.py: error: no figure could be drawn from the unit files", file=sys.stderr)
            return 1
        say(f"{len(written)} figure(s) in {args.output_dir}")
        return 0
    written = make_figures(args.study, args.output_dir)
    if not written:
        print(f"figures.py: error: no figure could be drawn from STUDY {args.study!r} (no results found)", file=sys.stderr)
        return 1
    missing = [n for n in FIGURE_NAMES if os.path.join(args.output_dir, n) not in written]
    say(f"{len(written)} figure(s) in {args.output_dir}" + (f"; not drawn: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
