"""The torch-free CLIP BPE tokenizer gives open_clip's token ids exactly."""
from __future__ import annotations

import os

import numpy as np
import open_clip
import pytest

from serving.tokenizer import ClipTokenizer

VOCAB = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")

STRINGS = [
    "", " ", "a", "a photo of a cat.", "A PHOTO OF A CAT!", "a  photo\tof\na   cat", "t-shirt", "ankle boot",
    "a black and white photo of a t-shirt.", "an item of clothing: sandal.", "it's", "they're we've I'm you'll he'd",
    "naïve café résumé", "Straße", "日本語のテキスト", "中文标签", "emoji 🙂👍🏽 party 🎉", "&amp; &lt;b&gt; &amp;amp;",
    "mojibake: caf\u00c3\u00a9", "numbers 12345 3.14159 1,000,000", "snake_case and kebab-case and CamelCase",
    "<start_of_text> literal specials <end_of_text>", "punctuation!!! ??? ... ;;; ::: ---", "x" * 300,
    " ".join(["word"] * 100), "pneumonoultramicroscopicsilicovolcanoconiosis", "über-long-hyphenated-compound-word",
    "tab\tseparated\tvalues", "a photo of a {}.", "C++ / C# / F#", "e-mail: someone@example.com", "https://example.com/a?b=c",
]


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer(VOCAB, context_length=77)


def test_matches_open_clip_token_for_token(reference, ours):
    expected = reference(STRINGS).numpy()
    got = ours(STRINGS)
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(STRINGS), 77)
    for s, e, g in zip(STRINGS, expected, got):
        assert (e == g).all(), s


def test_matches_on_random_strings(reference, ours):
    rng = np.random.RandomState(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,!?'-éüß日本🙂\t")
    texts = ["".join(rng.choice(alphabet, size=rng.randint(1, 60))) for _ in range(300)]
    assert (reference(texts).numpy() == ours(texts)).all()


def test_short_context_truncates_like_open_clip(ours):
    short = ClipTokenizer(VOCAB, context_length=32)
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    texts = [" ".join(["clothing"] * 50), "a photo of a sneaker."]
    got = short(texts)
    assert (got == ref(texts).numpy()).all()
    assert got[0, -1] == short.eot_token_id and got.shape == (2, 32)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipTokenizer(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(VOCAB, context_length=1)


def test_word_cache_is_bounded_and_evicts_without_changing_tokens(reference):
    """Arbitrary user labels cannot grow the BPE word cache past its bound, and a word tokenizes the same
    whether it is cached, evicted or new (checked against open_clip's tokenizer)."""
    small = ClipTokenizer(VOCAB, context_length=77, cache_size=100)
    rng = np.random.RandomState(1)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.randint(4, 12))) for _ in range(1000)]
    texts = [" ".join(words[i : i + 10]) for i in range(0, 1000, 10)]
    first = small(texts)
    info = small._bpe.cache_info()
    assert info.currsize == 100 and info.maxsize == 100 and info.misses >= 900
    assert (small(texts) == first).all() and (first == reference(texts).numpy()).all()
