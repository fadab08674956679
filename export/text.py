"""The text tower graph: CLIP BPE tokens int64 [N, context_length] -> L2-normalised embeddings [N, D]."""
from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import torch
from torch import nn

from bundle.format import TEXT_INPUTS, TEXT_OUTPUTS

from .fused import DEFAULT_OPSET, torch_export

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TextTower(nn.Module):
    """open_clip `encode_text`, L2-normalised (as `Backbone.encode_text`)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.clip.encode_text(tokens).float()
        return e / e.norm(dim=-1, keepdim=True)


def context_length(clip: nn.Module, tokenizer: object | None = None) -> int:
    n = getattr(tokenizer, "context_length", None) or getattr(clip, "context_length", None)
    if not n:
        raise ValueError("cannot tell the text context length of this model")
    return int(n)


def export_text(clip: nn.Module, tokenizer: object, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write text.onnx (tokens int64 [N, context_length] -> text_embeddings float32 [N, D])."""
    if not hasattr(tokenizer, "encoder") or not hasattr(tokenizer, "bpe"):
        raise ValueError(f"only open_clip's CLIP BPE tokenizer is supported in bundles, got {type(tokenizer).__name__}")
    tokens = tokenizer(["a photo of a cat.", "a dog"])  # [2, ctx] int64
    return torch_export(TextTower(clip), (tokens,), path, list(TEXT_INPUTS), list(TEXT_OUTPUTS),
                        {"tokens": {0: "N"}, "text_embeddings": {0: "N"}}, opset)


def copy_vocab(out_dir: str | Path) -> Path:
    """Copy open_clip's BPE vocabulary into `out_dir`; returns the copy's path."""
    src = Path(open_clip.__file__).parent / VOCAB_FILE
    if not src.is_file():
        raise FileNotFoundError(f"open_clip's vocabulary {src} is missing; reinstall open_clip_torch")
    dst = Path(out_dir) / VOCAB_FILE
    shutil.copyfile(src, dst)
    return dst
