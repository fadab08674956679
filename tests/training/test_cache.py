"""The activation cache (training/cache.py): training from it equals training from the ViT stream on the
same tokens, a corrupted or truncated shard is refused naming it, a kill while writing resumes without
gaps or duplicates (a real `cltvit-activations` SIGKILLed at kill points; slow).

Rounding: the cache holds float16 values. The stream is run with `buffer_dtype="float16"`, so it rounds
its float32 captures to float16 exactly as the cache writer does (round to nearest even). That keeps
the reference the real stream code path (its image order, groups, buffer, CLS copies) rather than a
stream fed from the cache's own files, and the comparison can be exact: the ViT forward on CPU is
row-independent (an image's activations have the same bits whatever batch it is in, which
`test_capture_is_batch_independent` checks, since the equality rests on it), so both paths feed the
trainer identical float16 values and every weight must come out bit-identical.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Subset

from bundle.killpoints import ENV_FD, ENV_POINT, kill_at
from training import cli
from training.activations import ActivationStream, _Preprocessed
from training.cache import MANIFEST, ActivationCache, CacheError, CachedActivationStream, write_cache
from training.data import FashionMNIST
from training.model.backbone import load_backbone
from training.model.clt import CLTConfig
from training.model.vit import capture
from training.trainer import TrainConfig, TrainingError, train_clt

ROOT = Path(__file__).resolve().parents[2]
IMAGES, SHARD_IMAGES = 120, 48  # three shards, the last one partial (24 images)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("cltvit-tiny", None, device="cpu", seed=0)


@pytest.fixture(scope="module")
def images():
    return FashionMNIST("train", limit=IMAGES)


@pytest.fixture(scope="module")
def cache_dir(backbone, images, tmp_path_factory) -> Path:
    """A complete cache of cltvit-tiny over 120 Fashion-MNIST images, all tokens (read-only)."""
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_cache(backbone, images, out, tokens="all", shard_images=SHARD_IMAGES, batch_images=20, progress=False, log=lambda m: None)
    return out


def train_cfg(**kw) -> TrainConfig:
    # 60 images x (17 + 2 CLS copies) tokens, 128 per step: 10 steps cross an epoch boundary; AuxK and CLS AuxK
    # active (features dead after 256 tokens / 16 CLS rows), so the CLS-row marks and dead counters matter too
    base = dict(steps=10, batch_tokens=128, lr=3e-3, warmup_steps=2, buffer_tokens=512, images_per_batch=16, norm_tokens=256,
                checkpoint_every=5, log_every=1, dead_after_tokens=256, eval_batches=1, cls_copies=2, cls_aux_coef=0.1,
                cls_dead_after=16, buffer_dtype="float16", seed=3)
    return TrainConfig(**{**base, **kw})


def test_capture_is_batch_independent(backbone, images):
    """What the bit-exact comparison below rests on: an image's captured activations do not depend on
    which other images share its ViT batch (so the cache's dataset-order batches and the stream's
    shuffled groups give the same values)."""
    px = torch.stack([_Preprocessed(images, backbone.preprocess)[i] for i in range(40)])
    whole = capture(backbone.visual, px, "all")
    perm = torch.tensor([17, 3, 39, 0, 22, 8])
    part = capture(backbone.visual, px[perm], "all")
    assert torch.equal(part.mlp_in, whole.mlp_in[:, perm]) and torch.equal(part.mlp_out, whole.mlp_out[:, perm])


def test_cache_holds_the_captured_tokens(backbone, images, cache_dir):
    """Rows of the cache are the ViT's own capture (open_clip's blocks through training.model.vit), rounded to float16."""
    cache = ActivationCache(cache_dir)
    m = cache.manifest
    assert (m.images, m.tokens_per_image, len(m.shards)) == (IMAGES, 17, 3) and [s.images for s in m.shards] == [48, 48, 24]
    idx = [119, 0, 47, 48, 95, 96]  # both sides of each shard boundary, out of order
    px = torch.stack([_Preprocessed(images, backbone.preprocess)[i] for i in idx])
    cap = capture(backbone.visual, px, "all")
    rows = cache.rows(idx)  # [B, T, 2, L, d]
    assert torch.equal(rows[:, :, 0].permute(2, 0, 1, 3), cap.mlp_in.half())
    assert torch.equal(rows[:, :, 1].permute(2, 0, 1, 3), cap.mlp_out.half())
    assert torch.equal(cache.rows(idx, "cls"), rows[:, :1]) and torch.equal(cache.rows(idx, "patches"), rows[:, 1:])


def test_training_from_cache_equals_training_from_stream(backbone, images, cache_dir, tmp_path):
    """The first 60 images (the cache's `limit`) against a stream over the same 60."""
    images, cache = Subset(images, range(60)), lambda: ActivationCache(cache_dir, limit=60)
    clt_cfg = CLTConfig(n_layers=backbone.n_layers, d_model=backbone.d_model, n_features=48, k=4)
    cfg = train_cfg()
    # the batches themselves: same tokens in the same order, CLS marks included
    kw = dict(tokens="all", batch_tokens=128, buffer_tokens=512, images_per_batch=16, seed=3, cls_copies=2)
    stream = ActivationStream(backbone, images, dtype=torch.float16, **kw)
    cached = CachedActivationStream(backbone, cache(), dtype=torch.float16, **kw)
    stream32 = ActivationStream(backbone, images, dtype=torch.float32, **kw)
    differs32 = False
    for _ in range(10):  # past an epoch boundary (60 images x 19 rows = 1140 tokens = 8.9 batches)
        a, b, c = stream.next_batch(), cached.next_batch(), stream32.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(stream.last_cls, cached.last_cls)
        differs32 |= not torch.equal(a[1], c[1])
    assert differs32, "the float32 stream should differ from the float16 one: the comparison would not see rounding"
    other_seed = CachedActivationStream(backbone, cache(), dtype=torch.float16, **{**kw, "seed": 4})
    assert not torch.equal(other_seed.next_batch()[0], CachedActivationStream(backbone, cache(), dtype=torch.float16, **kw).next_batch()[0])

    clt_s, m_s = train_clt(backbone, images, clt_cfg, cfg, tmp_path / "stream", progress=False)
    clt_c, m_c = train_clt(backbone, None, clt_cfg, cfg, tmp_path / "cache", progress=False,
                           activations=cache())
    ws, wc = load_file(tmp_path / "stream" / "clt.safetensors"), load_file(tmp_path / "cache" / "clt.safetensors")
    assert ws.keys() == wc.keys()
    for name in ws:
        assert torch.equal(ws[name], wc[name]), name
    assert m_s["fvu"] == m_c["fvu"] and m_s["tokens"] == m_c["tokens"]

    def losses(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["aux"], r["cls_aux"], r["dead_fraction"]) for r in rows]

    assert losses(tmp_path / "stream") == losses(tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "clt.json").read_text())
    assert meta["data"]["activations"]["key"] == cache().key and meta["data"]["size"] == 60
    # a stream run cannot be resumed from the cache, nor the other way round
    with pytest.raises(TrainingError, match="trained from the ViT stream"):
        train_clt(backbone, None, clt_cfg, cfg, tmp_path / "stream", progress=False,
                  activations=cache())
    with pytest.raises(TrainingError, match="activation cache"):
        train_clt(backbone, images, clt_cfg, cfg, tmp_path / "cache", progress=False)


def test_data_shards_from_cache_equal_data_shards_from_stream(backbone, images, cache_dir, tmp_path):
    """Two data shards in one process (the batches of a 2-rank data-parallel run): shard s reads the cached
    images s, s + 2, ... as it would stream them, so the weights are the float16 stream's."""
    images, cfg = Subset(images, range(60)), train_cfg(steps=4, data_shards=2, checkpoint_every=4)
    clt_cfg = CLTConfig(n_layers=backbone.n_layers, d_model=backbone.d_model, n_features=32, k=4)
    train_clt(backbone, images, clt_cfg, cfg, tmp_path / "stream", progress=False)
    train_clt(backbone, None, clt_cfg, cfg, tmp_path / "cache", progress=False, activations=ActivationCache(cache_dir, limit=60))
    ws, wc = load_file(tmp_path / "stream" / "clt.safetensors"), load_file(tmp_path / "cache" / "clt.safetensors")
    assert all(torch.equal(ws[k], wc[k]) for k in ws)


def corrupt(src: Path, dst: Path, shard: str, how: str) -> Path:
    shutil.copytree(src, dst)
    path = dst / shard
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) - 128]))
    return dst


def test_corrupted_shard_is_refused_naming_it(cache_dir, tmp_path, capsys):
    bad = corrupt(cache_dir, tmp_path / "flipped", "shard-00001.npy", "flip")
    with pytest.raises(CacheError, match=r"shard shard-00001\.npy fails its sha256 check"):
        ActivationCache(bad)
    short = corrupt(cache_dir, tmp_path / "short", "shard-00002.npy", "truncate")
    with pytest.raises(CacheError, match=r"shard shard-00002\.npy has \d+ bytes"):
        ActivationCache(short)
    # the CLI: one error line naming the argument and the shard, exit status 2, nothing trained
    with pytest.raises(SystemExit) as exc:
        cli.main(["--activations", str(bad), "--steps", "2", "--features", "16", "--k", "2", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --activations" in err and "shard-00001.npy" in err
    assert not (tmp_path / "run").exists()


def test_other_settings_in_the_same_directory_are_refused(backbone, images, cache_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(cache_dir, out)
    with pytest.raises(CacheError, match="tokens, tokens_per_image differ"):
        write_cache(backbone, images, out, tokens="cls", shard_images=SHARD_IMAGES, progress=False, log=lambda m: None)
    cls_only = tmp_path / "cls"
    write_cache(backbone, Subset(images, range(8)), cls_only, tokens="cls", progress=False, log=lambda m: None)
    with pytest.raises(CacheError, match="holds the 'cls' tokens; training asks for 'all'"):
        CachedActivationStream(backbone, ActivationCache(cls_only), tokens="all")


# ---------------------------------------------------------------------- kill while writing (real processes)
def run_writer(out: Path, log: Path, point: str | None = None) -> None:
    """`cltvit-activations` over the same images as `cache_dir`; with `point`, SIGKILLed when it reaches it."""
    cmd = [sys.executable, "-c", "import sys; from training.cli import activations_main; sys.exit(activations_main())",
           "--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--limit", str(IMAGES), "--shard-images", str(SHARD_IMAGES),
           "--batch-images", "20", "--threads", "1", "--no-progress", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in (ENV_POINT, ENV_FD)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    if point is None:
        with log.open("ab") as f:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=240)
        assert done.returncode == 0, log.read_text()
    else:
        kill_at(cmd, point, log, env=env, cwd=ROOT)


@pytest.mark.slow
def test_killed_writer_resumes_without_gaps_or_duplicates(cache_dir, tmp_path):
    out, log = tmp_path / "acts", tmp_path / "log.txt"
    # 1. killed mid-shard: after the 2nd batch of shard 1 is in its temporary file (shard 0 listed)
    run_writer(out, log, "activations.batch@5")
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000.npy"]
    assert (out / "shard-00001.npy.tmp").is_file() and not (out / "shard-00001.npy").exists()
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(out)
    # 2. killed after shard 2 is renamed into place but before the manifest lists it
    run_writer(out, log, "activations.renamed@2")
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000.npy", "shard-00001.npy"]
    assert (out / "shard-00002.npy").is_file()
    # 3. the same command to the end
    run_writer(out, log)
    resumed = ActivationCache(out).manifest
    reference = ActivationCache(cache_dir).manifest
    assert [s.first_image for s in resumed.shards] == [0, 48, 96]  # no gap, no duplicate
    assert [(s.name, s.rows, s.sha256) for s in resumed.shards] == [(s.name, s.rows, s.sha256) for s in reference.shards]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    for s in resumed.shards:  # byte for byte the uninterrupted cache (written in this process, other batches)
        assert np.array_equal(np.load(out / s.name), np.load(cache_dir / s.name))
