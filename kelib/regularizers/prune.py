"""PRUNE (Ma et al., ICLR 2025): restrain the large singular values of the accumulated update.

With Δ = W_n - W_0 = U Σ Vᵀ (truncated at its numerical rank) and σ̄ = σ_max(W_0), every singular
value σ ≥ σ̄ is replaced by

    F(σ) = log_α(σ) + σ̄ - log_α(σ̄)         (α = e by default; 2, 1.5, 1.2 as in the paper)
    F(σ) = (σ + σ̄) / 2                       ("linear" variant)

and the others are kept; the restrained weight is W_0 + U F(Σ) Vᵀ. F is increasing with F(σ̄) = σ̄
and F(σ) ≤ σ, so the restrained spectrum never exceeds the original one, and the condition number
of W_0 + Δ' is bounded by restraining Δ's largest directions.

Modes: ``post_hoc`` (the official code: edit N times unrestrained, restrain once, evaluate; here the
restraint is applied to the evaluated view at every checkpoint, the chain of edits continues
unrestrained) and ``per_step`` (the paper's framing: restrain after every edit or batch, so the next
edit starts from W_0 + Δ'). Both compute W = W_0 + Δ', never W_n + Δ' (the double count seen in
one re-implementation).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Union

import torch

from kelib.editors.base import EditResult
from kelib.models import get_weight, set_weight
from kelib.regularizers.base import Regularizer


@dataclass(frozen=True)
class PRUNEParams:
    alpha: Union[float, Literal["e", "linear"]] = "e"  # log base of F, or the linear variant
    mode: Literal["post_hoc", "per_step"] = "post_hoc"

    def __post_init__(self):
        if not isinstance(self.alpha, str) and not self.alpha > 1:
            raise ValueError(f"PRUNE alpha must be > 1, 'e' or 'linear', got {self.alpha!r}")


def restrain_values(sigma: torch.Tensor, bound: float, alpha: float | str = "e") -> torch.Tensor:
    """Apply F to the singular values ``σ ≥ bound``; leave the rest unchanged."""
    large = sigma >= bound
    if alpha == "linear":
        restrained = (sigma + bound) / 2
    else:
        log_alpha = math.log(math.e if alpha == "e" else float(alpha))
        restrained = torch.log(sigma.clamp_min(bound)) / log_alpha + bound - math.log(bound) / log_alpha
    return torch.where(large, restrained, sigma)


def restrain(delta: torch.Tensor, bound: float, alpha: float | str = "e") -> torch.Tensor:
    """Δ' = U F(Σ) Vᵀ over Δ's numerical rank (float64 SVD for small matrices, float32 otherwise)."""
    dtype = torch.float64 if delta.numel() <= 4_000_000 else torch.float32
    u, s, vh = torch.linalg.svd(delta.to(dtype), full_matrices=False)
    tol = (s[0] if len(s) else 0) * max(delta.shape) * torch.finfo(dtype).eps
    rank = int((s > tol).sum())
    s_new = restrain_values(s[:rank], bound, alpha)
    return ((u[:, :rank] * s_new) @ vh[:rank]).to(delta.dtype)


class PRUNE(Regularizer):
    name = "PRUNE"

    def __init__(self, params: PRUNEParams = PRUNEParams()):
        super().__init__(params)
        self.bounds: dict[int, float] = {}

    def start(self, model, originals, stats) -> None:
        super().start(model, originals, stats)
        self.bounds = {
            layer: float(torch.linalg.svdvals(w.float().to(torch.float64 if w.numel() <= 4_000_000 else torch.float32))[0])
            for layer, w in originals.items()
        }

    def restrained_weight(self, layer: int, current: torch.Tensor) -> torch.Tensor:
        w0 = self.originals[layer].float().to(current.device)
        return w0 + restrain(current.float() - w0, self.bounds[layer], self.params.alpha)

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        if self.params.mode == "post_hoc":
            return dict(result.deltas)
        update = {}
        for layer, delta in result.deltas.items():
            current = get_weight(model, layer, result.part).float()
            update[layer] = self.restrained_weight(layer, current + delta) - current
        return update

    @contextlib.contextmanager
    def evaluation_view(self, model) -> Iterator[None]:
        if self.params.mode != "post_hoc":
            yield
            return
        saved = {layer: get_weight(model, layer).detach().clone() for layer in self.originals}
        try:
            for layer, w in saved.items():
                set_weight(model, layer, self.restrained_weight(layer, w))
            yield
        finally:
            for layer, w in saved.items():
                set_weight(model, layer, w)
