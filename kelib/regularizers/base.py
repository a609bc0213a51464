"""The regularizer interface: transform an editor's updates, possibly keeping state across edits.

A regularizer sees every edit of a run in order. The runner calls, around each edit:

    with reg.editing(model):             # the weights the editor should see (D4S: the original W_0)
        result = editor(...)
    update = reg.transform(result, model)  # {layer: ΔW} to add to the current weights

and ``with reg.evaluation_view(model):`` around every evaluation (post-hoc PRUNE evaluates
W_0 + F(W_n - W_0) without changing the unrestrained chain of edits). ``originals`` are the edited
layers' weights before the first edit of the run (W_0, ``d_out x d_in``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from kelib.editors.base import EditResult


class Regularizer:
    """Identity: the editor's update unchanged (the "none" row of every table)."""

    name = "none"

    def __init__(self, params=None):
        self.params = params
        self.originals: dict[int, torch.Tensor] = {}
        self.stats = None

    def start(self, model, originals: dict[int, torch.Tensor], stats) -> None:
        self.originals, self.stats = originals, stats

    @contextlib.contextmanager
    def editing(self, model) -> Iterator[None]:
        yield

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        return dict(result.deltas)

    @contextlib.contextmanager
    def evaluation_view(self, model) -> Iterator[None]:
        yield

    @property
    def changes_edits(self) -> bool:
        """Whether the regularizer changes the chain of edits (the weights after each edit), not only
        the evaluated view. Runs that differ only in a regularizer that does not change it share one
        chain (:mod:`kelib.chains`). A subclass changes it unless it says otherwise."""
        return type(self) is not Regularizer

    def editor_overrides(self) -> dict:
        """Editor hyperparameters this regularizer needs (e.g. D4S's residual spread)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
