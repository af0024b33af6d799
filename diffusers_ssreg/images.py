"""Reading image files: the one layer that training, latent caching and evaluation share.

Every image ends as an 8-bit RGB PIL image, whatever Pillow reads:

- the EXIF orientation is applied (phone photos stand upright);
- 16-bit grayscale (`I;16`, `I;16L`, `I;16B`, `I;16N`) is scaled by 255/65535, never clipped;
- 32-bit integer (`I`): the 16-bit range [0, 65535] when every value lies in it (16-bit data in a 32-bit
  container, as Pillow itself writes and widens them), else the full 32-bit range: [0, 2**32 - 1] for a TIFF
  that says unsigned, else [0, 2**31 - 1] with negatives clipped;
- 32-bit float (`F`): [0, 1] when every value lies in it, else the smallest of [0, 255] and [0, 65535] that
  holds the values, else divided by the image's maximum; negatives and NaN become 0;
- palette (`P`, with or without transparency), `CMYK`, `YCbCr`, `LAB`, `HSV` and 1-bit images by
  Pillow's own conversions;
- alpha (`LA`, `PA`, `RGBA`, `RGBa`, a palette's transparent entry) is composited over `background`
  (white unless told otherwise);
- an animated image (GIF, APNG, WebP) gives its first frame; the folder scan counts them and says so.

Embedded ICC profiles are not applied (as in torchvision's and diffusers' loaders). Resizing has one
convention, `"bilinear"` (diffusers' training scripts: the short side to the target with Pillow's
antialiased bilinear filter, the long side truncated, as `torchvision.transforms.Resize`); `"adm"` is
the convention of ADM's reference batches (`center_crop_arr` in openai/guided-diffusion: box-halve while
the image is at least twice the target, then bicubic), for the evaluations that compare with them.

Folders are scanned once, symlinks followed once each (every real folder and file is visited at most
once, so link loops end), and the scan ends with one log line of what was used and what was skipped and why.
"""

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps


logger = logging.getLogger(__name__)

# The file extensions read from folders (lower case); `--help` texts are derived from this one constant.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESIZE_CONVENTIONS = ("bilinear", "adm")
WHITE = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def extensions_text() -> str:
    """The extensions read from folders, for `--help` texts: `"jpg, jpeg, png, ..."`."""
    return ", ".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)


def is_image_file(path: str) -> bool:
    """Whether `path` has one of the `IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------
# Pixels: any Pillow image -> 8-bit RGB
# --------------------------------------------------------------------------------------------


def _check_background(background) -> Tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in background)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"`background` must be an (R, G, B) triple of ints in [0, 255], got {background!r}.")
    return values


def _tiff_sample_format(image) -> Tuple[Optional[int], Optional[int]]:
    """(BitsPerSample, SampleFormat) of a TIFF image, (None, None) for other formats."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None, None
    bits = tags.get(258)
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = tags.get(339)
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return bits, sample_format


def _integer_to_unit(image, bits: Optional[int], sample_format: Optional[int]) -> np.ndarray:
    """A 16- or 32-bit integer image as float64 values in [0, 1] (see the module docstring for the ranges)."""
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return array.astype(np.float64) / 65535.0
    array = array.astype(np.int64)
    if bits == 32 and sample_format in (None, 1):  # unsigned 32-bit, which Pillow holds as signed int32
        array = array % 2**32
    if array.min() >= 0 and array.max() <= 65535:  # 16-bit data in a 32-bit container (the common case)
        return array.astype(np.float64) / 65535.0
    if bits == 32 and sample_format in (None, 1):
        return array.astype(np.float64) / (2**32 - 1)
    return np.clip(array, 0, None).astype(np.float64) / (2**31 - 1)


def _float_to_unit(image) -> np.ndarray:
    """A 32-bit float image as float64 values in [0, 1] (see the module docstring for the ranges)."""
    array = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    array = np.clip(array, 0.0, None)
    peak = float(array.max()) if array.size else 0.0
    for scale in (1.0, 255.0, 65535.0):
        if peak <= scale:
            return array / scale
    return array / peak


def to_rgb(image: Image.Image, background=WHITE) -> Image.Image:
    """
    Any Pillow image as 8-bit RGB: the first frame, EXIF orientation applied, high bit depths scaled,
    alpha composited over `background`.

    Args:
        image (`PIL.Image.Image`): an image as Pillow opened it, in any mode.
        background (`tuple`, *optional*, defaults to white `(255, 255, 255)`): what transparent pixels show.

    Returns:
        `PIL.Image.Image`: a new RGB image.
    """
    background = _check_background(background)
    if getattr(image, "is_animated", False) and image.tell() != 0:
        image.seek(0)
    bits, sample_format = _tiff_sample_format(image)  # read before the transpose, which returns a plain copy
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        unit = _integer_to_unit(image, bits, sample_format) if mode != "F" else _float_to_unit(image)
        gray = np.round(unit * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "RGB" and "transparency" in image.info:  # an RGB PNG with one transparent colour (tRNS)
        image = image.convert("RGBA")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, background + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(item, background=WHITE) -> Image.Image:
    """
    Opens an image and returns it as 8-bit RGB (`to_rgb`).

    Args:
        item: a path, raw file bytes, a `datasets.Image(decode=False)` value (`{"bytes": ..., "path": ...}`),
            or a PIL image.
        background (`tuple`, *optional*, defaults to white): what transparent pixels show.
    """
    if isinstance(item, Image.Image):
        item.load()
        return to_rgb(item, background)
    if isinstance(item, dict) and ("bytes" in item or "path" in item):
        item = item["bytes"] if item.get("bytes") else item["path"]
    if isinstance(item, (bytes, bytearray)):
        item = io.BytesIO(item)
    with Image.open(item) as image:
        image.load()
        return to_rgb(image, background)


def describe_item(item) -> str:
    """A short name of an image item for messages: its path, or what kind of object it is."""
    if isinstance(item, dict):
        return str(item.get("path") or "<bytes>")
    if isinstance(item, Image.Image):
        return "<PIL image>"
    if isinstance(item, (bytes, bytearray)):
        return "<bytes>"
    return str(item)


# --------------------------------------------------------------------------------------------
# Resizing: one convention, and ADM's where an evaluation follows its reference batches
# --------------------------------------------------------------------------------------------


def _check_convention(convention: str) -> None:
    if convention not in RESIZE_CONVENTIONS:
        raise ValueError(f"`convention` must be one of {RESIZE_CONVENTIONS}, got {convention!r}.")


def resize_short_side(image: Image.Image, size: int, convention: str = "bilinear") -> Image.Image:
    """
    Resizes a PIL image so that its short side is `size`, keeping the aspect ratio.

    `"bilinear"`: Pillow's antialiased bilinear filter, the long side truncated to an int (exactly
    `torchvision.transforms.Resize(size)` on a PIL image, as diffusers' training scripts resize).
    `"adm"`: box-halve while the short side is at least `2 * size`, then bicubic, the long side rounded
    (ADM's `center_crop_arr`, used for its FID reference batches).
    """
    _check_convention(convention)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive int, got {size!r}.")
    if convention == "adm":
        while min(image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = size / min(image.size)
        return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image if new_size == image.size else image.resize(new_size, resample=Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` square of an image at least that large (offsets rounded down)."""
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def resize_center_crop(image: Image.Image, size: int, convention: str = "bilinear") -> Image.Image:
    """`resize_short_side` then `center_crop`: a `size` x `size` square of the whole short side."""
    return center_crop(resize_short_side(image, size, convention), size)


class ResizeShortSide:
    """A picklable transform (DataLoader workers): `resize_short_side(image, size, convention)`."""

    def __init__(self, size: int, convention: str = "bilinear"):
        _check_convention(convention)
        self.size, self.convention = size, convention

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_short_side(image, self.size, self.convention)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, convention={self.convention!r})"


# --------------------------------------------------------------------------------------------
# Folder scan
# --------------------------------------------------------------------------------------------

SKIP_OTHER_TYPE = "other file types"
SKIP_UNREADABLE = "unreadable"
SKIP_BROKEN_LINK = "broken symlinks"
SKIP_DUPLICATE = "files already found through a symlink"
SKIP_FOLDER_AGAIN = "folders reached again through a symlink (a loop or a second link)"


@dataclass
class ImageScan:
    """
    What `scan_images` found under `root`.

    Args:
        root (`str`): the folder scanned.
        files (`List[str]`): the image files used, sorted.
        skipped (`Dict[str, int]`): how many entries were left out, by reason.
        details (`Dict[str, Counter]`): per reason, what they were (file extensions, error types).
        animated (`int`): how many of `files` are animated; their first frame is used.
    """

    root: str
    files: List[str] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)
    details: Dict[str, Counter] = field(default_factory=dict)
    animated: int = 0
    examples: Dict[str, str] = field(default_factory=dict)

    def _skip(self, reason: str, path: str, detail: Optional[str] = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.examples.setdefault(reason, path)
        if detail is not None:
            self.details.setdefault(reason, Counter())[detail] += 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skipped_text(self) -> str:
        """What was skipped and why: `"skipped 3: 2 other file types [.txt: 2]; 1 broken symlinks"`."""
        if not self.skipped:
            return "skipped none"
        reasons = []
        for reason, count in self.skipped.items():
            detail = self.details.get(reason)
            detail = f" [{', '.join(f'{k}: {v}' for k, v in detail.most_common(4))}]" if detail else ""
            if reason in (SKIP_UNREADABLE, SKIP_BROKEN_LINK):  # a file the user may want to fix: name one
                detail += f" (e.g. {self.examples[reason]})"
            reasons.append(f"{count} {reason}{detail}")
        return f"skipped {self.num_skipped}: {'; '.join(reasons)}"

    def summary(self) -> str:
        """One line: what was used, what was skipped and why."""
        used = f"used {len(self.files)} image{'s' if len(self.files) != 1 else ''}"
        if self.animated:
            used += f" ({self.animated} animated: the first frame of each)"
        return f"Image scan of {self.root!r}: {used}, {self.skipped_text()}."


def _probe(path: str) -> bool:
    """Opens the file's header (no pixel decoding): raises when Pillow can't identify it; True when animated."""
    with Image.open(path) as image:
        return bool(getattr(image, "is_animated", False))


def scan_images(root: str, recursive: bool = True, probe: bool = True, name: Optional[str] = None) -> ImageScan:
    """
    The image files under `root`, each real file once, with a count of what was skipped and why.

    Symlinks to folders and files are followed, each real folder and file at most once (by
    `os.path.realpath`): a link loop or a second link to a folder is counted and not descended again, so
    the scan always ends. Entries without an image extension (`IMAGE_EXTENSIONS`) and broken links are
    counted as skipped. With `probe` (the default) every file's header is opened: files Pillow can't
    identify are skipped, animated ones counted (the first frame is used). Opening a header reads a few
    KiB, not the pixels.

    Args:
        root (`str`): the folder.
        recursive (`bool`, defaults to `True`): descend into subfolders.
        probe (`bool`, defaults to `True`): open every file's header.
        name (`str`, *optional*): what `root` is, e.g. `"--train_data_dir"`, for the error messages.

    Returns:
        `ImageScan`; raises a ValueError naming `name` and `root` when `root` is no folder or holds no image.
    """
    label = f"{name} {root!r}" if name else f"image folder {root!r}"
    if not os.path.isdir(root):
        raise ValueError(f"{label} does not exist or is not a directory.")
    scan = ImageScan(root=root)
    seen_folders, seen_files = set(), set()
    for directory, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen_folders:  # a sibling link reached a folder visited before this one
            scan._skip(SKIP_FOLDER_AGAIN, directory)
            folders[:] = []
            continue
        seen_folders.add(real)
        kept = []
        for folder in sorted(folders):
            if os.path.realpath(os.path.join(directory, folder)) in seen_folders:  # a loop back up, or a second link
                scan._skip(SKIP_FOLDER_AGAIN, os.path.join(directory, folder))
            else:
                kept.append(folder)
        folders[:] = kept if recursive else []
        for file_name in sorted(names):
            path = os.path.join(directory, file_name)
            if not is_image_file(file_name):
                scan._skip(SKIP_OTHER_TYPE, path, os.path.splitext(file_name)[1].lower() or "no extension")
                continue
            if not os.path.exists(path):  # a link to nothing (or a link to itself)
                scan._skip(SKIP_BROKEN_LINK, path)
                continue
            real_file = os.path.realpath(path)
            if real_file in seen_files:
                scan._skip(SKIP_DUPLICATE, path)
                continue
            seen_files.add(real_file)
            if probe:
                try:
                    scan.animated += _probe(path)
                except Exception as error:  # not an image Pillow reads, whatever its extension says
                    scan._skip(SKIP_UNREADABLE, path, type(error).__name__)
                    continue
            scan.files.append(path)
    scan.files.sort()
    if not scan.files:
        raise ValueError(
            f"{label} holds no images: no image files with extensions {extensions_text()} that Pillow can read "
            f"were found{' (searched recursively)' if recursive else ''}; {scan.skipped_text()}."
        )
    return scan
