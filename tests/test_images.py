"""The image layer (`diffusers_ssreg.images`): files of every mode Pillow reads, built here, and their pixels."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ssreg import data as ssreg_data
from diffusers_ssreg import images
from diffusers_ssreg.evaluation import ImageBatches


def pixels(image):
    return np.asarray(image, dtype=np.int64)


def gradient16(height=16, width=16):
    """A 16-bit ramp over the whole range: 0 ... 65535."""
    return np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)


# --------------------------------------------------------------------------------------------
# Bit depths and modes -> 8-bit RGB
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, dtype", [(".png", "<u2"), (".tif", "<u2"), (".tif", ">u2")])
def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, suffix, dtype):
    ramp = gradient16()
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(ramp.astype(dtype)).save(path)
    assert Image.open(path).mode in ("I;16", "I;16B")
    rgb = images.open_image(str(path))
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    expected = np.round(ramp / 65535 * 255)
    for channel in range(3):
        np.testing.assert_array_equal(pixels(rgb)[..., channel], expected)
    assert (pixels(rgb) == 255).mean() < 0.01  # Pillow's own convert("L") saturates 99.6 % of this ramp


def test_thirty_two_bit_integer_and_float_images(tmp_path):
    ramp = gradient16()
    # 32-bit signed TIFF using the 32-bit range: scaled by it.
    full = (ramp.astype(np.int64) * 32768).clip(0, 2**31 - 1).astype(np.int32)
    full[0, 0] = -5  # negatives clip to black
    Image.fromarray(full).save(tmp_path / "int32.tif")
    got = pixels(images.open_image(str(tmp_path / "int32.tif")))[..., 0]
    np.testing.assert_array_equal(got, np.round(full.clip(0, None) / (2**31 - 1) * 255))
    # 16-bit values in a 32-bit container (Pillow writes its "I" images so): the 16-bit range.
    Image.fromarray(ramp).convert("I").save(tmp_path / "int32_of_16bit.tif")
    got = pixels(images.open_image(str(tmp_path / "int32_of_16bit.tif")))[..., 1]
    np.testing.assert_array_equal(got, np.round(ramp / 65535 * 255))
    # float in [0, 1]
    unit = (ramp / 65535).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "float01.tif")
    np.testing.assert_array_equal(pixels(images.open_image(str(tmp_path / "float01.tif")))[..., 2], np.round(unit * 255))
    # float in [0, 255], with a NaN and a negative value
    byte_range = (ramp / 257).astype(np.float32)
    byte_range[0, 0], byte_range[0, 1] = np.nan, -3.0
    got = pixels(images.to_rgb(Image.fromarray(byte_range)))[..., 0]
    expected = np.round(np.nan_to_num(byte_range, nan=0.0).clip(0, None))
    np.testing.assert_array_equal(got, expected)


def test_unsigned_thirty_two_bit_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    values = np.array([[0, 2**31, 2**32 - 1, 2**16]], dtype=np.uint32)
    tifffile.imwrite(tmp_path / "u32.tif", values)
    got = pixels(images.open_image(str(tmp_path / "u32.tif")))[0, :, 0]
    np.testing.assert_array_equal(got, np.round(values[0] / (2**32 - 1) * 255))


def test_palette_alpha_and_cmyk(tmp_path):
    palette = Image.new("P", (4, 2), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 2, 2))  # the left half uses entry 0, made transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    got = pixels(images.open_image(str(tmp_path / "palette.png")))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 3].tolist() == [0, 0, 255]
    black = pixels(images.open_image(str(tmp_path / "palette.png"), background=(0, 0, 0)))
    assert black[0, 0].tolist() == [0, 0, 0]

    rgba = Image.new("RGBA", (2, 2), (200, 0, 0, 128))
    expected = np.round(np.array([200, 0, 0]) * 128 / 255 + np.array([255, 255, 255]) * (1 - 128 / 255))
    np.testing.assert_allclose(pixels(images.to_rgb(rgba))[0, 0], expected, atol=1)
    gray_alpha = Image.new("LA", (2, 2), (100, 0))  # fully transparent
    assert pixels(images.to_rgb(gray_alpha, background=(10, 20, 30)))[1, 1].tolist() == [10, 20, 30]
    palette_alpha = Image.new("PA", (2, 2))
    palette_alpha.putpalette([0, 255, 0] * 256)
    palette_alpha.putdata([(0, 255), (0, 0), (0, 255), (0, 0)])
    got = pixels(images.to_rgb(palette_alpha))
    assert got[0, 0].tolist() == [0, 255, 0] and got[0, 1].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="background"):
        images.to_rgb(rgba, background=(300, 0, 0))

    Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(tmp_path / "cyan.tif")
    assert pixels(images.open_image(str(tmp_path / "cyan.tif")))[0, 0].tolist() == [0, 255, 255]
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(tmp_path / "magenta.jpg", quality=100)
    np.testing.assert_allclose(pixels(images.open_image(str(tmp_path / "magenta.jpg")))[1, 1], [255, 0, 255], atol=3)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape 8x4, left half red; orientation 6 means "rotate 90° clockwise to display".
    stored = Image.new("RGB", (8, 4), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[274] = 6
    for name, options in (("rot.png", {}), ("rot.jpg", {"quality": 100}), ("rot.webp", {"lossless": True})):
        stored.save(tmp_path / name, exif=exif, **options)
        shown = images.open_image(str(tmp_path / name))
        assert shown.size == (4, 8), name  # upright: portrait
        got = pixels(shown)
        np.testing.assert_allclose(got[1, 1], [255, 0, 0], atol=8)  # the red half is now on top
        np.testing.assert_allclose(got[6, 1], [0, 0, 255], atol=8)
    # 16-bit with an orientation tag: rotated and scaled
    gray = Image.fromarray(np.tile(np.array([[0], [65535]], dtype=np.uint16), (1, 6)))  # 6x2, top row black
    gray.save(tmp_path / "rot16.png", exif=exif)
    got = pixels(images.open_image(str(tmp_path / "rot16.png")))
    assert got.shape == (6, 2, 3) and got[0, 0, 0] == 255 and got[0, 1, 0] == 0  # black is now on the right


def test_animated_images_give_their_first_frame_and_the_scan_says_so(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    for name in ("anim.gif", "anim.png", "anim.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100, loop=0)
        np.testing.assert_allclose(pixels(images.open_image(str(tmp_path / name)))[4, 4], [255, 0, 0], atol=2)
    frames[0].save(tmp_path / "still.png")
    with caplog.at_level(logging.INFO, logger="diffusers_ssreg.data"):
        files = ssreg_data.find_images(str(tmp_path))
    assert len(files) == 4
    summary = [r.getMessage() for r in caplog.records if "Image scan" in r.getMessage()]
    assert len(summary) == 1 and "used 4 images (3 animated: the first frame of each), skipped none" in summary[0]


# --------------------------------------------------------------------------------------------
# Folder scan: symlinks once each, loops end, one summary line
# --------------------------------------------------------------------------------------------


def test_scan_follows_symlinks_once_and_ends_on_loops(tmp_path):
    root = tmp_path / "data"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "a" / "one.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(root / "a" / "deep" / "two.jpg")
    Image.new("RGB", (8, 8), (7, 8, 9)).save(root / "b" / "three.bmp")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "four.tiff")
    os.symlink(root, root / "a" / "deep" / "loop_to_root")  # a loop back up
    os.symlink(root / "b", root / "b" / "loop_to_self")  # a second loop
    os.symlink(root / "a", root / "again_a")  # a second way into a folder
    os.symlink(outside, root / "linked_outside")  # a linked folder outside: read once
    os.symlink(root / "a" / "one.png", root / "b" / "same_file.png")  # a second name of one file
    os.symlink(tmp_path / "missing.png", root / "b" / "broken.png")
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "fake.jpg").write_bytes(b"\x00not a jpeg")

    scan = images.scan_images(str(root))
    names = sorted(os.path.basename(f) for f in scan.files)
    assert names == ["four.tiff", "one.png", "three.bmp", "two.jpg"]  # each real file once
    assert len({os.path.realpath(f) for f in scan.files}) == 4
    assert scan.skipped == {
        images.SKIP_FOLDER_AGAIN: 3,  # the two loops and the second link to a/, each cut once
        images.SKIP_BROKEN_LINK: 1,
        images.SKIP_UNREADABLE: 1,
        images.SKIP_OTHER_TYPE: 1,
        images.SKIP_DUPLICATE: 1,
    }
    summary = scan.summary()
    assert summary.startswith(f"Image scan of {str(root)!r}: used 4 images, skipped ")
    assert "broken symlinks" in summary and "unreadable [UnidentifiedImageError: 1]" in summary and ".txt: 1" in summary
    assert "\n" not in summary


def test_scan_errors_name_the_flag_and_folder(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"garbage")
    (tmp_path / "junk" / "b.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--train_data_dir '.*junk' holds no images.*1 unreadable.*1 other file types"):
        images.scan_images(str(tmp_path / "junk"), name="--train_data_dir")
    with pytest.raises(ValueError, match="does not exist"):
        images.scan_images(str(tmp_path / "missing"), name="--validation_data_dir")


# --------------------------------------------------------------------------------------------
# One layer: training, latent caching and evaluation read the same pixels
# --------------------------------------------------------------------------------------------


def test_training_and_evaluation_read_sixteen_bit_and_rotated_files_right(tmp_path):
    ramp = gradient16(32, 32)
    Image.fromarray(ramp).save(tmp_path / "a_gray16.png")
    dataset = ssreg_data.folder_image_dataset(str(tmp_path), ssreg_data.image_transform(32, center_crop=True, random_flip=False))
    pixel_values = dataset[0]["pixel_values"]
    expected = torch.from_numpy(np.round(ramp / 65535 * 255) / 127.5 - 1).float()
    torch.testing.assert_close(pixel_values[0], expected, atol=1e-6, rtol=0)  # not a white square
    assert (pixel_values > 0.99).float().mean() < 0.01

    batch = next(iter(ImageBatches(str(tmp_path), batch_size=1)))
    torch.testing.assert_close(batch[0], pixel_values, atol=1e-6, rtol=0)


def test_one_resize_convention_and_adm_for_the_reference(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    ours = images.resize_short_side(photo, 37)
    torchvision_resize = transforms.Resize(37, interpolation=transforms.InterpolationMode.BILINEAR)(photo)
    assert ours.size == torchvision_resize.size and np.array_equal(pixels(ours), pixels(torchvision_resize))

    def adm_center_crop_arr(image, size):  # openai/guided-diffusion's preprocessing, for comparison
        while min(*image.size) >= 2 * size:
            image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
        scale = size / min(*image.size)
        image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
        arr = np.array(image)
        top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
        return arr[top : top + size, left : left + size]

    np.testing.assert_array_equal(pixels(images.resize_center_crop(photo, 20, "adm")), adm_center_crop_arr(photo, 20))
    with pytest.raises(ValueError, match="convention"):
        images.resize_short_side(photo, 20, "nearest")
    with pytest.raises(ValueError, match="resize"):
        ImageBatches(torch.zeros(1, 3, 8, 8), resize="nearest")


def test_help_lists_exactly_the_extensions_read(capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import cache_latents
    import finetune_vae

    from diffusers_ssreg.evaluation import cli

    listed = images.extensions_text()
    assert listed == "jpg, jpeg, png, webp, bmp, gif, tif, tiff"
    for parse in (finetune_vae.parse_args, cache_latents.parse_args, lambda a: cli.parse_args(["compare", *a])):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"files read: {listed}" in text
