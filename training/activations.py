"""Stream MLP inputs/outputs from a ViT into a shuffling token buffer (nothing per token touches disk).

Images are read in a seeded random order (a fresh permutation per epoch), preprocessed with the
backbone's own transform, and run through `training.vit.capture` in groups of `images_per_batch`.
The captured tokens (CLS, patches or all) go into an in-memory buffer of about `buffer_tokens`
tokens; training batches are drawn uniformly at random from it (so a batch mixes tokens of many
images), and the buffer is refilled to full whenever it drops below half.

CLS oversampling (`cls_copies` = c > 0, token set `all`): each image's CLS token enters the buffer
1 + c times (its patch tokens once). The CLS token is one of T tokens per image but the only one the
zero-shot logits read (T = 17 for the reference model, 50 for ViT-B-32): without the extra copies it is
1/T of the training signal, and the CLS-token fit lags the patch-token fit (measured in docs/fidelity.md). The copies are rows of the same
capture, so a resumed stream recomputes them like any other row.

Buffer layout: `buf` [capacity, 2, L, d] (slot 0: MLP input = LN2 output, slot 1: MLP output), one
row per token; batches come out as `(mlp_in, mlp_out)`, each [L, N, d] float32.

Resumable position: `state_dict()` holds the epoch, the image cursor inside that epoch, the
sampling RNG and where every buffered token came from (which group of images, which row of that
group's capture), not the tokens themselves (2 x L x d floats each: 4.8 GB for a ViT-B-32 buffer of
65536). `load_state_dict` recomputes the buffered tokens by running the ViT again on exactly those
groups of images, batched as before, so a resumed stream hands out the same batches as an
uninterrupted one (same machine and thread count: the same kernels on the same inputs). That
costs one ViT pass over the images that still have a token in the buffer, a few times the buffer
(tokens are drawn at random, so an image's last token lingers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .model.backbone import Backbone
from .model.vit import TOKEN_SETS, TokenSet, capture


class _Preprocessed(Dataset):
    """Wraps a dataset of (PIL image or [3, H, W] tensor, label) into preprocessed pixel tensors."""

    def __init__(self, dataset: Dataset, preprocess: Any) -> None:
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return image if isinstance(image, torch.Tensor) else self.preprocess(image)


@dataclass
class StreamStats:
    """Counters: images run through the ViT, tokens captured, tokens handed out as batches."""

    images: int = 0
    tokens_captured: int = 0
    tokens_served: int = 0
    vit_seconds: float = 0.0


class ActivationStream:
    """Shuffled batches of (mlp_in, mlp_out) [L, N, d] captured from `backbone` over `dataset`.

    `tokens` picks the token set (all / cls / patches); `num_workers` > 0 decodes and preprocesses
    images in DataLoader worker processes.
    """

    def __init__(
        self,
        backbone: Backbone,
        dataset: Dataset,
        *,
        tokens: TokenSet = "all",
        batch_tokens: int = 4096,
        buffer_tokens: int = 65536,
        images_per_batch: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        dtype: torch.dtype = torch.float32,
        cls_copies: int = 0,
    ) -> None:
        if tokens not in TOKEN_SETS:
            raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
        if cls_copies < 0 or (cls_copies and tokens != "all"):
            raise ValueError(f"cls_copies must be >= 0 and needs tokens='all', got cls_copies={cls_copies}, tokens={tokens!r}")
        n_images = len(dataset)  # type: ignore[arg-type]
        if n_images == 0:
            raise ValueError("the dataset is empty")
        if batch_tokens < 1 or images_per_batch < 1:
            raise ValueError("batch_tokens and images_per_batch must be >= 1")
        self.backbone, self.tokens = backbone, tokens
        self.device = backbone.device
        self.batch_tokens = batch_tokens
        self.images_per_batch = images_per_batch
        self.cls_copies = cls_copies
        self.tokens_per_image = {"all": backbone.n_tokens, "cls": 1, "patches": backbone.n_tokens - 1}[tokens] + cls_copies
        # at least two batches' worth, so refilling at half still leaves a full batch
        self.buffer_tokens = max(buffer_tokens, 2 * batch_tokens)
        self.capacity = self.buffer_tokens + images_per_batch * self.tokens_per_image
        self.dataset = _Preprocessed(dataset, backbone.preprocess)
        self.n_images = n_images
        self.seed, self.num_workers = seed, num_workers
        self.dtype = dtype
        self.epoch, self.cursor = 0, 0
        self.rng = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.stats = StreamStats()
        L, d = backbone.n_layers, backbone.d_model
        self.buf = torch.empty(self.capacity, 2, L, d, dtype=dtype, device=self.device)
        self.n = 0  # valid tokens at the front of buf
        # where each buffered token came from: (image group id, row of that group's capture) [capacity, 2]
        self.src = torch.zeros(self.capacity, 2, dtype=torch.int64)
        self.groups: dict[int, tuple[int, int, int]] = {}  # group id -> (epoch, first position in that epoch's order, images)
        self.next_group = 0
        self._images: Iterator[tuple[int, int, torch.Tensor]] | None = None
        self.last_cls = torch.zeros(0, dtype=torch.bool)  # [N]: which rows of the last batch are CLS tokens

    # ------------------------------------------------------------------ images
    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_images, generator=g)

    def _image_batches(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(epoch, position in that epoch's order, pixel batch [B, 3, H, W]) from (epoch, cursor) on,
        forever; advances the cursor as it yields."""
        while True:
            order = self._order(self.epoch)[self.cursor :].tolist()
            loader = DataLoader(
                Subset(self.dataset, order),
                batch_size=self.images_per_batch,
                shuffle=False,
                num_workers=self.num_workers,
                persistent_workers=False,
                # its own generator: a loader otherwise draws its workers' base seed from the global RNG,
                # so a resumed run (which opens a loader mid-epoch) would leave that RNG elsewhere
                generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch),
            )
            for pixels in loader:
                start = self.cursor
                self.cursor += pixels.shape[0]
                yield self.epoch, start, pixels
            self.epoch, self.cursor = self.epoch + 1, 0

    def _group_pixels(self, epoch: int, start: int, size: int) -> torch.Tensor:
        """The pixel batch [size, 3, H, W] of images order(epoch)[start : start + size], as the loader stacks it."""
        order = self._order(epoch)[start : start + size].tolist()
        return torch.stack([self.dataset[i] for i in order])

    def _rows(self, pixels: torch.Tensor) -> torch.Tensor:
        """One ViT pass over pixels [B, 3, H, W] -> token rows [B*(T'+c), 2, L, d] in the buffer's dtype
        (c = cls_copies extra copies of each image's CLS token, appended after its T' captured tokens)."""
        cap = capture(self.backbone.visual, pixels.to(self.device), self.tokens)  # mlp_in/out [L, B, T', d]
        pair = torch.stack([cap.mlp_in, cap.mlp_out])  # [2, L, B, T', d]
        if self.cls_copies:
            pair = torch.cat([pair, pair[:, :, :, :1].expand(-1, -1, -1, self.cls_copies, -1)], dim=3)  # [2, L, B, T'+c, d]
        count = pair.shape[2] * pair.shape[3]
        return pair.reshape(2, pair.shape[1], count, pair.shape[-1]).permute(2, 0, 1, 3).to(self.dtype)

    def _capture_next(self) -> int:
        """Run one group of images through the ViT and append its tokens to the buffer; returns the count."""
        if self._images is None:
            self._images = self._image_batches()
        epoch, start, pixels = next(self._images)
        t0 = time.perf_counter()
        rows = self._rows(pixels)
        count = rows.shape[0]
        gid = self.next_group
        self.next_group += 1
        self.groups[gid] = (epoch, start, pixels.shape[0])
        self.buf[self.n : self.n + count] = rows
        self.src[self.n : self.n + count, 0] = gid
        self.src[self.n : self.n + count, 1] = torch.arange(count)
        self.n += count
        self.stats.images += pixels.shape[0]
        self.stats.tokens_captured += count
        self.stats.vit_seconds += time.perf_counter() - t0
        return count

    def fill(self) -> None:
        """Refill the buffer to at least `buffer_tokens` tokens."""
        while self.n < self.buffer_tokens:
            self._capture_next()
        self._forget_spent_groups()

    def _forget_spent_groups(self) -> None:
        """Drop the records of image groups none of whose tokens is still buffered."""
        live = set(self.src[: self.n, 0].unique().tolist())
        self.groups = {g: v for g, v in self.groups.items() if g in live}

    def _is_cls(self, rows: torch.Tensor) -> torch.Tensor:
        """[N] rows of their group's capture -> [N] bool: the row is an image's CLS token (or a copy of it).

        A capture lays out each image's T' captured tokens, then its c CLS copies (see `_rows`)."""
        if self.tokens != "all":
            return torch.full(rows.shape, self.tokens == "cls", dtype=torch.bool)
        token = rows % self.tokens_per_image
        return (token == 0) | (token >= self.backbone.n_tokens)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def _split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 2, L, d] token rows -> (mlp_in, mlp_out), each [L, N, d] float32 contiguous."""
        pair = rows.permute(1, 2, 0, 3).float().contiguous()
        return pair[0], pair[1]

    def peek(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random sample of up to `n_tokens` buffered tokens, without consuming them (for normalisation)."""
        self.fill()
        n = min(n_tokens, self.n)
        pos = torch.randperm(self.n, generator=self.rng)[:n].to(self.device)
        return self._split(self.buf[pos])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `batch_tokens` tokens drawn at random from the buffer: (mlp_in, mlp_out) [L, N, d].

        `last_cls` [N] then marks which of them are CLS tokens."""
        if self.n < self.buffer_tokens // 2 or self.n < self.batch_tokens:
            self.fill()
        B, n = self.batch_tokens, self.n
        pos = torch.randperm(n, generator=self.rng)[:B]
        out = self.buf[pos.to(self.device)]  # advanced indexing: already a copy
        self.last_cls = self._is_cls(self.src[pos, 1]).to(self.device)
        # move the tail's unpicked tokens into the picked holes, so the valid part stays contiguous
        picked = torch.zeros(n, dtype=torch.bool)
        picked[pos] = True
        holes = pos[pos < n - B]
        tail = torch.arange(n - B, n)[~picked[n - B :]]
        if holes.numel():
            self.buf[holes.to(self.device)] = self.buf[tail.to(self.device)]
            self.src[holes] = self.src[tail]
        self.n = n - B
        self.stats.tokens_served += B
        return self._split(out)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------ resumable position
    def state_dict(self) -> dict[str, Any]:
        """Where the image stream stands (epoch, cursor), the sampling RNG, and the provenance of the
        buffered tokens: `src` [n, 2] (group id, row in that group's capture) and `groups` {id: (epoch,
        start, images)} for the groups still present. Small: 16 bytes per buffered token."""
        self._forget_spent_groups()
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "rng": self.rng.get_state(),
            "images": self.stats.images,
            "tokens_served": self.stats.tokens_served,
            "buffer": {"n": self.n, "src": self.src[: self.n].clone(), "groups": dict(self.groups), "next_group": self.next_group},
            **({"activations": key} if (key := self.source_key()) is not None else {}),
        }

    def source_key(self) -> str | None:
        """Where the rows come from: None for the ViT itself; an activation cache's key (training.cache)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken: the buffered tokens are recomputed from their images
        (see the module docstring). A state without `buffer` continues with an empty buffer."""
        saved, now = state.get("activations"), self.source_key()
        if saved != now:
            was = "the ViT stream" if saved is None else f"activation cache {saved}"
            raise ValueError(f"the run was trained from {was}, not from {'the ViT stream' if now is None else f'activation cache {now}'}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.rng.set_state(state["rng"])
        self.stats.images = int(state.get("images", 0))
        self.stats.tokens_served = int(state.get("tokens_served", 0))
        self.n, self._images = 0, None
        self.groups, self.next_group = {}, 0
        buffer = state.get("buffer")
        if buffer is None:
            return
        n, src = int(buffer["n"]), buffer["src"]
        if n > self.capacity or tuple(src.shape) != (n, 2):
            raise ValueError(f"the saved stream buffer holds {n} tokens (src {tuple(src.shape)}); this stream's capacity is {self.capacity}")
        missing = set(src[:, 0].unique().tolist()) - set(buffer["groups"])
        if missing:
            raise ValueError(f"the saved stream buffer refers to image groups it does not describe: {sorted(missing)[:5]}")
        for gid, (epoch, start, size) in sorted(buffer["groups"].items()):
            at = (src[:, 0] == gid).nonzero().squeeze(1)
            rows = self._rows(self._group_pixels(epoch, start, size))
            self.buf[at.to(self.device)] = rows[src[at, 1].to(rows.device)]
        self.src[:n] = src
        self.n = n
        self.groups = {int(g): tuple(v) for g, v in buffer["groups"].items()}  # type: ignore[misc]
        self.next_group = int(buffer["next_group"])

    def description(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "tokens_per_image": self.tokens_per_image,
            "cls_copies": self.cls_copies,
            "buffer_tokens": self.buffer_tokens,
            "images_per_batch": self.images_per_batch,
            "images": self.n_images,
        }
