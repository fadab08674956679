"""The feature atlas: an optional, checksummed part of a bundle (docs/bundle.md "Atlas", docs/atlas.md).

For every CLT feature (layer l, index f) over a dataset: firing rate, activation quantiles and a
histogram, the top activating images (thumbnails), the direct effect on the logits and automatic text
labels. `export/atlas.py` computes it (torch), `serving/atlas.py` reads it (numpy only). Three files
under `atlas/` in the bundle, each listed with its sha256 in `bundle.json`'s `files`:

- `atlas/atlas.json`: `AtlasIndex` below (what was measured over which data, the vocabulary, thresholds).
- `atlas/features.npz`: per-feature arrays, `FEATURE_ARRAYS` (shapes [L, F, ...]).
- `atlas/images.npz`: the image table the top lists index, `IMAGE_ARRAYS` (thumbnails [U, h, w, c]).

The atlas is tied to the CLT it describes: `bundle.json`'s `atlas` block (`AtlasInfo`) and
`atlas.json` both carry the CLT checkpoint's sha256, the backbone's weights hash and the mode, and
validation refuses an atlas whose tie does not match the bundle's `clt` / `backbone` / `mode`.
Torch-free: numpy, pydantic, zipfile.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from .strict import Strict

ATLAS_FORMAT_VERSION = 1
ATLAS_DIR = "atlas"
ATLAS_INDEX = f"{ATLAS_DIR}/atlas.json"
ATLAS_FEATURES = f"{ATLAS_DIR}/features.npz"
ATLAS_IMAGES = f"{ATLAS_DIR}/images.npz"
ATLAS_FILES: tuple[str, ...] = (ATLAS_INDEX, ATLAS_FEATURES, ATLAS_IMAGES)

# Activation histogram: log-spaced bins, HIST_PER_DECADE per decade over [HIST_LO, HIST_HI]; activations
# outside land in the first / last bin (the exact maximum is kept separately). Quantiles are read off
# this histogram (geometric interpolation inside a bin: relative error below one bin's ratio, 15.5 %).
HIST_LO, HIST_HI, HIST_PER_DECADE = 1e-4, 1e3, 16
QUANTILE_LEVELS: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
LABEL_SOURCES: tuple[str, ...] = ("text", "image-classes", "none")


def hist_edges() -> np.ndarray:
    """float64 [NB + 1] bin edges of the activation histogram (log-spaced, see HIST_*)."""
    n = int(round(np.log10(HIST_HI / HIST_LO) * HIST_PER_DECADE))
    return np.logspace(np.log10(HIST_LO), np.log10(HIST_HI), n + 1)


def n_hist_bins() -> int:
    return len(hist_edges()) - 1


# name -> (dtype kind, trailing axes) of features.npz; every array starts with [L, F].
# N = top_n, M = label_matches, Q = len(quantile_levels), NB = histogram bins, D = embed_dim.
FEATURE_ARRAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fire_count": ("i", ()),          # images on which the feature is active at the CLS token
    "act_mean": ("f", ()),            # mean activation over those images (0 when dead)
    "act_max": ("f", ()),             # largest activation seen (exact)
    "quantiles": ("f", ("Q",)),       # activation quantiles over the images where it is active (NaN when dead)
    "hist": ("i", ("NB",)),           # activation histogram over those images (HIST_* bins)
    "direction": ("f", ("D",)),       # mean direct-effect vector in embedding space, logit units (docs/atlas.md)
    "strength": ("f", ()),            # max over the bundle's classes of the direct effect minus its mean over classes (logits)
    "top_image": ("i", ("N",)),       # rows of images.npz with the largest CLS activations, descending (-1: none)
    "top_act": ("f", ("N",)),         # their activations
    "text_index": ("i", ("M",)),      # best vocabulary matches of the direction (indices into atlas.json vocab.words)
    "text_score": ("f", ("M",)),      # their cosine similarities
    "margin": ("f", ()),              # text_score[0] - text_score[1]
    "class_index": ("i", ()),         # most frequent dataset class among the top images (-1: none / unlabelled)
    "class_fraction": ("f", ()),      # its share of the top images
    "label_source": ("u", ()),        # index into LABEL_SOURCES
    "low_confidence": ("b", ()),      # the shown label is a weak guess (docs/atlas.md)
}
# only where the mode keeps patch tokens ("all"): the top patch of each top image, ranked by patch activation
PATCH_ARRAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "patch_fire_count": ("i", ()),    # patch tokens (over all images) on which the feature is active
    "ptop_image": ("i", ("N",)),      # images with the largest activation at any patch, descending (-1: none)
    "ptop_act": ("f", ("N",)),        # that activation
    "ptop_token": ("i", ("N",)),      # the patch's token index (1..T-1; row-major over the grid after CLS)
}
IMAGE_ARRAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "thumbs": ("u", ("h", "w", "c")),     # uint8 [U, h, w, c]: what the model saw (resized, cropped), downscaled
    "image_class": ("i", ()),             # dataset class of each image (-1: unlabelled)
    "image_ref": ("i", ()),               # index of each image in the dataset it was read from
    "examples": ("u", ("H", "W", "3")),   # uint8 [E, H, W, 3]: a few dataset images at the model's input size (viewer examples)
    "example_class": ("i", ()),           # [E] their classes (-1: unlabelled)
    "example_ref": ("i", ()),             # [E] their dataset indices
}


class AtlasInfo(Strict):
    """`bundle.json`'s `atlas` block: the atlas files and what they are tied to."""

    index: str = ATLAS_INDEX
    features: str = ATLAS_FEATURES
    images: str = ATLAS_IMAGES
    clt_sha256: str = Field(min_length=64, max_length=64)
    backbone_weights_sha256_16: str
    mode: Literal["cls", "all", "observe"]


class HistSpec(Strict):
    lo: float = HIST_LO
    hi: float = HIST_HI
    per_decade: int = HIST_PER_DECADE
    bins: int


class VocabInfo(Strict):
    """The words the text labels were matched against, embedded with the bundle's text tower."""

    source: str
    words: list[str] = Field(min_length=2)
    templates: list[str] = Field(min_length=1)


class Thresholds(Strict):
    """When a label is flagged low-confidence and where it comes from (docs/atlas.md)."""

    weak_effect: float = Field(ge=0, description="strength (logits) below which the direct effect is called weak")
    min_margin: float = Field(ge=0, description="text labels with a smaller top-1 - top-2 cosine margin are low-confidence")
    min_class_fraction: float = Field(ge=0, le=1, description="image-class labels below this share of the top images are low-confidence")


class AtlasIndex(Strict):
    """`atlas/atlas.json`."""

    format_version: int
    clt_sha256: str
    backbone_weights_sha256_16: str
    mode: Literal["cls", "all", "observe"]
    n_layers: int = Field(ge=1)
    n_features: int = Field(ge=1)
    embed_dim: int = Field(ge=1)
    top_n: int = Field(ge=1)
    label_matches: int = Field(ge=2)
    images: int = Field(ge=1, description="dataset images the statistics were measured on")
    dataset: dict[str, Any]
    class_names: list[str] | None = Field(default=None, description="dataset class names (image_class / class_index index them)")
    labels: list[str] = Field(min_length=1, description="the bundle's class names `strength` was measured against")
    hist: HistSpec
    quantile_levels: list[float]
    vocab: VocabInfo
    thresholds: Thresholds
    patch_grid: tuple[int, int] | None = Field(default=None, description="patch grid (rows, cols) when the top patches are kept")
    build: dict[str, Any] = Field(default_factory=dict, description="command, seconds, machine")

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every array of features.npz (the PATCH_ARRAYS too when `patch_grid` is set)."""
        dims = {"Q": len(self.quantile_levels), "NB": self.hist.bins, "D": self.embed_dim, "N": self.top_n, "M": self.label_matches}
        arrays = {**FEATURE_ARRAYS, **(PATCH_ARRAYS if self.patch_grid is not None else {})}
        return {k: (self.n_layers, self.n_features, *(dims[a] for a in axes)) for k, (_, axes) in arrays.items()}


def parse_index(raw: Any) -> AtlasIndex:
    """`atlas.json` content -> AtlasIndex; raises ValueError with one line per problem."""
    try:
        index = AtlasIndex.model_validate(raw)
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())) from None
    if index.format_version != ATLAS_FORMAT_VERSION:
        raise ValueError(f"atlas format_version {index.format_version} is not supported (supports {ATLAS_FORMAT_VERSION})")
    return index


def read_index(path: str | Path) -> AtlasIndex:
    """Parse `atlas/atlas.json`; raises ValueError naming the problem."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"not readable JSON ({exc})") from None
    return parse_index(raw)


def npz_headers(path: str | Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{array name: (dtype, shape)} of an .npz file from the .npy headers alone (no array data is read)."""
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith(".npy"):
                continue
            with z.open(name) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[name[:-4]] = (dtype, tuple(shape))
    return out


def _kind_ok(dtype: np.dtype, kind: str) -> bool:
    return dtype.kind == kind or (kind == "i" and dtype.kind in "iu") or (kind == "u" and dtype.kind in "u")


def check_atlas_files(root: Path, info: AtlasInfo, *, n_layers: int, n_features: int, embed_dim: int, image_size: tuple[int, int],
                      clt_sha256: str | None, weights_sha256_16: str, mode: str, label_names: list[str]) -> list[str]:
    """Problems of a bundle's atlas files (present and checksummed already): the index parses and is tied to
    this bundle, every array is there with the right dtype and shape. Reads headers only. [] when fine."""
    problems: list[str] = []
    try:
        index = read_index(root / info.index)
    except ValueError as exc:
        return [f"{info.index}: {exc}"]
    for what, got, want in (("clt_sha256", index.clt_sha256, clt_sha256), ("backbone_weights_sha256_16", index.backbone_weights_sha256_16, weights_sha256_16),
                            ("mode", index.mode, mode)):
        if got != want:
            problems.append(f"{info.index}: {what} is {got!r} but the bundle's is {want!r}: the atlas describes another CLT; rebuild it (cltvit-atlas)")
    if (index.n_layers, index.n_features, index.embed_dim) != (n_layers, n_features, embed_dim):
        problems.append(f"{info.index}: made for L={index.n_layers}, F={index.n_features}, D={index.embed_dim}; "
                        f"the bundle has L={n_layers}, F={n_features}, D={embed_dim}")
    if index.labels != list(label_names):
        problems.append(f"{info.index}: direct effects were measured against labels {index.labels[:5]}..., not the bundle's")
    if problems:
        return problems
    try:
        feats, imgs = npz_headers(root / info.features), npz_headers(root / info.images)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return [f"{info.features} / {info.images}: not readable .npz files ({exc})"]
    U = imgs.get("thumbs", (None, (0, 1, 1, 1)))[1]
    E = imgs.get("examples", (None, (0, *image_size, 3)))[1]
    if len(U) != 4 or len(E) != 4:
        return [f"{info.images}: thumbs / examples must be [U, h, w, c] / [E, H, W, 3], got {list(U)} / {list(E)}"]
    want = index.feature_shapes()
    kinds = {**FEATURE_ARRAYS, **PATCH_ARRAYS}
    for name, shape in want.items():
        if name not in feats:
            problems.append(f"{info.features}: array {name!r} missing")
        elif feats[name][1] != shape or not _kind_ok(feats[name][0], kinds[name][0]):
            problems.append(f"{info.features}: {name} is {feats[name][0]} {list(feats[name][1])}, expected kind {kinds[name][0]!r} {list(shape)}")
    want_img = {"thumbs": U, "image_class": (U[0],), "image_ref": (U[0],), "examples": E, "example_class": (E[0],), "example_ref": (E[0],)}
    for name, shape in want_img.items():
        if name not in imgs:
            problems.append(f"{info.images}: array {name!r} missing")
        elif imgs[name][1] != tuple(shape) or not _kind_ok(imgs[name][0], IMAGE_ARRAYS[name][0]):
            problems.append(f"{info.images}: {name} is {imgs[name][0]} {list(imgs[name][1])}, expected kind {IMAGE_ARRAYS[name][0]!r} {list(shape)}")
    if E[1:3] != tuple(image_size) or U[3] not in (1, 3):
        problems.append(f"{info.images}: examples must be at the model's input size {list(image_size)} and thumbnails have 1 or 3 channels")
    return problems
