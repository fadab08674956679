"""Labelled image datasets with class names and zero-shot prompt templates.

Every dataset here yields `(PIL.Image (RGB), label:int)` and carries `class_names` and `templates`
(format strings with one `{}` for the class name). Available: `fashion-mnist` (files of Debian's
`dataset-fashion-mnist` package, or any directory with the four idx .gz files), `folder` (one
subfolder per class), `cifar100` (torchvision; downloaded when the network allows), `imagenet100`
(an ImageNet-style folder plus a class-list file), `coco` (a folder of images, unlabelled).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

from bundle.format import IMAGE_EXTENSIONS

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FASHION_MNIST_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a grayscale image of a {}.",
    "an item of clothing: {}.",
)
GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
)


class DatasetError(ValueError):
    """A dataset could not be found or read; the message says what to supply."""


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx (MNIST format) file, gzipped or not, into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_fashion_mnist(data_dir: str | Path | None = None) -> Path:
    """Directory holding Fashion-MNIST's idx files (default: Debian's dataset-fashion-mnist package)."""
    candidates = [Path(data_dir)] if data_dir else list(FASHION_MNIST_DIRS)
    for d in candidates:
        if (d / "t10k-images-idx3-ubyte.gz").exists() or (d / "t10k-images-idx3-ubyte").exists():
            return d
    raise DatasetError(
        f"Fashion-MNIST not found in {', '.join(map(str, candidates))}; install Debian's package "
        f"(`apt-get install -y dataset-fashion-mnist`) or pass --data-dir with the four idx files"
    )


class LabelledDataset(Dataset):
    """Base: `class_names`, `templates`, `description()`; items are (RGB PIL image, label)."""

    class_names: Sequence[str] = ()
    templates: Sequence[str] = GENERIC_TEMPLATES
    name: str = "dataset"

    def description(self) -> dict[str, Any]:
        return {"name": self.name, "size": len(self), "classes": len(self.class_names)}


class FashionMNIST(LabelledDataset):
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grayscale images, 10 classes) from idx files."""

    name = "fashion-mnist"
    class_names = FASHION_MNIST_CLASSES
    templates = FASHION_MNIST_TEMPLATES

    def __init__(self, split: str = "train", data_dir: str | Path | None = None, limit: int | None = None) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        root = find_fashion_mnist(data_dir)
        prefix = "train" if split == "train" else "t10k"

        def pick(stem: str) -> Path:
            p = root / f"{stem}.gz"
            return p if p.exists() else root / stem

        self.images = _read_idx(pick(f"{prefix}-images-idx3-ubyte"))  # [N, 28, 28] uint8
        self.labels = _read_idx(pick(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)  # [N]
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.split, self.root = split, root

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), int(self.labels[i])

    def description(self) -> dict[str, Any]:
        return {**super().description(), "split": self.split, "root": str(self.root)}


def list_images(root: str | Path) -> list[Path]:
    """All image files below `root` (recursive), sorted, by extension."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolder(LabelledDataset):
    """One subfolder per class (`root/<class>/*.jpg`); class names are the folder names, `_` -> space."""

    name = "folder"

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist")
        dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not dirs:
            raise DatasetError(f"image folder {self.root} has no class subfolders")
        self.folders = [d.name for d in dirs]
        self.class_names = list(class_names) if class_names else [d.replace("_", " ") for d in self.folders]
        if len(self.class_names) != len(self.folders):
            raise DatasetError(f"{len(self.class_names)} class names given for {len(self.folders)} folders in {self.root}")
        if templates:
            self.templates = tuple(templates)
        self.samples = [(p, c) for c, d in enumerate(dirs) for p in list_images(d)]
        if not self.samples:
            raise DatasetError(f"no images found under {self.root}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            return im.convert("RGB"), label

    def description(self) -> dict[str, Any]:
        return {**super().description(), "root": str(self.root)}


def read_class_list(path: str | Path) -> tuple[list[str], list[str]]:
    """Class-list file: one class per line, `<folder> <name words...>` or `<folder>` -> (folders, names)."""
    folders, names = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        folders.append(parts[0])
        names.append(parts[1].strip() if len(parts) > 1 else parts[0].replace("_", " "))
    return folders, names


class ImageNet100(ImageFolder):
    """ImageNet-100: an ImageNet-style folder restricted to the synsets of a class-list file."""

    name = "imagenet100"

    def __init__(self, root: str | Path, class_list: str | Path, split: str = "val") -> None:
        folders, names = read_class_list(class_list)
        base = Path(root) / split if (Path(root) / split).is_dir() else Path(root)
        missing = [f for f in folders if not (base / f).is_dir()]
        if missing:
            raise DatasetError(f"{len(missing)} classes of {class_list} have no folder in {base} (first: {missing[0]})")
        self.root = base
        self.folders, self.class_names = folders, names
        self.samples = [(p, c) for c, f in enumerate(folders) for p in list_images(base / f)]


class UnlabelledFolder(LabelledDataset):
    """Any folder of images (e.g. COCO train2017/val2017): label -1, for activation streaming only."""

    name = "coco"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.paths = list_images(self.root)
        if not self.paths:
            raise DatasetError(f"no images found under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB"), -1


class CIFAR100(LabelledDataset):
    """CIFAR-100 through torchvision (downloaded into `data_dir` when the network allows)."""

    name = "cifar100"
    templates = GENERIC_TEMPLATES

    def __init__(self, data_dir: str | Path, split: str = "train", download: bool = True) -> None:
        try:
            self.ds = TorchvisionCIFAR100(str(data_dir), train=split == "train", download=download)
        except Exception as exc:
            raise DatasetError(
                f"CIFAR-100 could not be loaded from {data_dir} ({type(exc).__name__}: {exc}); without network, "
                f"copy cifar-100-python.tar.gz (or its extracted folder) into {data_dir}"
            ) from None
        self.class_names = [c.replace("_", " ") for c in self.ds.classes]
        self.split = split

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        im, y = self.ds[i]
        return im.convert("RGB"), int(y)


DATASETS = ("fashion-mnist", "folder", "cifar100", "imagenet100", "coco")


def load_dataset(name: str, split: str = "train", data_dir: str | None = None, class_list: str | None = None) -> LabelledDataset:
    """Dataset by name (see `DATASETS`); raises `DatasetError` naming what is missing."""
    if name == "fashion-mnist":
        return FashionMNIST(split, data_dir)
    if name in ("folder", "coco", "cifar100", "imagenet100") and not data_dir:
        raise DatasetError(f"dataset {name!r} needs --data-dir")
    if name == "folder":
        return ImageFolder(Path(data_dir) / split if (Path(data_dir) / split).is_dir() else data_dir)  # type: ignore[arg-type]
    if name == "coco":
        return UnlabelledFolder(data_dir)  # type: ignore[arg-type]
    if name == "cifar100":
        return CIFAR100(data_dir, split)  # type: ignore[arg-type]
    if name == "imagenet100":
        if not class_list:
            raise DatasetError("dataset 'imagenet100' needs --class-list (one synset folder per line)")
        return ImageNet100(data_dir, class_list, "train" if split == "train" else "val")  # type: ignore[arg-type]
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
