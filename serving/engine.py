"""The per-request work of the image endpoints around one `MicroBatcher` and one `BundleRuntime`.

    engine = ServingEngine(settings)
    response = await engine.answer("explain", image_request)   # a starlette Response: 200, 4xx or 503

Per request, on the event loop: check top_k against the label set, look up (or embed, in a
thread) the label set's text embeddings, decode and resize the image (inline when the upload is
small, else in a thread), and queue it; a request alone in the worker (no other in flight, model
idle) runs its model call right there instead. Per batch, in the batcher's thread: group the images by
label set, one ONNX Runtime call per group (and, for each /explain asking for `total_effect`, one
more call on its patches + 1 edited copies), build each image's result (and, for /explain, its
spatial maps, vectorised over the group) as plain dicts and encode it to JSON once (pydantic-core),
record the metrics. Each request gets the answer of its own
label set, whatever else shared its batch.
"""
from __future__ import annotations

import asyncio
import gc
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread
import numpy as np
import orjson
from PIL import Image
from starlette.responses import JSONResponse, Response

from .batcher import MicroBatcher, Overloaded
from .guard import log_client_error
from .images import ImageError, decode_image
from .inputs import MAX_TOP_K, ImageRequest, RequestError
from .intervene import MAX_EDIT_SETS, EditError, InterventionUnavailable, check_edit_set
from .jobs.drift import DriftProfile
from .loopwatch import LoopWatch
from .metrics import ServiceMetrics
from .results import RawOutputs, check_top_k, image_result
from .runtime import MAX_LABEL_CHARS, MAX_LABELS, BundleRuntime
from .schemas import EditSet, InfoResponse
from .settings import ServeSettings

log = logging.getLogger("cltvit.serving")
Kind = Literal["classify", "explain", "embed", "intervene"]
# Images this small (bytes and, from the header, pixels) are decoded on the event loop (well under a
# millisecond); others in a worker thread, so that a big photo or a small file of many pixels
# never stalls the other requests.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 512 * 512
HEARTBEAT_S = 5.0  # the worker's heartbeat gauge moves this often while its event loop runs


@dataclass(frozen=True)
class Job:
    """One image in the batcher: uint8 [H, W, 3] pixels, its label set's [C, D] text embeddings and names."""

    kind: Kind
    pixels: np.ndarray
    text: np.ndarray
    names: list[str]
    custom_labels: bool
    k: int
    spatial: bool = False
    heads: bool = False
    total_effect: bool = False
    edits: tuple[EditSet, ...] = ()  # /intervene: range-checked edit sets (one graph call per job, serving/intervene.py)
    check_linearity: bool = False


def _cheap_to_decode(data: bytes) -> bool:
    """A small upload whose header announces few pixels (a header Pillow cannot read fails fast too)."""
    if len(data) > INLINE_DECODE_BYTES:
        return False
    try:
        w, h = Image.open(io.BytesIO(data)).size  # reads the header only
    except Exception:
        return True
    return w * h <= INLINE_DECODE_PIXELS


def response_body(kind: Kind, res: dict[str, Any], term_names: list[str], spatial: dict[str, Any] | None = None,
                  total_effect: dict[str, Any] | None = None) -> bytes:
    """The JSON body of /classify, /explain or /embed (fields of ClassifyResponse / ExplainResponse /
    EmbedResponse) from one `serving.results.image_result` dict and, for /explain, the image's spatial
    maps and total-effect map in array form (`BundleRuntime.spatial_maps` / `total_effect`, `arrays=True`)."""
    if kind == "classify":
        body = {"predicted": res["predicted"], "top": res["top"]}
    elif kind == "explain":
        body = {"predicted": res["predicted"], "top": res["top"], "term_names": term_names,
                "explanations": res["explanations"], "top_features": res["top_features"],
                "completeness_residual": res["completeness_residual"], "term_shares": res["term_shares"],
                "spatial": spatial, "total_effect": total_effect}
    else:
        body = {"embedding": res["embedding"], "dim": len(res["embedding"]), "predicted": res["predicted"],
                "term_names": term_names, "term_shares": res["term_shares"]}
    # orjson writes the spatial maps' float32 arrays from memory (no Python float per cell): on a small
    # model they are most of an /explain body (docs/spatial.md, "Cost")
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


class ServingEngine:
    """Runtime + batcher + metrics of one worker process (see the module docstring)."""

    def __init__(self, settings: ServeSettings) -> None:
        if not settings.bundle:
            raise RuntimeError("CLTVIT_BUNDLE is not set: point it at a bundle directory (cltvit-serve --bundle DIR)")
        self.settings = settings
        # BentoML leaves the root logger at WARNING; the service's one-line client-error records are INFO.
        logging.getLogger("cltvit.serving").setLevel(logging.INFO)
        self.runtime = BundleRuntime(
            settings.bundle, device=settings.device, variant=settings.variant,  # type: ignore[arg-type]
            threads=settings.ort_threads, verify_checksums=settings.verify_checksums, spinning=settings.ort_spinning,
            label_cache_bytes=int(settings.label_cache_mb * (1 << 20)), intervene=settings.intervene,
            bench_batches=(1, settings.max_batch_size), bench_budget_s=settings.variant_bench_s, variant_choice=settings.variant_choice,
        )
        log.info("cltvit: serving %s", self.runtime.variant_choice.summary())
        reference = None
        if settings.drift_reference:
            reference = load_reference(settings.drift_reference, self.runtime)  # cltvit-serve checked it already
        self.metrics = ServiceMetrics(self.runtime.term_names, settings.max_batch_size, reference, self.runtime.label_names)
        self.runtime.label_cache.on_evict = self.metrics.label_cache_evicted
        self._heartbeat: asyncio.Task | None = None
        self.loopwatch = LoopWatch(self.metrics.loop_lag.observe, report_after_s=settings.stall_report_ms / 1000.0)
        self.batcher: MicroBatcher[Job, bytes] = MicroBatcher(
            self.run_batch, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
            max_wait_s=settings.batch_wait_ms / 1000.0, max_queue_wait_s=settings.max_latency_ms / 1000.0,
            on_batch=self.metrics.batch, name="cltvit-model",
        )
        self._in_flight = 0  # requests inside answer(); only touched on the event loop
        H, W = self.runtime.image_size
        self.runtime.run(np.zeros((1, 3, H, W), np.float32))  # warm-up: the first ORT run allocates
        if self.runtime.intervene_session is not None:  # and so does the intervention graph's
            self.runtime.intervene_pixels(np.zeros((3, H, W), np.float32), self.runtime.default_text, self.runtime.label_names,
                                          [EditSet()], k=1)
        # Everything loaded so far (frameworks, bundle metadata) lives as long as the worker: move it out
        # of the collector's generations so that full collections under load stay short.
        gc.collect()
        gc.freeze()
        self.metrics.watch_gc()

    def start(self) -> None:
        """Start the heartbeat and the loop watch on the running event loop (the service's startup hook)."""
        self.metrics.beat()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="cltvit-heartbeat")
        self.loopwatch.start()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.metrics.beat()

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.loopwatch.stop()
        self.metrics.unwatch_gc()
        await self.batcher.close()

    # ------------------------------------------------------------------ per request (event loop)
    async def answer(self, kind: Kind, request: ImageRequest) -> Response:
        """The HTTP answer to one parsed request: 200 JSON, 4xx JSON naming the field, or 503 + Retry-After."""
        self._in_flight += 1
        try:
            job = await self._job(kind, request)
            alone = False
            if self._in_flight == 1 and self.batcher.idle:
                # requests received in the same turn of the event loop are scheduled but may not have
                # reached this point yet: let them, then decide
                await asyncio.sleep(0)
                alone = self._in_flight == 1
            body = await self.batcher.submit(job, inline_if_idle=alone)
        except RequestError as exc:
            log_client_error("POST", f"/{kind}", exc)
            self.metrics.request(kind, exc.status)
            return exc.response()
        except Overloaded as exc:
            self.metrics.request(kind, 503)
            self.metrics.overloaded.inc()
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})
        finally:
            self._in_flight -= 1
        self.metrics.request(kind, 200)
        return Response(body, media_type="application/json")

    async def _job(self, kind: Kind, request: ImageRequest) -> Job:
        if kind == "explain" and request.heads and self.runtime.spatial is None:
            raise RequestError(400, self.runtime.spatial_unavailable_message(), "heads")
        if kind == "explain" and request.total_effect and self.runtime.patches is None:
            raise RequestError(400, self.runtime.total_effect_unavailable_message(), "total_effect")
        if kind == "intervene":
            try:
                space = self.runtime.edit_space()
                for i, edit in enumerate(request.edits):
                    check_edit_set(edit, space, f"edits[{i}]")
            except InterventionUnavailable as exc:
                raise RequestError(400, str(exc), "edits") from None
            except EditError as exc:
                raise RequestError(400, exc.message, exc.field) from None
        names = self.runtime.label_names if request.labels is None else request.labels
        try:
            k = check_top_k(request.top_k, len(names))
        except ValueError as exc:
            raise RequestError(400, str(exc), "top_k") from None
        if request.labels is None:
            text = self.runtime.default_text
        else:
            cached = self.runtime.cached_labels(names)
            if cached is None:
                cached = await anyio.to_thread.run_sync(self.runtime.embed_labels, names)
            self.metrics.label_cache_bytes.set(self.runtime.label_cache.nbytes)  # also a stack of cached rows adds a set
            text = cached
        if _cheap_to_decode(request.image):
            pixels = self._prepare(request.image)
        else:
            pixels = await anyio.to_thread.run_sync(self._prepare, request.image)
        spatial = kind == "explain" and (request.spatial or request.heads) and self.runtime.spatial is not None
        return Job(kind, pixels, text, list(names), request.labels is not None, k, spatial, spatial and request.heads,
                   kind == "explain" and request.total_effect, request.edits, request.check_linearity)

    def _prepare(self, data: bytes) -> np.ndarray:
        """Decode (limits enforced) and resize + crop: uint8 [H, W, 3]."""
        try:
            image = decode_image(data, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels)
            return self.runtime.resize_crop(image)
        except ImageError as exc:
            raise RequestError(413 if exc.too_large else 400, str(exc), "image") from None

    # ------------------------------------------------------------------ per batch (batcher thread)
    def run_batch(self, jobs: list[Job]) -> list[bytes | BaseException]:
        """One ONNX Runtime call per label set in the batch; each job's JSON answer (or its exception)."""
        out: list[bytes | BaseException | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.kind == "intervene":  # its own graph call: the image's rows with their edit sets
                out[i] = self._intervene(job)
                continue
            groups.setdefault(id(job.text), []).append(i)
        for members in groups.values():
            text = jobs[members[0]].text
            try:
                pixels = self.runtime.normalize(np.stack([jobs[i].pixels for i in members]))
                t0, c0 = time.perf_counter(), time.thread_time()
                raw = self.runtime.run(pixels, text)
                self.metrics.model_call(time.perf_counter() - t0, time.thread_time() - c0)
            except Exception as exc:  # fails this label set's jobs only
                for i in members:
                    out[i] = exc
                continue
            try:
                maps = self._spatial_maps(jobs, members, raw)
            except Exception as exc:  # fails this label set's jobs only
                for i in members:
                    out[i] = exc
                continue
            effects: dict[int, dict[str, Any]] = {}
            for j, i in enumerate(members):
                if jobs[i].total_effect:  # its edited copies as one more model call (P + 1 rows)
                    try:
                        t0, c0 = time.perf_counter(), time.thread_time()
                        (effects[j],) = self.runtime.total_effect(pixels[j : j + 1], text, jobs[i].names, raw.logits[j : j + 1],
                                                                  jobs[i].k, arrays=True)
                        self.metrics.model_call(time.perf_counter() - t0, time.thread_time() - c0)
                    except Exception as exc:
                        out[i] = exc
            for j, i in enumerate(members):
                if out[i] is not None:
                    continue
                try:
                    res = image_result(raw, j, jobs[i].names, self.runtime.term_names, k=jobs[i].k,
                                       detail=jobs[i].kind == "explain", include_embedding=jobs[i].kind == "embed",
                                       feature_label=self.runtime.feature_label)
                    out[i] = self._encode(jobs[i], res, maps.get(j), effects.get(j))
                except Exception as exc:
                    out[i] = exc
        return [o if o is not None else RuntimeError("job was not run") for o in out]

    def _intervene(self, job: Job) -> bytes | BaseException:
        """The /intervene body of one job (InterveneResponse), or its exception."""
        try:
            pixels = self.runtime.normalize(job.pixels[None])[0]
            t0, c0 = time.perf_counter(), time.thread_time()
            body = self.runtime.intervene_pixels(pixels, job.text, job.names, job.edits, k=job.k, check_linearity=job.check_linearity)
            self.metrics.model_call(time.perf_counter() - t0, time.thread_time() - c0)
            return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        except Exception as exc:
            return exc

    def _spatial_maps(self, jobs: list[Job], members: list[int], raw: RawOutputs) -> dict[int, dict[str, Any]]:
        """{row of `raw`: its spatial maps} for the members (job indices, in `raw`'s row order) that asked for them."""
        rows = [j for j, i in enumerate(members) if jobs[i].spatial]
        if not rows:
            return {}
        names = jobs[members[rows[0]]].names  # one label set per group
        maps = self.runtime.spatial_maps(raw.select(rows), names, k=[jobs[members[j]].k for j in rows],
                                         heads=[jobs[members[j]].heads for j in rows], arrays=True)
        return dict(zip(rows, maps))

    def _encode(self, job: Job, res: dict[str, Any], spatial: dict[str, Any] | None = None,
                total_effect: dict[str, Any] | None = None) -> bytes:
        """The endpoint's response body (fields of ClassifyResponse / ExplainResponse / EmbedResponse)."""
        self.metrics.prediction(res["predicted"], res["term_shares"], job.custom_labels)
        return response_body(job.kind, res, self.runtime.term_names, spatial, total_effect)

    # ------------------------------------------------------------------ /info
    def describe(self) -> InfoResponse:
        m, rt, s = self.runtime.manifest, self.runtime, self.settings
        return InfoResponse(
            backbone=m.backbone.model_dump(), clt=m.clt.model_dump(), mode=m.mode, labels=rt.label_names,
            templates=rt.templates, term_names=rt.term_names, top_k_features=m.top_k_features,
            image_size=rt.image_size, embed_dim=rt.embed_dim, variant=rt.variant, variant_choice=rt.variant_choice, provider=rt.provider,
            versions=dict(m.versions),
            limits={"max_image_bytes": s.max_image_bytes, "max_image_pixels": s.max_image_pixels,
                    "max_labels": MAX_LABELS, "max_label_chars": MAX_LABEL_CHARS, "max_top_k": MAX_TOP_K,
                    "max_edit_sets": MAX_EDIT_SETS},
            batching={"max_batch_size": s.max_batch_size, "max_queue": s.max_queue,
                      "max_latency_ms": s.max_latency_ms, "workers": s.workers},
            auth=bool(s.api_token),
            spatial=None if m.spatial is None else m.spatial.model_dump(mode="json"),
            patches=None if rt.patches is None else rt.patches.model_dump(mode="json"),
            intervene=None if rt.intervene_session is None or m.intervene is None else m.intervene.model_dump(mode="json"),
        )


def load_reference(path: str, runtime: BundleRuntime) -> DriftProfile:
    """The drift reference profile at `path`, checked against the served bundle (model, terms, labels);
    DriftError names the file and the mismatch."""
    profile = DriftProfile.load(path)
    profile.check_bundle(runtime.term_names, runtime.label_names, runtime.manifest.files.get("model.onnx"),
                         source=f"reference profile {path}")
    return profile
