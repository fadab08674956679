"""A bundle's feature atlas, read with numpy only (format: bundle/atlas.py, meaning: docs/atlas.md).

`Atlas(paths)` loads the three atlas files once (validated and checksummed by `bundle.load_bundle`);
it answers what the service's `/atlas` endpoints, the `/explain` feature labels, the viewer and the
HTML report need: a feature's label, the feature list, one feature's page (statistics, direct
effect on every class, text matches, top images as PNG data URLs) and the example images.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from bundle.atlas import LABEL_SOURCES, AtlasIndex, hist_edges, read_index

SortKey = Literal["index", "firing_rate", "strength"]
MAX_LIST = 5000


class AtlasLookupError(LookupError):
    """No such feature (layer or index out of range); the message names the valid range."""


@dataclass(frozen=True)
class FeatureLabel:
    """A feature's label as /explain reports it: the text, where it comes from, whether it is a weak guess."""

    label: str | None
    source: str
    low_confidence: bool


def png_data_url(image: np.ndarray) -> str:
    """uint8 [h, w, 1 or 3] -> 'data:image/png;base64,...'."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def png_bytes(image: np.ndarray) -> bytes:
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class Atlas:
    """The atlas of one bundle, in memory. `paths`: BundlePaths.atlas ("index", "features", "images")."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.index: AtlasIndex = read_index(paths["index"])
        with np.load(paths["features"], allow_pickle=False) as z:
            self.arrays: dict[str, np.ndarray] = {k: z[k] for k in z.files}
        with np.load(paths["images"], allow_pickle=False) as z:
            self.thumbs, self.image_class, self.image_ref = z["thumbs"], z["image_class"], z["image_ref"]
            self.examples, self.example_class = z["examples"], z["example_class"]
        ix = self.index
        self.n_layers, self.n_features = ix.n_layers, ix.n_features
        self.words = list(ix.vocab.words)
        self.class_names = list(ix.class_names or [])
        a = self.arrays
        self.firing_rate = a["fire_count"] / float(ix.images)
        self._labels = self._make_labels()

    # ------------------------------------------------------------------ labels
    def _class_name(self, c: int) -> str | None:
        if c < 0:
            return None
        return self.class_names[c] if c < len(self.class_names) else f"class {c}"

    def _make_labels(self) -> list[list[str | None]]:
        a = self.arrays
        text0, cls, src = a["text_index"][..., 0], a["class_index"], a["label_source"]
        out: list[list[str | None]] = []
        for l in range(self.n_layers):
            row: list[str | None] = []
            for f in range(self.n_features):
                s = LABEL_SOURCES[int(src[l, f])]
                row.append(self.words[int(text0[l, f])] if s == "text" and text0[l, f] >= 0 else
                           self._class_name(int(cls[l, f])) if s == "image-classes" else None)
            out.append(row)
        return out

    def check(self, layer: int, index: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise AtlasLookupError(f"layer {layer} is out of range: the CLT has layers 0..{self.n_layers - 1}")
        if not 0 <= index < self.n_features:
            raise AtlasLookupError(f"feature index {index} is out of range: each layer has features 0..{self.n_features - 1}")

    def label(self, layer: int, index: int) -> FeatureLabel:
        """The label of feature (layer, index) (raises AtlasLookupError when out of range)."""
        self.check(layer, index)
        return FeatureLabel(self._labels[layer][index], LABEL_SOURCES[int(self.arrays["label_source"][layer, index])],
                            bool(self.arrays["low_confidence"][layer, index]))

    # ------------------------------------------------------------------ GET /atlas
    def summary(self) -> dict[str, Any]:
        """What the atlas was measured on and per-layer counts (live features, label sources, low confidence)."""
        ix, a = self.index, self.arrays
        layers = []
        for l in range(self.n_layers):
            live = a["fire_count"][l] > 0
            src = a["label_source"][l]
            layers.append({"layer": l, "live": int(live.sum()), "mean_firing_rate": float(self.firing_rate[l].mean()),
                           "label_sources": {s: int((src == i).sum()) for i, s in enumerate(LABEL_SOURCES)},
                           "low_confidence": int((a["low_confidence"][l] & live).sum())})
        return {
            "images": ix.images, "dataset": ix.dataset, "class_names": ix.class_names, "mode": ix.mode,
            "n_layers": ix.n_layers, "n_features": ix.n_features, "top_n": ix.top_n, "patch_grid": ix.patch_grid,
            "clt_sha256": ix.clt_sha256, "vocab": {"source": ix.vocab.source, "size": len(ix.vocab.words), "templates": ix.vocab.templates},
            "thresholds": ix.thresholds.model_dump(), "build": {k: v for k, v in ix.build.items() if k != "config"},
            "layers": layers, "examples": len(self.examples),
        }

    def list_features(self, *, layer: int | None = None, query: str | None = None, live_only: bool = True, sort: SortKey = "firing_rate",
                      offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """Features matching the filters, `sort`ed (firing rate / strength descending, or index order), one page."""
        if layer is not None and not 0 <= layer < self.n_layers:
            raise AtlasLookupError(f"layer {layer} is out of range: the CLT has layers 0..{self.n_layers - 1}")
        if sort not in ("index", "firing_rate", "strength"):
            raise ValueError(f"sort must be index, firing_rate or strength, got {sort!r}")
        if not 0 <= offset or not 1 <= limit <= MAX_LIST:
            raise ValueError(f"offset must be >= 0 and limit in 1..{MAX_LIST}")
        a = self.arrays
        layers = range(self.n_layers) if layer is None else [layer]
        ls, fs = np.meshgrid(np.array(list(layers)), np.arange(self.n_features), indexing="ij")
        ls, fs = ls.ravel(), fs.ravel()
        keep = np.ones(len(ls), bool)
        if live_only:
            keep &= a["fire_count"][ls, fs] > 0
        if query:
            q = query.strip().lower()
            keep &= np.array([q in (self._labels[l][f] or "").lower() for l, f in zip(ls, fs)], bool)
        ls, fs = ls[keep], fs[keep]
        if sort != "index":
            key = self.firing_rate[ls, fs] if sort == "firing_rate" else a["strength"][ls, fs]
            order = np.lexsort((fs, ls, -key))
            ls, fs = ls[order], fs[order]
        page = slice(offset, offset + limit)
        return {"total": int(len(ls)), "offset": offset, "features": [self.brief(int(l), int(f)) for l, f in zip(ls[page], fs[page])]}

    def brief(self, layer: int, index: int) -> dict[str, Any]:
        lab = self.label(layer, index)
        return {"layer": layer, "index": index, "label": lab.label, "label_source": lab.source, "low_confidence": lab.low_confidence,
                "firing_rate": float(self.firing_rate[layer, index]), "strength": float(self.arrays["strength"][layer, index])}

    # ------------------------------------------------------------------ GET /atlas/features/{layer}/{index}
    def feature(self, layer: int, index: int, label_embeddings: np.ndarray, label_names: Sequence[str], *,
                thumbnails: bool = True) -> dict[str, Any]:
        """Everything about one feature. The direct effect is measured against `label_embeddings` [C, D] (the bundle's
        class embeddings, or any L2-normalised set): its mean contribution to each logit when active (logit units)."""
        self.check(layer, index)
        a, ix = self.arrays, self.index
        l, f = layer, index
        live = bool(a["fire_count"][l, f] > 0)
        effect = np.asarray(label_embeddings, np.float64) @ a["direction"][l, f].astype(np.float64)  # [C]
        order = np.argsort(-effect, kind="stable")
        classes = [{"label": label_names[c], "logit": float(effect[c])} for c in order]
        k = min(5, len(classes))
        edges = hist_edges()
        counts = a["hist"][l, f]
        nz = np.nonzero(counts)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        lab = self.label(l, f)
        out: dict[str, Any] = {
            **self.brief(l, f), "live": live, "fire_count": int(a["fire_count"][l, f]), "images": ix.images,
            "activation": {
                "mean": float(a["act_mean"][l, f]), "max": float(a["act_max"][l, f]),
                "quantiles": [{"q": q, "value": None if np.isnan(v) else float(v)} for q, v in zip(ix.quantile_levels, a["quantiles"][l, f])],
                "histogram": {"edges": edges[lo : hi + 1].tolist() if hi else [], "counts": counts[lo:hi].tolist(), "scale": "log10"},
            },
            "direct_effect": {"strength": float(a["strength"][l, f]), "weak": bool(a["strength"][l, f] < ix.thresholds.weak_effect),
                              "top": classes[:k], "bottom": classes[::-1][:k], "classes": classes},
            "text": {"matches": [{"word": self.words[int(i)], "score": float(s)} for i, s in zip(a["text_index"][l, f], a["text_score"][l, f]) if i >= 0],
                     "margin": None if np.isnan(a["margin"][l, f]) else float(a["margin"][l, f])},
            "image_classes": None if a["class_index"][l, f] < 0 else
            {"class": self._class_name(int(a["class_index"][l, f])), "fraction": float(a["class_fraction"][l, f])},
            "label_explained": _explain_label(lab.source, lab.low_confidence),
            "top_images": [self._image(int(r), float(v), thumbnails) for r, v in zip(a["top_image"][l, f], a["top_act"][l, f]) if r >= 0],
            "patch_grid": list(ix.patch_grid) if ix.patch_grid else None, "top_patches": None,
        }
        if ix.patch_grid is not None:
            gh, gw = ix.patch_grid
            patches = []
            for r, v, t in zip(a["ptop_image"][l, f], a["ptop_act"][l, f], a["ptop_token"][l, f]):
                if r >= 0:
                    p = int(t) - 1
                    patches.append({**self._image(int(r), float(v), thumbnails), "token": int(t), "row": p // gw, "col": p % gw})
            out["top_patches"] = patches
            out["patch_firing_rate"] = float(a["patch_fire_count"][l, f]) / (ix.images * gh * gw)
        return out

    def _image(self, row: int, activation: float, thumbnails: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"activation": activation, "image": int(self.image_ref[row]), "class": self._class_name(int(self.image_class[row]))}
        if thumbnails:
            d["thumbnail"] = png_data_url(self.thumbs[row])
        return d

    # ------------------------------------------------------------------ examples for the viewer
    def example_list(self) -> list[dict[str, Any]]:
        return [{"example": i, "class": self._class_name(int(c))} for i, c in enumerate(self.example_class)]

    def example_png(self, i: int) -> bytes:
        if not 0 <= i < len(self.examples):
            raise AtlasLookupError(f"example {i} is out of range: the atlas has examples 0..{len(self.examples) - 1}")
        return png_bytes(self.examples[i])


def _explain_label(source: str, low: bool) -> str:
    if source == "none":
        return "never active on the atlas images: no label"
    if source == "image-classes":
        return ("weak direct effect on the logits (it acts mostly through later layers): labelled by the most frequent class "
                "of its top images" + (", which are mixed" if low else ""))
    return ("best match of its direct effect on the logits against the vocabulary" +
            (" (low confidence: weak effect or a small margin over the runner-up)" if low else ""))
