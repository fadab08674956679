"""The CLT module: activation rules, sparse gradients, normalisation, checkpoints."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from training.model.backbone import BackboneError, load_backbone
from training.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.model.clt import CLTConfig, CrossLayerTranscoder
from training.model.loss import LossConfig, clt_loss
from training.model.sparse import scatter_rows, sparse_decode

L, D, NF = 3, 16, 64


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(L, n, D, generator=g), 0.5 * torch.randn(L, n, D, generator=g)


def _dense_reference_loss(m: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor, aux_k: int, aux_coef: float) -> torch.Tensor:
    """The same loss written densely (full [N, F] codes, dense decoder matmuls, autograd everywhere)."""
    xs, ys = x / m.in_scale[:, None, None], y / m.out_scale[:, None, None]
    zs = [xs[l] @ m.W_enc[l] + m.b_enc[l] for l in range(L)]
    codes = [m.activate(l, zs[l]).dense(NF) for l in range(L)]
    rec = torch.stack(
        [m.b_dec[j] + sum(codes[i] @ m.W_dec[i][j - i] for i in range(j + 1)) for j in range(L)]
    )
    fvu = (rec - ys).pow(2).sum(-1).mean(-1) / (ys - ys.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)
    resid, terms = (ys - rec).detach(), []
    for l in range(L):
        v, i = zs[l].masked_fill(~dead[l], float("-inf")).topk(min(aux_k, int(dead[l].sum())), dim=-1)
        pred = torch.einsum("nk,nkd->nd", F.relu(v), m.W_dec[l][0][i])
        terms.append((pred - resid[l]).pow(2).sum(-1).mean() / (resid[l] - resid[l].mean(0)).pow(2).sum(-1).mean())
    return fvu.sum() + aux_coef * torch.stack(terms).sum()


def test_topk_gives_exactly_k_active_features_per_token():
    clt = CrossLayerTranscoder(CLTConfig(L, D, NF, activation="topk", k=5))
    with torch.no_grad():
        clt.b_enc.fill_(10.0)  # all pre-activations positive: ReLU cannot drop any of the k
    x, _ = _data()
    for mode in (True, False):
        clt.train(mode)
        _, codes = clt(x)
        for c in codes:
            assert c.idx.shape == (x.shape[1], 5)
            assert torch.equal(c.l0(), torch.full((x.shape[1],), 5))
            assert all(len(set(row)) == 5 for row in c.idx.tolist())  # k distinct features
    loss = clt_loss(clt.train(), *_data())
    assert torch.equal(loss.l0, torch.full((L,), 5.0))


def test_batchtopk_keeps_n_times_k_in_training_and_uses_threshold_at_inference():
    clt = CrossLayerTranscoder(CLTConfig(L, D, NF, activation="batchtopk", k=4)).train()
    x, y = _data(n=50)
    loss = clt_loss(clt, x, y)
    assert torch.allclose(loss.l0, torch.full((L,), 4.0))  # N*k active over the batch
    assert (clt.batchtopk_threshold > 0).all()
    clt.eval()
    with torch.no_grad():
        code = clt.encode(0, x[0])
        z = clt.preactivations(0, x[0])
    expect = (z > clt.batchtopk_threshold[0]).sum(-1).clamp_max(clt.cfg.inference_k)
    assert torch.equal(code.l0(), expect)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_backward_matches_dense_autograd(activation):
    torch.manual_seed(0)
    a = CrossLayerTranscoder(CLTConfig(L, D, NF, activation=activation, k=4)).double().train()
    x, y = (t.double() for t in _data())
    a.fit_normalisation(x, y)
    b = copy.deepcopy(a)
    dead = torch.rand(L, NF, generator=torch.Generator().manual_seed(1)) < 0.5
    la = clt_loss(a, x, y, LossConfig(aux_k=8, aux_coef=0.5), dead=dead)
    la.total.backward()
    lb = _dense_reference_loss(b, x, y, dead, aux_k=8, aux_coef=0.5)
    lb.backward()
    torch.testing.assert_close(la.total.detach(), lb.detach())
    assert la.aux > 0
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert q.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-9, msg=name)


def test_sparse_decode_and_scatter_rows_are_transposes():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 10, (7, 3), generator=g)
    val = torch.randn(7, 3, generator=g, dtype=torch.double, requires_grad=True)
    W = torch.randn(10, 5, generator=g, dtype=torch.double, requires_grad=True)
    dense = torch.zeros(7, 10, dtype=torch.double).scatter_add(1, idx, val.detach())
    torch.testing.assert_close(sparse_decode(idx, val, W), dense @ W)
    torch.testing.assert_close(sparse_decode(idx, val, W, gather=True), dense @ W)
    rows = torch.randn(7, 5, generator=g, dtype=torch.double)
    torch.testing.assert_close(scatter_rows(idx, val.detach(), rows, 10), dense.T @ rows)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(idx, v, w), (val, W))


def test_jumprelu_thresholds_receive_gradient():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(L, D, NF, activation="jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.1)).train()
    x, y = _data(n=200)
    clt.fit_normalisation(x, y)
    loss = clt_loss(clt, x, y, LossConfig(sparsity_coef=1e-3))
    loss.total.backward()
    g = clt.log_threshold.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g != 0).float().mean() > 0.5  # most features' thresholds get a learning signal
    assert loss.sparsity > 0


def test_normalisation_makes_clt_invariant_to_activation_scale():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(L, D, NF, k=4)).eval()
    x, y = _data()
    clt.fit_normalisation(x, y)
    recon, codes = clt(x)
    scaled = copy.deepcopy(clt)
    scaled.fit_normalisation(7 * x, 3 * y)  # same data in other units
    recon2, codes2 = scaled(7 * x)
    assert torch.equal(codes[1].idx, codes2[1].idx)
    torch.testing.assert_close(recon2, 3 * recon, rtol=1e-4, atol=1e-5)
    assert torch.allclose(scaled.in_scale, 7 * clt.in_scale)


def test_checkpoint_round_trip_is_bit_exact(tmp_path, tiny_backbone):
    cfg = CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, 96, activation="batchtopk", k=6)
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(torch.randn_like(p))
        clt.in_scale.uniform_(0.5, 2.0)
        clt.batchtopk_threshold.uniform_(0.1, 0.2)
    save_checkpoint(tmp_path, clt, tiny_backbone.identity(), metrics={"fvu_mean": 0.1}, data={"name": "x"})
    back, meta = load_checkpoint(tmp_path, tiny_backbone)
    assert back.cfg == cfg
    a, b = clt.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert meta["metrics"] == {"fvu_mean": 0.1} and meta["backbone"]["model"] == "cltvit-tiny"
    x = torch.randn(tiny_backbone.n_layers, 9, tiny_backbone.d_model)
    assert torch.equal(clt.eval()(x)[0], back(x)[0])


def test_mismatched_backbone_is_refused(tmp_path, tiny_backbone):
    clt = CrossLayerTranscoder(CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, 32, k=4))
    save_checkpoint(tmp_path, clt, tiny_backbone.identity())
    other = load_backbone("cltvit-tiny", None, device="cpu", seed=1)  # same architecture, other weights
    with pytest.raises(BackboneError) as err:
        load_checkpoint(tmp_path, other)
    msg = str(err.value)
    assert tiny_backbone.fingerprint in msg and other.fingerprint in msg and "weights_sha256_16" in msg


def test_corrupt_checkpoint_is_refused(tmp_path, tiny_backbone):
    clt = CrossLayerTranscoder(CLTConfig(tiny_backbone.n_layers, tiny_backbone.d_model, 32, k=4))
    save_checkpoint(tmp_path, clt, tiny_backbone.identity())
    meta = json.loads((tmp_path / "clt.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "clt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path, tiny_backbone)


def test_config_rejects_k_above_features():
    with pytest.raises(ValueError, match="k=9 exceeds n_features=8"):
        CLTConfig(2, 4, 8, k=9)


def test_decode_paths_agree_and_legacy_decoder_layout_loads():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(L, D, NF, k=4)).eval()
    x, _ = _data()
    codes = [clt.encode(l, x[l]) for l in range(L)]
    plain = [clt.decode_source(i, c) for i, c in enumerate(codes)]
    clt.export_gather = True
    gathered = [clt.decode_source(i, c) for i, c in enumerate(codes)]
    for a, b in zip(plain, gathered):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert plain[0].shape == (x.shape[1], L, D)
    # a state dict in the earlier source-major layout [F, n_i, d] is converted on load
    legacy = {k: (v.transpose(0, 1).contiguous() if k.startswith("W_dec.") else v) for k, v in clt.state_dict().items()}
    assert legacy["W_dec.0"].shape == (NF, L, D)
    back = CrossLayerTranscoder(clt.cfg)
    back.load_state_dict(legacy)
    assert all(torch.equal(a, b) for a, b in zip(clt.state_dict().values(), back.state_dict().values()))


def test_sparsifier_threshold_forms_select_the_same_features():
    """The threshold spellings a feature-sharded CLT uses (`TopK.select_above`, `BatchTopK.select` with its
    `kth_value`) choose what a plain per-token / per-batch top-k over all features chooses."""
    from training.model.sparsifiers import BatchTopK, TopK

    z = torch.randn(30, NF, generator=torch.Generator().manual_seed(3))
    top = TopK(5)
    a, b = top.select(z), top.select_above(z)
    assert b.keep is not None and bool(b.keep.all()) and torch.equal(a.idx, b.idx)
    state = torch.zeros(())
    sel = BatchTopK(4, 16).select(z, state)
    chosen = torch.zeros(30 * NF, dtype=torch.bool)
    chosen[F.relu(z).reshape(-1).topk(30 * 4).indices] = True
    got = torch.zeros(30, NF, dtype=torch.bool)
    got[torch.arange(30)[:, None].expand_as(sel.idx)[sel.keep], sel.idx[sel.keep]] = True
    assert torch.equal(got.reshape(-1), chosen)
    assert float(state) == float(F.relu(z).reshape(-1).topk(30 * 4).values[-1])  # first batch: the smallest kept


def test_dense_rules_select_their_training_codes():
    """JumpReLU's and ReLU's `select` choose exactly the features their training codes activate (a hand
    rule: z above exp(log_threshold), resp. above 0)."""
    from training.model.sparsifiers import JumpReLU, ReLU

    z = torch.randn(30, NF, generator=torch.Generator().manual_seed(4))
    log_thr = torch.full((NF,), -0.5)
    for rule, state, mask in ((JumpReLU(cap=NF, bandwidth=0.1), log_thr, z > log_thr.exp()), (ReLU(cap=NF), None, z > 0)):
        sel = rule.select(z, state)
        assert torch.equal(sel.code(z).dense(NF), torch.where(mask, z, 0.0))
        assert torch.equal(sel.code(z).dense(NF), rule.code(z, state, training=True).dense(NF))
