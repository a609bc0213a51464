"""RECT's PCA baseline (Gu et al., EMNLP 2024; the ``PCA`` variant beside RECT in its ROME code): keep
ΔW's top singular directions, ΔW ≈ U_r Σ_r V_rᵀ, with the rank r set by RECT's budget.

**The budget.** RECT keeps m = ceil(k · d_out · d_in) entries of each update (:func:`kept_entries`).
A rank-r matrix is stored as its factors, r · (d_out + d_in) numbers (U_r Σ_r and V_r), so at the same
budget of kept numbers

    ``budget: entries`` (default)    r = floor(m / (d_out + d_in))   (at least 1)

i.e. the largest rank whose factors take no more numbers than RECT's kept entries (r · (d_out + d_in)
≤ m < (r + 1) · (d_out + d_in)). The RECT code instead keeps a fraction k of the *components*
(320 of GPT-2 XL's 1600 at k = 0.2):

    ``budget: components``           r = max(1, round(k · min(d_out, d_in)))

On GPT-2 XL's c_proj (1600 x 6400) at k = 0.2 the two give r = 256 and 320; on the embedded default
model's (256 x 1024), 40 and 51.

**What it does to one edit.** The reduction is applied to each editor update before it is added, as
in the RECT code. An update of rank ≤ r is kept whole: ROME's update and MEMIT's per layer for a
single edit are rank one, so for single edits at any k this baseline is the identity (exactly: the
update is returned as it came). It truncates only updates of rank > r (MEMIT or MEND batches larger
than r).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kelib.editors.base import EditResult
from kelib.regularizers.base import Regularizer
from kelib.regularizers.rect import kept_entries


@dataclass(frozen=True)
class PCAParams:
    k: float = 0.2  # RECT's fraction of kept entries, converted to a rank by ``budget``
    budget: Literal["entries", "components"] = "entries"

    def __post_init__(self):
        if not 0 < self.k <= 1:
            raise ValueError(f"PCA k must be in (0, 1], got {self.k}")
        if self.budget not in ("entries", "components"):
            raise ValueError(f"PCA budget must be 'entries' or 'components', got {self.budget!r}")


def pca_rank(shape: tuple[int, int], k: float, budget: str = "entries") -> int:
    """The rank kept for a ``d_out x d_in`` update at RECT's ``k`` (see the module docstring)."""
    d_out, d_in = shape
    if budget == "components":
        return max(1, round(k * min(d_out, d_in)))
    if budget != "entries":
        raise ValueError(f"budget must be 'entries' or 'components', got {budget!r}")
    return max(1, kept_entries(shape, k) // (d_out + d_in))


def pca_reduce(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """ΔW's best rank-``rank`` approximation (truncated SVD, in float64 for matrices up to 4M entries);
    ΔW itself, unchanged, when its numerical rank is at most ``rank`` (judged at ΔW's own precision: a
    float32 rank-one update has float32 rounding in every other direction, which is not rank)."""
    dtype = torch.float64 if delta.numel() <= 4_000_000 else torch.float32
    u, s, vh = torch.linalg.svd(delta.to(dtype), full_matrices=False)
    eps = max(torch.finfo(dtype).eps, torch.finfo(delta.dtype).eps if delta.dtype.is_floating_point else 0.0)
    tol = (s[0] if len(s) else 0) * max(delta.shape) * eps
    if int((s > tol).sum()) <= rank:
        return delta
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(delta.dtype)


class PCA(Regularizer):
    name = "PCA"

    def __init__(self, params: PCAParams = PCAParams()):
        super().__init__(params)

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        return {layer: pca_reduce(delta, pca_rank(tuple(delta.shape), self.params.k, self.params.budget))
                for layer, delta in result.deltas.items()}
