"""Server configuration: the CLTVIT_* environment variables, read once per process into `ServeSettings`.

`cltvit-serve` writes them from its arguments (serving/cli.py); a container sets them directly.
Every setting, its default and when to change it is listed in docs/serving.md.
"""
from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .choice import AUTO, VariantChoice
from .images import MAX_BYTES, MAX_PIXELS
from .variant_bench import BENCH_BUDGET_S

TRUE = ("1", "true", "True", "yes")

# field name -> environment variable (booleans are listed in BOOL_KEYS)
ENV_KEYS: dict[str, str] = {
    "bundle": "CLTVIT_BUNDLE",
    "device": "CLTVIT_DEVICE",
    "variant": "CLTVIT_VARIANT",
    "variant_bench_s": "CLTVIT_VARIANT_BENCH_S",
    "variant_choice": "CLTVIT_VARIANT_CHOICE",
    "workers": "CLTVIT_WORKERS",
    "ort_threads": "CLTVIT_THREADS",
    "max_batch_size": "CLTVIT_MAX_BATCH_SIZE",
    "batch_wait_ms": "CLTVIT_BATCH_WAIT_MS",
    "max_queue": "CLTVIT_MAX_QUEUE",
    "max_latency_ms": "CLTVIT_MAX_LATENCY_MS",
    "timeout_s": "CLTVIT_TIMEOUT_S",
    "api_token": "CLTVIT_API_TOKEN",
    "label_cache_mb": "CLTVIT_LABEL_CACHE_MB",
    "drift_reference": "CLTVIT_DRIFT_REFERENCE",
    "stall_report_ms": "CLTVIT_STALL_REPORT_MS",
}
BOOL_KEYS: dict[str, str] = {
    "ort_spinning": "CLTVIT_ORT_SPINNING",
    "access_log": "CLTVIT_ACCESS_LOG",
}


class ServeSettings(BaseModel):
    """Immutable server configuration (one per worker process).

    Batching: one asyncio micro-batcher per worker sits in front of the ONNX Runtime session. A
    request is dispatched at once when the model is idle; while a batch runs, arriving requests
    queue and form the next batch (up to `max_batch_size`), so batches grow with the load.
    `batch_wait_ms` > 0 additionally holds the first request of a batch that long for company.
    Overload: more than `max_queue` queued requests, or a request that waited over
    `max_latency_ms`, is answered 503 with Retry-After.
    """

    model_config = ConfigDict(frozen=True)
    bundle: str | None = None
    device: str = "auto"
    variant: str = Field(default=AUTO, description="graph variant, or 'auto': the fastest that passes the bundle's gate, "
                         "timed at start at batch sizes 1 and max_batch_size")
    variant_bench_s: float = Field(default=BENCH_BUDGET_S, ge=0.0, le=60.0, description="seconds of auto's benchmark rounds")
    variant_choice: VariantChoice | None = Field(default=None, description="auto's choice made by cltvit-serve before the "
                                                 "workers start (JSON in CLTVIT_VARIANT_CHOICE), so every worker serves the same")
    workers: int = Field(default=1, ge=1, le=256, description="BentoML worker processes, each with its own session and batcher")
    ort_threads: int | None = Field(default=None, ge=1, description="ONNX Runtime intra-op threads per worker (None: ORT's default)")
    ort_spinning: bool = False
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    batch_wait_ms: float = Field(default=0.0, ge=0.0, le=1000.0)
    max_queue: int = Field(default=256, ge=1)
    max_latency_ms: int = Field(default=20_000, ge=10)
    timeout_s: int = Field(default=120, ge=1)
    api_token: str | None = None
    max_image_bytes: int = MAX_BYTES
    max_image_pixels: int = MAX_PIXELS
    label_cache_mb: float = Field(default=64.0, gt=0.0, description="bound of the custom label-set embedding cache, MiB")
    verify_checksums: bool = True
    intervene: bool = Field(default=True, description="open the bundle's intervention graph (POST /intervene); off saves "
                            "its memory (a second copy of the weights)")
    access_log: bool = False
    stall_report_ms: float = Field(default=0.0, ge=0.0, le=60_000.0, description="0 (off), or: when a worker's event loop "
                                   "stalls this long, write every thread's stack to stderr (serving/loopwatch.py)")
    drift_reference: str | None = Field(default=None, description="drift reference profile (cltvit-drift reference): "
                                        "the served explanations' drift statistics go to /metrics")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServeSettings":
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {k: env[v] for k, v in ENV_KEYS.items() if env.get(v, "").strip()}
        values.update({k: env.get(v, "") in TRUE for k, v in BOOL_KEYS.items()})
        values["verify_checksums"] = env.get("CLTVIT_NO_VERIFY", "") not in TRUE
        values["intervene"] = env.get("CLTVIT_NO_INTERVENE", "") not in TRUE
        if "variant_choice" in values:
            values["variant_choice"] = VariantChoice.model_validate_json(values["variant_choice"])
        return cls(**values)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: a max-size image in base64 plus 1 MiB for the other fields."""
        return self.max_image_bytes * 4 // 3 + 4 + (1 << 20)
