"""The fused explainer graph: ViT + CLT + additive decomposition as one ONNX model.

`FusedExplainer.forward(pixels, text_embeddings)` calls `training.model.decompose.decompose` unchanged, so
the eager reference and the exported graph share one source of truth. Inputs and outputs are named
as in docs/bundle.md (`MODEL_INPUTS`, `model_outputs(spatial)`); batch B and class count C are dynamic.
With `spatial_top_k` S > 0 (the default, 5) the graph also returns the spatial maps of the S best
classes (`SPATIAL_OUTPUTS`); the attention softmax weights they are made from are the ones the
blocks' outputs are made from.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx
import torch
from torch import nn

from bundle.format import CORE_OUTPUTS, INTERVENE_INPUTS, INTERVENE_MODES, MODEL_INPUTS, MODES, model_outputs, term_names
from training.model.decompose import decompose
from training.model.edits import Edits

DEFAULT_OPSET = 17
DEFAULT_SPATIAL_TOP_K = 5  # classes with spatial maps: the service's default top-k


class Scope(nn.Module):
    """A name scope for the exported graph: `scope(fn, *args)` returns fn(*args), and the TorchScript
    exporter names the ONNX nodes it traces `/<attribute name>/...` (`ENCODE_SCOPE`, `DECODE_SCOPE`),
    so a per-node profile can tell the CLT's encoders and decoders from the rest (scripts/profile_export.py)."""

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


ENCODE_SCOPE, DECODE_SCOPE = "clt_encode", "clt_decode"  # ONNX node name prefixes `/clt_encode`, `/clt_decode`


class FusedExplainer(nn.Module):
    """pixels [B,3,H,W], text_embeddings [C,D] -> (logits [B,C], embedding [B,D], contributions [B,T,C],
    top_feature_layer / top_feature_index int64 [B,K], top_feature_activation / top_feature_contribution [B,K])
    and, with spatial_top_k S > 0, (spatial_class int64 [B,S], spatial_contributions [B,S,L,N],
    spatial_bias [B,S,L,2], spatial_head_contributions [B,L,H,N]) with N tokens (docs/bundle.md)."""

    def __init__(self, visual: nn.Module, clt: nn.Module, logit_scale: float, mode: str = "cls", top_k_features: int = 16,
                 spatial_top_k: int = DEFAULT_SPATIAL_TOP_K) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if top_k_features < 1:
            raise ValueError(f"top_k_features must be >= 1, got {top_k_features}")
        if spatial_top_k < 0:
            raise ValueError(f"spatial_top_k must be >= 0 (0: no spatial maps), got {spatial_top_k}")
        self.visual, self.clt = visual, clt
        self.logit_scale, self.mode, self.top_k_features = float(logit_scale), mode, int(top_k_features)
        self.spatial_top_k = int(spatial_top_k)
        setattr(self, ENCODE_SCOPE, Scope())
        setattr(self, DECODE_SCOPE, Scope())
        # Each source layer's total residual write [F, d], computed once: otherwise the graph would
        # carry every decoder twice (as stored, and reshaped for the sparse gather) and re-sum it per call.
        with torch.no_grad():
            for i in range(clt.cfg.n_layers):
                self.register_buffer(f"total_write_{i}", clt.total_write_matrix(i).detach().clone(), persistent=False)

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.explain(pixels, text_embeddings)

    def explain(self, pixels: torch.Tensor, text_embeddings: torch.Tensor, edits: Edits | None = None) -> tuple[torch.Tensor, ...]:
        clt = self.clt
        writes = [getattr(self, f"total_write_{i}") for i in range(clt.cfg.n_layers)]
        # instance attributes shadow the methods for this call: the precomputed writes, and the encoder and
        # decoder through their name scopes
        encode, decode = type(clt).encode.__get__(clt), type(clt).decode_source.__get__(clt)
        clt.total_write_matrix = writes.__getitem__
        clt.encode = lambda layer, x: getattr(self, ENCODE_SCOPE)(encode, layer, x)
        clt.decode_source = lambda source, code: getattr(self, DECODE_SCOPE)(decode, source, code)
        try:
            d = decompose(self.visual, clt, pixels, text_embeddings, self.logit_scale, self.mode, self.top_k_features,
                          self.spatial_top_k, edits=edits)
        finally:
            del clt.total_write_matrix, clt.encode, clt.decode_source
        core = (d.logits, d.embedding, d.contributions, d.top_layer, d.top_index, d.top_activation, d.top_contribution)
        if d.spatial is None:
            return core
        return (*core, d.spatial.classes, d.spatial.tokens, d.spatial.bias, d.spatial.heads)


class InterveneExplainer(FusedExplainer):
    """The intervention graph (`intervene.onnx`, docs/intervene.md): pixels [B,3,H,W], text_embeddings
    [C,D] and one edit set per row (`bundle.format.EDIT_INPUTS`, training/model/edits.py) -> the seven
    core outputs of the edited model, through the same `decompose` as `FusedExplainer`. No spatial maps."""

    def __init__(self, visual: nn.Module, clt: nn.Module, logit_scale: float, mode: str = "cls", top_k_features: int = 16) -> None:
        if mode not in INTERVENE_MODES:
            raise ValueError(f"an intervention graph needs mode {' or '.join(INTERVENE_MODES)}, got {mode!r}")
        super().__init__(visual, clt, logit_scale, mode, top_k_features, spatial_top_k=0)

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor, *edit_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.explain(pixels, text_embeddings, Edits(*edit_inputs))


class PlainClassifier(nn.Module):
    """The unexplained baseline: open_clip's own image encoder + zero-shot logits [B, C] (benchmarks)."""

    def __init__(self, visual: nn.Module, logit_scale: float) -> None:
        super().__init__()
        self.visual, self.logit_scale = visual, float(logit_scale)

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        e = self.visual(pixels)
        return self.logit_scale * (e / e.norm(dim=-1, keepdim=True)) @ text_embeddings.T


@contextlib.contextmanager
def export_context(*modules: nn.Module) -> Iterator[None]:
    """Exportable settings for the duration of an export: nn.MultiheadAttention's native fast path off
    (no ONNX symbolic), CLT decoders as gather+einsum (`export_gather`), modules in eval mode."""
    fast = torch.backends.mha.get_fastpath_enabled()
    saved = []
    for m in modules:
        for sub in m.modules():
            if hasattr(sub, "export_gather"):
                saved.append((sub, sub.export_gather))
                sub.export_gather = True
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for sub, flag in saved:
            sub.export_gather = flag


def torch_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """torch.onnx.export with the TorchScript exporter (dynamo=False), quietly. Large models (> 2 GB)
    get their weights in one external file `<name>.data` next to the graph (see `consolidate`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with export_context(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return consolidate(path)


def consolidate(path: Path) -> Path:
    """If an export scattered weights over many external files, gather them into `<name>.data`."""

    model = onnx.load(str(path), load_external_data=False)
    ext = {
        e.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for e in init.external_data
        if e.key == "location"
    }
    if not ext or ext == {path.name + ".data"}:
        return path
    model = onnx.load(str(path), load_external_data=True)
    for name in ext:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path.parent / name)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    return path


def external_files(path: str | Path) -> list[str]:
    """Names (relative to the graph's folder) of the external weight files a graph refers to."""

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for graph_init in model.graph.initializer:
        if graph_init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in graph_init.external_data if e.key == "location")
    return sorted(names)


def example_inputs(visual: nn.Module, embed_dim: int, batch: int = 2, n_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (pixels [B,3,H,W], L2-normalised text embeddings [C,D]) for tracing."""
    H, W = tuple(visual.image_size)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n_classes, embed_dim, generator=g)
    return torch.randn(batch, 3, H, W, generator=g), t / t.norm(dim=-1, keepdim=True)


def export_explainer(
    visual: nn.Module,
    clt: nn.Module,
    path: str | Path,
    *,
    logit_scale: float,
    embed_dim: int,
    mode: str = "cls",
    top_k_features: int = 16,
    spatial_top_k: int = DEFAULT_SPATIAL_TOP_K,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the fused explainer graph (docs/bundle.md `model.onnx`) to `path`; `spatial_top_k` 0
    leaves the spatial outputs out."""
    module = FusedExplainer(visual, clt, logit_scale, mode, top_k_features, spatial_top_k)
    outputs = model_outputs(spatial_top_k > 0)
    dyn = {"pixels": {0: "B"}, "text_embeddings": {0: "C"}, "logits": {0: "B", 1: "C"}, "embedding": {0: "B"},
           "contributions": {0: "B", 2: "C"}}
    dyn.update({n: {0: "B"} for n in outputs[3:]})
    args = example_inputs(visual, embed_dim)
    path = torch_export(module, args, path, list(MODEL_INPUTS), list(outputs), dyn, opset)
    with export_context(module), torch.no_grad():
        shapes = {n: list(t.shape) for n, t in zip(outputs, module.eval()(*args))}
    return declare_static_dims(path, shapes, dyn)


def example_edits(visual: nn.Module, n_layers: int, batch: int = 2, n_edits: int = 2) -> Edits:
    """Edits for tracing: row 0 none, row 1 one feature ablated, a term halved, a patch deleted and one
    dropped as a key (every branch of the graph runs with values that matter)."""
    P = int(visual.grid_size[0]) * int(visual.grid_size[1])
    e = Edits.identity(batch, len(term_names(n_layers)), P, n_edits)
    e.feature_layer[1, 0], e.feature_scale[1, 0] = 0, 0.0
    e.term_scale[1, 1] = 0.5
    e.patch_delete[1, 0], e.patch_key_drop[1, P - 1] = True, True
    return e


def export_intervener(
    visual: nn.Module,
    clt: nn.Module,
    path: str | Path,
    *,
    logit_scale: float,
    embed_dim: int,
    mode: str = "cls",
    top_k_features: int = 16,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the intervention graph (docs/bundle.md `intervene.onnx`) to `path`. B (rows), C (classes)
    and E (feature edits per row) are dynamic."""
    module = InterveneExplainer(visual, clt, logit_scale, mode, top_k_features)
    outputs = list(CORE_OUTPUTS)
    dyn = {"pixels": {0: "B"}, "text_embeddings": {0: "C"}, "logits": {0: "B", 1: "C"}, "embedding": {0: "B"},
           "contributions": {0: "B", 2: "C"}, "feature_layer": {0: "B", 1: "E"}, "feature_index": {0: "B", 1: "E"},
           "feature_scale": {0: "B", 1: "E"}, "feature_shift": {0: "B", 1: "E"}, "term_scale": {0: "B"},
           "term_all_tokens": {0: "B"}, "patch_delete": {0: "B"}, "patch_key_drop": {0: "B"}}
    dyn.update({n: {0: "B"} for n in outputs[3:]})
    args = (*example_inputs(visual, embed_dim), *example_edits(visual, clt.cfg.n_layers).tensors())
    path = torch_export(module, args, path, list(INTERVENE_INPUTS), outputs, dyn, opset)
    with export_context(module), torch.no_grad():
        shapes = {n: list(t.shape) for n, t in zip(outputs, module.eval()(*args))}
    return declare_static_dims(path, shapes, dyn)


def declare_static_dims(path: Path, shapes: dict[str, list[int]], dynamic_axes: dict[str, dict[int, str]]) -> Path:
    """Write the fixed sizes of the graph's outputs (every axis not in `dynamic_axes`, taken from
    `shapes`, an example run's output shapes) into its declared output types, where the exporter left
    symbolic names, so that `bundle.load_bundle` can check them. The weights are not touched."""
    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, size in enumerate(shapes.get(out.name, [])):
            if axis < len(dims) and axis not in dynamic_axes.get(out.name, {}):
                dims[axis].Clear()
                dims[axis].dim_value = int(size)
    onnx.save_model(model, str(path))
    return path


def export_plain(visual: nn.Module, path: str | Path, *, logit_scale: float, embed_dim: int, opset: int = DEFAULT_OPSET) -> Path:
    """Write the baseline graph pixels, text_embeddings -> logits (open_clip's encoder, no explanation)."""
    dyn = {"pixels": {0: "B"}, "text_embeddings": {0: "C"}, "logits": {0: "B", 1: "C"}}
    return torch_export(PlainClassifier(visual, logit_scale), example_inputs(visual, embed_dim), path,
                        list(MODEL_INPUTS), ["logits"], dyn, opset)
