"""Runs that make the same chain of edits share it: a run takes the weights at its checkpoints from
another run's folder and only evaluates them.

The weights a sequential run reaches after n edits depend on the model, the editor (its code and
hyperparameters), the edited layers, the batch size, the seed, the first n cases, and the regularizer
when it changes the edits (RECT, D4S), not when it changes only the evaluated view (post-hoc PRUNE).
They do not depend on what the run evaluates along the way (its checkpoints, evaluators, how many
edits it scores: evaluations leave the random-number generators as they found them,
:func:`kelib.runstore.rng_untouched`), nor on the edits after the n-th. So a 100-edit run is the first
100 edits of the 1,000-edit run with the same chain, and post-hoc PRUNE's run is the unregularized
chain seen through PRUNE: evaluated at the same weights, its table is the one it would compute, row
for row (tests/test_chains.py).

:func:`chain_key` names a chain (the runner writes it to a run's ``run.json``); :func:`find_chain`
looks in a folder of runs for one with the same chain on the same first cases that kept its weights at
every checkpoint asked for (``checkpoint_weights/``, :mod:`kelib.runstore`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from kelib.io import read_json, stable_hash
from kelib.runstore import checkpoint_weights_path


def chain_key(chain: dict) -> str:
    """The name of a chain of edits described by ``chain`` (plain data: what the weights depend on)."""
    return stable_hash(chain)


def find_chain(runs_dir: str | Path, key: str, case_ids: Sequence[str], checkpoints: Sequence[int],
               exclude: str | Path | None = None) -> Path | None:
    """A run folder in ``runs_dir`` (other than ``exclude``) whose chain is ``key``, whose first cases
    are ``case_ids`` up to the last of ``checkpoints``, and that kept its weights at each of
    ``checkpoints`` (all > 0); None when there is none.

    A folder still being written qualifies: each kept weight file is written whole before its
    checkpoint is committed, and the same chain gives the same weights."""
    runs_dir = Path(runs_dir)
    if not checkpoints or not runs_dir.is_dir():
        return None
    needed = max(checkpoints)
    exclude = Path(exclude).resolve() if exclude is not None else None
    for folder in sorted(p for p in runs_dir.iterdir() if (p / "run.json").is_file()):
        if exclude is not None and folder.resolve() == exclude:
            continue
        try:
            info = read_json(folder / "run.json")
        except (OSError, ValueError):  # a folder another kelib wrote, or a broken one: not a source
            continue
        if info.get("chain") != key:
            continue
        cases = info.get("identity", {}).get("cases", [])
        if len(cases) < needed or list(cases[:needed]) != list(case_ids[:needed]):
            continue
        if all(checkpoint_weights_path(folder, c).is_file() for c in checkpoints):
            return folder
    return None
