"""Small bundles for tests and benchmarks: the `cltvit-tiny` backbone (random weights) with a random CLT."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES, FashionMNIST
from training.model.backbone import Backbone, load_backbone
from training.model.checkpoint import load_checkpoint, save_checkpoint
from training.testing import random_clt

from .atlas import AtlasConfig, DatasetSource, build_atlas
from .writer import export_bundle, preprocess_spec


def make_tiny_bundle(
    out_dir: str | Path,
    *,
    mode: str = "cls",
    labels: Sequence[str] = FASHION_MNIST_CLASSES,
    templates: Sequence[str] = FASHION_MNIST_TEMPLATES[:2],
    n_features: int = 128,
    k: int = 8,
    top_k_features: int = 16,
    spatial_top_k: int = 5,
    variants: Sequence[str] = (),
    seed: int = 0,
    overwrite: bool = True,
    checkpoint_dir: str | Path | None = None,
    intervene: bool | None = None,
) -> Path:
    """Export a bundle of cltvit-tiny (32x32 input, L=4, d=64, D=32) + a random CLT; seconds on a CPU.

    With `checkpoint_dir` the CLT is saved there first and the bundle records its checkpoint and sha256
    (what an atlas is tied to). `intervene` as `export_bundle`'s (None: in cls and all modes)."""
    backbone = load_backbone("cltvit-tiny", None, device="cpu", seed=seed)
    clt = random_clt(backbone.n_layers, backbone.d_model, n_features, k, seed)
    sha = name = None
    if checkpoint_dir is not None:
        d = save_checkpoint(checkpoint_dir, clt, backbone.identity())
        sha, name = json.loads((d / "clt.json").read_text())["sha256"], d.name
    return export_bundle(backbone, clt, mode, labels, templates, out_dir, top_k_features=top_k_features,
                         spatial_top_k=spatial_top_k, variants=variants, overwrite=overwrite, checkpoint=name, clt_sha256=sha,
                         fill=grey_fill(backbone), fill_source=GREY_FILL_SOURCE, intervene=intervene)


GREY = 128  # the tiny bundles' patch fill in uint8 pixels
GREY_FILL_SOURCE = "mid-grey: uint8 128 in every channel, preprocessed (a value an edited image file can hold exactly)"


def grey_fill(backbone: Backbone, value: int = GREY) -> list[float]:
    """The preprocessed value [3] of the uint8 pixel `value` in every channel, computed in float32 as the serving
    preprocessing does ((x / 255 - mean) / std), so that an image file with those pixels preprocesses to it exactly:
    the tiny bundles' fill, which lets tests send a deleted patch as an image."""
    spec = preprocess_spec(backbone.visual)
    x = np.float32(value) / np.float32(255.0)
    return [float((x - np.float32(m)) / np.float32(sd)) for m, sd in zip(spec["mean"], spec["std"])]


SMALL_VOCAB: tuple[str, ...] = ("shoe", "boot", "shirt", "trousers", "jacket", "handbag", "sleeve", "collar", "heel", "strap",
                                "stripe", "leather", "cotton", "dark", "bright", "round", "long", "short", "pattern", "button")


def make_atlas_bundle(out_dir: str | Path, *, mode: str = "cls", images: int = 256, top_n: int = 8, batch_size: int = 64,
                      vocab: Sequence[str] = SMALL_VOCAB, seed: int = 0) -> Path:
    """A tiny bundle (its CLT saved as a checkpoint in `out_dir`/clt) with an atlas over the first `images`
    Fashion-MNIST training images and a small vocabulary; seconds. Returns the bundle directory."""
    out = Path(out_dir)
    bundle = make_tiny_bundle(out / "bundle", mode=mode, seed=seed, checkpoint_dir=out / "clt")
    backbone = load_backbone("cltvit-tiny", None, device="cpu", seed=seed)
    clt, meta = load_checkpoint(out / "clt", backbone)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    build_atlas(backbone, clt, bundle, DatasetSource(FashionMNIST("train", limit=images), backbone.preprocess), clt_sha256=meta["sha256"],
                cfg=AtlasConfig(top_n=top_n, batch_size=batch_size), vocab_file=out / "vocab.txt", progress=False, log=lambda _: None)
    return bundle
