#!/usr/bin/env python
"""
One arm and seed of a study as two small, self-contained files: its numbers, and a grid of its DiT samples.

    python studies/small_scale/scripts/unit.py STUDY --arm ssreg --seed 0 --settings JSON \\
        --output_json STUDY/units/ssreg_seed0.json --output_grid STUDY/units/ssreg_seed0.png

The workflow runs it once a chain is scored (rule `unit`); `--settings` is what the workflow passes (the config
but for where and how it runs, the arm's flags). The arm `base` is the base VAE's own chain (rule `pilot`).

The JSON holds everything the Table-1 report (`report.py --units`) needs, so unit files made on different machines
or at different times can be merged without the study folders they came from: the measures of reconstruction,
latent structure and generation (the flat keys of `report.py`: `rec/PSNR`, `latent/psd_slope`,
`gen_train/FID-EffNetLite0`, ...), the DiT's loss curve and the VAE's training curve (subsampled), each job's wall
time (Snakemake's `benchmark:` files), the arm, seed, flags and settings with their SHA-256, the SHA-256 of the
base VAE's and the unit's VAE weights, the crops' fingerprints, the GPU, and the code's version and commit. The grid
shows the first 16 scored samples (4 x 4, at most 128 px each). The pilot's unit also holds `real`: the scores of
real crops (the workflow's `score_real`, when the config's `data: real_crops` is set), the table's reference rows.
"""

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (the study's result readers, beside this file)
from prepare_data import sha256_file  # noqa: E402


FORMAT = "ssreg-small-scale-unit"
FORMAT_VERSION = 1
PILOT = "base"
MAX_CURVE_POINTS = 200
FINETUNE_CURVE_KEYS = ("loss", "rec_mae", "kl", "latent_mse", "reg_mae", "eq_mae", "low_res_mae", "se_mae", "esm", "dsm_mae")
GRID_SIDE = 4
GRID_CELL = 128
# The real crops scored like samples (rule score_real): {source: the crops' folder under data/}; each is scored
# against the training crops and, but for the held-out crops themselves, against the held-out crops.
REAL_SOURCES = ("real", "heldout")
STAGES = ("data", "base", "eval_base", "finetune", "eval", "cache", "dit", "sample", "score_heldout", "score_train")


def sha256_json(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def subsample(rows, keys, limit=MAX_CURVE_POINTS):
    """`{"step": [...], key: [...]}` of at most `limit` rows of a train_metrics.jsonl, evenly spaced, the last kept."""
    rows = [r for r in rows if isinstance(r, dict) and "step" in r and any(k in r for k in keys)]
    if len(rows) > limit:
        stride = -(-len(rows) // limit)
        rows = rows[::stride] if (len(rows) - 1) % stride == 0 else rows[::stride] + [rows[-1]]
    curve = {"step": [int(r["step"]) for r in rows]}
    for key in keys:
        values = [r.get(key) for r in rows]
        if any(report.finite(v) and v != 0 for v in values):  # a term that never ran (0 throughout) is left out
            curve[key] = [v if report.finite(v) else None for v in values]
    return curve


def read_jsonl(path):
    from diffusers_ssreg.training import read_metrics_log  # (a line cut off by a killed run is skipped)

    return read_metrics_log(path)


def wall_seconds(study, arm, seed):
    """Each job's wall time in seconds (the `s` column of its Snakemake benchmark file), None where there is none."""
    bench = os.path.join(study, "benchmarks")
    files = {"data": "data.tsv", "base": "base.tsv", "eval_base": "eval_base.tsv",
             "finetune": f"finetune/{arm}/seed{seed}.tsv", "eval": f"eval/{arm}/seed{seed}.tsv",
             "cache": f"cache/{arm}/seed{seed}.tsv", "dit": f"dit/{arm}/seed{seed}.tsv",
             "sample": f"sample/{arm}/seed{seed}.tsv", "score_heldout": f"score/{arm}/seed{seed}/heldout.tsv",
             "score_train": f"score/{arm}/seed{seed}/train.tsv"}  # fmt: skip
    seconds = {}
    for stage in STAGES:
        if arm == PILOT and stage in ("finetune", "eval"):
            continue
        path = os.path.join(bench, files[stage])
        value = None
        if os.path.isfile(path):
            with open(path) as f:
                lines = f.read().splitlines()
            if len(lines) >= 2:
                row = dict(zip(lines[0].split("\t"), lines[-1].split("\t")))
                try:
                    value = round(float(row["s"]), 2)
                except (KeyError, ValueError):
                    value = None
        seconds[stage] = value
    return seconds


def gpu_name(device):
    """The GPU's name from nvidia-smi on a CUDA study, else the device. The workflow writes unit files where it runs
    (a local rule): on one machine that is the GPU the jobs ran on; on a cluster, the submitting node's."""
    if device != "cuda":
        return device
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=True, timeout=30).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "cuda (name unknown: no nvidia-smi)"
    names = sorted({n.strip() for n in names if n.strip()})
    return ", ".join(names) or "cuda (name unknown)"


def code_version(repository, commit):
    """The package version and the commit: the one given, else the repository's HEAD (None outside a git checkout)."""
    from diffusers_ssreg import __version__

    code = {"diffusers_ssreg_version": __version__, "commit": commit, "uncommitted_changes": None}
    if commit is None and repository:
        try:
            head = subprocess.run(["git", "-C", repository, "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()  # fmt: skip
            status = subprocess.run(["git", "-C", repository, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
            code.update(commit=head, uncommitted_changes=bool(status.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    return code


def sample_grid(folder, output, side=GRID_SIDE, cell=GRID_CELL):
    """A `side` x `side` grid of the first images of a sample_dit.py folder (by name), each at most `cell` px."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".png"))
    if not names:
        raise ValueError(f"no PNG samples in {folder!r}")
    side = min(side, int(len(names) ** 0.5))
    images = []
    for name in names[: side * side]:
        with Image.open(os.path.join(folder, name)) as image:
            image = image.convert("RGB")
        if max(image.size) > cell:
            image = image.resize((cell, cell * image.size[1] // image.size[0]), Image.LANCZOS)
        images.append(image)
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    make_image_grid(images, rows=side, cols=side).save(output, optimize=True)
    return {"rows": side, "cols": side, "cell": list(images[0].size), "images": names[: side * side]}


def method_of(flags):
    """The regularizer an arm trains with (`regularizer`, default ssreg); an SSReg arm with alpha 0 is a plain fine-tune."""
    flags = {str(k).lstrip("-"): v for k, v in (flags or {}).items()}
    method = flags.get("regularizer", "ssreg")
    if method == "ssreg" and flags.get("ssreg_alpha") is not None and float(flags["ssreg_alpha"]) == 0:
        return "none"
    return method


def real_scores(study):
    """{source: {"crops": N, "measures": {"gen_train/FID-...": value, ...}}} of the real crops scored in `study`."""
    found = {}
    for source in REAL_SOURCES:
        measures, crops = {}, None
        for reference in ("train", "heldout"):
            path = os.path.join(study, "real", source, reference, "generation.json")
            if os.path.isfile(path):
                generation = report.read_json(path)
                measures.update({f"gen_{reference}/{k}": v for k, v in generation["metrics"].items()})
                crops = generation["num_samples"]
        if measures:
            found[source] = {"crops": crops, "measures": measures}
    return found


def build_unit(study, arm, seed, given, repository=None):
    """The unit's content (see the module's docstring); `given` is the workflow's `--settings` mapping."""
    chain = os.path.join(study, "arms", arm, f"seed{seed}")
    found = report.chain_results(chain)
    need = ("cache", "dit", "sample", "score") if arm == PILOT else report.STAGES
    missing = [stage for stage in need if stage not in found]
    if missing:
        raise ValueError(f"{chain}: no results of {', '.join(missing)}; a unit file needs a scored chain")
    measures = {k: v for stage in found.values() for k, v in stage.items()}
    base_vae = os.path.join(study, "base", "vae")
    if arm == PILOT:
        vae = base_vae
        measures.update(report.training_results(base_vae))
        measures.update(report.eval_results(os.path.join(study, "base", "eval", "results.json")))
        vae_log = read_jsonl(os.path.join(base_vae, "logs", "train_metrics.jsonl"))
    else:
        vae = os.path.join(chain, "finetune")
        vae_log = read_jsonl(os.path.join(vae, "logs", "train_metrics.jsonl"))
    split = report.read_json(os.path.join(study, "data", "split.json"))
    arm_part = given.get("arm") or {}
    settings = {"study": given.get("settings") or {}, "base_flags": given.get("base_flags") or {}}
    generation = report.read_json(os.path.join(chain, "score", "train", "generation.json"))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arm": arm,
        "seed": int(seed),
        "method": "none" if arm == PILOT else method_of(arm_part.get("flags")),
        "init": arm_part.get("init"),
        "pilot": arm == PILOT,
        "flags": arm_part.get("flags") or {},
        "finetune_flags": arm_part.get("finetune_flags") or {},
        "settings": settings,
        "settings_sha256": sha256_json(settings),
        "base_vae_sha256": sha256_file(os.path.join(base_vae, "diffusion_pytorch_model.safetensors")),
        "vae_sha256": sha256_file(os.path.join(vae, "diffusion_pytorch_model.safetensors")),
        "data": {part: {"crops": split[part]["crops"], "photos": len(split[part]["photos"]),
                        "fingerprint": split[part]["fingerprint"]} for part in ("train", "heldout")},  # fmt: skip
        "feature_extractor": (generation.get("feature_extractor") or {}).get("name"),
        "measures": measures,
        "curves": {
            "dit": subsample(read_jsonl(os.path.join(chain, "dit", "logs", "train_metrics.jsonl")), ("loss",)),
            "vae": subsample(vae_log, FINETUNE_CURVE_KEYS, limit=100),
        },
        "real": real_scores(study) if arm == PILOT else {},
        "wall_seconds": wall_seconds(study, arm, seed),
        "device": gpu_name(given.get("device")),
        "jobs_per_gpu": given.get("jobs_per_gpu"),
        "code": code_version(repository, given.get("commit")),
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("study", metavar="STUDY", help="The study folder (the config's study_dir).")
    parser.add_argument("--arm", required=True, help=f"The arm ({PILOT!r}: the base VAE's own chain).")
    parser.add_argument("--seed", type=int, required=True, help="The seed.")
    parser.add_argument("--settings", default="{}", help="JSON: the workflow's settings of the unit (see above).")
    parser.add_argument("--repository", default=None, help="The repository whose commit is recorded (git rev-parse).")
    parser.add_argument("--output_json", required=True, help="The unit's JSON file.")
    parser.add_argument("--output_grid", required=True, help="The unit's sample grid (PNG).")
    args = parser.parse_args(argv)
    try:
        args.settings = json.loads(args.settings)
    except ValueError as error:
        parser.error(f"--settings is not JSON: {error}")
    if not isinstance(args.settings, dict):
        parser.error(f"--settings must be a JSON object, got {args.settings!r}")
    if not os.path.isdir(os.path.join(args.study, "arms", args.arm, f"seed{args.seed}")):
        parser.error(f"no chain folder arms/{args.arm}/seed{args.seed} in STUDY {args.study!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    unit = build_unit(args.study, args.arm, args.seed, args.settings, args.repository)
    unit["grid"] = {"file": os.path.basename(args.output_grid),
                    **sample_grid(os.path.join(args.study, "arms", args.arm, f"seed{args.seed}", "sample"), args.output_grid)}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)) or ".", exist_ok=True)
    temporary = args.output_json + ".tmp"
    with open(temporary, "w") as f:
        json.dump(unit, f, indent=1)
        f.write("\n")
    os.replace(temporary, args.output_json)
    print(f"unit {args.arm}/{args.seed}: {len(unit['measures'])} measures -> {args.output_json} "
          f"({os.path.getsize(args.output_json) / 1024:.0f} KiB), {args.output_grid} "
          f"({os.path.getsize(args.output_grid) / 1024:.0f} KiB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
