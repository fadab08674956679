"""The serving bundle's manifest (`bundle.json`, see docs/bundle.md) and a validating loader.

Torch-free: imports pydantic, numpy and (for the graph signature check) the `onnx` protobuf
reader only. `load_bundle(dir)` returns `(manifest, paths)` or raises `BundleError` listing every
problem found (missing file, checksum mismatch, wrong shape, unsupported format version, ...),
one line each.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MODEL_INPUTS = ("pixels", "text_embeddings")
MODEL_OUTPUTS = (
    "logits",
    "embedding",
    "contributions",
    "top_feature_layer",
    "top_feature_index",
    "top_feature_activation",
    "top_feature_contribution",
)
TEXT_INPUTS = ("tokens",)
TEXT_OUTPUTS = ("text_embeddings",)
MODES = ("cls", "all", "observe")
VARIANTS = ("fp32", "int8", "fp16")


class BundleError(ValueError):
    """A bundle directory is unusable; `problems` holds one message per problem found."""

    def __init__(self, root: str | Path, problems: list[str]) -> None:
        self.root = str(root)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid bundle {self.root} ({len(self.problems)} problem(s)):\n{lines}")


def expected_term_names(n_layers: int) -> list[str]:
    """T = 2L + 3 term names in tensor order (mirrors training.decompose.term_names; kept torch-free)."""
    return ["embed", *[f"attn.{l}" for l in range(n_layers)], *[f"clt.{l}" for l in range(n_layers)], "bias", "error"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneInfo(BaseModel):
    """The open_clip backbone the graph was exported from (Backbone.identity())."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str
    pretrained: str | None = None
    weights_sha256_16: str
    n_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)
    embed_dim: int = Field(ge=1)
    n_tokens: int = Field(ge=2)


class CltInfo(_Strict):
    """CLT config (CLTConfig as a dict), sha256 of its weights file, checkpoint path (None for a random CLT)."""

    config: dict[str, Any]
    sha256: str | None = None
    checkpoint: str | None = None


class PreprocessSpec(_Strict):
    """open_clip's eval transform: RGB, resize shortest side (bicubic), center crop, /255, (x-mean)/std, CHW."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop: Literal["center"] = "center"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"std must be positive, got {v}")
        return v


class TokenizerSpec(_Strict):
    type: Literal["clip_bpe"] = "clip_bpe"
    vocab_file: str
    context_length: int = Field(ge=2)


class LabelsSpec(_Strict):
    """Default class names, the prompt templates their embeddings were made with, the [C, D] file."""

    names: list[str] = Field(min_length=1)
    templates: list[str] = Field(min_length=1)
    embeddings_file: str

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if "{}" not in t]
        if bad:
            raise ValueError(f"every template needs a '{{}}' slot for the class name; bad: {bad}")
        return v


class Manifest(_Strict):
    """`bundle.json`, format version 1 (docs/bundle.md)."""

    format_version: int
    backbone: BackboneInfo
    clt: CltInfo
    mode: Literal["cls", "all", "observe"]
    term_names: list[str]
    top_k_features: int = Field(ge=1)
    logit_scale: float = Field(gt=0)
    preprocess: PreprocessSpec
    tokenizer: TokenizerSpec
    labels: LabelsSpec
    variants: dict[str, str]
    opset: int = Field(ge=17)
    versions: dict[str, str]
    files: dict[str, str]

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"bundle format_version {v} is not supported by this server (supports {FORMAT_VERSION})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        want = expected_term_names(self.backbone.n_layers)
        if self.term_names != want:
            raise ValueError(f"term_names {self.term_names} do not match the {self.backbone.n_layers}-layer model: expected {want}")
        if self.variants.get("fp32") != "model.onnx":
            raise ValueError("variants must map 'fp32' to 'model.onnx'")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        for f in [*self.variants.values(), "text.onnx", self.labels.embeddings_file, self.tokenizer.vocab_file]:
            if f not in self.files:
                raise ValueError(f"{f} is referenced but has no sha256 in 'files'")
        for f in self.files:
            if Path(f).is_absolute() or ".." in Path(f).parts:
                raise ValueError(f"file name {f!r} must be relative to the bundle directory")
        return self

    @property
    def n_terms(self) -> int:
        return len(self.term_names)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim


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

    @property
    def model(self) -> Path:
        """The fp32 image graph."""
        return self.models["fp32"]

    def model_for(self, variant: str) -> Path:
        if variant not in self.models:
            raise KeyError(f"bundle {self.root} has no {variant!r} variant (has: {', '.join(sorted(self.models))})")
        return self.models[variant]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _graph_signature(path: Path) -> tuple[dict[str, tuple[int, list]], dict[str, tuple[int, list]], int | None]:
    """({name: (onnx elem_type, dims)} of a graph's inputs, the same of its outputs, its default-domain
    opset), reading the protobuf only. dims entries are ints (static) or strings (symbolic).
    External weight data is not loaded.
    """
    import onnx

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


_FLOAT, _INT64, _FLOAT16 = 1, 7, 10


def _check_opset(path: Path, got: int | None, m: Manifest, problems: list[str]) -> None:
    """The graph's default-domain opset is the manifest's and one this installation can run."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if got is not None and got != m.opset:
        problems.append(f"{path.name}: graph opset {got} differs from bundle.json opset {m.opset}")
    if got is not None and got > newest:
        problems.append(f"{path.name}: opset {got} is newer than this installation supports ({newest}); upgrade onnx/onnxruntime")


def _check_model_graph(path: Path, variant: str, m: Manifest, problems: list[str]) -> None:
    try:
        ins, outs, opset = _graph_signature(path)
    except Exception as exc:  # corrupt protobuf
        problems.append(f"{path.name}: not a readable ONNX model ({type(exc).__name__}: {exc})")
        return
    _check_opset(path, opset, m, problems)
    if tuple(ins) != MODEL_INPUTS:
        problems.append(f"{path.name}: inputs are {list(ins)}, expected {list(MODEL_INPUTS)}")
    if tuple(outs) != MODEL_OUTPUTS:
        problems.append(f"{path.name}: outputs are {list(outs)}, expected {list(MODEL_OUTPUTS)}")
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


def _check_text_graph(path: Path, m: Manifest, problems: list[str]) -> None:
    try:
        ins, outs, _ = _graph_signature(path)
    except Exception as exc:
        problems.append(f"{path.name}: not a readable ONNX model ({type(exc).__name__}: {exc})")
        return
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


def read_manifest(root: str | Path) -> Manifest:
    """Parse and validate `bundle.json` alone (no file checks). Raises BundleError."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(root, [f"{root} is not a directory"])
    if not path.is_file():
        raise BundleError(root, [f"{MANIFEST} missing: not a bundle directory (make one with cltvit-export)"])
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(root, [f"{MANIFEST} is not valid JSON: {exc}"]) from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{MANIFEST}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise BundleError(root, problems) from None


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
    )
    return m, paths
