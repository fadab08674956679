"""The feature atlas (`cltvit-atlas`, docs/atlas.md): every CLT feature's statistics over a dataset, its direct
effect on the logits and automatic labels, written into a bundle as its optional `atlas/` part (bundle/atlas.py).

One pass over the images, in order, in batches: the ViT runs with the CLT spliced in as the bundle's
mode does (`training.model.decompose.splice_for_mode`), so the features are exactly the ones `/explain`
reports. Per feature it accumulates, in memory bounded by L x F x top_n (never by the dataset):
firing counts, a log-binned activation histogram, the top `top_n` images by CLS activation (and, in
`all` mode, by activation at any patch, with the patch), thumbnails of the images currently in some
top list, and the sum of a * (1/sigma) / ||e|| that turns the decoder direction into the mean
direct effect (below). Every `checkpoint_every` images the accumulators are written atomically to
`work_dir/state.npz` with the number of images done, so a killed run (even kill -9) resumes at the
last checkpoint: images before it are counted once, images after it are redone, none is missed.

Direct effect. In the additive decomposition (training/model/decompose.py) a feature of layer l with
activation a adds to logit c
    logit_scale * a * <m_f, t_c> / (sigma * ||e||),   m_f = ((w_f - mean(w_f)) * gamma) @ proj,
where w_f is its total residual write (`total_write_matrix`), gamma / sigma ln_post's scale and the
image's frozen standard deviation, e the embedding. `direction` = logit_scale * m_f * E[a / (sigma ||e||)
| active] is therefore, against any L2-normalised class embedding t_c, the feature's mean contribution
to that logit over the images where it fires (logit units). `strength` = max_c - mean_c of
<direction, t_c> over the bundle's classes.

Labels. Text: the cosine of `direction` with every vocabulary entry embedded by the bundle's own text
tower (`text.onnx`, the bundle's templates, averaged as the class embeddings are); the top matches,
their scores and the top-1 - top-2 margin. Where the direct effect is weak (strength < thresholds.weak_effect,
mostly early layers, which act through later layers) the label is the most frequent dataset class
among the top images instead (source "image-classes"); dead features get none.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from bundle import MANIFEST, Manifest, file_sha256, load_bundle
from bundle.atlas import (
    ATLAS_DIR,
    ATLAS_FILES,
    ATLAS_FORMAT_VERSION,
    HIST_HI,
    HIST_LO,
    HIST_PER_DECADE,
    LABEL_SOURCES,
    QUANTILE_LEVELS,
    AtlasInfo,
    hist_edges,
    parse_index,
)
from bundle.atomic import replaced, staged_directory, write_text_atomic
from bundle.killpoints import killpoint
from bundle.provenance import machine_info
from training.model.backbone import Backbone
from training.model.decompose import final_ln_map, frozen_inv_sigma, splice_for_mode
from training.model.vit import forward

from .vocab import DEFAULT_MIN_COUNT, build_vocab

STATE_FILE = "state.npz"


class AtlasError(ValueError):
    """The atlas cannot be built as asked; the message names the argument or file."""


@dataclass
class AtlasConfig:
    """What the atlas keeps and how labels are decided (docs/atlas.md)."""

    top_n: int = 16  # top images per feature
    label_matches: int = 5  # vocabulary matches kept per feature
    batch_size: int = 256
    checkpoint_every: int = 8192  # images between resume checkpoints
    thumb_max: int = 64  # thumbnails are at most this many pixels on their longer side
    examples_per_class: int = 2  # viewer examples: the first images of each dataset class
    max_examples: int = 24
    weak_effect: float = 0.05  # logits: a weaker mean direct effect labels by image classes (docs/atlas.md measures the cut)
    min_margin: float = 0.01  # text labels with a smaller top-1 - top-2 cosine margin are low-confidence
    min_class_fraction: float = 0.5  # image-class labels below this share of the top images are low-confidence
    vocab_min_count: int = DEFAULT_MIN_COUNT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- images
class ImageSource(Protocol):
    """Random access to a dataset in batches: `batch(start, stop)` -> (preprocessed pixels float32
    [B, 3, H, W], dataset classes int64 [B] (-1: unlabelled))."""

    class_names: Sequence[str] | None

    def __len__(self) -> int: ...

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]: ...

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]: ...

    def description(self) -> dict[str, Any]: ...


class TensorSource:
    """Pre-tensorised images (e.g. Fashion-MNIST via training.clip.tensorise)."""

    def __init__(self, pixels: torch.Tensor, classes: np.ndarray | torch.Tensor, class_names: Sequence[str] | None,
                 description: dict[str, Any]) -> None:
        self.pixels, self.classes = pixels, np.asarray(classes, dtype=np.int64)
        self.class_names = list(class_names) if class_names else None
        self._desc = description

    def __len__(self) -> int:
        return len(self.classes)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        return self.pixels[start:stop], self.classes[start:stop]

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return self.pixels[torch.from_numpy(idx)], self.classes[idx]

    def description(self) -> dict[str, Any]:
        return dict(self._desc)


class DatasetSource:
    """A `training.data` dataset (PIL images, labels) through the backbone's own eval transform."""

    def __init__(self, dataset: Any, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.dataset, self.preprocess = dataset, preprocess
        names = list(getattr(dataset, "class_names", []) or [])
        self.class_names = names or None

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        return self.take(range(start, stop))

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        items = [self.dataset[int(i)] for i in indices]
        return torch.stack([self.preprocess(im) for im, _ in items]), np.array([y for _, y in items], dtype=np.int64)

    def description(self) -> dict[str, Any]:
        return dict(self.dataset.description())


def to_uint8(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Preprocessed pixels [B, 3, H, W] -> what the model saw, uint8 [B, H, W, 3] (normalisation undone)."""
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    x = (pixels.float() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def thumbnail(image: np.ndarray, thumb_max: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], longer side at most `thumb_max` (area-averaged); unchanged when small."""
    H, W = image.shape[:2]
    if max(H, W) <= thumb_max:
        return image
    r = thumb_max / max(H, W)
    size = (max(1, round(W * r)), max(1, round(H * r)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


# ---------------------------------------------------------------------- features of a batch
@torch.no_grad()
def batch_features(visual: nn.Module, clt: nn.Module, pixels: torch.Tensor, mode: str) -> tuple[list[Any], torch.Tensor]:
    """(sparse codes of every layer over B x T' tokens (T' = 1, or all T tokens in `all` mode), weight [B] =
    1 / (sigma * ||e||) per image, so that a feature's contribution to logit c is logit_scale * a * weight * <m_f, t_c>)."""
    splice = splice_for_mode(clt, mode)  # type: ignore[arg-type]
    res = forward(visual, pixels, splice)
    weight = frozen_inv_sigma(visual.ln_post, res.cls_resid)[:, 0] / res.embedding.norm(dim=-1)
    return list(splice.codes), weight


# ---------------------------------------------------------------------- streaming accumulators
def _merge_top(top_act: torch.Tensor, top_ref: torch.Tensor, acts: torch.Tensor, refs: torch.Tensor,
               extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Merge per-feature top lists [L, F, N] with a batch's candidates [L, F, B] (refs [B] broadcast), keeping
    the N largest positive activations; ref -1 where there is none. `extra` = (kept [L, F, N], batch [L, F, B])
    is carried along (the patch token)."""
    L, F, N = top_act.shape
    B = acts.shape[-1]
    cand_act = torch.cat([top_act, acts], dim=-1)
    cand_ref = torch.cat([top_ref, refs.view(1, 1, B).expand(L, F, B)], dim=-1)
    val, pos = cand_act.topk(N, dim=-1)
    ref = cand_ref.gather(-1, pos)
    ref = torch.where(val > 0, ref, torch.full_like(ref, -1))
    val = torch.where(val > 0, val, torch.zeros_like(val))
    if extra is None:
        return val, ref
    tok = torch.cat([extra[0], extra[1]], dim=-1).gather(-1, pos)
    return val, ref, torch.where(val > 0, tok, torch.full_like(tok, -1))


class Accumulator:
    """Per-feature running statistics over the images seen so far (module docstring); memory O(L F (N + NB))
    plus at most L F N thumbnails."""

    def __init__(self, n_layers: int, n_features: int, top_n: int, patches: bool) -> None:
        L, F, N = n_layers, n_features, top_n
        self.n_done = 0
        self.edges_inner = torch.from_numpy(hist_edges()[1:-1])
        nb = len(self.edges_inner) + 1
        self.fire_count = torch.zeros(L, F, dtype=torch.int64)
        self.act_sum = torch.zeros(L, F, dtype=torch.float64)
        self.act_max = torch.zeros(L, F, dtype=torch.float32)
        self.weighted_sum = torch.zeros(L, F, dtype=torch.float64)  # sum of a / (sigma ||e||) over active images
        self.hist = torch.zeros(L, F, nb, dtype=torch.int64)
        self.top_act = torch.zeros(L, F, N)
        self.top_ref = torch.full((L, F, N), -1, dtype=torch.int64)
        self.patches = patches
        if patches:
            self.patch_fire_count = torch.zeros(L, F, dtype=torch.int64)
            self.ptop_act = torch.zeros(L, F, N)
            self.ptop_ref = torch.full((L, F, N), -1, dtype=torch.int64)
            self.ptop_token = torch.full((L, F, N), -1, dtype=torch.int64)
        self.thumbs: dict[int, np.ndarray] = {}  # dataset index -> uint8 [h, w, 3], for images in some top list
        self.classes: dict[int, int] = {}
        self.examples: list[tuple[int, int, np.ndarray]] = []  # (dataset index, class, uint8 [H, W, 3])

    TENSORS = ("fire_count", "act_sum", "act_max", "weighted_sum", "hist", "top_act", "top_ref")
    PATCH_TENSORS = ("patch_fire_count", "ptop_act", "ptop_ref", "ptop_token")

    def update(self, start: int, codes: Sequence[Any], weight: torch.Tensor, images: np.ndarray, classes: np.ndarray,
               cfg: AtlasConfig) -> None:
        """Add the batch of images start..start+B-1: `codes` per layer over B x T' tokens, `weight` [B],
        `images` uint8 [B, H, W, 3] (what the model saw), `classes` [B]."""
        B = len(weight)
        L, F = self.fire_count.shape
        refs = torch.arange(start, start + B, dtype=torch.int64)
        dense = torch.zeros(L, B, F)
        for l, code in enumerate(codes):
            idx = code.idx.reshape(B, -1, code.idx.shape[-1])
            val = code.val.reshape(B, -1, code.val.shape[-1]).float()
            dense[l].scatter_add_(1, idx[:, 0], val[:, 0])  # the CLS token
            if self.patches:
                self._update_patches(l, idx[:, 1:], val[:, 1:], refs)
        fired = dense > 0
        self.fire_count += fired.sum(1)
        self.act_sum += dense.sum(1, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, dense.amax(1))
        self.weighted_sum += (dense.double() * weight.double()[None, :, None]).sum(1)
        l_idx, b_idx, f_idx = fired.nonzero(as_tuple=True)
        bins = torch.bucketize(dense[l_idx, b_idx, f_idx].double(), self.edges_inner)
        nb = self.hist.shape[-1]
        self.hist.view(-1).index_put_(((l_idx * F + f_idx) * nb + bins,), torch.ones_like(bins), accumulate=True)
        self.top_act, self.top_ref = _merge_top(self.top_act, self.top_ref, dense.permute(0, 2, 1), refs)
        self._keep_thumbs(start, images, classes, cfg)
        self._keep_examples(start, images, classes, cfg)
        self.n_done = start + B

    def _update_patches(self, l: int, idx: torch.Tensor, val: torch.Tensor, refs: torch.Tensor) -> None:
        """Patch tokens of layer l: idx / val [B, T-1, k]. Keeps, per image, each feature's largest patch activation
        and the first patch (lowest token) reaching it."""
        B, P, k = idx.shape
        F = self.fire_count.shape[1]
        on = val > 0
        self.patch_fire_count[l] += torch.bincount(idx[on], minlength=F)
        flat_idx, flat_val = idx.reshape(B, P * k), val.reshape(B, P * k)
        vmax = torch.zeros(B, F).scatter_reduce_(1, flat_idx, flat_val, "amax", include_self=True)
        tokens = torch.arange(1, P + 1).view(1, P, 1).expand(B, P, k)
        at_max = on & (val == vmax.gather(1, flat_idx).view(B, P, k))
        b = torch.arange(B).view(B, 1, 1).expand(B, P, k)
        tok = torch.full((B * F,), P + 1, dtype=torch.int64)
        tok.scatter_reduce_(0, (b * F + idx)[at_max], tokens[at_max], "amin")
        tok = torch.where(vmax.view(-1) > 0, tok, torch.full_like(tok, -1)).view(B, F)
        act, ref, token = _merge_top(self.ptop_act[l : l + 1], self.ptop_ref[l : l + 1], vmax.T[None], refs,
                                     (self.ptop_token[l : l + 1], tok.T[None]))
        self.ptop_act[l], self.ptop_ref[l], self.ptop_token[l] = act[0], ref[0], token[0]

    def referenced(self) -> np.ndarray:
        refs = [self.top_ref.numpy().ravel()]
        if self.patches:
            refs.append(self.ptop_ref.numpy().ravel())
        u = np.unique(np.concatenate(refs))
        return u[u >= 0]

    def _keep_thumbs(self, start: int, images: np.ndarray, classes: np.ndarray, cfg: AtlasConfig) -> None:
        """Thumbnails of the batch's images that entered a top list; drop those of images that left every list."""
        keep = self.referenced()
        for r in keep[(keep >= start) & (keep < start + len(images))]:
            self.thumbs[int(r)] = thumbnail(images[r - start], cfg.thumb_max)
            self.classes[int(r)] = int(classes[r - start])
        keep_set = set(keep.tolist())
        for r in [r for r in self.thumbs if r not in keep_set]:
            del self.thumbs[r], self.classes[r]

    def _keep_examples(self, start: int, images: np.ndarray, classes: np.ndarray, cfg: AtlasConfig) -> None:
        per_class: dict[int, int] = {}
        for _, c, _ in self.examples:
            per_class[c] = per_class.get(c, 0) + 1
        for i, c in enumerate(classes.tolist()):
            limit = cfg.max_examples if c < 0 else cfg.examples_per_class
            if len(self.examples) < cfg.max_examples and per_class.get(c, 0) < limit:
                self.examples.append((start + i, c, images[i].copy()))
                per_class[c] = per_class.get(c, 0) + 1

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        names = self.TENSORS + (self.PATCH_TENSORS if self.patches else ())
        out = {n: getattr(self, n).numpy() for n in names}
        refs = np.array(sorted(self.thumbs), dtype=np.int64)
        out["thumb_ref"] = refs
        out["thumb_class"] = np.array([self.classes[int(r)] for r in refs], dtype=np.int64)
        out["thumbs"] = np.stack([self.thumbs[int(r)] for r in refs]) if len(refs) else np.zeros((0, 1, 1, 3), np.uint8)
        out["example_ref"] = np.array([e[0] for e in self.examples], dtype=np.int64)
        out["example_class"] = np.array([e[1] for e in self.examples], dtype=np.int64)
        out["examples"] = np.stack([e[2] for e in self.examples]) if self.examples else np.zeros((0, 1, 1, 3), np.uint8)
        out["n_done"] = np.array(self.n_done, dtype=np.int64)
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        for n in self.TENSORS + (self.PATCH_TENSORS if self.patches else ()):
            setattr(self, n, torch.from_numpy(np.array(state[n])))
        self.thumbs = {int(r): t for r, t in zip(state["thumb_ref"], state["thumbs"])}
        self.classes = {int(r): int(c) for r, c in zip(state["thumb_ref"], state["thumb_class"])}
        self.examples = [(int(r), int(c), e) for r, c, e in zip(state["example_ref"], state["example_class"], state["examples"])]
        self.n_done = int(state["n_done"])


def save_state(path: Path, acc: Accumulator, key: dict[str, Any]) -> None:
    """Write the accumulators and the run's key atomically (tmp file, fsync, rename)."""
    with replaced(path, suffix=".tmp.npz", fsync=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), **acc.state())
        killpoint("atlas.state_tmp_written")  # crash-safety tests stop the process here (bundle.killpoints)


def load_state(path: Path, key: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The saved state if `path` holds one made with the same key; AtlasError if made with another."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        saved = json.loads(str(z["key"]))
        if saved != json.loads(json.dumps(key, sort_keys=True)):
            diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
            raise AtlasError(f"argument --work: {path.parent} holds an unfinished atlas run made with other arguments "
                             f"(differing: {', '.join(diff)}); rerun with the same ones to resume, or pass --overwrite")
        return {k: z[k] for k in z.files if k != "key"}


# ---------------------------------------------------------------------- text tower
def embed_vocab(text_graph: Path, tokenizer: Callable[[list[str]], torch.Tensor], words: Sequence[str], templates: Sequence[str],
                chunk: int = 512, threads: int = 1) -> np.ndarray:
    """float32 [V, D]: each word through the bundle's text graph with every template, normalised embeddings
    averaged and renormalised (the recipe of the bundle's class embeddings)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(str(text_graph), opts, providers=["CPUExecutionProvider"])
    prompts = [t.format(w) for w in words for t in templates]
    outs = []
    for i in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[i : i + chunk]).numpy().astype(np.int64)
        (emb,) = sess.run(["text_embeddings"], {"tokens": tokens})
        outs.append(np.asarray(emb, dtype=np.float64))
    emb = np.concatenate(outs).reshape(len(words), len(templates), -1).mean(1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True).clip(min=1e-12)
    return emb.astype(np.float32)


# ---------------------------------------------------------------------- finalising
def quantiles_from_hist(hist: np.ndarray, act_max: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """float32 [..., Q] activation quantiles read off log-binned histograms [..., NB] (geometric interpolation in
    the bin, capped at the exact maximum); NaN where the histogram is empty."""
    edges = hist_edges()
    n = hist.sum(-1, keepdims=True).astype(np.float64)
    cum = np.cumsum(hist, axis=-1).astype(np.float64)
    out = np.full((*hist.shape[:-1], len(levels)), np.nan, dtype=np.float64)
    for qi, q in enumerate(levels):
        target = q * n  # [..., 1]
        b = np.minimum((cum < target).sum(-1), hist.shape[-1] - 1)  # first bin whose cumulative count reaches the target
        before = np.take_along_axis(cum, np.maximum(b - 1, 0)[..., None], -1)[..., 0] * (b > 0)
        inbin = np.take_along_axis(hist, b[..., None], -1)[..., 0].astype(np.float64)
        frac = np.clip((target[..., 0] - before) / np.maximum(inbin, 1), 0, 1)
        lo, hi = edges[b], edges[b + 1]
        out[..., qi] = np.minimum(lo * (hi / lo) ** frac, act_max)
    out[n[..., 0] == 0] = np.nan
    return out.astype(np.float32)


def _majority(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent non-negative value along the last axis of int [..., N] (ties: the smallest), and its share
    of the non-negative entries; (-1, 0) where there is none."""
    n_cls = int(classes.max()) + 1 if classes.size and classes.max() >= 0 else 0
    valid = (classes >= 0).sum(-1)
    if n_cls == 0:
        return np.full(classes.shape[:-1], -1, np.int64), np.zeros(classes.shape[:-1], np.float32)
    counts = np.zeros((*classes.shape[:-1], n_cls), np.int64)
    for c in range(n_cls):
        counts[..., c] = (classes == c).sum(-1)
    best = counts.argmax(-1)
    frac = np.take_along_axis(counts, best[..., None], -1)[..., 0] / np.maximum(valid, 1)
    return np.where(valid > 0, best, -1), np.where(valid > 0, frac, 0).astype(np.float32)


@dataclass
class AtlasInputs:
    """What finalising needs besides the accumulators: the model pieces and the bundle's embeddings."""

    visual: nn.Module
    clt: nn.Module
    logit_scale: float
    label_names: list[str]
    label_emb: np.ndarray  # [C, D] the bundle's class embeddings
    vocab: list[str]
    vocab_source: str
    vocab_templates: list[str]
    vocab_emb: np.ndarray  # [V, D]


def finalise(acc: Accumulator, inp: AtlasInputs, cfg: AtlasConfig, index_extra: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(atlas.json content, features.npz arrays, images.npz arrays) from the accumulated statistics."""
    L, F = acc.fire_count.shape
    fire = acc.fire_count.numpy()
    live = fire > 0
    act_mean = np.where(live, acc.act_sum.numpy() / np.maximum(fire, 1), 0).astype(np.float32)
    act_max = acc.act_max.numpy()
    hist = acc.hist.numpy()
    mean_weight = np.where(live, acc.weighted_sum.numpy() / np.maximum(fire, 1), 0)  # E[a / (sigma ||e||) | active]
    with torch.no_grad():
        # residual writes -> embedding directions, the image's 1/sigma left out (it is in mean_weight)
        m = torch.stack([final_ln_map(inp.visual, inp.clt.total_write_matrix(l).float(), 1.0, shift=False)
                         for l in range(L)])  # [L, F, D]
    direction = (inp.logit_scale * m.double().cpu().numpy() * mean_weight[..., None]).astype(np.float32)
    effects = direction @ inp.label_emb.T.astype(np.float32)  # [L, F, C]
    strength = (effects.max(-1) - effects.mean(-1)).astype(np.float32)
    # text labels: cosine of the direction with every vocabulary entry, in chunks of features
    M = min(cfg.label_matches, len(inp.vocab))
    norm = np.linalg.norm(direction, axis=-1, keepdims=True)
    unit = np.where(norm > 0, direction / np.maximum(norm, 1e-30), 0).reshape(L * F, -1)
    text_index = np.full((L * F, M), -1, np.int32)
    text_score = np.full((L * F, M), np.nan, np.float32)
    for s in range(0, L * F, 4096):
        sc = unit[s : s + 4096] @ inp.vocab_emb.T  # [n, V]
        top = np.argpartition(-sc, M - 1, axis=1)[:, :M]
        order = np.argsort(-np.take_along_axis(sc, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        text_index[s : s + 4096], text_score[s : s + 4096] = top, np.take_along_axis(sc, top, 1)
    dead = ~live.reshape(-1)
    text_index[dead], text_score[dead] = -1, np.nan
    text_index, text_score = text_index.reshape(L, F, M), text_score.reshape(L, F, M)
    margin = (text_score[..., 0] - text_score[..., 1]).astype(np.float32)
    # image table: the images of the top lists, in dataset order
    rows = np.array(sorted(acc.thumbs), dtype=np.int64)
    thumbs = _thumb_table([acc.thumbs[int(r)] for r in rows])
    image_class = np.array([acc.classes[int(r)] for r in rows], dtype=np.int64)

    def to_rows(refs: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(rows, np.maximum(refs, 0))
        return np.where(refs >= 0, pos, -1).astype(np.int32)

    top_image = to_rows(acc.top_ref.numpy())
    class_index, class_fraction = _majority(np.where(top_image >= 0, image_class[np.maximum(top_image, 0)] if len(rows) else -1, -1))
    # label source and confidence
    weak_effect = float(cfg.weak_effect)
    weak = strength < weak_effect
    labelled = class_index >= 0
    source = np.where(~live, LABEL_SOURCES.index("none"), np.where(weak & labelled, LABEL_SOURCES.index("image-classes"),
                                                                    LABEL_SOURCES.index("text"))).astype(np.uint8)
    low = np.where(source == LABEL_SOURCES.index("text"), weak | (margin < cfg.min_margin),
                   np.where(source == LABEL_SOURCES.index("image-classes"), class_fraction < cfg.min_class_fraction, True))
    features = {
        "fire_count": fire.astype(np.int64), "act_mean": act_mean, "act_max": act_max.astype(np.float32),
        "quantiles": quantiles_from_hist(hist, act_max, QUANTILE_LEVELS), "hist": hist.astype(np.int32),
        "direction": direction, "strength": strength, "top_image": top_image, "top_act": acc.top_act.numpy().astype(np.float32),
        "text_index": text_index, "text_score": text_score, "margin": margin, "class_index": class_index.astype(np.int32),
        "class_fraction": class_fraction, "label_source": source, "low_confidence": low.astype(bool),
    }
    if acc.patches:
        features.update({"patch_fire_count": acc.patch_fire_count.numpy(), "ptop_image": to_rows(acc.ptop_ref.numpy()),
                         "ptop_act": acc.ptop_act.numpy().astype(np.float32), "ptop_token": acc.ptop_token.numpy().astype(np.int32)})
    ex = acc.examples
    images = {
        "thumbs": thumbs, "image_class": image_class, "image_ref": rows,
        "examples": np.stack([e[2] for e in ex]) if ex else np.zeros((0, *index_extra["image_size"], 3), np.uint8),
        "example_class": np.array([e[1] for e in ex], dtype=np.int64), "example_ref": np.array([e[0] for e in ex], dtype=np.int64),
    }
    index = {
        "format_version": ATLAS_FORMAT_VERSION, "n_layers": L, "n_features": F, "embed_dim": int(direction.shape[-1]),
        "top_n": int(acc.top_act.shape[-1]), "label_matches": M, "images": acc.n_done, "labels": list(inp.label_names),
        "hist": {"lo": HIST_LO, "hi": HIST_HI, "per_decade": HIST_PER_DECADE, "bins": int(hist.shape[-1])},
        "quantile_levels": list(QUANTILE_LEVELS),
        "vocab": {"source": inp.vocab_source, "words": list(inp.vocab), "templates": list(inp.vocab_templates)},
        "thresholds": {"weak_effect": weak_effect, "min_margin": cfg.min_margin, "min_class_fraction": cfg.min_class_fraction},
        **{k: v for k, v in index_extra.items() if k != "image_size"},
    }
    parse_index(index)  # fail here, not in the server
    return index, features, images


def _thumb_table(thumbs: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 [U, h, w, c] from thumbnails [h, w, 3]; c = 1 when every thumbnail is gray (grayscale data)."""
    if not thumbs:
        return np.zeros((0, 1, 1, 1), np.uint8)
    table = np.stack(thumbs)
    gray = np.array_equal(table[..., 0], table[..., 1]) and np.array_equal(table[..., 0], table[..., 2])
    return table[..., :1] if gray else table


REF_ARRAYS = ("image_ref", "image_class", "example_ref", "example_class")


def images_from_refs(source: ImageSource, refs: dict[str, np.ndarray], *, thumb_max: int, mean: Sequence[float], std: Sequence[float],
                     chunk: int = 2048) -> dict[str, np.ndarray]:
    """images.npz rebuilt from the dataset indices it refers to (`REF_ARRAYS`): the thumbnails and examples the
    streaming pass made, byte for byte, for an atlas shipped without its pictures."""
    thumbs: list[np.ndarray] = []
    for s in range(0, len(refs["image_ref"]), chunk):
        pixels, _ = source.take(refs["image_ref"][s : s + chunk])
        thumbs += [thumbnail(im, thumb_max) for im in to_uint8(pixels, mean, std)]
    if len(refs["example_ref"]):
        examples = to_uint8(source.take(refs["example_ref"])[0], mean, std)
    else:
        examples = np.zeros((0, *source.take([0])[0].shape[-2:], 3), np.uint8)
    return {"thumbs": _thumb_table(thumbs), "image_class": refs["image_class"], "image_ref": refs["image_ref"],
            "examples": examples, "example_class": refs["example_class"], "example_ref": refs["example_ref"]}


def write_atlas_files(out_dir: Path, index: dict[str, Any], features: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> Path:
    """Write atlas.json, features.npz, images.npz (bundle/atlas.py) into `out_dir`/atlas; returns that folder."""
    d = Path(out_dir) / ATLAS_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "atlas.json").write_text(json.dumps(index, indent=1, default=float) + "\n")
    np.savez_compressed(d / "features.npz", **features)
    np.savez_compressed(d / "images.npz", **images)
    return d


# ---------------------------------------------------------------------- into a bundle
def portable(description: dict[str, Any]) -> dict[str, Any]:
    """A dataset description without this machine's paths (a bundle travels): `root` becomes the folder's name."""
    out = dict(description)
    if isinstance(out.get("root"), str):
        out["root"] = Path(out["root"]).name
    return out


def _write_manifest(root: Path, raw: dict[str, Any]) -> None:
    Manifest.model_validate(raw)
    write_text_atomic(root / MANIFEST, json.dumps(raw, indent=2))


def attach_atlas(bundle_dir: str | Path, atlas_dir: str | Path) -> Path:
    """Copy atlas files (a folder with atlas.json, features.npz, images.npz) into a bundle and list them in its
    manifest (checksums and the `atlas` block). Crash-safe: the manifest first drops any old atlas, then the files
    are replaced, then the manifest names the new ones; every intermediate state is a valid bundle.
    Returns the bundle directory, validated."""
    root, src = Path(bundle_dir).resolve(), Path(atlas_dir)
    m, _ = load_bundle(root, check_graphs=False)
    index = parse_index(json.loads((src / "atlas.json").read_text()))
    if m.clt.sha256 is None:
        raise AtlasError(f"bundle {root} records no CLT checkpoint sha256 (exported without a checkpoint): an atlas is tied to one")
    raw = json.loads((root / MANIFEST).read_text())
    raw.pop("atlas", None)
    for name in ATLAS_FILES:
        raw["files"].pop(name, None)
    _write_manifest(root, raw)
    dst = root / ATLAS_DIR
    with staged_directory(dst) as tmp:
        for name in ATLAS_FILES:
            shutil.copyfile(src / Path(name).name, tmp / Path(name).name)
    for name in ATLAS_FILES:
        raw["files"][name] = file_sha256(root / name)
    raw["atlas"] = AtlasInfo(clt_sha256=index.clt_sha256, backbone_weights_sha256_16=index.backbone_weights_sha256_16,
                             mode=index.mode).model_dump()
    _write_manifest(root, raw)
    load_bundle(root, check_graphs=False)
    return root


def build_atlas(
    backbone: Backbone,
    clt: nn.Module,
    bundle_dir: str | Path,
    source: ImageSource,
    *,
    clt_sha256: str | None,
    cfg: AtlasConfig | None = None,
    limit: int | None = None,
    vocab_file: str | Path | None = None,
    work_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure the atlas of `clt` over `source` (first `limit` images) and attach it to the bundle (or, with
    `out_dir`, only write the files there). Resumable through `work_dir` (default: `<bundle>.atlas-work`,
    removed when done). Returns atlas.json's content."""
    cfg = cfg or AtlasConfig()
    root = Path(bundle_dir).resolve()
    m, paths = load_bundle(root, check_graphs=False)
    ident = backbone.identity()
    if ident["weights_sha256_16"] != m.backbone.weights_sha256_16:
        raise AtlasError(f"argument --pretrained: the backbone's weights ({ident['weights_sha256_16']}) are not the bundle's "
                         f"({m.backbone.weights_sha256_16}, {m.backbone.model} pretrained={m.backbone.pretrained})")
    if m.clt.sha256 is None:
        raise AtlasError(f"argument --bundle: {root} records no CLT checkpoint sha256 (exported without one); "
                         f"an atlas is tied to the checkpoint: export the bundle from a saved CLT")
    if clt_sha256 != m.clt.sha256:
        raise AtlasError(f"argument --clt: the checkpoint's sha256 {str(clt_sha256)[:12]}... is not the bundle's CLT "
                         f"({m.clt.sha256[:12]}..., checkpoint {m.clt.checkpoint!r})")
    n = len(source) if limit is None else min(limit, len(source))
    if n < 1:
        raise AtlasError("argument --limit: no images to measure (the dataset is empty or --limit < 1)")
    if cfg.top_n < 1 or cfg.batch_size < 1 or cfg.label_matches < 2 or cfg.checkpoint_every < 1:
        raise AtlasError("--top-n, --batch-size and the checkpoint interval must be >= 1, label matches >= 2")
    vocab, vocab_source = build_vocab(m.labels.names, vocab_file, cfg.vocab_min_count)
    visual = backbone.visual
    patches = m.mode == "all"
    gh, gw = visual.grid_size
    key = {"bundle_model_sha256": m.files["model.onnx"], "clt_sha256": m.clt.sha256, "mode": m.mode, "images": n,
           "dataset": source.description(), "batch_size": cfg.batch_size, "top_n": cfg.top_n, "thumb_max": cfg.thumb_max,
           "examples": [cfg.examples_per_class, cfg.max_examples]}
    work = Path(work_dir) if work_dir else root.with_name(root.name + ".atlas-work")
    if overwrite and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    acc = Accumulator(clt.cfg.n_layers, clt.cfg.n_features, cfg.top_n, patches)
    state = load_state(work / STATE_FILE, key)
    if state is not None:
        acc.load(state)
        log(f"cltvit-atlas: resuming after {acc.n_done} of {n} images ({work / STATE_FILE})")
    t0 = time.perf_counter()
    clt = clt.to(backbone.device).eval()
    mean, std = m.preprocess.mean, m.preprocess.std
    bar = tqdm(total=n, initial=acc.n_done, unit="img", desc="cltvit-atlas", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    last_ckpt = acc.n_done
    for start in range(acc.n_done, n, cfg.batch_size):
        stop = min(start + cfg.batch_size, n)
        pixels, classes = source.batch(start, stop)
        codes, weight = batch_features(visual, clt, pixels.to(backbone.device), m.mode)
        codes = [type(c)(c.idx.cpu(), c.val.cpu()) for c in codes]
        acc.update(start, codes, weight.cpu(), to_uint8(pixels.cpu(), mean, std), classes, cfg)
        bar.update(stop - start)
        if acc.n_done - last_ckpt >= cfg.checkpoint_every and acc.n_done < n:
            save_state(work / STATE_FILE, acc, key)
            last_ckpt = acc.n_done
            killpoint("atlas.checkpoint_written")
    bar.close()
    save_state(work / STATE_FILE, acc, key)  # the pass is done; labelling below is cheap to redo
    stream_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    templates = list(m.labels.templates)
    vocab_emb = embed_vocab(paths.text, backbone.tokenizer, vocab, templates)
    label_emb = np.load(paths.labels, allow_pickle=False)
    inp = AtlasInputs(visual, clt, float(m.logit_scale), list(m.labels.names), label_emb, vocab, vocab_source, templates, vocab_emb)
    extra = {"clt_sha256": m.clt.sha256, "backbone_weights_sha256_16": m.backbone.weights_sha256_16, "mode": m.mode,
             "dataset": portable(source.description()), "class_names": source.class_names, "patch_grid": [gh, gw] if patches else None,
             "image_size": tuple(m.preprocess.image_size),
             "build": {"command": command, "stream_seconds": stream_s, "label_seconds": None, "config": cfg.to_dict(),
                       "machine": machine_info(torch.get_num_threads()), "created": time.strftime("%Y-%m-%d %H:%M:%S")}}
    index, features, images = finalise(acc, inp, cfg, extra)
    index["build"]["label_seconds"] = time.perf_counter() - t1
    files_dir = Path(out_dir) if out_dir else work
    adir = write_atlas_files(files_dir, index, features, images)
    if out_dir is None:
        attach_atlas(root, adir)
        shutil.rmtree(work, ignore_errors=True)
    live = int((features["fire_count"] > 0).sum())
    log(f"cltvit-atlas: {live} of {features['fire_count'].size} features active over {n} images; "
        f"{len(images['thumbs'])} thumbnails; pass {stream_s:.1f} s, labels {index['build']['label_seconds']:.1f} s")
    return index
