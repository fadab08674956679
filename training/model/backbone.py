"""Access to open_clip vision transformers: loading by name, tag, checkpoint file or project config.

A `Backbone` bundles the open_clip `CLIP` model (eval mode), its image preprocessing, its
tokenizer, and a fingerprint of the vision tower weights that checkpoints use to refuse a
mismatched model.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import open_clip
import torch
from huggingface_hub import constants
from torch import nn

from .vit import check_supported

PROJECT_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


class BackboneError(RuntimeError):
    """A backbone could not be loaded or does not match what was expected."""


def register_project_configs() -> None:
    """Register the project's own open_clip configs (tiny test models, the reference CLIP).

    After this, `open_clip.create_model("cltvit-tiny")` works like any built-in architecture.
    """
    global _registered
    if not _registered:
        open_clip.add_model_config(PROJECT_CONFIG_DIR)
        _registered = True


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else CPU. Never fails for lack of a GPU unless asked for one."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackboneError(f"device {requested!r} was requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class BackboneSpec:
    """What to load: an open_clip architecture name plus a weight source.

    `pretrained` is an open_clip tag (e.g. "openai"), a path to a checkpoint file, or None for
    random initialisation (seeded by `seed`).
    """

    model: str
    pretrained: str | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "pretrained": self.pretrained, "seed": self.seed}


def _weights_fingerprint(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the names, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """Whether the weight hub answers a TCP connect within `timeout_s` (a cheap check before downloading)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub use its local cache only (no retries against an unreachable hub)."""
    if not enabled:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _create(spec: BackboneSpec, device: torch.device) -> tuple[nn.Module, Callable, Any]:
    register_project_configs()
    if spec.model not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip architecture {spec.model!r}; known ones include "
            f"ViT-B-32, ViT-B-16, cltvit-tiny (see open_clip.list_models())"
        )
    pretrained = spec.pretrained
    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(spec.model)
        if pretrained not in tags:
            raise BackboneError(
                f"pretrained={pretrained!r} is neither a file nor a known tag for {spec.model} "
                f"(known tags: {', '.join(tags) or 'none'})"
            )
    torch.manual_seed(spec.seed)
    offline = pretrained is not None and not os.path.isfile(pretrained) and not _hub_reachable()
    try:
        with _hub_offline(offline):
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model, pretrained=pretrained, device=device
            )
    except Exception as exc:  # network or hub failure deep inside open_clip / huggingface_hub
        if pretrained is not None and not os.path.isfile(pretrained):
            raise BackboneError(
                f"could not fetch pretrained weights {spec.model}/{pretrained}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. Without network access, download the "
                f"open_clip checkpoint on a connected machine and pass its file path as --pretrained "
                f"(or pre-populate the open_clip / Hugging Face cache)."
            ) from None
        raise BackboneError(f"could not load {spec.model} from {pretrained}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(spec.model)
    return model, preprocess, tokenizer


@dataclass
class Backbone:
    """A loaded open_clip CLIP model (eval mode, frozen) with its preprocessing and tokenizer."""

    spec: BackboneSpec
    model: nn.Module
    preprocess: Callable
    tokenizer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def n_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def d_model(self) -> int:
        return self.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def n_tokens(self) -> int:
        gh, gw = self.visual.grid_size
        return gh * gw + 1

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)  # type: ignore[return-value]

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the vision tower weights: identifies the backbone a CLT was trained on."""
        return _weights_fingerprint(self.visual)

    def identity(self) -> dict[str, Any]:
        """What a CLT checkpoint and a bundle record about the backbone: portable identifiers only.

        `pretrained` is the open_clip tag, or the checkpoint file's name (never the path of the machine
        that loaded it); `weights_sha256_16` identifies the weights themselves.
        """
        pretrained = self.spec.pretrained
        if pretrained is not None and os.path.isfile(pretrained):
            pretrained = Path(pretrained).name
        return {
            "model": self.spec.model,
            "pretrained": pretrained,
            "seed": self.spec.seed if self.spec.pretrained is None else None,
            "weights_sha256_16": self.fingerprint,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "embed_dim": self.embed_dim,
            "n_tokens": self.n_tokens,
        }

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, float32 [len(prompts), embed_dim]."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        emb = self.model.encode_text(tokens).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot classifier: mean of normalised template embeddings per class, renormalised. [C, D]."""
        out = []
        for name in class_names:
            e = self.encode_text([t.format(name) for t in templates]).mean(0)
            out.append(e / e.norm())
        return torch.stack(out)


def load_backbone(
    model: str, pretrained: str | None = None, *, device: str | torch.device | None = None, seed: int = 0
) -> Backbone:
    """Load an open_clip model by architecture name and weight source; vision tower checked for support.

    Raises `BackboneError` with a message saying what to do when weights cannot be found or fetched.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    spec = BackboneSpec(model=model, pretrained=pretrained, seed=seed)
    net, preprocess, tokenizer = _create(spec, dev)
    net.eval().requires_grad_(False)
    check_supported(net.visual)
    return Backbone(spec=spec, model=net, preprocess=preprocess, tokenizer=tokenizer, device=dev)


def check_backbone_matches(expected: dict[str, Any], backbone: Backbone, what: str = "checkpoint") -> None:
    """Raise `BackboneError` naming both backbones if `expected` (a recorded identity) differs."""
    actual = backbone.identity()
    keys = ("model", "weights_sha256_16", "n_layers", "d_model")
    diff = [k for k in keys if expected.get(k) != actual.get(k)]
    if diff:
        raise BackboneError(
            f"{what} was made for backbone {expected.get('model')} "
            f"(pretrained={expected.get('pretrained')}, weights {expected.get('weights_sha256_16')}, "
            f"L={expected.get('n_layers')}, d={expected.get('d_model')}) but the loaded backbone is "
            f"{actual['model']} (pretrained={actual['pretrained']}, weights {actual['weights_sha256_16']}, "
            f"L={actual['n_layers']}, d={actual['d_model']}); differing: {', '.join(diff)}"
        )


def describe_json(backbone: Backbone) -> str:
    return json.dumps(backbone.identity(), sort_keys=True)
