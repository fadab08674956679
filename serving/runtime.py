"""In-process runtime of a bundle: ONNX Runtime + numpy + Pillow, no torch.

`BundleRuntime(bundle_dir)` validates the bundle, opens the image graph (`model.onnx` or a
variant) and the text graph once, on CUDA (with IO binding) when a GPU is present, else on CPU.
The HTTP service and the folder-scoring / monitoring tools all wrap this class.

Shapes: B images, C labels, D embedding dim, T = 2L + 3 terms, K = top_k_features; with spatial
maps S = spatial top-k classes, H heads, N = 1 + rows * columns tokens.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from bundle import INTERVENE_FILE, INTERVENE_MODES, MODEL_OUTPUTS, BundleError, Manifest, PatchSpec, SpatialSpec, load_bundle, model_outputs
from bundle.patches import DEFAULT_TOTAL_EFFECT_METHOD, total_effect_rows

from .atlas import Atlas
from .choice import AUTO, VariantChoice
from .intervene import EditSpace, InterventionUnavailable
from .intervene import intervene as run_intervention
from .preprocess import Preprocessor
from .results import RawOutputs, check_top_k, image_result
from .schemas import ClassMap, EditSet, ImageResult, SpatialExplanation, TotalEffectClass, TotalEffectMap, trusted
from .sessions import open_session, session_options
from .spatial import spatial_maps, total_effect_map
from .tokenizer import ClipTokenizer
from .variant_bench import BENCH_BUDGET_S, DEFAULT_BATCH_SIZES, resolve_variant

Device = Literal["auto", "cpu", "cuda"]
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
OUTPUT_NAMES = MODEL_OUTPUTS  # every output an image graph may have, in bundle order; a bundle's own: BundleRuntime.output_names


class LabelError(ValueError):
    """A user-supplied label set is unusable; the message names the problem."""


class RuntimeSetupError(RuntimeError):
    """The runtime could not be created (bad variant, CUDA requested but absent, ...)."""


class SpatialUnavailable(ValueError):
    """Spatial maps were required but the bundle has none (format 1, or exported with --spatial-top-k 0)."""


class TotalEffectUnavailable(ValueError):
    """The total-effect map was asked for but the bundle states no patch grid (a format-1 bundle without `patches`)."""


# labels with a total-effect map when the bundle has no spatial top-k to match
TOTAL_EFFECT_TOP_K = 5


def validate_labels(labels: Sequence[str]) -> list[str]:
    """Check a custom label set: 1..1000 labels, each 1..200 characters after stripping, no duplicates.

    Returns the stripped labels. Raises `LabelError` naming the first problem.
    """
    if isinstance(labels, str):
        raise LabelError("labels must be a list of strings, not a single string")
    labels = list(labels)
    if not labels:
        raise LabelError("labels is empty: give at least one label (or omit it for the bundle's labels)")
    if len(labels) > MAX_LABELS:
        raise LabelError(f"too many labels: {len(labels)} given, at most {MAX_LABELS} allowed")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(labels):
        if not isinstance(raw, str):
            raise LabelError(f"labels[{i}] is {type(raw).__name__}, expected a string")
        label = raw.strip()
        if not label:
            raise LabelError(f"labels[{i}] is an empty string")
        if len(label) > MAX_LABEL_CHARS:
            raise LabelError(f"labels[{i}] is {len(label)} characters long, at most {MAX_LABEL_CHARS} allowed")
        if label in seen:
            raise LabelError(f"duplicate label {label!r} (labels[{seen[label]}] and labels[{i}])")
        seen[label] = i
        out.append(label)
    return out


def cuda_present() -> bool:
    """True when this machine has an NVIDIA driver and this onnxruntime build has the CUDA provider."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


class LabelCache:
    """Label-set embeddings keyed by content, bounded in bytes, LRU; safe under concurrency.

    Keys are sha256 digests of the label set and templates (so a key's size does not depend on
    the labels'); an entry costs its array's bytes plus a fixed overhead. `get_or_compute` runs
    `compute` once per key even when several threads ask for the same new key at the same time
    (the others wait for it); a failing `compute` releases the key to the next caller.
    """

    ENTRY_OVERHEAD = 512  # dict slot, digest, array header (bytes, rounded up)

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._inflight: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        self.on_evict: Callable[[int], None] | None = None  # called with the number of sets just evicted (metrics)

    @staticmethod
    def key(labels: Sequence[str], templates: Sequence[str]) -> bytes:
        """Content key: sha256 over the length-prefixed UTF-8 labels and templates."""
        h = hashlib.sha256()
        for group in (labels, templates):
            h.update(len(group).to_bytes(4, "little"))
            for text in group:
                data = text.encode("utf-8")
                h.update(len(data).to_bytes(4, "little"))
                h.update(data)
        return h.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def get_or_compute(self, key: bytes, compute: Callable[[], np.ndarray]) -> np.ndarray:
        while True:
            with self._lock:
                value = self._data.get(key)
                if value is not None:
                    self._data.move_to_end(key)
                    return value
                waiting = self._inflight.get(key)
                if waiting is None:
                    self._inflight[key] = threading.Event()
                    break
            waiting.wait()  # another thread is computing this key; then look again
        try:
            value = compute()
            self.put(key, value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key).set()

    def put(self, key: bytes, value: np.ndarray) -> None:
        """Store `value` under `key` (LRU eviction down to the bound; an entry larger than the bound is not kept)."""
        cost = value.nbytes + self.ENTRY_OVERHEAD
        with self._lock:
            if cost > self.max_bytes:
                return  # larger than the whole cache: used once, not kept
            old = self._data.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes + self.ENTRY_OVERHEAD
            self._data[key] = value
            self.nbytes += cost
            evictions = 0
            while self.nbytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self.nbytes -= evicted.nbytes + self.ENTRY_OVERHEAD
                evictions += 1
        if evictions and self.on_evict is not None:
            self.on_evict(evictions)

    def __len__(self) -> int:
        return len(self._data)


class LabelEmbeddings:
    """Custom label-set embeddings within one byte budget, in two `LabelCache` tiers.

    `rows`: one float32 [D] row per (label, templates), the template-averaged, renormalised text
    embedding; it holds most of the budget. A label's row does not depend on the rest of its set, so a
    new set of known labels costs a stack of rows, not a run of the text encoder, and under traffic
    that draws sets from a vocabulary the memory is bounded by the vocabulary, not by the number of
    distinct sets. `sets`: the stacked float32 [C, D] arrays of recent sets (`SETS_SHARE` of the
    budget), so that a repeated set is the same array (the batcher groups jobs by it) at no cost.
    `embed(labels, templates) -> float32 [len(labels), D]` computes missing rows, one call per set.
    """

    SETS_SHARE = 1 / 16
    LOOP_STACK_MAX = 64  # `get` stacks cached rows for sets up to this size (cheap enough for an event loop)

    def __init__(self, max_bytes: int, embed: Callable[[list[str], list[str]], np.ndarray]) -> None:
        if max_bytes < 2:
            raise ValueError(f"max_bytes must be >= 2, got {max_bytes}")
        sets = max(1, int(max_bytes * self.SETS_SHARE))
        self.max_bytes = int(max_bytes)
        self.sets = LabelCache(sets)
        self.rows = LabelCache(self.max_bytes - sets)
        self._embed = embed

    @property
    def nbytes(self) -> int:
        return self.sets.nbytes + self.rows.nbytes

    @property
    def on_evict(self) -> Callable[[int], None] | None:
        return self.rows.on_evict

    @on_evict.setter
    def on_evict(self, fn: Callable[[int], None] | None) -> None:
        """Called with the number of label rows just evicted (metrics): what costs a text-graph run when
        asked again (the recent-sets tier turns over under any churn of sets, at no such cost)."""
        self.rows.on_evict = fn

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray | None:
        """The set's embeddings if they need no text encoder run: a cached set, or (sets of at most
        `LOOP_STACK_MAX` labels) every row cached; else None."""
        key = LabelCache.key(names, templates)
        out = self.sets.get(key)
        if out is not None or len(names) > self.LOOP_STACK_MAX:
            return out
        _, rows = self._cached_rows(names, templates)
        if any(r is None for r in rows):
            return None
        out = self._stacked(rows)
        self.sets.put(key, out)
        return out

    def get_or_compute(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """float32 [C, D] (read-only): cached rows, the missing ones computed in one `embed` call."""
        key = LabelCache.key(names, templates)
        return self.sets.get_or_compute(key, lambda: self._stack(list(names), list(templates)))

    def _cached_rows(self, names: Sequence[str], templates: Sequence[str]) -> tuple[list[bytes], list[np.ndarray | None]]:
        """Each label's row key, and its cached row or None."""
        keys = [LabelCache.key([n], templates) for n in names]
        return keys, [self.rows.get(k) for k in keys]

    def _stack(self, names: list[str], templates: list[str]) -> np.ndarray:
        keys, rows = self._cached_rows(names, templates)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            fresh = self._embed([names[i] for i in missing], templates)
            for j, i in enumerate(missing):
                row = np.array(fresh[j], dtype=np.float32)  # its own memory: a view would keep the whole batch alive
                row.setflags(write=False)
                self.rows.put(keys[i], row)
                rows[i] = row
        return self._stacked(rows)

    @staticmethod
    def _stacked(rows: list) -> np.ndarray:
        out = np.stack(rows).astype(np.float32, copy=False)
        out.setflags(write=False)
        return out


class BundleRuntime:
    """A loaded bundle: preprocessing, label embedding, the fused graph, and result building.

    `device`: 'auto' (CUDA when present, else CPU, chosen once), 'cpu' or 'cuda' (error if absent).
    `variant`: a key of the manifest's `variants` ('fp32', 'int8', 'fp16', ...), or 'auto': the fastest variant
    that passes the bundle's accuracy gate, timed here at the batch sizes `bench_batches` for at most about
    `bench_budget_s` seconds (serving/variant_bench.py, serving/choice.py); `variant` then holds the one
    served and `variant_choice` why. `variant_choice`: a choice made before (by cltvit-serve), kept as the
    record when it names the variant served.
    `threads`: ONNX Runtime intra-op threads (None: ORT's default).
    `io_binding`: run through an ORT IO binding (None: exactly when the provider is CUDA).
    `spinning`: let idle ORT threads busy-wait (ORT's default; False suits a server whose other
    threads need the CPU between batches).
    `label_cache_bytes`: bound of the custom label embeddings (`LabelEmbeddings`: rows per label, recent sets).
    `intervene`: open the bundle's intervention graph when it has one (False saves its memory).
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        device: Device = "auto",
        variant: str = "fp32",
        threads: int | None = None,
        label_cache_bytes: int = 64 << 20,
        verify_checksums: bool = True,
        io_binding: bool | None = None,
        spinning: bool = True,
        intervene: bool = True,
        bench_batches: Sequence[int] = DEFAULT_BATCH_SIZES,
        bench_budget_s: float = BENCH_BUDGET_S,
        variant_choice: VariantChoice | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise RuntimeSetupError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if threads is not None and threads < 1:
            raise RuntimeSetupError(f"threads must be >= 1, got {threads}")
        self.manifest: Manifest
        self.manifest, self.paths = load_bundle(bundle_dir, verify_checksums=verify_checksums)
        if variant != AUTO and variant not in self.paths.models:
            raise RuntimeSetupError(
                f"bundle {self.paths.root} has no {variant!r} variant (available: {AUTO}, {', '.join(sorted(self.paths.models))})"
            )
        self.bundle_dir = self.paths.root
        m = self.manifest
        self.term_names: list[str] = list(m.term_names)
        self.label_names: list[str] = list(m.labels.names)
        self.templates: list[str] = list(m.labels.templates)
        self.image_size: tuple[int, int] = (int(m.preprocess.image_size[0]), int(m.preprocess.image_size[1]))
        self.embed_dim = int(m.backbone.embed_dim)
        self.spatial: SpatialSpec | None = m.spatial
        self.patches: PatchSpec | None = m.effective_patches()  # grid and fill of patch deletion (None: no grid stated)
        self.output_names: list[str] = list(model_outputs(m.spatial is not None))
        self.preprocessor = Preprocessor(m.preprocess)
        self.tokenizer = ClipTokenizer(self.paths.vocab, m.tokenizer.context_length)
        self.default_text = np.ascontiguousarray(np.load(self.paths.labels, allow_pickle=False), dtype=np.float32)
        self.atlas: Atlas | None = Atlas(self.paths.atlas) if self.paths.atlas else None  # labels of the top features
        self.label_cache = LabelEmbeddings(label_cache_bytes, self._embed_label_set)

        use_cuda = device == "cuda" or (device == "auto" and cuda_present())
        opts = session_options(threads, spinning)
        try:
            self.variant_choice: VariantChoice
            self.variant_choice, opened = resolve_variant(
                self.manifest, self.paths, variant, lambda v: open_session(self.paths.model_for(v), opts, use_cuda, v),
                batch_sizes=bench_batches, budget_s=bench_budget_s)
            if variant_choice is not None and variant_choice.variant == self.variant_choice.variant:
                self.variant_choice = variant_choice  # resolved before this process started (cltvit-serve), with its figures
            self.variant = self.variant_choice.variant
            self.session = opened.pop(self.variant, None) or open_session(self.paths.model_for(self.variant), opts, use_cuda, self.variant)
            del opened  # the other variants' sessions, opened for the benchmark
            self.text_session = open_session(self.paths.text, opts, use_cuda)
            # the intervention graph (fp32; bundles without one serve everything else as before)
            self.intervene_disabled = not intervene and self.paths.intervene is not None
            self.intervene_session = (None if self.paths.intervene is None or not intervene else
                                      open_session(self.paths.intervene, opts, use_cuda))
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise RuntimeSetupError(f"ONNX Runtime could not open the graphs of {self.paths.root}: {exc}") from exc
        self.provider: str = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeSetupError("device='cuda' was requested but ONNX Runtime could not use CUDA on this machine")
        self.use_io_binding = (self.provider == "CUDAExecutionProvider") if io_binding is None else bool(io_binding)
        self._output_device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        if [o.name for o in self.session.get_outputs()] != self.output_names:
            raise BundleError(self.paths.root, [f"model outputs are {[o.name for o in self.session.get_outputs()]}, expected {self.output_names}"])

    # ------------------------------------------------------------------ preprocessing
    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 [H, W, 3] (`Preprocessor.resize_crop` of this bundle's spec)."""
        return self.preprocessor.resize_crop(image)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] (`Preprocessor.normalize`)."""
        return self.preprocessor.normalize(batch)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """PIL image -> float32 [3, H, W], identical to open_clip's eval transform."""
        return self.preprocessor(image)

    # ------------------------------------------------------------------ labels
    def embed_texts(self, prompts: Sequence[str], chunk: int = 256) -> np.ndarray:
        """float32 [N, D] L2-normalised text embeddings of prompts (text.onnx), in chunks."""
        outs = []
        for i in range(0, len(prompts), chunk):
            tokens = self.tokenizer(list(prompts[i : i + chunk]))
            (emb,) = self.text_session.run(["text_embeddings"], {"tokens": tokens})
            outs.append(np.asarray(emb, dtype=np.float32))
        return np.concatenate(outs) if outs else np.zeros((0, self.embed_dim), np.float32)

    def embed_labels(self, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None) -> np.ndarray:
        """float32 [C, D] class embeddings: mean of the normalised template embeddings, renormalised.

        `labels=None` (or the bundle's own labels with its templates) gives `labels.npy`. Custom sets
        are validated (`validate_labels`) and cached by content, per label and per recent set
        (`LabelEmbeddings`, bounded in bytes).
        """
        if labels is None:
            return self.default_text
        names = validate_labels(labels)
        tmpl = list(templates) if templates is not None else self.templates
        if not tmpl or any("{}" not in t for t in tmpl):
            raise LabelError("every template needs a '{}' slot for the label")
        if names == self.label_names and tmpl == self.templates:
            return self.default_text
        return self.label_cache.get_or_compute(names, tmpl)

    def cached_labels(self, names: Sequence[str]) -> np.ndarray | None:
        """The embeddings of an already validated label set with the bundle's templates, if cached (no compute)."""
        if list(names) == self.label_names:
            return self.default_text
        return self.label_cache.get(names, self.templates)

    def _embed_label_set(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        prompts = [t.format(n) for n in names for t in templates]
        emb = self.embed_texts(prompts).astype(np.float64).reshape(len(names), len(templates), -1).mean(1)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True).clip(min=1e-12)
        out = np.ascontiguousarray(emb, dtype=np.float32)
        out.setflags(write=False)
        return out

    # ------------------------------------------------------------------ inference
    def run(self, pixels: np.ndarray, text_embeddings: np.ndarray | None = None) -> RawOutputs:
        """pixels float32 [B, 3, H, W] (preprocessed), text [C, D] (default: the bundle's labels) -> outputs."""
        H, W = self.image_size
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, H, W) or pixels.shape[0] < 1:
            raise ValueError(f"pixels must be float32 [B>=1, 3, {H}, {W}], got shape {list(pixels.shape)}")
        text = self.default_text if text_embeddings is None else np.ascontiguousarray(text_embeddings, dtype=np.float32)
        if text.ndim != 2 or text.shape[1] != self.embed_dim or text.shape[0] < 1:
            raise ValueError(f"text_embeddings must be float32 [C>=1, {self.embed_dim}], got shape {list(text.shape)}")
        feeds = {"pixels": pixels, "text_embeddings": text}
        if self.use_io_binding:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, self._output_device)
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            outs = self.session.run(self.output_names, feeds)
        return RawOutputs(**{n: np.asarray(o) for n, o in zip(self.output_names, outs)})

    def results(
        self,
        raw: RawOutputs,
        label_names: Sequence[str],
        *,
        top_k: int | None = None,
        detail: bool = True,
        include_embedding: bool = False,
        spatial: bool = False,
        heads: bool = False,
        total_effect: Sequence[dict] | None = None,
    ) -> list[ImageResult]:
        """Turn raw outputs into one `ImageResult` per image (see schemas.py for the fields' units).

        `top_k` labels are reported (None: min(5, C)); it must be in [1, C]. `spatial` adds the maps of
        those top labels that the graph has maps for (the first `manifest.spatial.top_k`; none when the
        bundle has no spatial maps); `heads` also the per-head maps of the predicted label, and raises
        `SpatialUnavailable` when the bundle has no spatial maps. `total_effect`: each image's total-effect
        map dict (`total_effect`), put in the results as they are.
        """
        if heads and not raw.has_spatial:
            raise SpatialUnavailable(self.spatial_unavailable_message())
        C = raw.logits.shape[1]
        if len(label_names) != C:
            raise ValueError(f"{len(label_names)} label names for {C} logits")
        try:
            k = check_top_k(top_k, C)
        except ValueError as exc:
            raise LabelError(str(exc)) from None
        maps = self.spatial_maps(raw, label_names, k, heads) if (spatial or heads) and raw.has_spatial else None
        return [
            ImageResult.model_validate({**image_result(raw, b, label_names, self.term_names, k=k, detail=detail,
                                                       include_embedding=include_embedding, feature_label=self.feature_label),
                                        "spatial": _constructed(maps[b]) if maps is not None else None,
                                        "total_effect": _constructed_total(total_effect[b]) if total_effect is not None else None})
            for b in range(len(raw))
        ]

    def spatial_maps(self, raw: RawOutputs, label_names: Sequence[str], k: int | Sequence[int],
                     heads: bool | Sequence[bool] = False, arrays: bool = False) -> list[dict]:
        """The spatial maps of each image's top-k labels as plain dicts (`serving.spatial.spatial_maps`;
        `arrays=True`: grids as float32 arrays for `orjson`)."""
        if self.spatial is None or not raw.has_spatial:
            raise SpatialUnavailable(self.spatial_unavailable_message())
        return spatial_maps(raw, label_names, (int(self.spatial.grid[0]), int(self.spatial.grid[1])), k=k, heads=heads, arrays=arrays)

    def spatial_unavailable_message(self) -> str:
        return (f"bundle {self.bundle_dir} has no spatial maps (format {self.manifest.format_version}"
                f"{', exported with --spatial-top-k 0' if self.manifest.format_version >= 2 else ''}); "
                f"re-export it with cltvit-export to get them")

    def total_effect_unavailable_message(self) -> str:
        return (f"bundle {self.bundle_dir} states no patch grid (format {self.manifest.format_version}, no `patches` or "
                f"`spatial` block), so patches cannot be deleted; re-export it with cltvit-export to get the total-effect map")

    def run_logits(self, pixels: np.ndarray, text_embeddings: np.ndarray | None = None) -> np.ndarray:
        """The graph's logits alone, float32 [B, C], for preprocessed pixels [B, 3, H, W] (one ONNX Runtime call)."""
        H, W = self.image_size
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, H, W) or pixels.shape[0] < 1:
            raise ValueError(f"pixels must be float32 [B>=1, 3, {H}, {W}], got shape {list(pixels.shape)}")
        text = self.default_text if text_embeddings is None else np.ascontiguousarray(text_embeddings, dtype=np.float32)
        feeds = {"pixels": pixels, "text_embeddings": text}
        if self.use_io_binding:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("logits", self._output_device)
            self.session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0])
        return np.asarray(self.session.run(["logits"], feeds)[0])

    def total_effect_rows(self, pixels: np.ndarray) -> np.ndarray:
        """The edited copies of one preprocessed image [3, H, W] the total-effect map runs (`bundle.patches`,
        method keep_one, the bundle's fill): float32 [P + 1, 3, H, W]. Raises `TotalEffectUnavailable`."""
        if self.patches is None:
            raise TotalEffectUnavailable(self.total_effect_unavailable_message())
        return total_effect_rows(pixels, self.patches.fill, self.patches.grid, DEFAULT_TOTAL_EFFECT_METHOD)

    def total_effect(self, pixels: np.ndarray, text_embeddings: np.ndarray | None, label_names: Sequence[str],
                     logits: np.ndarray, k: int | Sequence[int], *, arrays: bool = False) -> list[dict]:
        """The total-effect map of each preprocessed image of `pixels` [B, 3, H, W] for its top `k` labels (at
        most the bundle's spatial top-k) as plain dicts (`serving.spatial.total_effect_map`): per image its
        P + 1 edited copies (`total_effect_rows`) through the graph as one batch. `logits` [B, C]: the
        images' own logits (from the explanation's run). Raises `TotalEffectUnavailable`."""
        if self.patches is None:
            raise TotalEffectUnavailable(self.total_effect_unavailable_message())
        cap = self.spatial.top_k if self.spatial is not None else TOTAL_EFFECT_TOP_K
        ks = [int(k)] * len(pixels) if isinstance(k, int) else [int(v) for v in k]
        out = []
        for b in range(len(pixels)):
            rows = self.run_logits(self.total_effect_rows(pixels[b]), text_embeddings)
            out.append(total_effect_map(rows, logits[b], label_names, min(ks[b], cap), self.patches, arrays=arrays))
        return out

    def feature_label(self, layer: int, index: int) -> dict[str, object]:
        """The atlas label fields of a top feature ({} without an atlas): label, label_source, low_confidence."""
        if self.atlas is None:
            return {}
        lab = self.atlas.label(layer, index)
        return {"label": lab.label, "label_source": lab.source, "low_confidence": lab.low_confidence}

    def explain(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[str] | None = None,
        top_k: int | None = None,
        detail: bool = True,
        *,
        include_embedding: bool = False,
        spatial: bool = False,
        heads: bool = False,
        total_effect: bool = False,
    ) -> list[ImageResult]:
        """Classify and explain PIL images in one batch against `labels` (default: the bundle's).

        `top_k` None reports min(5, C) labels; `detail` adds per-term explanations and top features;
        `spatial` / `heads` add the maps (see `results`); `total_effect` the total-effect map of the top
        labels (`total_effect`; raises `TotalEffectUnavailable` for a bundle without a patch grid).
        """
        if heads and self.spatial is None:
            raise SpatialUnavailable(self.spatial_unavailable_message())
        if total_effect and self.patches is None:
            raise TotalEffectUnavailable(self.total_effect_unavailable_message())
        if not images:
            return []
        names = self.label_names if labels is None else validate_labels(labels)
        text = self.embed_labels(None if labels is None else names)
        pixels = np.stack([self.preprocess(im) for im in images])
        raw = self.run(pixels, text)
        try:
            k = check_top_k(top_k, len(names))
        except ValueError as exc:
            raise LabelError(str(exc)) from None
        te = self.total_effect(pixels, text, names, raw.logits, k) if total_effect else None
        return self.results(raw, names, top_k=top_k, detail=detail, include_embedding=include_embedding,
                            spatial=spatial, heads=heads, total_effect=te)

    # ------------------------------------------------------------------ interventions (docs/intervene.md)
    def intervention_unavailable_message(self) -> str:
        if self.intervene_disabled:
            return "interventions are switched off on this server (cltvit-serve --no-intervene)"
        return (f"bundle {self.bundle_dir} has no intervention graph ({INTERVENE_FILE}; {self.manifest.mode} mode"
                f"{': interventions need cls or all mode' if self.manifest.mode not in INTERVENE_MODES else ''}); "
                f"re-export it with cltvit-export to get one")

    def edit_space(self) -> EditSpace:
        """What edits may name in this bundle; raises `InterventionUnavailable` without an intervention graph."""
        if self.intervene_session is None:
            raise InterventionUnavailable(self.intervention_unavailable_message())
        return EditSpace.of(self.manifest)

    def intervene_pixels(self, pixels: np.ndarray, text: np.ndarray, names: Sequence[str], sets: Sequence[EditSet], *,
                         k: int, check_linearity: bool = False) -> dict:
        """The fields of `InterveneResponse` (plain dicts) for one preprocessed image [3, H, W] and validated
        edit sets (`serving.intervene.parse_edit_sets`), against text [C, D] with label `names`."""
        space = self.edit_space()
        fill = self.patches.fill  # type: ignore[union-attr]  # the manifest requires a patch grid with an intervention graph
        return run_intervention(self.intervene_session, space, fill, pixels, text, names, sets, k=k,
                                check_linearity=check_linearity, feature_label=self.feature_label)

    def describe(self) -> dict:
        """Short description for logs and /info."""
        m = self.manifest
        return {
            "bundle": str(self.bundle_dir),
            "backbone": m.backbone.model,
            "mode": m.mode,
            "variant": self.variant,
            "variant_choice": self.variant_choice.summary(),
            "provider": self.provider,
            "labels": len(self.label_names),
            "terms": len(self.term_names),
            "spatial": None if self.spatial is None else self.spatial.model_dump(mode="json"),
            "patches": None if self.patches is None else self.patches.model_dump(mode="json"),
            "intervene": self.intervene_session is not None,
        }


def _constructed(spatial: dict) -> SpatialExplanation:
    """The model of `serving.spatial.spatial_maps`'s dict without validating it again (`trusted`): the
    dict is built here, from the graph's arrays, with the model's own field types (tested against
    `model_validate` in tests/serving/test_spatial_serving.py), and validating its hundreds of floats
    per label would cost about as much as building them (docs/spatial.md, "Cost")."""
    return trusted(SpatialExplanation, {**spatial, "grid": tuple(spatial["grid"]),
                                        "classes": [trusted(ClassMap, c) for c in spatial["classes"]]})


def _constructed_total(te: dict) -> TotalEffectMap:
    """The model of `serving.spatial.total_effect_map`'s dict without validating its floats again (as `_constructed`)."""
    return trusted(TotalEffectMap, {**te, "grid": tuple(te["grid"]), "fill": tuple(te["fill"]),
                                    "classes": [trusted(TotalEffectClass, c) for c in te["classes"]]})
