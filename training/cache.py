"""The activation cache: a ViT's MLP inputs and outputs written once to fp16 shards, read back by training.

`cltvit-activations` (`write_cache`) runs the ViT once over an image source, in dataset order, and
writes for every image the MLP input (LN2 output) and MLP output of every layer at the chosen tokens
(`all`, `cls` or `patches`, `training.model.vit.capture`). `cltvit-train --activations DIR`
(`ActivationCache` + `CachedActivationStream`) then trains from those files instead of running the
ViT, so seeds, remedies and sweeps over the same images pay for the ViT once.

Layout of DIR:

- `shard-XXXXX.npy`: rows [images_in_shard * T', 2, L, d] float16 (NumPy .npy, memory-mapped when
  read); row `i * T' + t` is token t of the shard's i-th image, slot 0 the MLP input, slot 1 the
  MLP output; shard s holds images [s * shard_images, (s + 1) * shard_images) of the dataset. T' is
  the tokens per image of the token set (all: the ViT's T, cls: 1, patches: T - 1).
- `manifest.json` (`CacheManifest`): format, backbone identity, data description, token set, shape,
  and the complete shards with their sha256 (`bundle.checksums.file_sha256`) and byte size.

Crash safety: a shard is written under `shard-XXXXX.npy.tmp`, flushed, fsynced and renamed
(`bundle.atomic.replaced`), hashed, and only then listed in the manifest (rewritten atomically,
`bundle.atomic.write_text_atomic`). A
shard is complete exactly when the manifest lists it; rerunning the same command after a kill (even
`kill -9`, anywhere) deletes leftover `.tmp` files and rewrites every shard the manifest does not
list, so the finished cache has no gap and no duplicate, and is byte for byte the cache of an
uninterrupted run (same machine, same thread count). Kill points for the tests (`bundle.killpoints`):
`activations.batch` (after each ViT batch written into the temporary shard), `activations.renamed`
(a shard renamed into place, not yet listed), `activations.listed` (after the manifest lists it).

Reading (`ActivationCache`) checks every shard's size and sha256 against the manifest first and
refuses the cache with a `CacheError` naming the shard that does not match.

Rounding: the values are the stream's float32 captures rounded to float16 (round to nearest even,
as `ActivationStream` with `buffer_dtype="float16"` rounds them). The ViT forward on CPU is
row-independent (the same bits for an image whatever batch it is in), so training from the cache
equals training from a stream with a float16 buffer, bit for bit (tests/training/test_cache.py).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from bundle.atomic import replaced, write_text_atomic
from bundle.checksums import file_sha256
from bundle.killpoints import killpoint
from bundle.provenance import machine_info

from .activations import ActivationStream, _Preprocessed
from .model.backbone import Backbone, check_backbone_matches
from .model.vit import TOKEN_SETS, TokenSet, capture

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
SHARD_DTYPE = np.float16
DEFAULT_SHARD_MB = 256


class CacheError(ValueError):
    """An activation cache cannot be written or read; the message names the file or setting."""


class ShardRecord(BaseModel):
    """One complete shard: `images` images from `first_image` on, `rows` = images x T' rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    first_image: int
    images: int
    rows: int
    bytes: int
    sha256: str


class CacheManifest(BaseModel):
    """manifest.json of an activation cache (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = CACHE_FORMAT
    backbone: dict[str, Any]  # Backbone.identity() of the ViT that made the activations
    data: dict[str, Any]  # the image source's description()
    tokens: Literal["all", "cls", "patches"]
    tokens_per_image: int  # T'
    n_layers: int
    d_model: int
    dtype: Literal["float16"] = "float16"
    images: int  # images in the source (the cache is complete when the shards cover all of them)
    shard_images: int  # images per shard (the last shard may hold fewer)
    shards: list[ShardRecord] = []
    seconds: float = 0.0  # ViT + write time summed over the runs that wrote the shards
    machine: dict[str, Any] = {}

    @property
    def n_shards(self) -> int:
        return -(-self.images // self.shard_images)

    @property
    def complete(self) -> bool:
        return sorted(s.first_image for s in self.shards) == [i * self.shard_images for i in range(self.n_shards)]

    def identity(self) -> dict[str, Any]:
        """The settings that fix the cache's content (a rerun must ask for the same)."""
        return {k: getattr(self, k) for k in ("format", "backbone", "data", "tokens", "tokens_per_image", "n_layers",
                                               "d_model", "dtype", "images", "shard_images")}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def tokens_per_image(backbone: Backbone, tokens: TokenSet) -> int:
    """T': captured tokens per image for a token set (no CLS copies: those are made when reading)."""
    return {"all": backbone.n_tokens, "cls": 1, "patches": backbone.n_tokens - 1}[tokens]


def _description(dataset: Dataset) -> dict[str, Any]:
    desc = dataset.description() if hasattr(dataset, "description") else {"name": type(dataset).__name__}
    return json.loads(json.dumps({**desc, "size": len(dataset)}, default=str))  # type: ignore[arg-type]


def _read_manifest(path: Path) -> CacheManifest:
    try:
        return CacheManifest.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise CacheError(f"{path} is not a readable activation-cache manifest ({first})") from None


# ---------------------------------------------------------------------- writing
def write_cache(
    backbone: Backbone,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    tokens: TokenSet = "all",
    shard_images: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    batch_images: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CacheManifest:
    """Write (or finish) the activation cache of `backbone` over `dataset` in `out_dir`; returns its manifest.

    `shard_images` images per shard (default: as many as fit in `shard_mb` MiB). An `out_dir` holding
    a cache of other settings is refused (`CacheError` naming them); one holding the same settings is
    continued: shards the manifest lists are kept, the others are (re)written.
    """
    if tokens not in TOKEN_SETS:
        raise CacheError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
    if batch_images < 1:
        raise CacheError(f"batch_images must be >= 1, got {batch_images}")
    out = Path(out_dir)
    n_images = len(dataset)  # type: ignore[arg-type]
    if n_images == 0:
        raise CacheError("the image source is empty")
    L, d, tpi = backbone.n_layers, backbone.d_model, tokens_per_image(backbone, tokens)
    row_bytes = 2 * L * d * np.dtype(SHARD_DTYPE).itemsize
    if shard_images is None:
        shard_images = max(1, int(shard_mb * 2**20) // (tpi * row_bytes))
    if shard_images < 1:
        raise CacheError(f"shard_images must be >= 1, got {shard_images}")
    wanted = CacheManifest(backbone=backbone.identity(), data=_description(dataset), tokens=tokens, tokens_per_image=tpi,
                           n_layers=L, d_model=d, images=n_images, shard_images=min(shard_images, n_images),
                           machine=machine_info(threads=torch.get_num_threads()))
    path = out / MANIFEST
    if path.is_file():
        manifest = _read_manifest(path)
        was, now = manifest.identity(), wanted.identity()
        if was != now:
            differ = sorted(k for k in now if was[k] != now[k])
            raise CacheError(f"{out} holds an activation cache of other settings ({', '.join(differ)} differ); "
                             f"use another output directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = wanted
        write_text_atomic(path, manifest.model_dump_json(indent=1))
    for leftover in out.glob("shard-*.npy.tmp"):  # a shard a kill interrupted
        leftover.unlink()
    listed = {s.first_image for s in manifest.shards}
    todo = [s for s in range(manifest.n_shards) if s * manifest.shard_images not in listed]
    if not todo:
        return manifest
    log(f"activations: {len(todo)} of {manifest.n_shards} shards to write in {out} "
        f"({n_images} images x {tpi} tokens, {L} layers, d={d}, float16)")
    source = _Preprocessed(dataset, backbone.preprocess)
    bar = tqdm(total=len(todo), disable=not progress, desc="activations", unit="shard", dynamic_ncols=True)
    try:
        for s in todo:
            t0 = time.perf_counter()
            record = _write_shard(backbone, source, out, s, manifest, batch_images, num_workers)
            manifest.shards = sorted([*manifest.shards, record], key=lambda r: r.first_image)
            manifest.seconds += time.perf_counter() - t0
            write_text_atomic(path, manifest.model_dump_json(indent=1), fsync=True)
            killpoint("activations.listed")
            bar.update(1)
    finally:
        bar.close()
    return manifest


def _write_shard(backbone: Backbone, source: Dataset, out: Path, s: int, manifest: CacheManifest, batch_images: int,
                 num_workers: int) -> ShardRecord:
    """Run the ViT over shard `s`'s images into `shard-s.npy.tmp`, fsync, rename; returns its record."""
    first = s * manifest.shard_images
    count = min(manifest.shard_images, manifest.images - first)
    tpi, L, d = manifest.tokens_per_image, manifest.n_layers, manifest.d_model
    final = out / shard_name(s)
    loader = DataLoader(Subset(source, range(first, first + count)), batch_size=batch_images, shuffle=False,
                        num_workers=num_workers)
    with replaced(final, fsync=True) as tmp:  # shard-XXXXX.npy.tmp, fsynced and renamed on success
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=SHARD_DTYPE, shape=(count * tpi, 2, L, d))
        at = 0
        for pixels in loader:
            cap = capture(backbone.visual, pixels.to(backbone.device), manifest.tokens)  # mlp_in/out [L, B, T', d]
            pair = torch.stack([cap.mlp_in, cap.mlp_out])  # [2, L, B, T', d]
            block = pair.permute(2, 3, 0, 1, 4).reshape(-1, 2, L, d).to(torch.float16)  # [B*T', 2, L, d], row b*T' + t
            rows[at : at + block.shape[0]] = block.cpu().numpy()
            at += block.shape[0]
            killpoint("activations.batch")
        if at != count * tpi:
            raise CacheError(f"shard {final.name}: the source gave {at // tpi} images where {count} were expected")
        rows.flush()
        del rows
    killpoint("activations.renamed")
    return ShardRecord(name=final.name, first_image=first, images=count, rows=count * tpi, bytes=final.stat().st_size,
                       sha256=file_sha256(final))


# ---------------------------------------------------------------------- reading
class ActivationCache:
    """A complete activation cache, checked against its manifest (sizes and sha256 of every shard).

    `limit` uses only the first `limit` images. `rows(images, tokens)` gives the cached rows of those
    dataset indices as a float16 tensor [B, T'', 2, L, d] (T'' the tokens per image of `tokens`).
    """

    def __init__(self, root: str | Path, *, limit: int | None = None, verify: bool = True) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CacheError(f"{self.root} is not an activation cache (no {MANIFEST}); write one with cltvit-activations")
        self.manifest = m = _read_manifest(path)
        if not m.complete:
            raise CacheError(f"activation cache {self.root} is incomplete ({len(m.shards)} of {m.n_shards} shards); "
                             f"rerun the cltvit-activations command that wrote it to finish it")
        if limit is not None and not 1 <= limit:
            raise CacheError(f"limit must be >= 1, got {limit}")
        self.n_images = m.images if limit is None else min(limit, m.images)
        self.limit = limit
        self._arrays: list[np.ndarray] = []
        for rec in m.shards:
            shard = self.root / rec.name
            if not shard.is_file():
                raise CacheError(f"activation cache {self.root}: shard {rec.name} is missing")
            if shard.stat().st_size != rec.bytes:
                raise CacheError(f"activation cache {self.root}: shard {rec.name} has {shard.stat().st_size} bytes, "
                                 f"the manifest says {rec.bytes} (truncated or replaced); rewrite the cache")
            if verify and file_sha256(shard) != rec.sha256:
                raise CacheError(f"activation cache {self.root}: shard {rec.name} fails its sha256 check (corrupted); "
                                 f"delete it and rerun cltvit-activations to rewrite it")
            arr = np.load(shard, mmap_mode="r")
            if arr.dtype != SHARD_DTYPE or arr.shape != (rec.rows, 2, m.n_layers, m.d_model):
                raise CacheError(f"activation cache {self.root}: shard {rec.name} holds {arr.dtype} {arr.shape}, "
                                 f"not float16 {(rec.rows, 2, m.n_layers, m.d_model)}")
            self._arrays.append(arr)

    @property
    def tokens(self) -> TokenSet:
        return self.manifest.tokens  # type: ignore[return-value]

    @property
    def backbone(self) -> dict[str, Any]:
        return self.manifest.backbone

    @property
    def key(self) -> str:
        """16 hex digits identifying the cache's content (its settings and every shard's sha256) and limit."""
        blob = json.dumps({"id": self.manifest.identity(), "shards": [s.sha256 for s in self.manifest.shards],
                           "limit": self.n_images}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def serves(self, tokens: TokenSet) -> bool:
        """Whether the cache holds `tokens`: an `all` cache serves every token set, others only themselves."""
        return self.tokens == "all" or self.tokens == tokens

    def description(self) -> dict[str, Any]:
        """The data a run trained from this cache saw: the source's description and the cache's identity."""
        data = dict(self.manifest.data)
        if self.limit is not None and self.n_images < self.manifest.images:
            data.update(size=self.n_images, limit=self.n_images)
        return {**data, "activations": {"key": self.key, "tokens": self.tokens, "dtype": self.manifest.dtype,
                                        "images": self.n_images}}

    def rows(self, images: Sequence[int] | torch.Tensor, tokens: TokenSet | None = None) -> torch.Tensor:
        """Cached rows of dataset indices `images` [B]: float16 [B, T'', 2, L, d] (the token set `tokens`)."""
        idx = np.asarray(images.tolist() if isinstance(images, torch.Tensor) else images, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_images):
            raise IndexError(f"image index out of range [0, {self.n_images})")
        m = self.manifest
        tpi = m.tokens_per_image
        out = np.empty((idx.size, tpi, 2, m.n_layers, m.d_model), dtype=SHARD_DTYPE)
        shard_of = idx // m.shard_images
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = idx[sel] - s * m.shard_images
            rows = (local[:, None] * tpi + np.arange(tpi)[None, :]).reshape(-1)
            out[sel] = self._arrays[s][rows].reshape(sel.size, tpi, 2, m.n_layers, m.d_model)
        t = torch.from_numpy(out)
        want = tokens or self.tokens
        if want == self.tokens:
            return t
        if not self.serves(want):
            raise CacheError(f"activation cache {self.root} holds the {self.tokens!r} tokens, not {want!r}")
        return t[:, :1] if want == "cls" else t[:, 1:]


class _ImageIndex(Dataset):
    """Item i is the dataset index images[i] (a 0-d int64 tensor): what `CachedActivationStream` batches."""

    def __init__(self, images: Sequence[int]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.images[i], dtype=torch.int64)


class CachedActivationStream(ActivationStream):
    """`ActivationStream` whose token rows come from an `ActivationCache` instead of a ViT pass.

    Everything else is the stream's own code: the seeded image order per epoch, groups of
    `images_per_batch` images, the shuffling buffer, CLS copies, and the resumable position (a
    resumed run re-reads the buffered tokens' images from the cache). The images it iterates are
    dataset indices, so the batches are the stream's batches over the same images, with the cached
    (float16) values. `images` restricts it to those dataset indices (a data-parallel shard), as
    `Subset(dataset, images)` restricts the ViT stream.
    """

    def __init__(self, backbone: Backbone, cache: ActivationCache, images: Sequence[int] | None = None, **kwargs: Any) -> None:
        check_backbone_matches(cache.backbone, backbone, f"activation cache {cache.root}")
        tokens = kwargs.get("tokens", "all")
        if not cache.serves(tokens):
            raise CacheError(f"activation cache {cache.root} holds the {cache.tokens!r} tokens; training asks for {tokens!r}")
        kwargs["num_workers"] = 0  # reading indices needs no worker processes
        super().__init__(backbone, _ImageIndex(range(cache.n_images) if images is None else images), **kwargs)
        self.cache = cache

    def _rows(self, pixels: torch.Tensor) -> torch.Tensor:
        """Dataset indices [B] -> token rows [B*(T'+c), 2, L, d] in the buffer's dtype, laid out as the stream's."""
        rows = self.cache.rows(pixels, self.tokens)  # [B, T', 2, L, d] float16
        if self.cls_copies:
            rows = torch.cat([rows, rows[:, :1].expand(-1, self.cls_copies, -1, -1, -1)], dim=1)
        return rows.reshape(-1, *rows.shape[2:]).to(self.device, self.dtype)

    def source_key(self) -> str | None:
        return self.cache.key


__all__ = ["ActivationCache", "CacheError", "CacheManifest", "CachedActivationStream", "ShardRecord", "write_cache",
           "tokens_per_image", "MANIFEST"]
