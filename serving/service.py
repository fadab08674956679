"""BentoML service: zero-shot classification with a per-layer explanation, over HTTP.

Endpoints (all JSON out; errors are 4xx with `{"error": "...", "field": "..."}`):
  POST /classify  image -> top labels with probabilities
  POST /explain   image -> the same plus per-term contributions, top CLT features, completeness residual,
                  and where in the image (patch maps per top label; `heads=true` adds per-head maps)
  POST /embed     image -> image embedding plus the per-term contribution shares
  GET|POST /info  what is served (backbone, CLT, mode, labels, term names, versions, limits)
  POST /infer_batch  the adaptive-batching stage the three endpoints above go through (see below)
  BentoML's /livez, /readyz, /metrics (with cltvit_* metrics added), /docs.json (OpenAPI).

Image input: multipart file part `image`, or JSON `{"image": "<base64>"}`. Optional `labels`
(JSON list; in multipart a JSON list or comma-separated string) and `top_k`. No URL is ever fetched.

Batching: the public endpoints validate and decode the image (thread pool), then call the
batchable `/infer_batch` API through BentoML's own service proxy, so BentoML's adaptive dispatcher
groups concurrent requests into one ONNX Runtime call. Images travel to it as base64 uint8
[H, W, 3] (already resized and cropped), a few hundred kB at most.

Configuration (environment, read once at import; see `ServeSettings`): CLTVIT_BUNDLE (required),
CLTVIT_DEVICE, CLTVIT_VARIANT, CLTVIT_THREADS, CLTVIT_MAX_BATCH_SIZE, CLTVIT_MAX_LATENCY_MS,
CLTVIT_TIMEOUT_S, CLTVIT_API_TOKEN (bearer-token auth on everything but /livez /readyz /healthz),
CLTVIT_NO_VERIFY (skip sha256 checks), CLTVIT_ORT_SPINNING (1: let idle ORT threads busy-wait).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .images import MAX_BYTES, MAX_PIXELS, ImageError, decode_image
from .runtime import MAX_LABEL_CHARS, MAX_LABELS, BundleRuntime, LabelError, validate_labels
from .schemas import ClassifyResponse, EmbedResponse, ExplainResponse, ImageResult, InfoResponse

logger = logging.getLogger("cltvit.serving")

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
IMAGE_PATHS = frozenset({"/classify", "/explain", "/embed"})
BODY_PATHS = IMAGE_PATHS | {"/infer_batch"}
MAX_TOP_K = 1000


class ServeSettings(BaseModel):
    """Server configuration from CLTVIT_* environment variables (immutable)."""

    model_config = ConfigDict(frozen=True)
    bundle: str | None = None
    device: str = "auto"
    variant: str = "fp32"
    threads: int | None = Field(default=None, ge=1)
    max_batch_size: int = Field(default=16, ge=2, le=1024)
    max_latency_ms: int = Field(default=20_000, ge=10)
    timeout_s: int = Field(default=120, ge=1)
    api_token: str | None = None
    max_image_bytes: int = MAX_BYTES
    max_image_pixels: int = MAX_PIXELS
    verify_checksums: bool = True
    ort_spinning: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServeSettings":
        env = dict(os.environ if env is None else env)
        keys = {
            "bundle": "CLTVIT_BUNDLE", "device": "CLTVIT_DEVICE", "variant": "CLTVIT_VARIANT",
            "threads": "CLTVIT_THREADS", "max_batch_size": "CLTVIT_MAX_BATCH_SIZE",
            "max_latency_ms": "CLTVIT_MAX_LATENCY_MS", "timeout_s": "CLTVIT_TIMEOUT_S",
            "api_token": "CLTVIT_API_TOKEN",
        }
        values: dict[str, Any] = {k: env[v] for k, v in keys.items() if env.get(v, "").strip()}
        values["verify_checksums"] = env.get("CLTVIT_NO_VERIFY", "") not in ("1", "true", "True")
        values["ort_spinning"] = env.get("CLTVIT_ORT_SPINNING", "") in ("1", "true", "True")
        return cls(**values)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: a max-size image in base64 plus 1 MiB for the other fields."""
        return self.max_image_bytes * 4 // 3 + 4 + (1 << 20)


SETTINGS = ServeSettings.from_env()


# ---------------------------------------------------------------------- request field types
def _labels_before(value: Any) -> Any:
    """Multipart sends text: accept a JSON list or a comma-separated string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError("labels is not a valid JSON list") from None
        return text.split(",")
    return value


Labels = Annotated[
    Optional[list[str]],
    BeforeValidator(_labels_before),
    Field(description=f"custom label set (1..{MAX_LABELS} distinct labels of 1..{MAX_LABEL_CHARS} characters); default: the bundle's labels"),
]
TopK = Annotated[Optional[int], Field(ge=1, le=MAX_TOP_K, description="number of labels reported (default min(5, number of labels))")]
def _image_before(value: Any) -> Any:
    """JSON carries the image as base64 text (optionally a data: URL): decode it to bytes here."""
    if not isinstance(value, str):
        return value  # multipart UploadFile (or a type error reported by BentoML's file schema)
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ValueError("a data: URL must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is not valid base64 ({exc})") from None


ImageIn = Annotated[Path, BeforeValidator(_image_before)]
IMAGE_DOC = "the image: a multipart file part, or in JSON a base64 string (data: URL prefix allowed)"
SPATIAL_DOC = "where in the image: patch maps per top label (up to the bundle's spatial top-k), per layer and summed"
HEADS_DOC = "also per-head patch maps of the predicted label (needs a bundle with spatial maps)"


class BatchItem(BaseModel):
    """One image for the batching stage: base64 uint8 [height, width, 3] plus per-request options."""

    pixels: str = Field(description="base64 of uint8 [height, width, 3], resized and center-cropped")
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    labels: Optional[list[str]] = Field(default=None, max_length=MAX_LABELS)
    top_k: Optional[int] = Field(default=None, ge=1, le=MAX_TOP_K)
    detail: bool = True
    embedding: bool = False
    spatial: bool = False
    heads: bool = False


class BatchOutcome(BaseModel):
    """Result of one batch item: `result`, or `error` with `status` (4xx) when the item was unusable."""

    result: Optional[ImageResult] = None
    error: Optional[str] = None
    field: Optional[str] = None
    status: int = 200


class RequestError(Exception):
    """A client mistake, answered with `status` and a JSON message naming `field`."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def response(self) -> JSONResponse:
        body = {"error": self.message}
        if self.field:
            body["field"] = self.field
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------------- ASGI guard
class RequestGuard:
    """ASGI middleware in front of every route.

    - Bearer-token auth when a token is configured (401 otherwise), except the health probes.
    - Body size limit on the POST endpoints (413), before BentoML reads the body.
    - Multipart sanity: the body must parse, `image` must be one file part (a text field would make
      BentoML fetch it as a URL), so every malformed upload gets a 400 naming the problem.
    """

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings
        self.token = (settings.api_token or "").encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        try:
            if self.token and path not in OPEN_PATHS:
                self._authorise(scope)
            if scope.get("method") == "POST" and path in BODY_PATHS:
                receive = await self._guard_body(scope, receive, path)
        except RequestError as exc:
            resp = exc.response()
            if exc.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="cltvit"'
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorise(self, scope: dict) -> None:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "Authorization")
        if not hmac.compare_digest(given.strip(), self.token):
            raise RequestError(401, "invalid bearer token", "Authorization")

    async def _guard_body(self, scope: dict, receive: Any, path: str) -> Any:
        limit = self.settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise RequestError(400, "Content-Length is not a number") from None
            if n > limit:
                raise RequestError(413, f"request body is {n:,} bytes, over the limit of {limit:,} bytes "
                                        f"(images are limited to {self.settings.max_image_bytes:,} bytes)", "image")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body is over the limit of {limit:,} bytes", "image")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replay = _replay(body, receive)
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        if path in IMAGE_PATHS and ctype.startswith("multipart/"):
            await self._check_multipart(scope, body, receive)
        elif path in IMAGE_PATHS and body.strip():  # BentoML treats every other body as JSON
            try:
                parsed = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"malformed JSON body: {exc}") from None
            if not isinstance(parsed, dict):
                raise RequestError(400, f"the request body must be a JSON object, got a JSON {type(parsed).__name__}")
        return replay

    async def _check_multipart(self, scope: dict, body: bytes, receive: Any) -> None:
        request = Request(scope, _replay(body, receive))
        try:
            form = await request.form(max_files=4, max_fields=16, max_part_size=2 << 20)
        except MultiPartException as exc:
            raise RequestError(400, f"malformed multipart body: {exc.message}") from None
        except Exception as exc:  # e.g. a missing boundary
            raise RequestError(400, f"malformed multipart body: {exc}") from None
        try:
            images = form.getlist("image")
            if len(images) > 1:
                raise RequestError(400, "send exactly one 'image' part per request", "image")
            if images and not isinstance(images[0], UploadFile):
                raise RequestError(400, "'image' must be a file part (e.g. curl -F image=@photo.jpg); "
                                        "URLs and text fields are not accepted", "image")
            for key in ("labels", "top_k"):
                if isinstance(form.get(key), UploadFile):
                    raise RequestError(400, f"'{key}' must be a text field, not a file", key)
        finally:
            await form.close()


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that yields `body` once, then defers to the real receive (disconnects)."""
    sent = False

    async def inner() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


# ---------------------------------------------------------------------- metrics
class ServiceMetrics:
    """cltvit_* Prometheus metrics, exposed on BentoML's /metrics next to its own."""

    def __init__(self, term_names: list[str]) -> None:
        import prometheus_client as prom  # imported late: BentoML sets up multiprocess mode first

        self.requests = prom.Counter(
            "cltvit_requests", "Requests handled per endpoint and HTTP status", ["endpoint", "status"]
        )
        self.predictions = prom.Counter(
            "cltvit_predicted_label", "Predicted labels (bundle labels by name; custom label sets as 'custom')", ["label"]
        )
        self.term_share = prom.Histogram(
            "cltvit_term_share", "Share of |contribution| to the predicted logit, per term (layer)",
            ["term"], buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0),
        )
        self.inference = prom.Histogram(
            "cltvit_inference_seconds", "ONNX Runtime time per batch (the batching stage's model call)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.term_names = term_names

    def observe(self, result: ImageResult, custom_labels: bool) -> None:
        self.predictions.labels(label="custom" if custom_labels else result.predicted).inc()
        for term, share in zip(self.term_names, result.term_shares):
            self.term_share.labels(term=term).observe(share)


# ---------------------------------------------------------------------- GET /info
async def _get_info(request: Request) -> Response:
    service = bentoml.get_current_service()
    if service is None:
        return JSONResponse({"error": "service is starting"}, status_code=503)
    return JSONResponse(service.describe().model_dump(mode="json"))


info_app = Starlette(routes=[Route("/info", _get_info, methods=["GET"])])


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="cltvit",
    traffic={"timeout": SETTINGS.timeout_s},
    workers=1,
    # BentoML's in-process proxy recycles its session every 100 requests by default and, under
    # concurrency, closes it under requests still in flight (500s); keep one session for the life of the worker.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e12},
)
class CltvitService:
    """Serves one bundle (CLTVIT_BUNDLE) with ONNX Runtime; see the module docstring."""

    def __init__(self) -> None:
        settings = SETTINGS
        if not settings.bundle:
            raise RuntimeError("CLTVIT_BUNDLE is not set: point it at a bundle directory (cltvit-serve --bundle DIR)")
        self.settings = settings
        self.runtime = BundleRuntime(settings.bundle, device=settings.device, variant=settings.variant,  # type: ignore[arg-type]
                                     threads=settings.threads, verify_checksums=settings.verify_checksums,
                                     spinning=settings.ort_spinning)
        self.metrics = ServiceMetrics(self.runtime.term_names)
        H, W = self.runtime.image_size
        self.runtime.run(np.zeros((1, 3, H, W), np.float32))  # warm-up: first ORT run allocates
        logger.info("cltvit serving %s", self.runtime.describe())

    # ------------------------------------------------------------------ helpers
    def describe(self) -> InfoResponse:
        m, rt, s = self.runtime.manifest, self.runtime, self.settings
        return InfoResponse(
            backbone=m.backbone.model_dump(), clt=m.clt.model_dump(), mode=m.mode, labels=rt.label_names,
            templates=rt.templates, term_names=rt.term_names, top_k_features=m.top_k_features,
            image_size=rt.image_size, embed_dim=rt.embed_dim, variant=rt.variant, provider=rt.provider,
            versions=dict(m.versions),
            limits={"max_image_bytes": s.max_image_bytes, "max_image_pixels": s.max_image_pixels,
                    "max_labels": MAX_LABELS, "max_label_chars": MAX_LABEL_CHARS, "max_top_k": MAX_TOP_K},
            batching={"max_batch_size": s.max_batch_size, "max_latency_ms": s.max_latency_ms},
            auth=bool(s.api_token),
            spatial=None if m.spatial is None else m.spatial.model_dump(mode="json"),
        )

    def _image_bytes(self, image: Path | None) -> bytes:
        if image is None:
            raise RequestError(400, "no image: send a multipart file part 'image' or JSON {\"image\": \"<base64>\"}", "image")
        return Path(image).read_bytes()

    def _prepare(self, data: bytes) -> np.ndarray:
        """Decode (limits enforced) and resize + crop: uint8 [H, W, 3]. Runs in a worker thread."""
        try:
            image = decode_image(data, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels)
            return self.runtime.resize_crop(image)
        except ImageError as exc:
            raise RequestError(413 if exc.too_large else 400, str(exc), "image") from None

    def _check_labels(self, labels: list[str] | None, top_k: int | None) -> list[str] | None:
        try:
            names = None if labels is None else validate_labels(labels)
        except LabelError as exc:
            raise RequestError(400, str(exc), "labels") from None
        n = len(self.runtime.label_names if names is None else names)
        if top_k is not None and top_k > n:
            raise RequestError(400, f"top_k={top_k} is out of range: at most the number of labels ({n})", "top_k")
        return names

    async def _result(self, endpoint: str, ctx: bentoml.Context, image: Path | None, labels: list[str] | None,
                      top_k: int | None, *, detail: bool, embedding: bool, spatial: bool = False,
                      heads: bool = False) -> ImageResult | JSONResponse:
        """Validate, decode, go through the batching stage; a JSONResponse (4xx) for client mistakes."""
        try:
            if heads and self.runtime.spatial is None:
                raise RequestError(400, self.runtime.spatial_unavailable_message(), "heads")
            names = self._check_labels(labels, top_k)
            data = self._image_bytes(image)
            pixels = await anyio.to_thread.run_sync(self._prepare, data)
            if names is not None:  # embed a new label set off the event loop, before batching
                await anyio.to_thread.run_sync(self.runtime.embed_labels, names)
            item = BatchItem(pixels=base64.b64encode(pixels.tobytes()).decode("ascii"), height=pixels.shape[0],
                             width=pixels.shape[1], labels=names, top_k=top_k, detail=detail, embedding=embedding,
                             spatial=spatial, heads=heads)
            outcome = await self._infer(item)
            if outcome.error is not None or outcome.result is None:
                raise RequestError(outcome.status if outcome.status >= 400 else 400, outcome.error or "no result", outcome.field)
        except RequestError as exc:
            self.metrics.requests.labels(endpoint=endpoint, status=str(exc.status)).inc()
            ctx.response.status_code = exc.status
            return exc.response()
        self.metrics.requests.labels(endpoint=endpoint, status="200").inc()
        self.metrics.observe(outcome.result, custom_labels=names is not None)
        return outcome.result

    async def _infer(self, item: BatchItem) -> BatchOutcome:
        """Call the batchable API through BentoML's proxy so its dispatcher can batch the call."""
        client = self.to_async  # type: ignore[attr-defined]  (set by BentoML when the server starts)
        if self.settings.api_token:  # the call goes through RequestGuard too; idempotent, before the first session
            client.default_headers["Authorization"] = f"Bearer {self.settings.api_token}"
        try:
            outcomes = await client.infer_batch(items=[item])
        except BentoMLException as exc:  # the dispatcher sheds load past the latency budget (503)
            status = getattr(getattr(exc, "error_code", None), "value", 503)
            if status == 503:
                raise RequestError(503, "server overloaded: the batching latency budget would be exceeded; retry later") from None
            raise
        out = outcomes[0]
        return out if isinstance(out, BatchOutcome) else BatchOutcome.model_validate(out)

    # ------------------------------------------------------------------ endpoints
    @bentoml.api(route="/classify")
    async def classify(self, ctx: bentoml.Context, image: ImageIn = Field(None, description=IMAGE_DOC), labels: Labels = None,
                       top_k: TopK = None) -> ClassifyResponse:
        """Top labels with softmax probabilities over the label set."""
        res = await self._result("classify", ctx, image, labels, top_k, detail=False, embedding=False)
        if isinstance(res, Response):
            return res  # type: ignore[return-value]
        return ClassifyResponse(predicted=res.predicted, top=res.top)

    @bentoml.api(route="/explain")
    async def explain(self, ctx: bentoml.Context, image: ImageIn = Field(None, description=IMAGE_DOC), labels: Labels = None,
                      top_k: TopK = None, spatial: bool = Field(True, description=SPATIAL_DOC),
                      heads: bool = Field(False, description=HEADS_DOC)) -> ExplainResponse:
        """Top labels plus, for each, the additive per-term decomposition of its logit, the top CLT features,
        and where in the image (patch maps per attention layer and summed; docs/spatial.md)."""
        res = await self._result("explain", ctx, image, labels, top_k, detail=True, embedding=False, spatial=spatial, heads=heads)
        if isinstance(res, Response):
            return res  # type: ignore[return-value]
        return ExplainResponse(
            predicted=res.predicted, top=res.top, term_names=self.runtime.term_names,
            explanations=res.explanations or [], top_features=res.top_features or [],
            completeness_residual=res.completeness_residual, term_shares=res.term_shares, spatial=res.spatial,
        )

    @bentoml.api(route="/embed")
    async def embed(self, ctx: bentoml.Context, image: ImageIn = Field(None, description=IMAGE_DOC), labels: Labels = None) -> EmbedResponse:
        """The unnormalised image embedding and the per-term shares of the predicted logit."""
        res = await self._result("embed", ctx, image, labels, None, detail=False, embedding=True)
        if isinstance(res, Response):
            return res  # type: ignore[return-value]
        emb = res.embedding or []
        return EmbedResponse(embedding=emb, dim=len(emb), predicted=res.predicted,
                             term_names=self.runtime.term_names, term_shares=res.term_shares)

    @bentoml.api(route="/info")
    def info(self) -> InfoResponse:
        """What this server runs (also answered on GET /info)."""
        return self.describe()

    @bentoml.api(route="/infer_batch", batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def infer_batch(self, items: list[BatchItem]) -> list[BatchOutcome]:
        """Batching stage: preprocessed images (base64 uint8 HxWx3) -> one outcome each.

        Items are grouped by label set; each group is one ONNX Runtime call. A bad item gets its
        own 4xx outcome and never fails the rest of the batch.
        """
        H, W = self.runtime.image_size
        out: list[BatchOutcome | None] = [None] * len(items)
        groups: dict[tuple[str, ...] | None, list[tuple[int, np.ndarray]]] = {}
        for i, item in enumerate(items):
            if (item.height, item.width) != (H, W):
                out[i] = BatchOutcome(error=f"pixels must be {H}x{W}, got {item.height}x{item.width}", field="pixels", status=400)
                continue
            try:
                raw = base64.b64decode(item.pixels, validate=True)
            except (binascii.Error, ValueError) as exc:
                out[i] = BatchOutcome(error=f"pixels are not valid base64 ({exc})", field="pixels", status=400)
                continue
            if len(raw) != H * W * 3:
                out[i] = BatchOutcome(error=f"pixels hold {len(raw)} bytes, expected {H * W * 3}", field="pixels", status=400)
                continue
            key = None if item.labels is None else tuple(item.labels)
            groups.setdefault(key, []).append((i, np.frombuffer(raw, np.uint8).reshape(H, W, 3)))
        for key, members in groups.items():
            try:
                names = self.runtime.label_names if key is None else validate_labels(key)
                text = self.runtime.embed_labels(None if key is None else names)
            except LabelError as exc:
                for i, _ in members:
                    out[i] = BatchOutcome(error=str(exc), field="labels", status=400)
                continue
            pixels = self.runtime.normalize(np.stack([a for _, a in members]))
            t0 = time.perf_counter()
            raw_out = self.runtime.run(pixels, text)
            self.metrics.inference.observe(time.perf_counter() - t0)
            for j, (i, _) in enumerate(members):
                item = items[i]
                try:
                    (res,) = self.runtime.results(raw_out.select([j]), names, top_k=item.top_k, detail=item.detail,
                                                  include_embedding=item.embedding, spatial=item.spatial, heads=item.heads)
                    out[i] = BatchOutcome(result=res)
                except LabelError as exc:
                    out[i] = BatchOutcome(error=str(exc), field="top_k", status=400)
        return [o if o is not None else BatchOutcome(error="item was not processed", status=400) for o in out]


CltvitService.add_asgi_middleware(RequestGuard, settings=SETTINGS)
