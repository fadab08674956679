"""Training pipeline: activation stream, a short real training run, CLI errors (kill-and-resume: test_resume.py)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from training.activations import ActivationStream
from training.cli import main as cli_main
from training.data import FashionMNIST
from training.model import vit
from training.model.checkpoint import load_checkpoint
from training.model.clt import CLTConfig, CrossLayerTranscoder
from training.model.loss import LossConfig, clt_loss
from training.trainer import TrainConfig, TrainingError, train_clt


class RandomPixels(Dataset):
    """Preprocessed-looking random images [3, H, W] (the stream passes tensors through unchanged)."""

    def __init__(self, n: int, size: tuple[int, int], seed: int = 0) -> None:
        self.x = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], 0


@pytest.mark.parametrize("tokens", ["all", "cls", "patches"])
def test_stream_serves_distinct_paired_tokens_shuffled_across_images(tiny_backbone, tokens):
    ds = RandomPixels(24, tiny_backbone.image_size)
    per_image = {"all": tiny_backbone.n_tokens, "cls": 1, "patches": tiny_backbone.n_tokens - 1}[tokens]
    total = len(ds) * per_image
    batch = per_image * 2 if tokens != "cls" else 4
    stream = ActivationStream(tiny_backbone, ds, tokens=tokens, batch_tokens=batch, buffer_tokens=total, images_per_batch=len(ds), seed=3)
    x, y = stream.next_batch()
    L, d = tiny_backbone.n_layers, tiny_backbone.d_model
    assert x.shape == y.shape == (L, batch, d) and x.dtype == torch.float32
    ref = vit.capture(tiny_backbone.visual, ds.x, tokens)  # [L, B, T', d]
    ref_in = ref.mlp_in.permute(1, 2, 0, 3).reshape(total, L * d)
    ref_out = ref.mlp_out.permute(1, 2, 0, 3).reshape(total, L * d)
    served, outs = [x], [y]
    # the first fill holds the whole first epoch; the buffer is refilled only below half, so the
    # first half of the epoch is served from it without repetition
    while sum(t.shape[1] for t in served) + batch <= total // 2:
        a, b = stream.next_batch()
        served.append(a)
        outs.append(b)
    got_in = torch.cat(served, 1).permute(1, 0, 2).reshape(-1, L * d)
    got_out = torch.cat(outs, 1).permute(1, 0, 2).reshape(-1, L * d)
    match = torch.cdist(got_in, ref_in).argmin(1)
    torch.testing.assert_close(got_in, ref_in[match])
    torch.testing.assert_close(got_out, ref_out[match])  # inputs and outputs stay paired
    assert match.unique().numel() == got_in.shape[0] >= total // 2 - batch  # no token served twice
    first_images = (match[:batch] // per_image).unique().numel()
    assert first_images >= min(len(ds), batch) // 2  # a batch mixes tokens of many images


def test_cls_copies_put_each_cls_token_in_the_buffer_1_plus_c_times(tiny_backbone):
    ds = RandomPixels(6, tiny_backbone.image_size)
    T, c = tiny_backbone.n_tokens, 3
    stream = ActivationStream(tiny_backbone, ds, tokens="all", batch_tokens=4, buffer_tokens=len(ds) * (T + c),
                              images_per_batch=len(ds), seed=1, cls_copies=c)
    stream.fill()
    assert stream.n == len(ds) * (T + c)
    L, d = tiny_backbone.n_layers, tiny_backbone.d_model
    ref = vit.capture(tiny_backbone.visual, ds.x, "all")  # [L, B, T, d]
    ref_in = ref.mlp_in.permute(1, 2, 0, 3).reshape(len(ds) * T, L * d)  # row i*T + t: image i, token t
    ref_out = ref.mlp_out.permute(1, 2, 0, 3).reshape(len(ds) * T, L * d)
    got_in, got_out = (stream.buf[: stream.n, j].reshape(stream.n, L * d) for j in (0, 1))
    match = torch.cdist(got_in, ref_in).argmin(1)
    torch.testing.assert_close(got_in, ref_in[match])
    torch.testing.assert_close(got_out, ref_out[match])
    counts = torch.bincount(match, minlength=len(ds) * T).reshape(len(ds), T)
    assert counts[:, 0].tolist() == [1 + c] * len(ds)  # each CLS token 1 + c times
    assert bool((counts[:, 1:] == 1).all())  # each patch token once
    with pytest.raises(ValueError, match="cls_copies"):
        ActivationStream(tiny_backbone, ds, tokens="patches", cls_copies=1)
    with pytest.raises(ValueError, match="cls_copies"):
        TrainConfig(steps=1, tokens="cls", cls_copies=2)


def test_batches_mark_their_cls_rows(tiny_backbone):
    """`last_cls` marks exactly the rows that are an image's CLS token (or one of its copies), found by value
    against open_clip's own forward (the CLS row of each image's layer-0 MLP input)."""
    ds = RandomPixels(8, tiny_backbone.image_size)
    T, c = tiny_backbone.n_tokens, 2
    stream = ActivationStream(tiny_backbone, ds, tokens="all", batch_tokens=40, buffer_tokens=160, images_per_batch=4, seed=2,
                              cls_copies=c)
    mlp_in = []
    hook = tiny_backbone.visual.transformer.resblocks[0].ln_2.register_forward_hook(lambda m, i, o: mlp_in.append(o.detach()))
    with torch.no_grad():
        tiny_backbone.visual(ds.x)
    hook.remove()
    cls_in = mlp_in[0][:, 0]  # [B, d]: open_clip's blocks are batch-first
    seen = 0
    for _ in range(6):
        x, _ = stream.next_batch()
        is_cls = torch.cdist(x[0], cls_in, compute_mode="donot_use_mm_for_euclid_dist").min(1).values < 1e-3
        assert torch.equal(stream.last_cls, is_cls)
        seen += int(is_cls.sum())
    assert 0 < seen < 6 * 40  # both kinds drawn (expected share (1 + c) / (T + c))
    for tokens, want in (("cls", True), ("patches", False)):
        other = ActivationStream(tiny_backbone, ds, tokens=tokens, batch_tokens=8, buffer_tokens=32, images_per_batch=4)
        other.next_batch()
        assert other.last_cls.tolist() == [want] * 8


def test_cls_aux_is_the_auxk_loss_on_cls_rows_over_features_silent_there():
    """CLS AuxK by hand: on the marked rows only, the top-k pre-activations among the features marked dead
    reconstruct the residual through their own-layer decoder rows (ReLU forward); its gradient reaches the
    encoder columns of exactly those features, negative pre-activations included (straight-through ReLU)."""
    torch.manual_seed(0)
    L, d, Fn, N, k = 2, 8, 32, 24, 3
    clt = CrossLayerTranscoder(CLTConfig(L, d, Fn, k=4)).train()
    x, y = torch.randn(L, N, d), torch.randn(L, N, d)
    clt.fit_normalisation(x, y)
    rows = torch.zeros(N, dtype=torch.bool)
    rows[::4] = True
    dead = torch.zeros(L, Fn, dtype=torch.bool)
    dead[0, :10] = True  # layer 1 has none: no term
    with torch.no_grad():
        clt.b_enc[0, :10] = -5.0  # every dead feature's pre-activation is negative: only the straight-through path passes
        base = clt_loss(clt, x, y)
    got = clt_loss(clt, x, y, LossConfig(cls_aux_k=k, cls_aux_coef=0.5), cls_rows=rows, cls_dead=dead)
    with torch.no_grad():
        xs, ys = x / clt.in_scale[:, None, None], y / clt.out_scale[:, None, None]
        recon = clt.decode_all([clt.encode(l, x[l]) for l in range(L)])  # normalised, decoder bias included
        resid = (ys[0] - recon[0])[rows]
        z = xs[0][rows] @ clt.W_enc[0][:, :10] + clt.b_enc[0, :10]
        top = z.topk(k, dim=-1)
        pred = (top.values.clamp_min(0)[..., None] * clt.W_dec[0][0][:10][top.indices]).sum(1)
        want = (pred - resid).pow(2).sum(-1).mean() / (resid - resid.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(got.cls_aux, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.total, base.total + 0.5 * want, rtol=1e-5, atol=1e-6)
    clt.zero_grad()
    got.total.backward()
    g_with = clt.W_enc.grad.clone()
    clt.zero_grad()
    clt_loss(clt, x, y).total.backward()
    changed = (g_with - clt.W_enc.grad).abs().sum(1) > 0  # [L, F]
    chosen = torch.zeros(L, Fn, dtype=torch.bool)
    chosen[0, top.indices.unique()] = True  # the dead features in some CLS row's top k (all with negative pre-activations)
    assert bool((z < 0).all()) and torch.equal(changed, chosen) and bool((chosen <= dead).all())
    assert clt_loss(clt, x, y, LossConfig(cls_aux_coef=0.5), cls_rows=torch.zeros(N, dtype=torch.bool), cls_dead=dead).cls_aux is None
    codes = [clt.encode(l, x[l]) for l in range(L)]
    for l in range(L):
        want_fired = torch.zeros(Fn, dtype=torch.bool)
        want_fired[codes[l].idx[rows][codes[l].val[rows] != 0]] = True
        assert torch.equal(got.fired_cls[l], want_fired)


def test_short_training_run_brings_fvu_below_0_2(tmp_path, tiny_backbone):
    ds = FashionMNIST("train", limit=1000)
    clt_cfg = CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, n_features=256, k=8)
    cfg = TrainConfig(steps=120, batch_tokens=512, lr=3e-3, warmup_steps=5, buffer_tokens=4096, images_per_batch=64,
                      log_every=5, checkpoint_every=60)
    clt, metrics = train_clt(tiny_backbone, ds, clt_cfg, cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 121, 5))
    for key in ("fvu", "fvu_mean", "l0", "dead_fraction", "lr"):
        assert key in rows[0]
    assert len(rows[0]["fvu"]) == tiny_backbone.n_layers
    assert rows[0]["fvu_mean"] > 0.8  # starts near (or above) 1
    assert metrics["fvu_mean"] < 0.2, metrics
    assert metrics["l0_mean"] <= 8
    back, meta = load_checkpoint(tmp_path, tiny_backbone)
    assert meta["metrics"]["fvu_mean"] == metrics["fvu_mean"]
    assert meta["data"]["name"] == "fashion-mnist" and meta["data"]["tokens"] == "all"
    assert all(torch.equal(a, b) for a, b in zip(clt.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize(
    "args, names",
    [
        (["--model", "ViT-Nope", "--dataset", "fashion-mnist", "--steps", "5"], "--model"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--steps", "-3"], "--steps"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--steps", "5", "--features", "8", "--k", "9"], "--k"),
        (["--model", "cltvit-tiny", "--dataset", "folder", "--steps", "5"], "--data-dir"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm", "--steps", "5"], "--data-dir"),
        (["--model", "cltvit-tiny", "--dataset", "imagenet", "--steps", "5"], "--dataset"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--steps", "5", "--lr", "zero"], "--lr"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--steps", "5", "--tokens", "cls", "--cls-copies", "2"], "--cls-copies"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--steps", "5", "--tokens", "patches", "--cls-aux-coef", "0.1"],
         "--cls-aux-coef"),
        (["--model", "cltvit-tiny", "--dataset", "fashion-mnist", "--steps", "5", "--cls-aux-k", "0"], "--cls-aux-k"),
    ],
)
def test_bad_cli_argument_gives_one_line_error_and_status_2(tmp_path, capsys, args, names):
    with pytest.raises(SystemExit) as exc:
        cli_main([*args, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cltvit-train: error: ") and names in err, err
    assert "Traceback" not in err


def test_decoder_update_in_backward_matches_a_plain_adamw_step():
    from training.model.clt import CrossLayerTranscoder
    from training.trainer import Batch, DecoderInBackwardAdamW, make_optimizer, train_step

    torch.manual_seed(0)
    base = CrossLayerTranscoder(CLTConfig(3, 16, 48, k=4)).train()
    x, y = torch.randn(3, 64, 16), torch.randn(3, 64, 16)
    base.fit_normalisation(x, y)
    dead = torch.zeros(3, 48, dtype=torch.bool)
    params = {}
    for mode in ("in_backward", "after"):
        clt = CrossLayerTranscoder(base.cfg)
        clt.load_state_dict(base.state_dict())
        cfg = TrainConfig(steps=3, lr=1e-2, grad_clip=1e6, decoder_update=mode)
        opt = make_optimizer(clt, cfg)
        for _ in range(3):
            train_step(clt, opt, [Batch(x.clone(), y.clone())], dead, cfg)  # the step normalises its batch in place
        if isinstance(opt, DecoderInBackwardAdamW):
            assert all(p.grad is None for p in clt.W_dec)  # freed right after their in-backward step
            opt.close()
            clt_loss(clt, x, y).total.backward()
            assert all(p.grad is not None for p in clt.W_dec)  # hooks removed: gradients stay
        params[mode] = {k: v.detach().clone() for k, v in clt.named_parameters()}
    moved = 0
    for k, v in params["after"].items():
        torch.testing.assert_close(params["in_backward"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, base.state_dict()[k]))
    assert moved >= 4


@pytest.mark.parametrize("activation, cross_layer", [("batchtopk", True), ("topk", False), ("jumprelu", True)])
def test_training_runs_with_dead_features_for_every_activation(tmp_path, tiny_backbone, activation, cross_layer):
    ds = RandomPixels(64, tiny_backbone.image_size)
    clt_cfg = CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, n_features=96, k=4, activation=activation, cross_layer=cross_layer)
    cfg = TrainConfig(steps=12, batch_tokens=128, lr=2e-3, warmup_steps=2, buffer_tokens=512, images_per_batch=16,
                      log_every=4, checkpoint_every=12, dead_after_tokens=128, eval_batches=1)
    _, metrics = train_clt(tiny_backbone, ds, clt_cfg, cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["fvu"])).all() for r in rows)
    assert rows[-1]["fvu_mean"] < rows[0]["fvu_mean"]
    if activation != "jumprelu":  # AuxK runs once features count as dead
        assert max(r["dead_fraction"] for r in rows) > 0 and max(r["aux"] for r in rows) > 0
    assert metrics["steps"] == 12


def test_cli_help_lists_the_main_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--pretrained", "--dataset", "--data-dir", "--features", "--k", "--activation", "--steps",
                 "--out", "--tokens", "--lr", "--batch-tokens", "--device", "--seed", "--no-cross-layer"):
        assert flag in text, flag


def test_resuming_a_run_with_other_training_settings_is_refused(tmp_path, tiny_backbone):
    ds = RandomPixels(32, tiny_backbone.image_size)
    clt_cfg = CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, n_features=32, k=4)
    base = dict(steps=4, batch_tokens=64, warmup_steps=1, buffer_tokens=256, images_per_batch=8, norm_tokens=64,
                checkpoint_every=2, log_every=2, eval_batches=1)
    train_clt(tiny_backbone, ds, clt_cfg, TrainConfig(**base, lr=1e-3), tmp_path, progress=False)
    with pytest.raises(TrainingError, match=r"other training settings \(cls_copies, lr differ\)"):
        train_clt(tiny_backbone, ds, clt_cfg, TrainConfig(**base, lr=2e-3, cls_copies=1), tmp_path, progress=False)
    # bookkeeping settings may change on resume
    train_clt(tiny_backbone, ds, clt_cfg, TrainConfig(**{**base, "log_every": 1}, lr=1e-3), tmp_path, progress=False)
