"""Fashion-MNIST test images as PNG bytes, read straight from the idx file (no torch, no locust)."""
from __future__ import annotations

import gzip
import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def fashion_mnist_pngs(n: int) -> list[bytes]:
    """The first n Fashion-MNIST test images (28x28 grayscale) as PNG bytes."""
    path = FMNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        raise SystemExit(f"Fashion-MNIST not found at {path} (apt-get install dataset-fashion-mnist, or set FMNIST_DIR)")
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, count, rows, cols = struct.unpack(">IIII", data[:16])
    images = np.frombuffer(data, np.uint8, offset=16).reshape(count, rows, cols)
    out = []
    for arr in images[: min(n, count)]:
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
