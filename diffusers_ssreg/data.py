"""Image data for training: local folders, `datasets` names, and the embedded photo default.

Every source ends as a torch `Dataset` of `{"pixel_values": (3, R, R) in [-1, 1]}` (plus `"class_labels"`
where the source has labels). Files are scanned and decoded by `diffusers_ssreg.images` (EXIF orientation,
every bit depth and mode, alpha over a stated background, symlinks once each, one summary line). A file
that can't be decoded is skipped with a counted warning and replaced by the next good one, so one bad
file never crashes a long run.
"""

import functools
import logging
import os
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

# IMAGE_EXTENSIONS is re-exported here: the one list of the extensions read lives in `images`.
from .images import IMAGE_EXTENSIONS, WHITE, ResizeShortSide, describe_item, open_image, resize_short_side, scan_images
from .utils import require


logger = logging.getLogger(__name__)

# Colour and grayscale photographs bundled inside scikit-image (no download), used by the offline
# demo. The last two are held out for validation.
EMBEDDED_TRAIN_PHOTOS = (
    "astronaut", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "moon", "coins", "brick", "grass", "gravel", "cell", "clock",
)  # fmt: skip
EMBEDDED_VALIDATION_PHOTOS = ("coffee", "motorcycle_right")


def _skimage_photo(skimage_data, name: str) -> np.ndarray:
    if name.startswith("motorcycle_"):  # one stereo pair: (left, right, disparity)
        return skimage_data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    return getattr(skimage_data, name)()


def find_images(root: str, recursive: bool = True, name: Optional[str] = None, log_summary: bool = True) -> List[str]:
    """
    The image files under `root` (recursively by default), sorted, each real file once: `images.scan_images`,
    which also logs one summary line of what was used and skipped (unless `log_summary=False`). `name`
    (e.g. `"--train_data_dir"`) goes into the error messages.
    """
    scan = scan_images(root, recursive=recursive, name=name)
    if log_summary:  # a warning when something was left out or only its first frame is used: seen without INFO logs
        logger.log(logging.WARNING if scan.skipped or scan.animated else logging.INFO, scan.summary())
    return scan.files


def embedded_photos(split: str = "train") -> List[Image.Image]:
    """The embedded default's real photographs, shipped by scikit-image, as RGB PIL images."""
    if split not in ("train", "validation"):
        raise ValueError(f"`split` must be 'train' or 'validation', got {split!r}.")
    skimage_data = require("skimage.data", "the offline demo's photos", "scikit-image")
    names = EMBEDDED_TRAIN_PHOTOS if split == "train" else EMBEDDED_VALIDATION_PHOTOS
    images = []
    for name in names:
        array = _skimage_photo(skimage_data, name)
        if array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-8)).astype(np.uint8)
        images.append(Image.fromarray(array).convert("RGB"))
    return images


def image_transform(resolution: int, center_crop: bool = False, random_flip: bool = True) -> Callable:
    """
    diffusers' usual pipeline: resize the short side (`images.resize_short_side`, the package's one
    convention), center or random crop, optional flip, scale to [-1, 1].
    """
    transforms = require("torchvision.transforms", "image transforms", "torchvision")
    return transforms.Compose(
        [
            ResizeShortSide(resolution),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def random_scale_crop_transform(resolution: int, scale=(0.25, 1.0), random_flip: bool = True) -> Callable:
    """Random crops covering `scale` of the photo, resized to `resolution` (for training on few large photos)."""
    transforms = require("torchvision.transforms", "image transforms", "torchvision")
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(resolution, scale=scale, ratio=(3 / 4, 4 / 3)),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


class ImageDataset(torch.utils.data.Dataset):
    """
    Images from a sequence of loaders (file paths, PIL images, or `datasets` rows), transformed on access.

    Args:
        items (`Sequence`): file paths, PIL images, or anything `load` turns into a PIL image.
        transform (`Callable`): PIL image -> tensor `(3, R, R)` in [-1, 1].
        labels (`Sequence[int]`, *optional*): class labels, returned as `"class_labels"`.
        length (`int`, *optional*): virtual length; item i uses `items[i % len(items)]` (many random crops of few photos).
        load (`Callable`, *optional*): item -> RGB PIL image; default `images.open_image` (paths, bytes,
            `datasets` image values, PIL images), alpha over `background`.
        seed (`int`, *optional*): when given, the random augmentation of item i in epoch e is seeded by
            (seed, e, i), so a resumed run sees exactly the crops an uninterrupted run would have seen
            (whatever the data-loader workers and prefetching did). Call `set_epoch` every epoch.
        source (`str`, *optional*): what the items are, e.g. `"--train_data_dir '/data'"`, for error messages.
        background (`tuple`, *optional*, defaults to white): what transparent pixels show (default `load` only).
    """

    def __init__(
        self,
        items: Sequence,
        transform: Callable,
        labels=None,
        length: Optional[int] = None,
        load=None,
        seed=None,
        source: str = "the dataset",
        background=WHITE,
    ):
        if len(items) == 0:
            raise ValueError(f"{source} is empty: no images to train or evaluate on.")
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"got {len(labels)} labels for {len(items)} images.")
        self.items, self.transform, self.labels, self.source = items, transform, labels, source
        self.length = len(items) if length is None else int(length)
        self.load = load or functools.partial(open_image, background=background)
        self.bad_positions = set()  # items found unreadable (per process): never read twice
        self.seed, self.epoch = seed, 0

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable items this process has met."""
        return len(self.bad_positions)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's augmentation seeds (only used when `seed` was given)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(len(self.items), 64)):
            position = (index + attempt) % len(self.items)
            if position in self.bad_positions:
                continue
            try:
                image = self.load(self.items[position])
                if self.seed is None:
                    example = {"pixel_values": self.transform(image)}
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
                        example = {"pixel_values": self.transform(image)}
            except Exception as error:  # a corrupt, truncated or non-image file: skip it, never crash
                self.bad_positions.add(position)
                logger.warning(
                    "Skipping unreadable image %r (%s: %s); %d skipped so far in this process.",
                    describe_item(self.items[position]), type(error).__name__, error, self.num_skipped,
                )
                continue
            if self.labels is not None:
                example["class_labels"] = torch.tensor(int(self.labels[position]))
            return example
        raise RuntimeError(
            f"no readable image found around index {index} of {self.source} ({len(self.bad_positions)} unreadable "
            f"so far): check the data."
        )

    def subset(self, positions: Sequence[int]) -> "ImageDataset":
        """A dataset of the items at `positions` (same transform, loader, seed and source)."""
        positions = list(positions)
        items = self.items.select(positions) if hasattr(self.items, "select") else [self.items[i] for i in positions]
        labels = None if self.labels is None else [self.labels[i] for i in positions]
        subset = ImageDataset(items, self.transform, labels, load=self.load, seed=self.seed, source=self.source)
        return subset

    def random_subset(self, max_samples: Optional[int], seed: int = 0) -> "ImageDataset":
        """At most `max_samples` items drawn at random (seeded), kept in their order; all of them for None."""
        if max_samples is None or max_samples >= len(self.items):
            return self
        keep = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(seed))[:max_samples]
        return self.subset(sorted(keep.tolist()))


def read_images(dataset: ImageDataset, count: int, flag: str) -> Tuple[torch.Tensor, List[int]]:
    """
    The first `count` readable images of `dataset`, stacked `(n, 3, R, R)` (fewer when it holds fewer), and
    their positions; each item is read once, unreadable ones are passed over. Raises a ValueError naming
    `flag` and the source when none is readable: for a validation set, that is found before training.
    """
    images, positions, errors = [], [], []
    for position in range(len(dataset.items)):
        if len(images) == count:
            break
        try:
            images.append(dataset.transform(dataset.load(dataset.items[position])))
            positions.append(position)
        except Exception as error:  # as ImageDataset does: pass over it, and say which and why at the end
            errors.append(f"{describe_item(dataset.items[position])}: {type(error).__name__}: {error}")
    if not images:
        raise ValueError(
            f"{flag} holds no readable image ({dataset.source}): {len(errors)} tried, e.g. "
            f"{errors[0] if errors else 'none'}. Give a folder of image files Pillow reads ({', '.join(IMAGE_EXTENSIONS)})."
        )
    if errors:
        logger.warning(f"{flag}: {len(errors)} unreadable image(s) passed over, e.g. {errors[0]}.")
    return torch.stack(images), positions


def hub_image_dataset(
    dataset_name: str,
    transform: Callable,
    split: str = "train",
    dataset_config_name: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
    max_samples: Optional[int] = None,
    seed: Optional[int] = None,
    background=WHITE,
) -> ImageDataset:
    """An `ImageDataset` over `datasets.load_dataset(dataset_name, ...)[split]`, images decoded lazily and robustly."""
    datasets = require("datasets", "loading a `datasets` dataset")
    try:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    except Exception as error:
        raise ValueError(
            f"could not load `dataset_name`={dataset_name!r} (config {dataset_config_name!r}, split {split!r}): {error}"
        ) from error
    columns = dataset.column_names
    if image_column is None:
        candidates = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
        image_column = candidates[0] if candidates else None
    if image_column not in columns:
        raise ValueError(f"`image_column`={image_column!r} is not a column of {dataset_name!r}; columns: {columns}.")
    if label_column is not None and label_column not in columns:
        raise ValueError(f"`label_column`={label_column!r} is not a column of {dataset_name!r}; columns: {columns}.")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed or 0).select(range(max_samples))
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    labels = dataset[label_column] if label_column else None
    # Rows are read lazily (one image per access): a large dataset never has to fit in memory.
    load = functools.partial(_open_column, column=image_column, background=background)
    source = f"`datasets` {dataset_name!r} ({split})"
    return ImageDataset(dataset, transform, labels=labels, load=load, seed=seed, source=source)


def _open_column(row: dict, column: str, background=WHITE) -> Image.Image:
    return open_image(row[column], background=background)


def folder_image_dataset(
    root: str,
    transform: Callable,
    with_labels: bool = False,
    length: Optional[int] = None,
    seed=None,
    name: Optional[str] = None,
    background=WHITE,
    log_summary: bool = True,
) -> ImageDataset:
    """
    An `ImageDataset` over the images under `root` (`find_images`: one summary line of the scan); with
    `with_labels`, one subfolder per class (sorted names). `name` (e.g. `"--train_data_dir"`) goes into messages.
    """
    files = find_images(root, name=name, log_summary=log_summary)
    labels = None
    if with_labels:
        classes = sorted({os.path.relpath(f, root).split(os.sep)[0] for f in files if os.sep in os.path.relpath(f, root)})
        if not classes:
            raise ValueError(f"`{root}` has no class subfolders: put each class's images in its own subfolder.")
        index = {name: i for i, name in enumerate(classes)}
        files = [f for f in files if os.sep in os.path.relpath(f, root)]
        labels = [index[os.path.relpath(f, root).split(os.sep)[0]] for f in files]
    source = f"{name} {root!r}" if name else repr(root)
    return ImageDataset(files, transform, labels=labels, length=length, seed=seed, source=source, background=background)


def fixed_crops(images: Sequence[Image.Image], resolution: int, per_image: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic validation batch `(N, 3, R, R)` in [-1, 1]: `per_image` seeded square crops of each image."""
    transforms = require("torchvision.transforms", "image transforms", "torchvision")
    rng = random.Random(seed)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    crops = []
    for image in images:
        image = image.convert("RGB")
        short = min(image.size)
        if short < resolution:
            image = resize_short_side(image, resolution)
            short = min(image.size)
        for _ in range(per_image):
            size = rng.randint(resolution, max(resolution, short))
            left = rng.randint(0, image.size[0] - size)
            top = rng.randint(0, image.size[1] - size)
            crop = image.crop((left, top, left + size, top + size)).resize((resolution, resolution), Image.BILINEAR)
            crops.append(to_tensor(crop))
    return torch.stack(crops)


def collate_examples(examples: List[dict]) -> dict:
    """Stacks `pixel_values` (contiguous float) and `class_labels` when present."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float()}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.stack([e["class_labels"] for e in examples])
    return batch
