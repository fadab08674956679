"""The vocabulary the atlas matches feature directions against: the label set plus general English words.

Default words: Debian's WordNet (`wordnet-base`, /usr/share/wordnet): single-word nouns and
adjectives of three letters or more whose senses were tagged at least `min_count` times in the SemCor
corpus (`cntlist.rev`),
a frequency cut that keeps common words (min_count 5: ~4,400 words) and drops rare ones. Or a user
file (`--vocab`): one entry per line, `#` comments.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_MIN_COUNT = 5
MAX_ENTRY_CHARS = 60
MIN_CHARS = 3  # WordNet's one- and two-letter lemmas are mostly symbols and abbreviations (g, mm, ab)


class VocabError(ValueError):
    """The vocabulary cannot be read; the message says what to install or pass."""


def wordnet_words(min_count: int = DEFAULT_MIN_COUNT, root: Path = WORDNET_DIR) -> list[str]:
    """Single-word nouns and adjectives of WordNet with a SemCor tag count >= `min_count`, most frequent first."""
    path = root / "cntlist.rev"
    if not path.is_file():
        raise VocabError(f"WordNet not found ({path} missing): install Debian's package (`apt-get install -y wordnet-base`, "
                         f"`make setup` does it when run as root) or pass --vocab FILE")
    counts: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 3 or "%" not in parts[0]:
            continue
        lemma, _, sense = parts[0].partition("%")
        # sense key lex_sense starts with the synset type: 1 noun, 3 adjective, 5 adjective satellite
        if sense[:1] in ("1", "3", "5") and lemma.isalpha() and lemma.isascii() and len(lemma) >= MIN_CHARS:
            counts[lemma.lower()] += int(parts[2])
    return [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]


def read_vocab_file(path: str | Path) -> list[str]:
    """Entries of a vocabulary file: one per line, stripped, `#` comments and blank lines skipped."""
    p = Path(path)
    if not p.is_file():
        raise VocabError(f"argument --vocab: {p} does not exist")
    words = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise VocabError(f"argument --vocab: {p} has no entries (one per line)")
    long = [w for w in words if len(w) > MAX_ENTRY_CHARS]
    if long:
        raise VocabError(f"argument --vocab: entries are limited to {MAX_ENTRY_CHARS} characters; {long[0][:40]!r}... is longer")
    return words


def build_vocab(labels: Sequence[str], vocab_file: str | Path | None = None, min_count: int = DEFAULT_MIN_COUNT) -> tuple[list[str], str]:
    """(words, source description): the label set first, then the file's or WordNet's words, without duplicates
    (case-insensitive)."""
    extra = read_vocab_file(vocab_file) if vocab_file else wordnet_words(min_count)
    source = f"labels + file {Path(vocab_file).name}" if vocab_file else f"labels + WordNet 3.0 nouns/adjectives (SemCor count >= {min_count})"
    seen: set[str] = set()
    words: list[str] = []
    for w in [*labels, *extra]:
        key = w.strip().lower()
        if key and key not in seen:
            seen.add(key)
            words.append(w.strip())
    return words, source
