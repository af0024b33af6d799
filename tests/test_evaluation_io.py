"""Image sources of diffusers_ssreg.evaluation: folders, arrays, datasets, tensors, and their errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ssreg.evaluation import ImageBatches, first_images, list_image_files, save_image_folder, save_npz


torch.set_num_threads(1)


def write_photo(path, size=None, gray=False):
    """Writes scikit-image's astronaut (optionally resized / grayscale) to `path`."""
    from skimage import data

    image = Image.fromarray(data.astronaut())
    if size is not None:
        image = image.resize(size)
    if gray:
        image = image.convert("L")
    image.save(path)
    return path


def test_folder_batches_in_minus_one_one(tmp_path):
    for i in range(5):
        write_photo(tmp_path / f"{i}.png", size=(40, 32), gray=(i == 2))
    (tmp_path / "notes.txt").write_text("not an image")
    batches = ImageBatches(str(tmp_path), batch_size=2)
    shapes = [tuple(b.shape) for b in batches]
    assert shapes == [(2, 3, 32, 40), (2, 3, 32, 40), (1, 3, 32, 40)] and len(batches) == 3
    batch = next(iter(batches))
    assert batch.dtype == torch.float32 and batch.min() >= -1 and batch.max() <= 1
    # Resize + centre crop, and max_samples.
    cropped = list(ImageBatches(str(tmp_path), batch_size=4, resolution=16, max_samples=3))
    assert [tuple(b.shape) for b in cropped] == [(3, 3, 16, 16)]


def test_mismatched_sizes_and_empty_folders_are_clear_errors(tmp_path):
    write_photo(tmp_path / "a.png", size=(32, 32))
    write_photo(tmp_path / "b.png", size=(48, 32))
    with pytest.raises(ValueError, match="b.png.*48x32.*resolution"):
        list(ImageBatches(str(tmp_path), batch_size=2))
    assert first_images(str(tmp_path), 2, resolution=16).shape == (2, 3, 16, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageBatches(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        ImageBatches(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no image files"):
        list_image_files(str(tmp_path / "empty"))


def test_npz_round_trip_and_array_errors(tmp_path):
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_npz(images, str(tmp_path / "batch.npz"))
    with np.load(path) as archive:
        assert archive["arr_0"].shape == (5, 8, 8, 3) and archive["arr_0"].dtype == np.uint8
    loaded = torch.cat(list(ImageBatches(path, batch_size=2)))
    assert torch.allclose(loaded, images, atol=1 / 127.5)  # 8-bit rounding
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ImageBatches(str(tmp_path / "float.npz"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="npz"):
        ImageBatches(str(tmp_path / "file.txt"))


def test_tensors_and_iterators(tmp_path):
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    assert torch.equal(torch.cat(list(ImageBatches(images, batch_size=3))), images)
    assert [tuple(b.shape) for b in ImageBatches(iter([images[:1], images[1:]]), batch_size=2)] == [(4, 3, 8, 8)]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ImageBatches(images * 3)
    with pytest.raises(ValueError, match="different sizes"):
        list(ImageBatches(iter([torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4)]), batch_size=1))
    with pytest.raises(TypeError, match="source"):
        ImageBatches(3.0)
    with pytest.raises(ValueError, match="batch_size"):
        ImageBatches(images, batch_size=0)
    save_image_folder(images, str(tmp_path / "saved"))
    assert len(list_image_files(str(tmp_path / "saved"))) == 4


def test_datasets_source_offline(tmp_path):
    datasets = pytest.importorskip("datasets")
    for i in range(3):
        write_photo(tmp_path / f"{i}.png", size=(24, 24))
    dataset = datasets.Dataset.from_dict({"image": [Image.open(tmp_path / f"{i}.png") for i in range(3)]})
    batches = list(ImageBatches(dataset, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 24, 24), (1, 3, 24, 24)]
    with pytest.raises(ValueError, match="image_column"):
        ImageBatches(dataset, image_column="pixels")
