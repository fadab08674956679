"""Reference services of scripts/bench_serve.py: BentoML's floor and the two ways to add a batching hop.

Each receives the same multipart upload as /classify (a file part `image`), reads it, and answers
one JSON field; none runs a model. Served like the real service (one worker, access log off):
  Floor        POST /floor    the framework's floor: BentoML's own parse of the upload, then answer
  FloorDepends POST /floor    the same, then a call to a batchable API of a second service through
                              `bentoml.depends` (BentoML's documented batching pattern; two processes)
  FloorBatcher POST /floor    the same, then through serving.batcher.MicroBatcher (the in-process hop
                              the cltvit service uses), with a batch function that does nothing
"""
from __future__ import annotations

import sys
from pathlib import Path

import bentoml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving.batcher import MicroBatcher  # noqa: E402

CONFIG = {"workers": 1, "traffic": {"timeout": 120}, "logging": {"access": {"enabled": False}},
          # BentoML recycles its client session every 100 requests by default and, under concurrency, closes
          # it under requests in flight ("Connector is closed"); keep one session for the life of the worker.
          "runner_connection": {"max_requests": 2**31 - 1, "max_age": 1e12}}


@bentoml.service(name="floor", **CONFIG)
class Floor:
    @bentoml.api(route="/floor")
    async def floor(self, image: Path) -> dict:
        return {"bytes": len(image.read_bytes())}


@bentoml.service(name="trivial-batch", **CONFIG)
class TrivialBatch:
    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=60_000)
    def infer(self, sizes: list[int]) -> list[int]:
        return sizes


@bentoml.service(name="floor-depends", **CONFIG)
class FloorDepends:
    model = bentoml.depends(TrivialBatch)

    @bentoml.api(route="/floor")
    async def floor(self, image: Path) -> dict:
        (n,) = await self.model.to_async.infer([len(image.read_bytes())])
        return {"bytes": n}


@bentoml.service(name="floor-batcher", **CONFIG)
class FloorBatcher:
    def __init__(self) -> None:
        self.batcher: MicroBatcher[int, int] = MicroBatcher(lambda sizes: sizes, max_batch_size=64, max_queue=1024)

    @bentoml.api(route="/floor")
    async def floor(self, image: Path) -> dict:
        return {"bytes": await self.batcher.submit(len(image.read_bytes()))}
