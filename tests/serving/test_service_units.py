"""The service's parts without a server: the micro-batcher, the label-set cache, request parsing.

The batcher tests are driven by events and a fake clock, never by sleeps: the model function blocks
until the test releases it, the test waits for a condition (`until`, with a deadline far above any
real wait), and queue-wait checks read `FakeClock` instead of the wall clock.
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Callable

import numpy as np
import pytest

import serving.batcher
from serving.batcher import MicroBatcher, Overloaded
from serving.inputs import RequestError, parse_image_request
from serving.runtime import BundleRuntime, LabelCache

DEADLINE_S = 30.0  # for conditions that hold within milliseconds; a failure is a hang, not a slow machine


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the event loop (and the batcher's thread) run until `condition()` holds; fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.001)


class FakeClock:
    """Stands in for the `time` module in serving.batcher: `perf_counter()` moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


# ---------------------------------------------------------------------- MicroBatcher
def test_batcher_batches_under_load_and_returns_each_its_own_result():
    calls: list[list[int]] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        release.wait(DEADLINE_S)  # the model is busy until every request has queued behind it
        return [x * 10 for x in items]

    async def main() -> list[int]:
        b = MicroBatcher(run, max_batch_size=8, max_queue=100)
        try:
            first = asyncio.ensure_future(b.submit(0))
            await until(lambda: len(calls) == 1, "the first batch started")
            rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 40)]
            await until(lambda: len(b) == 39, "39 requests queued behind the running batch")
            release.set()
            return await asyncio.gather(first, *rest)
        finally:
            await b.close()

    assert asyncio.run(main()) == [i * 10 for i in range(40)]
    # the first request alone, then the 39 queued ones in full batches of 8, in arrival order
    assert calls == [[0]] + [list(range(i, min(i + 8, 40))) for i in range(1, 40, 8)]


def test_batcher_lone_request_is_dispatched_without_waiting_for_company():
    """With no batching window, a lone request reaches the model while no other request exists; with a
    window (max_wait_s) the same lone request is held until company fills the batch."""
    dispatched: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        dispatched.append(items)
        return items

    async def main() -> None:
        b = MicroBatcher(run, max_batch_size=4, max_queue=10)
        assert await asyncio.wait_for(b.submit(1), DEADLINE_S) == 1 and dispatched == [[1]]
        await b.close()
        held = MicroBatcher(run, max_batch_size=4, max_queue=10, max_wait_s=3600.0)
        lone = asyncio.ensure_future(held.submit(2))
        for _ in range(50):  # many turns of the event loop: the window keeps it waiting
            await asyncio.sleep(0)
        assert dispatched == [[1]] and not lone.done()
        company = [asyncio.ensure_future(held.submit(i)) for i in (3, 4, 5)]  # a full batch is sent at once
        assert await asyncio.wait_for(asyncio.gather(lone, *company), DEADLINE_S) == [2, 3, 4, 5]
        assert dispatched == [[1], [2, 3, 4, 5]]
        await held.close()

    asyncio.run(main())


def test_batcher_runs_a_lone_item_inline_only_when_idle():
    threads: list[int] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        if items == [2]:
            release.wait(DEADLINE_S)
        return items

    async def main() -> None:
        b = MicroBatcher(run, max_batch_size=4, max_queue=10)
        assert await b.submit(1, inline_if_idle=True) == 1 and threads[-1] == threading.get_ident()
        busy = asyncio.ensure_future(b.submit(2))  # worker thread, blocked until released
        await until(lambda: len(threads) == 2, "the worker took request 2")
        assert not b.idle
        third = asyncio.ensure_future(b.submit(3, inline_if_idle=True))  # model busy: queued, not inline
        await until(lambda: len(b) == 1, "request 3 queued")
        release.set()
        assert await busy == 2 and await third == 3
        await b.close()

    asyncio.run(main())
    assert threads[1] != threads[0] and threads[2] != threads[0]


def test_batcher_overload_and_errors_are_per_request():
    release = threading.Event()
    started = threading.Event()

    def run(items: list[int]) -> list[object]:
        started.set()
        release.wait(DEADLINE_S)
        return [ValueError(f"bad {x}") if x == 2 else x for x in items]

    async def main() -> list[object]:
        b = MicroBatcher(run, max_batch_size=2, max_queue=3)
        first = asyncio.ensure_future(b.submit(0))  # taken at once, blocks the worker
        await until(started.is_set, "the worker took request 0")
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await until(lambda: len(b) == 3, "3 requests queued")
        with pytest.raises(Overloaded) as err:
            await b.submit(4)  # 3 already waiting
        assert err.value.retry_after >= 1
        release.set()
        out = await asyncio.gather(first, *queued, return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(main())
    assert out[0] == 0 and out[1] == 1 and out[3] == 3
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad 2"


def test_batcher_drops_cancelled_requests_and_survives_a_failing_batch():
    seen: list[list[int]] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int]:
        seen.append(items)
        if 7 in items:
            raise RuntimeError("model crashed")
        if items == [0]:
            release.wait(DEADLINE_S)
        return items

    async def main() -> tuple[object, object]:
        b = MicroBatcher(run, max_batch_size=4, max_queue=10)
        busy = asyncio.ensure_future(b.submit(0))
        await until(lambda: seen == [[0]], "the worker took request 0")
        gone = asyncio.ensure_future(b.submit(5))
        await until(lambda: len(b) == 1, "request 5 queued")
        gone.cancel()  # the client went away while queued
        release.set()
        await busy
        crashed = await asyncio.gather(b.submit(7), return_exceptions=True)
        after = await b.submit(8)
        await b.close()
        return crashed[0], after

    crashed, after = asyncio.run(main())
    assert isinstance(crashed, RuntimeError) and after == 8
    assert all(5 not in s for s in seen)


def test_batcher_refuses_requests_that_waited_too_long(monkeypatch):
    """Queue waits read the batcher's clock (a fake one here): the first batch takes 0.3 s of it, so the
    two requests queued behind it have waited 0.3 s > max_queue_wait_s = 0.1 s when their turn comes."""
    clock = FakeClock()
    monkeypatch.setattr(serving.batcher, "time", clock)

    def run(items: list[int]) -> list[int]:
        clock.now += 0.3
        return items

    async def main() -> list[object]:
        b = MicroBatcher(run, max_batch_size=1, max_queue=10, max_queue_wait_s=0.1)
        out = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        await b.close()
        return out

    out = asyncio.run(main())
    assert out[0] == 0 and all(isinstance(o, Overloaded) and "waited 0.3 s" in str(o) for o in out[1:]), out
    # and a request that waited less than the bound is run
    clock.now = 2000.0

    def quick(items: list[int]) -> list[int]:
        clock.now += 0.05
        return items

    async def main2() -> list[object]:
        b = MicroBatcher(quick, max_batch_size=1, max_queue=10, max_queue_wait_s=0.1)
        out = await asyncio.gather(*(b.submit(i) for i in range(2)), return_exceptions=True)
        await b.close()
        return out

    assert asyncio.run(main2()) == [0, 1]


# ---------------------------------------------------------------------- LabelCache
def test_label_cache_is_bounded_in_bytes_and_keyed_by_content():
    cache = LabelCache(max_bytes=10 * (4000 + LabelCache.ENTRY_OVERHEAD))
    for i in range(50):
        cache.get_or_compute(LabelCache.key([f"label {i}"], ["a {}"]), lambda: np.zeros(1000, np.float32))
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 10
    assert cache.get(LabelCache.key(["label 49"], ["a {}"])) is not None
    assert cache.get(LabelCache.key(["label 0"], ["a {}"])) is None  # least recently used went first
    # content, not grouping, makes the key
    assert LabelCache.key(["a,b"], ["x {}"]) != LabelCache.key(["a", "b"], ["x {}"])
    assert LabelCache.key(["ab"], ["{}"]) != LabelCache.key(["a"], ["b{}"])


def test_label_cache_computes_each_key_once_under_concurrency():
    cache = LabelCache(max_bytes=1 << 20)
    computed: list[int] = []
    start = threading.Barrier(8)

    def compute() -> np.ndarray:
        computed.append(1)
        time.sleep(0.05)
        return np.ones(4, np.float32)

    def worker() -> np.ndarray:
        start.wait()
        return cache.get_or_compute(b"same key", compute)

    threads_out: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: threads_out.append(worker())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1 and len(threads_out) == 8 and all(o is threads_out[0] for o in threads_out)


def test_label_cache_failed_compute_releases_the_key():
    cache = LabelCache(max_bytes=1 << 20)

    def boom() -> np.ndarray:
        raise RuntimeError("text graph failed")

    with pytest.raises(RuntimeError):
        cache.get_or_compute(b"k", boom)
    assert cache.get_or_compute(b"k", lambda: np.zeros(2, np.float32)).shape == (2,)


def test_runtime_label_embeddings_come_from_the_cache(bundle):
    rt = BundleRuntime(bundle, device="cpu", threads=1, label_cache_bytes=1 << 20)
    names = ["a shoe", "a bag", "a coat"]
    assert rt.cached_labels(names) is None
    emb = rt.embed_labels(names)
    assert rt.cached_labels(names) is emb and rt.embed_labels(names) is emb
    assert rt.cached_labels(rt.label_names) is rt.default_text
    # the cached embedding is the template-averaged, renormalised text embedding
    direct = rt.embed_texts([t.format(n) for n in names for t in rt.templates]).reshape(3, len(rt.templates), -1)
    mean = direct.astype(np.float64).mean(1)
    np.testing.assert_allclose(emb, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- request parsing
def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b""
    for name, data, filename in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_parse_multipart_and_json_agree():
    image = bytes(range(256)) * 3
    body, ctype = multipart([("image", image, "x.png"), ("labels", b'["shoe", " bag "]', None), ("top_k", b"2", None)])
    a = parse_image_request(body, ctype)
    b = parse_image_request(json.dumps({"image": base64.b64encode(image).decode(), "labels": ["shoe", " bag "],
                                        "top_k": 2}).encode(), "application/json")
    c = parse_image_request(multipart([("image", image, "x.png"), ("labels", b"shoe,bag", None), ("top_k", b"2", None)])[0], ctype)
    assert a == b == c and a.image == image and a.labels == ["shoe", "bag"] and a.top_k == 2


@pytest.mark.parametrize("body, ctype, field, words", [
    (b"", "application/json", "image", "no image"),
    (b"[" * 50_000 + b"]" * 50_000, "application/json", None, "malformed json"),
    (b'{"image": 3}', "application/json", "image", "base64 string"),
    (b'{"image": "aGk=", "top_k": "many"}', "application/json", "top_k", "top_k"),
    (b'{"image": "aGk=", "top_k": 0}', "application/json", "top_k", "top_k"),
    (b'{"image": "aGk=", "labels": "shoe"}', "application/json", "labels", "labels"),
    (b'{"image": "aGk=", "labels": ["a", "a"]}', "application/json", "labels", "duplicate"),
    (b"--x\r\ngarbage", "multipart/form-data; boundary=x", None, "malformed multipart"),
    (b"--x--\r\n", "multipart/form-data", None, "boundary"),
], ids=["empty", "deep", "image-int", "top_k-text", "top_k-0", "labels-string", "labels-dup", "garbage", "no-boundary"])
def test_parse_errors_name_the_problem(body, ctype, field, words):
    with pytest.raises(RequestError) as err:
        parse_image_request(body, ctype)
    assert err.value.status == 400 and err.value.field == field and words in err.value.message.lower()


def test_parse_multipart_limits():
    body, ctype = multipart([("image", b"x", None)])
    with pytest.raises(RequestError, match="file part"):
        parse_image_request(body, ctype)
    body, ctype = multipart([("image", b"x", "a.png"), ("image", b"y", "b.png")])
    with pytest.raises(RequestError, match="exactly one"):
        parse_image_request(body, ctype)
    body, ctype = multipart([("image", b"x", "a.png")] + [(f"f{i}", b"v", None) for i in range(20)])
    with pytest.raises(RequestError, match="parts"):
        parse_image_request(body, ctype)
    body, ctype = multipart([("image", b"x", "a.png"), ("labels", b"a,b", "labels.txt")])
    with pytest.raises(RequestError, match="text field"):
        parse_image_request(body, ctype)


def test_only_small_images_are_decoded_on_the_event_loop():
    import io

    from PIL import Image

    from serving.engine import _cheap_to_decode

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    small = png(Image.new("RGB", (96, 96), (10, 20, 30)))
    many_pixels = png(Image.new("1", (4000, 4000)))  # a few kB that decode to 16 megapixels
    assert len(many_pixels) < 64 * 1024
    assert _cheap_to_decode(small) and not _cheap_to_decode(many_pixels)
    assert not _cheap_to_decode(small + bytes(70 * 1024))  # large upload
    assert _cheap_to_decode(b"not an image")  # refused at once by the decoder anyway


# ---------------------------------------------------------------------- spatial maps in the engine
def test_parse_spatial_and_heads_fields():
    image = bytes(range(256))
    body, ctype = multipart([("image", image, "x.png"), ("spatial", b"false", None), ("heads", b"true", None)])
    a = parse_image_request(body, ctype)
    b = parse_image_request(json.dumps({"image": base64.b64encode(image).decode(), "spatial": False, "heads": True}).encode(),
                            "application/json")
    assert a == b and (a.spatial, a.heads) == (False, True)
    default = parse_image_request(json.dumps({"image": base64.b64encode(image).decode()}).encode(), "application/json")
    assert (default.spatial, default.heads) == (True, False)
    with pytest.raises(RequestError) as err:
        parse_image_request(json.dumps({"image": base64.b64encode(image).decode(), "heads": "maybe"}).encode(), "application/json")
    assert err.value.field == "heads"


def test_engine_explain_carries_the_maps_of_each_request(bundle, v1_bundle):
    """One batch, three requests with different top_k / spatial / heads: each answer has its own maps, equal
    to the in-process runtime's; a format-1 bundle answers heads=true with a 400 naming `heads`."""
    from PIL import Image

    from serving.engine import ServingEngine
    from serving.inputs import ImageRequest
    from serving.settings import ServeSettings

    def png(seed: int) -> bytes:
        import io

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    engine = ServingEngine(ServeSettings(bundle=str(bundle), ort_threads=1, max_batch_size=8))
    requests = [ImageRequest(png(1), None, 2, True, False), ImageRequest(png(2), None, 4, True, True),
                ImageRequest(png(3), None, 3, False, False)]

    async def ask() -> list:
        return await asyncio.gather(*(engine.answer("explain", r) for r in requests))

    rt = engine.runtime
    try:
        answers = [json.loads(r.body) for r in asyncio.run(ask())]
        # the same engine over a format-1 bundle (one engine per process: its metrics are process-global)
        engine.runtime = BundleRuntime(v1_bundle, device="cpu", threads=1)
        refused = asyncio.run(engine.answer("explain", ImageRequest(png(1), None, None, True, True)))
        plain = json.loads(asyncio.run(engine.answer("explain", ImageRequest(png(1), None, None))).body)
    finally:
        asyncio.run(engine.close())
    for req, ans in zip(requests, answers):
        from serving.images import decode_image

        (local,) = rt.explain([decode_image(req.image)], top_k=req.top_k, spatial=req.spatial, heads=req.heads)
        if not req.spatial:
            assert ans["spatial"] is None
            continue
        assert [c["label"] for c in ans["spatial"]["classes"]] == [t["label"] for t in ans["top"]]
        for j, (h, l) in enumerate(zip(ans["spatial"]["classes"], local.spatial.classes)):
            np.testing.assert_allclose(h["layers"], l.layers, rtol=1e-5, atol=1e-7)
            assert (len(h["heads"]) > 0) == (req.heads and j == 0)
    assert refused.status_code == 400 and json.loads(refused.body)["field"] == "heads"
    assert plain["spatial"] is None and plain["explanations"]
