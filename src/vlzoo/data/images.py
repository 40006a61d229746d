"""Decoding images from files and bytes, safely: every failure is a :class:`BadSample`.

Whatever a dataset holds (grayscale, palette, RGBA, CMYK, 16-bit, EXIF-rotated), the
result of :func:`open_image` (vlzoo's readers) is an 8-bit RGB image turned upright by its
EXIF orientation; :func:`load_image` gives the image as the reference pipelines see it
(its own mode, EXIF orientation only on request); transparent pixels are composited onto white. Images
with more than ``max_pixels`` pixels are refused before their pixels are decoded
(decompression-bomb guard).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

DEFAULT_MAX_PIXELS = 64 * 2**20  # 67 M pixels, e.g. 8192 x 8192
RESIZE_MODES = ("shortest", "squash")


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` says why (``location`` is added by the reader)."""

    def __init__(self, reason: str, location: str = ""):
        super().__init__(f"{location}: {reason}" if location else reason)
        self.reason = reason
        self.location = location

    def at(self, location: str) -> BadSample:
        """The same failure, placed at ``location`` (a file, line or shard member)."""
        return BadSample(self.reason, location)


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = True) -> Image.Image:
    """A path or encoded bytes -> a fully decoded 8-bit RGB PIL image (rotated by its EXIF
    orientation unless ``exif_transpose`` is False).

    Raises :class:`BadSample` for a missing or empty file, undecodable or truncated
    data, and images over ``max_pixels``.
    """
    image = load_image(source, max_pixels, exif_transpose)
    try:
        return to_rgb(image)
    except (OSError, ValueError) as err:
        raise BadSample(f"image could not be converted to RGB ({err})") from err


def load_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = False) -> Image.Image:
    """A path or encoded bytes -> the decoded PIL image in its own mode (what
    ``Image.open(path)`` gives the reference pipelines), rotated by its EXIF orientation
    only when ``exif_transpose``. Raises :class:`BadSample` as :func:`open_image`."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadSample(f"missing image file {path}")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise BadSample("empty image (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            check_size(image, max_pixels)  # from the header, before any pixel is decoded
            image.load()
        except Image.DecompressionBombError as err:
            raise BadSample(f"image too large ({err})") from err
        except UnidentifiedImageError as err:
            raise BadSample("not a decodable image") from err
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
            raise BadSample(f"corrupt or truncated image ({err})") from err
    if not exif_transpose:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError) as err:
        raise BadSample(f"image EXIF orientation could not be applied ({err})") from err


def check_size(image: Image.Image, max_pixels: int) -> None:
    """Raise :class:`BadSample` when ``image`` has more than ``max_pixels`` pixels."""
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(f"image too large: {width}x{height} pixels exceeds max_image_pixels={max_pixels}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    16-bit and 32-bit integer images are scaled (not clipped) to 8 bits, float images
    by their range; transparency is composited onto white; CMYK and YCbCr are converted.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A single-channel integer or float array -> uint8, keeping relative brightness."""
    is_float = np.issubdtype(pixels.dtype, np.floating)
    pixels = pixels.astype(np.float64)
    if is_float and pixels.size and pixels.max() <= 1.0 and pixels.min() >= 0.0:
        return np.round(pixels * 255).astype(np.uint8)
    top = pixels.max() if pixels.size else 0.0
    scale = 255.0 / 65535.0 if top > 255 else 1.0  # 16-bit data (PNG/TIFF) or already 8-bit range
    if top > 65535:
        scale = 255.0 / top
    return np.clip(np.round(pixels * scale), 0, 255).astype(np.uint8)


def resize(image: Image.Image, size: int, mode: str = "shortest") -> Image.Image:
    """Resize to ``size`` x ``size``: ``shortest`` scales the shorter side to ``size`` and
    centre-crops (CLIP, BLIP-2); ``squash`` resizes both sides (ALBEF, BLIP)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    if image.size == (size, size):
        return image
    if mode == "squash":
        return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    pixels = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # numpy copy: no torch threads


def decode(source: str | Path | bytes | Image.Image | np.ndarray, size: int | None = None, mode: str = "shortest",
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """A path, encoded bytes, PIL image or (H, W[, C]) uint8 array -> (3, S, S) uint8
    (resized when ``size`` is given). Raises :class:`BadSample`."""
    if isinstance(source, np.ndarray) and size is None and source.ndim == 3 and source.shape[2] == 3:
        return torch.from_numpy(np.ascontiguousarray(source.transpose(2, 0, 1), dtype=np.uint8))  # in-memory RGB
    if isinstance(source, (str, Path, bytes, bytearray)):
        image = open_image(source, max_pixels)  # checked and converted while opening
    else:
        image = Image.fromarray(source) if isinstance(source, np.ndarray) else source
        check_size(image, max_pixels)
        image = to_rgb(image)
    if size is not None:
        image = resize(image, size, mode)
    return to_tensor(image)
