"""The folder of one editing run: what the run is, what it found, and everything its future depends on.

A run folder holds

- ``run.json``: the run's *identity* (spec, hyperparameters, edited layers, case ids, evaluators, a
  fingerprint of the model's weights at the start, the source of the editor and regularizer code),
  how far it got and, for a run whose checkpoint weights other runs may use, the key of its chain of
  edits (:mod:`kelib.chains`). Written last, so it is the commit marker of a checkpoint.
- ``results.csv``: the tidy table so far.
- ``state.pt`` (while a sequential run is unfinished): what the rest of the run depends on: the edited
  weights, the regularizer's and editor's state, the run's context templates and the random-number
  states (torch, CUDA, numpy, random). Restoring it makes a resumed run compute exactly what the
  uninterrupted run would have.
- ``templates.json``: the context templates the run sampled (for reading; ``state.pt`` has them too).
- ``examples/<checkpoint>.json``: per-example scores of the edits and evaluators at each checkpoint
  (:mod:`kelib.examples`), what :mod:`kelib.verdicts` bootstraps over.
- ``final_weights.pt`` (a finished sequential run): the edited layers' weights, as evaluated.
- ``checkpoint_weights/<checkpoint>.pt`` (sequential runs whose edited matrices are small, see
  :data:`kelib.runner.CHECKPOINT_WEIGHTS_LIMIT`): the edited layers' weights at each checkpoint, as
  the chain of edits left them (before any evaluation view), for re-evaluation (:mod:`kelib.ablations`).

Every file is written atomically. A folder whose identity differs from the run asked for is never
resumed: :class:`RunMismatch` says what changed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from kelib.examples import write_examples
from kelib.io import _jsonable as to_jsonable
from kelib.io import atomic_path, read_json, sha256_file, stable_hash, write_json

# Bumped when what a run folder holds, or what a run's numbers depend on, changes in a way the
# identity does not capture: an older folder is then refused, not mixed with new rows. 3: evaluations
# leave the random-number generators as they found them (rng_untouched).
RUN_FORMAT = 3

COLUMNS = ["checkpoint", "scope", "layer", "metric", "value"]
CHECKPOINT_WEIGHTS_DIR = "checkpoint_weights"


class RunMismatch(ValueError):
    """A run folder that holds another run than the one asked for."""


def code_identity(*modules: str) -> dict[str, str]:
    """sha256 of the source files of ``modules`` and of the kelib editor/regularizer modules they use.

    A resumed run must come from the same code as its first half: a changed editor may compute other
    updates for the same inputs."""
    seen: dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        module = importlib.import_module(name)
        seen[name] = sha256_file(inspect.getsourcefile(module))[:16]
        for value in vars(module).values():
            used = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(used, str) and used.startswith(("kelib.editors", "kelib.regularizers")):
                todo.append(used)
    return dict(sorted(seen.items()))


def describe_changes(saved: Any, current: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like identities (``hparams.v_lr: 0.5 -> 0.1``)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        changes = []
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved:
                changes.append(f"{where}: (absent) -> {_short(current[key])}")
            elif key not in current:
                changes.append(f"{where}: {_short(saved[key])} -> (absent)")
            else:
                changes += describe_changes(saved[key], current[key], where)
        return changes
    if saved == current:
        return []
    if isinstance(saved, list) and isinstance(current, list) and len(saved) > 5:
        differ = sum(a != b for a, b in zip(saved, current)) + abs(len(saved) - len(current))
        return [f"{path}: {len(saved)} -> {len(current)} entries, {differ} differ"]
    return [f"{path}: {_short(saved)} -> {_short(current)}"]


def _short(value: Any, at_most: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= at_most else text[: at_most - 3] + "..."


# -- random-number state ----------------------------------------------------------------------


def rng_state() -> dict:
    """The states of every random-number generator a run may draw from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed every generator for the block, then give the caller back the states it had: a run draws
    the same numbers whatever ran before it in the process, and leaves the caller's draws alone."""
    with rng_untouched():
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        yield


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Every generator leaves the block in the state it entered it: the runner evaluates in one, so
    the edits after a checkpoint draw the same numbers whatever was evaluated there (lm-eval seeds
    the generators itself), and a run's chain of edits does not depend on its checkpoints."""
    before = rng_state()
    try:
        yield
    finally:
        set_rng_state(before)


# -- the folder ---------------------------------------------------------------------------------


class RunStore:
    """Reads and writes one run folder (``out_dir=None``: a run kept in memory only)."""

    def __init__(self, out_dir: str | Path | None, identity: dict, chain: str | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.chain = chain  # the run's chain of edits (kelib.chains), written to run.json for other runs to find
        # through JSON once, so the identity compares equal to the one read back from run.json
        self.identity = json.loads(json.dumps({"format": RUN_FORMAT, **identity}, sort_keys=True, default=to_jsonable))
        self.fingerprint = stable_hash(self.identity)

    def saved(self) -> dict | None:
        """``run.json`` of this same run, or None when the folder holds none.

        Raises :class:`RunMismatch` when the folder holds another run (naming what changed)."""
        if self.out_dir is None or not (self.out_dir / "run.json").exists():
            return None
        info = read_json(self.out_dir / "run.json")
        if info.get("fingerprint") == self.fingerprint:
            return info
        saved = info.get("identity")
        if saved is None or saved.get("format") != RUN_FORMAT:
            raise RunMismatch(
                f"{self.out_dir} was written by an older kelib (run format {saved and saved.get('format')}, "
                f"now {RUN_FORMAT}); its rows cannot be trusted to continue this run: delete it or choose "
                "another out_dir"
            )
        changes = describe_changes(saved, self.identity)
        raise RunMismatch(
            f"{self.out_dir} holds a different run; refusing to resume it with other inputs. Changed: "
            + "; ".join(changes[:12]) + (f"; and {len(changes) - 12} more" if len(changes) > 12 else "")
            + ". Choose another out_dir or delete it."
        )

    def rows(self) -> list[dict]:
        table = pd.read_csv(self.out_dir / "results.csv")
        return [{**r, "layer": None if pd.isna(r["layer"]) else int(r["layer"])} for r in table.to_dict("records")]

    def state(self) -> dict | None:
        """The saved state of an unfinished sequential run (None before its first checkpoint)."""
        path = self.out_dir / "state.pt"
        return torch.load(path, weights_only=False) if path.exists() else None

    def save(self, rows: list[dict], done: int, complete: bool, state: dict | None = None,
             final_weights: dict | None = None, templates: dict | None = None,
             examples: dict[int, dict] | None = None,
             checkpoint_weights: dict[int, dict] | None = None) -> None:
        """Write examples, state, templates, weights, results, then ``run.json`` (the commit marker).

        ``examples``: ``{checkpoint: {scope: {metric: Sample}}}`` of the checkpoint being saved."""
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for checkpoint, by_scope in (examples or {}).items():
            write_examples(self.out_dir, checkpoint, by_scope)
        if state is not None:
            with atomic_path(self.out_dir / "state.pt") as tmp:
                torch.save(state, tmp)
        if templates:
            write_json(self.out_dir / "templates.json", templates)
        for checkpoint, weights in (checkpoint_weights or {}).items():
            path = checkpoint_weights_path(self.out_dir, checkpoint)
            path.parent.mkdir(exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(weights, tmp)
        if final_weights is not None:
            with atomic_path(self.out_dir / "final_weights.pt") as tmp:
                torch.save(final_weights, tmp)
        with atomic_path(self.out_dir / "results.csv") as tmp:
            pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)
        info = {"identity": self.identity, "fingerprint": self.fingerprint, "done": done, "complete": complete}
        if self.chain is not None:
            info["chain"] = self.chain
        write_json(self.out_dir / "run.json", info)
        if complete and (self.out_dir / "state.pt").exists():
            (self.out_dir / "state.pt").unlink()


def checkpoint_weights_path(run_dir: str | Path, checkpoint: int) -> Path:
    """Where a sequential run keeps the edited layers' weights at ``checkpoint`` (see the module docstring)."""
    return Path(run_dir) / CHECKPOINT_WEIGHTS_DIR / f"{int(checkpoint)}.pt"


def read_checkpoint_weights(run_dir: str | Path, checkpoint: int) -> dict[int, torch.Tensor] | None:
    """The edited layers' weights a sequential run kept at ``checkpoint`` (on the CPU), or None when
    it kept none there (matrices too large, or a run made before they were kept)."""
    path = checkpoint_weights_path(run_dir, checkpoint)
    return torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None


def editor_module(editor) -> str:
    """The module defining an editor's ``compute_update`` (through the wrapper ``register`` adds)."""
    return inspect.unwrap(editor.compute_update).__module__
