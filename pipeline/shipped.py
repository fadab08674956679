"""The reference model's trained weights, shipped with the project, and the bundle exported from them.

Training the reference model takes ~18 minutes on a 2-core CPU; exporting a bundle from trained
weights takes seconds. So the project ships the weights (`pipeline/reference_weights/`, float16,
~12 MB) and `make serve` exports the bundle from them on first start:

- `clip.safetensors`: the reference CLIP's open_clip state dict (`cltvit-ref`), float16.
- `clt/clt.safetensors` + `clt/clt.json`: the CLT checkpoint (float16 tensors; loaded into float32).
- `weights.json`: sha256 of every file, what made them (build command, config, machine), and the
  figures measured on exactly these float16 weights (zero-shot top-1 and replacement accuracy on
  the 10,000 Fashion-MNIST test images, fidelity), next to the float32 build's, so that float16's
  cost is on record. `report.md` is the same as a table.
- `atlas/`: the feature atlas of exactly these weights over the 60,000 training images (docs/atlas.md):
  `atlas.json`, `features.npz` and `image_refs.npz`, the training-set indices of its top images
  (~1.8 MB in all). Measuring it takes 1.5-3 minutes on a 2-core CPU, so it ships; the thumbnails are
  rebuilt from those indices at export (Debian's dataset-fashion-mnist), byte for byte.

`ship(build_dir)` makes that folder from a finished `cltvit-reference build`; `ship_atlas()` (re)measures
the atlas of the shipped weights; `export_shipped(out)` writes the serving bundle, atlas included;
`measure(backbone, clt)` re-measures what `weights.json` reports (the test suite checks the shipped
weights reproduce it). The weights change only when training does; bundles are never committed (a
graph change would add a binary to the history each time).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from bundle import file_sha256
from bundle.atomic import staged_directory, write_text_atomic
from bundle.provenance import machine_info
from export.gate import DEFAULT_GATE_IMAGES
from export.atlas import REF_ARRAYS, AtlasConfig, TensorSource, attach_atlas, build_atlas, images_from_refs
from export.writer import export_bundle
from training.clip import preprocess_stats, tensorise
from training.data import DatasetError, FashionMNIST
from training.evaluation.metrics import measure_transcoder
from training.model.backbone import Backbone, load_backbone
from training.model.checkpoint import load_checkpoint, save_checkpoint
from training.model.clt import CrossLayerTranscoder

from .reference import REF_MODEL, BuildError, dataset_fill, fashion_gate_images, load_fashion_tensors

WEIGHTS_DIR = Path(__file__).parent / "reference_weights"
CLIP_FILE = "clip.safetensors"
CLT_DIR = "clt"
MANIFEST = "weights.json"
FILES = (CLIP_FILE, f"{CLT_DIR}/clt.safetensors", f"{CLT_DIR}/clt.json")
ATLAS_DIR = "atlas"
ATLAS_FILES = (f"{ATLAS_DIR}/atlas.json", f"{ATLAS_DIR}/features.npz", f"{ATLAS_DIR}/image_refs.npz")
EXPORT_MODE = "cls"
EXPORT_VARIANTS: tuple[str, ...] = ("int8", "int8-dec")
FIDELITY_IMAGES = 1000


def read_manifest(root: str | Path = WEIGHTS_DIR) -> dict[str, Any]:
    """`weights.json` of a shipped-weights folder, with every listed file's sha256 checked."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BuildError(f"{root} holds no shipped reference weights ({MANIFEST} missing); "
                         f"train them with `make reference` (cltvit-reference build), then `cltvit-reference ship`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BuildError(f"{path} is not valid JSON: {exc}") from None
    problems = []
    for name, digest in manifest.get("files", {}).items():
        p = root / name
        if not p.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing")
        elif file_sha256(p) != digest:
            problems.append(f"{name}: sha256 does not match {MANIFEST} (corrupt, or a Git LFS pointer instead of the file)")
    missing = sorted(set(FILES) - set(manifest.get("files", {})))
    problems += [f"{name}: not listed in {MANIFEST}" for name in missing]
    if problems:
        raise BuildError(f"shipped reference weights in {root} are unusable:\n" + "\n".join(f"  - {p}" for p in problems))
    return manifest


def load_shipped(root: str | Path = WEIGHTS_DIR, device: str | None = "cpu") -> tuple[Backbone, CrossLayerTranscoder, dict[str, Any]]:
    """(backbone, CLT in eval mode, weights.json) of the shipped reference weights, checksums verified."""
    root = Path(root)
    manifest = read_manifest(root)
    backbone = load_backbone(REF_MODEL, str(root / CLIP_FILE), device=device)
    clt, _ = load_checkpoint(root / CLT_DIR, backbone, device=backbone.device)
    return backbone, clt, manifest


class FashionTrainImages:
    """The Fashion-MNIST training split as an atlas image source, tensorised on demand (`load_fashion_tensors`'s
    normalisation): an export needs the ~22,000 images of the atlas's top lists, not all 60,000."""

    class_names = list(FashionMNIST.class_names)

    def __init__(self, dataset: FashionMNIST, backbone: Backbone) -> None:
        self.dataset = dataset
        self.mean, self.std = preprocess_stats(backbone.preprocess)

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return tensorise(self.dataset.images[idx], self.mean, self.std), self.dataset.labels[idx]

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        return self.take(range(start, stop))

    def description(self) -> dict[str, Any]:
        return self.dataset.description()


def export_shipped(out_dir: str | Path, root: str | Path = WEIGHTS_DIR, *, variants: Sequence[str] = EXPORT_VARIANTS,
                   overwrite: bool = False, data_dir: str | None = None, log: Callable[[str], None] = print,
                   gate_images: int | None = DEFAULT_GATE_IMAGES) -> Path:
    """Write the reference serving bundle (`cls` mode, fp32 + `variants`) from the shipped weights, with the
    shipped atlas (its thumbnails rebuilt from the Fashion-MNIST training images) and the variants' accuracy
    gate on `gate_images` Fashion-MNIST test images (None: all 10,000; 0: no gate); seconds."""
    backbone, clt, manifest = load_shipped(root)
    meta = json.loads((Path(root) / CLT_DIR / "clt.json").read_text())
    gate = None
    try:
        _, test_px, test_y = load_fashion_tensors(backbone, "test", data_dir)
        fill: tuple[list[float], str] | None = dataset_fill(test_px)
        if gate_images != 0:
            gate = fashion_gate_images(test_px, test_y, gate_images)
    except DatasetError as exc:
        log(f"export: the bundle's patch fill is the preprocessing mean and it has no accuracy gate (so `--variant auto` "
            f"serves fp32): both need the Fashion-MNIST test images ({exc})")
        fill = None
    out = export_bundle(backbone, clt, EXPORT_MODE, list(FashionMNIST.class_names), list(FashionMNIST.templates), out_dir,
                        variants=variants, checkpoint=CLT_DIR, clt_sha256=meta["sha256"], overwrite=overwrite,
                        fill=fill[0] if fill else None, fill_source=fill[1] if fill else None, gate_images=gate)
    if not set(ATLAS_FILES) <= set(manifest["files"]):
        log(f"export: {root} ships no atlas; the bundle has none (add it with `cltvit-reference atlas`)")
        return out
    try:
        train = FashionTrainImages(FashionMNIST("train", data_dir), backbone)
    except DatasetError as exc:
        log(f"export: the bundle has no atlas: its thumbnails come from the Fashion-MNIST training images ({exc})")
        return out
    src = Path(root) / ATLAS_DIR
    with np.load(src / "image_refs.npz", allow_pickle=False) as z:
        refs = {k: z[k] for k in z.files}
    thumb_max = json.loads((src / "atlas.json").read_text())["build"]["config"]["thumb_max"]
    spec = json.loads((out / "bundle.json").read_text())["preprocess"]
    images = images_from_refs(train, refs, thumb_max=thumb_max, mean=spec["mean"], std=spec["std"])
    tmp = Path(tempfile.mkdtemp(prefix=".atlas.", dir=out.parent))
    try:
        shutil.copyfile(src / "atlas.json", tmp / "atlas.json")
        shutil.copyfile(src / "features.npz", tmp / "features.npz")
        np.savez_compressed(tmp / "images.npz", **images)
        attach_atlas(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _measure_atlas(weights: Path, into: Path, data_dir: str | None, limit: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure the atlas of the weights in `weights` over the training images and write `into`/atlas.json,
    features.npz and image_refs.npz; returns what weights.json records about it."""
    backbone, clt, _ = load_shipped(weights)
    sha = json.loads((weights / CLT_DIR / "clt.json").read_text())["sha256"]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=".atlas-build.", dir=into.parent) as tmpdir:
        tmp = Path(tmpdir)
        bundle = export_bundle(backbone, clt, EXPORT_MODE, list(FashionMNIST.class_names), list(FashionMNIST.templates), tmp / "bundle",
                               checkpoint=CLT_DIR, clt_sha256=sha)
        ds, px, y = load_fashion_tensors(backbone, "train", data_dir, limit)
        source = TensorSource(px, y.numpy(), ds.class_names, {**ds.description(), "root": "dataset-fashion-mnist", "tensorised": True})
        log(f"atlas: measuring the features of {weights} over {len(y)} training images")
        index = build_atlas(backbone, clt, bundle, source, clt_sha256=sha, cfg=AtlasConfig(), work_dir=tmp / "work", out_dir=tmp,
                            progress=False, log=log, command="cltvit-reference atlas")
        into.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp / "atlas" / "atlas.json", into / "atlas.json")
        shutil.copyfile(tmp / "atlas" / "features.npz", into / "features.npz")
        with np.load(tmp / "atlas" / "images.npz", allow_pickle=False) as z:
            np.savez_compressed(into / "image_refs.npz", **{k: z[k] for k in REF_ARRAYS})
    return {"images": index["images"], "seconds": time.time() - t0, "stream_seconds": index["build"]["stream_seconds"],
            "label_seconds": index["build"]["label_seconds"], "vocab": index["vocab"]["source"], "thresholds": index["thresholds"]}


def ship_atlas(root: str | Path = WEIGHTS_DIR, *, data_dir: str | None = None, limit: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """(Re)measure the atlas of the shipped weights in `root` and add it to the folder and its weights.json
    (minutes: the whole training split). Returns weights.json."""
    root = Path(root)
    manifest = read_manifest(root)
    info = _measure_atlas(root, root / ATLAS_DIR, data_dir, limit, log)
    manifest["files"].update({name: file_sha256(root / name) for name in ATLAS_FILES})
    manifest["atlas"] = {**info, "machine": machine_info(torch.get_num_threads())}
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1, default=float) + "\n")
    for p in [root / ATLAS_DIR, *(root / ATLAS_DIR).iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return manifest


def measure(backbone: Backbone, clt: CrossLayerTranscoder, data_dir: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """What `weights.json` reports, measured now on the Fashion-MNIST test split (first `limit` images):
    zero-shot top-1 of the unmodified CLIP, top-1 with every MLP replaced by the CLT at the CLS token and
    at all tokens, and fidelity (R^2, cosine, L0, dead fraction; all tokens, CLS, patches) on 1000 images."""
    test, px, y = load_fashion_tensors(backbone, "test", data_dir, limit)
    text = backbone.class_embeddings(test.class_names, test.templates)
    m = measure_transcoder(backbone, clt, px, y, text, min(FIDELITY_IMAGES, len(y)))
    return {**m, "zero_shot_top1": m["accuracy_unmodified"], "drop_cls": m["accuracy_unmodified"] - m["accuracy_cls"],
            "drop_all_tokens": m["accuracy_unmodified"] - m["accuracy_all"], "images": len(y)}


def ship(build_dir: str | Path, to: str | Path = WEIGHTS_DIR, *, data_dir: str | None = None, limit: int | None = None,
         atlas_limit: int | None = None, command: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Round a finished build's CLIP (`clip/model.pt`) and CLT (`clt/`) to float16 into `to`, measure both
    the float32 originals and the float16 copies (on the first `limit` test images; None: all 10,000),
    measure the float16 copies' atlas (first `atlas_limit` training images; None: all 60,000), and write
    `weights.json` and `report.md`. Returns weights.json."""
    build = Path(build_dir)
    clip_src, clt_src = build / "clip" / "model.pt", build / "clt"
    if not clip_src.is_file() or not (clt_src / "clt.json").is_file():
        raise BuildError(f"{build} is not a finished reference build (needs clip/model.pt and clt/clt.json): "
                         f"run `cltvit-reference build --out {build}` first")
    t0 = time.time()
    bb32 = load_backbone(REF_MODEL, str(clip_src), device="cpu")
    clt32, meta32 = load_checkpoint(clt_src, bb32)
    log("ship: measuring the float32 build")
    fp32 = measure(bb32, clt32, data_dir, limit)
    to = Path(to)
    with staged_directory(to) as tmp:
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in bb32.model.state_dict().items()}
        save_file(state, str(tmp / CLIP_FILE), metadata={"format": "open_clip state dict", "model": REF_MODEL})
        bb16 = load_backbone(REF_MODEL, str(tmp / CLIP_FILE), device="cpu")
        clt16 = CrossLayerTranscoder(clt32.cfg)
        clt16.load_state_dict({k: v.to(torch.float16).to(torch.float32) for k, v in clt32.state_dict().items()})
        keep = {k: meta32[k] for k in ("data", "train_config", "metrics", "finetune") if k in meta32}
        save_checkpoint(tmp / CLT_DIR, clt16.eval(), bb16.identity(), dtype=torch.float16, **keep)
        clt16, _ = load_checkpoint(tmp / CLT_DIR, bb16)
        log("ship: measuring the float16 copies")
        fp16 = measure(bb16, clt16, data_dir, limit)
        (tmp / MANIFEST).write_text(json.dumps({"files": {name: file_sha256(tmp / name) for name in FILES}}))  # for load_shipped
        atlas = _measure_atlas(tmp, tmp / ATLAS_DIR, data_dir, atlas_limit, log)
        clip_rec = json.loads((build / "clip" / "clip.json").read_text()) if (build / "clip" / "clip.json").is_file() else {}
        build_rec = json.loads((build / "build.json").read_text()) if (build / "build.json").is_file() else {}
        manifest = {
            "model": REF_MODEL,
            "dtype": "float16",
            "files": {name: file_sha256(tmp / name) for name in (*FILES, *ATLAS_FILES)},
            "measured": {"float16": fp16, "float32_build": fp32},
            "atlas": atlas,
            "clip": {k: clip_rec.get(k) for k in ("config", "train", "zero_shot_top1", "weights_sha256_16")},
            "clt": {"config": clt32.cfg.to_dict(), "train_config": meta32.get("train_config"), "finetune": meta32.get("finetune")},
            "build": {"command": command or f"cltvit-reference build --out {build.name}",
                      "stage_seconds": {k: v.get("seconds") for k, v in build_rec.get("stages", {}).items()},
                      "stage_seconds_total": build_rec.get("stage_seconds_total")},
            "machine": machine_info(torch.get_num_threads()),
            "shipped_at": time.strftime("%Y-%m-%d"),
            "seconds": time.time() - t0,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=float) + "\n")
        (tmp / "report.md").write_text(render(manifest))
    return manifest


def render(manifest: dict[str, Any]) -> str:
    """weights.json -> report.md."""
    m16, m32 = manifest["measured"]["float16"], manifest["measured"]["float32_build"]
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    rows = [("zero-shot top-1 (unmodified CLIP)", "zero_shot_top1", pct), ("top-1, all MLPs replaced at CLS", "accuracy_cls", pct),
            ("top-1, all MLPs replaced at all tokens", "accuracy_all", pct), ("R^2, all tokens", "r2", "{:.4f}".format),
            ("R^2, CLS tokens", "r2_cls", "{:.4f}".format), ("R^2, patch tokens", "r2_patches", "{:.4f}".format),
            ("cosine, all tokens", "cosine", "{:.4f}".format), ("L0 (active features per token per layer)", "l0", "{:.2f}".format),
            ("dead features, all tokens", "dead_fraction", "{:.3f}".format)]
    mach = manifest["machine"]
    lines = [f"# Shipped reference weights ({manifest['model']}, {manifest['dtype']})", "",
             f"Measured on the {m16['images']:,} Fashion-MNIST test images (fidelity on the first {FIDELITY_IMAGES}), "
             f"on {mach['cpu']} ({', '.join(mach['isa'])}; {mach['threads']} torch thread(s)), {manifest['shipped_at']}.", "",
             "| | shipped (float16) | build (float32) |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(m16[key])} | {fmt(m32[key])} |" for name, key, fmt in rows]
    lines += ["", f"Built by `{manifest['build']['command']}`; files and sha256 in `weights.json`.", ""]
    return "\n".join(lines)
