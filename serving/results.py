"""The image graph's outputs (`RawOutputs`) -> per-image result dicts (the one implementation of the result fields).

`image_result(raw, b, ...)` builds the plain dict of image `b` with the fields of
`serving.schemas.ImageResult` (units there); `BundleRuntime.results` validates these dicts into
`ImageResult` objects for the Python API, the HTTP service encodes them to JSON directly.
Arithmetic is float64 per image, vectorised over labels and terms.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np

from bundle.gate import completeness_residual

from .shares import term_shares


@dataclass(frozen=True)
class RawOutputs:
    """The image graph's outputs as numpy arrays (see docs/bundle.md)."""

    logits: np.ndarray  # [B, C] float32
    embedding: np.ndarray  # [B, D] float32
    contributions: np.ndarray  # [B, T, C] float32
    top_feature_layer: np.ndarray  # [B, K] int64
    top_feature_index: np.ndarray  # [B, K] int64
    top_feature_activation: np.ndarray  # [B, K] float32
    top_feature_contribution: np.ndarray  # [B, K] float32
    # spatial maps (bundles with `spatial`; None otherwise; docs/bundle.md)
    spatial_class: np.ndarray | None = None  # [B, S] int64, -1 = padding
    spatial_contributions: np.ndarray | None = None  # [B, S, L, N] float32
    spatial_bias: np.ndarray | None = None  # [B, S, L, 2] float32
    spatial_head_contributions: np.ndarray | None = None  # [B, L, H, N] float32

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def has_spatial(self) -> bool:
        return self.spatial_class is not None

    def select(self, indices: Sequence[int]) -> "RawOutputs":
        """The outputs of the images at `indices` (along the batch axis)."""
        idx = np.asarray(indices, dtype=np.int64)
        return RawOutputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx] for f in fields(self)})


def check_top_k(top_k: int | None, n_labels: int) -> int:
    """The number of labels to report: `top_k`, or min(5, C) when None. Raises ValueError when out of [1, C]."""
    k = min(5, n_labels) if top_k is None else int(top_k)
    if not 1 <= k <= n_labels:
        raise ValueError(f"top_k={k} is out of range: it must be between 1 and the number of labels ({n_labels})")
    return k


def image_result(
    raw: RawOutputs,
    b: int,
    label_names: Sequence[str],
    term_names: Sequence[str],
    *,
    k: int,
    detail: bool,
    include_embedding: bool,
    feature_label: Callable[[int, int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The result dict of image `b` of `raw` (keys and units of `ImageResult`); `k` from `check_top_k`.
    `feature_label(layer, index)` adds a top feature's atlas label fields (BundleRuntime.feature_label)."""
    logits = raw.logits[b].astype(np.float64)  # [C]
    contrib = raw.contributions[b].astype(np.float64)  # [T, C]
    z = np.exp(logits - logits.max())
    probs = z / z.sum()
    order = np.argsort(-logits, kind="stable")[:k]
    pred = int(order[0])
    residual = float(completeness_residual(contrib[None], logits[None])[0])
    shares = term_shares(contrib[None], np.array([pred]))[0]
    order_list = order.tolist()
    top_logits = logits[order]
    top = [{"label": label_names[c], "probability": p, "logit": lg}
           for c, p, lg in zip(order_list, probs[order].tolist(), top_logits.tolist())]
    out: dict[str, Any] = {"predicted": label_names[pred], "top": top, "explanations": None, "top_features": None,
                           "completeness_residual": residual, "term_shares": shares.tolist(), "embedding": None}
    if detail:
        values = contrib[:, order]  # [T, k]
        share = np.divide(values, top_logits, out=np.zeros_like(values), where=top_logits != 0.0)
        names = list(term_names)
        out["explanations"] = [
            {"label": label_names[c], "logit": lg,
             "terms": [{"term": t, "value": v, "share": s} for t, v, s in zip(names, vs, ss)]}
            for c, lg, vs, ss in zip(order_list, top_logits.tolist(), values.T.tolist(), share.T.tolist())
        ]
        out["top_features"] = [
            {"layer": l, "index": i, "activation": a, "contribution": c, **(feature_label(l, i) if feature_label else {})}
            for l, i, a, c in zip(raw.top_feature_layer[b].tolist(), raw.top_feature_index[b].tolist(),
                                  raw.top_feature_activation[b].astype(np.float64).tolist(),
                                  raw.top_feature_contribution[b].astype(np.float64).tolist())
        ]
    if include_embedding:
        out["embedding"] = raw.embedding[b].astype(np.float64).tolist()
    return out


def score_record(res: dict[str, Any], term_names: Sequence[str], spatial: dict[str, Any] | None = None,
                 with_spatial: bool = False, total_effect: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat record of batch scoring (`Explainer.score`, cltvit-score, the stream, Ray) from one
    `image_result` dict: `label` (the predicted one), `top`, `shares` keyed by term; `path` and `error`
    are the job's to fill. `with_spatial` adds `spatial`: the predicted label's maps from the image's
    `serving.spatial.spatial_maps` dict (`spatial_record`); a `total_effect` map dict
    (`serving.spatial.total_effect_map`) adds `total_effect` (`total_effect_record`)."""
    rec: dict[str, Any] = {"path": None, "error": None, "label": res["predicted"], "top": res["top"],
                           "shares": dict(zip(term_names, res["term_shares"]))}
    if with_spatial and spatial is not None:
        rec["spatial"] = spatial_record(spatial, res["predicted"])
    if total_effect is not None:
        rec["total_effect"] = total_effect_record(total_effect, res["predicted"])
    return rec


def spatial_record(spatial: dict[str, Any], predicted: str) -> dict[str, Any] | None:
    """The predicted label's maps as a flat record field: grid, residual and the `ClassMap` fields without
    per-head maps (None when the image has no map for the predicted label)."""
    classes = spatial["classes"]
    if not classes or classes[0]["label"] != predicted:
        return None
    first = {k: v for k, v in classes[0].items() if k not in ("heads", "heads_cls_cell")}
    return {"grid": list(spatial["grid"]), "residual": spatial["residual"], **first}


def total_effect_record(total_effect: dict[str, Any], predicted: str) -> dict[str, Any] | None:
    """The predicted label's total-effect map as a flat record field: the map's grid, method, rows, fill and
    fill_source plus the first class's fields (None when the image has no map for the predicted label)."""
    classes = total_effect["classes"]
    if not classes or classes[0]["label"] != predicted:
        return None
    return {"grid": list(total_effect["grid"]), "method": total_effect["method"], "rows": total_effect["rows"],
            "fill": list(total_effect["fill"]), "fill_source": total_effect["fill_source"], **classes[0]}
