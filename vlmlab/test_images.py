import numpy as np
import pytest
from PIL import Image

from vlmlab.images import ImageError, load_image, to_pixels


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    source = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    suffix = "tiff" if mode in ("I;16", "I", "F", "CMYK") else "png"
    path = tmp_path / f"x.{suffix}"
    source.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 10)
    assert to_pixels(image, 16).shape == (3, 16, 16)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_keeps_its_contrast():
    image = Image.new("I;16", (2, 2))
    image.putpixel((1, 0), 65535)
    image.putpixel((1, 1), 65535)
    pixels = np.asarray(load_image(image))
    assert pixels[0, 0, 0] == 0 and pixels[0, 1, 0] == 255


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 30)


def test_broken_and_missing_files_raise_one_clear_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="bad.jpg: not a readable image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "nope.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
