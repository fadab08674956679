"""CLIP's byte-level BPE tokenizer without torch (a port of open_clip's `SimpleTokenizer`).

Produces exactly the token ids of `open_clip.get_tokenizer(<OpenAI-style CLIP model>)`
(`clean='lower'`, truncation to `context_length` with the last token replaced by end-of-text),
as an int64 numpy array. Reads the vocabulary file shipped in the bundle
(`bpe_simple_vocab_16e6.txt.gz`).
"""
from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path
from typing import Sequence

import ftfy
import numpy as np
import regex as re

SOT = "<start_of_text>"
EOT = "<end_of_text>"
_N_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters (CLIP's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy fix, double html unescape, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Torch-free CLIP BPE tokenizer. `tok(["a photo of a cat"])` -> int64 [N, context_length].

    The BPE word cache is bounded (`cache_size` words, LRU), so arbitrary user labels cannot grow
    memory without limit. Thread-safe.
    """

    def __init__(self, vocab_file: str | Path, context_length: int = 77, cache_size: int = 50_000) -> None:
        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"BPE vocabulary file {path} does not exist")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        merges_text = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : _N_MERGES + 1]]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.context_length = int(context_length)
        self.vocab_size = len(self.encoder)
        self.pat = re.compile(
            f"{SOT}|{EOT}" + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )
        self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """Byte-pair merge one pre-token (already byte-encoded) into vocabulary pieces."""
        if token in (SOT, EOT):
            return (token,)
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return (token + "</w>",)
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens and without truncation."""
        ids: list[int] = []
        for token in re.findall(self.pat, clean_text(text)):
            encoded = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(encoded))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """int64 [N, context_length]: SOT, tokens, EOT, zero padding; truncated with EOT kept last."""
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = context_length or self.context_length
        out = np.zeros((len(texts), n_ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > n_ctx:
                ids = ids[:n_ctx]
                ids[-1] = self.eot_token_id
            out[i, : len(ids)] = ids
        return out
