"""Heatmap overlays of spatial maps (Pillow + numpy, no plotting library): for people who would rather look.

`overlay(image, values, box)` lays a [rows, columns] patch grid of signed values over the image at
the image's own size: each patch keeps its cell (nearest neighbour, the model's unit), positive cells
red, negative blue, zero transparent, on a scale symmetric about zero (max |value| = full colour);
pixels the model did not see (cropped away) stay as they are.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# diverging palette (ColorBrewer RdBu ends and a neutral centre): value -1 .. 0 .. +1
_NEG = np.array([33, 102, 172], np.float64)
_MID = np.array([247, 247, 247], np.float64)
_POS = np.array([178, 24, 43], np.float64)


def diverging_rgb(x: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] (any shape) -> float RGB in [0, 255] (shape + [3]): blue, white, red."""
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)[..., None]
    return np.where(x < 0, _MID + (_NEG - _MID) * -x, _MID + (_POS - _MID) * x)


def overlay(
    image: Image.Image,
    values: np.ndarray,
    box: tuple[float, float, float, float] | None = None,
    *,
    alpha: float = 0.7,
    vmax: float | None = None,
) -> Image.Image:
    """RGB image of `image`'s size with the patch grid `values` [rows, columns] laid over `box`.

    box: (left, top, right, bottom) of the region the grid covers, in `image` pixels (default: the
    whole image; `Preprocessor.view_box` gives the model's view). Each pixel is blended with its
    cell's colour with opacity alpha * |value| / vmax (vmax default: max |values|), so cells near
    zero leave the image visible.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    grid = np.asarray(values, np.float64)
    if grid.ndim != 2 or min(grid.shape) < 1:
        raise ValueError(f"values must be a [rows, columns] grid, got shape {list(grid.shape)}")
    rgb = np.asarray(image.convert("RGB"), np.float64)
    h, w = rgb.shape[:2]
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(w), float(h))
    rows, cols = grid.shape
    # cell of every pixel centre (nearest neighbour); pixels outside the box get no cell
    c = np.floor((np.arange(w) + 0.5 - left) / (right - left) * cols).astype(np.int64)
    r = np.floor((np.arange(h) + 0.5 - top) / (bottom - top) * rows).astype(np.int64)
    inside = ((r >= 0) & (r < rows))[:, None] & ((c >= 0) & (c < cols))[None, :]
    cell = grid[np.clip(r, 0, rows - 1)][:, np.clip(c, 0, cols - 1)]  # [h, w]
    scale = float(np.abs(grid).max()) if vmax is None else float(vmax)
    norm = cell / scale if scale > 0 else np.zeros_like(cell)
    a = (alpha * np.abs(np.clip(norm, -1, 1)) * inside)[..., None]
    out = rgb * (1 - a) + diverging_rgb(norm) * a
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")
