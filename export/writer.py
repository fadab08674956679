"""Write a serving bundle directory (docs/bundle.md) from a backbone and a CLT."""
from __future__ import annotations

import importlib.metadata as md
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from bundle import FORMAT_VERSION, INTERVENE_FILE, INTERVENE_MODES, MANIFEST, MODES, Manifest, file_sha256, load_bundle, term_names
from bundle.atomic import staged_directory
from bundle.manifest import PREPROCESS_MEAN_FILL
from training.model.backbone import Backbone
from training.model.vit import UnsupportedModel, blocks, check_spatial_supported

from .fused import DEFAULT_OPSET, DEFAULT_SPATIAL_TOP_K, export_explainer, export_intervener, external_files
from .gate import GateImages, measure_gate
from .quantize import REDUCED, make_variant
from .text import VOCAB_FILE, context_length, copy_vocab, export_text

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
LABELS_FILE = "labels.npy"


class ExportError(ValueError):
    """Bad arguments to the exporter (wrong mode, CLT not fitting the backbone, bad labels...)."""


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "unknown"


def export_versions() -> dict[str, str]:

    return {"cltvit": _version("cltvit"), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def preprocess_spec(visual: nn.Module) -> dict[str, Any]:
    """The bundle's `preprocess` block from open_clip's preprocess config of the vision tower."""
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    resize = cfg.get("resize_mode", "shortest")
    if resize not in ("shortest", "longest", "squash"):
        raise ExportError(f"unsupported resize mode {resize!r} in the model's preprocess config")
    return {"image_size": list(size), "mean": list(cfg.get("mean", OPENAI_DATASET_MEAN)),
            "std": list(cfg.get("std", OPENAI_DATASET_STD)), "resize": resize,
            "interpolation": cfg.get("interpolation", "bicubic"), "crop": "center"}


def spatial_spec(backbone: Backbone, top_k: int) -> dict[str, Any]:
    """The manifest's `spatial` block: `top_k` classes, the patch grid (rows, columns), heads per layer.
    Raises ExportError when the backbone's attention has a structure the spatial maps do not cover."""
    try:
        check_spatial_supported(backbone.visual)
    except UnsupportedModel as exc:
        raise ExportError(f"spatial maps are not supported for {backbone.spec.model}: {exc}; export with spatial_top_k=0 "
                          f"(--spatial-top-k 0)") from None
    grid = tuple(int(g) for g in backbone.visual.grid_size)
    heads = {int(blk.attn.num_heads) for blk in blocks(backbone.visual)}
    if len(heads) != 1:
        raise ExportError(f"spatial maps need the same number of heads in every layer, got {sorted(heads)}")
    return {"top_k": int(top_k), "grid": list(grid), "heads": heads.pop()}


def patch_spec(backbone: Backbone, fill: Sequence[float] | None, fill_source: str | None) -> dict[str, Any]:
    """The manifest's `patches` block (docs/bundle.md): the patch grid and the fill of a deleted patch."""
    grid = [int(g) for g in backbone.visual.grid_size]
    if fill is None:
        return {"grid": grid, "fill": [0.0, 0.0, 0.0], "fill_source": fill_source or PREPROCESS_MEAN_FILL}
    values = [float(v) for v in fill]
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ExportError(f"fill must be 3 finite values (one per channel, preprocessed units), got {list(fill)}")
    if not fill_source:
        raise ExportError("fill_source must say what the fill is (e.g. 'dataset mean of ...')")
    return {"grid": grid, "fill": values, "fill_source": fill_source}


def check_labels(labels: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[str]]:
    names = [s.strip() for s in labels]
    if not names or any(not s for s in names):
        raise ExportError("labels must be a non-empty list of non-empty class names")
    dup = sorted({s for s in names if names.count(s) > 1})
    if dup:
        raise ExportError(f"duplicate class names: {dup}")
    temps = list(templates)
    if not temps:
        raise ExportError("templates must not be empty")
    bad = [t for t in temps if "{}" not in t]
    if bad:
        raise ExportError(f"every template needs a '{{}}' slot for the class name; bad: {bad}")
    return names, temps


def export_bundle(
    backbone: Backbone,
    clt: nn.Module,
    mode: str,
    labels: Sequence[str],
    templates: Sequence[str] | None,
    out_dir: str | Path,
    *,
    top_k_features: int = 16,
    spatial_top_k: int = DEFAULT_SPATIAL_TOP_K,
    variants: Sequence[str] = (),
    checkpoint: str | None = None,
    clt_sha256: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    intervene: bool | None = None,
    fill: Sequence[float] | None = None,
    fill_source: str | None = None,
    gate_images: GateImages | None = None,
) -> Path:
    """Export `model.onnx` (+ reduced-precision `variants`: "int8", "int8-clt", "fp16"), `text.onnx`, `labels.npy`,
    the BPE vocabulary and `bundle.json` into `out_dir` (written in a temporary sibling, then renamed).

    `labels`: class names; `templates`: prompt templates with a `{}` slot (default "a photo of a {}.").
    `spatial_top_k`: classes per image with spatial maps (where in the image, docs/bundle.md); 0 leaves
    the spatial outputs out. `intervene`: also write the intervention graph `intervene.onnx` (modes cls
    and all; None: exactly in those modes; docs/intervene.md). `fill`: what a deleted patch's pixels take,
    per channel in preprocessed units, in the manifest's `patches` block that both the total-effect map and
    the intervention graph's patch deletions read (the reference build passes the dataset mean), with
    `fill_source` saying what it is; None writes 0, the preprocessing mean. `gate_images`: held-out images
    (export/gate.py) on which every variant is measured against fp32; their figures go to the manifest's `gate`
    block (bundle/gate.py), without which `--variant auto` never chooses a reduced-precision variant. Returns `out_dir`.
    """

    if mode not in MODES:
        raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = sorted(set(variants) - set(REDUCED))
    if unknown:
        raise ExportError(f"unknown variant(s) {unknown}; choose from {', '.join(REDUCED)}")
    names, temps = check_labels(labels, templates or DEFAULT_TEMPLATES)
    if spatial_top_k < 0:
        raise ExportError(f"spatial_top_k must be >= 0 (0: no spatial maps), got {spatial_top_k}")
    spatial = spatial_spec(backbone, spatial_top_k) if spatial_top_k > 0 else None
    patches = patch_spec(backbone, fill, fill_source)
    if intervene is None:
        intervene = mode in INTERVENE_MODES
    if intervene and mode not in INTERVENE_MODES:
        raise ExportError(f"an intervention graph needs mode {' or '.join(INTERVENE_MODES)}, got {mode!r}; export with intervene=False "
                          f"(--no-intervene)")
    if intervene:
        try:
            check_spatial_supported(backbone.visual)  # patch-key drops need the written-out attention
        except UnsupportedModel as exc:
            raise ExportError(f"interventions are not supported for {backbone.spec.model}: {exc}; export with intervene=False") from None
    cfg = clt.cfg
    if (cfg.n_layers, cfg.d_model) != (backbone.n_layers, backbone.d_model):
        raise ExportError(f"CLT (L={cfg.n_layers}, d={cfg.d_model}) does not fit backbone {backbone.spec.model} "
                          f"(L={backbone.n_layers}, d={backbone.d_model})")
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out) as tmp:
        clt = clt.to("cpu").eval()
        visual = backbone.visual
        model_path = export_explainer(visual, clt, tmp / "model.onnx", logit_scale=backbone.logit_scale,
                                      embed_dim=backbone.embed_dim, mode=mode, top_k_features=top_k_features,
                                      spatial_top_k=spatial_top_k, opset=opset)
        if intervene:
            export_intervener(visual, clt, tmp / INTERVENE_FILE, logit_scale=backbone.logit_scale, embed_dim=backbone.embed_dim,
                              mode=mode, top_k_features=top_k_features, opset=opset)
        export_text(backbone.model, backbone.tokenizer, tmp / "text.onnx", opset=opset)
        copy_vocab(tmp)
        emb = backbone.class_embeddings(names, temps).float().cpu().numpy().astype(np.float32)
        np.save(tmp / LABELS_FILE, emb)
        variant_files = {"fp32": "model.onnx"}
        for v in variants:
            variant_files[v] = make_variant(model_path, v, tmp / f"model.{v}.onnx", n_layers=clt.cfg.n_layers).name
        files = {}
        for name in [*variant_files.values(), *([INTERVENE_FILE] if intervene else []), "text.onnx", LABELS_FILE, VOCAB_FILE]:
            files[name] = file_sha256(tmp / name)
            for ext in external_files(tmp / name) if name.endswith(".onnx") else []:
                files[ext] = file_sha256(tmp / ext)
        for f in tmp.iterdir():  # exporter leftovers nothing refers to (torch's _Constant_*_attr__value files)
            if f.name not in files:
                f.unlink()
        gate = None
        if gate_images is not None:
            size = list(preprocess_spec(visual)["image_size"])
            if list(gate_images.pixels.shape[2:]) != size:
                raise ExportError(f"gate images are {list(gate_images.pixels.shape[2:])} pixels, the model takes {size}")
            # as many ONNX Runtime threads as torch has here (the reference build and the tests run one)
            gate = measure_gate(tmp, variant_files, files, emb, gate_images, threads=torch.get_num_threads()).model_dump(mode="json")
        manifest = {
            "format_version": FORMAT_VERSION,
            "backbone": backbone.identity(),
            "clt": {"config": cfg.to_dict(), "sha256": clt_sha256, "checkpoint": checkpoint},
            "mode": mode,
            "term_names": term_names(cfg.n_layers),
            "top_k_features": min(int(top_k_features), cfg.n_layers * cfg.inference_k),
            "logit_scale": backbone.logit_scale,
            "preprocess": preprocess_spec(visual),
            "tokenizer": {"type": "clip_bpe", "vocab_file": VOCAB_FILE, "context_length": context_length(backbone.model, backbone.tokenizer)},
            "labels": {"names": names, "templates": temps, "embeddings_file": LABELS_FILE},
            "variants": variant_files,
            "opset": opset,
            "versions": export_versions(),
            "files": files,
            "spatial": spatial,
            "patches": patches,
        }
        if gate is not None:
            manifest["gate"] = gate
        if intervene:
            manifest["intervene"] = {"file": INTERVENE_FILE}  # grid and fill: the `patches` block
        Manifest.model_validate(manifest)  # fail here, not in the server
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        load_bundle(tmp)
    return out
