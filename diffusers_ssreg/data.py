"""Image data for training and evaluation: local folders, `datasets` names, and the embedded photo default.

Every source ends as a torch `Dataset` of `{"pixel_values": (3, R, R) in [-1, 1]}` (plus `"class_labels"`
where the source has labels). A file that can't be decoded is skipped with a counted warning and
replaced by the next good one, so one bad file never crashes a long run.
"""

import importlib
import io
import logging
import os
import random
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image


logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

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


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(f"`{module.split('.')[0]}` is needed here: install it with `pip install diffusers-ssreg[train]`.") from error


def find_images(root: str, recursive: bool = True) -> List[str]:
    """All image files under `root` (recursively by default), sorted; extensions: jpg, jpeg, png, webp, bmp, tif."""
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist or is not a directory.")
    files = []
    for directory, _, names in os.walk(root, followlinks=True):
        files += [os.path.join(directory, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not recursive:
            break
    if not files:
        raise ValueError(
            f"no image files in {root!r}{' (searched recursively)' if recursive else ''}: "
            f"it holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}."
        )
    return sorted(files)


def embedded_photos(split: str = "train") -> List[Image.Image]:
    """The embedded default's real photographs, shipped by scikit-image, as RGB PIL images."""
    if split not in ("train", "validation"):
        raise ValueError(f"`split` must be 'train' or 'validation', got {split!r}.")
    skimage_data = _require("skimage.data")
    names = EMBEDDED_TRAIN_PHOTOS if split == "train" else EMBEDDED_VALIDATION_PHOTOS
    images = []
    for name in names:
        array = _skimage_photo(skimage_data, name)
        if array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-8)).astype(np.uint8)
        images.append(Image.fromarray(array).convert("RGB"))
    return images


def image_transform(resolution: int, center_crop: bool = False, random_flip: bool = True) -> Callable:
    """diffusers' usual pipeline: resize the short side, center or random crop, optional flip, scale to [-1, 1]."""
    transforms = _require("torchvision.transforms")
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def random_scale_crop_transform(resolution: int, scale=(0.25, 1.0), random_flip: bool = True) -> Callable:
    """Random crops covering `scale` of the photo, resized to `resolution` (for training on few large photos)."""
    transforms = _require("torchvision.transforms")
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
        load (`Callable`, *optional*): item -> PIL image; default opens paths and passes PIL images through.
        seed (`int`, *optional*): when given, the random augmentation of item i in epoch e is seeded by
            (seed, e, i), so a resumed run sees exactly the crops an uninterrupted run would have seen
            (whatever the data-loader workers and prefetching did). Call `set_epoch` every epoch.
    """

    def __init__(
        self, items: Sequence, transform: Callable, labels=None, length: Optional[int] = None, load=None, seed=None
    ):
        if len(items) == 0:
            raise ValueError("the dataset is empty: no images to train or evaluate on.")
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"got {len(labels)} labels for {len(items)} images.")
        self.items, self.transform, self.labels = items, transform, labels
        self.length = len(items) if length is None else int(length)
        self.load = load or _open_rgb
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
                    _describe(self.items[position]), type(error).__name__, error, self.num_skipped,
                )
                continue
            if self.labels is not None:
                example["class_labels"] = torch.tensor(int(self.labels[position]))
            return example
        raise RuntimeError(f"no readable image found around index {index}: check the data.")


def _open_rgb(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # datasets.Image(decode=False)
        if item.get("bytes"):
            image = Image.open(io.BytesIO(item["bytes"]))
        else:
            image = Image.open(item["path"])
    else:
        image = Image.open(item)
    image.load()
    return image.convert("RGB")


def _describe(item) -> str:
    if isinstance(item, dict):
        return str(item.get("path") or "<bytes>")
    return str(item) if not isinstance(item, Image.Image) else "<PIL image>"


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
) -> ImageDataset:
    """An `ImageDataset` over `datasets.load_dataset(dataset_name, ...)[split]`, images decoded lazily and robustly."""
    datasets = _require("datasets")
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
    return ImageDataset(dataset, transform, labels=labels, load=lambda row: _open_rgb(row[image_column]), seed=seed)


def folder_image_dataset(
    root: str, transform: Callable, with_labels: bool = False, length: Optional[int] = None, seed=None
) -> ImageDataset:
    """An `ImageDataset` over the images under `root`; with `with_labels`, one subfolder per class (sorted names)."""
    files = find_images(root)
    labels = None
    if with_labels:
        classes = sorted({os.path.relpath(f, root).split(os.sep)[0] for f in files if os.sep in os.path.relpath(f, root)})
        if not classes:
            raise ValueError(f"`{root}` has no class subfolders: put each class's images in its own subfolder.")
        index = {name: i for i, name in enumerate(classes)}
        files = [f for f in files if os.sep in os.path.relpath(f, root)]
        labels = [index[os.path.relpath(f, root).split(os.sep)[0]] for f in files]
    return ImageDataset(files, transform, labels=labels, length=length, seed=seed)


def fixed_crops(images: Sequence[Image.Image], resolution: int, per_image: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic validation batch `(N, 3, R, R)` in [-1, 1]: `per_image` seeded square crops of each image."""
    transforms = _require("torchvision.transforms")
    rng = random.Random(seed)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    crops = []
    for image in images:
        image = image.convert("RGB")
        short = min(image.size)
        if short < resolution:
            image = _require("torchvision.transforms.functional").resize(image, resolution)
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
