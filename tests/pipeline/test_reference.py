"""Reference CLIP: exact preprocessing, the contrastive loss, stage caching, and a smoke build."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bundle import load_bundle
from pipeline.cache import Stage
from pipeline.cli import main
from pipeline.reference import STAGES, budget, build, summarise_seeds
from training.cache import ActivationCache
from pipeline.shipped import ATLAS_FILES, CLIP_FILE, FILES, export_shipped, load_shipped, measure, read_manifest, ship
from training.clip import augment, preprocess_stats, tensorise, unicl_loss
from training.data import FashionMNIST
from training.model.backbone import load_backbone


@pytest.fixture(scope="module")
def ref_backbone():
    return load_backbone("cltvit-ref", None, device="cpu", seed=0)


def test_reference_config_shape(ref_backbone):
    assert ref_backbone.n_layers >= 8
    assert ref_backbone.n_tokens == 17 and ref_backbone.image_size == (28, 28)
    assert ref_backbone.model.vocab_size == 49408
    assert ref_backbone.tokenizer(["a photo of a bag."]).shape == (1, 32)


def test_tensorise_equals_open_clip_preprocess(ref_backbone):
    ds = FashionMNIST("test", limit=6)
    mean, std = preprocess_stats(ref_backbone.preprocess)
    fast = tensorise(ds.images, mean, std)
    slow = torch.stack([ref_backbone.preprocess(ds[i][0]) for i in range(6)])
    assert torch.allclose(fast, slow, atol=1e-6)


def test_augment_flips_and_shifts_within_bounds():
    x = torch.randn(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = augment(x, 0, g)
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 0 < int(flipped.sum()) < 64
    z = augment(x, 1, torch.Generator().manual_seed(1))
    assert z.shape == x.shape
    # every output pixel is an input pixel of the (possibly flipped) image, or zero padding
    vals = set(x.flatten().tolist()) | {0.0}
    assert set(z.flatten().tolist()) <= vals


def test_unicl_loss_reduces_to_clip_with_one_caption_per_class():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.arange(5)
    logits = 10 * img @ txt.T
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert torch.allclose(unicl_loss(img, txt, labels, torch.arange(5), torch.tensor(10.0)), clip, atol=1e-6)
    # aligned embeddings score better than random ones
    assert unicl_loss(txt, txt, labels, torch.arange(5), torch.tensor(10.0)) < clip


def test_stage_record_detects_changed_outputs(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    st = Stage(tmp_path, "x", {"k": 1})
    assert st.cached() is None
    st.finish([f], 1.0, value=3)
    assert st.cached()["value"] == 3
    assert Stage(tmp_path, "x", {"k": 2}).cached() is None  # other inputs
    f.write_bytes(b"abd")
    assert st.cached() is None  # output changed


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    logs: list[str] = []
    summary = build(out, budget("smoke"), device="cpu", log=logs.append)
    return out, summary, logs


def test_smoke_build_produces_every_artifact(smoke):
    out, summary, _ = smoke
    for rel in ("clip/model.pt", "clip/clip.json", "clt/clt.safetensors", "clt/clt.json", "comparison/comparison.json",
                "comparison/r2_vs_l0.png", "eval/report.json", "eval/report.md", "eval/c_proj.json", "eval/c_proj.png",
                "eval/deletion.png", "eval/replacement.png", "eval/fidelity.png", "bundle/bundle.json", "bundle/model.onnx",
                "bundle/text.onnx", "build.json"):
        assert (out / rel).is_file() and (out / rel).stat().st_size > 0, rel
    for s in STAGES:
        rec = json.loads((out / "stages" / f"{s}.json").read_text())
        assert rec["files"] and rec["key"], s
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report) >= {"fidelity", "replacement", "c_proj", "faithfulness", "comparison", "summary", "finetune"}
    assert {r["kind"] for r in report["comparison"]["rows"]} == {"clt", "plt"}
    assert set(summary["targets"]) >= {"zero_shot_top1", "r2_mean", "cosine_mean", "drop_cls", "drop_all_tokens",
                                       "faithfulness_cost_ratio", "clt_beats_plt"}
    assert 0 <= summary["zero_shot_top1"] <= 1
    clip = json.loads((out / "clip" / "clip.json").read_text())
    assert clip["weights_sha256_16"] == load_backbone("cltvit-ref", str(out / "clip" / "model.pt"), device="cpu").fingerprint
    m, paths = load_bundle(out / "bundle")
    assert m.atlas is not None and m.atlas.clt_sha256 == json.loads((out / "clt" / "clt.json").read_text())["sha256"]
    assert json.loads(paths.atlas["index"].read_text())["images"] == 256
    assert m.gate is not None and m.gate.variants["fp32"].images == 64  # the export stage writes the accuracy gate


def test_seeds_stage_measures_every_seed_like_the_evaluation(smoke):
    out, summary, _ = smoke
    seeds = json.loads((out / "seeds" / "seeds.json").read_text())
    assert [r["seed"] for r in seeds["seeds"]] == [0, 1]
    report = json.loads((out / "eval" / "report.json").read_text())["summary"]
    row0 = seeds["seeds"][0]  # seed 0 is the clt stage's CLT, which the eval stage measured by its own path
    assert row0["drop_cls_pt"] == pytest.approx(100 * report["drop_cls"], abs=1e-9)
    assert row0["drop_all_pt"] == pytest.approx(100 * report["drop_all_tokens"], abs=1e-9)
    assert row0["r2_cls"] == pytest.approx(report["r2_cls"], rel=1e-5)
    assert row0["dead_cls"] == pytest.approx(report["dead_fraction_cls"], abs=1e-9)
    a = load_file(str(out / "clt" / "clt.safetensors"))
    b = load_file(str(out / "seeds" / "seed1" / "clt.safetensors"))
    assert not torch.equal(a["W_enc"], b["W_enc"])  # another seed, another CLT
    # seed 1 trained from the build's activation cache (the CLIP's activations over the 512 training images, once)
    cache = ActivationCache(out / "activations")
    assert cache.n_images == 512 and cache.manifest.backbone["weights_sha256_16"] == json.loads((out / "clip" / "clip.json").read_text())["weights_sha256_16"]
    assert json.loads((out / "seeds" / "seed1" / "clt.json").read_text())["data"]["activations"]["key"] == cache.key
    assert "activations" not in json.loads((out / "clt" / "clt.json").read_text())["data"]  # seed 0 (shipped) streams
    assert summary["seeds"]["worst"] == seeds["worst"]
    assert "| worst |" in (out / "seeds" / "seeds.md").read_text()


def test_seed_summary_takes_the_worse_end_of_each_metric():
    rows = [dict(seed=0, drop_cls_pt=0.1, drop_all_pt=0.6, r2_cls=0.98, r2_all=0.99, dead_cls=0.2, l0=15.0),
            dict(seed=1, drop_cls_pt=-0.3, drop_all_pt=0.2, r2_cls=0.96, r2_all=0.985, dead_cls=0.4, l0=16.0)]
    s = summarise_seeds(rows)
    assert s["worst"] == dict(drop_cls_pt=0.1, drop_all_pt=0.6, r2_cls=0.96, r2_all=0.985, dead_cls=0.4, l0=16.0)
    assert s["mean"]["drop_cls_pt"] == pytest.approx(-0.1) and s["mean"]["r2_cls"] == pytest.approx(0.97)
    assert {k: v["met"] for k, v in s["targets"].items()} == dict(
        drop_cls_pt=True, drop_all_pt=False, r2_cls=False, r2_all=True, dead_cls=False)


def test_second_build_reuses_every_stage(smoke):
    out, first, _ = smoke
    logs: list[str] = []
    second = build(out, budget("smoke"), device="cpu", log=logs.append)
    assert [line for line in logs if "cached" in line] == [line for line in logs], logs
    assert len(logs) == len(STAGES)
    assert second["stages"] == first["stages"]


def test_parallel_comparison_worker_gives_the_same_comparison(smoke, tmp_path):
    """jobs=2 trains the CLT-vs-PLT comparison in a spawned process beside the CLT stage: same results."""
    out, _, _ = smoke
    other = tmp_path / "ref2"
    (other / "stages").mkdir(parents=True)
    for rel in ("clip/model.pt", "clip/clip.json", "stages/clip.json"):  # reuse the CLIP, redo the rest
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_bytes((out / rel).read_bytes())
    summary = build(other, budget("smoke"), device="cpu", log=lambda s: None, skip=("eval", "export"), jobs=2)
    assert "comparison" in summary["stages"]
    a = json.loads((out / "comparison" / "comparison.json").read_text())
    b = json.loads((other / "comparison" / "comparison.json").read_text())
    assert a["rows"] == b["rows"]


def test_ship_rounds_a_build_to_float16_and_measures_it(smoke, tmp_path):
    """`cltvit-reference ship` on the smoke build: float16 files that load back to the recorded figures, and a
    bundle exported from them that validates."""
    out, _, _ = smoke
    to = tmp_path / "weights"
    manifest = ship(out, to, limit=64, atlas_limit=128, log=lambda m: None)
    assert set(manifest["files"]) == set(FILES) | set(ATLAS_FILES) and read_manifest(to)["files"] == manifest["files"]
    assert manifest["atlas"]["images"] == 128
    state = load_file(str(to / CLIP_FILE))
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}
    backbone, clt, _ = load_shipped(to)
    assert measure(backbone, clt, limit=64)["accuracy_all"] == manifest["measured"]["float16"]["accuracy_all"]
    bundle = export_shipped(tmp_path / "bundle", to, variants=(), log=lambda m: None, gate_images=0)
    m, paths = load_bundle(bundle)
    assert m.backbone.weights_sha256_16 == backbone.fingerprint
    # the shipped atlas (statistics + image indices) is tied to the float16 CLT and gets its thumbnails back at export
    assert m.atlas is not None and m.atlas.clt_sha256 == m.clt.sha256
    with np.load(paths.atlas["images"]) as z:
        thumbs, refs = z["thumbs"], z["image_ref"]
    train = FashionMNIST("train", limit=128)
    assert thumbs.shape[1:] == (28, 28, 1) and len(thumbs) == len(refs) > 0
    np.testing.assert_array_equal(thumbs[:, :, :, 0], train.images[refs])


def test_cli_rejects_unknown_stage(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["build", "--out", str(tmp_path / "never"), "--force", "nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --force: invalid choice: 'nonsense'" in err and "'clt'" in err, err
    assert not (tmp_path / "never").exists()


def test_finetune_reduces_the_match_loss(tiny_backbone):
    from training.finetune import FinetuneConfig, finetune_clt
    from training.model.clt import CLTConfig, CrossLayerTranscoder
    from training.model.vit import capture

    torch.manual_seed(0)
    pixels = torch.randn(16, 3, *tiny_backbone.image_size)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=tiny_backbone.n_layers, d_model=tiny_backbone.d_model, n_features=64, k=8))
    cap = capture(tiny_backbone.visual, pixels)
    L, B, T, d = cap.mlp_in.shape
    clt.fit_normalisation(cap.mlp_in.reshape(L, -1, d), cap.mlp_out.reshape(L, -1, d))
    before = {k: v.clone() for k, v in tiny_backbone.visual.state_dict().items()}
    cfg = FinetuneConfig(steps=25, batch_images=16, lr=3e-3, loss="cosine", recon_coef=0.0)
    stats = finetune_clt(tiny_backbone.visual, clt, pixels, cfg, log=lambda s: None)
    assert stats["match_last"] < stats["match_first"]
    assert all(torch.equal(v, tiny_backbone.visual.state_dict()[k]) for k, v in before.items())  # backbone frozen
    with pytest.raises(ValueError, match="text_embeddings"):
        finetune_clt(tiny_backbone.visual, clt, pixels, FinetuneConfig(steps=1, loss="kl"))
    with pytest.raises(ValueError, match="finetune loss"):
        FinetuneConfig(loss="mse")  # type: ignore[arg-type]


def test_finetune_cls_aux_marks_the_cls_tokens_and_tracks_silence_there(tiny_backbone, monkeypatch):
    """CLS AuxK in the fine-tuning: every step hands the CLT's loss the rows that are CLS tokens (checked
    against the CLS token's own MLP input, captured separately) and the features silent on the CLS
    tokens for `cls_dead_after` of them; off, the config (and so the build's recipe key) is what it was
    before the option existed. (Whether it keeps features alive at the CLS token is measured on the
    reference model: docs/fidelity.md.)"""
    from training.finetune import FinetuneConfig, finetune_clt
    from training.model.clt import CLTConfig, CrossLayerTranscoder
    from training.model.vit import capture

    torch.manual_seed(0)
    pixels = torch.randn(8, 3, *tiny_backbone.image_size)
    cap = capture(tiny_backbone.visual, pixels)
    L, B, T, d = cap.mlp_in.shape
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=64, k=4))
    clt.fit_normalisation(cap.mlp_in.reshape(L, -1, d), cap.mlp_out.reshape(L, -1, d))
    seen: list[dict] = []
    import training.finetune as finetune_module

    loss = finetune_module.clt_loss

    def spy(model, mlp_in, mlp_out, cfg, **kw):
        assert model is clt
        seen.append({"cls_in": mlp_in[:, kw["cls_rows"]].clone(), "dead": kw["cls_dead"].clone(), "coef": cfg.cls_aux_coef})
        out = loss(model, mlp_in, mlp_out, cfg, **kw)
        seen[-1]["fired_cls"] = out.fired_cls.clone()
        return out

    monkeypatch.setattr(finetune_module, "clt_loss", spy)
    cfg = FinetuneConfig(steps=3, batch_images=B, lr=1e-3, loss="cosine", cls_aux_coef=0.25, cls_dead_after=2 * B)
    finetune_clt(tiny_backbone.visual, clt, pixels, cfg, log=lambda s: None)
    assert len(seen) == 3 and all(s["coef"] == 0.25 for s in seen)
    cls_inputs = cap.mlp_in[:, :, 0]  # [L, B, d]
    for s in seen:  # each step samples B images with replacement: its CLS rows are CLS inputs of those images
        got = s["cls_in"]
        assert got.shape == (L, B, d)
        dist = torch.cdist(got.transpose(0, 1).reshape(B, -1), cls_inputs.transpose(0, 1).reshape(B, -1))
        assert float(dist.min(1).values.max()) < 1e-4
    assert not seen[0]["dead"].any() and not seen[1]["dead"].any()  # B, then 2B CLS tokens: none silent long enough yet
    assert torch.equal(seen[2]["dead"], ~(seen[0]["fired_cls"] | seen[1]["fired_cls"]))
    assert "cls_aux_coef" not in FinetuneConfig().to_dict() and FinetuneConfig(cls_aux_coef=0.5).to_dict()["cls_aux_coef"] == 0.5
    with pytest.raises(ValueError, match="cls_dead_after"):
        FinetuneConfig(cls_dead_after=0)



def test_build_with_the_7x7_reference_model(smoke, tmp_path):
    """`--model cltvit-ref7`: the same build with 4x4-pixel patches; its bundle's maps are 7x7, and its CLIP
    stage has its own cache key (a 4x4 build's CLIP is never reused for it)."""
    from dataclasses import replace

    out4, _, _ = smoke
    out = tmp_path / "ref7"
    build(out, replace(budget("smoke"), model="cltvit-ref7"), device="cpu", log=lambda s: None,
          skip=("seeds", "comparison", "eval", "atlas"))
    clip = json.loads((out / "clip" / "clip.json").read_text())
    assert clip["model"] == "cltvit-ref7" and clip["config"]["vision_cfg"]["patch_size"] == 4
    assert clip["weights_sha256_16"] == load_backbone("cltvit-ref7", str(out / "clip" / "model.pt"), device="cpu").fingerprint
    m, _ = load_bundle(out / "bundle")
    assert m.backbone.model == "cltvit-ref7" and m.spatial is not None and tuple(m.spatial.grid) == (7, 7)
    key = lambda root: json.loads((root / "stages" / "clip.json").read_text())["key"]  # noqa: E731
    assert key(out) != key(out4)
