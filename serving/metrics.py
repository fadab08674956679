"""cltvit_* Prometheus metrics, exposed on BentoML's /metrics next to its own.

Requests per endpoint and status; predicted labels; per-term share of the predicted logit; and the
batching stage: images per batch (`cltvit_batch_size`), time a request waited in the
queue (`cltvit_queue_wait_seconds`), wall time and thread CPU time of the model calls
(`cltvit_inference_seconds`, `cltvit_model_cpu_seconds_total`); the worker's full (generation-2)
garbage collections: how many, how long each stopped the process, and how many objects the collector
still tracked after the last one (`cltvit_gc_*`, see `watch_gc`). Created once per worker process;
the batching metrics carry a `worker` label (the worker's process id), so that with several
workers each one's share of the model (accelerator) time can be read off.
"""
from __future__ import annotations

import collections
import gc
import os
import time
from typing import Any, Sequence

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's metrics; `term_names` label the per-term share histogram."""

    def __init__(self, term_names: Sequence[str], max_batch_size: int) -> None:
        import prometheus_client as prom  # imported late: BentoML sets up multiprocess mode first

        self.term_names = list(term_names)
        self.worker = str(os.getpid())
        self.requests = prom.Counter("cltvit_requests", "Requests handled per endpoint and HTTP status", ["endpoint", "status"])
        self.predictions = prom.Counter(
            "cltvit_predicted_label", "Predicted labels (bundle labels by name; custom label sets as 'custom')", ["label"]
        )
        self.term_share = prom.Histogram(
            "cltvit_term_share", "Share of |contribution| to the predicted logit, per term (layer)",
            ["term"], buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0),
        )
        sizes, b = [], 1
        while b < max_batch_size:
            sizes.append(b)
            b *= 2
        worker = ["worker"]
        self.batch_size = prom.Histogram("cltvit_batch_size", "Images per batch taken from the queue "
                                         "(a batch mixing label sets is run as one ONNX Runtime call per set)",
                                         worker, buckets=(*sizes, max_batch_size)).labels(worker=self.worker)
        self.queue_wait = prom.Histogram("cltvit_queue_wait_seconds", "Time a request waited for its batch to start",
                                         worker, buckets=SECONDS).labels(worker=self.worker)
        self.inference = prom.Histogram("cltvit_inference_seconds", "Wall time of one ONNX Runtime call",
                                        worker, buckets=SECONDS).labels(worker=self.worker)
        self.model_cpu = prom.Counter("cltvit_model_cpu_seconds", "CPU time of the thread that runs ONNX Runtime, "
                                      "during model calls (all of ORT's CPU when it runs one intra-op thread)",
                                      worker).labels(worker=self.worker)
        self.overloaded = prom.Counter("cltvit_overloaded", "Requests answered 503 because the batcher's queue was full or too slow")
        self.gc_full = prom.Counter("cltvit_gc_full_collections", "Full (generation-2) garbage collections of the worker",
                                    worker).labels(worker=self.worker)
        self.gc_pause = prom.Histogram("cltvit_gc_full_pause_seconds", "Time one full garbage collection stopped the worker",
                                       worker, buckets=SECONDS).labels(worker=self.worker)
        self.gc_objects = prom.Gauge("cltvit_gc_objects", "Objects the collector tracked after the worker's last full collection "
                                     "(those frozen at start-up not counted)", worker,
                                     multiprocess_mode="liveall").labels(worker=self.worker)
        self.label_cache_bytes = prom.Gauge("cltvit_label_cache_bytes", "Bytes held by the custom label-set cache "
                                            "(bounded by --label-cache-mb)", worker,
                                            multiprocess_mode="liveall").labels(worker=self.worker)
        self._gc_started = 0.0
        self._gc_done: collections.deque[tuple[float, int]] = collections.deque(maxlen=1024)

    def watch_gc(self) -> None:
        """Record the worker's full garbage collections (`cltvit_gc_*`, written at the next `request`) until
        `unwatch_gc`. Only generation 2 is watched: younger collections are frequent and short."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside whichever thread's allocation set off the collection, possibly while it holds
        # prometheus_client's (non-reentrant) value lock: only plain attributes and a deque here.
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:  # O(objects) like the collection itself, once per full collection
            self._gc_done.append((time.perf_counter() - self._gc_started, len(gc.get_objects())))

    def _flush_gc(self) -> None:
        while self._gc_done:
            pause, objects = self._gc_done.popleft()
            self.gc_pause.observe(pause)
            self.gc_full.inc()
            self.gc_objects.set(objects)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self._flush_gc()

    def prediction(self, predicted: str, term_shares: Sequence[float], custom_labels: bool) -> None:
        self.predictions.labels(label="custom" if custom_labels else predicted).inc()
        for term, share in zip(self.term_names, term_shares):
            self.term_share.labels(term=term).observe(share)

    def batch(self, size: int, waits: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for w in waits:
            self.queue_wait.observe(w)

    def model_call(self, seconds: float, cpu_seconds: float) -> None:
        self.inference.observe(seconds)
        self.model_cpu.inc(cpu_seconds)
