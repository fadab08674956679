"""Bundle export (export.writer.export_bundle, cltvit-export): what it writes and how it refuses bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from bundle import CORE_OUTPUTS, MODEL_OUTPUTS, file_sha256, load_bundle, term_names
from export.cli import main as cli_main
from export.writer import ExportError, export_bundle
from training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
from training.model.backbone import load_backbone
from training.model.checkpoint import save_checkpoint
from training.model.decompose import decompose
from training.testing import random_clt


@pytest.fixture()
def bundle(variant_bundle):
    return variant_bundle


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_bundle_manifest_matches_the_model(bundle, tiny_backbone):
    m, paths = load_bundle(bundle)
    assert m.format_version == 2 and m.mode == "cls" and m.opset >= 17
    assert m.spatial is not None and (m.spatial.top_k, m.spatial.grid, m.spatial.heads) == (5, (4, 4), 4)
    assert m.term_names == term_names(tiny_backbone.n_layers)
    assert m.backbone.weights_sha256_16 == tiny_backbone.fingerprint
    assert m.backbone.embed_dim == tiny_backbone.embed_dim
    assert m.logit_scale == pytest.approx(tiny_backbone.logit_scale)
    assert list(m.preprocess.image_size) == [32, 32]
    assert m.tokenizer.context_length == 32
    assert m.labels.names == list(FASHION_MNIST_CLASSES)
    assert m.variants == {"fp32": "model.onnx", "int8": "model.int8.onnx", "int8-clt": "model.int8-clt.onnx", "int8-dec": "model.int8-dec.onnx",
                          "fp16": "model.fp16.onnx"}
    assert set(m.files) == {"model.onnx", "model.int8.onnx", "model.int8-clt.onnx", "model.int8-dec.onnx", "model.fp16.onnx", "text.onnx",
                            "labels.npy", "bpe_simple_vocab_16e6.txt.gz", }
    for name, digest in m.files.items():
        assert file_sha256(bundle / name) == digest
    # nothing unlisted travels with a bundle (exporter leftovers are removed)
    assert {f.name for f in bundle.iterdir()} == set(m.files) | {"bundle.json"}
    assert paths.model == bundle.resolve() / "model.onnx" and paths.model_for("int8").name == "model.int8.onnx"
    with pytest.raises(KeyError, match="no 'bf16' variant"):
        paths.model_for("bf16")
    want = tiny_backbone.class_embeddings(FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES[:2]).numpy()
    np.testing.assert_allclose(np.load(paths.labels), want, atol=1e-6)


def test_text_graph_matches_open_clip(bundle, tiny_backbone):
    _, paths = load_bundle(bundle)
    prompts = ["a photo of a bag.", "an item of clothing: ankle boot.", "x"]
    tokens = tiny_backbone.tokenizer(prompts)
    (got,) = _session(paths.text).run(None, {"tokens": tokens.numpy()})
    want = tiny_backbone.encode_text(prompts).numpy()
    assert got.shape == (3, tiny_backbone.embed_dim)
    assert np.abs(got - want).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_model_graph_signature(bundle):
    sess = _session(bundle / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["pixels", "text_embeddings"]
    assert [o.name for o in sess.get_outputs()] == list(MODEL_OUTPUTS)
    out = sess.run(None, {"pixels": np.zeros((3, 3, 32, 32), np.float32), "text_embeddings": np.load(bundle / "labels.npy")})
    assert out[0].shape == (3, 10) and out[2].shape == (3, 11, 10) and out[3].shape == (3, 16)
    assert [o.shape for o in out[7:]] == [(3, 5), (3, 5, 4, 17), (3, 5, 4, 2), (3, 4, 4, 17)]
    # fixed sizes are declared in the graph, so that load_bundle can check them
    assert [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in onnx.load(str(bundle / "model.onnx")).graph.output][7:] \
        == [["B", 5], ["B", 5, 4, 17], ["B", 5, 4, 2], ["B", 4, 4, 17]]


def test_variants_have_reduced_precision(bundle):
    int8 = onnx.load(str(bundle / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}, ops
    n8 = sum(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) == 2 for t in int8.graph.initializer)
    # every block's qkv / out / fc / proj weight matrices but the last block's fc and proj: in `cls` mode only the CLS
    # token's MLP runs at the last block (vit.forward's cls_only_last), and that one is the CLT's; its query
    # projection has a matrix of its own (the CLS query only; keys and values from one [d, 2d] matrix)
    assert n8 == 3 * 4 + 3
    # int8-clt: the same blocks plus the 4 CLT encoders [d=64, F=128]; decoders and the decomposition stay float32
    clt8 = onnx.load(str(bundle / "model.int8-clt.onnx"))
    quantized = [tuple(t.dims) for t in clt8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    # [64, 128] is also the last block's key / value matrix [d, 2d] (tiny model: F = 2d), once in both variants
    blocks8 = [tuple(t.dims) for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert blocks8.count((64, 128)) == 1, blocks8
    assert len(quantized) == n8 + 4 and quantized.count((64, 128)) == 1 + 4, quantized
    fp32 = onnx.load(str(bundle / "model.onnx"))
    decoders = {tuple(t.dims) for t in fp32.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                and t.dims[0] == 128 and t.dims[1] != 64}  # feature-major decoder tables [F, n_targets * d]
    assert decoders and decoders <= {tuple(t.dims) for t in clt8.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    fp16 = onnx.load(str(bundle / "model.fp16.onnx"))
    n16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert n16 >= 4 * 4  # at least the 4 blocks' qkv/out/fc/proj weights
    assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [onnx.TensorProto.FLOAT] * 2
    F, I = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert [o.type.tensor_type.elem_type for o in fp16.graph.output] == [F, F, F, I, I, F, F, I, F, F, F]
    onnx.checker.check_model(fp16, full_check=True)


# ------------------------------------------------------------------ exporter errors and CLI
def test_export_bundle_argument_errors(tiny_backbone, tmp_path):
    clt = random_clt(tiny_backbone.n_layers, tiny_backbone.d_model)
    with pytest.raises(ExportError, match="mode must be one of"):
        export_bundle(tiny_backbone, clt, "some", ["a"], None, tmp_path / "x")
    with pytest.raises(ExportError, match="slot"):
        export_bundle(tiny_backbone, clt, "cls", ["a"], ["no slot"], tmp_path / "x")
    with pytest.raises(ExportError, match="duplicate class names"):
        export_bundle(tiny_backbone, clt, "cls", ["a", "a"], None, tmp_path / "x")
    with pytest.raises(ExportError, match="does not fit backbone"):
        export_bundle(tiny_backbone, random_clt(3, 64), "cls", ["a"], None, tmp_path / "x")
    with pytest.raises(ExportError, match="exists"):
        export_bundle(tiny_backbone, clt, "cls", ["a"], None, tmp_path)
    with pytest.raises(ExportError, match="unknown variant"):
        export_bundle(tiny_backbone, clt, "cls", ["a"], None, tmp_path / "x", variants=["bf16"])
    with pytest.raises(ExportError, match="spatial_top_k must be >= 0"):
        export_bundle(tiny_backbone, clt, "cls", ["a"], None, tmp_path / "x", spatial_top_k=-1)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*.tmp"))


def test_cli_writes_a_valid_bundle(tiny_backbone, tmp_path, capsys):
    weights = tmp_path / "weights" / "tiny-clip.pt"
    weights.parent.mkdir()
    torch.save(tiny_backbone.model.state_dict(), weights)
    backbone = load_backbone("cltvit-tiny", str(weights), device="cpu")
    clt = random_clt(tiny_backbone.n_layers, tiny_backbone.d_model, seed=5)
    ckpt = save_checkpoint(tmp_path / "ckpt", clt, backbone.identity())
    (tmp_path / "labels.txt").write_text("cat\n\n# comment\ndog\nbird\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    out = tmp_path / "bundle"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "bird"):  # held-out labelled images: the accuracy gate (--eval-data)
        (tmp_path / "held" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "held" / name / f"{i}.png")
    rc = cli_main(["--backbone", "cltvit-tiny", "--pretrained", str(weights), "--clt", str(ckpt), "--mode", "observe",
                   "--labels", str(tmp_path / "labels.txt"), "--templates", str(tmp_path / "templates.txt"), "--out", str(out),
                   "--spatial-top-k", "0", "--eval-data", str(tmp_path / "held"), "--eval-images", "7"])
    assert rc == 0, capsys.readouterr().err
    assert "accuracy gate (image folder held: 7 drawn with numpy default_rng(0) from 9 images; batches of 16" in capsys.readouterr().out
    m, _ = load_bundle(out)
    g = m.variant_gate("fp32")
    assert g.images == 7 and g.top1_agreement == 1.0 and g.accuracy is not None  # the folders are the bundle's labels
    assert m.mode == "observe" and m.labels.names == ["cat", "dog", "bird"] and len(m.labels.templates) == 2
    assert m.spatial is None and [o.name for o in _session(out / "model.onnx").get_outputs()] == list(CORE_OUTPUTS)
    assert m.clt.sha256 == json.loads((ckpt / "clt.json").read_text())["sha256"]
    assert m.clt.config["n_features"] == 128
    # a bundle travels: names and hashes, never the exporting machine's paths
    assert str(tmp_path) not in (out / "bundle.json").read_text()
    assert (m.backbone.pretrained, m.clt.checkpoint) == ("tiny-clip.pt", "ckpt")
    assert m.backbone.weights_sha256_16 == backbone.fingerprint == tiny_backbone.fingerprint
    # the bundle's graph computes with the checkpoint's CLT
    px = torch.randn(2, 3, 32, 32)
    text = torch.from_numpy(np.load(out / "labels.npy"))
    (logits, *_), = [_session(out / "model.onnx").run(None, {"pixels": px.numpy(), "text_embeddings": text.numpy()})]
    with torch.no_grad():
        want = decompose(tiny_backbone.visual, clt, px, text, tiny_backbone.logit_scale, "observe").logits
    assert np.abs(logits - want.numpy()).max() <= 1e-4


def test_cli_errors_name_the_problem(tiny_backbone, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", random_clt(4, 64), tiny_backbone.identity())
    (tmp_path / "labels.txt").write_text("cat\n")
    base = ["--backbone", "cltvit-tiny", "--clt", str(ckpt), "--out", str(tmp_path / "b")]
    assert cli_main([*base, "--labels", str(tmp_path / "missing.txt")]) == 2
    assert "--labels file" in capsys.readouterr().err
    assert cli_main([*base, "--labels", str(tmp_path / "labels.txt"), "--seed", "9"]) == 2
    assert "differing: weights_sha256_16" in capsys.readouterr().err
    assert cli_main([*base, "--labels", str(tmp_path / "labels.txt"), "--backbone", "ViT-Nope"]) == 2
    assert "unknown open_clip architecture" in capsys.readouterr().err
    assert cli_main([*base, "--labels", str(tmp_path / "labels.txt"), "--eval-data", str(tmp_path / "nowhere")]) == 2
    assert "argument --eval-data: image folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--labels", str(tmp_path / "labels.txt"), "--variants", "int4"])
    assert e.value.code == 2 and "cltvit-export: error: --variants: unknown ['int4']; choose from int8, int8-clt, int8-dec, fp16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--labels", str(tmp_path / "labels.txt"), "--spatial-top-k", "-2"])
    assert e.value.code == 2 and "cltvit-export: error: --spatial-top-k must be >= 0" in capsys.readouterr().err
