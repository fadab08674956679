"""The feature atlas (export/atlas.py): its statistics against an independent computation on open_clip's own
modules, its direct effects against the fused ONNX graph's feature contributions, the streaming top lists
against a one-shot computation, and resume after kill -9 against an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle import load_bundle
from bundle.atlas import hist_edges
from bundle.killpoints import kill_at
from export.atlas import REF_ARRAYS, AtlasConfig, AtlasError, DatasetSource, build_atlas, images_from_refs
from export.cli import atlas_main
from export.testing import SMALL_VOCAB, make_tiny_bundle
from export.vocab import VocabError, build_vocab, wordnet_words
from serving.runtime import BundleRuntime
from training.data import FashionMNIST
from training.model.backbone import load_backbone
from training.model.checkpoint import load_checkpoint, save_checkpoint
from training.model.vit import CltSplice, forward
from training.testing import random_clt

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 160


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("cltvit-tiny", None, device="cpu", seed=0)


def _bundle(tmp: Path, mode: str) -> tuple[Path, Path]:
    return make_tiny_bundle(tmp / "bundle", mode=mode, checkpoint_dir=tmp / "clt"), tmp / "clt"


def _vocab(tmp: Path) -> Path:
    p = tmp / "vocab.txt"
    p.write_text("\n".join(SMALL_VOCAB) + "\n")
    return p


def _atlas(backbone, bundle: Path, clt_dir: Path, tmp: Path, *, limit: int = N_IMAGES, out: Path | None = None,
           cfg: AtlasConfig | None = None) -> dict:
    clt, meta = load_checkpoint(clt_dir, backbone)
    source = DatasetSource(FashionMNIST("train", limit=N_IMAGES), backbone.preprocess)
    return build_atlas(backbone, clt, bundle, source, clt_sha256=meta["sha256"], limit=limit, vocab_file=_vocab(tmp),
                       cfg=cfg or AtlasConfig(top_n=6, batch_size=48), out_dir=out, work_dir=tmp / "work", progress=False,
                       log=lambda _: None)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def observe_atlas(backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observe")
    bundle, clt_dir = _bundle(tmp, "observe")
    _atlas(backbone, bundle, clt_dir, tmp)
    return bundle, clt_dir


def _open_clip_cls_activations(backbone, clt, pixels: torch.Tensor) -> np.ndarray:
    """[N, L, F] CLT activations at the CLS token of the *unmodified* model, from forward hooks on open_clip's own
    ln_2 modules (not the project's ViT code)."""
    grabbed: dict[int, torch.Tensor] = {}
    hooks = [blk.ln_2.register_forward_hook(lambda m, i, o, l=l: grabbed.__setitem__(l, o))
             for l, blk in enumerate(backbone.visual.transformer.resblocks)]
    try:
        with torch.no_grad():
            backbone.visual(pixels)
            out = []
            for l in range(clt.cfg.n_layers):
                h = grabbed[l]
                cls = h[:, 0] if h.shape[0] == len(pixels) else h[0]  # batch-first or sequence-first blocks
                out.append(clt.encode(l, cls).dense(clt.cfg.n_features))
    finally:
        for hk in hooks:
            hk.remove()
    return torch.stack(out, 1).numpy()


def test_statistics_match_open_clips_own_forward(backbone, observe_atlas):
    """Observe mode runs the model unchanged, so every statistic can be recomputed from open_clip's own modules."""
    bundle, clt_dir = observe_atlas
    m, paths = load_bundle(bundle)
    assert m.atlas is not None and m.atlas.clt_sha256 == m.clt.sha256
    a, im = _arrays(paths.atlas["features"]), _arrays(paths.atlas["images"])
    index = json.loads(paths.atlas["index"].read_text())
    clt, _ = load_checkpoint(clt_dir, backbone)
    ds = FashionMNIST("train", limit=N_IMAGES)
    pixels = torch.stack([backbone.preprocess(ds[i][0]) for i in range(N_IMAGES)])
    acts = _open_clip_cls_activations(backbone, clt, pixels)  # [N, L, F]
    fired = acts > 0
    assert index["images"] == N_IMAGES
    np.testing.assert_array_equal(a["fire_count"], fired.sum(0))
    assert a["fire_count"].sum() > 0 and (a["fire_count"] == 0).any()  # some features fire, some never: both paths tested
    np.testing.assert_allclose(a["act_max"], acts.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["act_mean"], np.where(fired.any(0), acts.sum(0) / np.maximum(fired.sum(0), 1), 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(a["hist"].sum(-1), a["fire_count"])
    # top lists: the largest activations in descending order, pointing at the right dataset images
    N = a["top_act"].shape[-1]
    want = -np.sort(-acts, axis=0)[:N].transpose(1, 2, 0)  # [L, F, N]
    np.testing.assert_allclose(a["top_act"], np.where(want > 0, want, 0), rtol=1e-5, atol=1e-6)
    L, F = a["fire_count"].shape
    for l in range(L):
        for f in range(F):
            for r, v in zip(a["top_image"][l, f], a["top_act"][l, f]):
                if r >= 0:
                    ref = im["image_ref"][r]
                    assert abs(acts[ref, l, f] - v) <= 1e-5 * max(1, abs(v))
                    assert im["image_class"][r] == ds.labels[ref]
    # quantiles off the log histogram: within one bin of numpy's
    edges = hist_edges()
    ratio = edges[1] / edges[0]
    l, f = np.unravel_index(np.argmax(a["fire_count"]), a["fire_count"].shape)
    vals = acts[:, l, f][acts[:, l, f] > 0]
    for q, got in zip(index["quantile_levels"], a["quantiles"][l, f]):
        exact = np.quantile(vals, q)
        assert exact / ratio <= got <= exact * ratio, (q, got, exact)


def test_thumbnails_are_what_the_model_saw(backbone, observe_atlas):
    bundle, _ = observe_atlas
    _, paths = load_bundle(bundle)
    im = _arrays(paths.atlas["images"])
    rt = BundleRuntime(bundle, device="cpu", threads=1)
    ds = FashionMNIST("train", limit=N_IMAGES)
    assert im["thumbs"].shape[1:] == (32, 32, 1)  # grayscale data: one channel, at the model's 32x32 input
    for row in (0, len(im["thumbs"]) - 1):
        seen = rt.resize_crop(ds[int(im["image_ref"][row])][0])  # the serving side's own preprocessing
        assert np.abs(seen[..., 0].astype(int) - im["thumbs"][row][..., 0].astype(int)).max() <= 1
    assert im["examples"].shape[1:] == (32, 32, 3) and len(im["examples"]) == 20  # 2 per class


def test_images_rebuilt_from_their_indices_are_the_streamed_ones(backbone, observe_atlas):
    """An atlas can ship without its pictures (pipeline/shipped.py): rebuilt from the dataset indices they are identical."""
    bundle, _ = observe_atlas
    m, paths = load_bundle(bundle)
    streamed = _arrays(paths.atlas["images"])
    source = DatasetSource(FashionMNIST("train", limit=N_IMAGES), backbone.preprocess)
    rebuilt = images_from_refs(source, {k: streamed[k] for k in REF_ARRAYS}, thumb_max=AtlasConfig.thumb_max,
                               mean=m.preprocess.mean, std=m.preprocess.std)
    assert rebuilt.keys() == streamed.keys()
    for k in streamed:
        np.testing.assert_array_equal(rebuilt[k], streamed[k], err_msg=k)


def test_direct_effect_is_the_graphs_feature_contribution(backbone, tmp_path):
    """Over one image, `direction` . t_c is exactly the contribution the fused graph reports for that feature."""
    bundle, clt_dir = _bundle(tmp_path, "cls")
    _atlas(backbone, bundle, clt_dir, tmp_path, limit=1)
    _, paths = load_bundle(bundle)
    a = _arrays(paths.atlas["features"])
    rt = BundleRuntime(bundle, device="cpu", threads=1)
    image = FashionMNIST("train", limit=1)[0][0]
    raw = rt.run(rt.preprocess(image)[None])
    pred = int(raw.logits[0].argmax())
    t = rt.default_text[pred]
    checked = 0
    for l, i, act, c in zip(raw.top_feature_layer[0], raw.top_feature_index[0], raw.top_feature_activation[0], raw.top_feature_contribution[0]):
        if act > 0:
            assert a["fire_count"][l, i] == 1
            np.testing.assert_allclose(a["direction"][l, i] @ t, c, rtol=2e-4, atol=1e-6)
            checked += 1
    assert checked >= 4
    effects = a["direction"] @ rt.default_text.T
    np.testing.assert_allclose(a["strength"], effects.max(-1) - effects.mean(-1), rtol=1e-5, atol=1e-7)


def test_patch_tops_match_a_one_shot_computation(backbone, tmp_path):
    """`all` mode keeps each feature's top patches; the streaming merge (3 uneven batches) equals a computation
    over all images at once."""
    bundle, clt_dir = _bundle(tmp_path, "all")
    _atlas(backbone, bundle, clt_dir, tmp_path, limit=120)
    _, paths = load_bundle(bundle)
    a, im = _arrays(paths.atlas["features"]), _arrays(paths.atlas["images"])
    clt, _ = load_checkpoint(clt_dir, backbone)
    ds = FashionMNIST("train", limit=120)
    pixels = torch.stack([backbone.preprocess(ds[i][0]) for i in range(120)])
    splice = CltSplice(clt, tokens="all")
    with torch.no_grad():
        forward(backbone.visual, pixels, splice)
    T = backbone.n_tokens
    L, F, N = a["ptop_act"].shape
    for l in range(L):
        dense = splice.codes[l].dense(F).reshape(120, T, F)[:, 1:].numpy()  # [B, P, F] patch tokens
        np.testing.assert_array_equal(a["patch_fire_count"][l], (dense > 0).sum((0, 1)))
        best = dense.max(1)  # [B, F]
        want = -np.sort(-best, axis=0)[:N].T
        np.testing.assert_allclose(a["ptop_act"][l], np.where(want > 0, want, 0), rtol=1e-5, atol=1e-6)
        for f in range(0, F, 7):
            for r, v, tok in zip(a["ptop_image"][l, f], a["ptop_act"][l, f], a["ptop_token"][l, f]):
                if r >= 0:
                    img = im["image_ref"][r]
                    assert abs(dense[img, tok - 1, f] - v) <= 1e-5 * max(1, v)
                    assert tok - 1 == int(np.argmax(dense[img, :, f]))


ATLAS_CLI = "import sys; from export.cli import atlas_main; sys.exit(atlas_main())"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["atlas.checkpoint_written@3", "atlas.state_tmp_written@3"])
def test_kill_9_and_rerun_gives_the_uninterrupted_atlas(tmp_path, point):
    """SIGKILL a real cltvit-atlas right after its 3rd checkpoint (or between writing the 3rd checkpoint and
    renaming it into place), rerun the same command, compare with an uninterrupted run: bit-identical.

    The process runs armed with a kill point (bundle.killpoints): it reports on a pipe and waits to be
    killed; a process that dies earlier closes the pipe, so the test fails at once with its log."""
    bundle, clt_dir = _bundle(tmp_path, "cls")
    args = ["--bundle", str(bundle), "--clt", str(clt_dir), "--limit", "96", "--batch-size", "16", "--checkpoint-every", "16",
            "--top-n", "6", "--vocab", str(_vocab(tmp_path)), "--no-progress"]
    killed = [*args, "--work", str(tmp_path / "work-killed"), "--out", str(tmp_path / "resumed")]
    cmd = [sys.executable, "-c", ATLAS_CLI, *killed]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    kill_at(cmd, point, tmp_path / "killed.log", env=env, cwd=ROOT)
    with np.load(tmp_path / "work-killed" / "state.npz") as z:
        assert int(z["n_done"]) == (48 if point.startswith("atlas.checkpoint") else 32)  # the last checkpoint renamed into place
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"resuming after {48 if point.startswith('atlas.checkpoint') else 32} of 96 images" in done.stdout + done.stderr
    assert atlas_main([*args, "--work", str(tmp_path / "work-clean"), "--out", str(tmp_path / "clean")]) == 0
    for name in ("features.npz", "images.npz"):
        got, want = _arrays(tmp_path / "resumed" / "atlas" / name), _arrays(tmp_path / "clean" / "atlas" / name)
        assert got.keys() == want.keys()
        for k in want:  # same batches in the same order: bit-identical, so no image was lost or counted twice
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert json.loads((tmp_path / "resumed" / "atlas" / "atlas.json").read_text())["images"] == 96


def test_a_resume_with_other_arguments_is_refused(backbone, tmp_path):
    bundle, clt_dir = _bundle(tmp_path, "cls")
    clt, meta = load_checkpoint(clt_dir, backbone)
    src = DatasetSource(FashionMNIST("train", limit=64), backbone.preprocess)

    class Boom(DatasetSource):
        def batch(self, start, stop):
            if start >= 32:
                raise KeyboardInterrupt
            return super().batch(start, stop)

    with pytest.raises(KeyboardInterrupt):
        build_atlas(backbone, clt, bundle, Boom(src.dataset, backbone.preprocess), clt_sha256=meta["sha256"], vocab_file=_vocab(tmp_path),
                    cfg=AtlasConfig(batch_size=16, checkpoint_every=16), work_dir=tmp_path / "w", progress=False, log=lambda _: None)
    with pytest.raises(AtlasError, match="argument --work: .* other arguments .*batch_size"):
        build_atlas(backbone, clt, bundle, src, clt_sha256=meta["sha256"], vocab_file=tmp_path / "vocab.txt",
                    cfg=AtlasConfig(batch_size=32), work_dir=tmp_path / "w", progress=False, log=lambda _: None)
    build_atlas(backbone, clt, bundle, src, clt_sha256=meta["sha256"], vocab_file=tmp_path / "vocab.txt", cfg=AtlasConfig(batch_size=32),
                work_dir=tmp_path / "w", overwrite=True, progress=False, log=lambda _: None)
    assert load_bundle(bundle)[0].atlas is not None
    assert not (tmp_path / "w").exists()  # the work folder goes once the atlas is in the bundle


def test_cli_errors_name_the_argument(backbone, tmp_path, capsys):
    bundle, clt_dir = _bundle(tmp_path, "cls")
    save_checkpoint(tmp_path / "other-clt", random_clt(backbone.n_layers, backbone.d_model, 128, 8, seed=5), backbone.identity())
    base = ["--bundle", str(bundle), "--limit", "8", "--no-progress", "--work", str(tmp_path / "w")]
    assert atlas_main([*base, "--clt", str(tmp_path / "other-clt")]) == 2
    assert "argument --clt" in capsys.readouterr().err  # another CLT than the bundle's
    assert atlas_main([*base, "--clt", str(clt_dir), "--vocab", str(tmp_path / "missing.txt")]) == 2
    assert "argument --vocab" in capsys.readouterr().err
    plain = make_tiny_bundle(tmp_path / "plain")  # exported without a checkpoint: nothing to tie an atlas to
    assert atlas_main(["--bundle", str(plain), "--clt", str(clt_dir), "--limit", "8", "--no-progress"]) == 2
    assert "no CLT checkpoint sha256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        atlas_main([*base, "--clt", str(clt_dir), "--limit", "0"])
    assert atlas_main([*base, "--clt", str(clt_dir), "--vocab", str(_vocab(tmp_path))]) == 0
    assert load_bundle(bundle)[0].atlas is not None


def test_vocabulary(tmp_path):
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "cntlist.rev").write_text("shoe%1:06:00:: 1 9\nshoe%2:35:00:: 1 4\nboot%1:06:00:: 1 3\nred%5:00:00:chromatic:00 1 7\n"
                                    "run%2:38:00:: 1 40\nx-ray%1:10:00:: 1 8\nheel%1:06:00:: 1 2\ng%1:23:00:: 1 30\n")
    assert wordnet_words(3, wn) == ["shoe", "red", "boot"]  # nouns and adjectives, single alphabetic words of 3+ letters, by count
    with pytest.raises(VocabError, match="wordnet-base"):
        wordnet_words(3, tmp_path / "none")
    words, source = build_vocab(["Sneaker", "bag"], _vocab(tmp_path))
    assert words[:2] == ["Sneaker", "bag"] and len(words) == 2 + len(SMALL_VOCAB) and "file vocab.txt" in source
    (tmp_path / "dup.txt").write_text("# comment\nBag\nsneaker\nsandal\n\n")
    assert build_vocab(["Sneaker", "bag"], tmp_path / "dup.txt")[0] == ["Sneaker", "bag", "sandal"]
