"""The service's browser-facing routes: the feature atlas as JSON and the explanation viewer's static files.

  GET /atlas                          what the atlas was measured on, per-layer counts, the examples, and one page of
                                      features (query: layer, q, sort=firing_rate|strength|index, live=1|0, offset, limit)
  GET /atlas/features/{layer}/{index} one feature: statistics, histogram, direct effect on every class, text matches,
                                      top images as PNG data URLs (docs/atlas.md)
  GET /atlas/examples/{i}.png         example images for the viewer (dataset images at the model's input size)
  GET /ui, /ui/                       the viewer (serving/ui/: plain HTML, JS and CSS, nothing fetched from elsewhere)
  GET /ui/{asset}                     its files

A bundle without an atlas answers the /atlas routes with 404 and a JSON message. `web_routes(runtime)`
builds the routes around a callable returning the service's `BundleRuntime` (None while starting: 503);
the service mounts them next to GET /info. The /ui files carry no data, so they need no token; the
page asks for one when the API answers 401.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .atlas import MAX_LIST, AtlasLookupError
from .runtime import BundleRuntime

UI_DIR = Path(__file__).parent / "ui"
UI_ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8"}
UI_PATHS = ("/ui", "/ui/")  # plus /ui/<asset>: the guard lets these through without a token


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body = {"error": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def _int(request: Request, name: str, default: int | None, *, lo: int, hi: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in {lo}..{hi if hi is not None else 'inf'}, got {v}")
    return v


def web_routes(get_runtime: Callable[[], BundleRuntime | None]) -> list[Route]:
    """Starlette routes of the atlas API and the viewer around the service's runtime."""

    def atlas_or_error():
        rt = get_runtime()
        if rt is None:
            return None, _error(503, "service is starting")
        if rt.atlas is None:
            return None, _error(404, "this bundle has no feature atlas: add one with cltvit-atlas (docs/atlas.md)")
        return rt, None

    async def atlas_index(request: Request) -> Response:
        rt, err = atlas_or_error()
        if err is not None:
            return err
        atlas = rt.atlas
        q = request.query_params
        try:
            layer = _int(request, "layer", None, lo=0)
            offset = _int(request, "offset", 0, lo=0)
            limit = _int(request, "limit", 100, lo=1, hi=MAX_LIST)
            sort = q.get("sort", "firing_rate")
            if sort not in ("firing_rate", "strength", "index"):
                raise ValueError(f"sort must be firing_rate, strength or index, got {sort!r}")
            listing = atlas.list_features(layer=layer, query=q.get("q") or None, live_only=q.get("live", "1") != "0", sort=sort,  # type: ignore[arg-type]
                                          offset=offset or 0, limit=limit or 100)
        except (ValueError, AtlasLookupError) as exc:
            return _error(400, str(exc), "query")
        return JSONResponse({**atlas.summary(), "labels": rt.label_names, "example_list": atlas.example_list(), **listing})

    async def atlas_feature(request: Request) -> Response:
        rt, err = atlas_or_error()
        if err is not None:
            return err
        try:
            layer, index = int(request.path_params["layer"]), int(request.path_params["index"])
            page = rt.atlas.feature(layer, index, rt.default_text, rt.label_names)
        except ValueError:
            return _error(400, "layer and index must be integers", "path")
        except AtlasLookupError as exc:
            return _error(404, str(exc), "path")
        return JSONResponse(page)

    async def atlas_example(request: Request) -> Response:
        rt, err = atlas_or_error()
        if err is not None:
            return err
        try:
            png = rt.atlas.example_png(int(request.path_params["i"]))
        except ValueError:
            return _error(400, "the example number must be an integer", "path")
        except AtlasLookupError as exc:
            return _error(404, str(exc), "path")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def ui_redirect(request: Request) -> Response:
        return RedirectResponse(url=request.url.path + "/" + (f"?{request.url.query}" if request.url.query else ""), status_code=307)

    async def ui_asset(request: Request) -> Response:
        name = request.path_params.get("asset") or "index.html"
        if name not in UI_ASSETS:
            return _error(404, f"no such viewer file: {name}")
        # no-cache: the page and its script always match the server they come from
        return FileResponse(UI_DIR / name, media_type=UI_ASSETS[name], headers={"Cache-Control": "no-cache"})

    return [
        Route("/atlas", atlas_index, methods=["GET"]),
        Route("/atlas/features/{layer}/{index}", atlas_feature, methods=["GET"]),
        Route("/atlas/examples/{i}.png", atlas_example, methods=["GET"]),
        Route("/ui", ui_redirect, methods=["GET"]),
        Route("/ui/", ui_asset, methods=["GET"]),
        Route("/ui/{asset}", ui_asset, methods=["GET"]),
    ]


# Metrics labels of the routes above: those without parameters as they are, the others by
# (path prefix, label) (serving/traffic.py)
WEB_EXACT_PATHS = ("/atlas", "/ui")
WEB_LABEL_PREFIXES = (("/atlas/features/", "/atlas/features/{layer}/{index}"), ("/atlas/examples/", "/atlas/examples/{i}.png"),
                      ("/ui/", "/ui/{asset}"))


def is_ui_path(path: str) -> bool:
    """Whether a request path is one of the viewer's static files (served without a token)."""
    return path in UI_PATHS or (path.startswith("/ui/") and path[4:] in UI_ASSETS)
