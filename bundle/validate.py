"""Validate a bundle directory: `load_bundle(dir)` returns `(manifest, paths)` or raises `BundleError`
listing every problem found (missing file, checksum mismatch, wrong shape or graph signature,
unsupported format version, ...), one line each.

Torch-free: numpy, pydantic and the `onnx` protobuf reader (graph signatures; external weight data
is never loaded).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .atlas import check_atlas_files
from .checksums import file_sha256
from .format import INTERVENE_INPUTS, INTERVENE_OUTPUTS, MANIFEST, MODEL_INPUTS, TEXT_INPUTS, TEXT_OUTPUTS, model_outputs
from .manifest import BundleError, Manifest, read_manifest


@dataclass(frozen=True)
class BundlePaths:
    """Absolute paths of a validated bundle's files. `models` maps variant name -> graph path."""

    root: Path
    manifest: Path
    models: dict[str, Path]
    text: Path
    labels: Path
    vocab: Path
    extra: dict[str, Path] = field(default_factory=dict)
    atlas: dict[str, Path] = field(default_factory=dict)  # "index", "features", "images" when the bundle has an atlas
    intervene: Path | None = None  # the intervention graph, when the bundle has one

    @property
    def model(self) -> Path:
        """The fp32 image graph."""
        return self.models["fp32"]

    def model_for(self, variant: str) -> Path:
        if variant not in self.models:
            raise KeyError(f"bundle {self.root} has no {variant!r} variant (has: {', '.join(sorted(self.models))})")
        return self.models[variant]


def _readable_signature(path: Path, problems: list[str]) -> Any:
    """`_graph_signature(path)`, or None with a problem noted when the file is no readable ONNX model."""
    try:
        return _graph_signature(path)
    except Exception as exc:  # corrupt protobuf
        problems.append(f"{path.name}: not a readable ONNX model ({type(exc).__name__}: {exc})")
        return None


def _graph_signature(path: Path) -> tuple[dict[str, tuple[int, list]], dict[str, tuple[int, list]], int | None]:
    """({name: (onnx elem_type, dims)} of a graph's inputs, the same of its outputs, its default-domain
    opset), reading the protobuf only. dims entries are ints (static) or strings (symbolic).
    External weight data is not loaded.
    """
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

    def sig(values: Any) -> dict[str, tuple[int, list]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out[v.name] = (t.elem_type, dims)
        return out

    return sig(model.graph.input), sig(model.graph.output), opset


_FLOAT, _INT64, _BOOL, _FLOAT16 = 1, 7, 9, 10


def _check_opset(path: Path, got: int | None, m: Manifest, problems: list[str]) -> None:
    """The graph's default-domain opset is the manifest's and one this installation can run."""
    newest = onnx.defs.onnx_opset_version()
    if got is not None and got != m.opset:
        problems.append(f"{path.name}: graph opset {got} differs from bundle.json opset {m.opset}")
    if got is not None and got > newest:
        problems.append(f"{path.name}: opset {got} is newer than this installation supports ({newest}); upgrade onnx/onnxruntime")


def _check_model_graph(path: Path, variant: str, m: Manifest, problems: list[str]) -> None:
    sig = _readable_signature(path, problems)
    if sig is None:
        return
    ins, outs, opset = sig
    _check_opset(path, opset, m, problems)
    if tuple(ins) != MODEL_INPUTS:
        problems.append(f"{path.name}: inputs are {list(ins)}, expected {list(MODEL_INPUTS)}")
    expected = model_outputs(m.spatial is not None)
    if tuple(outs) != expected:
        what = "with" if m.spatial is not None else "without"
        problems.append(f"{path.name}: outputs are {list(outs)}, expected {list(expected)} "
                        f"(bundle.json declares a graph {what} spatial maps)")
        return
    H, W = m.preprocess.image_size
    D, T, K = m.backbone.embed_dim, m.n_terms, m.top_k_features
    want = {
        "pixels": (_FLOAT, [None, 3, H, W]),
        "text_embeddings": (_FLOAT, [None, D]),
        "logits": (_FLOAT, [None, None]),
        "embedding": (_FLOAT, [None, D]),
        "contributions": (_FLOAT, [None, T, None]),
        "top_feature_layer": (_INT64, [None, K]),
        "top_feature_index": (_INT64, [None, K]),
        "top_feature_activation": (_FLOAT, [None, K]),
        "top_feature_contribution": (_FLOAT, [None, K]),
    }
    if m.spatial is not None:
        S, L, H, N = m.spatial.top_k, m.backbone.n_layers, m.spatial.heads, m.spatial.n_tokens
        want.update({
            "spatial_class": (_INT64, [None, S]),
            "spatial_contributions": (_FLOAT, [None, S, L, N]),
            "spatial_bias": (_FLOAT, [None, S, L, 2]),
            "spatial_head_contributions": (_FLOAT, [None, L, H, N]),
        })
    for name, (etype, dims) in {**ins, **outs}.items():
        if name not in want:
            continue
        wtype, wdims = want[name]
        if etype != wtype:
            problems.append(f"{path.name} ({variant}): {name} has ONNX element type {etype}, expected {wtype}")
        if len(dims) != len(wdims):
            problems.append(f"{path.name} ({variant}): {name} has rank {len(dims)}, expected {len(wdims)}")
            continue
        for axis, (got, exp) in enumerate(zip(dims, wdims)):
            if exp is None:
                if isinstance(got, int) and got > 0 and name in ("pixels", "text_embeddings"):
                    problems.append(f"{path.name} ({variant}): {name} axis {axis} is fixed at {got}; it must be dynamic")
            elif isinstance(got, int) and got != exp:
                problems.append(f"{path.name} ({variant}): {name} axis {axis} is {got}, expected {exp}")


def _check_intervene_graph(path: Path, m: Manifest, problems: list[str]) -> None:
    """The intervention graph's signature (docs/bundle.md): inputs, outputs, element types, fixed sizes."""
    sig = _readable_signature(path, problems)
    if sig is None:
        return
    ins, outs, opset = sig
    _check_opset(path, opset, m, problems)
    if tuple(ins) != INTERVENE_INPUTS or tuple(outs) != INTERVENE_OUTPUTS:
        problems.append(f"{path.name}: signature {list(ins)} -> {list(outs)}, expected {list(INTERVENE_INPUTS)} -> "
                        f"{list(INTERVENE_OUTPUTS)}")
        return
    H, W = m.preprocess.image_size
    D, T, K, P = m.backbone.embed_dim, m.n_terms, m.top_k_features, m.backbone.n_tokens - 1
    want = {
        "pixels": (_FLOAT, [None, 3, H, W]), "text_embeddings": (_FLOAT, [None, D]),
        "feature_layer": (_INT64, [None, None]), "feature_index": (_INT64, [None, None]),
        "feature_scale": (_FLOAT, [None, None]), "feature_shift": (_FLOAT, [None, None]),
        "term_scale": (_FLOAT, [None, T]), "term_all_tokens": (_BOOL, [None]),
        "patch_delete": (_BOOL, [None, P]), "patch_key_drop": (_BOOL, [None, P]), "fill": (_FLOAT, [3]),
        "logits": (_FLOAT, [None, None]), "embedding": (_FLOAT, [None, D]), "contributions": (_FLOAT, [None, T, None]),
        "top_feature_layer": (_INT64, [None, K]), "top_feature_index": (_INT64, [None, K]),
        "top_feature_activation": (_FLOAT, [None, K]), "top_feature_contribution": (_FLOAT, [None, K]),
    }
    for name, (etype, dims) in {**ins, **outs}.items():
        wtype, wdims = want[name]
        if etype != wtype:
            problems.append(f"{path.name}: {name} has ONNX element type {etype}, expected {wtype}")
        if len(dims) != len(wdims):
            problems.append(f"{path.name}: {name} has rank {len(dims)}, expected {len(wdims)}")
            continue
        for axis, (got, exp) in enumerate(zip(dims, wdims)):
            if exp is not None and isinstance(got, int) and got != exp:
                problems.append(f"{path.name}: {name} axis {axis} is {got}, expected {exp}")


def _check_text_graph(path: Path, m: Manifest, problems: list[str]) -> None:
    sig = _readable_signature(path, problems)
    if sig is None:
        return
    ins, outs, _ = sig
    if tuple(ins) != TEXT_INPUTS or tuple(outs) != TEXT_OUTPUTS:
        problems.append(f"{path.name}: signature {list(ins)} -> {list(outs)}, expected {list(TEXT_INPUTS)} -> {list(TEXT_OUTPUTS)}")
        return
    etype, dims = ins["tokens"]
    if etype != _INT64:
        problems.append(f"{path.name}: tokens have ONNX element type {etype}, expected int64 ({_INT64})")
    if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != m.tokenizer.context_length):
        problems.append(f"{path.name}: tokens shape {dims}, expected [N, {m.tokenizer.context_length}]")
    etype, dims = outs["text_embeddings"]
    if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != m.backbone.embed_dim):
        problems.append(f"{path.name}: text_embeddings shape {dims}, expected [N, {m.backbone.embed_dim}]")


def _check_labels(path: Path, m: Manifest, problems: list[str]) -> None:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        problems.append(f"{path.name}: not a readable .npy array ({type(exc).__name__}: {exc})")
        return
    C, D = len(m.labels.names), m.backbone.embed_dim
    if arr.dtype != np.float32:
        problems.append(f"{path.name}: dtype {arr.dtype}, expected float32")
    if arr.shape != (C, D):
        problems.append(f"{path.name}: shape {list(arr.shape)}, expected [{C}, {D}] ({C} label names, embed_dim {D})")
        return
    norms = np.linalg.norm(arr.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        problems.append(f"{path.name}: rows are not L2-normalised (norms in [{norms.min():.4f}, {norms.max():.4f}])")


def load_bundle(root: str | Path, *, verify_checksums: bool = True, check_graphs: bool = True) -> tuple[Manifest, BundlePaths]:
    """Validate a bundle directory and return (manifest, paths).

    Checks: manifest schema and format version; every listed file present; sha256 of each file
    (`verify_checksums`); `labels.npy` dtype/shape/normalisation; image and text graph input and
    output names, element types and static dims, and image graph opsets (`check_graphs`). All problems are collected
    and raised together as one `BundleError`.
    """
    root = Path(root).resolve()
    m = read_manifest(root)
    problems: list[str] = []
    present: set[str] = set()  # files present and intact: only these get content checks
    for name, digest in m.files.items():
        p = root / name
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            problems.append(f"{MANIFEST}: files[{name!r}] = {digest!r} is not a hex sha256 digest")
        elif not p.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing")
        elif verify_checksums and file_sha256(p) != digest:
            problems.append(f"{name}: sha256 does not match {MANIFEST} (file corrupt or replaced)")
        else:
            present.add(name)
    if m.labels.embeddings_file in present:
        _check_labels(root / m.labels.embeddings_file, m, problems)
    if check_graphs:
        for variant, name in m.variants.items():
            if name in present:
                _check_model_graph(root / name, variant, m, problems)
        if "text.onnx" in present:
            _check_text_graph(root / "text.onnx", m, problems)
        if m.intervene is not None and m.intervene.file in present:
            _check_intervene_graph(root / m.intervene.file, m, problems)
    a = m.atlas
    if a is not None and {a.index, a.features, a.images} <= present:
        problems += check_atlas_files(root, a, n_layers=m.backbone.n_layers, n_features=int(m.clt.config.get("n_features", 0)),
                                      embed_dim=m.backbone.embed_dim, image_size=tuple(m.preprocess.image_size),
                                      clt_sha256=m.clt.sha256, weights_sha256_16=m.backbone.weights_sha256_16, mode=m.mode,
                                      label_names=list(m.labels.names))
    if problems:
        raise BundleError(root, problems)
    paths = BundlePaths(
        root=root,
        manifest=root / MANIFEST,
        models={v: root / n for v, n in m.variants.items()},
        text=root / "text.onnx",
        labels=root / m.labels.embeddings_file,
        vocab=root / m.tokenizer.vocab_file,
        extra={n: root / n for n in m.files if n not in set(m.variants.values()) | {"text.onnx", m.labels.embeddings_file, m.tokenizer.vocab_file}},
        atlas={} if a is None else {"index": root / a.index, "features": root / a.features, "images": root / a.images},
        intervene=None if m.intervene is None else root / m.intervene.file,
    )
    return m, paths
