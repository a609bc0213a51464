"""RECT's random baseline (Gu et al., EMNLP 2024; the ``Random`` variant beside RECT in its ROME code):
keep a random fraction ``k`` of ΔW's entries, zero the rest.

Exactly ``ceil(k · n)`` entries of each layer's update are kept, the same number as
:func:`kelib.regularizers.rect.rect_mask` keeps (RECT ranks them by relative change |ΔW| / |W|; this
picks them uniformly at random), at their original values. The draw uses torch's global generator,
which the runner seeds per run (``RunSpec.seed``) and saves at every checkpoint, so a run is
reproducible and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kelib.editors.base import EditResult
from kelib.regularizers.base import Regularizer
from kelib.regularizers.rect import kept_entries


@dataclass(frozen=True)
class RandomMaskParams:
    k: float = 0.2  # fraction of entries kept, as RECT's k (the RECT code zeroes 80% at random)

    def __post_init__(self):
        if not 0 < self.k <= 1:
            raise ValueError(f"random mask k must be in (0, 1], got {self.k}")


def random_mask(delta: torch.Tensor, k: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask of exactly ``ceil(k · numel)`` entries chosen uniformly at random (drawn on the CPU,
    so that the draw does not depend on the device)."""
    n = delta.numel()
    keep = kept_entries(tuple(delta.shape), k)
    chosen = torch.randperm(n, generator=generator)[:keep]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask.view_as(delta).to(delta.device)


class RandomMask(Regularizer):
    name = "random"

    def __init__(self, params: RandomMaskParams = RandomMaskParams()):
        super().__init__(params)

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        return {layer: torch.where(random_mask(delta, self.params.k), delta, torch.zeros_like(delta))
                for layer, delta in sorted(result.deltas.items())}
