"""A killed and resumed CLT training run ends where an uninterrupted one does (weights, optimizer state,
RNG, stream position, dead-feature counters, metrics), and a kill while a checkpoint is being written
leaves the last good checkpoint loadable.

Real processes, real kills: `cltvit-train` runs armed with a kill point (`bundle.killpoints`); when it
reaches the point it reports on a pipe and waits, and the test SIGKILLs it. A process that crashes
before the point closes the pipe, and the test fails at once with its log (no polling, no unread pipe).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bundle.killpoints import ENV_FD, ENV_POINT, kill_at
from training.activations import ActivationStream
from training.data import FashionMNIST
from training.model.backbone import load_backbone
from training.model.checkpoint import load_checkpoint
from training.trainer import LATEST, STATE_FILE, Checkpointer

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 24, 6
WAIT_S = 240  # for one process to reach its kill point (import + a few steps; generous for a loaded CI machine)


def command(out: Path) -> list[str]:
    # 200 images of 17 tokens: groups of 32 images (the last one 8), one epoch boundary crossed; AuxK
    # active (features dead after 512 tokens), so the dead-feature counters matter too
    return [str(Path(sys.executable).parent / "cltvit-train"), "--model", "cltvit-tiny", "--dataset", "fashion-mnist",
            "--limit", "200", "--features", "64", "--k", "4", "--steps", str(STEPS), "--batch-tokens", "128",
            "--buffer-tokens", "1024", "--images-per-batch", "32", "--checkpoint-every", str(EVERY), "--log-every", "2",
            "--lr", "3e-3", "--warmup-steps", "3", "--dead-after-tokens", "512", "--threads", "1", "--seed", "0",
            "--no-progress", "--out", str(out)]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_POINT, ENV_FD)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_until(point: str, out: Path, log: Path) -> str:
    """Run cltvit-train on `out` until it reaches kill point `point`, SIGKILL it there; returns its log."""
    log.write_bytes(b"")
    kill_at(command(out), point, log, env=environment(), cwd=ROOT, wait_s=WAIT_S)
    return log.read_text()


def assert_loadable(out: Path, step: int) -> None:
    """The newest complete checkpoint is step `step` and everything in it loads."""
    latest = Checkpointer(out, 2).latest()
    assert latest is not None and latest.name == f"step-{step:08d}", latest
    backbone = load_backbone("cltvit-tiny", None, device="cpu", seed=0)
    clt, meta = load_checkpoint(latest, backbone)  # checks the weights against their recorded sha256
    assert meta["step"] == step and clt.cfg.n_features == 64
    state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
    assert state["step"] == step and state["world_size"] == 1 and state["streams"][0]["buffer"]["n"] > 0


def flat(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists/tuples -> {path: leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}/{i}").items()}
    return {prefix: obj}


def max_difference(a: dict[str, object], b: dict[str, object]) -> float:
    """Largest |difference| over all tensor / number leaves (for the message); non-numeric leaves must be equal."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    worst = 0.0
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype, key
            if x.numel():
                worst = max(worst, float((x.double() - y.double()).abs().max()) if x.is_floating_point() else float((x != y).any()))
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), key
        elif isinstance(x, float):
            worst = max(worst, abs(x - y))
        else:
            assert x == y, (key, x, y)
    return worst


def not_bitwise_equal(a: dict[str, object], b: dict[str, object]) -> list[str]:
    """The leaves whose bytes differ (tensors and arrays: dtype, shape and every byte; NaN equals only the same NaN)."""
    assert a.keys() == b.keys(), set(a) ^ set(b)

    def raw(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), tuple(v.shape), v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    if v.numel() else b"")
        if isinstance(v, np.ndarray):
            return (str(v.dtype), v.shape, v.tobytes())
        if isinstance(v, float):
            return struct.pack("<d", v)
        return v

    return [key for key in a if raw(a[key]) != raw(b[key])]


@pytest.fixture()
def uninterrupted(tmp_path):
    """The same run never interrupted, started now in a second process (this machine has 2 cores); the
    test calls the fixture's value to wait for it. Output goes to a log file."""
    out, log = tmp_path / "uninterrupted", tmp_path / "uninterrupted.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(command(out), cwd=ROOT, env=environment(), stdout=log_file, stderr=subprocess.STDOUT)

    def finished() -> Path:
        proc.wait(timeout=600)
        assert proc.returncode == 0, log.read_text()
        return out

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_killed_five_times_ends_equal_to_an_uninterrupted_run(uninterrupted, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    # 1. mid-training, 3 steps after the step-6 checkpoint
    train_until(f"train.step@{EVERY + 3}", out, logs / "1.log")
    assert_loadable(out, EVERY)
    assert (out / "checkpoints" / LATEST).read_text() == f"step-{EVERY:08d}"
    # 2. resumed, killed with the step-12 checkpoint fully written but not yet renamed into place
    text = train_until("checkpoint.state_written@1", out, logs / "2.log")
    assert f"(step {EVERY} of {STEPS})" in text
    assert (out / "checkpoints" / f"step-{2 * EVERY:08d}.tmp").is_dir()
    assert_loadable(out, EVERY)
    # 3. resumed, killed after renaming step 12 but before LATEST was updated: step 12 counts
    train_until("checkpoint.renamed@1", out, logs / "3.log")
    assert (out / "checkpoints" / LATEST).read_text() == f"step-{EVERY:08d}"
    assert_loadable(out, 2 * EVERY)
    # 4. resumed, killed while deleting the oldest checkpoint (step 6) after writing step 18
    train_until("checkpoint.pruning@1", out, logs / "4.log")
    assert (out / "checkpoints" / f"step-{EVERY:08d}.deleting").is_dir()
    assert_loadable(out, 3 * EVERY)
    # 5. resumed, killed in the final save: new clt.safetensors on disk, its clt.json not yet
    #    (the 1st weights write after resuming is the step-24 checkpoint's, the 2nd the final one)
    train_until("checkpoint.weights_written@2", out, logs / "5.log")
    assert (out / "clt.safetensors").is_file() and not (out / "clt.json").exists()
    assert_loadable(out, STEPS)
    # 6. resumed to the end
    done = subprocess.run(command(out), cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout
    assert f"(step {STEPS} of {STEPS})" in done.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [LATEST, f"step-{3 * EVERY:08d}", f"step-{STEPS:08d}"]

    ref = uninterrupted()
    weights = max_difference(load_file(str(ref / "clt.safetensors")), load_file(str(out / "clt.safetensors")))
    state_ref = torch.load(ref / "checkpoints" / f"step-{STEPS:08d}" / STATE_FILE, weights_only=False)
    state_got = torch.load(out / "checkpoints" / f"step-{STEPS:08d}" / STATE_FILE, weights_only=False)
    optimizer = max_difference(flat(state_ref["optimizer"]), flat(state_got["optimizer"]))
    rest = max_difference(flat({k: v for k, v in state_ref.items() if k != "optimizer"}),
                          flat({k: v for k, v in state_got.items() if k != "optimizer"}))
    meta_ref, meta_got = (json.loads((p / "clt.json").read_text()) for p in (ref, out))
    metrics = max_difference(flat(meta_ref["metrics"]), flat(meta_got["metrics"]))
    rows_ref, rows_got = ([{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                           for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (ref, out))
    assert [r["step"] for r in rows_got] == list(range(2, STEPS + 1, 2))  # no gap, no duplicate across five kills
    logged = max_difference(flat(rows_ref), flat(rows_got))
    print(f"resumed vs uninterrupted, max |difference|: weights {weights:.3g}, optimizer state {optimizer:.3g}, "
          f"RNG/stream/counters {rest:.3g}, final metrics {metrics:.3g}, logged metrics {logged:.3g}")
    # bitwise, as docs/training.md says: every weight, optimizer moment, RNG state, counter and logged number
    differ = {
        "weights": not_bitwise_equal(load_file(str(ref / "clt.safetensors")), load_file(str(out / "clt.safetensors"))),
        "train state": not_bitwise_equal(flat(state_ref), flat(state_got)),
        "final metrics": not_bitwise_equal(flat(meta_ref["metrics"]), flat(meta_got["metrics"])),
        "logged metrics": not_bitwise_equal(flat(rows_ref), flat(rows_got)),
    }
    assert not any(differ.values()), {k: v[:5] for k, v in differ.items() if v}


@pytest.mark.parametrize("cls_copies", [0, 2])
def test_restored_stream_serves_the_same_batches(tiny_backbone, cls_copies):
    """In-process: a stream rebuilt from state_dict() (buffered tokens recomputed from their images)
    hands out exactly the batches the original goes on to hand out, across an epoch boundary."""
    ds = FashionMNIST("train", limit=90)

    def stream() -> ActivationStream:
        return ActivationStream(tiny_backbone, ds, batch_tokens=100, buffer_tokens=400, images_per_batch=16, seed=4,
                                cls_copies=cls_copies)

    a = stream()
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    assert 0 < state["buffer"]["n"] and len(state["buffer"]["groups"]) >= 2
    b = stream()
    b.load_state_dict(state)
    assert torch.equal(a.buf[: a.n], b.buf[: b.n])
    epochs = set()
    for _ in range(20):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        epochs.add(a.epoch)
    assert len(epochs) >= 2  # the comparison crossed an epoch boundary
    fresh = stream()
    fresh.load_state_dict({k: v for k, v in state.items() if k != "buffer"})  # what resuming used to do: refill
    again = stream()
    again.load_state_dict(state)
    assert not torch.equal(fresh.next_batch()[0], again.next_batch()[0])
