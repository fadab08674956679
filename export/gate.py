"""Measure the accuracy gate of a bundle's variants (bundle/gate.py) on held-out images.

Every variant the bundle lists (whatever `export/quantize.py` wrote: int8, int8-clt, fp16 or a later one)
and fp32 itself run with ONNX Runtime (CPU) on the same preprocessed images against the bundle's default
label embeddings; `bundle.gate.GateTally` turns each variant's outputs and fp32's logits into its figures.

  images = GateImages.from_dataset(ImageFolder("held-out/"), backbone.preprocess, label_names, limit=2000)
  gate = measure_gate(bundle_dir, manifest_variants, files, images)      # -> bundle.gate.GateSpec

`export_bundle(..., gate_images=images)` calls it before writing `bundle.json` (`cltvit-export --eval-data
DIR --eval-images N`; the reference build and `cltvit-reference export` pass Fashion-MNIST test images);
`attach_gate(bundle_dir, images)` measures an existing bundle's variants and writes the block into it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from bundle import MANIFEST, Manifest, load_bundle
from bundle.atomic import write_text_atomic
from bundle.gate import GateSpec, GateTally

# images per ONNX Runtime call while measuring: the service's default largest batch (dynamic int8's activation
# scale is per call, so the figures depend on it; bundle.json states it)
GATE_BATCH = 16
DEFAULT_GATE_IMAGES = 2000  # held-out images measured unless told otherwise (cltvit-export --eval-images)


class GateError(ValueError):
    """The gate cannot be measured (no images, shapes that do not fit the bundle)."""


def gate_indices(total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Which of `total` images the gate measures: all of them when `n` is None or >= total, else `n` drawn
    without replacement with numpy's default_rng(`seed`), in increasing order (an image folder is sorted by
    class, so its first n would be one class)."""
    if total < 1:
        raise GateError("the gate data has no images")
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise GateError(f"the gate needs at least 1 image, got {n}")
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


@dataclass(frozen=True)
class GateImages:
    """Held-out images for the gate: `pixels` float32 [N, 3, H, W], preprocessed as the bundle states; `labels`
    int64 [N] indices into the bundle's labels, or None when the data's classes are not the bundle's (then no
    accuracy is stated); `data` says what they are (written to bundle.json)."""

    pixels: np.ndarray
    labels: np.ndarray | None
    data: str

    @classmethod
    def from_dataset(cls, dataset: Any, preprocess: Callable[[Any], torch.Tensor], label_names: Sequence[str],
                     limit: int | None = DEFAULT_GATE_IMAGES, what: str | None = None) -> "GateImages":
        """`limit` images (`gate_indices`) of a labelled dataset (`training.data`: items (PIL image, class index),
        `class_names`) through `preprocess` (the backbone's open_clip eval transform)."""
        idx = gate_indices(len(dataset), limit)
        items = [dataset[int(i)] for i in idx]
        pixels = torch.stack([preprocess(im) for im, _ in items]).numpy().astype(np.float32)
        labels = bundle_labels(list(dataset.class_names), [c for _, c in items], label_names)
        desc = what or f"{getattr(dataset, 'name', 'dataset')} {getattr(getattr(dataset, 'root', None), 'name', '')}".strip()
        sample = "all" if len(idx) == len(dataset) else f"{len(idx)} drawn with numpy default_rng(0) from"
        return cls(pixels, labels, f"{desc}: {sample} {len(dataset)} images")


def bundle_labels(class_names: Sequence[str], classes: Sequence[int], label_names: Sequence[str]) -> np.ndarray | None:
    """The images' class indices mapped onto the bundle's label order, or None when some class of the data is
    not among the bundle's labels (case-insensitive names)."""
    where = {n.strip().lower(): i for i, n in enumerate(label_names)}
    mapped = [where.get(class_names[c].strip().lower()) for c in classes]
    if any(m is None for m in mapped):
        return None
    return np.asarray(mapped, dtype=np.int64)


def _session(path: Path, variant: str, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting beside the exporter's other work
    if threads is not None:
        opts.intra_op_num_threads = threads
    # ORT 1.31's NCHWc layout pass crashes on fp16 graphs on the CPU provider (serving/runtime.py skips it too)
    disabled = ["NchwcTransformer"] if variant == "fp16" else None
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def measure_gate(root: str | Path, variants: Mapping[str, str], files: Mapping[str, str], text: np.ndarray,
                 images: GateImages, *, batch_size: int = GATE_BATCH, threads: int | None = None) -> GateSpec:
    """The `gate` block of a bundle in `root` whose `variants` map name -> graph file (fp32 -> model.onnx) and
    `files` name -> sha256: every variant and fp32 itself run on `images` against `text` [C, D] (the bundle's
    default label embeddings), on the CPU."""
    root = Path(root)
    px = np.ascontiguousarray(images.pixels, dtype=np.float32)
    if px.ndim != 4 or px.shape[1] != 3 or len(px) < 1:
        raise GateError(f"gate pixels must be float32 [N>=1, 3, H, W], got {list(px.shape)}")
    if images.labels is not None and len(images.labels) != len(px):
        raise GateError(f"{len(images.labels)} labels for {len(px)} gate images")
    text = np.ascontiguousarray(text, dtype=np.float32)
    sessions = {v: _session(root / f, v, threads) for v, f in variants.items()}
    tallies = {v: GateTally() for v in variants}
    for i in range(0, len(px), batch_size):
        feeds = {"pixels": px[i : i + batch_size], "text_embeddings": text}
        outs = {v: s.run(["logits", "contributions"], feeds) for v, s in sessions.items()}
        ref = outs["fp32"][0]
        y = None if images.labels is None else images.labels[i : i + batch_size]
        for v, (logits, contrib) in outs.items():
            tallies[v].update(ref, logits, contrib, y)
    return GateSpec(data=images.data, batch_size=batch_size, variants={v: t.figures(files[variants[v]]) for v, t in tallies.items()})


def attach_gate(bundle_dir: str | Path, images: GateImages, *, threads: int | None = None) -> GateSpec:
    """Measure the gate of an existing bundle's variants (as they are on disk) on `images` and write it into its
    `bundle.json` (replacing any earlier gate; one atomic write). For bundles exported without `--eval-data`,
    or whose variants were rewritten. Returns the gate written."""
    root = Path(bundle_dir).resolve()
    m, paths = load_bundle(root)
    spec = measure_gate(root, m.variants, m.files, np.load(paths.labels, allow_pickle=False), images, threads=threads)
    raw = json.loads((root / MANIFEST).read_text())
    raw["gate"] = spec.model_dump(mode="json")
    Manifest.model_validate(raw)
    write_text_atomic(root / MANIFEST, json.dumps(raw, indent=2))
    return spec
