"""Reduced-precision variants of the fused graph: `int8`, `int8-clt`, `int8-dec` (ONNX Runtime CPU), `fp16` (CUDA).

Only the transformer blocks' own ops (attention, MLP and their layer norms: ONNX nodes in the
`/attn*`, `/mlp*`, `/ln_1*`, `/ln_2*` export scopes; in graphs with spatial maps, whose attention is
written out, its q/k/v and `/out_proj*` projections) change precision, and in `int8-clt` also the
CLT encoders' matmuls. The residual stream sums, the CLT decoders, ln_post / proj and the
decomposition stay float32, so each variant's contributions still sum to that variant's own logits
to fp32 rounding; only the terms' values move.

- int8: dynamic quantization of the MatMul / Gemm weights in those scopes: uint8 activations
  (quantized per call), signed 7-bit weights (`reduce_range`). AVX2 CPUs without VNNI multiply
  u8 x s8 pairs into saturating int16 sums; full 8-bit weights overflow them (7% top-1 agreement
  lost on a test model), 7-bit ones cannot. This keeps the fast u8s8 kernels: measured 1.67x fp32
  on the ViT-B-32 encoder at batch 8, against 1.34x for the non-saturating u8u8 kernels.
- int8-clt: int8 as above, plus the CLT encoders `(x / in_scale) @ W_enc[l]` quantized the same
  way. In `cls` mode at batch 1 each encoder is a matrix-vector product that reads all of W_enc[l]
  (d x F floats, 226 MB per image for ViT-B-32 at F = 6144) for 2 FLOP per weight: memory-bound, so
  a quarter of the bytes is the gain; features near the TopK boundary can change (tested: >= 99%
  top-1 agreement with fp32 on the reference model, like int8).
- int8-dec: int8-clt, plus the CLT decoders stored as weight-only int8 (`quantize_decoders`). The
  decoders (L(L+1)/2 blocks of F x d: 368 M parameters for ViT-B-32 at F = 6144, 2/3 of the fp32
  graph's bytes) are only ever read through a row Gather of the active features, so they are not
  quantized for a matmul kernel: each [F, n_t * d] decoder (and all sources' total writes, stacked
  [L * F, d]) is stored 8-bit with one float32 scale per (feature, block of 256 columns) (symmetric,
  max |w| / 127; a block is a power of two dividing d, `decoder_block`), and the graph reads the
  active rows through ONNX Runtime's `com.microsoft.GatherBlockQuantized`, which gathers and
  dequantizes them to float32 in one kernel before the unchanged float32 decode (a Gather of int8
  rows, a Cast and a Mul instead wrote two extra copies of every gathered row: 26 ms of a ViT-B-32
  call at batch 16, against 9 ms for the fp32 graph's decode). The decoded writes and everything
  after them stay float32, so the contributions still sum to the variant's own logits to fp32
  rounding; the writes move by at most half a quantization step, 1/254 of their block's largest
  |weight|. The graph is a quarter of the decoder bytes (ViT-B-32: 2172 -> ~600 MiB).
- fp16: float16 weights and activations in those scopes, float32 inputs/outputs (keep_io_types).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from bundle.format import VARIANTS

from .fused import consolidate

REDUCED: tuple[str, ...] = tuple(v for v in VARIANTS if v != "fp32")  # what `make_variant` writes
BLOCK_SCOPE = re.compile(r"^/(attn|out_proj|mlp|ln_1|ln_2)(_\d+)?/")
LN_1_SCOPE = re.compile(r"^/ln_1(_\d+)?/")
LARGE = 1_800_000_000  # bytes: save weights externally above this (protobuf's limit is 2 GiB)
DECODER_MIN_ELEMENTS = 4096  # a constant gathered by rows smaller than this is not a CLT decoder


def block_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] | None = None) -> list[str]:
    """Names of the nodes inside the transformer blocks' attention/MLP/LN scopes, and of the packed
    q/k/v projections of attention written out (`training.model.vit.attention_recorded`, the graphs
    with spatial maps): MatMuls of an LN1 output, or of a Slice of one (the last block's CLS query,
    `vit.forward(..., cls_only_last=True)`), by a constant 2-D matrix. That attention's out-projection
    is the `out_proj` scope; its q k^T, softmax and mixing stay float32."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}

    def qkv(n: onnx.NodeProto) -> bool:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            return False
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "Slice":
            p = producer.get(p.input[0])
        return p is not None and bool(LN_1_SCOPE.match(p.name))

    return [n.name for n in model.graph.node
            if (BLOCK_SCOPE.match(n.name) or qkv(n)) and (op_types is None or n.op_type in op_types)]


def _is_large(path: Path) -> bool:
    total = path.stat().st_size
    for p in path.parent.glob(path.name + ".data"):
        total += p.stat().st_size
    return total > LARGE


def clt_encoder_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the CLT encoders' MatMuls: outside the blocks, a Div's output (x / in_scale[l]) times a
    constant 2-D matrix (W_enc[l], [d, F]). The final projection and the decomposition's matmuls read
    LayerNorm / Mul outputs or graph inputs, so they are not picked."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or BLOCK_SCOPE.match(n.name) or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        p = producer.get(n.input[0])
        if p is not None and p.op_type == "Div":
            found.append(n.name)
    return found


def quantize_int8(src: str | Path, dst: str | Path, *, clt_encoder: bool = False, n_layers: int | None = None) -> Path:
    """Dynamic int8 quantization of the transformer blocks' MatMul/Gemm weights (and with `clt_encoder`
    the CLT encoders', one per layer: `n_layers` of them when given). Returns `dst`.

    ORT's dynamic quantizer skips Gemm, so the blocks' Gemms (attention out_proj) are first
    rewritten as MatMul + Add in a temporary copy.
    """
    src, dst = Path(src), Path(dst)
    large = _is_large(src)
    model = onnx.load(str(src), load_external_data=True)
    _gemm_to_matmul(model, set(block_nodes(model, ("Gemm",))))
    nodes = block_nodes(model, ("MatMul",))
    if not nodes:
        raise RuntimeError(f"{src}: found no transformer-block MatMul/Gemm nodes to quantize (export scope names changed?)")
    if clt_encoder:
        enc = clt_encoder_nodes(model)
        if not enc or (n_layers is not None and len(enc) != n_layers):
            raise RuntimeError(f"{src}: found {len(enc)} CLT encoder MatMuls, expected {n_layers or 'some'} (graph structure changed?)")
        nodes += enc
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        mid = Path(tmp) / "fp32.onnx"
        if large:
            onnx.save_model(model, str(mid), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="fp32.onnx.data", size_threshold=1024)
        else:
            onnx.save_model(model, str(mid))
        del model
        with _quiet_root_logger():  # ORT advises shape-inference pre-processing on every call; the graph has static shapes
            quantize_dynamic(
                str(mid), str(dst), weight_type=QuantType.QInt8, reduce_range=True, per_channel=False, op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes, use_external_data_format=large, extra_options={"MatMulConstBOnly": True},
            )
    return _rename_external(dst)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Drop WARNING records from the root logger (onnxruntime.quantization logs its advice there)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _gemm_to_matmul(model: onnx.ModelProto, names: set[str]) -> int:
    """Rewrite the named Gemm nodes (alpha = beta = 1, no transA, constant B) as MatMul (+ Add)."""

    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for i, node in enumerate(list(model.graph.node)):
        if node.name not in names:
            continue
        att = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if att.get("alpha", 1.0) != 1.0 or att.get("beta", 1.0) != 1.0 or att.get("transA", 0) or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if att.get("transB", 0):
            w = w.T
        wname = node.input[1] + "__matmul"
        model.graph.initializer.append(numpy_helper.from_array(w.copy(), wname))
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = out + "__mm" if has_bias else out
        new = [helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name + "_matmul")]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=node.name + "_bias"))
        pos = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for k, n in enumerate(new):
            model.graph.node.insert(pos + k, n)
        done += 1
    used = {x for n in model.graph.node for x in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """float16 transformer blocks, everything else (and all inputs/outputs) float32. Returns `dst`.

    A direct rewrite rather than onnxruntime's generic converter (which wraps every float32 node in
    a float16 round trip): float inputs entering the block scopes get one Cast to float16, float
    tensors leaving them one Cast back to float32, block initializers / constants become float16.
    """

    src, dst = Path(src), Path(dst)
    floats = _float_tensors(onnx.load(str(src), load_external_data=False))  # types only: no weights loaded
    model = onnx.load(str(src), load_external_data=True)
    inside = set(block_nodes(model))
    if not inside:
        raise RuntimeError(f"{src}: found no transformer-block nodes to convert (export scope names changed?)")
    _to_fp16(model, inside, floats)
    if _is_large(src):
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    return dst


def _float_tensors(skeleton: onnx.ModelProto) -> set[str]:
    """Names of all float32 tensors (inputs, initializers, node outputs), by ONNX type inference.
    Strips `skeleton`'s weight data in place (pass a copy loaded without external data)."""

    for init in skeleton.graph.initializer:  # inference needs types and shapes only
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.ClearField("int64_data")
        init.ClearField("int32_data")
        init.ClearField("double_data")
        init.ClearField("external_data")
        init.data_location = onnx.TensorProto.DEFAULT
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    g = inferred.graph
    out = {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            out.add(v.name)
    return out


def _to_fp16(model: onnx.ModelProto, inside: set[str], floats: set[str]) -> None:
    """In-place: nodes named in `inside` compute in float16 (see `convert_fp16`); `floats` names the
    float32 tensors of the graph (`_float_tensors`)."""

    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    produced_inside = {o for n in g.node if n.name in inside for o in n.output}
    half_of: dict[str, str] = {}  # float32 tensor -> its float16 twin
    new_nodes, new_inits = [], []

    def half(name: str) -> str:
        if name not in half_of:
            twin = name + "__fp16"
            if name in inits:
                arr = numpy_helper.to_array(inits[name]).astype("float16")
                new_inits.append(numpy_helper.from_array(arr, twin))
            else:
                new_nodes.append(helper.make_node("Cast", [name], [twin], to=HALF, name=twin + "_cast"))
            half_of[name] = twin
        return half_of[name]

    # float tensors made inside and read outside (or graph outputs) get a float32 cast back
    leaving = {x for n in g.node if n.name not in inside for x in n.input if x in produced_inside and x in floats}
    leaving |= {o.name for o in g.output if o.name in produced_inside and o.name in floats}
    for node in g.node:
        if node.name not in inside:
            continue
        for j, x in enumerate(node.input):
            if x in leaving:
                node.input[j] = x + "__fp16out"
            elif x and x in floats and x not in produced_inside:
                node.input[j] = half(x)
        node.output[:] = [o + "__fp16out" if o in leaving else o for o in node.output]
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                a.i = HALF
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float16"), a.t.name))
    for y in sorted(leaving):
        new_nodes.append(helper.make_node("Cast", [y + "__fp16out"], [y], to=FLOAT, name=y + "_cast_fp32"))
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    used = {x for n in g.node for x in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]  # stale types
    _toposort(model)


def _toposort(model: onnx.ModelProto) -> None:
    """Order nodes so each comes after the producers of its inputs (stable: keeps the given order
    where possible); drops nodes whose outputs nothing uses any more (dead casts)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    nodes = list(graph.node)
    # dead-code elimination, backwards
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    live: set[int] = set()
    stack = [producer[n] for n in needed if n in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(producer[x] for x in nodes[i].input if x in producer and producer[x] not in live)
    nodes = [n for i, n in enumerate(nodes) if i in live]
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(x in available for x in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _rename_external(path: Path) -> Path:
    """Gather whatever external weight files the quantizer wrote into `<name>.data` (see fused.consolidate)."""

    return consolidate(path)

def decoder_gathers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """(node, constant name) of the CLT decoders' row Gathers: axis-0 Gathers whose data is a constant
    2-D float32 matrix (an initializer, or a Constant node's output) of at least DECODER_MIN_ELEMENTS,
    i.e. each source's feature-major decoder [F, n_t * d] and all sources' total writes stacked
    [L * F, d] (`decompose.feature_writes`). The graph's other Gathers read shapes, activations or the
    text embeddings (graph inputs)."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    found = []
    for n in model.graph.node:
        if n.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in n.attribute):
            continue
        src = n.input[0]
        t = inits[src] if src in inits else consts[src].attribute[0].t if src in consts else None
        if t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and math.prod(t.dims) >= DECODER_MIN_ELEMENTS:
            found.append((n, src))
    return found


def quantize_rows(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of w [F, n * block] with one scale per (row, block of `block` columns):
    returns (q int8 [F, n, block], scale float32 [F, n, 1]) with q * scale ~= w (error <= scale / 2)."""
    f, width = w.shape
    if width % block:
        raise ValueError(f"width {width} is not a multiple of the block {block}")
    blocks = w.reshape(f, width // block, block).astype(np.float32)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale, q = 0
    q = np.clip(np.rint(blocks / scale), -127, 127).astype(np.int8)
    return q, scale


MAX_DECODER_BLOCK = 256  # columns sharing a decoder scale: a power of two (GatherBlockQuantized), <= this


def decoder_block(widths: set[int]) -> int:
    """The columns sharing one scale in int8-dec's decoders: the largest power of two that divides every
    decoder width (so, d_model's, as the last layer's own decoder is [F, d]), at most MAX_DECODER_BLOCK
    (ONNX Runtime's GatherBlockQuantized takes power-of-two blocks of at least 16)."""
    g = math.gcd(*widths)
    block = min(g & -g, MAX_DECODER_BLOCK)
    if block < 16:
        raise ValueError(f"int8-dec needs decoder widths divisible by 16 (got a gcd of {g}): d_model must be a multiple of 16")
    return block


def quantize_decoders(model: onnx.ModelProto, block: int | None = None) -> int:
    """In place: every CLT decoder row Gather (`decoder_gathers`) becomes one ONNX Runtime
    `com.microsoft.GatherBlockQuantized` (module docstring, int8-dec): it gathers the active rows of an
    8-bit copy and multiplies them by their block scales in one kernel, so no int8 copy of the rows, and
    no second float32 one, is written per call. Storage: uint8 with zero point 128 (the symmetric int8
    value + 128), one float32 scale per (row, block of `block` columns). `block`: a power of two >= 16
    dividing every decoder's width (None: `decoder_block`). Returns the number of Gathers rewritten."""
    g = model.graph
    found = decoder_gathers(model)
    if not found:
        return 0
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name] if name in inits else consts[name].attribute[0].t)

    if block is None:
        block = decoder_block({int(array(src).shape[1]) for _, src in found})
    done: dict[str, tuple[str, str]] = {}  # constant -> (uint8 name, scale name)
    new_nodes: list[onnx.NodeProto] = []
    for node, src in found:
        if src not in done:
            w = array(src)
            q, scale = quantize_rows(w, block)  # int8 [F, n, block], [F, n, 1]
            base = src.strip("/").replace("/", "_").replace(":", "_") + "__int8"
            u8 = (q.astype(np.int16) + 128).astype(np.uint8).reshape(w.shape)
            g.initializer.extend([numpy_helper.from_array(u8, base), numpy_helper.from_array(scale[..., 0], base + "_scale")])
            done[src] = (base, base + "_scale")
        qname, sname = done[src]
        new_nodes.append(helper.make_node("GatherBlockQuantized", [qname, node.input[1], sname], [node.output[0]],
                                          name=(node.name or node.output[0]) + "/dq_gather", domain="com.microsoft",
                                          gather_axis=0, quantize_axis=1, block_size=block, bits=8))
        g.node.remove(node)
    g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _toposort(model)  # also drops the float32 Constant nodes nothing reads any more
    used = {x for n in g.node for x in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return len(found)


def quantize_int8_decoders(src: str | Path, dst: str | Path, *, n_layers: int | None = None, block: int | None = None) -> Path:
    """int8-dec: `quantize_int8(..., clt_encoder=True)` and then `quantize_decoders` on its output (checked:
    one Gather per source layer's decoder and one of the stacked total writes, when `n_layers` is given).
    Returns `dst`."""
    dst = Path(dst)
    quantize_int8(src, dst, clt_encoder=True, n_layers=n_layers)
    model = onnx.load(str(dst), load_external_data=True)
    n = quantize_decoders(model, block)
    if not n or (n_layers is not None and n != n_layers + 1):
        raise RuntimeError(f"{src}: found {n} CLT decoder Gathers, expected {n_layers + 1 if n_layers else 'some'} (graph structure changed?)")
    for f in [dst, *dst.parent.glob(dst.name + ".data")]:
        f.unlink()
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > LARGE:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    return dst


def make_variant(fp32_path: str | Path, variant: str, dst: str | Path, n_layers: int | None = None) -> Path:
    """Write `variant` ("int8", "int8-clt", "int8-dec" or "fp16") of the fp32 graph to `dst` (`n_layers`: the
    CLT's, checked against the encoders and decoders found for int8-clt and int8-dec)."""
    if variant == "int8":
        return quantize_int8(fp32_path, dst)
    if variant == "int8-clt":
        return quantize_int8(fp32_path, dst, clt_encoder=True, n_layers=n_layers)
    if variant == "int8-dec":
        return quantize_int8_decoders(fp32_path, dst, n_layers=n_layers)
    if variant == "fp16":
        return convert_fp16(fp32_path, dst)
    raise ValueError(f"unknown variant {variant!r}; choose {', '.join(REDUCED)}")
