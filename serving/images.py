"""Untrusted image bytes -> RGB PIL image, with limits and messages that name the problem.

Accepted: anything Pillow decodes (PNG, JPEG, GIF, WebP, BMP, TIFF, ...). Converted to RGB:
grayscale, palette, RGBA/LA (alpha dropped, as open_clip's `convert("RGB")` does), CMYK,
16-bit and 32-bit integer or float grayscale (rescaled to 8 bits), 1-bit. Animated images: the
first frame. Refused with `ImageError`: empty input, more than `max_bytes`, data Pillow does not
recognise, truncated or corrupt data, more than `max_pixels` pixels (checked from the header,
before decoding, so decompression bombs are never expanded).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """The bytes are not a usable image; the message says why (for a 4xx answer).

    `too_large` is True when the upload exceeds the byte limit (HTTP 413 rather than 400).
    """

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. High bit-depth grayscale is rescaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 257.0
        return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 0.0
        lo = float(finite.min()) if finite.size else 0.0
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0  # float images in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            scaled = arr
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = arr / 257.0
        else:
            scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"image mode {mode!r} cannot be converted to RGB: {exc}") from None


def decode_image(data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode untrusted bytes into a fully loaded RGB image (first frame if animated).

    Raises `ImageError` naming the problem: empty, too large (bytes or pixels), not an image,
    truncated/corrupt, or an unconvertible mode.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image must be bytes, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ImageError("image is empty (0 bytes)")
    if n > max_bytes:
        raise ImageError(f"image is {n:,} bytes, over the limit of {max_bytes:,} bytes", too_large=True)
    try:
        im = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        head = bytes(data[:8])
        raise ImageError(f"not an image: the data (starting {head!r}) is in no format Pillow recognises") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels (decompression bomb): {exc}") from None
    except Exception as exc:  # corrupt headers raise assorted errors inside Pillow's plugins
        raise ImageError(f"image header is corrupt ({type(exc).__name__}: {exc})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} pixels (decompression bomb?)"
        )
    try:
        if getattr(im, "is_animated", False):
            im.seek(0)
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels (decompression bomb): {exc}") from None
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, struct.error, ...
        raise ImageError(f"image data is truncated or corrupt ({im.format or 'unknown'} {w}x{h}: {exc})") from None
    try:
        rgb = _to_rgb(im)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"image could not be converted to RGB (mode {im.mode}): {exc}") from None
    if rgb is im:
        rgb = im.copy()  # detach from the file object
    return rgb
