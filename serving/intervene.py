"""What if: run one image with edit sets through the bundle's intervention graph (docs/intervene.md).

    space = EditSpace.of(manifest)                      # what may be edited in this bundle
    sets = parse_edit_sets(raw_json_list, space)        # pydantic + range checks; EditError names the field
    answer = intervene(session, space, fill, pixels, text, names, sets, k=5)   # InterveneResponse fields (dicts)
    # the same through a runtime: BundleRuntime.intervene_pixels(pixels, text, names, sets, k=5)

One graph call runs the unedited row and every edit set (B = 1 + n rows of the same image); the
unedited row is computed once and every edited row's differences are taken against it. In the HTTP
service an /intervene request is one such call of its own in the worker's batcher thread (it does not
share a batch with other requests). With
`check_linearity` a second call ablates each of the unedited row's top features alone.

Edits become dense per-row arrays (`edit_arrays`, shapes in docs/bundle.md): feature edits padded to
the largest count in the request (layer -1), term scales [B, T], patch flags [B, P].
Numpy only (no torch); the graph is `intervene.onnx` (export/fused.py `export_intervener`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pydantic import TypeAdapter, ValidationError

from bundle import EDIT_INPUTS, INTERVENE_OUTPUTS

from .results import RawOutputs, image_result
from .schemas import EditSet

MAX_EDIT_SETS = 32  # rows per request besides the unedited one (a 16-image /explain batch is the cost yardstick)
NOT_EDITABLE = ("error",)  # 0 in the modes with an intervention graph: scaling it changes nothing


class EditError(ValueError):
    """An edit set is unusable for this bundle; `field` names the offending field (e.g. edits[1].features[0].layer)."""

    def __init__(self, message: str, field: str = "edits") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, f"{field}: {message}"


class InterventionUnavailable(ValueError):
    """The bundle has no intervention graph."""


@dataclass(frozen=True)
class EditSpace:
    """What a bundle lets an edit name: L CLT layers of F features, its term names, the patch grid."""

    n_layers: int
    n_features: int
    term_names: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @staticmethod
    def of(manifest: Any) -> "EditSpace":
        """From a bundle's `Manifest` with an `intervene` block; the grid is its one patch spec
        (`Manifest.effective_patches()`, shared with the total-effect map)."""
        if manifest.intervene is None:
            raise InterventionUnavailable("the bundle has no intervention graph")
        g = manifest.effective_patches().grid
        return EditSpace(int(manifest.backbone.n_layers), int(manifest.clt.config["n_features"]), tuple(manifest.term_names),
                         (int(g[0]), int(g[1])))


_SETS = TypeAdapter(list[EditSet])


def parse_edit_sets(raw: Any, space: EditSpace, max_sets: int = MAX_EDIT_SETS) -> list[EditSet]:
    """Validate a JSON list of edit sets (pydantic, then against `space`); raises `EditError` naming the field."""
    if not isinstance(raw, list):
        raise EditError(f"must be a JSON list of edit sets, got a JSON {type(raw).__name__}")
    if not raw:
        raise EditError("is empty: give at least one edit set")
    if len(raw) > max_sets:
        raise EditError(f"too many edit sets: {len(raw)} given, at most {max_sets} per request")
    try:
        sets = _SETS.validate_python(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = "edits" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"] if p not in ("int", "tuple[int,int]"))
        raise EditError(err["msg"], where) from None
    for i, s in enumerate(sets):
        check_edit_set(s, space, f"edits[{i}]")
    return sets


def check_edit_set(s: EditSet, space: EditSpace, where: str = "edits[0]") -> None:
    """Range checks of one validated edit set against `space`; raises `EditError` naming the field."""
    seen: dict[tuple[int, int], int] = {}
    for j, f in enumerate(s.features):
        at = f"{where}.features[{j}]"
        if f.layer >= space.n_layers:
            raise EditError(f"layer {f.layer} is out of range: the CLT has layers 0..{space.n_layers - 1}", f"{at}.layer")
        if f.index >= space.n_features:
            raise EditError(f"index {f.index} is out of range: each CLT layer has features 0..{space.n_features - 1}", f"{at}.index")
        if f.scale is not None and f.set is not None:
            raise EditError("give scale or set, not both", at)
        if (f.layer, f.index) in seen:
            raise EditError(f"feature {f.layer}:{f.index} is edited twice in this set (also features[{seen[f.layer, f.index]}])", at)
        seen[f.layer, f.index] = j
    terms: dict[str, int] = {}
    for j, t in enumerate(s.terms):
        at = f"{where}.terms[{j}].term"
        if t.term not in space.term_names or t.term in NOT_EDITABLE:
            editable = [n for n in space.term_names if n not in NOT_EDITABLE]
            raise EditError(f"unknown term {t.term!r}; editable terms: {', '.join(editable)}", at)
        if t.term in terms:
            raise EditError(f"term {t.term!r} is edited twice in this set", at)
        terms[t.term] = j
    for key in ("delete_patches", "drop_keys"):
        patch_indices(getattr(s, key), space, f"{where}.{key}")


def patch_indices(refs: Sequence[int | tuple[int, int]], space: EditSpace, where: str) -> list[int]:
    """Row-major patch indices of `refs` (index or (row, column)); raises `EditError` off the grid or on repeats."""
    rows, cols = space.grid
    out: list[int] = []
    for j, ref in enumerate(refs):
        if isinstance(ref, tuple):
            r, c = ref
            if not (0 <= r < rows and 0 <= c < cols):
                raise EditError(f"patch ({r}, {c}) is off the {rows}x{cols} grid", f"{where}[{j}]")
            p = r * cols + c
        else:
            p = int(ref)
            if not 0 <= p < rows * cols:
                raise EditError(f"patch {p} is off the grid: patches are 0..{rows * cols - 1} ({rows}x{cols}, row-major)", f"{where}[{j}]")
        if p in out:
            raise EditError(f"patch {p} is listed twice", f"{where}[{j}]")
        out.append(p)
    return out


def edit_arrays(sets: Sequence[EditSet | None], space: EditSpace, fill: Sequence[float]) -> dict[str, np.ndarray]:
    """The graph's edit inputs (`bundle.EDIT_INPUTS`) for one row per entry of `sets` (None: no edit).
    Feature edits are padded to the largest count (at least 1) with layer -1."""
    B, T, P = len(sets), len(space.term_names), space.n_patches
    E = max([1, *(len(s.features) for s in sets if s is not None)])
    a = {
        "feature_layer": np.full((B, E), -1, np.int64), "feature_index": np.zeros((B, E), np.int64),
        "feature_scale": np.ones((B, E), np.float32), "feature_shift": np.zeros((B, E), np.float32),
        "term_scale": np.ones((B, T), np.float32), "term_all_tokens": np.zeros(B, np.bool_),
        "patch_delete": np.zeros((B, P), np.bool_), "patch_key_drop": np.zeros((B, P), np.bool_),
        "fill": np.asarray(fill, np.float32).reshape(3),
    }
    names = list(space.term_names)
    for b, s in enumerate(sets):
        if s is None:
            continue
        for j, f in enumerate(s.features):
            a["feature_layer"][b, j], a["feature_index"][b, j] = f.layer, f.index
            if f.set is not None:
                a["feature_scale"][b, j], a["feature_shift"][b, j] = 0.0, f.set
            else:
                a["feature_scale"][b, j] = 0.0 if f.scale is None else f.scale
        for t in s.terms:
            a["term_scale"][b, names.index(t.term)] = t.scale
        a["term_all_tokens"][b] = s.term_tokens == "all"
        a["patch_delete"][b, patch_indices(s.delete_patches, space, "delete_patches")] = True
        a["patch_key_drop"][b, patch_indices(s.drop_keys, space, "drop_keys")] = True
    assert tuple(a) == EDIT_INPUTS
    return a


def run_rows(session: Any, pixels: np.ndarray, text: np.ndarray, edits: dict[str, np.ndarray]) -> RawOutputs:
    """One call of the intervention graph: pixels float32 [3, H, W] (one image, repeated per row) or [B, 3, H, W]."""
    B = len(edits["term_scale"])
    px = np.ascontiguousarray(np.broadcast_to(pixels, (B, *pixels.shape[-3:])), dtype=np.float32)
    outs = session.run(list(INTERVENE_OUTPUTS), {"pixels": px, "text_embeddings": text, **edits})
    return RawOutputs(**{n: np.asarray(o) for n, o in zip(INTERVENE_OUTPUTS, outs)})


def intervene(
    session: Any,
    space: EditSpace,
    fill: Sequence[float],
    pixels: np.ndarray,
    text: np.ndarray,
    names: Sequence[str],
    sets: Sequence[EditSet],
    *,
    k: int,
    check_linearity: bool = False,
    feature_label: Any = None,
) -> dict[str, Any]:
    """The fields of `InterveneResponse` (plain dicts) for one preprocessed image [3, H, W] and its edit
    sets, against text [C, D] with label `names`; `k` labels per result."""
    raw = run_rows(session, pixels, text, edit_arrays([None, *sets], space, fill))
    term_names = list(space.term_names)

    def result(b: int, source: RawOutputs = raw) -> dict[str, Any]:
        return {**image_result(source, b, names, term_names, k=k, detail=True, include_embedding=False,
                               feature_label=feature_label), "spatial": None}

    base = result(0)
    order = np.argsort(-raw.logits[0].astype(np.float64), kind="stable")[:k]
    pred = int(order[0])
    edited = []
    for b, s in enumerate(sets, start=1):
        before, after = raw.logits[0].astype(np.float64), raw.logits[b].astype(np.float64)
        changes = [{"label": names[c], "before": float(before[c]), "after": float(after[c]), "change": float(after[c] - before[c])}
                   for c in order.tolist()]
        dterms = raw.contributions[b, :, pred].astype(np.float64) - raw.contributions[0, :, pred].astype(np.float64)
        r = result(b)
        edited.append({"edit": s.model_dump(mode="json"), "result": r, "predicted_changed": r["predicted"] != base["predicted"],
                       "logit_changes": changes, "term_changes": dterms.tolist()})
    ablations = None
    if check_linearity:
        ablations = feature_ablations(session, space, fill, pixels, text, raw, pred)
    return {"term_names": term_names, "fill": [float(v) for v in fill], "baseline": base, "edited": edited,
            "feature_ablations": ablations}


def feature_ablations(session: Any, space: EditSpace, fill: Sequence[float], pixels: np.ndarray, text: np.ndarray,
                      raw: RawOutputs, pred: int) -> list[dict[str, Any]]:
    """Each top feature of the unedited row (row 0 of `raw`) ablated alone, in one call: its direct
    contribution to the predicted logit next to the logit change the rerun model shows."""
    layers, indices = raw.top_feature_layer[0].tolist(), raw.top_feature_index[0].tolist()
    acts, contribs = raw.top_feature_activation[0].tolist(), raw.top_feature_contribution[0].tolist()
    keep = [j for j, a in enumerate(acts) if a != 0.0]  # padding entries of a sparse code (activation 0) ablate nothing
    if not keep:
        return []
    sets = [EditSet.model_validate({"features": [{"layer": layers[j], "index": indices[j], "scale": 0.0}]}) for j in keep]
    out = run_rows(session, pixels, text, edit_arrays(sets, space, fill))
    base = float(raw.logits[0, pred])
    return [{"layer": layers[j], "index": indices[j], "activation": acts[j], "contribution": contribs[j],
             "ablated_change": float(out.logits[r, pred]) - base} for r, j in enumerate(keep)]
