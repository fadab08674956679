"""BentoML service: zero-shot classification with a per-layer explanation, over HTTP.

Endpoints (JSON out; errors are 4xx with `{"error": "...", "field": "..."}`, overload 503 + Retry-After):
  POST /classify  image -> top labels with probabilities
  POST /explain   image -> the same plus per-term contributions, top CLT features, completeness residual,
                  and where in the image (`spatial`: patch maps per top label; `heads=true`: per head too;
                  `total_effect=true`: the total-effect map from edited copies of the image)
  POST /embed     image -> image embedding plus the per-term contribution shares
  GET|POST /info  what is served (backbone, CLT, mode, labels, term names, versions, limits)
  GET /atlas, /atlas/features/{layer}/{index}, /atlas/examples/{i}.png  the feature atlas (serving/web.py)
  GET /ui/        the explanation viewer (serving/ui/)
  BentoML's /livez, /readyz, /metrics (with cltvit_* metrics added), /docs.json (OpenAPI).

Image input: multipart file part `image`, or JSON `{"image": "<base64>"}`; optional `labels` and
`top_k` (serving/inputs.py). The guard (serving/guard.py) authenticates, limits and parses each
request once; the engine (serving/engine.py) batches images in process in front of ONNX Runtime
(serving/batcher.py). Configuration: CLTVIT_* environment variables (serving/settings.py,
docs/serving.md).
"""
from __future__ import annotations

from typing import Optional

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import ServingEngine
from .guard import RequestGuard
from .inputs import ImageRequest, image_input_spec, intervene_input_spec
from .runtime import BundleRuntime
from .schemas import ClassifyResponse, EditSet, EmbedResponse, ExplainResponse, InfoResponse, InterveneResponse
from .settings import ServeSettings
from .traffic import replace_bentoml_traffic_middlewares
from .web import WEB_EXACT_PATHS, WEB_LABEL_PREFIXES, web_routes

SETTINGS = ServeSettings.from_env()


def _engine() -> ServingEngine | None:
    service = bentoml.get_current_service()
    return None if service is None else service.engine


ENDPOINTS = frozenset({"classify", "explain", "embed", "intervene", "info"})


def _count_rejection(path: str, status: int) -> None:
    """Refusals by the guard, per endpoint (any other path as 'other': paths are client-chosen)."""
    engine = _engine()
    if engine is not None:
        name = path.strip("/")
        engine.metrics.request(name if name in ENDPOINTS else "other", status)


async def _get_info(request: Request) -> Response:
    engine = _engine()
    if engine is None:
        return JSONResponse({"error": "service is starting"}, status_code=503)
    return JSONResponse(engine.describe().model_dump(mode="json"))


def _runtime() -> BundleRuntime | None:
    engine = _engine()
    return None if engine is None else engine.runtime


# GET routes beside BentoML's: /info, the feature atlas and the viewer (serving/web.py)
info_app = Starlette(routes=[Route("/info", _get_info, methods=["GET"]), *web_routes(_runtime)])


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="cltvit",
    traffic={"timeout": SETTINGS.timeout_s},
    workers=SETTINGS.workers,
    logging={"access": {"enabled": SETTINGS.access_log}},
)
class CltvitService:
    """Serves one bundle (CLTVIT_BUNDLE) with ONNX Runtime; see the module docstring."""

    def __init__(self) -> None:
        self.engine = ServingEngine(SETTINGS)

    @bentoml.on_startup
    async def start(self) -> None:
        self.engine.start()

    @bentoml.on_shutdown
    async def close(self) -> None:
        await self.engine.close()

    @bentoml.api(route="/classify", input_spec=image_input_spec(with_top_k=True), output_spec=ClassifyResponse)
    async def classify(self, image: bytes, labels: Optional[list[str]] = None, top_k: Optional[int] = None) -> Response:
        """Top labels with softmax probabilities over the label set."""
        return await self.engine.answer("classify", ImageRequest(image, labels, top_k))

    @bentoml.api(route="/explain", input_spec=image_input_spec(with_top_k=True, with_spatial=True), output_spec=ExplainResponse)
    async def explain(self, image: bytes, labels: Optional[list[str]] = None, top_k: Optional[int] = None,
                      spatial: bool = True, heads: bool = False, total_effect: bool = False) -> Response:
        """Top labels plus, for each, the additive per-term decomposition of its logit, the top CLT features
        and where in the image (patch maps per attention layer and summed; with total_effect=true also the
        total-effect map from edited copies of the image; docs/spatial.md)."""
        return await self.engine.answer("explain", ImageRequest(image, labels, top_k, spatial, heads, total_effect))

    @bentoml.api(route="/intervene", input_spec=intervene_input_spec(), output_spec=InterveneResponse)
    async def intervene(self, image: bytes, edits: list[EditSet], labels: Optional[list[str]] = None,
                        top_k: Optional[int] = None, check_linearity: bool = False) -> Response:
        """What if: the image unedited and once per edit set (features, terms, patches), each run through the
        real model with its full decomposition and its change from the unedited run (docs/intervene.md)."""
        return await self.engine.answer("intervene", ImageRequest(image, labels, top_k, edits=tuple(edits),
                                                                  check_linearity=check_linearity))

    @bentoml.api(route="/embed", input_spec=image_input_spec(with_top_k=False), output_spec=EmbedResponse)
    async def embed(self, image: bytes, labels: Optional[list[str]] = None) -> Response:
        """The unnormalised image embedding and the per-term shares of the predicted logit."""
        return await self.engine.answer("embed", ImageRequest(image, labels, None))

    @bentoml.api(route="/info")
    def info(self) -> InfoResponse:
        """What this server runs (also answered on GET /info)."""
        return self.engine.describe()


CltvitService.add_asgi_middleware(RequestGuard, settings=SETTINGS, on_reject=_count_rejection)
# BentoML's timeout without a timer left behind per request, its request metrics with one `endpoint`
# label per route and any other path as "other" (serving/traffic.py)
replace_bentoml_traffic_middlewares(
    {*(api.route for api in CltvitService.apis.values()), "/", "/docs", "/docs.json", "/livez", "/readyz", "/healthz",
     *WEB_EXACT_PATHS},
    WEB_LABEL_PREFIXES,
)
