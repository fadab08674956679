"""The service under hostile load, against real servers over HTTP on loopback (bounded request counts).

- Overload: a full queue answers 503 with Retry-After at once (before the queued requests are
  served), and the server answers normally afterwards.
- Label churn: hundreds of requests with random 40-label sets keep the server's memory bounded
  (the label-set cache is bounded in bytes; nothing else may grow per label set).
"""
from __future__ import annotations

import io
import random
import string
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from PIL import Image

from serving.cli import server_process

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


def test_overload_answers_503_with_retry_after_at_once_and_recovers(bundle):
    # The batcher holds the first queued image of a batch up to 1 s for company and lets at most 4
    # images wait: of 16 simultaneous requests, 4 wait for that batch and the rest are refused at
    # once, not after the batch. (A request that finds the server empty runs at once instead of
    # queueing; on a busy machine a few of the 16 can arrive that early.)
    args = ["--threads", "1", "--max-batch-size", "64", "--batch-wait-ms", "1000", "--max-queue", "4"]
    with server_process(bundle, extra_args=args) as (url, _):
        assert post(url, "classify", png(0)).status_code == 200

        def one(i: int) -> tuple[int, float, dict]:
            t0 = time.perf_counter()
            r = post(url, "classify", png(i))
            return r.status_code, time.perf_counter() - t0, dict(r.headers) | {"body": r.json()}

        with ThreadPoolExecutor(16) as pool:
            out = list(pool.map(one, range(16)))
        held = [t for code, t, _ in out if code == 200 and t >= 0.9]
        refused = [(t, headers) for code, t, headers in out if code == 503]
        assert {code for code, _, _ in out} == {200, 503} and len(held) == 4, [(o[0], round(o[1], 2)) for o in out]
        # how many arrive while the server is still empty depends on how fast the client's threads start on a
        # busy 2-core machine (6 of 16 were measured in CI); what must hold is that the queue bound refuses some
        assert len(refused) >= 4, [(o[0], round(o[1], 2)) for o in out]
        for t, headers in refused:
            assert t < 0.9, "a 503 must not wait for the held batch"
            assert int(headers["retry-after"]) >= 1 and "overloaded" in headers["body"]["error"]
        # recovered: a lone request and then a moderate concurrent load are all answered
        assert post(url, "explain", png(99)).status_code == 200
        with ThreadPoolExecutor(4) as pool:
            assert [o[0] for o in pool.map(one, range(4))] == [200] * 4
        metrics = requests.get(f"{url}/metrics", timeout=TIMEOUT).text
        assert 'cltvit_requests_total{endpoint="classify",status="503"}' in metrics


@pytest.mark.slow
def test_memory_stays_bounded_under_label_churn(bundle):
    """300 requests, each with a new random set of 40 labels: RSS after 300 ~ RSS after 100.

    The words come from a pool of 2,000, so that every label set is new while the tokenizer's BPE word
    cache (bounded on its own at 50,000 words, test_tokenizer.py) fills during the warm-up: with fresh
    random words per request it keeps filling through the measured phase, by design (~22 MB when
    full, docs/serving.md; 37 MiB of RSS growth over 2,500 such requests, measured), and the RSS growth landed at the bound (16.1 MiB in one clean-checkout CI run).
    The server runs with MALLOC_ARENA_MAX=2: glibc's per-thread malloc arenas otherwise add steps of up
    to ~12 MiB depending on which worker threads touch new memory. With both, the growth over the 200
    measured requests was 0.6-3.4 MiB in 10 of 11 runs, 8.2 MiB in one."""
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
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 requests with new label sets"
