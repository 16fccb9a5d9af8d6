"""Bootstrap statistics for an evaluation table (numpy only).

The unit of resampling is the *passage*: each value is one passage's score (e.g. the fraction of
its questions answered correctly), because questions about the same passage are not independent.
Every condition is evaluated on the same passages, so comparisons against the base condition are
*paired*: :func:`paired_difference` resamples the per-passage differences with one set of indices,
which removes the between-passage variance that an unpaired comparison would have to carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Interval", "PairedDifference", "bootstrap_ci", "paired_difference"]


@dataclass(frozen=True)
class Interval:
    """A mean with a bootstrap confidence interval over `n` units."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (JSON-serialisable): mean, low, high, n."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``b - a`` over paired units, its bootstrap CI and a two-sided bootstrap p-value."""

    mean: float
    low: float
    high: float
    n: int
    p_value: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (JSON-serialisable): mean, low, high, n, p_value."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] (p={self.p_value:.3g}, n={self.n})"


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one per-unit value to bootstrap")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_params(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _resampled_means(arr: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` bootstrap resamples of `arr` (one (n_resamples, n) index array)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    return arr[idx].mean(axis=1)


def _percentiles(means: np.ndarray, confidence: float, centre: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    # Guard against floating-point round-off putting the point estimate outside a degenerate interval.
    return min(float(low), centre), max(float(high), centre)


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile bootstrap CI of the mean of per-unit `values`; deterministic given `seed`."""
    _check_params(n_resamples, confidence)
    arr = _as_array(values, "values")
    mean = float(arr.mean())
    if arr.size == 1:
        return Interval(mean=mean, low=mean, high=mean, n=1)
    low, high = _percentiles(_resampled_means(arr, n_resamples, seed), confidence, mean)
    return Interval(mean=mean, low=low, high=high, n=int(arr.size))


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Mean of ``b - a`` over the same units, with a paired bootstrap CI and two-sided p-value.

    Both conditions are resampled with the same indices (equivalently, the per-unit differences
    are resampled). The p-value is ``2 * min(P(d* <= 0), P(d* >= 0))`` over the resampled mean
    differences ``d*``, capped at 1.
    """
    _check_params(n_resamples, confidence)
    arr_a = _as_array(a, "a")
    arr_b = _as_array(b, "b")
    if arr_a.size != arr_b.size:
        raise ValueError(
            f"paired_difference needs the same units in both conditions: len(a)={arr_a.size}, "
            f"len(b)={arr_b.size}"
        )
    diff = arr_b - arr_a
    mean = float(diff.mean())
    means = _resampled_means(diff, n_resamples, seed)
    low, high = _percentiles(means, confidence, mean)
    p_value = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedDifference(mean=mean, low=low, high=high, n=int(diff.size), p_value=p_value)
