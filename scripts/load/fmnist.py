"""Fashion-MNIST images (arrays, PNG bytes) read straight from Debian's idx files (no torch, no locust)."""
from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def fashion_mnist_arrays(split: str, n: int) -> np.ndarray:
    """The first n Fashion-MNIST images of `split` ('train' or 't10k'), uint8 [n, 28, 28], read straight
    from Debian's idx file."""
    path = FMNIST_DIR / f"{split}-images-idx3-ubyte.gz"
    if not path.exists():
        raise SystemExit(f"Fashion-MNIST not found at {path} (apt-get install dataset-fashion-mnist, or set FMNIST_DIR)")
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, count, rows, cols = struct.unpack(">IIII", data[:16])
    return np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)[: min(n, count)]


def fashion_mnist_pngs(n: int) -> list[bytes]:
    """The first n Fashion-MNIST test images (28x28 grayscale) as PNG bytes."""
    out = []
    for arr in fashion_mnist_arrays("t10k", n):
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
