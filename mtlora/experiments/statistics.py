"""Seeds and items: mean +- std over seeds, and a paired bootstrap interval for a row against the baseline.

The verdict rule is fixed before any run: a difference is "supported" when its 95% interval lies above
0, "not supported" when it lies below 0 or inside +-0.5 points, and "inconclusive" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NEGLIGIBLE = 0.005  # +-0.5 points: a difference inside this band is "not supported" even when it is real
VERDICT_RULE = (f"supported: the 95% interval of the paired difference is above 0; not supported: below 0 or inside "
                f"+-{100 * NEGLIGIBLE:.1f} points; inconclusive otherwise")
BOOTSTRAP_SAMPLES = 2000


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def grouped_mean(scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Score of each row of ``scores`` (..., N): the mean over items, or over groups of the per-group means."""
    if groups is None:
        return scores.mean(axis=-1)
    labels = np.unique(groups)
    return np.stack([scores[..., groups == label].mean(axis=-1) for label in labels], axis=-1).mean(axis=-1)


def paired_bootstrap(row: np.ndarray, baseline: np.ndarray, groups: np.ndarray | None = None,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Difference row - baseline of a suite's score, with a percentile interval from a seeded bootstrap.

    ``row`` and ``baseline`` are (seeds, items) 0/1 (or real) item scores, paired by seed index and item.
    Each bootstrap draw resamples the seeds and, within each group (task or subject: the unit the
    suite's average is taken over), the items; the score is the mean over groups of the group means
    (``groups`` None: the mean over items).
    """
    row, baseline = np.asarray(row, dtype=float), np.asarray(baseline, dtype=float)
    if row.shape != baseline.shape:
        raise ValueError(f"paired scores need the same shape, got {row.shape} and {baseline.shape}")
    rng = np.random.default_rng(seed)
    difference = row - baseline  # (S, N)
    observed = float(grouped_mean(difference, groups).mean())
    num_seeds = difference.shape[0]
    members = [np.flatnonzero(groups == label) for label in np.unique(groups)] if groups is not None else \
        [np.arange(difference.shape[1])]
    draws = np.empty(samples)
    for b in range(samples):
        chosen_seeds = rng.integers(0, num_seeds, num_seeds)
        picked = difference[chosen_seeds]
        group_means = [picked[:, rng.choice(index, len(index))].mean(axis=1) for index in members]
        draws[b] = np.mean(group_means)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {"difference": observed, "low": float(low), "high": float(high), "level": level, "samples": samples,
            "seeds": num_seeds, "items": int(difference.shape[1]), "verdict": verdict(float(low), float(high))}


def verdict(low: float, high: float) -> str:
    """supported: the interval is above 0; not supported: below 0 or inside +-0.5 points; else inconclusive
    (the rules are applied in that order)."""
    if low > 0:
        return "supported"
    if high < 0 or (low > -NEGLIGIBLE and high < NEGLIGIBLE):
        return "not supported"
    return "inconclusive"


def format_mean_std(mean: float | None, std: float | None, scale: float = 100.0) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{scale * mean:.1f}" if std is None else f"{scale * mean:.1f} ± {scale * std:.1f}"
