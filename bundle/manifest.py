"""`bundle.json` as pydantic models (format versions 1 and 2, docs/bundle.md) and its reader.

Torch-free (pydantic only). `read_manifest(dir)` parses and validates the manifest alone;
`bundle.validate.load_bundle` also checks the files it lists.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atlas import AtlasInfo
from .format import FORMAT_VERSION, INTERVENE_MODES, MANIFEST, SUPPORTED_FORMAT_VERSIONS, VARIANTS, term_names
from .gate import GateSpec, VariantGate
from .strict import Strict


def _positive_grid(v: tuple[int, int]) -> tuple[int, int]:
    if min(v) < 1:
        raise ValueError(f"grid must be positive, got {v}")
    return v


Grid = Annotated[tuple[int, int], AfterValidator(_positive_grid)]  # (rows, columns) of patches, both >= 1


class BundleError(ValueError):
    """A bundle directory is unusable; `problems` holds one message per problem found."""

    def __init__(self, root: str | Path, problems: list[str]) -> None:
        self.root = str(root)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid bundle {self.root} ({len(self.problems)} problem(s)):\n{lines}")


class BackboneInfo(BaseModel):
    """The open_clip backbone the graph was exported from (Backbone.identity()): `pretrained` is a tag or a file
    name, `weights_sha256_16` the hash of the vision tower's weights."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str
    pretrained: str | None = None
    weights_sha256_16: str
    n_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)
    embed_dim: int = Field(ge=1)
    n_tokens: int = Field(ge=2)


class CltInfo(Strict):
    """CLT config (CLTConfig as a dict), sha256 of its weights file, the checkpoint directory's name (None for a
    random CLT). Names, never paths: a bundle travels between machines."""

    config: dict[str, Any]
    sha256: str | None = None
    checkpoint: str | None = None


class PreprocessSpec(Strict):
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


class TokenizerSpec(Strict):
    type: Literal["clip_bpe"] = "clip_bpe"
    vocab_file: str
    context_length: int = Field(ge=2)


class LabelsSpec(Strict):
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


class SpatialSpec(Strict):
    """The graph's spatial outputs (format 2): maps for the `top_k` best classes, over a `grid`
    (rows, columns) of patches, per head for `heads` heads. Tokens T = 1 + rows * columns (CLS first)."""

    top_k: int = Field(ge=1)
    grid: Grid
    heads: int = Field(ge=1)

    @property
    def n_tokens(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


class PatchSpec(Strict):
    """How a patch is deleted (the total-effect map, patch edits; `bundle.patches`): the `grid` (rows,
    columns) of patches over the preprocessed image, and the `fill` every pixel of a deleted patch takes,
    one value per channel in preprocessed units ((x - mean) / std); `fill_source` says what it is (for the
    reference model the dataset mean, the fill of the deletion test in training/evaluation/spatial.py)."""

    grid: Grid
    fill: tuple[float, float, float]
    fill_source: str = Field(min_length=1, max_length=300)

    @field_validator("fill")
    @classmethod
    def _finite_fill(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError(f"fill must be finite, got {v}")
        return v

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]


# the fill export writes when given none, and what a bundle without a `patches` block deletes patches to:
# 0 in preprocessed units, the normalisation's mean (open_clip's statistic of the CLIP's training images)
PREPROCESS_MEAN_FILL = "the preprocessing mean (0 in preprocessed units)"


class InterveneSpec(Strict):
    """The optional intervention graph (docs/intervene.md): its `file`. The patch grid its patch edits
    address and the fill deleted patches' pixels take are the bundle's one patch spec
    (`Manifest.effective_patches()`, the `patches` block), shared with the total-effect map."""

    file: str


class Manifest(Strict):
    """`bundle.json`, format version 2 (docs/bundle.md); version 1 is the same without `spatial`."""

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
    spatial: SpatialSpec | None = None
    patches: PatchSpec | None = None  # optional in formats 1 and 2; `effective_patches` covers bundles without it
    atlas: AtlasInfo | None = None
    intervene: InterveneSpec | None = None
    gate: GateSpec | None = None  # accuracy of the variants against fp32 (bundle/gate.py); optional: no figures, no auto choice

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v not in SUPPORTED_FORMAT_VERSIONS:
            newer = " (a newer cltvit wrote it: upgrade this installation)" if v > FORMAT_VERSION else ""
            raise ValueError(f"bundle format_version {v} is not supported by this installation "
                             f"(supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}){newer}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        want = term_names(self.backbone.n_layers)
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
        if self.spatial is not None:
            if self.format_version < 2:
                raise ValueError("'spatial' needs format_version 2")
            if self.spatial.n_tokens != self.backbone.n_tokens:
                raise ValueError(f"spatial grid {list(self.spatial.grid)} gives {self.spatial.n_tokens} tokens, "
                                 f"the backbone has {self.backbone.n_tokens}")
        if self.patches is not None:
            g = self.patches.grid
            if 1 + g[0] * g[1] != self.backbone.n_tokens:
                raise ValueError(f"patches grid {list(g)} gives {1 + g[0] * g[1]} tokens, the backbone has {self.backbone.n_tokens}")
            if self.spatial is not None and tuple(self.spatial.grid) != tuple(g):
                raise ValueError(f"patches grid {list(g)} differs from the spatial grid {list(self.spatial.grid)}")
            H, W = self.preprocess.image_size
            if H % g[0] or W % g[1]:
                raise ValueError(f"patches grid {list(g)} does not tile the {H}x{W} image")
        if self.intervene is not None:
            if self.intervene.file not in self.files:
                raise ValueError(f"intervene.file {self.intervene.file} is referenced but has no sha256 in 'files'")
            if self.mode not in INTERVENE_MODES:
                raise ValueError(f"an intervention graph needs mode {' or '.join(INTERVENE_MODES)}, the bundle's is {self.mode!r}")
            if self.effective_patches() is None:
                raise ValueError("an intervention graph needs a patch grid: the bundle has neither a 'patches' nor a 'spatial' block")
        if self.gate is not None:
            for v, g in self.gate.variants.items():
                if v not in self.variants:
                    raise ValueError(f"gate.variants has figures for {v!r}, which is not among the bundle's variants {sorted(self.variants)}")
                if g.model_sha256 != self.files.get(self.variants[v]):
                    raise ValueError(f"gate.variants.{v} was measured on another graph (sha256 {g.model_sha256[:12]}...) than "
                                     f"{self.variants[v]} ({(self.files.get(self.variants[v]) or 'none')[:12]}...): re-export to measure it")
        if self.atlas is not None:
            a = self.atlas
            for f in (a.index, a.features, a.images):
                if f not in self.files:
                    raise ValueError(f"atlas file {f} is referenced but has no sha256 in 'files'")
            if a.clt_sha256 != self.clt.sha256:
                raise ValueError(f"atlas.clt_sha256 {a.clt_sha256[:12]}... is not the bundle's CLT ({(self.clt.sha256 or 'none')[:12]}...): "
                                 f"the atlas describes another CLT; rebuild it with cltvit-atlas")
            if a.backbone_weights_sha256_16 != self.backbone.weights_sha256_16 or a.mode != self.mode:
                raise ValueError(f"the atlas was made for backbone weights {a.backbone_weights_sha256_16} in {a.mode} mode, the bundle "
                                 f"has {self.backbone.weights_sha256_16} in {self.mode} mode; rebuild it with cltvit-atlas")
        return self

    @property
    def n_terms(self) -> int:
        return len(self.term_names)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def variant_gate(self, variant: str) -> VariantGate | None:
        """The gate figures of `variant` (None: not measured, or the bundle has no `gate` block)."""
        return None if self.gate is None else self.gate.variants.get(variant)

    def effective_patches(self) -> PatchSpec | None:
        """The bundle's `patches` block, or for a bundle without one (written before it existed) its
        spatial grid with the fill 0 (`PREPROCESS_MEAN_FILL`); None when neither states a grid."""
        if self.patches is not None:
            return self.patches
        if self.spatial is None:
            return None
        return PatchSpec(grid=self.spatial.grid, fill=(0.0, 0.0, 0.0), fill_source=f"{PREPROCESS_MEAN_FILL}: the bundle states no fill")


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


