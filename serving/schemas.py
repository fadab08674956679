"""Pydantic models of the serving side: per-image results and the HTTP responses built from them.

Units: `logit` values are zero-shot logits (logit_scale * cosine similarity); `probability` is a
softmax over the label set in use; a term's `value` is its additive contribution to a logit (the
values of all terms sum to the logit); `share` = value / logit (signed); `term_shares` are
|contribution| / sum |contribution| to the predicted logit, per term, in `term_names` order
(non-negative, summing to 1), the compact per-layer summary used by monitoring. Spatial maps
(`SpatialExplanation`) are in logit units too: each cell is one source token's share of a class
logit through one attention layer (docs/spatial.md). The total-effect map (`TotalEffectMap`) is in
logit units too: how much a class's logit rises when the patch alone is put back on the fill image.
"""
from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .choice import VariantChoice


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


M = TypeVar("M", bound=BaseModel)


def trusted(cls: type[M], values: dict[str, Any]) -> M:
    """An instance of `cls` holding `values` as they are: no validation, no defaults. For dicts this
    package builds itself with every field of `cls` and the field's own type (tests check the result
    equals `cls.model_validate(values)`), where validation (or `model_construct`, 3-4 us per model)
    costs as much as building the numbers. The four attributes are the ones `model_construct` sets."""
    if values.keys() != cls.model_fields.keys():
        raise ValueError(f"{cls.__name__} needs exactly the fields {list(cls.model_fields)}, got {list(values)}")
    m = cls.__new__(cls)
    object.__setattr__(m, "__dict__", values)
    object.__setattr__(m, "__pydantic_fields_set__", set(values))
    object.__setattr__(m, "__pydantic_extra__", None)
    object.__setattr__(m, "__pydantic_private__", None)
    return m


class LabelScore(_Model):
    """One label of the top-k: softmax probability over the label set and the raw logit."""

    label: str
    probability: float = Field(ge=0.0, le=1.0)
    logit: float


class TermContribution(_Model):
    """One term (embed, attn.l, clt.l, bias, error) of a class logit."""

    term: str
    value: float
    share: float = Field(description="value / logit of the class (signed; 0 when the logit is 0)")


class ClassExplanation(_Model):
    """The additive decomposition of one class logit into the T terms."""

    label: str
    logit: float
    terms: list[TermContribution]


class FeatureContribution(_Model):
    """A CLT feature at the CLS token with one of the largest |contributions| to the predicted logit."""

    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    activation: float
    contribution: float
    label: str | None = Field(default=None, description="the feature's label from the bundle's atlas (None without an atlas, or for a feature never active there)")
    label_source: Literal["text", "image-classes", "none"] | None = Field(
        default=None, description="text: best vocabulary match of its direct effect; image-classes: the most frequent class of its top "
        "images (weak direct effect); none: no label (docs/atlas.md)")
    low_confidence: bool | None = Field(default=None, description="the label is a weak guess (weak effect, small margin or mixed images)")


class ClassMap(_Model):
    """Where in the image one class's logit comes from through the attention blocks, in logit units.

    For every layer l: sum(layers[l]) + cls_cell[l] + value_bias[l] + output_bias[l] equals the class's
    `attn.l` term (to `SpatialExplanation.residual`). A patch map is a flat list of rows x columns
    cells, row-major from the image's top-left patch (`SpatialExplanation.grid` gives the shape):
    patch (r, c) is entry r * columns + c.
    """

    label: str
    logit: float
    attention: float = Field(description="sum of the class's attn.l terms: what the maps below split up")
    total: list[float] = Field(description="[rows * columns], row-major: the patch cells summed over layers")
    layers: list[list[float]] = Field(description="[layers][rows * columns]: each attention layer's patch cells")
    cls_cell: list[float] = Field(description="[layers]: the CLS->CLS cell (the CLS token reading itself) per layer")
    value_bias: list[float] = Field(description="[layers]: the attention's value-bias part per layer")
    output_bias: list[float] = Field(description="[layers]: the attention's output-bias part per layer")
    heads: list[list[list[float]]] = Field(
        default_factory=list,
        description="[layers][heads][rows * columns]: per-head patch cells (predicted class with heads=true; else empty)",
    )
    heads_cls_cell: list[list[float]] = Field(
        default_factory=list, description="[layers][heads]: per-head CLS->CLS cells (with heads; else empty)"
    )


class SpatialExplanation(_Model):
    """Per top class (at most the bundle's spatial top-k, best first), the patch grid per attention
    layer and summed over layers. Values are rounded to 7 significant digits (over HTTP: each float32's
    shortest round-trip decimal)."""

    grid: tuple[int, int] = Field(description="(rows, columns) of the patch grid; maps list its cells row-major")
    layers: list[str] = Field(description="the attention terms the maps split, in order (attn.0, attn.1, ...)")
    classes: list[ClassMap]
    residual: float = Field(
        description="max over classes and layers of |attn.l term - its spatial parts|: 0 up to float rounding in "
        "fp32 graphs; the attention's own rounding error in int8/fp16 variants"
    )


class TotalEffectClass(_Model):
    """One label's total-effect map: `total[p]` = its logit on the fill image with patch p kept as in the
    image, less `fill_logit` (its logit on the all-fill image). Unlike the direct maps the cells need not
    add up to anything: patches interact (their sum against `logit - fill_logit` says how much)."""

    label: str
    logit: float = Field(description="the label's logit on the image")
    fill_logit: float = Field(description="the label's logit on the all-fill image (every patch deleted)")
    total: list[float] = Field(description="[rows * columns], row-major: what each patch alone adds to the logit on the fill")


class TotalEffectMap(_Model):
    """Which patches the prediction needs, measured by running the model on edited copies of the image
    (docs/spatial.md, "Total effect"): one batch of `rows` copies, deleted patches taking `fill`."""

    grid: tuple[int, int] = Field(description="(rows, columns) of the patch grid; maps list its cells row-major")
    method: Literal["keep_one"] = Field(description="keep_one: row 0 the all-fill image, row 1 + p the fill with patch p kept")
    rows: int = Field(description="edited copies of the image run (one batch): patches + 1")
    fill: tuple[float, float, float] = Field(description="a deleted patch's value per channel, preprocessed units")
    fill_source: str = Field(description="what the fill is (the bundle's `patches.fill_source`)")
    classes: list[TotalEffectClass] = Field(description="the top labels (at most the bundle's spatial top-k), best first")


class ImageResult(_Model):
    """Everything the runtime knows about one image (what `BundleRuntime.explain` returns)."""

    predicted: str
    top: list[LabelScore]
    explanations: list[ClassExplanation] | None = Field(
        default=None, description="per-term contributions of each top class (when detail was requested)"
    )
    top_features: list[FeatureContribution] | None = Field(
        default=None, description="top CLT features for the predicted class (when detail was requested)"
    )
    completeness_residual: float = Field(
        description="max over labels of |logit - sum of its term contributions| (0 up to float rounding)"
    )
    term_shares: list[float] = Field(description="|contribution| share of each term in the predicted logit, term_names order")
    embedding: list[float] | None = Field(default=None, description="unnormalised image embedding [D]")
    spatial: SpatialExplanation | None = Field(default=None, description="where in the image (when requested and the "
                                               "bundle has spatial maps)")
    total_effect: TotalEffectMap | None = Field(default=None, description="which patches the prediction needs, from "
                                                "edited copies of the image (when requested)")


class ClassifyResponse(_Model):
    """POST /classify: the top labels with probabilities."""

    predicted: str
    top: list[LabelScore]


class ExplainResponse(_Model):
    """POST /explain: top labels plus, for each of them, the per-term decomposition of its logit."""

    predicted: str
    top: list[LabelScore]
    term_names: list[str]
    explanations: list[ClassExplanation]
    top_features: list[FeatureContribution]
    completeness_residual: float
    term_shares: list[float]
    spatial: SpatialExplanation | None = Field(
        default=None, description="where in the image: patch maps per top class (null when the bundle has none or "
        "spatial=false)"
    )
    total_effect: TotalEffectMap | None = Field(
        default=None, description="which patches the prediction needs, measured on edited copies of the image (with "
        "total_effect=true; null otherwise)"
    )


class EmbedResponse(_Model):
    """POST /embed: the image embedding and the per-term contribution summary, for pipelines."""

    embedding: list[float]
    dim: int
    predicted: str
    term_names: list[str]
    term_shares: list[float]


class InfoResponse(_Model):
    """GET /info: what this server runs."""

    backbone: dict[str, Any]
    clt: dict[str, Any]
    mode: str
    labels: list[str]
    templates: list[str]
    term_names: list[str]
    top_k_features: int
    image_size: tuple[int, int]
    embed_dim: int
    variant: str
    variant_choice: VariantChoice | None = Field(default=None, description="how the variant was chosen: asked for, or "
                                                 "`auto` with each variant's gate figures and measured speed-up over fp32")
    provider: str
    versions: dict[str, str]
    limits: dict[str, int]
    batching: dict[str, int]
    auth: bool
    spatial: dict[str, Any] | None = Field(default=None, description="the bundle's spatial maps: top_k, grid, heads "
                                           "(null: none)")
    patches: dict[str, Any] | None = Field(default=None, description="how patches are deleted for the total-effect map: "
                                           "grid, fill, fill_source (null: the bundle states no patch grid)")
    intervene: dict[str, Any] | None = Field(default=None, description="POST /intervene: the intervention graph's file; its "
                                             "patch edits use `patches` (null: the bundle has no intervention graph)")


# ---------------------------------------------------------------------- POST /intervene (docs/intervene.md)
class FeatureEdit(_Model):
    """A CLT feature's activation a at the tokens the CLT replaces (CLS in `cls` mode, every token in
    `all` mode) becomes `scale` * a, or `set`; neither given: ablated (scale 0)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    layer: int = Field(ge=0, description="the feature's CLT layer")
    index: int = Field(ge=0, description="the feature's index in its layer")
    scale: float | None = Field(default=None, ge=-1e6, le=1e6, description="multiply the activation (0: ablate)")
    set: float | None = Field(default=None, ge=-1e6, le=1e6, description="replace the activation by this value")


class TermEdit(_Model):
    """Multiply a term's write into the residual stream (embed, attn.l, clt.s, bias); scale 0 removes it."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    term: str = Field(description="a term name of the bundle (see term_names), except error")
    scale: float = Field(default=0.0, ge=-1e6, le=1e6)


PatchRef = int | tuple[int, int]


class EditSet(_Model):
    """One edited run of the image: every edit here applies at once (docs/intervene.md). Patches are
    a row-major index or a [row, column] pair on the bundle's grid."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    name: str | None = Field(default=None, max_length=200, description="a caller's label for this edit set, echoed back")
    features: list[FeatureEdit] = Field(default_factory=list, max_length=256)
    terms: list[TermEdit] = Field(default_factory=list, max_length=256)
    term_tokens: Literal["cls", "all"] = Field(default="cls", description="term edits at the CLS token only, or at every token")
    delete_patches: list[PatchRef] = Field(default_factory=list, max_length=4096,
                                           description="patches whose pixels become the bundle's fill (patches.fill)")
    drop_keys: list[PatchRef] = Field(default_factory=list, max_length=4096,
                                      description="patches no token attends to, in every attention layer")


class LabelChange(_Model):
    """One label's logit before (unedited) and after the edits."""

    label: str
    before: float
    after: float
    change: float


class EditedResult(_Model):
    """One edit set's run: the edited model's result (logits, decomposition, top features) and its
    difference from the unedited run."""

    edit: EditSet
    result: ImageResult
    predicted_changed: bool = Field(description="the edited run predicts another label than the unedited one")
    logit_changes: list[LabelChange] = Field(description="the unedited run's top labels, before and after")
    term_changes: list[float] = Field(description="change of each term's contribution (term_names order) to the unedited "
                                      "run's predicted label")


class FeatureAblation(_Model):
    """A top feature of the unedited run: its direct contribution to the predicted logit next to the
    logit change when the feature is ablated (the downstream layers rerun): how linear the explanation is."""

    layer: int
    index: int
    activation: float
    contribution: float = Field(description="direct contribution to the predicted logit (the decomposition's)")
    ablated_change: float = Field(description="change of the predicted logit when this feature is ablated (the model rerun)")


class InterveneResponse(_Model):
    """POST /intervene: the unedited run and one result per edit set, in request order."""

    term_names: list[str]
    fill: list[float] = Field(description="the per-channel value (preprocessed units) deleted patches take")
    baseline: ImageResult
    edited: list[EditedResult]
    feature_ablations: list[FeatureAblation] | None = Field(
        default=None, description="with check_linearity: each top feature of the unedited run ablated alone")
