"""Per-example scores: what an evaluator can return besides its means, and where a run keeps them.

An evaluator returns ``{metric: mean}``. One that can also say how each example scored returns a
:class:`Scores`: the same dict (code that only iterates it sees the means), with ``examples``
``{metric: Sample}`` beside it. The runner writes them per checkpoint, next to ``results.csv``::

    <run folder>/examples/<checkpoint>.json
    {"<scope>": {"<metric>": {"values": [...], "weights": [...] | null, "ids": [...] | null,
                              "log": false, "higher_is_better": true}}}

with ``<scope>`` the evaluator's name (``abilities``, ``tasks``) or ``edits`` (one value per edit
case). :mod:`kelib.verdicts` bootstraps over these examples, pairing two samples of the same
metric position by position (or by ``ids`` when both have them).

A :class:`Sample`'s mean is its weighted mean of ``values`` (``exp`` of it when ``log``): perplexity
is stored as each paragraph's mean token NLL weighted by its token count, so that the mean of the
sample is the corpus perplexity and a difference of two samples is a log-ratio of perplexities.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kelib.io import write_text

EXAMPLES_DIR = "examples"


@dataclass(frozen=True, eq=False)
class Sample:
    """One metric's per-example scores."""

    values: np.ndarray
    weights: np.ndarray | None = None  # weight of each example in the mean (a paragraph's tokens)
    ids: tuple | None = None  # what each example is (case ids), to pair two samples safely
    log: bool = False  # values are logs of the metric (perplexity: per-paragraph NLL)
    higher_is_better: bool = True

    def __post_init__(self):
        values = np.asarray(self.values, dtype=float)
        object.__setattr__(self, "values", values)
        if self.weights is not None:
            weights = np.asarray(self.weights, dtype=float)
            if weights.shape != values.shape or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("weights must be non-negative, one per value, and not all zero")
            object.__setattr__(self, "weights", weights)
        if self.ids is not None:
            if len(self.ids) != len(values):
                raise ValueError(f"{len(self.ids)} ids for {len(values)} values")
            object.__setattr__(self, "ids", tuple(self.ids))

    def __len__(self) -> int:
        return len(self.values)

    @property
    def _w(self) -> np.ndarray:
        return np.ones_like(self.values) if self.weights is None else self.weights

    @property
    def center(self) -> float:
        """The weighted mean of ``values`` (on the log scale when ``log``)."""
        return float(np.sum(self._w * self.values) / np.sum(self._w))

    @property
    def mean(self) -> float:
        """The metric itself: the weighted mean, exponentiated when ``log`` (perplexity)."""
        return math.exp(self.center) if self.log else self.center

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`center`: sd/√n unweighted; the ratio estimator's linearised
        error sqrt(n/(n−1) Σ w²(x − m)²) / Σ w when weighted (the same formula with w = 1)."""
        n = len(self.values)
        if n < 2:
            return math.nan
        w = self._w
        spread = np.sum(w**2 * (self.values - self.center) ** 2) * n / (n - 1)
        return float(math.sqrt(spread) / np.sum(w))

    def to_json(self) -> dict:
        return {
            "values": self.values.tolist(),
            "weights": None if self.weights is None else self.weights.tolist(),
            "ids": None if self.ids is None else list(self.ids),
            "log": self.log,
            "higher_is_better": self.higher_is_better,
        }

    @classmethod
    def from_json(cls, record: Mapping | Sequence) -> "Sample":
        if not isinstance(record, Mapping):  # a bare list of values
            return cls(np.asarray(record, dtype=float))
        return cls(
            np.asarray(record["values"], dtype=float),
            None if record.get("weights") is None else np.asarray(record["weights"], dtype=float),
            None if record.get("ids") is None else tuple(record["ids"]),
            bool(record.get("log", False)),
            bool(record.get("higher_is_better", True)),
        )


class Scores(dict):
    """``{metric: mean}`` with ``examples`` (``{metric: Sample}``) attached; a plain dict otherwise."""

    def __init__(self, means: Mapping[str, float] = (), examples: Mapping[str, Sample] | None = None):
        super().__init__(means)
        self.examples: dict[str, Sample] = dict(examples or {})

    def to_json(self) -> dict:
        # pairs, not mappings: the metrics keep their order through a JSON writer that sorts keys
        return {"means": [[m, v] for m, v in self.items()],
                "examples": [[m, s.to_json()] for m, s in self.examples.items()]}

    @classmethod
    def from_json(cls, record: Mapping) -> "Scores":
        return cls(dict(record["means"]), {m: Sample.from_json(s) for m, s in record["examples"]})


def examples_of(result: Mapping) -> dict[str, Sample]:
    """The per-example scores an evaluator's result carries (none for a plain dict)."""
    return dict(getattr(result, "examples", None) or {})


def write_examples(run_dir: str | Path, checkpoint: int, by_scope: Mapping[str, Mapping[str, Sample]]) -> Path:
    """Write ``{scope: {metric: Sample}}`` of one checkpoint to ``<run_dir>/examples/<checkpoint>.json``
    (atomically; an existing file for that checkpoint is replaced)."""
    folder = Path(run_dir) / EXAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{int(checkpoint)}.json"
    record = {scope: {m: s.to_json() for m, s in metrics.items()} for scope, metrics in by_scope.items() if metrics}
    write_text(path, json.dumps(record))
    return path


def example_checkpoints(run_dir: str | Path) -> list[int]:
    """Checkpoints of a run that have per-example scores, ascending."""
    folder = Path(run_dir) / EXAMPLES_DIR
    return sorted(int(p.stem) for p in folder.glob("*.json")) if folder.is_dir() else []


def read_examples(run_dir: str | Path, checkpoint: int | None = None) -> dict[str, dict[str, Sample]]:
    """``{scope: {metric: Sample}}`` of one checkpoint (default: the run's last); ``{}`` when the run
    kept none (a run made before the runner wrote them)."""
    if checkpoint is None:
        found = example_checkpoints(run_dir)
        if not found:
            return {}
        checkpoint = found[-1]
    path = Path(run_dir) / EXAMPLES_DIR / f"{int(checkpoint)}.json"
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {scope: {m: Sample.from_json(r) for m, r in metrics.items()} for scope, metrics in raw.items()}
