"""Term shares: how much each term contributed to one class's logit, as a fraction of the total.

share[t] = |contributions[t, c]| / sum_t |contributions[t, c]| at the explained class c: a length-T
vector that sums to 1 (all zeros stays zeros). `/explain`, `/embed`, folder scoring and the drift
monitor all report these numbers.
"""
from __future__ import annotations

import numpy as np


def term_shares(contributions: np.ndarray, class_index: np.ndarray | None = None) -> np.ndarray:
    """Per-term absolute shares at one class per image.

    contributions: float `[B, T, C]` (the graph's `contributions` output).
    class_index: int `[B]`, the class whose logit is explained (default: argmax of the summed logits).
    Returns float64 `[B, T]`, rows summing to 1 (a row of zeros stays zeros).
    """
    c = np.asarray(contributions, dtype=np.float64)
    if c.ndim != 3:
        raise ValueError(f"contributions must be [B, T, C], got shape {c.shape}")
    if class_index is None:
        class_index = c.sum(axis=1).argmax(axis=1)
    idx = np.asarray(class_index, dtype=np.int64)
    picked = np.abs(c[np.arange(c.shape[0]), :, idx])  # [B, T]
    total = picked.sum(axis=1, keepdims=True)
    return np.divide(picked, total, out=np.zeros_like(picked), where=total > 0)
