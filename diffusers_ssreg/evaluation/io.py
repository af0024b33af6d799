"""Image sources for evaluation: folders, .npz/.npy arrays, `datasets` datasets and tensors, as batches in [-1, 1].

Every loader yields `pixel_values` of shape `(batch_size, 3, height, width)`, float32 in [-1, 1] (the
diffusers convention). Image files are read by `diffusers_ssreg.images`, the layer training uses too
(EXIF orientation, every bit depth and mode, alpha over white, one scan summary). With `resolution` set,
images are resized and centre-cropped to a square; the evaluation follows ADM's reference batches by
default (`resize="adm"`, `center_crop_arr` in openai/guided-diffusion: box-downsample by 2 while
possible, then bicubic), and `resize="bilinear"` gives the crops training uses. Without `resolution`,
all images must already share one size.
"""

import os
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..data import find_images
from ..images import RESIZE_CONVENTIONS, open_image, resize_center_crop, to_rgb
from ._utils import check_positive_int, require


ARRAY_EXTENSIONS = (".npz", ".npy")

ImageSource = Union[str, "os.PathLike[str]", torch.Tensor, np.ndarray, Iterable[Any]]


# --------------------------------------------------------------------------------------------
# Single images
# --------------------------------------------------------------------------------------------


def list_image_files(folder: str, recursive: bool = True, name: Optional[str] = None) -> List[str]:
    """Sorted paths of the image files in `folder` (`diffusers_ssreg.data.find_images`); ValueError when there are none."""
    return find_images(folder, recursive=recursive, name=name)


def center_crop_resize(image, resolution: int, resize: str = "adm"):
    """Resizes a PIL image so its short side is `resolution` and centre-crops it square (`images.resize_center_crop`)."""
    return resize_center_crop(image, resolution, resize)


def pil_to_pixel_values(image, resolution: Optional[int] = None, resize: str = "adm") -> torch.Tensor:
    """A PIL image as a float32 tensor `(3, height, width)` in [-1, 1] (`images.to_rgb`, optionally resized)."""
    image = to_rgb(image)
    if resolution is not None:
        image = center_crop_resize(image, resolution, resize)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def uint8_to_pixel_values(array: np.ndarray) -> torch.Tensor:
    """uint8 images `(N, H, W, 3)` (ADM's .npz layout) or `(N, 3, H, W)` as float32 `(N, 3, H, W)` in [-1, 1]."""
    if array.ndim != 4 or 3 not in (array.shape[1], array.shape[-1]):
        raise ValueError(f"image arrays must have shape (N, H, W, 3) or (N, 3, H, W), got {array.shape}.")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if array.shape[-1] == 3 and array.shape[1] != 3:
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.float() / 127.5 - 1.0


def to_uint8(pixel_values: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [-1, 1] -> uint8 in [0, 255], rounded (what saving as PNG does)."""
    return ((pixel_values.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantize(pixel_values: torch.Tensor) -> torch.Tensor:
    """Rounds `(B, 3, H, W)` images in [-1, 1] to the 256 levels of an 8-bit file, keeping the [-1, 1] range."""
    return to_uint8(pixel_values).float() / 127.5 - 1.0


def resize_center_crop_tensor(pixel_values: torch.Tensor, resolution: int) -> torch.Tensor:
    """Tensor twin of `center_crop_resize`: short side to `resolution` (bicubic, antialiased), then centre crop."""
    height, width = pixel_values.shape[-2:]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        pixel_values = F.interpolate(pixel_values.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return pixel_values[..., top : top + resolution, left : left + resolution].clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class ImageFolderDataset(torch.utils.data.Dataset):
    """
    The images of a folder (recursively, sorted by path) as `(3, H, W)` tensors in [-1, 1].

    Without `resolution`, every image must have the size of the first one; a different size raises
    a ValueError naming both files (pass `resolution` to resize and centre-crop instead).
    """

    def __init__(self, folder: str, resolution: Optional[int] = None, recursive: bool = True, resize: str = "adm"):
        check_positive_int("resolution", resolution, allow_none=True)
        _check_resize(resize)
        self.folder = folder
        self.files = list_image_files(folder, recursive=recursive)
        self.resolution, self.resize = resolution, resize
        self.expected_size = None
        if resolution is None:  # the size after EXIF orientation, as every image will be read
            self.expected_size = open_image(self.files[0]).size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = open_image(self.files[index])
        if self.expected_size is not None and image.size != self.expected_size:
            raise ValueError(
                f"{self.files[index]!r} is {image.size[0]}x{image.size[1]} but {self.files[0]!r} is "
                f"{self.expected_size[0]}x{self.expected_size[1]}: images of one set must share a size; "
                f"pass `resolution` (--resolution) to resize and centre-crop them."
            )
        return pil_to_pixel_values(image, self.resolution, self.resize)


def _check_resize(resize: str) -> None:
    if resize not in RESIZE_CONVENTIONS:
        raise ValueError(f"`resize` must be one of {RESIZE_CONVENTIONS}, got {resize!r}.")


class _HFImageDataset(torch.utils.data.Dataset):
    """A map-style `datasets.Dataset` column of images as `(3, H, W)` tensors in [-1, 1]."""

    def __init__(self, dataset, image_column: str, resolution: Optional[int], resize: str = "adm"):
        self.dataset, self.image_column, self.resolution, self.resize = dataset, image_column, resolution, resize

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _item_to_pixel_values(self.dataset[index][self.image_column], self.resolution, self.resize)


def _item_to_pixel_values(item, resolution: Optional[int], resize: str = "adm") -> torch.Tensor:
    if torch.is_tensor(item):
        item = item.float()
        return resize_center_crop_tensor(item[None], resolution)[0] if resolution else item
    if isinstance(item, np.ndarray):
        item = uint8_to_pixel_values(item[None])[0] if item.dtype == np.uint8 else torch.from_numpy(item).float()
        return resize_center_crop_tensor(item[None], resolution)[0] if resolution else item
    if hasattr(item, "convert"):  # a PIL image
        return pil_to_pixel_values(item, resolution, resize)
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # a `datasets.Image(decode=False)` value
        return pil_to_pixel_values(open_image(item), resolution, resize)
    raise TypeError(f"cannot read an image from a {type(item).__name__}; expected a PIL image, array or tensor.")


def load_array_file(path: str) -> np.ndarray:
    """The uint8 image array of a `.npy` file or a `.npz` file (key `arr_0` as in ADM's batches, `images`, or the only key)."""
    if path.lower().endswith(".npy"):
        array = np.load(path, mmap_mode="r")
    else:
        with np.load(path) as archive:
            keys = list(archive.keys())
            key = next((k for k in ("arr_0", "images") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path!r} holds arrays {keys}; expected one array, or one named 'arr_0' or 'images'.")
            array = archive[key]
    if array.dtype != np.uint8:
        raise ValueError(f"the images in {path!r} must be uint8 in [0, 255], got dtype {array.dtype}.")
    if array.ndim != 4 or 3 not in (array.shape[1], array.shape[-1]):
        raise ValueError(f"the images in {path!r} must have shape (N, H, W, 3) or (N, 3, H, W), got {array.shape}.")
    if array.shape[0] == 0:
        raise ValueError(f"{path!r} holds no images (shape {array.shape}).")
    return array


def load_dataset_images(
    dataset_name: str,
    split: str = "validation",
    config_name: Optional[str] = None,
    image_column: str = "image",
    streaming: bool = False,
    cache_dir: Optional[str] = None,
):
    """`datasets.load_dataset(dataset_name, config_name, split=split)` checked to have `image_column`."""
    datasets = require("datasets", "loading a `datasets` dataset")
    dataset = datasets.load_dataset(dataset_name, config_name, split=split, streaming=streaming, cache_dir=cache_dir)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and image_column not in columns:
        raise ValueError(
            f"dataset {dataset_name!r} (split {split!r}) has no column `image_column`={image_column!r}; "
            f"its columns are {columns}."
        )
    return dataset


class ImageBatches:
    r"""
    Batches of `pixel_values` `(batch_size, 3, H, W)` in [-1, 1] from any supported source; re-iterable
    unless the source is a one-shot iterator.

    Args:
        source: one of
            - a folder of images (recursive; the extensions of `diffusers_ssreg.images.IMAGE_EXTENSIONS`);
            - a `.npz` (ADM reference/sample batch: `arr_0` uint8 `(N, H, W, 3)`) or `.npy` file;
            - a `datasets.Dataset` / `IterableDataset` (see `load_dataset_images`), read from `image_column`;
            - a float tensor `(N, 3, H, W)` in [-1, 1], or a uint8 array `(N, H, W, 3)`;
            - an iterable of float tensors `(B, 3, H, W)` (or `(3, H, W)`) in [-1, 1].
        batch_size (`int`, defaults to 16): images per batch.
        resolution (`int`, *optional*): resize + centre-crop every image to `resolution` x `resolution`.
        max_samples (`int`, *optional*): stop after this many images.
        num_workers (`int`, defaults to 0): DataLoader workers for folders and map-style datasets.
        image_column (`str`, defaults to `"image"`): the image column of a `datasets` dataset.
        resize (`str`, defaults to `"adm"`): how PIL images are resized with `resolution`: `"adm"` follows ADM's
            reference batches (for FID-type scores comparable with published ones), `"bilinear"` is the
            convention of training (`diffusers_ssreg.images.resize_short_side`).
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int = 16,
        resolution: Optional[int] = None,
        max_samples: Optional[int] = None,
        num_workers: int = 0,
        image_column: str = "image",
        resize: str = "adm",
    ):
        check_positive_int("batch_size", batch_size)
        check_positive_int("resolution", resolution, allow_none=True)
        check_positive_int("max_samples", max_samples, allow_none=True)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative int, got {num_workers!r}.")
        _check_resize(resize)
        self.batch_size, self.resolution, self.max_samples = batch_size, resolution, max_samples
        self.num_workers, self.image_column, self.resize = num_workers, image_column, resize
        self.description = _describe(source)
        self._dataset = None  # a map-style torch Dataset when the source has one
        self._tensor = None
        self._iterable = None
        self.num_images: Optional[int] = None

        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                self._dataset = ImageFolderDataset(path, resolution=resolution, resize=resize)
            elif os.path.isfile(path) and path.lower().endswith(ARRAY_EXTENSIONS):
                self._tensor = load_array_file(path)
            elif os.path.exists(path):
                raise ValueError(
                    f"`source`={path!r} is a file but not {' or '.join(ARRAY_EXTENSIONS)}; pass an image folder, "
                    f"a .npz/.npy array of uint8 images, or a `datasets` dataset."
                )
            else:
                raise ValueError(
                    f"`source`={path!r} does not exist; pass an image folder or a .npz/.npy file (for a `datasets` "
                    f"name, load it with `load_dataset_images(name)` or the CLI's --dataset_name)."
                )
        elif torch.is_tensor(source):
            self._tensor = _check_pixel_tensor(source, "source")
        elif isinstance(source, np.ndarray):
            if source.dtype != np.uint8:
                raise ValueError(
                    f"numpy image arrays must be uint8 (N, H, W, 3), got dtype {source.dtype}; pass float images "
                    f"as a torch tensor (N, 3, H, W) in [-1, 1]."
                )
            if source.ndim != 4 or 3 not in (source.shape[1], source.shape[-1]):
                raise ValueError(f"numpy image arrays must have shape (N, H, W, 3), got {source.shape}.")
            self._tensor = source
        elif hasattr(source, "column_names") and hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            columns = source.column_names
            if image_column not in columns:
                raise ValueError(f"the dataset has no column `image_column`={image_column!r}; its columns are {columns}.")
            self._dataset = _HFImageDataset(source, image_column, resolution, resize)
        elif isinstance(source, Iterable):
            self._iterable = source
        else:
            raise TypeError(
                f"`source` must be an image folder, a .npz/.npy path, a tensor, a uint8 array, a `datasets` dataset or "
                f"an iterable of tensors, got {type(source).__name__}."
            )

        if self._dataset is not None:
            self.num_images = len(self._dataset)
        elif self._tensor is not None:
            self.num_images = int(self._tensor.shape[0])
        if self.num_images is not None:
            if self.num_images == 0:
                raise ValueError(f"`source` {self.description} holds no images.")
            if max_samples is not None:
                self.num_images = min(self.num_images, max_samples)

    def __len__(self) -> int:
        if self.num_images is None:
            raise TypeError("the number of batches of a one-shot iterator is unknown")
        return -(-self.num_images // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        seen = 0
        first_shape = None
        for batch in self._raw_batches():
            if self.max_samples is not None and seen + batch.shape[0] > self.max_samples:
                batch = batch[: self.max_samples - seen]
            if batch.shape[0] == 0:
                break
            if first_shape is None:
                first_shape = tuple(batch.shape[1:])
            elif tuple(batch.shape[1:]) != first_shape:
                raise ValueError(
                    f"images of {self.description} have different sizes: {first_shape} then {tuple(batch.shape[1:])}; "
                    f"pass `resolution` (--resolution) to resize and centre-crop them."
                )
            seen += batch.shape[0]
            yield batch
            if self.max_samples is not None and seen >= self.max_samples:
                break
        if seen == 0:
            raise ValueError(f"`source` {self.description} yielded no images.")

    def _raw_batches(self) -> Iterator[torch.Tensor]:
        if self._dataset is not None:
            dataset = self._dataset
            if self.max_samples is not None and self.max_samples < len(dataset):
                dataset = torch.utils.data.Subset(dataset, range(self.max_samples))
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
            )
            yield from loader
        elif self._tensor is not None:
            for start in range(0, self.num_images, self.batch_size):
                chunk = self._tensor[start : start + self.batch_size]
                batch = uint8_to_pixel_values(np.asarray(chunk)) if isinstance(chunk, np.ndarray) else chunk.float()
                yield resize_center_crop_tensor(batch, self.resolution) if self.resolution else batch
        else:
            pending: List[torch.Tensor] = []
            for index, item in enumerate(self._iterable):
                if isinstance(item, dict):  # rows of an IterableDataset
                    if self.image_column not in item:
                        raise ValueError(f"dataset rows have no column `image_column`={self.image_column!r}: {sorted(item)}.")
                    item = _item_to_pixel_values(item[self.image_column], self.resolution, self.resize)[None]
                elif torch.is_tensor(item):
                    item = _check_pixel_tensor(item, f"item {index} of `source`")
                    item = resize_center_crop_tensor(item, self.resolution) if self.resolution else item
                else:
                    item = _item_to_pixel_values(item, self.resolution, self.resize)[None]
                pending.append(item.float())
                if sum(t.shape[0] for t in pending) >= self.batch_size:
                    yield _concat(pending, self.description)
                    pending = []
            if pending:
                yield _concat(pending, self.description)


def _concat(tensors: Sequence[torch.Tensor], description: str) -> torch.Tensor:
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"images of {description} have different sizes {sorted(shapes)}; pass `resolution` (--resolution) "
            f"to resize and centre-crop them."
        )
    return torch.cat(list(tensors))


def _check_pixel_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"`{name}` must be images of shape (N, 3, H, W), got shape {tuple(tensor.shape)}.")
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor in [-1, 1], got dtype {tensor.dtype}.")
    if tensor.numel() and (tensor.min() < -1.001 or tensor.max() > 1.001):
        raise ValueError(
            f"`{name}` must hold pixel values in [-1, 1], got range [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]."
        )
    return tensor


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if torch.is_tensor(source) or isinstance(source, np.ndarray):
        return f"({type(source).__name__} of shape {tuple(source.shape)})"
    return f"({type(source).__name__})"


def image_batches(source: ImageSource, **kwargs) -> ImageBatches:
    """`ImageBatches(source, **kwargs)`, passing an existing `ImageBatches` through unchanged."""
    if isinstance(source, ImageBatches):
        if kwargs.get("resolution") not in (None, source.resolution):
            raise ValueError(
                f"`resolution`={kwargs['resolution']} conflicts with the ImageBatches' resolution={source.resolution}."
            )
        return source
    return ImageBatches(source, **kwargs)


def first_images(source: ImageSource, num_images: int, resolution: Optional[int] = None, **kwargs) -> torch.Tensor:
    """The first `num_images` images of `source` as one tensor `(n, 3, H, W)` in [-1, 1] (fewer if it holds fewer)."""
    check_positive_int("num_images", num_images)
    batches = image_batches(source, batch_size=num_images, resolution=resolution, max_samples=num_images, **kwargs)
    return torch.cat(list(batches))[:num_images]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_image_folder(pixel_values: torch.Tensor, folder: str, prefix: str = "", start_index: int = 0) -> List[str]:
    """Writes images `(N, 3, H, W)` in [-1, 1] as PNG files `{prefix}{index:06d}.png` into `folder`."""
    Image = require("PIL.Image", "saving images", package="pillow")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for offset, image in enumerate(to_uint8(_check_pixel_tensor(pixel_values, "pixel_values")).cpu()):
        path = os.path.join(folder, f"{prefix}{start_index + offset:06d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def save_npz(pixel_values: torch.Tensor, path: str) -> str:
    """Writes images `(N, 3, H, W)` in [-1, 1] as ADM's sample-batch format: `arr_0`, uint8 `(N, H, W, 3)`."""
    array = to_uint8(_check_pixel_tensor(pixel_values, "pixel_values")).permute(0, 2, 3, 1).cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, arr_0=array)
    return path
