"""The markdown comparison report: one row per VAE, reconstruction metrics beside latent-structure scores."""

import datetime
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import __version__


# Column -> (what it is, which direction is better); the table header carries the arrow.
LATENT_COLUMNS = {
    "coherence": ("blur-dynamics coherence: mean R² of one exponential per channel (spatial means, Fig. 5)", "↑"),
    "energy_coherence": ("blur-dynamics coherence of the centred-channel energy", "↑"),
    "unmask_psnr@3": ("PSNR (dB) of the decode with the 3 lowest-frequency channels only (Fig. 6)", "↑"),
    "psd_slope": ("mean log-log slope of the latent channels' power spectra", ""),
    "scaling_factor": ("1 / std of the latents (implied diffusers scaling_factor)", ""),
    "shift_factor": ("mean of the latents (implied diffusers shift_factor)", ""),
}
RECONSTRUCTION_DIRECTIONS = {"PSNR": "↑", "SSIM": "↑", "LPIPS": "↓", "rFID": "↓", "FID": "↓", "sFID": "↓", "IS": "↑",
                             "precision": "↑", "recall": "↑"}


def _format(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        magnitude = abs(value)
        if magnitude != 0 and (magnitude >= 1e5 or magnitude < 10 ** -(digits - 1)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if magnitude >= 10 ** digits else f"{value:.{digits}f}"
    return str(value)


def _direction(column: str) -> str:
    base = column.split("-")[0].split("_")[0]
    arrow = RECONSTRUCTION_DIRECTIONS.get(base) or LATENT_COLUMNS.get(column, ("", ""))[1]
    return f" {arrow}" if arrow else ""


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Optional[Sequence[str]] = None, digits: int = 4) -> str:
    """A markdown table with one row per key of `rows` and the given (default: all, in first-seen order) columns."""
    if columns is None:
        columns = []
        for values in rows.values():
            columns.extend(k for k in values if k not in columns)
    header = "| model | " + " | ".join(f"{c}{_direction(c)}" for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_format(values.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def summarize_latent(latent: Mapping[str, Any]) -> Dict[str, Any]:
    """The report's latent columns from one model's latent-analysis dict (keys as written by the CLI)."""
    summary: Dict[str, Any] = {}
    blur = latent.get("blur_dynamics")
    if blur:
        summary["coherence"] = blur.get("coherence")
        summary["energy_coherence"] = blur.get("energy_coherence")
    unmasking = latent.get("unmasking")
    if unmasking and unmasking.get("psnr"):
        psnr = unmasking["psnr"]
        summary["unmask_psnr@3"] = psnr[min(2, len(psnr) - 1)]
    spectrum = latent.get("spectrum")
    if spectrum:
        summary["psd_slope"] = spectrum.get("mean_slope")
    statistics = latent.get("statistics")
    if statistics:
        summary["scaling_factor"] = statistics.get("scaling_factor")
        summary["shift_factor"] = statistics.get("shift_factor")
    return summary


def write_report(
    output_dir: str,
    results: Mapping[str, Mapping[str, Any]],
    figures: Optional[Mapping[str, str]] = None,
    title: str = "diffusers-ssreg evaluation",
    data_description: Optional[str] = None,
    command: Optional[str] = None,
    extra_rows: Optional[Mapping[str, Mapping[str, Any]]] = None,
    filename: str = "report.md",
) -> str:
    """
    Writes `report.md` into `output_dir`: a table of reconstruction metrics and latent scores with one row
    per model (`results[name]` holds `"reconstruction"`, `"latent"` and/or `"generation"` dicts as the
    CLI writes them), notes on comparability, and links to `figures` ({caption: png path}).
    """
    rows: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    for name, result in results.items():
        row: Dict[str, Any] = {}
        regularizer = (result.get("vae") or {}).get("regularizer")
        if regularizer:  # the method a VAE was fine-tuned with (examples/finetune_vae.py's saved folder)
            row["regularizer"] = regularizer.get("label", regularizer.get("name"))
        for section in ("reconstruction", "generation"):
            if result.get(section):
                count = result[section].get("num_images", result[section].get("num_samples"))
                if count is not None:
                    row["images"] = count
                row.update(result[section].get("metrics", {}))
                for metric, reason in result[section].get("skipped", {}).items():
                    note = f"{metric} not computed ({reason})."
                    if note not in notes:
                        notes.append(note)
                extractor = result[section].get("feature_extractor")
                if extractor and not extractor.get("standard", False):
                    note = f"`{extractor['metric_suffix'].lstrip('-')}` scores: {extractor['note']}."
                    if note not in notes:
                        notes.append(note)
        if result.get("latent"):
            row.update(summarize_latent(result["latent"]))
        rows[name] = row
    for name, row in (extra_rows or {}).items():
        rows[name] = dict(row)

    lines = [f"# {title}", ""]
    meta = [f"diffusers-ssreg {__version__}", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")]
    lines.append("_" + ", ".join(meta) + "_")
    lines.append("")
    if data_description:
        lines += [f"**Data:** {data_description}", ""]
    if command:
        lines += ["**Command:**", "", f"```\n{command}\n```", ""]
    columns: List[str] = ["regularizer"] if any("regularizer" in r for r in rows.values()) else []
    for values in rows.values():
        columns.extend(k for k in values if k not in columns)
    lines += [markdown_table(rows, columns), ""]
    used_latent = [c for c in LATENT_COLUMNS if any(c in r for r in rows.values())]
    if used_latent or "regularizer" in columns:
        lines.append("Columns:")
        if "regularizer" in columns:
            lines.append("- `regularizer`: the `--regularizer` of `examples/finetune_vae.py` the VAE was fine-tuned with, "
                         "read from its saved folder beside the weights (its config is in the JSON results; – : none "
                         "found).")
        lines += [f"- `{c}`: {LATENT_COLUMNS[c][0]}." for c in used_latent]
        lines.append("")
    if notes:
        lines.append("Notes:")
        lines += [f"- {n}" for n in notes]
        lines.append("")
    lines.append("See docs/evaluation.md for how every number and figure is computed and which are comparable "
                 "with the paper's.")
    lines.append("")
    for caption, path in (figures or {}).items():
        relative = os.path.relpath(path, output_dir)
        lines += [f"## {caption}", "", f"![{caption}]({relative})", ""]
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
