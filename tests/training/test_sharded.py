"""The feature-sharded CLT (training/model/sharded.py) under a real `torchrun` (2 ranks, gloo, 1 thread each)
computes what one unsharded `CrossLayerTranscoder` computes: the same forward output, loss terms and
gradients (within 1e-5) and exactly the same active features, for TopK, BatchTopK (with AuxK) and
JumpReLU; with exact ties at the k-th value it selects the lowest feature index (TopK) or the lowest
token-major position (BatchTopK), checked against a stable sort of the full pre-activations.

A 12-step `cltvit-train --shard-features` run on 2 ranks saves one ordinary clt.safetensors (read by
`load_checkpoint`) equal to the same run in one process, and its mid-run checkpoint resumes, sharded
and unsharded, to the same end. 4 ranks as 2 data-parallel replicas x 2 feature shards train the CLT one
process trains on the same two data shards.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sharded_worker as worker
from training.cli import main as cli_main
from training.model.checkpoint import load_checkpoint
from training.model.loss import clt_loss

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = WORLD, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --nproc-per-node nproc ARGS` (gloo, one thread per rank); fail with its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case's per-rank results from one torchrun of the worker."""
    out = tmp_path_factory.mktemp("sharded")
    torchrun([str(Path(worker.__file__)), str(out), *worker.CASES])
    return {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(WORLD)] for name in worker.CASES}


def reference(name: str) -> dict:
    """What the unsharded CLT computes on the case, in the worker's order (loss + backward, train forward, eval forward)."""
    full, x, y, dead = worker.case(name)
    loss = clt_loss(full, x.clone(), y.clone(), worker.LOSS, dead=dead)
    loss.total.backward()
    ref = {"loss": loss, "grads": {n: p.grad for n, p in full.named_parameters() if p.grad is not None},
           "batchtopk_threshold": full.batchtopk_threshold.clone(), "clt": full, "x": x}
    for mode in ("train", "eval"):
        full.train(mode == "train")
        with torch.no_grad():
            recon, codes = full(x)
        ref[mode] = {"recon": recon, "active": [worker.active_pairs(c) for c in codes]}
    return ref


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal within 1e-5, relative to the largest entry of the reference (gradients span many scales)."""
    atol = 1e-5 * max(float(b.abs().max()), 1e-3) if b.numel() else 1e-5
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first one runs the worker (one torchrun: tens of seconds on a loaded machine)
@pytest.mark.parametrize("name", ["topk", "batchtopk", "jumprelu"])
def test_two_shards_compute_what_the_unsharded_clt_computes(sharded_results, name):
    ref = reference(name)
    ranks = sharded_results[name]
    for r, got in enumerate(ranks):
        assert got["world"] == WORLD
        for term in ("total", "fvu", "aux", "sparsity", "l0"):
            close(got["loss"][term], getattr(ref["loss"], term).detach(), f"rank {r} loss.{term}")
        assert torch.equal(got["loss"]["fired"], ref["loss"].fired), f"rank {r}: fired features differ"
        close(got["batchtopk_threshold"], ref["batchtopk_threshold"], f"rank {r} batchtopk_threshold")
        for mode in ("train", "eval"):
            close(got[mode]["recon"], ref[mode]["recon"], f"rank {r} {mode} forward")
            assert got[mode]["active"] == ref[mode]["active"], f"rank {r} {mode}: other features selected"
        assert set(got["grads"]) == set(ref["grads"])
    # each rank's gradients are its own feature slice of the full gradients (b_dec: replicated)
    for pname, g in ref["grads"].items():
        dim = worker.ShardedCLT.shard_dim(pname)
        parts = [got["grads"][pname] for got in ranks]
        glued = parts[0] if dim is None else torch.cat(parts, dim)
        close(glued, g, f"grad {pname}")
        if dim is None:
            assert torch.equal(parts[0], parts[1]), f"replicated {pname}'s gradient differs between ranks"
    if name != "jumprelu":
        assert ref["loss"].aux > 0  # AuxK took part
    # two clipped AdamW steps (decoders stepped inside backward, or all after it) end at the same weights
    for update in ("in_backward", "after"):
        full, *_ = worker.case(name)
        worker.optimise(full, name, update)
        for pname, t in full.state_dict().items():
            dim = worker.ShardedCLT.shard_dim(pname)
            parts = [got[f"stepped_{update}"][pname] for got in ranks]
            close(parts[0] if dim is None else torch.cat(parts, dim), t, f"{update}: {pname} after two steps")
    assert 0 < sum(map(len, ref["train"]["active"])) < worker.L * worker.N * worker.FEATURES


def stable_top(v: torch.Tensor, k: int) -> torch.Tensor:
    """[R, M] -> [R, M] bool: the k largest of each row, ties to the lower position (a stable sort)."""
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(v, dtype=torch.bool).scatter_(1, order, True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["topk-ties", "batchtopk-ties"])
def test_ties_at_the_kth_value_go_to_the_lower_position(sharded_results, name):
    full, x, _, _ = worker.case(name)
    K, N, Fn = worker.K, worker.N, worker.FEATURES
    expected = []
    with torch.no_grad():
        for layer in range(worker.L):
            z = full.preactivations(layer, x[layer])  # integers: exact
            if name.startswith("topk"):
                kth = z.topk(K, dim=1).values[:, -1:]
                # the test means something only if ties at the k-th value outnumber the free slots
                assert bool(((z == kth).sum(1) > K - (z > kth).sum(1)).any())
                sel = stable_top(z, K) & (z > 0)
            else:
                flat = torch.relu(z).reshape(1, -1)
                kth = flat.topk(N * K, dim=1).values[:, -1]
                assert int((flat == kth).sum()) > N * K - int((flat > kth).sum()) and kth > 0
                sel = (stable_top(flat, N * K) & (flat > 0)).reshape(N, Fn)
            expected.append(sorted(map(tuple, sel.nonzero().tolist())))
    for r, got in enumerate(sharded_results[name]):
        assert got["train"]["active"] == expected, f"rank {r}: ties broken otherwise than by position"


# ---------------------------------------------------------------------- a sharded training run
TRAIN_ARGS = ["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--limit", "200", "--features", "64", "--k", "4",
              "--steps", "12", "--batch-tokens", "128", "--buffer-tokens", "1024", "--images-per-batch", "32",
              "--checkpoint-every", "6", "--log-every", "2", "--lr", "3e-3", "--warmup-steps", "3",
              "--dead-after-tokens", "512", "--threads", "1", "--seed", "0", "--no-progress"]


def rewind(run: Path, to: Path, step: int) -> None:
    """Copy run directory `run` to `to` as it was right after checkpoint `step` (later checkpoints and the final CLT gone)."""
    shutil.copytree(run, to)
    for p in (to / "checkpoints").glob("step-*"):
        if int(p.name[5:]) > step:
            shutil.rmtree(p)
    (to / "checkpoints" / "LATEST").write_text(f"step-{step:08d}")
    for name in ("clt.safetensors", "clt.json"):
        (to / name).unlink()


@pytest.mark.slow
@pytest.mark.timeout(900)  # two torchrun trainings and two in-process ones: ~100 s on the loaded 2-core machine
def test_sharded_run_saves_an_ordinary_clt_equal_to_the_unsharded_run_and_resumes(tmp_path):
    # batchtopk: a replicated buffer (its threshold), codes of varying width, AuxK once features die
    args = [*TRAIN_ARGS, "--activation", "batchtopk"]
    sharded = tmp_path / "sharded"
    torchrun(["--no-python", str(Path(sys.executable).parent / "cltvit-train"), *args, "--shard-features", "--out", str(sharded)])
    assert cli_main([*args, "--out", str(tmp_path / "single")]) == 0  # the same run in this process, unsharded
    got, meta = load_checkpoint(sharded)  # the ordinary loader: one clt.safetensors of the full model
    want, _ = load_checkpoint(tmp_path / "single")
    assert got.cfg.n_features == 64 and meta["metrics"]["steps"] == 12
    for name, t in want.state_dict().items():
        close(got.state_dict()[name], t, f"trained {name}")
    assert not torch.equal(got.W_enc, load_checkpoint(sharded / "checkpoints" / "step-00000006")[0].W_enc)  # it trained
    a = [json.loads(line)["loss"] for line in (sharded / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 6 and a == pytest.approx(b, rel=1e-5)
    # the sharded run's step-6 checkpoint resumes, on 2 ranks and in one process, and ends where the run ended
    rewind(sharded, tmp_path / "resumed", 6)
    torchrun(["--no-python", str(Path(sys.executable).parent / "cltvit-train"), *args, "--shard-features",
              "--out", str(tmp_path / "resumed")])
    rewind(sharded, tmp_path / "resumed-single", 6)
    assert cli_main([*args, "--out", str(tmp_path / "resumed-single")]) == 0
    for run in ("resumed", "resumed-single"):
        again, _ = load_checkpoint(tmp_path / run)
        for name, t in got.state_dict().items():
            close(again.state_dict()[name], t, f"{run} {name}")


@pytest.mark.parametrize("env, extra, message", [
    ({}, [], "argument --shard-features: run with --nproc N or under torchrun"),
    ({"WORLD_SIZE": "3", "RANK": "0"}, [], "argument --features: 64 features cannot be split evenly over 3 shards"),
    ({"WORLD_SIZE": "4", "RANK": "0"}, ["--shard-features", "3"], "argument --shard-features: 4 ranks cannot be split into groups of 3"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["--cls-aux-coef", "0.5"], "argument --cls-aux-coef: CLS AuxK is not supported"),
    ({"WORLD_SIZE": "4", "RANK": "0"}, ["--shard-features", "2", "--data-shards", "3"],
     "argument --data-shards: 3 is not a multiple of the 2 data-parallel replicas (4 ranks / 2 feature shards)"),
])
def test_shard_features_refuses_what_it_cannot_run_naming_the_argument(tmp_path, monkeypatch, capsys, env, extra, message):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        cli_main([*TRAIN_ARGS, "--shard-features", *extra, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # four ranks on a loaded 2-core machine: about a minute; the reference in this process
def test_feature_shards_combine_with_data_parallel(tmp_path):
    # 4 ranks = 2 data-parallel replicas x 2 feature shards; the reference: one process, unsharded, streaming the
    # same 2 data shards (--data-shards 2: the global batches of a 2-replica run, with no communication at all)
    args = [*TRAIN_ARGS, "--activation", "batchtopk", "--steps", "8", "--checkpoint-every", "4"]
    torchrun(["-m", "training.cli", *args, "--shard-features", "2", "--out", str(tmp_path / "mesh")], nproc=4)
    assert cli_main([*args, "--data-shards", "2", "--out", str(tmp_path / "single")]) == 0
    got, meta = load_checkpoint(tmp_path / "mesh")
    want, _ = load_checkpoint(tmp_path / "single")
    assert meta["metrics"]["tokens"] == 8 * 2 * 128  # both replicas' batches
    for name, t in want.state_dict().items():
        close(got.state_dict()[name], t, f"2x2 mesh {name}")
    a = [json.loads(line)["loss"] for line in (tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-5)
