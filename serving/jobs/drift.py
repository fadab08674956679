"""Drift monitoring on per-layer contribution shares (numpy only).

For each image the explainer graph gives `contributions [T, C]` (one row per term, in the bundle's
`term_names` order: `embed`, `attn.i`, `clt.i`, `bias`, `error`). The *share* of term t is
`|contributions[t, c*]| / sum_t |contributions[t, c*]|` at the predicted class c*: a length-T vector
that sums to 1 and says how much each layer contributed to the decision.

A `DriftProfile` stores the mean and standard deviation of every term's share over reference data.
A `DriftMonitor` keeps a sliding window of recent shares and scores each term by its *mean shift*

    score_t = |mean_window(share_t) - mean_ref(share_t)| / max(std_ref(share_t), STD_FLOOR)

i.e. how many reference standard deviations the window mean has moved (a standardised effect size;
on data like the reference it shrinks like ~0.8 / sqrt(window size)). The overall score is the
largest per-term score. Scores are exposed as dicts (for JSONL records) and as Prometheus metrics.

A profile may also hold the reference's *class mix*: the fraction `q_c` of reference images
predicted as each of the bundle's labels, with half an image of prior per class (CLASS_PRIOR). The class mix is scored with the same mean shift, the
share being the indicator "predicted c" (mean `q_c`, standard deviation `sqrt(q_c (1 - q_c))`):
`class_score_c = |p_c - q_c| / max(sqrt(q_c (1 - q_c)), STD_FLOOR)` for a window's class fractions `p_c`.
`meta["bundle"]` (the sha256 of the bundle's fp32 graph) and `meta["labels"]` say which bundle
and label set a profile was made for; `check_bundle` refuses another bundle's profile. The HTTP
service exports the sufficient statistics of these scores as counters, and the window is taken
in Prometheus (serving/metrics.py, monitoring/, docs/monitoring.md).

`cltvit-drift` (serving/jobs/cli.py) saves profiles and scores results files with these classes.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bundle.atomic import write_text_atomic

PROFILE_FORMAT = "cltvit-drift-profile"
PROFILE_VERSION = 1
STD_FLOOR = 1e-3  # shares are in [0, 1]; below this spread a term is treated as constant
DEFAULT_WINDOW = 500
CLASS_PRIOR = 0.5  # pseudo-images per class added to a reference's class counts


class DriftError(ValueError):
    """A profile or a shares array is malformed or does not match; the message says which."""


def _as_shares(shares: np.ndarray | Sequence[Sequence[float]], n_terms: int) -> np.ndarray:
    arr = np.asarray(shares, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n_terms:
        raise DriftError(f"shares must be [N, {n_terms}] (one column per term), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DriftError("shares contain NaN or infinity")
    return arr


@dataclass(frozen=True)
class DriftProfile:
    """Reference statistics of per-term shares: `mean[T]`, `std[T]` over `count` images."""

    term_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    count: int
    meta: dict[str, Any] | None = None
    classes: tuple[str, ...] = ()  # the label set whose class mix is kept (empty: no class mix)
    class_mean: np.ndarray | None = None  # [C] fraction of reference images predicted as each class

    @classmethod
    def from_shares(cls, shares: np.ndarray, term_names: Sequence[str], meta: dict[str, Any] | None = None,
                    predicted: Sequence[str] | None = None, classes: Sequence[str] | None = None) -> DriftProfile:
        """Profile of `shares [N, T]` (N >= 2 images); with `predicted` (N labels) and `classes` (the label
        set they were predicted from) also the class mix."""
        arr = _as_shares(shares, len(term_names))
        if arr.shape[0] < 2:
            raise DriftError(f"a reference profile needs at least 2 images, got {arr.shape[0]}")
        names: tuple[str, ...] = ()
        class_mean = None
        if predicted is not None and classes is not None:
            names = tuple(classes)
            if len(predicted) != arr.shape[0]:
                raise DriftError(f"{len(predicted)} predicted labels for {arr.shape[0]} share rows")
            index = {c: i for i, c in enumerate(names)}
            unknown = sorted(set(predicted) - set(index))
            if unknown:
                raise DriftError(f"predicted labels {unknown[:5]} are not in the label set")
            counts = np.bincount([index[p] for p in predicted], minlength=len(names))
            # half an image of prior per class (Jeffreys): a finite reference cannot say a class never
            # occurs, and q_c = 0 would make one such image an unbounded score
            class_mean = (counts + CLASS_PRIOR) / (len(predicted) + CLASS_PRIOR * len(names))
        return cls(tuple(term_names), arr.mean(axis=0), arr.std(axis=0, ddof=1), int(arr.shape[0]), meta, names, class_mean)

    @property
    def scale(self) -> np.ndarray:
        """`[T]` the denominator of the term scores: the reference std, floored at STD_FLOOR."""
        return np.maximum(self.std, STD_FLOOR)

    @property
    def class_scale(self) -> np.ndarray:
        """`[C]` the denominator of the class scores: sqrt(q (1 - q)), floored at STD_FLOOR."""
        q = self.class_mean if self.class_mean is not None else np.zeros(0)
        return np.maximum(np.sqrt(q * (1.0 - q)), STD_FLOOR)

    def class_scores(self, counts: np.ndarray) -> np.ndarray:
        """`[C]` mean-shift scores of a window's class counts `[C]` (zeros when the window is empty)."""
        counts = np.asarray(counts, dtype=np.float64)
        if self.class_mean is None or counts.shape != self.class_mean.shape:
            raise DriftError(f"class counts must be [{len(self.classes)}], got shape {counts.shape}")
        total = counts.sum()
        if total <= 0:
            return np.zeros(len(self.classes))
        return np.abs(counts / total - self.class_mean) / self.class_scale

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "count": self.count,
            "terms": {t: {"mean": float(m), "std": float(s)} for t, m, s in zip(self.term_names, self.mean, self.std)},
            "meta": self.meta or {},
        }
        if self.class_mean is not None:
            data["classes"] = {c: float(q) for c, q in zip(self.classes, self.class_mean)}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> DriftProfile:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise DriftError(f"{source} is not a drift profile (expected \"format\": \"{PROFILE_FORMAT}\")")
        if data.get("version") != PROFILE_VERSION:
            raise DriftError(f"{source} has profile version {data.get('version')!r}; this code reads {PROFILE_VERSION}")
        terms = data.get("terms")
        if not isinstance(terms, dict) or not terms:
            raise DriftError(f"{source} has no \"terms\"")
        try:
            names = tuple(terms)
            mean = np.array([float(terms[t]["mean"]) for t in names])
            std = np.array([float(terms[t]["std"]) for t in names])
            count = int(data["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise DriftError(f"{source}: malformed term statistics ({e})") from None
        classes = data.get("classes")
        class_names: tuple[str, ...] = ()
        class_mean = None
        if classes is not None:
            try:
                class_names = tuple(classes)
                class_mean = np.array([float(classes[c]) for c in class_names])
            except (TypeError, ValueError) as e:
                raise DriftError(f"{source}: malformed \"classes\" ({e})") from None
            if not class_names or np.any(class_mean < 0) or abs(class_mean.sum() - 1.0) > 1e-6:
                raise DriftError(f"{source}: \"classes\" must map each label to its fraction of the reference (summing to 1)")
        return cls(names, mean, std, count, data.get("meta") or {}, class_names, class_mean)

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (atomically) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DriftProfile:
        path = Path(path)
        if not path.exists():
            raise DriftError(f"reference profile {path} does not exist")
        if not path.is_file():
            raise DriftError(f"reference profile {path} is not a file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DriftError(f"reference profile {path} is not valid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DriftError(f"reference profile {path} is unreadable ({getattr(e, 'strerror', None) or e})") from None
        return cls.from_dict(data, source=str(path))

    def check_terms(self, term_names: Sequence[str]) -> None:
        """Raise DriftError unless the profile was made for these terms (same names, same order)."""
        if tuple(term_names) != self.term_names:
            raise DriftError(
                f"reference profile terms {list(self.term_names)} do not match the bundle's terms {list(term_names)}"
            )

    def check_bundle(self, term_names: Sequence[str], label_names: Sequence[str], bundle_id: str | None,
                     source: str = "reference profile") -> None:
        """Raise DriftError (one line naming `source` and the mismatch) unless the profile was made for this
        bundle: the same model (`meta["bundle"]`, when the profile records it), terms, and label set."""
        made_for = (self.meta or {}).get("bundle")
        if made_for and bundle_id and made_for != bundle_id:
            raise DriftError(f"{source} was made for another bundle: its model is sha256 {str(made_for)[:12]}..., "
                             f"the served bundle's is {bundle_id[:12]}...")
        if tuple(term_names) != self.term_names:
            extra = [t for t in self.term_names if t not in term_names][:4]
            missing = [t for t in term_names if t not in self.term_names][:4]
            what = (f"its terms {extra} are not the bundle's" if extra else "") + (" and " if extra and missing else "") + \
                (f"the bundle's terms {missing} are not in it" if missing else "") or "its terms are in another order"
            raise DriftError(f"{source} was made for another bundle: {len(self.term_names)} terms against the "
                             f"bundle's {len(term_names)}; {what}")
        if self.class_mean is not None and set(self.classes) != set(label_names):
            extra = sorted(set(self.classes) - set(label_names))[:3]
            missing = sorted(set(label_names) - set(self.classes))[:3]
            raise DriftError(f"{source} was made for another label set: its classes {extra} are not the bundle's "
                             f"labels, and the bundle's {missing} are not among its classes")


def mean_shift(window: np.ndarray, reference: DriftProfile) -> np.ndarray:
    """Per-term mean-shift scores `[T]` of `window [N, T]` against `reference` (see module doc)."""
    arr = _as_shares(window, len(reference.term_names))
    if arr.shape[0] == 0:
        return np.zeros(len(reference.term_names))
    return np.abs(arr.mean(axis=0) - reference.mean) / reference.scale


class DriftMonitor:
    """Sliding window of per-term shares scored against a reference profile (not thread-safe).

    Keeps a running sum, so `update` and `scores` cost O(T) per image whatever the window size.
    """

    def __init__(self, reference: DriftProfile, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise DriftError(f"window must be >= 1, got {window}")
        self.reference = reference
        self.window = window
        self._buf: deque[np.ndarray] = deque()
        self._sum = np.zeros(len(reference.term_names))
        self._since_resum = 0
        self.total = 0

    @property
    def term_names(self) -> tuple[str, ...]:
        return self.reference.term_names

    def update(self, shares: np.ndarray) -> None:
        """Add `shares [N, T]` (or one `[T]` row) to the window."""
        for row in _as_shares(shares, len(self.term_names)):
            self._buf.append(row)
            self._sum += row
            if len(self._buf) > self.window:
                self._sum -= self._buf.popleft()
            self.total += 1
            self._since_resum += 1
            if self._since_resum >= self.window:  # bound floating-point drift of the running sum
                self._sum = np.sum(self._buf, axis=0)
                self._since_resum = 0

    def __len__(self) -> int:
        return len(self._buf)

    def window_mean(self) -> np.ndarray:
        """Mean share per term `[T]` over the window (zeros when empty)."""
        return self._sum / len(self._buf) if self._buf else np.zeros(len(self.term_names))

    def scores(self) -> np.ndarray:
        """Per-term mean-shift scores `[T]` over the current window (zeros when it is empty)."""
        if not self._buf:
            return np.zeros(len(self.term_names))
        return np.abs(self.window_mean() - self.reference.mean) / self.reference.scale

    def summary(self) -> dict[str, Any]:
        """JSON-ready: window size, overall score (max over terms), worst term, per-term scores."""
        s = self.scores()
        worst = int(s.argmax()) if len(self._buf) else None
        return {
            "window": len(self._buf),
            "score": float(s.max()) if len(self._buf) else 0.0,
            "worst_term": self.term_names[worst] if worst is not None else None,
            "scores": {t: round(float(v), 6) for t, v in zip(self.term_names, s)},
        }

    def prometheus(self, prefix: str = "cltvit_drift") -> str:
        """Prometheus text exposition of the current scores (for /metrics or a textfile collector)."""
        s = self.scores()
        window = self.window_mean()
        lines = [
            f"# HELP {prefix}_score Mean shift of the term's contribution share vs the reference, in reference std.",
            f"# TYPE {prefix}_score gauge",
        ]
        lines += [f'{prefix}_score{{term="{t}"}} {v:.6g}' for t, v in zip(self.term_names, s)]
        lines += [
            f"# HELP {prefix}_max_score Largest per-term mean-shift score over the window.",
            f"# TYPE {prefix}_max_score gauge",
            f"{prefix}_max_score {float(s.max()) if self._buf else 0.0:.6g}",
            f"# HELP {prefix}_share_mean Mean contribution share of the term over the window.",
            f"# TYPE {prefix}_share_mean gauge",
        ]
        lines += [f'{prefix}_share_mean{{term="{t}"}} {v:.6g}' for t, v in zip(self.term_names, window)]
        lines += [
            f"# HELP {prefix}_window_images Images in the current window.",
            f"# TYPE {prefix}_window_images gauge",
            f"{prefix}_window_images {len(self._buf)}",
            f"# HELP {prefix}_images_total Images seen by the monitor.",
            f"# TYPE {prefix}_images_total counter",
            f"{prefix}_images_total {self.total}",
        ]
        return "\n".join(lines) + "\n"

    def collector(self, prefix: str = "cltvit_drift") -> Any:
        """A prometheus_client collector of the live scores, for a process's own `/metrics`:
        `prometheus_client.REGISTRY.register(monitor.collector())`."""
        # imported here: a module-level import would load prometheus_client before a BentoML worker sets up
        # its multiprocess metrics directory, and that worker's /metrics would then miss its own metrics
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        monitor = self

        class _DriftCollector:
            def collect(self) -> Iterator[Any]:
                scores, means = monitor.scores(), monitor.window_mean()
                g = GaugeMetricFamily(f"{prefix}_score", "Mean shift of the term's contribution share vs the reference, in reference std.", labels=["term"])
                for t, v in zip(monitor.term_names, scores):
                    g.add_metric([t], float(v))
                yield g
                yield GaugeMetricFamily(f"{prefix}_max_score", "Largest per-term mean-shift score over the window.",
                                        value=float(scores.max()) if len(monitor) else 0.0)
                m = GaugeMetricFamily(f"{prefix}_share_mean", "Mean contribution share of the term over the window.", labels=["term"])
                for t, v in zip(monitor.term_names, means):
                    m.add_metric([t], float(v))
                yield m
                yield GaugeMetricFamily(f"{prefix}_window_images", "Images in the current window.", value=len(monitor))
                yield CounterMetricFamily(f"{prefix}_images", "Images seen by the monitor.", value=monitor.total)

        return _DriftCollector()

    def write_metrics(self, path: str | Path) -> None:
        """Atomically write `prometheus()` to `path` (node_exporter textfile-collector style)."""
        path = Path(path)
        write_text_atomic(path, self.prometheus())


def shares_vector(record: dict[str, Any], term_names: Sequence[str]) -> np.ndarray | None:
    """The `[T]` shares of one result record (`record["shares"]` maps term -> share); None for errors."""
    shares = record.get("shares")
    if record.get("error") or not shares:
        return None
    try:
        return np.array([float(shares[t]) for t in term_names])
    except KeyError as e:
        raise DriftError(f"result for {record.get('path')!r} has no share for term {e.args[0]!r}") from None


def read_result_shares(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Term names and `[N, T]` shares of the successful records of a results JSONL file."""
    names, shares, _ = read_results(path)
    return names, shares


def read_results(path: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Term names, `[N, T]` shares and the N predicted labels of the successful records of a results JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DriftError(f"results file {path} does not exist")
    names: list[str] | None = None
    rows: list[np.ndarray] = []
    labels: list[str] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):
                    break  # torn last line of an interrupted run
                raise DriftError(f"{path}:{n} is not valid JSON") from None
            if names is None and rec.get("shares") and not rec.get("error"):
                names = list(rec["shares"])
            if names is not None:
                v = shares_vector(rec, names)
                if v is not None:
                    rows.append(v)
                    labels.append(str(rec.get("label")))
    if names is None or not rows:
        raise DriftError(f"{path} holds no successful results with \"shares\"")
    return names, np.stack(rows), labels
