"""CLT checkpoints: `clt.safetensors` (weights and normalisation buffers) + `clt.json` (config and metadata).

`clt.json` holds: `format_version`, `config` (CLTConfig), `backbone` (Backbone.identity(): name,
pretrained tag or path, weight hash, L, d_model), `normalisation` (in/out scales, also in the
weights), `data` (dataset description), `metrics` (final), `sha256` (of the safetensors file), and
any extra keys the caller passes (training state lives in the trainer's own files).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bundle.atomic import replaced, write_text_atomic
from bundle.checksums import file_sha256
from bundle.killpoints import killpoint

from .backbone import Backbone, check_backbone_matches
from .clt import CLTConfig, CrossLayerTranscoder

WEIGHTS = "clt.safetensors"
META = "clt.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or made for another backbone."""


def save_checkpoint(
    out_dir: str | Path, clt: CrossLayerTranscoder, backbone: dict[str, Any], *, dtype: torch.dtype | None = None, **extra: Any
) -> Path:
    """Write `clt.safetensors` and `clt.json` into `out_dir` atomically; returns `out_dir`.

    `backbone` is `Backbone.identity()`; `dtype` (e.g. torch.float16) stores the floating-point tensors
    in that precision (`load_checkpoint` casts them back to the module's float32); `extra` (e.g.
    data=..., metrics=...) goes into the JSON.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in clt.state_dict().items()}
    with replaced(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "cltvit-clt", "format_version": str(FORMAT_VERSION)})
    killpoint("checkpoint.weights_written")
    meta = {
        "format_version": FORMAT_VERSION,
        "config": clt.cfg.to_dict(),
        "backbone": backbone,
        "normalisation": {"in_scale": clt.in_scale.tolist(), "out_scale": clt.out_scale.tolist()},
        "sha256": file_sha256(out / WEIGHTS),
        **extra,
    }
    write_text_atomic(out / META, json.dumps(meta, indent=2, sort_keys=True))
    return out


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a CLT checkpoint: {META} missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def load_checkpoint(
    ckpt_dir: str | Path, backbone: Backbone | None = None, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[CrossLayerTranscoder, dict[str, Any]]:
    """Load (clt in eval mode, metadata). With `backbone`, refuse a checkpoint made for another one."""
    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} missing")
    if verify and meta.get("sha256") and file_sha256(weights) != meta["sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 recorded in {META}: corrupt or replaced")
    if backbone is not None:
        check_backbone_matches(meta["backbone"], backbone, what=f"CLT checkpoint {ckpt}")
    clt = CrossLayerTranscoder(CLTConfig(**meta["config"]))
    state = load_file(str(weights), device=str(device))
    missing, unexpected = clt.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit its config: missing {missing}, unexpected {unexpected}")
    return clt.to(device).eval(), meta
