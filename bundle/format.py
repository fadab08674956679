"""The bundle format's constants: version, file names, graph signatures, modes, variants, term names.

A bundle (docs/bundle.md) is what `export/` writes and `serving/` reads. Everything here is plain
Python so that both sides, and `training.model.decompose`, share one definition.
"""
from __future__ import annotations

# 2: optional spatial outputs (`manifest.spatial`). Version 1 bundles (no spatial outputs) still load.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1, 2)
MANIFEST = "bundle.json"

MODEL_INPUTS: tuple[str, ...] = ("pixels", "text_embeddings")
# outputs every image graph has
CORE_OUTPUTS: tuple[str, ...] = (
    "logits",
    "embedding",
    "contributions",
    "top_feature_layer",
    "top_feature_index",
    "top_feature_activation",
    "top_feature_contribution",
)
# where in the image (graphs exported with spatial maps, `manifest.spatial` set): for the S top classes
# spatial_class int64 [B, S], spatial_contributions [B, S, L, T], spatial_bias [B, S, L, 2]; for the
# predicted class spatial_head_contributions [B, L, H, T] (docs/bundle.md)
SPATIAL_OUTPUTS: tuple[str, ...] = (
    "spatial_class",
    "spatial_contributions",
    "spatial_bias",
    "spatial_head_contributions",
)
MODEL_OUTPUTS: tuple[str, ...] = CORE_OUTPUTS + SPATIAL_OUTPUTS  # a graph with spatial maps (the default export)


def model_outputs(spatial: bool) -> tuple[str, ...]:
    """The image graph's output names, in order, with or without the spatial outputs."""
    return MODEL_OUTPUTS if spatial else CORE_OUTPUTS


# The optional intervention graph (`intervene.onnx`, manifest `intervene`, docs/bundle.md and
# docs/intervene.md): the image graph's inputs plus per-row edits (training/model/edits.py), the
# core outputs of the edited model. E (edits per row) is a dynamic axis; T terms, P patches.
INTERVENE_FILE = "intervene.onnx"
EDIT_INPUTS: tuple[str, ...] = (
    "feature_layer",  # int64 [B, E]; -1: padding
    "feature_index",  # int64 [B, E]
    "feature_scale",  # float32 [B, E]
    "feature_shift",  # float32 [B, E]
    "term_scale",  # float32 [B, T]
    "term_all_tokens",  # bool [B]
    "patch_delete",  # bool [B, P]
    "patch_key_drop",  # bool [B, P]
    "fill",  # float32 [3], preprocessed units
)
INTERVENE_INPUTS: tuple[str, ...] = MODEL_INPUTS + EDIT_INPUTS
INTERVENE_OUTPUTS: tuple[str, ...] = CORE_OUTPUTS
# modes whose CLT replaces the MLPs, the only ones an edit of a CLT feature can act in
INTERVENE_MODES: tuple[str, ...] = ("cls", "all")

TEXT_INPUTS: tuple[str, ...] = ("tokens",)
TEXT_OUTPUTS: tuple[str, ...] = ("text_embeddings",)

# Where the CLT replaces the MLPs: at the CLS token, at every token, or nowhere (the real MLPs run
# and an explicit `error` term carries what the CLT misses).
MODES: tuple[str, ...] = ("cls", "all", "observe")
# Precision variants of the image graph: fp32 (always `model.onnx`), int8 (CPU: the transformer
# blocks' matmuls), int8-clt (CPU: those and the CLT encoders'), int8-dec (CPU: int8-clt and the CLT
# decoders stored int8, weight-only), fp16 (CUDA); file `model.<variant>.onnx`.
VARIANTS: tuple[str, ...] = ("fp32", "int8", "int8-clt", "int8-dec", "fp16")

# Files read as images wherever the project walks a folder (training datasets, folder scoring,
# the Ray engine), matched case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def term_names(n_layers: int) -> list[str]:
    """The T = 2L + 3 additive terms of every logit, in the order of the `contributions` axis:
    `embed`, `attn.0..L-1`, `clt.0..L-1`, `bias`, `error` (0 outside observe mode)."""
    return ["embed", *[f"attn.{l}" for l in range(n_layers)], *[f"clt.{l}" for l in range(n_layers)], "bias", "error"]
