"""RECT (Gu et al., EMNLP 2024): keep only the entries of ΔW with the largest relative change.

    δ = |ΔW| / |W|   (element-wise; W the weight the update is added to)

The top ``k`` fraction of entries by δ keep their ΔW values, the rest are set to 0. ``k = 0.2`` is the
paper's and the official code's value (the code zeroes the 80% smallest); AlphaEdit's RECT baseline
used k = 0.4. Exactly ``ceil(k · n)`` entries are kept; ties are broken by position (row-major,
earlier first) so the result is deterministic. Where W = 0, δ counts as very large (|ΔW| / 1e-8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kelib.diagnostics import relative_change
from kelib.editors.base import EditResult
from kelib.models import get_weight, same_device
from kelib.regularizers.base import Regularizer


@dataclass(frozen=True)
class RECTParams:
    k: float = 0.2  # fraction of entries kept (paper: 20%; AlphaEdit's baseline: 40%)

    def __post_init__(self):
        if not 0 < self.k <= 1:
            raise ValueError(f"RECT k must be in (0, 1], got {self.k}")


def kept_entries(shape: tuple[int, ...], k: float) -> int:
    """RECT's budget: the number of entries of a ``shape`` update that RECT keeps, ceil(k · n) (its
    random and PCA baselines are held to the same number: :mod:`kelib.regularizers.random_mask`,
    :mod:`kelib.regularizers.pca`)."""
    return math.ceil(k * math.prod(shape))


def rect_mask(delta: torch.Tensor, weight: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(k · numel)`` entries with the largest relative change.

    The keep-th largest δ is found by selection (``kthvalue``, linear time, not a sort of every
    entry): entries above it are kept, and of those equal to it the first in row-major order, as
    many as are still needed."""
    rel = relative_change(delta, weight).flatten()
    n = rel.numel()
    keep = kept_entries(tuple(delta.shape), k)
    if keep >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    threshold = torch.kthvalue(rel, n - keep + 1).values
    above = rel > threshold
    tied = rel == threshold
    still_needed = keep - int(above.sum())
    mask = above | (tied & (torch.cumsum(tied, 0) <= still_needed))
    return mask.view_as(delta)


def rect(delta: torch.Tensor, weight: torch.Tensor, k: float = 0.2) -> torch.Tensor:
    """ΔW with all but the top-``k`` entries by relative change set to 0."""
    return torch.where(rect_mask(delta, weight, k), delta, torch.zeros_like(delta))


class RECT(Regularizer):
    name = "RECT"

    def __init__(self, params: RECTParams = RECTParams()):
        super().__init__(params)

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        update = {}
        for layer, delta in result.deltas.items():
            weight = get_weight(model, layer, result.part)
            same_device(delta, weight, what=f"the update and W of layer {layer} (RECT)")
            update[layer] = rect(delta, weight.float(), self.params.k)
        return update
