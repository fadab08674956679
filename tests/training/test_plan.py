"""The memory plan (`cltvit-train --plan`, training/plan.py): parameter counts against instantiated models
(a CrossLayerTranscoder and open_clip's own vision towers, counted by torch), the memory arithmetic
against a hand computation, and the issue's own figures for ViT-L/14 and ViT-H/14."""
from __future__ import annotations

import pytest

from training import cli
from training.model.backbone import load_backbone
from training.model.clt import CLTConfig, CrossLayerTranscoder
from training.plan import PlanError, VitShape, clt_parameter_counts, plan_memory


@pytest.mark.parametrize("cross, activation", [(True, "topk"), (False, "topk"), (True, "jumprelu")])
def test_clt_parameter_count_matches_an_instantiated_clt(cross, activation):
    clt = CrossLayerTranscoder(CLTConfig(n_layers=5, d_model=12, n_features=40, k=3, activation=activation, cross_layer=cross))
    counts = clt_parameter_counts(5, 12, 40, cross_layer=cross)
    assert sum(counts.values()) == sum(p.numel() for p in clt.parameters())
    shape = VitShape("toy", layers=5, width=12, heads=1, mlp_width=48, patch_size=4, image_size=8, embed_dim=6)
    plan = plan_memory(shape, 40, 3, 64, activation=activation, cross_layer=cross, stream=False)
    assert plan.clt_parameters == plan.parameters_per_rank == sum(p.numel() for p in clt.parameters())
    assert plan.trainable_per_rank == sum(p.numel() for p in clt.parameters() if p.requires_grad)
    assert plan.bytes["parameters"] == sum(t.numel() * t.element_size() for t in [*clt.parameters(), *clt.buffers()])


@pytest.mark.parametrize("model", ["cltvit-tiny", "cltvit-ref"])
def test_vit_parameter_count_matches_open_clip(model):
    visual = load_backbone(model, None, device="cpu").visual
    shape = VitShape.from_open_clip(model)
    assert shape.parameters() == sum(p.numel() for p in visual.parameters())
    assert (shape.layers, shape.width, shape.tokens) == (len(visual.transformer.resblocks), visual.transformer.width,
                                                         visual.grid_size[0] * visual.grid_size[1] + 1)
    plan = plan_memory(model, 64, 4, 256, stream=False)
    real = CrossLayerTranscoder(CLTConfig(n_layers=shape.layers, d_model=shape.width, n_features=64, k=4))
    assert plan.clt_parameters == sum(p.numel() for p in real.parameters())


def test_memory_arithmetic_matches_a_hand_computation():
    # L = 2 layers, d = 4, T = (4 / 2)^2 + 1 = 5 tokens, F = 8, k = 2, 6 tokens per step on each of 2 ranks
    shape = VitShape("toy", layers=2, width=4, heads=1, mlp_width=16, patch_size=2, image_size=4, embed_dim=3)
    common = dict(world_size=2, aux=False, buffer_tokens=10, images_per_batch=2, stream=False)
    # parameters: W_enc 2*4*8 = 64, b_enc 16, log_threshold 16, W_dec (2 + 1 blocks) * 8 * 4 = 96, b_dec 8 -> 200
    dp = plan_memory(shape, 8, 2, 6, **common)
    assert (dp.clt_parameters, dp.parameters_per_rank, dp.trainable_per_rank, dp.tokens_per_rank) == (200, 200, 184, 6)
    assert dp.bytes == {
        "parameters": 4 * 200 + 4 * 6,  # + 3 buffers of L = 2 scalars
        "gradients": 4 * (184 - 96 + 2 * 8 * 4),  # the decoder's gradients one tensor at a time: W_dec[0] [2, 8, 4]
        "adam": 2 * 4 * 184,
        # x, y, reconstruction, residual, gradient (5 x L x N x d) + one layer's pre-activations (N x F), fp32;
        # 20 bytes per selected (token, feature) of every layer (L x N x k)
        "activations": 4 * (5 * 2 * 6 * 4 + 6 * 8) + 20 * 2 * 6 * 2,
        # rows: the buffer (at least two batches: 12 > 10) + one refill group of 2 images; 2 slots x L x d fp32 each
        "buffer": (12 + 2 * 5) * 2 * 2 * 4 * 4,
        "vit": 0,
    }
    assert dp.total == 824 + 608 + 1472 + 1632 + 1408
    # features sharded over the 2 ranks: F / 2 = 4 per rank, the whole batch of 6 tokens on each
    fs = plan_memory(shape, 8, 2, 6, shard_features=True, **common)
    assert (fs.parameters_per_rank, fs.trainable_per_rank, fs.tokens_per_rank, fs.features_per_rank) == (104, 96, 6, 4)
    assert fs.bytes == {
        "parameters": 4 * 104 + 4 * 6,
        "gradients": 4 * (96 - 48 + 2 * 4 * 4),
        "adam": 2 * 4 * 96,
        "activations": 4 * (5 * 2 * 6 * 4 + 6 * 4 + 6 * 2 * 2) + 20 * 2 * 6 * 2,  # + all-gathered candidates N x k x ranks
        "buffer": (12 + 2 * 5) * 2 * 2 * 4 * 4,
        "vit": 0,
    }
    assert plan_memory(shape, 8, 2, 6, **common, device_memory_gib=5944 / 2**30).fits is True
    assert plan_memory(shape, 8, 2, 6, **common, device_memory_gib=5943 / 2**30).fits is False
    with pytest.raises(PlanError, match="divisible"):
        plan_memory(shape, 8, 2, 6, world_size=3, shard_features=True)


def test_the_issues_figures():
    """Issue 25: ViT-L/14 at F = 16,384 has ~5.4 B CLT parameters, ~22 GB fp32, ~87 GB with gradients and Adam
    state (all gradients held); ViT-H/14 at F = 20,480 has ~14 B in the decoders."""
    p = plan_memory("ViT-L-14", 16384, 32, 4096, decoder_update="after")
    assert 5.4e9 < p.clt_parameters < 5.5e9 and 21.5e9 < p.bytes["parameters"] < 22.0e9
    assert 86.5e9 < p.bytes["parameters"] + p.bytes["gradients"] + p.bytes["adam"] < 87.5e9
    assert 13.5e9 < clt_parameter_counts(32, 1280, 20480)["W_dec"] < 14.5e9


def test_plan_cli(capsys):
    assert cli.main(["--plan", "--model", "ViT-B-32", "--features", "6144", "--k", "32", "--world-size", "2",
                     "--shard-features", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "features sharded over 2 ranks (3072 per rank)" in out and "fits" in out and "NOT" not in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--plan", "--model", "ViT-B-32", "--features", "6145", "--world-size", "2", "--shard-features"])
    assert exc.value.code == 2 and "argument --shard-features" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--plan", "--model", "ViT-Nope"])
    assert "argument --model" in capsys.readouterr().err
