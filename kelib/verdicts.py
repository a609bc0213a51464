"""Verdicts that can say no: a claim, a paired bootstrap 95% interval, and one of three outcomes.

A notebook's comparison (an ability before vs after editing, a regularizer vs its editor alone) is
judged on the same examples measured twice: the interval is a percentile bootstrap of the mean
paired difference, resampling examples (or edit cases) with replacement, with a fixed seed. Then:

- ``holds``: the interval lies wholly on the claimed side of the threshold (0 for a difference);
- ``does not hold``: it lies wholly on the other side;
- ``no detectable effect``: it contains the threshold.

So a regularizer that changes nothing, or a drop smaller than the noise of 100 examples, is not
counted for a claim. Comparisons without sampling noise (a condition number, an L1 curve) have
their own rules: :func:`compare_values` (a relative tolerance decides "no detectable effect") and
:func:`norm_flattens` (D4S's L1 growth must slow down, and stay below its editor's).

    verdict = compare("ROME lowers skill_topic", before, after, "lower")
    print(verdict)  # ROME lowers skill_topic: -0.070 [-0.120, -0.020] (95%, n=100): holds
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

from kelib.examples import Sample

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
NO_EFFECT = "no detectable effect"
OUTCOMES = (HOLDS, DOES_NOT_HOLD, NO_EFFECT)

Direction = Literal["higher", "lower"]
N_RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap interval."""

    estimate: float
    low: float
    high: float
    n: int  # examples per resample (summed over metrics when pooled)
    level: float = LEVEL


@dataclass(frozen=True)
class Verdict:
    """A claim, the evidence and the outcome; ``str()`` is the line a notebook prints."""

    claim: str
    outcome: str
    estimate: float
    low: float
    high: float
    n: int | None = None  # None: no sampling (a deterministic comparison)
    detail: str = ""  # how the numbers read ("log-ratio", "relative change", growths...)

    @property
    def holds(self) -> bool:
        return self.outcome == HOLDS

    def __str__(self) -> str:
        if self.n is None:
            evidence = self.detail or f"{self.estimate:+.3g}"
        else:
            evidence = (f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}] "
                        f"({LEVEL:.0%} CI, n={self.n}{', ' + self.detail if self.detail else ''})")
        return f"{self.claim}: {evidence}: {self.outcome}"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# The bootstrap


def _as_sample(x) -> Sample:
    return x if isinstance(x, Sample) else Sample(np.asarray(x, dtype=float))


def _paired(before, after) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(before values, after values, weights)`` aligned example by example."""
    b, a = _as_sample(before), _as_sample(after)
    if b.ids is not None and a.ids is not None and b.ids != a.ids:
        if sorted(map(str, b.ids)) != sorted(map(str, a.ids)):
            raise ValueError("the two samples score different examples: they cannot be paired")
        order = {str(i): k for k, i in enumerate(a.ids)}
        idx = [order[str(i)] for i in b.ids]
        a = Sample(a.values[idx], None if a.weights is None else a.weights[idx], b.ids, a.log, a.higher_is_better)
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same examples: {len(b)} before, {len(a)} after")
    if len(b) == 0:
        raise ValueError("no examples to compare")
    if a.log != b.log:
        raise ValueError("one sample is on the log scale and the other is not")
    wb, wa = b._w, a._w
    if not np.allclose(wb, wa):
        raise ValueError("the two samples weight the same examples differently")
    return b.values, a.values, wb


def _draws(n: int, n_resamples: int, rng: np.random.Generator, chunk: int = 1000):
    """Index arrays ``[chunk, n]`` of resamples with replacement (chunked to bound memory)."""
    for lo in range(0, n_resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_resamples - lo), n))


def _statistic(b, a, w, statistic: str) -> float:
    if statistic == "difference":
        return float(np.sum(w * (a - b)) / np.sum(w))
    if statistic == "ratio":
        den = np.sum(w * b)
        return float(np.sum(w * a) / den) if den else math.nan
    raise ValueError(f"unknown statistic {statistic!r}; use difference or ratio")


def _resampled(b, a, w, statistic: str, n_resamples: int, rng) -> np.ndarray:
    out = []
    for idx in _draws(len(b), n_resamples, rng):
        wi = w[idx]
        if statistic == "difference":
            out.append(np.sum(wi * (a[idx] - b[idx]), 1) / np.sum(wi, 1))
        else:
            den = np.sum(wi * b[idx], 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                out.append(np.where(den != 0, np.sum(wi * a[idx], 1) / den, np.nan))
    return np.concatenate(out)


def _interval(estimate: float, resampled: np.ndarray, n: int, level: float) -> Interval:
    resampled = resampled[np.isfinite(resampled)]
    if not len(resampled):
        return Interval(estimate, math.nan, math.nan, n, level)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), n, level)


def paired_bootstrap(before, after, statistic: str = "difference", n_resamples: int = N_RESAMPLES,
                     level: float = LEVEL, seed: int = SEED) -> Interval:
    """Percentile bootstrap interval of ``after`` vs ``before`` on the same examples.

    ``statistic``: ``difference``, the (weighted) mean of after − before; or ``ratio``, mean(after) /
    mean(before) (RECT's "keeps 94% of editing performance"). Examples are resampled in pairs, so the
    interval reflects how consistently the examples moved, not how much they differ from each other.
    ``before`` and ``after`` are :class:`~kelib.examples.Sample` (or plain arrays).
    """
    b, a, w = _paired(before, after)
    rng = np.random.default_rng(seed)
    return _interval(_statistic(b, a, w, statistic), _resampled(b, a, w, statistic, n_resamples, rng),
                     len(b), level)


def pooled_bootstrap(pairs: Sequence[tuple], n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                     seed: int = SEED) -> Interval:
    """Interval of the mean over metrics of each metric's mean paired difference (the notebooks'
    "mean ability"), resampling the examples of each metric on their own (a stratified bootstrap)."""
    if not pairs:
        raise ValueError("no metrics to pool")
    rng = np.random.default_rng(seed)
    estimates, resamples, n = [], [], 0
    for before, after in pairs:
        b, a, w = _paired(before, after)
        estimates.append(_statistic(b, a, w, "difference"))
        resamples.append(_resampled(b, a, w, "difference", n_resamples, rng))
        n += len(b)
    return _interval(float(np.mean(estimates)), np.mean(resamples, axis=0), n, level)


def outcome(interval: Interval, direction: Direction, threshold: float = 0.0) -> str:
    """``holds`` when the interval lies wholly on the ``direction`` side of ``threshold``, ``does not
    hold`` when wholly on the other side, ``no detectable effect`` when it contains it."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be higher or lower, got {direction!r}")
    if math.isnan(interval.low) or math.isnan(interval.high):
        return NO_EFFECT
    above, below = interval.low > threshold, interval.high < threshold
    if above:
        return HOLDS if direction == "higher" else DOES_NOT_HOLD
    if below:
        return HOLDS if direction == "lower" else DOES_NOT_HOLD
    return NO_EFFECT


# ---------------------------------------------------------------------------------------------
# Claims


def compare(claim: str, before, after, direction: Direction, threshold: float | None = None,
            statistic: str = "difference", **bootstrap) -> Verdict:
    """Judge "``after`` is ``direction`` than ``before``" (or, with ``statistic="ratio"``, "the
    ratio after / before is ``direction`` than ``threshold``") on paired examples."""
    if threshold is None:
        threshold = 0.0 if statistic == "difference" else 1.0
    interval = paired_bootstrap(before, after, statistic, **bootstrap)
    log = _as_sample(before).log
    detail = "log-ratio" if log and statistic == "difference" else ("ratio" if statistic == "ratio" else "")
    return Verdict(claim, outcome(interval, direction, threshold), interval.estimate, interval.low,
                   interval.high, interval.n, detail)


def compare_pooled(claim: str, pairs: Sequence[tuple], direction: Direction, **bootstrap) -> Verdict:
    """Judge the mean over metrics of the paired differences (see :func:`pooled_bootstrap`)."""
    interval = pooled_bootstrap(pairs, **bootstrap)
    return Verdict(claim, outcome(interval, direction), interval.estimate, interval.low, interval.high,
                   interval.n, f"mean of {len(pairs)} metrics")


def compare_values(claim: str, value: float, reference: float, direction: Direction, rtol: float = 0.01) -> Verdict:
    """Judge "``value`` is ``direction`` than ``reference``" for numbers without sampling noise (a
    condition number's growth): a relative change within ``rtol`` is no detectable effect, so a
    regularizer that does nothing (or only rounds, as an SVD round trip does) does not pass."""
    if not math.isfinite(value) or not math.isfinite(reference) or reference == 0:
        return Verdict(claim, NO_EFFECT, math.nan, math.nan, math.nan, None, "undefined")
    change = value / reference - 1
    point = Interval(change, change, change, 0)
    verdict = outcome(point, direction, 0.0) if abs(change) > rtol else NO_EFFECT
    return Verdict(claim, verdict, change, change, change, None,
                   f"{value:.4g} vs {reference:.4g} ({change:+.1%}; within ±{rtol:.0%} counts as no effect)")


def growth_halves(checkpoints: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Growth of ``values`` over the first and the second half of the run, relative to the start:
    ``(v(mid) − v(0), v(end) − v(mid)) / v(0)``, with v(mid) interpolated between checkpoints."""
    order = np.argsort(np.asarray(checkpoints, dtype=float))
    x = np.asarray(checkpoints, dtype=float)[order]
    y = np.asarray(values, dtype=float)[order]
    if len(x) < 2 or x[0] == x[-1]:
        raise ValueError("growth over halves needs at least two checkpoints")
    mid = float(np.interp((x[0] + x[-1]) / 2, x, y))
    scale = abs(y[0]) or 1.0
    return float((mid - y[0]) / scale), float((y[-1] - mid) / scale)


def norm_flattens(claim: str, checkpoints: Sequence[float], norms: Sequence[float],
                  editor_checkpoints: Sequence[float], editor_norms: Sequence[float]) -> Verdict:
    """D4S "bounds the norm": its L1 growth over the second half of the run is below its growth over
    the first half (the curve flattens) *and* below its editor's second-half growth. Ending lower
    than the editor is not enough: a norm that grows more slowly but steadily is not bounded."""
    first, second = growth_halves(checkpoints, norms)
    _, editor_second = growth_halves(editor_checkpoints, editor_norms)
    holds = second < first and second < editor_second
    detail = (f"growth first half {first:+.3g}, second half {second:+.3g}; "
              f"editor's second half {editor_second:+.3g} (relative to the start)")
    return Verdict(claim, HOLDS if holds else DOES_NOT_HOLD, second, second, second, None, detail)


def ability_verdicts(label: str, before: Mapping[str, Sample], after: Mapping[str, Sample],
                     claimed: Literal["worse", "better"], pooled: str = "mean ability") -> list[Verdict]:
    """Per-metric verdicts that ``after`` scores ``claimed`` than ``before`` on the same examples,
    then one on the mean over the accuracy-like metrics (higher is better, not on a log scale: the
    notebooks' "mean ability"). Metrics missing on either side are skipped."""
    verdicts, pairs = [], []
    for metric in sorted(set(before) & set(after)):
        b, a = before[metric], after[metric]
        lower = b.higher_is_better == (claimed == "worse")
        word = {True: "lowers", False: "raises"}[lower]
        verdicts.append(compare(f"{label} {word} {metric}", b, a, "lower" if lower else "higher"))
        if b.higher_is_better and not b.log:
            pairs.append((b, a))
    if pairs:
        word = "lowers" if claimed == "worse" else "raises"
        verdicts.append(compare_pooled(f"{label} {word} the {pooled}", pairs,
                                       "lower" if claimed == "worse" else "higher"))
    return verdicts
