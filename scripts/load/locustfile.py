"""Locust load test: multipart uploads of real Fashion-MNIST test images to the cltvit service.

    locust -f scripts/load/locustfile.py --headless -u 16 -r 16 -t 60s --host http://127.0.0.1:3000

Environment: LOAD_ENDPOINT (classify | explain | embed, default classify), LOAD_IMAGES (how many
distinct test images to cycle through, default 256), CLTVIT_API_TOKEN (sent as a bearer token when
set), FMNIST_DIR (default /usr/share/datasets/fashion-mnist). Each user posts back to back (closed
loop, no think time), so throughput is bounded by the server. Any non-200 answer is a failure.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from locust import HttpUser, constant, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist import fashion_mnist_pngs  # noqa: E402

ENDPOINT = os.environ.get("LOAD_ENDPOINT", "classify")
N_IMAGES = int(os.environ.get("LOAD_IMAGES", "256"))
TOKEN = os.environ.get("CLTVIT_API_TOKEN", "")
if ENDPOINT not in ("classify", "explain", "embed"):
    raise SystemExit(f"LOAD_ENDPOINT must be classify, explain or embed, got {ENDPOINT!r}")

IMAGES = fashion_mnist_pngs(N_IMAGES)


class ImageUploader(HttpUser):
    """One client: uploads a random test image to /<LOAD_ENDPOINT>, then immediately the next."""

    wait_time = constant(0)

    def on_start(self) -> None:
        if TOKEN:
            self.client.headers["Authorization"] = f"Bearer {TOKEN}"
        self.rng = random.Random()

    @task
    def upload(self) -> None:
        data = self.rng.choice(IMAGES)
        with self.client.post(f"/{ENDPOINT}", files={"image": ("fmnist.png", data, "image/png")},
                              name=f"/{ENDPOINT}", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif "predicted" not in resp.json():
                resp.failure(f"answer without 'predicted': {resp.text[:200]}")
            else:
                resp.success()
