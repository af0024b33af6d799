#!/usr/bin/env python
"""
The study's data: a fixed hold-out split of a folder of photos, and square crops cut from each part once.

    python prepare_data.py --photos PHOTOS --output_dir STUDY/data --resolution 128 --heldout_photos 8 \\
        --train_crops 6000 --heldout_crops 2000 --crop_min_area 0.1

The photos (recursive; jpg, png, webp, ...) are sorted by path and `--heldout_photos` of them, spread evenly
through that order, are held out. Crop *i* of a part is a square at a random position and scale (area
U(crop_min_area, 1) of the photo's largest square), resized to `--resolution` px (bicubic), taken from photo
*i mod n*; its randomness is seeded by the part and *i* alone, so the crops never depend on an arm or a seed.
File names interleave the photos (`00000_<photo>.png`, ...): any first N crops cover every photo.

`--real_crops N` also cuts N other crops of the training photos (seeded as their own part, `real`), which no model
trains on: scored against the training and the held-out crops like a model's samples, they show what real images
of the training photos reach (the generation scores' reference point).

Writes `train_crops/`, `heldout_crops/`, `real_crops/` (with `--real_crops`) and `split.json` (the split, each
photo's SHA-256 and a fingerprint of each crop folder) into `--output_dir`.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
from concurrent.futures import ProcessPoolExecutor


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CROP_SEED = "ssreg-study"


def find_photos(root):
    found = []
    for directory, _, names in os.walk(root, followlinks=True):
        found += [os.path.relpath(os.path.join(directory, n), root) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def heldout_indices(count, heldout):
    """`heldout` indices spread evenly over `count` sorted files (the middle of each of `heldout` equal runs)."""
    return sorted({(2 * k + 1) * count // (2 * heldout) for k in range(heldout)})


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(path):
    return re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.splitext(os.path.basename(path))[0])[:40]


def crop_photo(job):
    """Writes the crops `indices` of one photo; crop i is seeded by (CROP_SEED, part, i) alone."""
    from PIL import Image, ImageOps

    path, part, indices, resolution, min_area, folder, width = job
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if min(image.size) < resolution:  # small photos: upscale so a full-resolution crop fits
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    short = min(w, h)
    for i in indices:
        rng = random.Random(f"{CROP_SEED}/{part}/{i}")
        side = max(resolution, min(short, round(short * math.sqrt(rng.uniform(min_area, 1.0)))))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        crop.save(os.path.join(folder, f"{i:0{width}d}_{safe_name(path)}.png"), format="PNG")


def write_crops(photos, part, count, resolution, min_area, folder, jobs):
    temporary = folder + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    width = max(5, len(str(count - 1)))
    work = [(p, part, list(range(k, count, len(photos))), resolution, min_area, temporary, width)
            for k, p in enumerate(photos)]  # fmt: skip
    work = [w for w in work if w[2]]
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(work))) as pool:
            list(pool.map(crop_photo, work))
    else:
        for w in work:
            crop_photo(w)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def folder_fingerprint(folder):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        digest.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--photos", required=True, help="Folder of photos (recursive).")
    parser.add_argument("--output_dir", required=True, help="Where train_crops/, heldout_crops/ and split.json go.")
    parser.add_argument("--resolution", type=int, required=True, help="Side of the square crops, in pixels.")
    parser.add_argument("--heldout_photos", type=int, required=True, help="Photos held out for evaluation.")
    parser.add_argument("--train_crops", type=int, required=True, help="Crops of the training photos.")
    parser.add_argument("--heldout_crops", type=int, required=True, help="Crops of the held-out photos.")
    parser.add_argument("--real_crops", type=int, default=0,
                        help="Other crops of the training photos, never trained on (see above); 0: none.")
    parser.add_argument("--crop_min_area", type=float, default=0.1, help="Smallest crop area, as a fraction of the photo's largest square.")
    parser.add_argument("--jobs", type=int, default=1, help="Processes cutting crops.")
    args = parser.parse_args(argv)
    for name in ("resolution", "heldout_photos", "train_crops", "heldout_crops"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.real_crops < 0:
        parser.error(f"--real_crops must be at least 0, got {args.real_crops}")
    if not 0 < args.crop_min_area <= 1:
        parser.error(f"--crop_min_area must be in (0, 1], got {args.crop_min_area}")
    if not os.path.isdir(args.photos):
        parser.error(f"--photos {args.photos!r} is not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    photos = find_photos(args.photos)
    if len(photos) < args.heldout_photos + 2:
        raise SystemExit(f"prepare_data.py: error: --photos {args.photos!r} holds {len(photos)} images; holding out "
                         f"{args.heldout_photos} needs at least {args.heldout_photos + 2}.")  # fmt: skip
    held = set(heldout_indices(len(photos), args.heldout_photos))
    parts = {"train": [p for i, p in enumerate(photos) if i not in held], "heldout": [p for i, p in enumerate(photos) if i in held]}
    if args.real_crops:
        parts["real"] = parts["train"]
    split = {"crop_seed": CROP_SEED, "resolution": args.resolution, "crop_min_area": args.crop_min_area,
             "photos": {p: sha256_file(os.path.join(args.photos, p)) for p in photos}}  # fmt: skip
    for part, chosen in parts.items():
        count = getattr(args, f"{part}_crops")
        folder = os.path.join(args.output_dir, f"{part}_crops")
        write_crops([os.path.join(args.photos, p) for p in chosen], part, count, args.resolution, args.crop_min_area,
                    folder, args.jobs)  # fmt: skip
        split[part] = {"photos": chosen, "crops": count, "fingerprint": folder_fingerprint(folder)}
        print(f"{part}: {len(chosen)} photos -> {count} crops of {args.resolution} px", flush=True)
    with open(os.path.join(args.output_dir, "split.json"), "w") as f:
        json.dump(split, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
