#!/usr/bin/env python
"""
The study's tables: every result file of a study folder, gathered into `study_results.json` and `study_results.md`.

    python studies/small_scale/scripts/report.py STUDY

The workflow runs it last (rule `report`); run it by hand for a study that is not finished (a run with
`--keep-going` where a chain failed or diverged): missing results are listed, never guessed. It reads what the
tools wrote, in each chain `STUDY/arms/<arm>/seed<k>/`:

    finetune/logs/train_metrics.jsonl, finetune/validation/metrics-*.json   (examples/finetune_vae.py)
    eval/results.json                                                         (ssreg-eval compare)
    cache/latent_stats.json                                                   (examples/cache_latents.py)
    dit/logs/train_metrics.jsonl                                              (examples/train_dit.py)
    sample/samples.json                                                       (examples/sample_dit.py)
    score/heldout/generation.json, score/train/generation.json                (ssreg-eval generation)

and the same for the base VAE (`STUDY/base/vae/`, `STUDY/base/eval/`). Each measure is a flat key
(`rec/PSNR`, `latent/psd_slope`, `train/kl`, `dit/loss`, `gen_heldout/FID-EffNetLite0`, ...); the report gives
per arm the value of every seed, and their mean and standard deviation (n - 1) over seeds.

    python studies/small_scale/scripts/report.py --units FOLDER [FOLDER ...] --output_dir OUT

merges unit files instead (`units/<arm>_seed<k>.json`, written by scripts/unit.py for every scored chain), from
any number of runs on any machines: `table1.md` and `table1.json` in OUT, laid out like the paper's Table 1
(reconstruction | generation, one row per arm, mean ± std over seeds and n), with the generation scores against
the held-out crops, the latent measures, each job's wall time, and the paper's orderings claim by claim (SSReg
against each other method on PSNR, rFID and gFID: Welch's t-test over the seeds, see `verdict`). Units made under
different settings or from other crops are refused; the same unit twice is kept once.
"""

import argparse
import datetime
import json
import math
import os
import re
import sys


STAGES = ("finetune", "eval", "cache", "dit", "sample", "score")
# (measure, label, better): the tables, in this order; every other measure is kept in the JSON only.
TABLES = (
    ("rec/PSNR", "PSNR (dB) of held-out crops", "↑"),
    ("rec/SSIM", "SSIM of held-out crops", "↑"),
    ("rec/rFID-{x}", "rFID-{x} of held-out crops (project-internal)", "↓"),
    ("rec/LPIPS", "LPIPS of held-out crops", "↓"),
    ("latent/coherence", "blur-dynamics coherence (Fig. 5; mean R² of one exponential per channel)", "↑"),
    ("latent/energy_coherence", "blur-dynamics coherence of the centred-channel energy", "↑"),
    ("latent/unmask_psnr@3", "PSNR (dB) of the decode from the 3 lowest-frequency channels (Fig. 6)", "↑"),
    ("latent/psd_slope", "mean log-log slope of the latent channels' power spectra", ""),
    ("latent/global_std", "latent standard deviation (held-out crops)", ""),
    ("latent/channel_std_cv", "coefficient of variation of the per-channel latent std (lower: more even channels)", ""),
    ("latent/unmask_max_step", "largest PSNR gain (dB) of one unmasking step (Fig. 6; lower: more gradual)", ""),
    ("train/kl", "KL term at the end of VAE training (last logged window; Fig. 4)", ""),
    ("train/latent_mse", "latent state-space MSE at the end of VAE training (last logged window)", "↓"),
    ("train/rec_mae", "reconstruction L1 at the end of VAE training (last logged window)", "↓"),
    ("gen_heldout/FID-{x}", "FID-{x} of DiT samples against held-out crops", "↓"),
    ("gen_heldout/precision-{x}", "precision-{x} against held-out crops", "↑"),
    ("gen_heldout/recall-{x}", "recall-{x} against held-out crops", "↑"),
    ("gen_train/FID-{x}", "FID-{x} of DiT samples against the training crops", "↓"),
    ("gen_train/precision-{x}", "precision-{x} against the training crops", "↑"),
    ("gen_train/recall-{x}", "recall-{x} against the training crops", "↑"),
    ("dit/loss", "DiT training loss, last logged window", "↓"),
)
SUMMARY_COLUMNS = ("rec/PSNR", "rec/rFID-{x}", "latent/channel_std_cv", "latent/psd_slope", "train/kl", "dit/loss",
                   "gen_heldout/FID-{x}")  # fmt: skip
TRAINING_KEYS = ("loss", "rec_mae", "kl", "latent_mse", "reg_mae", "delta", "grad_norm", "img_per_s", "peak_memory_gib",
                 "eq_mae", "low_res_mae", "se_mae", "esm", "dsm_mae")  # the last: the other regularizers' own terms
DIVERGED = "non-finite steps in a row"  # what finetune_vae.py and train_dit.py say when --max_nonfinite_steps stops them
PILOT = "base"  # arms/base/: the base VAE's own chain (the workflow's `pilot`), reported in the base VAE's row


def write_json_and_markdown(stem, result, lines, indent):
    """`stem`.json (`result`) and `stem`.md (`lines`), the pair every report writes."""
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=indent)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def last_logged(path):
    """The last line of a train_metrics.jsonl (the last logged window), {} when there is none."""
    from diffusers_ssreg.training import read_metrics_log  # (a line cut off by a killed run is skipped)

    entries = read_metrics_log(path)
    return entries[-1] if entries else {}


def training_results(folder):
    """train/* (last logged window) and val/* (last validation) of a finetune_vae.py output folder."""
    last = last_logged(os.path.join(folder, "logs", "train_metrics.jsonl"))
    results = {f"train/{k}": last[k] for k in TRAINING_KEYS if k in last}
    if "step" in last:
        results["train/step"] = last["step"]
    if not results.get("train/latent_mse") and not results.get("train/reg_mae"):  # no regularized branch ran: the
        for key in ("train/latent_mse", "train/reg_mae", "train/delta"):  # terms read 0, Δ was not trained
            results.pop(key, None)
    validation = os.path.join(folder, "validation")
    files = sorted((n for n in os.listdir(validation) if re.fullmatch(r"metrics-\d+\.json", n)),
                   key=lambda n: int(n[8:-5])) if os.path.isdir(validation) else []  # fmt: skip
    if files:
        results.update({f"val/{k}": v for k, v in read_json(os.path.join(validation, files[-1])).items() if k != "step"})
    return results


def latent_extras(latent):
    """Two latent measures that ssreg-eval's summary lacks, from one model's `latent` entry of results.json.

    - channel_std_cv: coefficient of variation of the per-channel stds (how even the channels' scales are);
    - unmask_max_step: the largest PSNR gain (dB) of one unmasking step (Fig. 6: a few jumps, or gradual).
    """
    extras = {}
    std = (latent.get("statistics") or {}).get("std")
    if std and len(std) > 1:
        mean = sum(std) / len(std)
        extras["channel_std_cv"] = math.sqrt(sum((v - mean) ** 2 for v in std) / len(std)) / mean if mean > 0 else math.nan
    psnr = [v for v in (latent.get("unmasking") or {}).get("psnr") or [] if finite(v)]
    if len(psnr) > 1:
        extras["unmask_max_step"] = max(b - a for a, b in zip(psnr, psnr[1:]))
    return extras


def eval_results(path):
    """rec/* and latent/* of an `ssreg-eval compare` results.json holding one model."""
    from diffusers_ssreg.evaluation.report import summarize_latent

    model = next(iter(read_json(path)["models"].values()))
    results = {f"rec/{k}": v for k, v in (model.get("reconstruction") or {}).get("metrics", {}).items()}
    latent = model.get("latent") or {}
    summary = summarize_latent(latent)
    results.update({f"latent/{k}": v for k, v in summary.items() if k not in ("scaling_factor", "shift_factor")})
    statistics = latent.get("statistics") or {}
    for key in ("global_std", "global_mean"):
        if key in statistics:
            results[f"latent/{key}"] = statistics[key]
    results.update({f"latent/{k}": v for k, v in latent_extras(latent).items()})
    return results


def chain_results(chain):
    """Each stage's results of one arm and seed: {stage: {measure: value}}, stages without results left out."""
    found = {}
    finetune = os.path.join(chain, "finetune")
    if os.path.isfile(os.path.join(finetune, "README.md")):
        found["finetune"] = training_results(finetune)
    if os.path.isfile(os.path.join(chain, "eval", "results.json")):
        found["eval"] = eval_results(os.path.join(chain, "eval", "results.json"))
    stats = os.path.join(chain, "cache", "latent_stats.json")
    if os.path.isfile(stats):
        stats = read_json(stats)
        found["cache"] = {"cache/num_samples": stats["num_samples"],
                          "cache/std_mean_over_channels": sum(stats["latents_std"]) / len(stats["latents_std"])}  # fmt: skip
    if os.path.isfile(os.path.join(chain, "dit", "README.md")):
        last = last_logged(os.path.join(chain, "dit", "logs", "train_metrics.jsonl"))
        found["dit"] = {f"dit/{k}": last[k] for k in ("loss", "step") if k in last}
    if os.path.isfile(os.path.join(chain, "sample", "samples.json")):
        found["sample"] = {"sample/num_images": read_json(os.path.join(chain, "sample", "samples.json"))["num_images"]}
    score = {}
    for reference in ("heldout", "train"):
        path = os.path.join(chain, "score", reference, "generation.json")
        if os.path.isfile(path):
            generation = read_json(path)
            score.update({f"gen_{reference}/{k}": v for k, v in generation["metrics"].items()})
            score[f"gen_{reference}/num_samples"] = generation["num_samples"]
            score[f"gen_{reference}/num_reference"] = generation["num_reference"]
    if len(score) and all(os.path.isfile(os.path.join(chain, "score", r, "generation.json")) for r in ("heldout", "train")):
        found["score"] = score
    return found


def diverged(study, arm, seed):
    """The training stage whose log says it stopped on non-finite steps, if any."""
    for stage in ("finetune", "dit"):
        log = os.path.join(study, "logs", stage, arm, f"seed{seed}.log")
        if os.path.isfile(log):
            with open(log, errors="replace") as f:
                if DIVERGED in f.read():
                    return stage
    return None


def mean_std(values):
    values = [v for v in values if finite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_value(value):
    if not finite(value):
        return "–" if value is None else str(value)
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}" if magnitude < 100 else f"{value:.2f}"


def setting_line(config):
    """One sentence of the study's main settings, from its config (every setting is in study_results.json)."""
    def flag(section, key, default="?"):
        return (config.get(section) or {}).get(key, default)

    data = config.get("data") or {}
    return (
        f"Setting: {data.get('resolution', '?')} px crops ({data.get('train_crops', '?')} training, "
        f"{data.get('heldout_crops', '?')} held-out); VAE batch {flag('vae_training', 'train_batch_size')}; base "
        f"{flag('base', 'max_train_steps')} steps; fine-tunes {flag('finetune', 'max_train_steps')} steps (lr "
        f"{flag('finetune', 'learning_rate')}); from scratch {flag('scratch', 'max_train_steps')} steps; "
        f"{flag('dit', 'preset')} for {flag('dit', 'max_train_steps')} steps (batch {flag('dit', 'train_batch_size')}); "
        f"{flag('sample', 'num_images_per_class')} samples, {flag('sample', 'num_inference_steps')} steps. Scores with "
        f"`-EffNetLite0` features are project-internal: comparable between arms of this study only."
    )


def write_report(study):
    """Writes STUDY/study_results.json and STUDY/study_results.md; returns the JSON's content."""
    config_path = os.path.join(study, "study_config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    arms = dict(config.get("arms") or {})
    arms_dir = os.path.join(study, "arms")
    for arm in sorted(os.listdir(arms_dir)) if os.path.isdir(arms_dir) else []:  # folders of arms no longer configured
        if arm not in arms and arm != PILOT:
            seeds = sorted(int(m.group(1)) for n in os.listdir(os.path.join(arms_dir, arm)) if (m := re.fullmatch(r"seed(\d+)", n)))
            arms[arm] = {"seeds": seeds}

    units, status, missing = {}, {}, []
    base = {}
    if os.path.isfile(os.path.join(study, "base", "vae", "README.md")):
        base.update(training_results(os.path.join(study, "base", "vae")))
    if os.path.isfile(os.path.join(study, "base", "eval", "results.json")):
        base.update(eval_results(os.path.join(study, "base", "eval", "results.json")))
    for name in sorted(os.listdir(os.path.join(arms_dir, PILOT))) if os.path.isdir(os.path.join(arms_dir, PILOT)) else []:
        found = chain_results(os.path.join(arms_dir, PILOT, name))  # the pilot: the base VAE's own DiT and scores
        base.update({k: v for stage in found.values() for k, v in stage.items()})
    if base:
        units["base"] = base
    for arm, spec in arms.items():
        for seed in spec.get("seeds", []):
            found = chain_results(os.path.join(arms_dir, arm, f"seed{seed}"))
            stopped = diverged(study, arm, seed)
            status[(arm, seed)] = {s: "✓" if s in found else ("diverged" if s == stopped else "·") for s in STAGES}
            missing += [f"{arm}/{seed}/{s}" for s in STAGES if s not in found]
            if found:
                units[f"{arm}/{seed}"] = {k: v for stage in found.values() for k, v in stage.items()}

    measures = {}  # measure -> arm -> seed -> value ("base" is the shared base VAE's row)
    for name, results in units.items():
        arm, _, seed = name.partition("/")
        for key, value in results.items():
            measures.setdefault(key, {}).setdefault(arm, {})[seed or "0"] = value
    statistics = {}
    for key, by_arm in measures.items():
        statistics[key] = {}
        for arm, seeds in by_arm.items():
            mean, std = mean_std(list(seeds.values()))
            statistics[key][arm] = {"values": seeds, "n": sum(finite(v) for v in seeds.values()), "mean": mean, "std": std}

    order = ["base"] + list(arms)
    suffix = next((k.split("FID-", 1)[1] for k in measures if k.startswith(("rec/rFID-", "gen_heldout/FID-"))), "EffNetLite0")
    lines = ["# SSReg small-scale study: results", "",
             f"_Written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by "
             f"`studies/small_scale/scripts/report.py` from the tools' own result files; the config is in "
             f"`study_config.json`._", ""]  # fmt: skip
    if config:
        lines += [setting_line(config), ""]
    lines += ["## Status", "", "| arm | seed | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for (arm, seed), row in status.items():
        lines.append(f"| {arm} | {seed} | " + " | ".join(row[s] for s in STAGES) + " |")
    lines.append("")
    if missing:
        lines += [f"Missing ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing) + ".", ""]

    def cell(key, arm):
        entry = statistics.get(key, {}).get(arm)
        if not entry or entry["mean"] is None:
            return "–"
        std = f" ± {fmt_value(entry['std'])}" if entry["std"] is not None else ""
        return f"{fmt_value(entry['mean'])}{std} (n={entry['n']})"

    columns = [c.format(x=suffix) for c in SUMMARY_COLUMNS if c.format(x=suffix) in statistics]
    if columns:
        lines += ["## Summary (mean ± std over seeds)", "", "| arm | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]  # fmt: skip
        lines += [f"| {arm} | " + " | ".join(cell(c, arm) for c in columns) + " |"
                  for arm in order if any(arm in statistics.get(c, {}) for c in columns)]  # fmt: skip
        lines.append("")
    lines += ["## One table per measure", ""]
    for key, label, better in TABLES:
        key, label = key.format(x=suffix), label.format(x=suffix)
        if key not in statistics:
            continue
        lines += [f"### `{key}` {better}".rstrip(), "", label + ".", "", "| arm | n | mean ± std | per seed |", "|---|---|---|---|"]
        for arm in order:
            entry = statistics[key].get(arm)
            if not entry:
                continue
            seeds = ", ".join(f"{s}: {fmt_value(v)}" for s, v in sorted(entry["values"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {arm} | {entry['n']} | {cell(key, arm).rsplit(' (n=', 1)[0]} | {seeds} |")
        lines.append("")

    report = {"study": "SSReg small-scale study", "config": config, "missing": missing, "measures": statistics,
              "units": units}  # fmt: skip
    write_json_and_markdown(os.path.join(study, "study_results"), report, lines, indent=2)
    print(f"report: {len(units)} VAEs with results, {len(missing)} missing stages -> study_results.json, study_results.md")
    return report


# --------------------------------------------------------------------------------------------
# The Table-1 report over unit files (scripts/unit.py): runs made apart, merged
# --------------------------------------------------------------------------------------------

UNIT_FORMAT = "ssreg-small-scale-unit"
# The paper's Table 1, Flux rows (arXiv 2604.11089; "Flux" is the plain fine-tune of the Flux VAE, Sec. 5.3), keyed
# by the method of an arm (`--regularizer`). Spectrum matching is not in the paper's table.
PAPER_TABLE1 = {
    "none": {"PSNR": 31.70, "LPIPS": 0.0354, "SSIM": 0.9105, "rFID": 0.87, "gFID": 16.08, "sFID": 7.33, "IS": 89.32,
             "precision": 0.68, "recall": 0.49},
    "eqvae": {"PSNR": 31.53, "LPIPS": 0.0373, "SSIM": 0.9082, "rFID": 0.94, "gFID": 13.95, "sFID": 7.09, "IS": 97.81,
              "precision": 0.69, "recall": 0.49},
    "scale_equivariance": {"PSNR": 31.62, "LPIPS": 0.0363, "SSIM": 0.9096, "rFID": 0.90, "gFID": 13.87, "sFID": 7.86,
                           "IS": 99.79, "precision": 0.70, "recall": 0.49},
    "ssreg": {"PSNR": 31.55, "LPIPS": 0.0374, "SSIM": 0.9085, "rFID": 0.91, "gFID": 13.33, "sFID": 7.29, "IS": 106.61,
              "precision": 0.71, "recall": 0.47},
}  # fmt: skip
PAPER_ROWS = {"none": "Flux", "eqvae": "Flux + EQVAE", "scale_equivariance": "Flux + FT-SE", "ssreg": "Flux + Ours"}
METHOD_TITLES = {"none": "plain fine-tune", "ssreg": "SSReg", "eqvae": "EQ-VAE", "scale_equivariance": "FT-SE (scale equivariance)",
                 "spectrum_matching": "spectrum matching (ESM)"}  # fmt: skip
REAL_ROWS = {"real": "real: other crops of the training photos", "heldout": "real: the held-out crops"}
METHOD_ORDER = ("none", "eqvae", "scale_equivariance", "spectrum_matching", "ssreg")  # the paper's row order, then ESM
# (paper column, measure, better): the orderings the verdict tests; gFID against the training crops is the paper's
# gFID (training statistics as the reference), the held-out reference is tested beside it.
CLAIMS = (("PSNR", "rec/PSNR", "↑"), ("rFID", "rec/rFID-{x}", "↓"), ("gFID", "gen_train/FID-{x}", "↓"),
          ("gFID", "gen_heldout/FID-{x}", "↓"))  # fmt: skip
TABLE1_COLUMNS = (  # (header, measure, better): reconstruction | generation against the training crops
    ("PSNR", "rec/PSNR", "↑"), ("SSIM", "rec/SSIM", "↑"), ("rFID", "rec/rFID-{x}", "↓"),
    ("gFID", "gen_train/FID-{x}", "↓"), ("sFID", "gen_train/sFID-{x}", "↓"), ("precision", "gen_train/precision-{x}", "↑"),
    ("recall", "gen_train/recall-{x}", "↑"),
)  # fmt: skip
HELDOUT_COLUMNS = (("FID", "gen_heldout/FID-{x}", "↓"), ("sFID", "gen_heldout/sFID-{x}", "↓"),
                   ("precision", "gen_heldout/precision-{x}", "↑"), ("recall", "gen_heldout/recall-{x}", "↑"))  # fmt: skip
LATENT_COLUMNS = (
    ("channel evenness (CV of channel stds)", "latent/channel_std_cv", ""), ("spectrum slope", "latent/psd_slope", ""),
    ("unmask PSNR @3", "latent/unmask_psnr@3", "↑"), ("largest unmask step", "latent/unmask_max_step", ""),
    ("blur coherence", "latent/coherence", "↑"), ("KL (end of training)", "train/kl", ""),
    ("DiT loss (last window)", "dit/loss", "↓"),
)  # fmt: skip


def find_unit_files(paths):
    """The unit JSON files among `paths` (files, or folders searched recursively)."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for folder, _, names in sorted(os.walk(path)):
                files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".json")]
        else:
            raise ValueError(f"--units: {path!r} is neither a file nor a folder")
    return files


def load_units(paths):
    """
    The units of the unit files under `paths`, one per (arm, seed), each with its `path`. The same unit found twice
    with the same measures is kept once (a file copied into two folders); with different measures it is an error.
    """
    units, seen = [], {}
    for path in find_unit_files(paths):
        try:
            unit = read_json(path)
        except ValueError:
            continue
        if not isinstance(unit, dict) or unit.get("format") != UNIT_FORMAT:
            continue  # another JSON file (a study_results.json, a config): not a unit
        unit["path"] = path
        key = (unit["arm"], unit["seed"])
        if key in seen:
            if seen[key]["measures"] != unit["measures"]:
                raise ValueError(f"unit {key[0]}/{key[1]} twice with different results: {seen[key]['path']!r} and "
                                 f"{path!r}; keep one of them")  # fmt: skip
            continue
        seen[key] = unit
        units.append(unit)
    if not units:
        raise ValueError(f"--units: no unit file ({UNIT_FORMAT}) in {', '.join(map(repr, paths))}")
    return units


def check_comparable(units):
    """Units made under different settings or from other crops cannot share a table: ValueError naming them.
    Returns notes (the base VAE's weights differing between runs is said, not refused)."""
    groups = {}
    for unit in units:
        fingerprint = json.dumps({"settings": unit["settings_sha256"],
                                  "data": {p: unit["data"][p]["fingerprint"] for p in ("train", "heldout")}})  # fmt: skip
        groups.setdefault(fingerprint, []).append(f"{unit['arm']}/{unit['seed']}")
    if len(groups) > 1:
        listed = "; ".join(f"[{', '.join(names)}]" for names in groups.values())
        raise ValueError(f"the units were made under {len(groups)} different settings or crops (settings_sha256, crop "
                         f"fingerprints): {listed}. Report each group on its own (pass only its files to --units).")  # fmt: skip
    notes = []
    bases = {}
    for unit in units:
        bases.setdefault(unit["base_vae_sha256"], []).append(f"{unit['arm']}/{unit['seed']}")
    if len(bases) > 1:
        notes.append(f"The base VAE's weights differ between runs ({len(bases)} versions: "
                     + "; ".join(f"`{sha[:12]}`: {', '.join(names)}" for sha, names in bases.items())
                     + "): the base was not reproduced bit for bit.")  # fmt: skip
    return notes


def arm_table(units):
    """{arm: {"method", "seeds", "measures": {measure: [values by seed]}}} in the paper's row order."""
    arms = {}
    for unit in sorted(units, key=lambda u: (u["arm"], u["seed"])):
        entry = arms.setdefault(unit["arm"], {"method": unit["method"], "pilot": unit.get("pilot", False), "seeds": [],
                                              "measures": {}})  # fmt: skip
        entry["seeds"].append(unit["seed"])
        for key, value in unit["measures"].items():
            entry["measures"].setdefault(key, []).append(value)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    order = sorted(arms, key=lambda a: (not arms[a]["pilot"], rank.get(arms[a]["method"], len(rank)), a))
    return {arm: arms[arm] for arm in order}


def welch(ours, other):
    """Welch's t-test of mean(ours) - mean(other): (difference, its 95 % confidence interval, two-sided p, Cohen's d
    with the pooled std). scipy.stats gives the test; the interval and d are written out (scipy has no Welch CI)."""
    from scipy import stats

    a, b = [v for v in ours if finite(v)], [v for v in other if finite(v)]
    difference = sum(a) / len(a) - sum(b) / len(b)
    var_a = sum((v - sum(a) / len(a)) ** 2 for v in a) / (len(a) - 1)
    var_b = sum((v - sum(b) / len(b)) ** 2 for v in b) / (len(b) - 1)
    pooled = math.sqrt(((len(a) - 1) * var_a + (len(b) - 1) * var_b) / (len(a) + len(b) - 2))
    se2 = var_a / len(a) + var_b / len(b)
    if se2 == 0:  # no spread at all: the difference is exact
        return difference, (difference, difference), (0.0 if difference else 1.0), (math.inf if difference else 0.0)
    dof = se2**2 / ((var_a / len(a)) ** 2 / (len(a) - 1) + (var_b / len(b)) ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(se2)
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return difference, (difference - half, difference + half), p, (difference / pooled if pooled else math.inf)


def verdict(paper_ours, paper_other, ours, other, better, alpha=0.05):
    """
    Whether the paper's ordering of two methods on one measure holds here. `paper_*` are the paper's values (None:
    no paper row), `ours` and `other` the values over seeds here, `better` "↑" or "↓". Returns a dict with the
    paper's and the observed direction, the Welch test and the verdict: "holds" / "reversed" (the difference is
    significant at `alpha`, in the paper's direction or against it), "not resolved" (within the seed spread),
    "too few seeds" (fewer than 2 on a side: no spread to judge by), "no paper claim" (no paper row).
    """
    def direction(ours_value, other_value):
        if ours_value == other_value:
            return "tie"
        return "better" if (ours_value > other_value) == (better == "↑") else "worse"

    a, b = [v for v in ours if finite(v)], [v for v in other if finite(v)]
    result = {"n": [len(a), len(b)], "paper": None if paper_ours is None or paper_other is None else direction(paper_ours, paper_other)}
    if not a or not b:
        return {**result, "verdict": "too few seeds"}
    result["observed"] = direction(sum(a) / len(a), sum(b) / len(b))
    if len(a) < 2 or len(b) < 2:
        return {**result, "verdict": "too few seeds"}
    difference, interval, p, d = welch(a, b)
    result.update(difference=difference, ci95=list(interval), p=p, cohen_d=d)
    if result["paper"] is None:
        result["verdict"] = "no paper claim"
    elif result["paper"] == "tie" or p >= alpha:
        result["verdict"] = "not resolved"
    else:
        result["verdict"] = "holds" if result["observed"] == result["paper"] else "reversed"
    return result


def claim_verdicts(arms, ssreg_arm, suffix, alpha=0.05):
    """Every claim of CLAIMS for SSReg's arm against each other arm (the pilot's base VAE left out)."""
    verdicts = []
    ours = arms[ssreg_arm]
    for arm, other in arms.items():
        if arm == ssreg_arm or other["pilot"]:
            continue
        for column, key, better in CLAIMS:
            key = key.format(x=suffix)
            paper_ours = PAPER_TABLE1["ssreg"].get(column)
            paper_other = PAPER_TABLE1.get(other["method"], {}).get(column)
            result = verdict(paper_ours, paper_other, ours["measures"].get(key, []), other["measures"].get(key, []),
                             better, alpha)  # fmt: skip
            verdicts.append({"arm": arm, "method": other["method"], "claim": column, "measure": key, "better": better,
                             "paper_values": [paper_ours, paper_other], **result})  # fmt: skip
    return verdicts


def mean_cell(values):
    mean, std = mean_std(values)
    if mean is None:
        return "–"
    return fmt_value(mean) + (f" ± {fmt_value(std)}" if std is not None else "")


def write_table1(paths, output_dir, ssreg_arm=None, alpha=0.05):
    """Writes `table1.md` and `table1.json` into `output_dir` from the unit files under `paths`; returns the JSON."""
    units = load_units(paths)
    notes = check_comparable(units)
    arms = arm_table(units)
    suffix = next((u["feature_extractor"] for u in units if u.get("feature_extractor")), "EffNetLite0")
    candidates = [a for a, e in arms.items() if e["method"] == "ssreg"]
    if ssreg_arm is None and len(candidates) == 1:
        ssreg_arm = candidates[0]
    if ssreg_arm is not None and ssreg_arm not in arms:
        raise ValueError(f"--ssreg_arm {ssreg_arm!r}: no unit of that arm; the arms are {', '.join(arms)}")
    if ssreg_arm is None and candidates:
        notes.append(f"Several SSReg arms ({', '.join(candidates)}): no verdict; choose one with --ssreg_arm.")
    verdicts = claim_verdicts(arms, ssreg_arm, suffix, alpha) if ssreg_arm else []

    first = units[0]
    study = first["settings"]["study"]
    generation = study.get("generation") or {}
    dit, data = study.get("dit") or {}, study.get("data") or {}
    devices = sorted({u.get("device") or "?" for u in units})
    commits = sorted({str((u.get("code") or {}).get("commit"))[:12] for u in units})

    def row_name(arm, entry):
        if entry["pilot"]:
            return "base VAE (no fine-tune)"
        return f"{METHOD_TITLES.get(entry['method'], entry['method'])} (`{arm}`)"

    # The real crops scored like samples (the pilot's unit, `real`): the reference rows of the generation columns
    real = next((u.get("real") or {} for u in units if u.get("pilot")), {})

    def table(columns, title):
        header = [f"{name} {better}".rstrip() for name, _, better in columns]
        lines = [title, "", "| method | n | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(columns)]
        for arm, entry in arms.items():
            cells = [mean_cell(entry["measures"].get(key.format(x=suffix), [])) for _, key, _ in columns]
            lines.append(f"| {row_name(arm, entry)} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
        if any(key.startswith("gen_") for _, key, _ in columns):
            for source, name in REAL_ROWS.items():
                if source in real:
                    measures = real[source]["measures"]
                    cells = [mean_cell([measures.get(key.format(x=suffix))]) if key.startswith("gen_") else "–"
                             for _, key, _ in columns]  # fmt: skip
                    if all(cell == "–" for cell in cells):  # (the held-out crops against themselves)
                        continue
                    lines.append(f"| {name} ({real[source]['crops']} crops) | – | " + " | ".join(cells) + " |")
        return lines + [""]

    lines = ["# The paper's Table 1 at small scale", "",
             f"_Written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} by "
             f"`studies/small_scale/scripts/report.py --units` from {len(units)} unit files._", "",
             f"Setting: {data.get('resolution', generation.get('resolution', '?'))} px crops ("
             f"{first['data']['train']['crops']} training crops of {first['data']['train']['photos']} photos, "
             f"{first['data']['heldout']['crops']} held-out crops of {first['data']['heldout']['photos']} photos); "
             f"{dit.get('preset', '?')} for {dit.get('max_train_steps', '?')} steps at batch "
             f"{dit.get('train_batch_size', '?')}; {(study.get('sample') or {}).get('num_images_per_class', '?')} samples "
             f"with {(study.get('sample') or {}).get('num_inference_steps', 'the default')} sampling steps; device "
             f"{', '.join(devices)}; commit {', '.join(commits)}. Values are mean ± std over seeds (n - 1), n seeds per "
             f"row. Scores with {suffix} features are project-internal: comparable between the rows of this table "
             f"only, never with the paper's Inception FID.", ""]  # fmt: skip
    lines += ["Units: " + "; ".join(f"`{arm}` seeds {', '.join(map(str, e['seeds']))}" for arm, e in arms.items()) + ".", ""]
    lines += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    if real:
        lines += ["The rows *real* are crops, not samples, scored the same way: other crops of the training photos "
                  "(never trained on) and the held-out crops. They show what real images of these photos reach against "
                  "each reference, the ceiling of a model's scores.", ""]  # fmt: skip
    lines += table(TABLE1_COLUMNS, "## Reconstruction (held-out crops) | generation (against the training crops)")
    lines += table(HELDOUT_COLUMNS, "## Generation against the held-out crops")
    lines += table(LATENT_COLUMNS, "## Latent structure and training")

    lines += ["## The paper's orderings, claim by claim", ""]
    if not verdicts:
        why = "no SSReg arm among the units" if ssreg_arm is None else "no other method among the units"
        lines += [f"No verdict: {why}.", ""]
    else:
        lines += [f"SSReg is `{ssreg_arm}`. For each claim of the paper's Table 1 (Flux rows), the ordering of SSReg and "
                  f"the other method there, and here: the difference of the means (SSReg − other) with its 95 % "
                  f"confidence interval and Welch's two-sided p; Cohen's d is the difference over the pooled std. "
                  f"*holds* / *reversed*: p < {alpha} in the paper's direction / against it; *not resolved*: within the "
                  f"spread of the seeds.", "",
                  "| claim | vs | paper (SSReg vs other) | paper: SSReg is | here: SSReg is | SSReg − other [95 % CI] | p | d "
                  "| n | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for v in verdicts:
            reference = " (held-out)" if v["measure"].startswith("gen_heldout/") else ""
            paper = "–" if v["paper"] is None else f"{v['paper_values'][0]} vs {v['paper_values'][1]}"
            interval = (f"{fmt_value(v['difference'])} [{fmt_value(v['ci95'][0])}, {fmt_value(v['ci95'][1])}]"
                        if "difference" in v else "–")  # fmt: skip
            p = fmt_value(v["p"]) if "p" in v else "–"
            d = fmt_value(v["cohen_d"]) if "cohen_d" in v else "–"
            lines.append(f"| {v['claim']} {v['better']}{reference} | {METHOD_TITLES.get(v['method'], v['method'])} | "
                         f"{paper} | {v['paper'] or '–'} | {v.get('observed', '–')} | {interval} | {p} | {d} | "
                         f"{v['n'][0]}, {v['n'][1]} | **{v['verdict']}** |")  # fmt: skip
        lines.append("")
        counts = {}
        for v in verdicts:
            counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
        lines += ["In all: " + ", ".join(f"{k} {n}" for k, n in counts.items()) + ".", ""]

    stages = [s for s in ("data", "base", "eval_base", "finetune", "eval", "cache", "dit", "sample", "score_heldout",
                          "score_train") if any((u.get("wall_seconds") or {}).get(s) is not None for u in units)]  # fmt: skip
    if stages:
        lines += ["## Wall time per job (seconds; mean over the units' runs, jobs sharing a GPU included)", "",
                  "| method | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]  # fmt: skip
        for arm, entry in arms.items():
            of_arm = [u for u in units if u["arm"] == arm]
            cells = []
            for stage in stages:
                mean, std = mean_std([(u.get("wall_seconds") or {}).get(stage) for u in of_arm])
                cells.append("–" if mean is None else f"{mean:.0f}" + (f" ± {std:.0f}" if std is not None else ""))
            lines.append(f"| {row_name(arm, entry)} | " + " | ".join(cells) + " |")
        lines.append("")

    statistics = {arm: {"method": e["method"], "pilot": e["pilot"], "seeds": e["seeds"],
                        "measures": {k: dict(zip(("mean", "std"), mean_std(v)), n=sum(finite(x) for x in v), values=v)
                                     for k, v in e["measures"].items()}} for arm, e in arms.items()}  # fmt: skip
    result = {"report": "Table 1 at small scale", "units": [{"arm": u["arm"], "seed": u["seed"], "path": u["path"]} for u in units],
              "notes": notes, "ssreg_arm": ssreg_arm, "alpha": alpha, "arms": statistics, "real": real, "verdicts": verdicts,
              "paper_table1_flux": PAPER_TABLE1}  # fmt: skip
    os.makedirs(output_dir, exist_ok=True)
    write_json_and_markdown(os.path.join(output_dir, "table1"), result, lines, indent=1)
    print(f"table1: {len(units)} units of {len(arms)} arms, {len(verdicts)} claims -> {output_dir}/table1.md, table1.json")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("study", metavar="STUDY", nargs="?", help="The study folder (the config's study_dir).")
    parser.add_argument("--units", nargs="+", metavar="PATH", default=None,
                        help="Instead of STUDY: unit files (scripts/unit.py), or folders holding them, from any number "
                        "of runs; writes the Table-1 report table1.md and table1.json into --output_dir.")  # fmt: skip
    parser.add_argument("--output_dir", default=None, help="With --units: where the report goes (created).")
    parser.add_argument("--ssreg_arm", default=None, help="With --units: the arm the verdict takes as SSReg (default: "
                        "the one arm trained with SSReg).")  # fmt: skip
    parser.add_argument("--alpha", type=float, default=0.05, help="With --units: the significance level of the verdict.")
    args = parser.parse_args(argv)
    if args.units is not None:
        if args.study is not None:
            parser.error("give either STUDY or --units, not both")
        if not args.output_dir:
            parser.error("--units needs --output_dir")
        if not 0 < args.alpha < 1:
            parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
        try:
            write_table1(args.units, args.output_dir, args.ssreg_arm, args.alpha)
        except ValueError as error:
            parser.error(str(error))
        return 0
    if args.study is None:
        parser.error("give STUDY (a study folder) or --units PATH ...")
    if not os.path.isdir(args.study):
        parser.error(f"argument STUDY: {args.study!r} is not a folder")
    write_report(args.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
