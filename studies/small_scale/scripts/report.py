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


def read_json(path):
    with open(path) as f:
        return json.load(f)


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def last_logged(path):
    """The last line of a train_metrics.jsonl (the last logged window), {} when there is none."""
    last = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    last = json.loads(line)
                except ValueError:  # a line cut off by a killed run
                    continue
    return last


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
        if arm not in arms:
            seeds = sorted(int(m.group(1)) for n in os.listdir(os.path.join(arms_dir, arm)) if (m := re.fullmatch(r"seed(\d+)", n)))
            arms[arm] = {"seeds": seeds}

    units, status, missing = {}, {}, []
    base = {}
    if os.path.isfile(os.path.join(study, "base", "vae", "README.md")):
        base.update(training_results(os.path.join(study, "base", "vae")))
    if os.path.isfile(os.path.join(study, "base", "eval", "results.json")):
        base.update(eval_results(os.path.join(study, "base", "eval", "results.json")))
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
    with open(os.path.join(study, "study_results.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(study, "study_results.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"report: {len(units)} VAEs with results, {len(missing)} missing stages -> study_results.json, study_results.md")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("study", metavar="STUDY", help="The study folder (the config's study_dir).")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.study):
        parser.error(f"argument STUDY: {args.study!r} is not a folder")
    write_report(args.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
