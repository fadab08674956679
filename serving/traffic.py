"""Two of BentoML's traffic middlewares replaced, because under long load they grow the worker's heap.

Both are swapped in by `replace_bentoml_traffic_middlewares`, called at service import, before BentoML
builds the app (it looks both classes up in their modules when it does); BentoML offers no setting for
either. Its internals are guarded (a BentoML without them keeps its own, with a warning) and the
behaviour is tested over HTTP (tests/serving/test_traffic.py).

- `RequestTimeout` in place of BentoML's `TimeoutMiddleware`. BentoML's schedules
  `loop.call_later(timeout, ...)` for every request and never cancels it, so each request's timer,
  its future and a copy of its context (with the request's tracing span) stay alive for the whole
  timeout (120 s by default): at ~250 requests/s that is ~30,000 timers and ~400,000 objects the
  garbage collector walks on every full collection, which then stops the worker for 0.4-1 s
  (docs/serving.md, "Long runs"). This one uses `asyncio.timeout`, whose single timer is cancelled
  when the request ends. Same contract: a request that has not started its response within the
  timeout is cancelled and answered 504.
- Request metrics with a bounded `endpoint` label. BentoML's request metrics label the raw request
  path, so every new path a client makes up adds series to `/metrics` (and memory to the worker) for
  good. A subclass of BentoML's metrics middleware labels a request by its route (`/atlas/features/{layer}/{index}`) and every unknown path as `other`;
  the request itself reaches the app unchanged.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Iterable

from starlette.responses import JSONResponse

try:  # BentoML's internals (bentoml>=1.4,<1.5): guarded, and checked over HTTP by the tests
    from bentoml._internal.server.http import instruments as bentoml_instruments
    from bentoml._internal.server.http import traffic as bentoml_traffic
except ImportError:
    bentoml_instruments = bentoml_traffic = None

logger = logging.getLogger("cltvit.serving")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
UNKNOWN_PATH = "other"
_ORIGINAL_SCOPE = "cltvit.original_scope"


class RequestTimeout:
    """ASGI middleware: cancel a request whose response has not started within `timeout` seconds and
    answer 504 (JSON error); once the response has started, no deadline (as BentoML's). Constructed as
    BentoML constructs its `TimeoutMiddleware` (the service's `traffic.timeout`)."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout_s = float(timeout)

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        deadline: asyncio.Timeout | None = None

        async def _send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                if deadline is not None:
                    deadline.reschedule(None)
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s) as deadline:
                await self.app(scope, receive, _send)
        except TimeoutError:
            if started:
                raise
            logger.info("504 %s %s: no answer within %g s", scope.get("method", ""), scope.get("path", ""), self.timeout_s)
            await JSONResponse({"error": f"not answered within {self.timeout_s:g} seconds"}, status_code=504)(scope, receive, send)


def endpoint_label(path: str, exact: frozenset[str], prefixes: tuple[tuple[str, str], ...]) -> str:
    """The metrics label of a request path: the path itself if it is one of `exact`, the label of the
    first (prefix, label) pair it starts with, else `other`."""
    if path in exact:
        return path
    for prefix, label in prefixes:
        if path.startswith(prefix):
            return label
    return UNKNOWN_PATH


def replace_bentoml_traffic_middlewares(exact: Iterable[str], prefixes: Iterable[tuple[str, str]]) -> list[str]:
    """Swap BentoML's `TimeoutMiddleware` for `RequestTimeout` and its request metrics middleware for one
    that labels requests with `endpoint_label(path, exact, prefixes)`. Returns the names of those it
    could not replace (each logged as a warning: that BentoML behaviour then stays)."""
    missing = []
    if hasattr(bentoml_traffic, "TimeoutMiddleware"):
        bentoml_traffic.TimeoutMiddleware = RequestTimeout
    else:
        missing.append("TimeoutMiddleware")
    base = getattr(bentoml_instruments, "RunnerTrafficMetricsMiddleware", None)
    if base is None:
        missing.append("RunnerTrafficMetricsMiddleware")
    elif not getattr(base, "cltvit_bounded", False):
        bentoml_instruments.RunnerTrafficMetricsMiddleware = _bounded_metrics(base, frozenset(exact), tuple(prefixes))
    for name in missing:
        logger.warning("BentoML has no %s to replace: its own stays (docs/serving.md, 'Long runs')", name)
    return missing


def _bounded_metrics(base: type, known: frozenset[str], pairs: tuple[tuple[str, str], ...]) -> type:
    """A subclass of BentoML's request metrics middleware `base` whose endpoint label is `endpoint_label`."""

    class BoundedPathMetrics(base):  # type: ignore[misc, valid-type]
        """BentoML's request metrics, with the endpoint label bounded (`endpoint_label`)."""

        cltvit_bounded = True

        def __init__(self, app: Any, **kwargs: Any) -> None:
            self._inner = app
            super().__init__(self._restore, **kwargs)

        async def _restore(self, scope: dict, receive: Receive, send: Send) -> None:
            await self._inner(scope.get(_ORIGINAL_SCOPE, scope), receive, send)

        async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
            path = scope.get("path")
            if scope["type"] == "http" and path is not None and path != "/metrics":
                label = endpoint_label(path, known, pairs)
                if label != path:
                    scope = {**scope, "path": label, _ORIGINAL_SCOPE: scope}
            await super().__call__(scope, receive, send)

    return BoundedPathMetrics
