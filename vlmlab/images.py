"""Opening images robustly and preparing them as uint8 pixel tensors for the vision tower.

Any image Pillow opens becomes RGB: grayscale, 1-bit, palette, CMYK, 16-bit and float, transparency (shown on
white), the first frame of an animation, EXIF orientation applied, any size from 1 x 1 up. A file that cannot be
used (empty, truncated, not an image, a decompression bomb) raises `ImageError` with one line naming it and why;
callers count it and go on.

Normalisation (mean / std) belongs to the vision tower, so what travels through batches and caches is compact
uint8: `[3, S, S]` per image, or `[5, 3, S, S]` with image splitting (4 crops + the whole image, as Idefics2).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vlmlab.config import ConfigError, DataConfig
from vlmlab.registry import lookup

# Refuse decompression bombs: Pillow raises above twice this many pixels and only warns between once and twice;
# the warning is turned into a refusal below. ~90 megapixels is far above any photo a VLM of this size is shown.
Image.MAX_IMAGE_PIXELS = 90_000_000
GREY = 127  # padding colour: close to every tower's mean, so padding normalises to about 0
NUM_SPLIT_VIEWS = 5  # image splitting: 4 crops + the whole image
MAX_PROCESSOR_ASPECT = 8  # wider images are padded to 8:1 before a shortest-edge processor can blow them up
MAX_PROCESSOR_SIDE = 4096  # ... after their long side is brought down to this


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def _name(image) -> str:
    return str(image) if not isinstance(image, Image.Image) else "in-memory image"


def _open(image) -> Image.Image:
    """A decoded PIL image from a path, a PIL image, or a lazy source (anything with `open()`, e.g. a hub row)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        opener = partial(Image.open, path)
    elif callable(getattr(image, "open", None)):
        opener = image.open
    else:
        raise ImageError(f"{type(image).__name__} is not an image, a path or an image source")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            picture = opener()
            picture.load()  # decodes now, so a truncated file fails here and not later inside a batch
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError(too_many_pixels(_name(image), bomb_pixels(err), Image.MAX_IMAGE_PIXELS)) from None
        except ImageError:
            raise
        except Exception as err:  # noqa: BLE001 - decoders raise many kinds (OSError, SyntaxError, struct.error, ...)
            raise ImageError(f"{_name(image)}: not a readable image ({type(err).__name__}: {err})") from None
    return picture


def bomb_pixels(err: Exception) -> int | None:
    """The pixel count a Pillow decompression-bomb error or warning names ("Image size (N pixels) exceeds ...")."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    return int(found.group(1)) if found else None


def too_many_pixels(name: str, pixels: int | None, limit: int) -> str:
    # Our limit, not Pillow's text: above twice it Pillow's error names the doubled figure, so two bombs would
    # otherwise cite two different limits.
    counted = f"{pixels:,}" if pixels else "more"
    return f"{name}: refused, too many pixels ({counted}; the limit is {limit:,}, against decompression bombs)"


def _to_rgb(picture: Image.Image) -> Image.Image:
    try:
        picture = ImageOps.exif_transpose(picture)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: show the image as it is stored
        pass
    if picture.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit and float grayscale: stretch the range to 8 bits rather than clipping everything to white.
        values = np.asarray(picture, dtype=np.float64)
        values = 255.0 * (values - values.min()) / max(values.max() - values.min(), 1e-12)
        picture = Image.fromarray(np.nan_to_num(values).astype(np.uint8))
    if picture.mode in ("RGBA", "RGBa", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        # Transparent pixels become white, as a viewer shows them, instead of whatever colour they hide.
        rgba = picture.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(canvas, rgba)
    return picture.convert("RGB")


def load_image(image) -> Image.Image:
    """An RGB image from a path, a PIL image or a lazy source; `ImageError` (one line) if it cannot be used."""
    picture = _open(image)
    try:
        return _to_rgb(picture)
    except Exception as err:  # noqa: BLE001
        raise ImageError(f"{_name(image)}: cannot convert mode {picture.mode} to RGB ({err})") from None


# ------------------------------------------------------------------ geometry: PIL image -> size x size


def _squash(image: Image.Image, size: int) -> Image.Image:
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def _pad(image: Image.Image, size: int) -> Image.Image:
    """Keeps the aspect ratio: the longer side becomes `size`, the rest is grey."""
    width, height = image.size
    scale = size / max(width, height)
    inner = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (GREY, GREY, GREY))
    canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
    return canvas


def _crop(image: Image.Image, size: int) -> Image.Image:
    """The centre square, resized: what CLIP's processor does (shortest edge to size, centre crop), without ever
    building the huge intermediate image an extreme aspect ratio would give."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return _squash(image.crop((left, top, left + side, top + side)), size)


RESIZE_MODES = {"squash": _squash, "pad": _pad, "crop": _crop}


def quadrants(image: Image.Image) -> list[Image.Image]:
    """The 2 x 2 crops of an image, row by row (a 1-pixel side is shared rather than cut to nothing)."""
    width, height = image.size

    def halves(length: int) -> list[tuple[int, int]]:
        middle = length // 2
        return [(0, max(middle, 1)), (min(middle, length - 1), length)]

    return [image.crop((left, top, right, bottom)) for top, bottom in halves(height) for left, right in halves(width)]


@lru_cache(maxsize=4)
def _load_processor(name: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.image_processor={name!r} cannot be loaded ({err})") from None


def _limit_aspect(image: Image.Image, ratio: int) -> Image.Image:
    """Pads an image wider (or taller) than ratio:1 to ratio:1, first shrinking its long side to MAX_PROCESSOR_SIDE."""
    width, height = image.size
    if max(width, height) <= ratio * min(width, height):
        return image
    if max(width, height) > MAX_PROCESSOR_SIDE:
        scale = MAX_PROCESSOR_SIDE / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        width, height = image.size
    long = max(width, height)
    canvas = Image.new("RGB", (long, -(-long // ratio)) if width > height else (-(-long // ratio), long), (GREY,) * 3)
    canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
    return canvas


def _as_array(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))  # [3, H, W]


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(_as_array(image))


def to_pixels(image: Image.Image, size: int, resize: str = "squash") -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, size, size] (`resize`: squash | pad | crop)."""
    return _as_tensor(lookup(RESIZE_MODES, resize, "data.image_resize")(image, size))


@dataclass(frozen=True)
class ImagePrep:
    """RGB PIL image -> uint8 pixels for the tower: `[3, S, S]`, or `[5, 3, S, S]` when `split`.

    `processor` (a transformers image processor's hub name or path, e.g. the tower's own) does the resizing and
    cropping instead of `resize`; its normalisation is left to the tower.
    """

    size: int
    resize: str = "squash"
    split: bool = False
    processor: str = ""

    @classmethod
    def from_config(cls, data: DataConfig, size: int) -> ImagePrep:
        lookup(RESIZE_MODES, data.image_resize, "data.image_resize")  # a wrong name fails now, not per image
        if data.image_processor:
            _load_processor(data.image_processor)
        return cls(size, data.image_resize, data.image_split, data.image_processor)

    def _view(self, image: Image.Image) -> np.ndarray:
        if not self.processor:
            return _as_array(lookup(RESIZE_MODES, self.resize, "data.image_resize")(image, self.size))
        out = _load_processor(self.processor)(
            images=_limit_aspect(image, MAX_PROCESSOR_ASPECT), do_rescale=False, do_normalize=False,
            return_tensors="pt",  # what every processor, PIL- or torchvision-based, returns
        )["pixel_values"][0]  # [3, H, W], values 0..255 (resampling may overshoot)
        pixels = np.clip(np.rint(out.float().numpy()), 0, 255).astype(np.uint8)
        if pixels.shape[-2:] != (self.size, self.size):  # a processor made for another resolution
            pixels = _as_array(_squash(Image.fromarray(pixels.transpose(1, 2, 0)), self.size))
        return pixels

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # Built in NumPy: torch's threaded kernels gain nothing on tensors this small and stall on a busy CPU.
        if not self.split:
            return torch.from_numpy(self._view(image))
        return torch.from_numpy(np.stack([self._view(view) for view in [*quadrants(image), image]]))  # [5, 3, S, S]


def num_views(data: DataConfig) -> int:
    """Images the tower encodes per example: its features are concatenated along N, so the connector sees N x this."""
    return NUM_SPLIT_VIEWS if data.image_split else 1


def views_read(image_keys: list[str], data: DataConfig, fraction: float) -> torch.Tensor | None:
    """Which views of each image the connector reads, bool `[U, 5]` (None: all of them), for a model that splits
    images: all 5 of an image drawn to be split, only the whole (the last view) of one left whole. An image is split
    when a hash of (data.seed, its key) falls below `fraction`: the same images every epoch and in every process,
    and the feature cache, which holds all 5 views of every image, stays valid whatever the fraction."""
    if not data.image_split or fraction >= 1:
        return None
    split = [_unit_hash(f"{data.seed}:{key}") < fraction for key in image_keys]
    views = torch.zeros(len(image_keys), NUM_SPLIT_VIEWS, dtype=torch.bool)
    views[:, -1] = True
    views[torch.tensor(split, dtype=torch.bool)] = True
    return views


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by `text` (not Python's `hash`, which differs per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def random_resize(pixels: torch.Tensor, min_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation: the picture shrunk by a random factor in [min_scale, 1] and placed at a random spot
    on grey; nothing is cut off, so counts and left/right stay true. uint8 `[..., 3, S, S]` in and out; draws from
    `generator` (training seeds one per example and visit: see `with_draw_seeds`), else from torch's RNG."""
    if min_scale >= 1.0:
        return pixels
    size = pixels.shape[-1]
    scale = min_scale + (1.0 - min_scale) * torch.rand((), generator=generator).item()
    side = max(1, round(size * scale))
    top, left = (torch.randint(0, size - side + 1, (2,), generator=generator)).tolist()
    flat = pixels.reshape(-1, 3, size, size).float()
    small = F.interpolate(flat, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.full_like(flat, GREY)
    canvas[..., top : top + side, left : left + side] = small
    return canvas.round().clamp(0, 255).to(torch.uint8).reshape(pixels.shape)
