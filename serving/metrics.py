"""cltvit_* Prometheus metrics, exposed on BentoML's /metrics next to its own.

Requests per endpoint and status; predicted labels; per-term share of the predicted logit; and the
batching stage: images per batch (`cltvit_batch_size`), time a request waited in the
queue (`cltvit_queue_wait_seconds`), wall time and thread CPU time of the model calls
(`cltvit_inference_seconds`, `cltvit_model_cpu_seconds_total`); label-set cache evictions and bytes; a
heartbeat per worker; the worker's full (generation-2) garbage collections: how many, how long each
stopped the process, and how many objects the collector still tracked after the last one (`cltvit_gc_*`,
see `watch_gc`); how late the event loop runs (`cltvit_event_loop_lag_seconds`, serving/loopwatch.py). Created once per worker process; the batching metrics carry a `worker` label
(the worker's process id), so that with several workers each one's share of the model
(accelerator) time can be read off.

Drift (with a reference profile, serving/jobs/drift.py): BentoML serves /metrics from
prometheus_client's multiprocess mode, which sums counters over the workers' files and cannot run
a custom collector. So the service exports the *sufficient statistics* of the drift scores as
counters (images, the sum of each term's share, images per predicted class; per label set) and the
reference as gauges; a window of any length is then `increase(...[W])` in PromQL, the same for
one worker or many, and the scores are recording rules (monitoring/rules/cltvit.rules.yml).
"""
from __future__ import annotations

import collections
import gc
import os
import time
from typing import Any, Sequence

from .jobs.drift import DriftProfile

LABEL_SETS = ("default", "custom")  # the bundle's own labels / any label set sent with the request

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's metrics; `term_names` label the per-term share histogram."""

    def __init__(self, term_names: Sequence[str], max_batch_size: int, reference: DriftProfile | None = None,
                 label_names: Sequence[str] = ()) -> None:
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
        self.label_cache_evictions = prom.Counter(
            "cltvit_label_cache_evictions", "Custom labels' embedding rows dropped from the cache to stay within --label-cache-mb (asked again, they cost a text-graph run)")
        # 'liveall': one series per live worker (label pid); a worker whose event loop stops answering
        # stops moving its timestamp, which the other workers' /metrics still show
        self.heartbeat = prom.Gauge("cltvit_worker_heartbeat_timestamp_seconds",
                                    "Unix time at which the worker's event loop last ran its heartbeat",
                                    multiprocess_mode="liveall")
        self.drift: DriftCounters | None = None
        if reference is not None:
            self.drift = DriftCounters(prom, reference, label_names)
        self.gc_full = prom.Counter("cltvit_gc_full_collections", "Full (generation-2) garbage collections of the worker",
                                    worker).labels(worker=self.worker)
        self.gc_pause = prom.Histogram("cltvit_gc_full_pause_seconds", "Time one full garbage collection stopped the worker",
                                       worker, buckets=SECONDS).labels(worker=self.worker)
        self.gc_objects = prom.Gauge("cltvit_gc_objects", "Objects the collector tracked after the worker's last full collection "
                                     "(those frozen at start-up not counted)", worker,
                                     multiprocess_mode="liveall").labels(worker=self.worker)
        self.label_cache_bytes = prom.Gauge("cltvit_label_cache_bytes", "Bytes held by the custom label embedding cache (rows per label, recent sets) "
                                            "(bounded by --label-cache-mb)", worker,
                                            multiprocess_mode="liveall").labels(worker=self.worker)
        self.loop_lag = prom.Histogram("cltvit_event_loop_lag_seconds", "How much later than asked the worker's event loop woke a "
                                       "20 ms timer: time in which it served nothing (serving/loopwatch.py)",
                                       worker, buckets=SECONDS).labels(worker=self.worker)
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
        if self.drift is not None:
            self.drift.count(predicted, term_shares, custom_labels)

    def beat(self) -> None:
        self.heartbeat.set(time.time())

    def label_cache_evicted(self, n: int) -> None:
        self.label_cache_evictions.inc(n)

    def batch(self, size: int, waits: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for w in waits:
            self.queue_wait.observe(w)

    def model_call(self, seconds: float, cpu_seconds: float) -> None:
        self.inference.observe(seconds)
        self.model_cpu.inc(cpu_seconds)


class DriftCounters:
    """The drift monitor's sufficient statistics (see the module docstring), per label set:

    - `cltvit_drift_images_total{label_set}`: images counted
    - `cltvit_drift_share_sum_total{label_set, term}`: sum over those images of the term's share of the
      predicted logit (serving/shares.py), so a window's mean share is increase(sum) / increase(images)
    - `cltvit_drift_class_images_total{label}`: images per predicted label (the bundle's label set only:
      a custom label set's classes are not the reference's)
    - `cltvit_drift_reference_share_mean{term}`, `..._share_std{term}` (floored at drift.STD_FLOOR: the
      score's denominator), `cltvit_drift_reference_class_share{label}`, `..._class_std{label}`, and
      `cltvit_drift_reference_images`: the profile, the same in every worker (multiprocess mode 'max').

    Every series is created at 0 when the worker starts, so a window that begins before the first
    image counts all of them (Prometheus's increase() cannot see the first value of a series born mid-window).
    """

    def __init__(self, prom: object, reference: DriftProfile, label_names: Sequence[str]) -> None:
        p = prom  # the prometheus_client module (imported late by ServiceMetrics)
        terms = reference.term_names
        images = p.Counter("cltvit_drift_images", "Images counted by the drift monitor, per label set "  # type: ignore[attr-defined]
                           "('default': the bundle's labels, 'custom': a label set sent with the request)", ["label_set"])
        share_sum = p.Counter("cltvit_drift_share_sum", "Sum over the counted images of the term's share of "  # type: ignore[attr-defined]
                              "|contribution| to the predicted logit", ["label_set", "term"])
        self._children = {ls: (images.labels(label_set=ls), [share_sum.labels(label_set=ls, term=t) for t in terms])
                          for ls in LABEL_SETS}
        classes = p.Counter("cltvit_drift_class_images", "Images per predicted label (the bundle's label set only)", ["label"])  # type: ignore[attr-defined]
        self._classes = {c: classes.labels(label=c) for c in label_names}

        def gauge(name: str, doc: str, labels: list[str]) -> object:
            return p.Gauge(name, doc, labels, multiprocess_mode="max")  # type: ignore[attr-defined]

        mean = gauge("cltvit_drift_reference_share_mean", "Reference profile: mean share of the term", ["term"])
        std = gauge("cltvit_drift_reference_share_std", "Reference profile: std of the term's share, floored "
                    "(the denominator of the term's drift score)", ["term"])
        for t, m, s in zip(terms, reference.mean, reference.scale):
            mean.labels(term=t).set(float(m))  # type: ignore[attr-defined]
            std.labels(term=t).set(float(s))  # type: ignore[attr-defined]
        if reference.class_mean is not None:
            cmean = gauge("cltvit_drift_reference_class_share", "Reference profile: fraction of images predicted as the label", ["label"])
            cstd = gauge("cltvit_drift_reference_class_std", "Reference profile: sqrt(q (1 - q)) of the label's fraction q, "
                         "floored (the denominator of the label's drift score)", ["label"])
            for c, q, s in zip(reference.classes, reference.class_mean, reference.class_scale):
                cmean.labels(label=c).set(float(q))  # type: ignore[attr-defined]
                cstd.labels(label=c).set(float(s))  # type: ignore[attr-defined]
        gauge("cltvit_drift_reference_images", "Images the reference profile was made from", []).set(reference.count)  # type: ignore[attr-defined]

    def count(self, predicted: str, term_shares: Sequence[float], custom_labels: bool) -> None:
        images, sums = self._children["custom" if custom_labels else "default"]
        images.inc()
        for child, share in zip(sums, term_shares):
            child.inc(float(share))
        if not custom_labels:
            child = self._classes.get(predicted)
            if child is not None:
                child.inc()
