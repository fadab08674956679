"""The service under hostile load, against real servers over HTTP on loopback (bounded request counts).

- Overload: a full queue answers 503 with Retry-After at once (before the queued requests are
  served), counted in cltvit_overloaded_total, and the server answers normally afterwards.
- Two workers with --max-latency-ms: late requests get 503 + Retry-After; both workers serve; one
  /metrics scrape counts every worker's requests.
- Label churn: hundreds of requests with random 40-label sets keep the server's memory bounded
  (the label-set cache is bounded in bytes; nothing else may grow per label set).
"""
from __future__ import annotations

import io
import random
import re
import string
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from PIL import Image

from serving.cli import server_process
from serving.images import decode_image
from serving.runtime import BundleRuntime

TIMEOUT = 60


def png(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (36, 36), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, endpoint: str, image: bytes, **data) -> requests.Response:
    return requests.post(f"{url}/{endpoint}", files={"image": ("i.png", image, "image/png")}, data=data, timeout=TIMEOUT)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


DEADLINE_S = 90.0  # bursts are repeated until their condition is seen; reaching this is a failure


def metric(text: str, name: str, **labels: str) -> float:
    """One series of a Prometheus text scrape, summed over the labels not given (e.g. `worker`); 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$", line)
        if m and all(dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(1) or "")).get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def scrape(url: str) -> str:
    return requests.get(f"{url}/metrics", timeout=TIMEOUT).text


def burst(url: str, n: int, seed: int = 0) -> list[tuple[int, float, dict]]:
    """`n` simultaneous /classify requests: (status, client-side completion time, headers + JSON body) each."""

    def one(i: int) -> tuple[int, float, dict]:
        r = post(url, "classify", png(seed + i))
        return r.status_code, time.perf_counter(), dict(r.headers) | {"body": r.json()}

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.slow
def test_overload_answers_503_with_retry_after_at_once_and_recovers(bundle):
    """The batcher holds the first queued image of a batch up to 1 s for company and lets at most 4
    images wait; a request that finds 4 waiting is refused at once. Asserted without wall-clock bounds:
    no batch ever holds more than the 4 the queue admits (the batch-size histogram, max batch 64), every
    503 returns before the last 200 of its burst (the 4 it found waiting are answered after it, held for
    up to 1 s: that is the margin), each 503 carries Retry-After, and the overload counters count exactly
    the 503s. Whether a burst fills the queue depends on how fast the client's threads send on a busy
    2-core machine (a request that finds the server empty runs at once), so bursts repeat until one has."""
    args = ["--threads", "1", "--max-batch-size", "64", "--batch-wait-ms", "1000", "--max-queue", "4"]
    with server_process(bundle, extra_args=args) as (url, _):
        assert post(url, "classify", png(0)).status_code == 200
        before = scrape(url)
        refused_total, deadline, rounds = 0, time.monotonic() + DEADLINE_S, 0
        while refused_total == 0:
            assert time.monotonic() < deadline, f"no burst of 16 filled a queue of 4 in {rounds} rounds"
            out = burst(url, 16, seed=16 * rounds)
            rounds += 1
            assert {code for code, _, _ in out} <= {200, 503}, [o[0] for o in out]
            refused = [(t, headers) for code, t, headers in out if code == 503]
            last_answer = max(t for code, t, _ in out if code == 200)
            for t, headers in refused:
                assert t < last_answer, "a 503 must not wait for the held batch"
                assert int(headers["retry-after"]) >= 1 and "overloaded" in headers["body"]["error"]
            refused_total += len(refused)
        after = scrape(url)
        assert metric(after, "cltvit_overloaded_total") - metric(before, "cltvit_overloaded_total") == refused_total
        assert (metric(after, "cltvit_requests_total", endpoint="classify", status="503")
                - metric(before, "cltvit_requests_total", endpoint="classify", status="503")) == refused_total
        batches = metric(after, "cltvit_batch_size_count")
        assert metric(after, "cltvit_batch_size_bucket", le="4.0") == batches > 0, "a batch held more than max-queue images"
        # recovered: a lone request and then a moderate concurrent load are all answered
        assert post(url, "explain", png(99)).status_code == 200
        assert [o[0] for o in burst(url, 4)] == [200] * 4


@pytest.mark.slow
def test_two_workers_serve_refuse_late_requests_and_merge_their_metrics(bundle):
    """`--workers 2 --max-latency-ms 10` with a 1 s batching window: a request that finds its worker
    busy is queued, held for company longer than 10 ms, and answered 503 + Retry-After (`waited` in
    the message); a lone request runs at once and is answered. /metrics is one scrape for both workers:
    the request and overload counters equal the client's own counts, summed over workers, and the
    batching metrics carry each worker's label. Bursts repeat until both workers have answered and a
    late request has been refused (how requests spread over workers and time is up to the machine)."""
    runtime = BundleRuntime(bundle, device="cpu", threads=1)
    args = ["--workers", "2", "--threads", "1", "--max-batch-size", "64", "--batch-wait-ms", "1000", "--max-latency-ms", "10"]
    with server_process(bundle, extra_args=args) as (url, _):
        before = scrape(url)
        counts = {200: 0, 503: 0}
        deadline, rounds = time.monotonic() + DEADLINE_S, 0
        while True:
            out = burst(url, 6, seed=100 + 6 * rounds)
            for i, (code, _, headers) in enumerate(out):
                assert code in (200, 503), (code, headers["body"])
                counts[code] += 1
                if code == 503:
                    assert int(headers["retry-after"]) >= 1 and "waited" in headers["body"]["error"], headers
                else:
                    local = runtime.explain([decode_image(png(100 + 6 * rounds + i))], detail=False)[0].predicted
                    assert headers["body"]["predicted"] == local
            rounds += 1
            workers = set(re.findall(r'^cltvit_batch_size_count\{worker="([0-9]+)"\}', scrape(url), re.M))
            if counts[503] and len(workers) == 2:
                break
            assert time.monotonic() < deadline, f"after {rounds} bursts: {counts}, workers that answered: {workers}"
        after = scrape(url)

        def delta(name: str, **labels: str) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        assert delta("cltvit_requests_total", endpoint="classify", status="200") == counts[200]
        assert delta("cltvit_requests_total", endpoint="classify", status="503") == counts[503]
        assert delta("cltvit_overloaded_total") == counts[503]
        # every request was run inline or refused: one batch of one image per answered request
        assert delta("cltvit_batch_size_sum") == delta("cltvit_batch_size_count") == counts[200]


@pytest.mark.slow
def test_memory_stays_bounded_under_label_churn(bundle):
    """300 requests, each with a new random set of 40 labels: RSS after 300 ~ RSS after 100.

    The words come from a pool of 2,000, so that every label set is new while the tokenizer's BPE word
    cache (bounded on its own at 50,000 words, test_tokenizer.py) fills during the warm-up: with fresh
    random words per request it keeps filling through the measured phase, by design (~22 MB when
    full, docs/serving.md; 37 MiB of RSS growth over 2,500 such requests, measured), and the RSS growth landed at the bound (16.1 MiB in one clean-checkout CI run).
    The server runs with MALLOC_ARENA_MAX=2: glibc's per-thread malloc arenas otherwise add steps of up
    to ~12 MiB depending on which worker threads touch new memory. With both, the growth over the 200
    measured requests was 0.6-3.4 MiB in 10 of 11 runs, 8.2 MiB in one.

    The bound is 32 MiB: twice the largest growth ever recorded (16.1 MiB), so allocator noise does not
    fail it; what it still catches is anything kept per request or per label set of 160 kB or more
    (32 MiB / 200 requests), e.g. each request's decoded image or a per-set copy of the text graph's
    outputs at a real model's width. The label cache's own byte bound is tested exactly in
    test_service_units.py."""
    rng = random.Random(0)
    vocabulary = sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 12))) for _ in range(2000)})

    def labels() -> str:
        return ",".join(sorted(rng.sample(vocabulary, 40)))

    sets = [labels() for _ in range(300)]
    image = png(1)
    # a 1 MiB label cache holds ~100 of the tiny bundle's 40-label sets (5 kB each + overhead),
    # so the measured phase runs with the cache full and evicting
    with server_process(bundle, extra_args=["--threads", "1", "--label-cache-mb", "1"],
                        env={"MALLOC_ARENA_MAX": "2"}) as (url, proc):

        def one(i: int) -> int:
            return post(url, "classify" if i % 2 else "explain", image, labels=sets[i], top_k="3").status_code

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(one, range(100))) == {200}
            warm = tree_rss(proc.pid)
            assert set(pool.map(one, range(100, 300))) == {200}
        grown = tree_rss(proc.pid) - warm
    assert grown < 32 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 requests with new label sets"
