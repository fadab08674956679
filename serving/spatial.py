"""Where in the image: `SpatialExplanation`s from the image graph's spatial outputs (numpy only).

The graph (docs/bundle.md, format 2) returns, for its S top classes of each image, the split of every
attention term `attn.l` over source tokens (token 0 = CLS, then the patches row-major) plus the
value-bias and output-bias parts, and for the predicted class the same per head. This module turns
the arrays into the response's plain dicts (the fields of `serving.schemas.SpatialExplanation`): per
class the patch grid (flat, row-major, with the grid's shape) per layer and summed over layers, the
CLS->CLS cell and the two bias parts per layer, per-head grids on request.

Size: per class L * N + (rows * columns) + 3 L numbers (N = 1 + rows * columns), at most S classes;
per-head maps add L * H * N for one class. Two forms of the same numbers: for the Python API, lists of
floats rounded to 7 significant digits (float32 carries about 7.2, and a float64 would otherwise print
the 17 digits of the float32's binary expansion); for the HTTP responses, float32 numpy arrays that
`orjson` writes straight from memory, each value as the shortest decimal that reads back as the same
float32 (docs/spatial.md has the sizes and what this form saves).

`total_effect_map` builds the total-effect map's dict (fields of `serving.schemas.TotalEffectMap`) from
the logits of an image's edited copies; the copies and the arithmetic are `bundle.patches`'.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bundle import PatchSpec
from bundle.patches import DEFAULT_TOTAL_EFFECT_METHOD, total_effect_scores

from .results import RawOutputs

SIGNIFICANT_DIGITS = 7


def round_significant(x: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """float64 copy of `x` rounded to `digits` significant digits (zeros stay zero), so that JSON
    carries the float32 value's digits and not the float64 expansion of its binary value."""
    x = np.asarray(x, dtype=np.float64)
    mag = np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x))))
    scale = 10.0 ** (digits - 1 - mag)
    return np.round(x * scale) / scale


def attention_terms(contributions: np.ndarray, classes: np.ndarray, n_layers: int) -> np.ndarray:
    """The attn.l terms [B, S, L] (float64) of each image's spatial classes (padding rows: class 0's).
    contributions [B, T, C], classes [B, S] int (-1 = padding)."""
    attn = np.take_along_axis(contributions[:, 1 : 1 + n_layers], np.maximum(classes, 0)[:, None, :], 2)  # [B, L, S]
    return attn.transpose(0, 2, 1).astype(np.float64)


def spatial_residuals(attn: np.ndarray, classes: np.ndarray, tokens: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per image, max over its spatial classes and layers of |attn.l term - (its cells + bias parts)|:
    attn [B, S, L] (`attention_terms`), classes [B, S], tokens [B, S, L, N], bias [B, S, L, 2] -> [B]."""
    parts = tokens.sum(-1, dtype=np.float64) + bias.sum(-1, dtype=np.float64)  # [B, S, L]
    err = np.abs(parts - attn) * (classes >= 0)[:, :, None]
    return err.reshape(len(err), -1).max(1, initial=0.0)


def spatial_maps(
    raw: RawOutputs,
    label_names: Sequence[str],
    grid: tuple[int, int],
    *,
    k: int | Sequence[int],
    heads: bool | Sequence[bool] = False,
    arrays: bool = False,
) -> list[dict[str, Any]]:
    """The `SpatialExplanation` of every image of `raw` as a plain dict (`BundleRuntime.results`
    validates it into the model): maps for image b's top `k[b]` labels by logit that the graph has maps
    for, best first, with per-head grids on its predicted label when `heads[b]`. `k` / `heads` may be
    one value for the whole batch.

    `arrays=False`: the grids are lists of floats rounded to 7 significant digits. `arrays=True` (the
    HTTP engine, which encodes with `orjson.OPT_SERIALIZE_NUMPY`): they are C-contiguous float32 arrays
    (views of one copy per batch), unrounded; converting them to Python lists is what this saves.

    Vectorised over the batch: rounding, sums, residuals and list conversion run once per array."""
    assert raw.spatial_class is not None and raw.spatial_contributions is not None and raw.spatial_bias is not None
    classes, tokens, bias, contributions = raw.spatial_class, raw.spatial_contributions, raw.spatial_bias, raw.contributions
    rows, cols = grid
    B, S, L, N = tokens.shape
    if N != 1 + rows * cols:
        raise ValueError(f"spatial maps have {N} tokens, a {rows}x{cols} grid needs {1 + rows * cols}")
    ks = [int(k)] * B if isinstance(k, int) else [int(v) for v in k]
    want_heads = [bool(heads)] * B if isinstance(heads, bool) else [bool(v) for v in heads]
    orders = np.argsort(-raw.logits, axis=1, kind="stable")[:, : max(ks)].tolist()
    want = any(want_heads) and raw.spatial_head_contributions is not None
    if arrays:  # C-contiguous float32 (one copy per array; a map is a view of it), for orjson
        def prep(x: np.ndarray) -> np.ndarray:
            return x

        def form(x: np.ndarray) -> Any:
            return np.ascontiguousarray(x, np.float32)
    else:  # lists of floats rounded to 7 significant digits
        prep = round_significant

        def form(x: np.ndarray) -> Any:
            return x.tolist()
    t, b_r = prep(tokens), prep(bias)
    cells, cls_cells = form(t[..., 1:]), form(t[..., 0])
    totals = form(prep(tokens[..., 1:].sum(2, dtype=np.float64)))
    vbias, obias = form(b_r[..., 0]), form(b_r[..., 1])
    head_cells = head_cls = None
    if want:
        h = prep(raw.spatial_head_contributions)  # type: ignore[arg-type]
        head_cells, head_cls = form(h[..., 1:]), form(h[..., 0])
    attn = attention_terms(contributions, classes, L)
    attention = attn.sum(2).tolist()
    residuals = spatial_residuals(attn, classes, tokens, bias).tolist()
    layer_names = [f"attn.{l}" for l in range(L)]
    class_rows, logit_rows = classes.tolist(), raw.logits.tolist()
    out = []
    for b in range(B):
        row_of = {c: s for s, c in enumerate(class_rows[b]) if c >= 0}
        maps = []
        for c in orders[b][: ks[b]]:
            s = row_of.get(c)
            if s is None:
                continue
            per_head = head_cells is not None and want_heads[b] and s == 0
            maps.append({
                "label": label_names[c], "logit": logit_rows[b][c], "attention": attention[b][s], "total": totals[b][s],
                "layers": cells[b][s], "cls_cell": cls_cells[b][s], "value_bias": vbias[b][s], "output_bias": obias[b][s],
                "heads": head_cells[b] if per_head else [], "heads_cls_cell": head_cls[b] if per_head else [],  # type: ignore[index]
            })
        out.append({"grid": [rows, cols], "layers": layer_names, "classes": maps, "residual": residuals[b]})
    return out


def total_effect_map(row_logits: np.ndarray, image_logits: np.ndarray, label_names: Sequence[str], k: int,
                     patches: PatchSpec, *, arrays: bool = False) -> dict[str, Any]:
    """The total-effect map of one image as a plain dict (fields of `TotalEffectMap`): for its top `k` labels by
    `image_logits` [C], best first, the scores of `bundle.patches.total_effect_scores` from the logits of its
    edited copies `row_logits` [R = P + 1, C] (the `keep_one` rows; row 0 the all-fill image). Forms as in
    `spatial_maps`: lists rounded to 7 significant digits, or float32 arrays (`arrays=True`, for orjson)."""
    logits = np.asarray(image_logits, dtype=np.float64)
    order = np.argsort(-logits, kind="stable")[:k]
    rows = np.asarray(row_logits)[:, order]  # [R, k]
    scores = total_effect_scores(rows, DEFAULT_TOTAL_EFFECT_METHOD)  # [k, P] float64
    cells = np.ascontiguousarray(scores, np.float32) if arrays else round_significant(scores).tolist()
    fill_logits = rows[0].astype(np.float64).tolist()
    classes = [{"label": label_names[c], "logit": float(logits[c]), "fill_logit": fill_logits[j], "total": cells[j]}
               for j, c in enumerate(order.tolist())]
    return {"grid": [int(patches.grid[0]), int(patches.grid[1])], "method": DEFAULT_TOTAL_EFFECT_METHOD,
            "rows": int(len(rows)), "fill": [float(v) for v in patches.fill], "fill_source": patches.fill_source,
            "classes": classes}
