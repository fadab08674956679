"""`Explainer`: the plain Python API for pipelines (no HTTP), wrapping `BundleRuntime`.

    from serving import Explainer
    ex = Explainer("artifacts/reference/bundle")
    results = ex.explain(["shirt.png", pil_image, jpeg_bytes])   # list[ImageResult], as the service returns
    ex.heatmap("shirt.png").save("shirt-where.png")               # where in the image, as a PNG overlay
    records = ex.score(["shirt.png"])                             # flat dicts, as cltvit-score writes
    ex.reference_profile(images).save("reference.json")           # drift reference (serving.drift)
    ex.intervene("shirt.png", [{"features": [{"layer": 7, "index": 29}]}])   # what if (docs/intervene.md)

Images may be file paths, encoded bytes, PIL images or HxWx3 uint8 arrays. Records (the JSONL line
format of `cltvit-score` and `cltvit-stream`) are

    {"path": str | None, "error": str | None, "label": str, "top": [{"label": str, "probability": float}],
     "shares": {term: float}}

`shares` are `ImageResult.term_shares` (|contribution| / sum |contribution| of each term in the
predicted logit, serving.shares.term_shares); `top` entries also carry the raw `logit`;
`error` records (unreadable input) carry no other fields than `path` and `error`. With
`Explainer(spatial=True)` records also carry `spatial`: the predicted label's maps (`ClassMap` without
per-head maps, plus `grid` and `residual`; serving/spatial.py). With `Explainer(total_effect=True)` they
carry `total_effect`: the predicted label's total-effect map (`TotalEffectClass` plus `grid`, `method`,
`rows`, `fill`, `fill_source`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from .choice import AUTO
from .heatmap import overlay
from .images import ImageError, decode_image
from .jobs.drift import DEFAULT_WINDOW, DriftMonitor, DriftProfile
from .intervene import parse_edit_sets
from .results import check_top_k, image_result, score_record
from .runtime import BundleRuntime, LabelError, RawOutputs, SpatialUnavailable, TotalEffectUnavailable, validate_labels
from .schemas import EditSet, ImageResult, InterveneResponse
from .variant_bench import DEFAULT_BATCH_SIZES

ImageInput = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]
# Batch jobs see the same decoding limits as the HTTP service (decompression bombs, huge files).
MAX_FILE_BYTES = 64 * 1024 * 1024


def read_image(image: ImageInput, max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    """Decode one input to an RGB PIL image; raises ImageError (unreadable) or TypeError (bad type)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise TypeError(f"array images must be uint8 HxW, HxWx3 or HxWx4, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image), max_bytes=max_bytes)
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageError(f"{path}: file is {size} bytes, over the {max_bytes}-byte limit")
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
        return decode_image(data, max_bytes=max_bytes)
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image or a uint8 array")


class Explainer:
    """A bundle, a label set and a top-k: explain or score images in process.

    bundle: a bundle directory (docs/bundle.md) or an already built `BundleRuntime`.
    labels: custom class names (embedded once with the bundle's text graph); None = the bundle's.
    spatial: records (`score`, `assemble`) carry the predicted label's spatial maps; raises
    `SpatialUnavailable` when the bundle has none.
    total_effect: records carry the predicted label's total-effect map (P + 1 more model rows per image);
    raises `TotalEffectUnavailable` when the bundle states no patch grid.
    variant: 'auto' (default): the fastest variant that passes the bundle's accuracy gate, timed on this machine
    at the batch sizes `bench_batches` you will run (a few seconds at most; serving/choice.py), else fp32; or a
    variant of the bundle by name. `self.runtime.variant` is the one served, `self.runtime.variant_choice` why.
    """

    def __init__(
        self,
        bundle: str | Path | BundleRuntime,
        *,
        labels: Sequence[str] | None = None,
        top_k: int = 5,
        device: str = "auto",
        variant: str = AUTO,
        threads: int | None = None,
        spatial: bool = False,
        total_effect: bool = False,
        bench_batches: Sequence[int] = DEFAULT_BATCH_SIZES,
    ) -> None:
        self.runtime = bundle if isinstance(bundle, BundleRuntime) else BundleRuntime(bundle, device=device, variant=variant, threads=threads,
                                                                                      bench_batches=bench_batches)
        if spatial and self.runtime.spatial is None:
            raise SpatialUnavailable(self.runtime.spatial_unavailable_message())
        if total_effect and self.runtime.patches is None:
            raise TotalEffectUnavailable(self.runtime.total_effect_unavailable_message())
        self.spatial = spatial
        self.total_effect = total_effect
        if labels is not None:
            labels = validate_labels(labels)
            self.label_names = labels
            self.text_embeddings: np.ndarray | None = np.asarray(self.runtime.embed_labels(labels), dtype=np.float32)
        else:
            self.label_names = list(self.runtime.label_names)
            self.text_embeddings = None  # the bundle's labels.npy
        if top_k < 1:
            raise LabelError(f"top_k must be >= 1, got {top_k}")
        self.top_k = min(top_k, len(self.label_names))
        self.term_names: list[str] = list(self.runtime.term_names)

    # -- the service's result objects -------------------------------------------------------------
    def explain(self, images: Sequence[ImageInput], *, top_k: int | None = None, detail: bool = True,
                spatial: bool = True, heads: bool = False, total_effect: bool = False) -> list[ImageResult]:
        """`ImageResult`s (serving.schemas) for `images`, exactly as the HTTP service computes them.

        `spatial`: where in the image, per top label (when the bundle has spatial maps); `heads`: also
        per attention head for the predicted label (raises `SpatialUnavailable` without maps);
        `total_effect`: the total-effect map of the top labels, from P + 1 edited copies of each image run
        as one batch (raises `TotalEffectUnavailable` when the bundle states no patch grid)."""
        pil = [read_image(im) for im in images]
        labels = self.label_names if self.text_embeddings is not None else None
        return self.runtime.explain(pil, labels=labels, top_k=top_k or self.top_k, detail=detail, spatial=spatial, heads=heads,
                                    total_effect=total_effect)

    def heatmap(self, image: ImageInput, *, result: ImageResult | None = None, label: str | None = None,
                layer: int | None = None, alpha: float = 0.7, total_effect: bool = False) -> Image.Image:
        """The image at its own size with a spatial map laid over it (serving.heatmap.overlay): red
        patches raised `label`'s logit (default: the predicted label), blue ones lowered it, summed over
        the attention layers (or one `layer`); with `total_effect` the total-effect map instead (what each
        patch alone adds on the fill; no layers). Pass the image's `result` from `explain` to skip re-running it.

        Raises `SpatialUnavailable` (bundle without maps), `TotalEffectUnavailable` (no patch grid) or
        `LabelError` (label not among the labels with maps, bad layer, a layer with `total_effect`)."""
        pil = read_image(image)
        if total_effect:
            if layer is not None:
                raise LabelError("the total-effect map has no layers: leave layer out with total_effect")
            if self.runtime.patches is None:
                raise TotalEffectUnavailable(self.runtime.total_effect_unavailable_message())
        elif self.runtime.spatial is None:
            raise SpatialUnavailable(self.runtime.spatial_unavailable_message())
        if result is None:
            cap = self.runtime.spatial.top_k if self.runtime.spatial is not None else 1
            top = min(len(self.label_names), max(self.top_k, cap))  # every label with a map
            (result,) = self.explain([pil], top_k=top, detail=False, spatial=not total_effect, total_effect=total_effect)
        want = result.predicted if label is None else label
        if total_effect:
            if result.total_effect is None:
                raise TotalEffectUnavailable("this result has no total-effect map: explain with total_effect=True")
            te = {c.label: c for c in result.total_effect.classes}
            if want not in te:
                raise LabelError(f"label {want!r} has no total-effect map in this result (maps for: {', '.join(te)})")
            grid = np.asarray(te[want].total, np.float64).reshape(result.total_effect.grid)
            return overlay(pil, grid, self.runtime.preprocessor.view_box(*pil.size), alpha=alpha)
        if result.spatial is None:
            raise SpatialUnavailable("this result has no spatial maps: explain with spatial=True")
        maps = {c.label: c for c in result.spatial.classes}
        if want not in maps:
            raise LabelError(f"label {want!r} has no spatial map in this result (maps for: {', '.join(maps)})")
        cmap = maps[want]
        if layer is None:
            cells = cmap.total
        elif 0 <= layer < len(cmap.layers):
            cells = cmap.layers[layer]
        else:
            raise LabelError(f"layer {layer} is out of range: the model has {len(cmap.layers)} attention layers")
        grid = np.asarray(cells, np.float64).reshape(result.spatial.grid)
        return overlay(pil, grid, self.runtime.preprocessor.view_box(*pil.size), alpha=alpha)

    # -- what if (docs/intervene.md) --------------------------------------------------------------
    def intervene(self, image: ImageInput, edits: Sequence[EditSet | dict[str, Any]], *, top_k: int | None = None,
                  check_linearity: bool = False) -> InterveneResponse:
        """The image unedited and once per edit set (features, terms, patches; `EditSet`s or their dicts, at
        most `MAX_EDIT_SETS`), each run through the real model in one graph call: logits, decomposition,
        top features and the change from the unedited run; `check_linearity` adds each top feature's
        ablation next to its direct contribution. Raises `EditError` (naming the field) or
        `InterventionUnavailable` (bundle without intervene.onnx)."""
        space = self.runtime.edit_space()
        sets = parse_edit_sets([e.model_dump() if isinstance(e, EditSet) else e for e in edits], space)
        pixels = self.runtime.preprocess(read_image(image))
        text = self.runtime.default_text if self.text_embeddings is None else self.text_embeddings
        k = min(top_k or self.top_k, len(self.label_names))
        if k < 1:
            raise LabelError(f"top_k must be >= 1, got {top_k}")
        body = self.runtime.intervene_pixels(pixels, text, self.label_names, sets, k=k, check_linearity=check_linearity)
        return InterveneResponse.model_validate(body)

    # -- flat records for batch jobs and pipelines ------------------------------------------------
    def load(self, image: ImageInput) -> np.ndarray:
        """Decode and preprocess one image to `[3, H, W]` float32 (thread-safe; raises ImageError)."""
        return self.runtime.preprocess(read_image(image))

    def score_pixels(self, pixels: np.ndarray) -> list[dict[str, Any]]:
        """Records (without `path`) for a preprocessed batch `[B, 3, H, W]`."""
        if len(pixels) == 0:
            return []
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        raw = self.runtime.run(pixels, self.text_embeddings)
        return self.records_from_outputs(raw, pixels if self.total_effect else None)

    def records_from_outputs(self, raw: RawOutputs, pixels: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Records from the graph's outputs: `serving.results.score_record` of each image's `image_result`
        (the service's own result code), with the predicted label's maps when `spatial` and its total-effect
        map when `total_effect` (measured on `pixels` [B, 3, H, W], the batch `raw` came from)."""
        names = self.label_names
        k = check_top_k(self.top_k, len(names))
        maps = self.runtime.spatial_maps(raw, names, k) if self.spatial and raw.has_spatial else None
        te = None
        if self.total_effect:
            if pixels is None:
                raise ValueError("total_effect records need the preprocessed pixels the outputs came from")
            te = self.runtime.total_effect(pixels, self.text_embeddings, names, raw.logits, 1)
        return [score_record(image_result(raw, b, names, self.term_names, k=k, detail=False, include_embedding=False),
                             self.term_names, maps[b] if maps is not None else None, with_spatial=self.spatial,
                             total_effect=te[b] if te is not None else None)
                for b in range(len(raw))]

    def score(self, images: Sequence[ImageInput], paths: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """One record per image (unreadable ones get `error`); `paths` fill the records' `path`."""
        paths = list(paths) if paths is not None else [str(im) if isinstance(im, (str, Path)) else None for im in images]
        if len(paths) != len(images):
            raise ValueError(f"got {len(images)} images but {len(paths)} paths")
        loaded: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for im in images:
            try:
                loaded.append(self.load(im))
                errors.append(None)
            except (ImageError, TypeError) as e:
                loaded.append(None)
                errors.append(str(e))
        return self.assemble(paths, loaded, errors)

    def assemble(self, paths: Sequence[str | None], loaded: Sequence[np.ndarray | None], errors: Sequence[str | None]) -> list[dict[str, Any]]:
        """Run the loaded images as one batch and return records in input order, error records in place."""
        ok = [i for i, x in enumerate(loaded) if x is not None]
        scored = self.score_pixels(np.stack([loaded[i] for i in ok])) if ok else []
        records: list[dict[str, Any]] = [{"path": p, "error": e} for p, e in zip(paths, errors)]
        for i, rec in zip(ok, scored):
            rec["path"] = paths[i]
            records[i] = rec
        return records

    # -- drift ------------------------------------------------------------------------------------
    def reference_profile(self, images: Sequence[ImageInput], batch_size: int = 32) -> DriftProfile:
        """Drift reference profile of `images` (per-term share mean and std, the class mix over this
        explainer's labels, and which bundle made it); unreadable ones are skipped."""
        rows, predicted = [], []
        for i in range(0, len(images), batch_size):
            for rec in self.score(images[i : i + batch_size], paths=[None] * len(images[i : i + batch_size])):
                if rec["error"] is None:
                    rows.append([rec["shares"][t] for t in self.term_names])
                    predicted.append(rec["label"])
        meta = {"labels": self.label_names, "bundle": self.runtime.manifest.files.get("model.onnx")}
        return DriftProfile.from_shares(np.array(rows), self.term_names, meta=meta, predicted=predicted,
                                        classes=self.label_names)

    def monitor(self, reference: DriftProfile | str | Path, window: int = DEFAULT_WINDOW) -> DriftMonitor:
        """A `DriftMonitor` for this bundle's terms against `reference` (a profile or its JSON path)."""
        ref = reference if isinstance(reference, DriftProfile) else DriftProfile.load(reference)
        ref.check_terms(self.term_names)
        return DriftMonitor(ref, window=window)
