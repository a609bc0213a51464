"""PRUNE (Ma et al., ICLR 2025): restrain the large singular values of the accumulated update.

With Δ = W_n - W_0 = U Σ Vᵀ (truncated at its numerical rank) and σ̄ = σ_max(W_0), every singular
value σ ≥ σ̄ is replaced by

    F(σ) = log_α(σ) + σ̄ - log_α(σ̄)         (α = e by default; 2, 1.5, 1.2 as in the paper)
    F(σ) = (σ + σ̄) / 2                       ("linear" variant)

and the others are kept; the restrained weight is W_0 + U F(Σ) Vᵀ. F is increasing with F(σ̄) = σ̄.

**When F restrains.** F'(σ) = 1 / (σ ln α), so σ − F(σ), which is 0 at σ̄, grows on [σ̄, ∞) exactly
when σ ln α ≥ 1 there, i.e. F(σ) ≤ σ for every σ ≥ σ̄ iff **σ̄ ≥ 1 / ln α** (σ̄ ≥ 1 for α = e; 1.44
for α = 2, 2.47 for 1.5, 5.48 for 1.2). Below that, F *raises* every singular value in (σ̄, σ*), σ*
the second root of F(σ) = σ: on a random stand-in with σ̄ = 0.28, Δ's largest singular value went
from 0.89 to F(0.89) = ln 0.89 + 0.28 − ln 0.28 = 1.44. Whether a model meets the condition is a
property of its weights (the runner records ``sigma_max`` of W at checkpoint 0); :class:`PRUNE` warns at the start of a run when an edited matrix fails the condition. The linear
variant, (σ + σ̄) / 2 ≤ σ for σ ≥ σ̄, restrains whatever σ̄ is. Where the condition holds, the
restrained spectrum never exceeds the original one, and the condition number of W_0 + Δ' is bounded
by restraining Δ's largest directions.

Modes: ``post_hoc`` (the official code: edit N times unrestrained, restrain once, evaluate; here the
restraint is applied to the evaluated view at every checkpoint, the chain of edits continues
unrestrained) and ``per_step`` (the paper's framing: restrain after every edit or batch, so the next
edit starts from W_0 + Δ'). Both compute W = W_0 + Δ', never W_n + Δ' (the double count seen in
one re-implementation).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal, Union

import torch

from kelib.editors.base import EditResult
from kelib.models import get_weight, same_device, set_weight
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


class PRUNEConditionWarning(UserWarning):
    """PRUNE's F raises some singular values instead of restraining them (σmax(W_0) < 1 / ln α)."""


def raised_range(bound: float, alpha: float | str = "e") -> tuple[float, float] | None:
    """``(σ̄, σ*)``: the singular values that F *raises* (F(σ) > σ), or None when F(σ) ≤ σ for every
    σ ≥ σ̄, which holds iff σ̄ ≥ 1 / ln α (always for the linear variant). See the module docstring."""
    if alpha == "linear":
        return None
    log_alpha = math.log(math.e if alpha == "e" else float(alpha))
    if bound * log_alpha >= 1:
        return None

    def above(sigma: float) -> bool:  # F(σ) > σ
        return math.log(sigma) / log_alpha + bound - math.log(bound) / log_alpha > sigma

    lo, hi = 1 / log_alpha, 2 / log_alpha  # F − σ peaks at 1 / ln α, then falls for ever
    while above(hi):
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if above(mid) else (lo, mid)
    return bound, hi


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
        self._warn_if_raising()

    def _warn_if_raising(self) -> None:
        """Warn (once per regularizer) about edited matrices on which F raises singular values."""
        if getattr(self, "_warned", False):
            return
        raised = {layer: raised_range(bound, self.params.alpha) for layer, bound in self.bounds.items()}
        raised = {layer: span for layer, span in raised.items() if span is not None}
        if not raised:
            return
        self._warned = True
        alpha = self.params.alpha
        log_alpha = math.log(math.e if alpha == "e" else float(alpha))
        spans = "; ".join(f"layer {layer}: σmax(W_0) = {lo:.3g}, raised for σ in ({lo:.3g}, {hi:.3g})"
                          for layer, (lo, hi) in sorted(raised.items()))
        warnings.warn(
            f"PRUNE (alpha={alpha}) restrains only where σmax(W_0) >= 1/ln α = {1 / log_alpha:.3g}; on "
            f"{len(raised)} edited matrix(es) it is smaller, so F(σ) > σ there and PRUNE raises the "
            f"update's singular values in that range instead of restraining them ({spans}). Use "
            "alpha='linear', a smaller 1/ln α (larger alpha), or read PRUNE's numbers on this model "
            "with that in mind.",
            PRUNEConditionWarning, stacklevel=2,
        )

    def restrained_weight(self, layer: int, current: torch.Tensor) -> torch.Tensor:
        w0 = self.originals[layer].float()
        same_device(w0, current, what=f"PRUNE's W_0 and the current W of layer {layer}")
        return w0 + restrain(current.float() - w0, self.bounds[layer], self.params.alpha)

    @property
    def changes_edits(self) -> bool:
        return self.params.mode == "per_step"  # post hoc: the unrestrained chain, restrained when evaluated

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
