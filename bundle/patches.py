"""Patch edits on preprocessed pixels and the total-effect map's rows and arithmetic (numpy only).

The one home of "replace these patches by the fill" and of the total-effect map: serving
(`serving.runtime`) and the evaluation (`training.evaluation.spatial`, the deletion test) both call it,
so the map the server returns is the one the deletion test measures.

Patches: a `grid` of rows x columns over an image of H x W preprocessed pixels; patch p (row-major
from the top-left, as the spatial maps' tokens 1..P) covers pixel rows [r ph, (r + 1) ph) and columns
[c pw, (c + 1) pw), p = r * columns + c, ph = H / rows, pw = W / columns (the ViT's patch size).
A deleted patch takes the `fill`, one value per channel in preprocessed units ((x - mean) / std),
the bundle's `patches.fill` (the dataset mean for the reference model; docs/bundle.md).

Total-effect map (docs/spatial.md, "Total effect"): which patches the prediction needs, measured by
running the model on R edited copies of the image (one batch) and combining their logits. Method
`keep_one` (the default, chosen by the deletion test): row 0 is the all-fill image, row 1 + p the
all-fill image with patch p kept as in the image (R = P + 1); patch p's score for class c is
logit_c(row 1 + p) - logit_c(row 0), in logit units: what patch p alone, on the fill, adds to c's
logit. `delete_one` (measured, not served by default): row 0 is the image, row 1 + p the image with
patch p deleted; score logit_c(row 0) - logit_c(row 1 + p): what c's logit loses without patch p.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

TotalEffectMethod = Literal["keep_one", "delete_one"]
TOTAL_EFFECT_METHODS: tuple[str, ...] = ("keep_one", "delete_one")
DEFAULT_TOTAL_EFFECT_METHOD: TotalEffectMethod = "keep_one"


def patch_size(grid: Sequence[int], image_size: Sequence[int]) -> tuple[int, int]:
    """(ph, pw) pixels per patch of a rows x columns `grid` over an (H, W) image; ValueError if it does not divide."""
    rows, cols = int(grid[0]), int(grid[1])
    H, W = int(image_size[0]), int(image_size[1])
    if rows < 1 or cols < 1 or H % rows or W % cols:
        raise ValueError(f"a {rows}x{cols} patch grid does not tile a {H}x{W} image")
    return H // rows, W // cols


def patch_pixel_masks(grid: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """bool [P, H, W]: the pixels of each patch, P = rows * columns, row-major (module docstring)."""
    ph, pw = patch_size(grid, image_size)
    rows, cols = int(grid[0]), int(grid[1])
    masks = np.zeros((rows * cols, rows * ph, cols * pw), dtype=bool)
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        masks[p, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = True
    return masks


def fill_patches(pixels: np.ndarray, deleted: np.ndarray, fill: Sequence[float], grid: Sequence[int]) -> np.ndarray:
    """Copies of preprocessed `pixels` [B, 3, H, W] with the patches marked in `deleted` bool [B, P]
    replaced by `fill` [3] (per channel, preprocessed units): float32 [B, 3, H, W]. Patch p of image b is
    deleted when deleted[b, p]; the other pixels are the input's, bit for bit.

    Its in-graph twin is `training.model.edits.delete_patches` (torch, traced into intervene.onnx for
    /intervene's `delete_patches`): the same operation on the same grid and fill, kept apart because
    serving has no torch and the graph takes the flags as an input."""
    x = np.asarray(pixels, dtype=np.float32)
    gone = np.asarray(deleted, dtype=bool)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got shape {list(x.shape)}")
    masks = patch_pixel_masks(grid, x.shape[2:])
    P = masks.shape[0]
    if gone.shape != (x.shape[0], P):
        raise ValueError(f"deleted must be bool [B={x.shape[0]}, P={P}], got shape {list(gone.shape)}")
    f = np.asarray(fill, dtype=np.float32).reshape(1, 3, 1, 1)
    if f.size != 3 or not np.isfinite(f).all():
        raise ValueError(f"fill must be 3 finite values (one per channel), got {list(np.ravel(fill))}")
    pix_gone = (gone.astype(np.float32) @ masks.reshape(P, -1).astype(np.float32)).reshape(x.shape[0], 1, *x.shape[2:]) > 0
    return np.where(pix_gone, f, x).astype(np.float32, copy=False)


def total_effect_masks(n_patches: int, method: str = DEFAULT_TOTAL_EFFECT_METHOD) -> np.ndarray:
    """bool [R, P]: which patches each edited copy keeps as in the image (False: filled), R = P + 1
    (module docstring: `keep_one` row 0 keeps none, row 1 + p only p; `delete_one` row 0 keeps all,
    row 1 + p all but p)."""
    if method not in TOTAL_EFFECT_METHODS:
        raise ValueError(f"total-effect method must be one of {', '.join(TOTAL_EFFECT_METHODS)}, got {method!r}")
    P = int(n_patches)
    if P < 1:
        raise ValueError(f"n_patches must be >= 1, got {P}")
    eye = np.eye(P, dtype=bool)
    if method == "keep_one":
        return np.concatenate([np.zeros((1, P), bool), eye])
    return np.concatenate([np.ones((1, P), bool), ~eye])


def total_effect_rows(pixels: np.ndarray, fill: Sequence[float], grid: Sequence[int],
                      method: str = DEFAULT_TOTAL_EFFECT_METHOD) -> np.ndarray:
    """The edited copies of one preprocessed image `pixels` [3, H, W] that the map is measured on, in the
    order of `total_effect_masks`: float32 [R, 3, H, W]."""
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"pixels must be one image [3, H, W], got shape {list(x.shape)}")
    keep = total_effect_masks(int(grid[0]) * int(grid[1]), method)
    return fill_patches(np.broadcast_to(x, (len(keep), *x.shape)), ~keep, fill, grid)


def total_effect_scores(logits: np.ndarray, method: str = DEFAULT_TOTAL_EFFECT_METHOD) -> np.ndarray:
    """The total-effect map from the logits of the edited copies: `logits` [R, S] (R = P + 1 rows in
    `total_effect_masks` order, S classes) -> float64 [S, P], logit units (module docstring)."""
    if method not in TOTAL_EFFECT_METHODS:
        raise ValueError(f"total-effect method must be one of {', '.join(TOTAL_EFFECT_METHODS)}, got {method!r}")
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or lg.shape[0] < 2:
        raise ValueError(f"logits must be [R = P + 1 >= 2, S], got shape {list(lg.shape)}")
    base, rows = lg[0], lg[1:]
    return (rows - base).T if method == "keep_one" else (base - rows).T
