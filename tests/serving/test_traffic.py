"""Long-run steadiness (issue 27): no timer left behind per request, a bounded heap and bounded
metrics labels, over real HTTP against `cltvit-serve`; `RequestTimeout` against a slow ASGI app."""
from __future__ import annotations

import asyncio
import gc
import io
import os
import re
import signal
import time
import uuid

import pytest
import requests
from PIL import Image

from serving.cli import running_server
from serving.traffic import UNKNOWN_PATH, RequestTimeout, endpoint_label

TIMEOUT = 60


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets (0 if absent)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def under(text: str, histogram: str, le: str) -> float:
    """A histogram's count of observations <= `le`, summed over its series."""
    return sum(float(v) for v in re.findall(rf'^{histogram}_bucket{{[^}}]*le="{re.escape(le)}"[^}}]*}} ([0-9.e+-]+)$', text, re.M))


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("log") / "server.log"


@pytest.fixture(scope="module")
def server(bundle, server_log):
    with running_server(bundle, log_path=server_log, extra_args=["--threads", "1", "--stall-report-ms", "150"]) as url:
        yield url


def test_unknown_paths_share_one_metrics_label(server):
    """Client-chosen paths must not add series: BentoML labels the raw path unless we bound it."""
    paths = [f"/made-up-{uuid.uuid4().hex}" for _ in range(40)] + [f"/atlas/features/0/{i}" for i in range(5)]
    with requests.Session() as s:
        for p in paths:
            assert s.get(server + p, timeout=TIMEOUT).status_code in (404, 400)
        assert s.post(server + "/classify", files={"image": ("x.png", png(), "image/png")}, timeout=TIMEOUT).status_code == 200
        text = s.get(server + "/metrics", timeout=TIMEOUT).text
    endpoints = set(re.findall(r'endpoint="([^"]*)"', text))
    assert not any("made-up" in e for e in endpoints), sorted(endpoints)[:10]
    assert not any(e.startswith("/atlas/features/0/") for e in endpoints)
    assert UNKNOWN_PATH in endpoints and "/atlas/features/{layer}/{index}" in endpoints and "/classify" in endpoints
    other = re.findall(rf'^\w+_request_total{{[^}}]*endpoint="{UNKNOWN_PATH}"[^}}]*}} ([0-9.e+]+)$', text, re.M)
    assert sum(float(v) for v in other) >= 40


def test_heap_stays_bounded_under_many_requests(server):
    """The regression test of the cause found in issue 27: BentoML's request timeout kept every request's
    timer, future and context alive for 120 s (~14 objects a request). After 1,500 requests in a few
    seconds the worker's tracked objects after a full collection stay far below 1,500 x 14."""
    image = png()
    with requests.Session() as s:
        def scrape() -> str:
            return s.get(server + "/metrics", timeout=TIMEOUT).text

        for i in range(1500):
            if i % 5 == 0:
                r = s.post(server + "/classify", files={"image": ("x.png", image, "image/png")}, timeout=TIMEOUT)
            else:
                r = s.get(server + "/livez", timeout=TIMEOUT)
            assert r.status_code == 200
        before = metric(scrape(), "cltvit_gc_full_collections_total")
        # one more full collection after the burst, with the burst's requests still inside any 120 s timer
        deadline = time.monotonic() + 60
        while metric(text := scrape(), "cltvit_gc_full_collections_total") <= before:
            assert time.monotonic() < deadline, "no full garbage collection within 60 s of requests"
            for _ in range(50):
                s.post(server + "/classify", files={"image": ("x.png", image, "image/png")}, timeout=TIMEOUT)
    objects = metric(text, "cltvit_gc_objects")
    assert 0 < objects < 10_000, objects
    assert metric(text, "cltvit_gc_full_pause_seconds_count") >= 1


def test_a_stopped_worker_shows_in_the_loop_lag_and_the_log(server, server_log):
    """Stop the worker process from outside for 0.4 s (what a host that does not schedule it does): its
    event loop's lag histogram must hold one tick at least that late, and the log name the stall."""
    with requests.Session() as s:
        text = s.get(server + "/metrics", timeout=TIMEOUT).text
        pid = int(re.search(r'^cltvit_event_loop_lag_seconds_count{worker="(\d+)"}', text, re.M).group(1))
        late_before = metric(text, "cltvit_event_loop_lag_seconds_count") - under(text, "cltvit_event_loop_lag_seconds", "0.25")
        ticks_before = metric(text, "cltvit_event_loop_lag_seconds_count")
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.4)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.2)
        text = s.get(server + "/metrics", timeout=TIMEOUT).text
    ticks = metric(text, "cltvit_event_loop_lag_seconds_count")
    late = ticks - under(text, "cltvit_event_loop_lag_seconds", "0.25")
    assert ticks > ticks_before  # the watch ticks on its own, with no requests
    assert late - late_before >= 1, (late_before, late)
    deadline = time.monotonic() + 10
    while not re.search(r"the event loop stalled for (\d+) ms", log := server_log.read_text()):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    assert int(re.search(r"the event loop stalled for (\d+) ms", log).group(1)) >= 250


def test_request_timeout_answers_504_and_leaves_no_timers():
    async def slow(scope, receive, send):
        await asyncio.sleep(scope["delay"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(app, delay: float) -> list[dict]:
        sent: list[dict] = []

        async def send(m: dict) -> None:
            sent.append(m)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        await app({"type": "http", "method": "GET", "path": "/x", "headers": [], "delay": delay}, receive, send)
        return sent

    async def main() -> tuple[list[dict], list[dict], int]:
        app = RequestTimeout(slow, timeout=0.2)
        late = await call(app, 5.0)
        quick = [await call(app, 0.0) for _ in range(2000)]
        gc.collect()
        timers = sum(1 for o in gc.get_objects() if type(o) is asyncio.TimerHandle and not o.cancelled())
        return late, quick[-1], timers

    late, quick, timers = asyncio.run(main())
    assert late[0]["status"] == 504 and b"0.2 seconds" in late[1]["body"]
    assert quick[0]["status"] == 200 and quick[1]["body"] == b"ok"
    assert timers < 10  # one per request would be 2,000


def test_endpoint_label_rules():
    exact = frozenset({"/classify", "/atlas"})
    prefixes = (("/atlas/features/", "/atlas/features/{layer}/{index}"),)
    assert endpoint_label("/classify", exact, prefixes) == "/classify"
    assert endpoint_label("/atlas", exact, prefixes) == "/atlas"
    assert endpoint_label("/atlas/features/3/9", exact, prefixes) == "/atlas/features/{layer}/{index}"
    assert endpoint_label("/classify/", exact, prefixes) == UNKNOWN_PATH
    assert endpoint_label("/../etc/passwd", exact, prefixes) == UNKNOWN_PATH
