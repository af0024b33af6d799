"""Small helpers shared by the evaluation modules: optional imports, devices, JSON, progress bars."""

import json
import math
import os
from typing import Any, Iterable, Union

import numpy as np
import torch

from ..utils import require  # noqa: F401  (one optional-import helper for the package)


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`device` as a `torch.device`; `None` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r}.") from error


def progress_bar(iterable: Iterable, enabled: bool = True, **kwargs):
    """A tqdm progress bar over `iterable` (a no-op wrapper when `enabled` is False)."""
    if not enabled:
        return iterable
    tqdm = require("tqdm", "the progress bar").tqdm
    return tqdm(iterable, **kwargs)


def to_jsonable(value: Any) -> Any:
    """Converts tensors, arrays, numpy scalars and non-finite floats into JSON-simple values (inf/nan -> str)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; "inf" is what an exact reconstruction's PSNR reads as
    return value


def save_json(data: Any, path: str) -> str:
    """Writes `data` as indented JSON to `path` (creating its folder) and returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(data), f, indent=2)
        f.write("\n")
    return path


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raises a ValueError naming `name` unless `value` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")
