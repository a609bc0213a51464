"""D4S, "Dump for Sequence" (Huang et al., NeurIPS 2024): sequential editing as one growing batch.

Per edited layer l (i-th of L) keep, over all edits so far, with residuals measured against W_0,

    A_l = Σ_t R_t K_tᵀ   (d_out x d_in)        S_l = Σ_t K_t K_tᵀ   (d_in x d_in)

and after every step set  W_l = W_0,l + (A_l / (L - i)) (S_l + λ C0_l)⁻¹.  This is MEMIT's batch
solution over the whole history, so the norm of W stays bounded, and the state does not grow with
the number of edits. The editor runs on the original weights (``editing`` swaps W_0 in), as D4S's
code restores W_0 before each edit.

``residual_spread: fixed`` (D4S's code) measures R once per step, before the layer loop, so the
layers receive 1/L, 1/(L-1), ..., 1 of it; ``recompute`` re-measures it per layer as MEMIT does.
A and S are stored in ``state_dtype`` (float64 by default, as the authors do; float32 halves the
memory for GPT-J-sized layers: S alone is d_in² · 8 bytes = 2.1 GB per GPT-J layer in float64).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from kelib.editors.base import EditError, EditResult
from kelib.models import get_weight, same_device, set_weight
from kelib.regularizers.base import Regularizer


@dataclass(frozen=True)
class D4SParams:
    mom2_update_weight: float = 20000.0  # λ; use the editor's value
    residual_spread: Literal["fixed", "recompute"] = "fixed"
    state_dtype: Literal["float64", "float32"] = "float64"


class D4SState:
    """A and S of one layer; its size depends on d_out and d_in only."""

    def __init__(self, d_out: int, d_in: int, dtype: torch.dtype, device):
        self.a = torch.zeros(d_out, d_in, dtype=dtype, device=device)
        self.s = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.count = 0

    def add(self, residual: torch.Tensor, keys: torch.Tensor) -> None:
        """Accumulate one step: ``residual [d_out, n]``, ``keys [d_in, n]``."""
        same_device(residual, keys, self.a, what="D4S's residuals, keys and state")
        r, k = residual.to(self.a), keys.to(self.a)
        self.a += r @ k.T
        self.s += k @ k.T
        self.count += keys.shape[1]

    def solution(self, c0: torch.Tensor, weight: float, share: float) -> torch.Tensor:
        """ΔW = (share · A) (S + λ C0)⁻¹, solved in float64."""
        system = self.s.double() + weight * c0.to(self.s.device).double()
        # X (S + λC0) = A  <=>  (S + λC0) Xᵀ = Aᵀ  (the system is symmetric)
        return (share * torch.linalg.solve(system, self.a.double().T).T).float()

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.s.numel() * self.s.element_size()


class D4S(Regularizer):
    name = "D4S"

    def __init__(self, params: D4SParams = D4SParams()):
        super().__init__(params)
        self.states: dict[int, D4SState] = {}

    def start(self, model, originals, stats) -> None:
        super().start(model, originals, stats)
        dtype = getattr(torch, self.params.state_dtype)
        self.states = {
            layer: D4SState(*w.shape, dtype=dtype, device=w.device) for layer, w in originals.items()
        }

    def editor_overrides(self) -> dict:
        return {"residual_spread": self.params.residual_spread}

    @contextlib.contextmanager
    def editing(self, model) -> Iterator[None]:
        saved = {layer: get_weight(model, layer).detach().clone() for layer in self.originals}
        try:
            for layer, w0 in self.originals.items():
                set_weight(model, layer, w0)
            yield
        finally:
            for layer, w in saved.items():
                set_weight(model, layer, w)

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        if not result.keys or not result.residuals:
            raise EditError("D4S needs the keys and residuals of a MEMIT-family editor (MEMIT, AlphaEdit)")
        layers = sorted(result.deltas)
        update = {}
        for i, layer in enumerate(layers):
            state = self.states[layer]
            state.add(result.residuals[layer], result.keys[layer])
            delta = state.solution(self.stats[layer], self.params.mom2_update_weight, 1.0 / (len(layers) - i))
            same_device(self.originals[layer], delta, what=f"D4S's W_0 and solution at layer {layer}")
            target = self.originals[layer].float() + delta
            update[layer] = target - get_weight(model, layer, result.part).float()
        return update

    def state_dict(self) -> dict:
        return {layer: {"a": s.a.cpu(), "s": s.s.cpu(), "count": s.count} for layer, s in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        for layer, saved in state.items():
            self.states[layer].a.copy_(saved["a"])
            self.states[layer].s.copy_(saved["s"])
            self.states[layer].count = saved["count"]
