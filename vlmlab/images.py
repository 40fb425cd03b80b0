"""Opening images from paths or PIL objects and turning them into fixed-size uint8 tensors.

Normalisation (mean / std) belongs to the vision tower, so what travels through batches and caches is compact
uint8 `[3, H, W]`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Refuse decompression bombs loudly instead of letting Pillow only warn: ~90 megapixels is far above any photo
# a VLM of this size is shown.
Image.MAX_IMAGE_PIXELS = 90_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """Returns an RGB image from a path or a PIL image (first frame of an animation, EXIF rotation applied)."""
    if isinstance(image, Image.Image):
        picture = image
    else:
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            picture = Image.open(path)
            picture.load()
        except Image.DecompressionBombError as err:
            raise ImageError(f"{path}: refused, too many pixels ({err})") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{path}: not a readable image ({err})") from None
    picture = ImageOps.exif_transpose(picture)
    if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping everything to white.
        values = np.asarray(picture, dtype=np.float64)
        values = 255.0 * (values - values.min()) / max(values.max() - values.min(), 1.0)
        picture = Image.fromarray(values.astype(np.uint8))
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        # Transparent pixels become white, as a viewer shows them, instead of whatever colour they hide.
        rgba = picture.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(canvas, rgba)
    return picture.convert("RGB")


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, size, size] (bicubic resize to the tower's square input)."""
    resized = image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)
