"""Where in the image: `SpatialExplanation`s from the image graph's spatial outputs (numpy only).

The graph (docs/bundle.md, format 2) returns, for its S top classes of each image, the split of every
attention term `attn.l` over source tokens (token 0 = CLS, then the patches row-major) plus the
value-bias and output-bias parts, and for the predicted class the same per head. This module turns
one image's arrays into the response model: per class the [rows][columns] patch grid per layer and
summed over layers, the CLS->CLS cell and the two bias parts per layer, per-head grids on request.

Size: per class L * N + (rows * columns) + 3 L numbers (N = 1 + rows * columns), at most S classes;
per-head maps add L * H * N for one class. Values are rounded to 7 significant digits (float32 carries
about 7.2), which keeps a ViT-B/16 response (S = 5, L = 12, 14 x 14 grid) near 160 kB of JSON without
per-head maps and 500 kB with them (docs/spatial.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .schemas import ClassMap, SpatialExplanation

SIGNIFICANT_DIGITS = 7


def round_significant(x: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """float64 copy of `x` rounded to `digits` significant digits (zeros stay zero), so that JSON
    carries the float32 value's digits and not the float64 expansion of its binary value."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x))))
    scale = 10.0 ** (digits - 1 - mag)
    return np.round(x * scale) / scale


def spatial_residual(contributions: np.ndarray, classes: np.ndarray, tokens: np.ndarray, bias: np.ndarray) -> float:
    """max over an image's spatial classes and layers of |attn.l term - (its cells + bias parts)|.

    contributions [T, C], classes [S] int (-1 = padding), tokens [S, L, N], bias [S, L, 2]."""
    L = tokens.shape[1]
    valid = np.flatnonzero(classes >= 0)
    if valid.size == 0:
        return 0.0
    want = contributions[1 : 1 + L][:, classes[valid]].T.astype(np.float64)  # [S', L]
    got = tokens[valid].astype(np.float64).sum(-1) + bias[valid].astype(np.float64).sum(-1)
    return float(np.abs(got - want).max())


def spatial_explanation(
    *,
    order: Sequence[int],
    label_names: Sequence[str],
    logits: np.ndarray,
    contributions: np.ndarray,
    classes: np.ndarray,
    tokens: np.ndarray,
    bias: np.ndarray,
    head_tokens: np.ndarray | None,
    grid: tuple[int, int],
) -> SpatialExplanation:
    """One image's maps for the classes in `order` (its top classes, best first) that the graph has
    maps for. logits [C], contributions [T, C], classes [S], tokens [S, L, N], bias [S, L, 2] (the
    image's rows of the graph outputs); head_tokens [L, H, N] adds per-head grids to the predicted
    class (classes[0]); None leaves them out."""
    rows, cols = grid
    L, N = tokens.shape[1], tokens.shape[2]
    if N != 1 + rows * cols:
        raise ValueError(f"spatial maps have {N} tokens, a {rows}x{cols} grid needs {1 + rows * cols}")
    row_of = {int(c): s for s, c in enumerate(classes) if c >= 0}
    picked = [(int(c), row_of[int(c)]) for c in order if int(c) in row_of]
    maps = []
    if picked:
        sel = np.array([s for _, s in picked])
        t = round_significant(tokens[sel])  # [S', L, N]
        grids = t[:, :, 1:].reshape(len(sel), L, rows, cols)
        totals = round_significant(tokens[sel][:, :, 1:].astype(np.float64).sum(1)).reshape(len(sel), rows, cols)
        b = round_significant(bias[sel])  # [S', L, 2]
        attention = contributions[1 : 1 + L][:, [c for c, _ in picked]].astype(np.float64).sum(0)
        for i, (c, s) in enumerate(picked):
            extra = {}
            if head_tokens is not None and s == 0:
                h = round_significant(head_tokens)  # [L, H, N]
                extra = {"heads": h[:, :, 1:].reshape(L, -1, rows, cols).tolist(), "heads_cls": h[:, :, 0].tolist()}
            maps.append(ClassMap(
                label=label_names[c], logit=float(logits[c]), attention=float(attention[i]), total=totals[i].tolist(),
                layers=grids[i].tolist(), cls=t[i, :, 0].tolist(), value_bias=b[i, :, 0].tolist(),
                output_bias=b[i, :, 1].tolist(), **extra,
            ))
    return SpatialExplanation(
        grid=(rows, cols), layers=[f"attn.{l}" for l in range(L)], classes=maps,
        residual=spatial_residual(contributions, classes, tokens, bias),
    )
