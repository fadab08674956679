"""Data-parallel CLT training on real torchrun processes (2 ranks, gloo, one intra-op thread each).

- A 2-rank run (`cltvit-train --nproc 2`, which starts torchrun) and a 1-rank run over the same global
  batches (`--data-shards 2`: one process streams both shards) end with the same weights after 20
  steps, within 1e-5 relative: the reference is a run that never communicates.
- One rank SIGKILLed mid-run (a kill point armed for that rank only: torchrun starts the workers, so
  they kill themselves), torchrun relaunched: the run resumes from the newest complete checkpoint and
  ends bit-identical to an uninterrupted 2-rank run (weights, optimizer, every rank's stream and RNG).
- Resuming with another world size is refused with a message naming both.

The torchrun tests are `slow`; the two in-process checks (one process streaming two shards resumes bit
for bit; the decoder steps taken inside backward reduce in a fixed order) are fast.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bundle.killpoints import ENV_FD, ENV_POINT, ENV_RANK
from torch.utils.data import Dataset

from training.cli import main as cli_main
from training.model.clt import CLTConfig, CrossLayerTranscoder
from training.trainer import LATEST, STATE_FILE, Batch, Checkpointer, TrainConfig, make_optimizer, shard_of, train_clt, train_step

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 20, 5
TIMEOUT_S = 600



class RandomPixels(Dataset):
    def __init__(self, n: int, size: tuple[int, int]) -> None:
        self.x = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], 0


def test_one_process_with_two_shards_streams_disjoint_images_and_resumes_bit_for_bit(tiny_backbone, tmp_path):
    ds = RandomPixels(30, tiny_backbone.image_size)
    a, b = (set(shard_of(ds, s, 2).indices) for s in range(2))  # type: ignore[attr-defined]
    assert not a & b and a | b == set(range(30))
    clt_cfg = CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, 32, activation="batchtopk", k=4)
    cfg = TrainConfig(steps=6, batch_tokens=48, buffer_tokens=192, images_per_batch=5, lr=3e-3, warmup_steps=1,
                      norm_tokens=128, checkpoint_every=3, log_every=1, dead_after_tokens=96, eval_batches=1, data_shards=2)
    clt, final = train_clt(tiny_backbone, ds, clt_cfg, cfg, tmp_path, progress=False)
    want = {k: v.clone() for k, v in clt.state_dict().items()}
    assert final["tokens"] == 6 * 2 * 48
    state = torch.load(tmp_path / "checkpoints" / "step-00000006" / STATE_FILE, weights_only=False)
    assert state["world_size"] == 1 and len(state["streams"]) == 2 and len(state["rng"]) == 1
    rows = _metrics(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    again, _ = train_clt(tiny_backbone, ds, clt_cfg, cfg, tmp_path, progress=False)  # resumes at step 3
    assert all(torch.equal(want[k], v) for k, v in again.state_dict().items())
    assert _metrics(tmp_path) == rows and [r["step"] for r in rows] == list(range(1, 7))


def _metrics(out: Path) -> list[dict]:
    """metrics.jsonl rows without the wall-clock speed."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_decoder_steps_in_backward_reduce_in_a_fixed_order():
    """With a gradient reduction (data parallel), W_dec[L-1] .. W_dec[0] are reduced in that order, and a step
    over two copies of a batch (two shards, the reduction an identity) equals the plain step on it."""
    torch.manual_seed(0)
    base = CrossLayerTranscoder(CLTConfig(3, 16, 48, k=4)).train()
    x, y = torch.randn(3, 64, 16), torch.randn(3, 64, 16)
    base.fit_normalisation(x, y)
    dead = torch.zeros(3, 48, dtype=torch.bool)
    params, order = {}, []
    for reduce in (None, lambda g: order.append(g.shape[0])):
        clt = CrossLayerTranscoder(base.cfg)
        clt.load_state_dict(base.state_dict())
        cfg = TrainConfig(steps=2, lr=1e-2)
        opt = make_optimizer(clt, cfg, reduce)
        for _ in range(2):
            copies = 2 if reduce else 1
            train_step(clt, opt, [Batch(x.clone(), y.clone()) for _ in range(copies)], dead, cfg, n_shards=copies)
        opt.close()
        params[reduce is None] = {k: v.detach().clone() for k, v in clt.named_parameters()}
    assert order == [1, 2, 3] * 2  # W_dec[2] (1 target), W_dec[1] (2), W_dec[0] (3), each step
    for k, v in params[True].items():
        torch.testing.assert_close(params[False][k], v, msg=k)


def args(out: Path, *extra: str) -> list[str]:
    # 120 images (60 per shard) of 17 tokens, groups of 8: the shards cross an epoch boundary; AuxK active
    return ["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--limit", "120", "--features", "48", "--k", "4",
            "--steps", str(STEPS), "--batch-tokens", "64", "--buffer-tokens", "256", "--images-per-batch", "8",
            "--checkpoint-every", str(EVERY), "--log-every", "1", "--lr", "3e-3", "--warmup-steps", "2",
            "--dead-after-tokens", "256", "--threads", "1", "--seed", "0", "--no-progress", "--out", str(out), *extra]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_POINT, ENV_FD, ENV_RANK, "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def cltvit_train(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "cltvit-train")
    with log.open("ab") as f:
        return subprocess.Popen([exe, *argv], cwd=ROOT, env=environment(**env), stdout=f, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen, log: Path, expect: int = 0) -> None:
    proc.wait(timeout=TIMEOUT_S)
    assert proc.returncode == expect if expect == 0 else proc.returncode != 0, log.read_text()[-4000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "clt.safetensors"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """A finished 2-rank run (started through `cltvit-train --nproc 2`)."""
    tmp = tmp_path_factory.mktemp("dp")
    out, log = tmp / "two", tmp / "two.log"
    finished(cltvit_train(args(out, "--nproc", "2"), log), log)
    return out


@pytest.mark.slow
def test_two_ranks_equal_one_rank_over_the_same_global_batches(two_rank_run, tmp_path):
    out, log = tmp_path / "one", tmp_path / "one.log"
    finished(cltvit_train(args(out, "--data-shards", "2"), log), log)
    a, b = weights(two_rank_run), weights(out)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        scale = float(b[k].abs().max()) or 1.0
        assert float((a[k] - b[k]).abs().max()) <= 1e-5 * scale, k
        moved += int(k.startswith(("W_enc", "W_dec")))
    assert moved >= 2
    rows = [[json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (two_rank_run, out)]
    assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1)) == [r["step"] for r in rows[1]]
    for r2, r1 in zip(*rows):
        assert r2["tokens"] == r1["tokens"] == r2["step"] * 2 * 64  # 64 tokens from each of the two shards per step
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    meta = json.loads((two_rank_run / "clt.json").read_text())
    assert meta["data"]["data_shards"] == 2 and meta["data"]["images"] == 120
    state = torch.load(Checkpointer(two_rank_run, 2).latest() / STATE_FILE, weights_only=False)
    assert state["world_size"] == 2 and len(state["streams"]) == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_another_world_size_is_refused_naming_both(two_rank_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(args(two_rank_run, "--steps", str(STEPS)))  # one process on the 2-rank run's directory
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "world size 2" in err and "world size 1" in err, err


@pytest.mark.slow
def test_a_rank_killed_mid_run_resumes_and_ends_as_an_uninterrupted_run(two_rank_run, tmp_path):
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    # 1. rank 1 SIGKILLs itself after step 8 (3 steps past the step-5 checkpoint); torchrun stops rank 0
    finished(cltvit_train(args(out, "--nproc", "2"), log, **{ENV_POINT: "train.step@8", ENV_RANK: "1"}), log, expect=1)
    assert (out / "checkpoints" / LATEST).read_text() == f"step-{EVERY:08d}"
    # 2. rank 0 SIGKILLed while writing the step-15 checkpoint (state written, not yet renamed)
    finished(cltvit_train(args(out, "--nproc", "2"), log, **{ENV_POINT: "checkpoint.state_written@2", ENV_RANK: "0"}), log,
             expect=1)
    assert Checkpointer(out, 2).latest().name == f"step-{2 * EVERY:08d}"
    # 3. relaunched without a kill point: runs to the end
    finished(cltvit_train(args(out, "--nproc", "2"), log), log)
    assert log.read_text().count("resuming from") == 2
    a, b = weights(two_rank_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa, sb = (torch.load(Checkpointer(o, 2).latest() / STATE_FILE, weights_only=False) for o in (two_rank_run, out))
    assert sa["step"] == sb["step"] == STEPS
    for s in range(2):
        assert torch.equal(sa["streams"][s]["buffer"]["src"], sb["streams"][s]["buffer"]["src"])
        assert torch.equal(sa["streams"][s]["rng"], sb["streams"][s]["rng"])
    for r in range(2):
        assert torch.equal(sa["rng"][r]["torch"], sb["rng"][r]["torch"])
    assert torch.equal(sa["since_fired"], sb["since_fired"])
    assert _metrics(two_rank_run) == _metrics(out)
