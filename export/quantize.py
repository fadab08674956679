"""Reduced-precision variants of the fused graph: `int8` (ONNX Runtime CPU) and `fp16` (CUDA).

Only the transformer blocks' own ops (attention, MLP and their layer norms: ONNX nodes in the
`/attn*`, `/mlp*`, `/ln_1*`, `/ln_2*` export scopes) change precision. The residual stream sums, the
CLT, ln_post / proj and the decomposition stay float32, so each variant's contributions still sum to
that variant's own logits to fp32 rounding; only the terms' values move.

- int8: dynamic quantization (per-channel int8 weights, uint8 activations quantized per call) of
  the MatMul / Gemm weights in those scopes. Fits AVX2 CPUs (no VNNI needed).
- fp16: float16 weights and activations in those scopes, float32 inputs/outputs (keep_io_types).
"""
from __future__ import annotations

import re
from pathlib import Path

BLOCK_SCOPE = re.compile(r"^/(attn|mlp|ln_1|ln_2)(_\d+)?/")
LARGE = 1_800_000_000  # bytes: save weights externally above this (protobuf's limit is 2 GiB)


def block_nodes(model: "onnx.ModelProto", op_types: tuple[str, ...] | None = None) -> list[str]:  # noqa: F821
    """Names of the nodes inside the transformer blocks' attention/MLP/LN scopes."""
    return [n.name for n in model.graph.node if BLOCK_SCOPE.match(n.name) and (op_types is None or n.op_type in op_types)]


def _is_large(path: Path) -> bool:
    total = path.stat().st_size
    for p in path.parent.glob(path.name + ".data"):
        total += p.stat().st_size
    return total > LARGE


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization of the transformer blocks' MatMul/Gemm weights. Returns `dst`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    nodes = block_nodes(onnx.load(str(src), load_external_data=False), ("MatMul", "Gemm"))
    if not nodes:
        raise RuntimeError(f"{src}: found no transformer-block MatMul/Gemm nodes to quantize (export scope names changed?)")
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=nodes, use_external_data_format=_is_large(src),
        extra_options={"MatMulConstBOnly": True},
    )
    return _rename_external(dst)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """float16 transformer blocks, everything else (and all inputs/outputs) float32. Returns `dst`."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=True)
    inside = set(block_nodes(model))
    if not inside:
        raise RuntimeError(f"{src}: found no transformer-block nodes to convert (export scope names changed?)")
    blocked = [n.name for n in model.graph.node if n.name not in inside]
    fp16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked, disable_shape_infer=True)
    size = fp16.ByteSize() if not _is_large(src) else LARGE + 1
    if size > LARGE:
        onnx.save_model(fp16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(fp16, str(dst))
    return dst


def _rename_external(path: Path) -> Path:
    """Gather whatever external weight files the quantizer wrote into `<name>.data` (see fused.consolidate)."""
    from .fused import consolidate

    return consolidate(path)


def make_variant(fp32_path: str | Path, variant: str, dst: str | Path) -> Path:
    """Write `variant` ("int8" or "fp16") of the fp32 graph to `dst`."""
    if variant == "int8":
        return quantize_int8(fp32_path, dst)
    if variant == "fp16":
        return convert_fp16(fp32_path, dst)
    raise ValueError(f"unknown variant {variant!r}; choose int8 or fp16")
