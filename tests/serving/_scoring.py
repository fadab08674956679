"""Helpers for the folder-scoring, streaming, drift and Ray tests: a folder of real Fashion-MNIST
PNGs (nested, plus unreadable files) and the tiny bundle they are scored with."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

BROKEN = {
    "broken/empty.png": b"",
    "broken/not-an-image.jpg": b"this is a text file, not a JPEG\n",
    "coat/truncated.png": None,  # the first 60 bytes of a real PNG, written below
}


def fashion_images(n: int, offset: int = 0) -> list[tuple[Image.Image, int]]:
    """`n` real Fashion-MNIST test images (RGB PIL, label)."""
    from training.data import FashionMNIST

    ds = FashionMNIST("test", limit=offset + n)
    return [ds[i] for i in range(offset, offset + n)]


def make_image_folder(root: Path, n: int = 240, offset: int = 0) -> tuple[list[str], list[str]]:
    """Write `n` Fashion-MNIST PNGs as root/<class>/<k>/img_<i>.png plus the BROKEN files and a
    non-image file. Returns (readable relative paths, unreadable relative paths), both sorted."""
    from training.data import FASHION_MNIST_CLASSES

    good = []
    for i, (img, label) in enumerate(fashion_images(n, offset)):
        rel = f"{FASHION_MNIST_CLASSES[label].replace(' ', '_')}/{i % 3}/img_{offset + i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel)
        good.append(rel)
    first_png = (root / good[0]).read_bytes()
    for rel, data in BROKEN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(first_png[:60] if data is None else data)
    (root / "README.txt").write_text("not scored: no image extension\n")
    return sorted(good), sorted(BROKEN)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same_records(a: list[dict], b: list[dict], atol: float = 1e-5) -> None:
    """Same paths, errors, labels and top-k labels; probabilities and shares within `atol`."""
    a, b = sorted(a, key=lambda r: r["path"]), sorted(b, key=lambda r: r["path"])
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert bool(x.get("error")) == bool(y.get("error")), (x, y)
        if x.get("error"):
            continue
        assert x["label"] == y["label"], (x["path"], x["label"], y["label"])
        assert [t["label"] for t in x["top"]] == [t["label"] for t in y["top"]]
        np.testing.assert_allclose([t["probability"] for t in x["top"]], [t["probability"] for t in y["top"]], atol=atol)
        assert list(x["shares"]) == list(y["shares"])
        np.testing.assert_allclose(list(x["shares"].values()), list(y["shares"].values()), atol=atol)
