"""D4S, "Dump for Sequence" (Huang et al., NeurIPS 2024): sequential editing as one growing batch.

Per edited layer l (i-th of L) keep, over all edits so far, with residuals measured against W_0,

    A_l = Σ_t R_t K_tᵀ   (d_out x d_in)        S_l = Σ_t K_t K_tᵀ   (d_in x d_in)

and after every step set  W_l = W_0,l + (A_l / (L - i)) (S_l + λ C0_l)⁻¹.  This is MEMIT's batch
solution over the whole history, so the norm of W stays bounded, and the state does not grow with
the number of edits. The editor runs on the original weights (``editing`` swaps W_0 in), as D4S's
code restores W_0 before each edit.

The layer loop is the official one: within a step, once layer l is solved it carries
W_0,l + (A_l / (L - i)) (S_l + λ C0_l)⁻¹ (the update over the whole history, this step included)
while MEMIT reads the keys of the later layers (:func:`kelib.editors.memit.layer_weights`), not this
step's MEMIT ΔW_l alone. (With AlphaEdit, which has its own loop, the keys are AlphaEdit's.)

λ is the editor's ``mom2_update_weight`` unless given (:data:`DEFAULT_LAMBDA` for an editor without
one). ``residual_spread: fixed`` (D4S's code) measures R once per step, before the layer loop, so the
layers receive 1/L, 1/(L-1), ..., 1 of it; ``recompute`` re-measures it per layer as MEMIT does.

Memory: A and S are stored in float64 on the model's device by default, as the authors do (S alone
is d_in² · 8 bytes: 2.1 GB per GPT-J layer, 10.6 GB for Llama-3-8B's five layers with A).
``state_device: cpu`` keeps them in RAM, in float32 unless ``state_dtype`` says otherwise; the solve
still runs on the model's device (one layer's float64 system at a time). The start of a run prints
the state's size and refuses one that would not fit (:mod:`kelib.memory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from kelib.editors.base import EditError, EditResult
from kelib.editors.memit import layer_weights
from kelib.models import get_weight, same_device, set_weight
from kelib.regularizers.base import Regularizer

DEFAULT_LAMBDA = 20000.0  # λ for an editor without mom2_update_weight (MEMIT's default in kelib)


@dataclass(frozen=True)
class D4SParams:
    mom2_update_weight: float | None = None  # λ; None: the editor's
    residual_spread: Literal["fixed", "recompute"] = "fixed"
    state_dtype: Literal["float64", "float32"] | None = None  # None: float64 on the model's device, float32 on the CPU
    state_device: Literal["model", "cpu"] = "model"  # cpu: A and S in RAM (7B-8B models on one GPU)

    def for_editor(self, hparams) -> "D4SParams":
        """These parameters with λ taken from the editor's hyperparameters when not given."""
        if self.mom2_update_weight is not None:
            return self
        return dataclasses.replace(self, mom2_update_weight=float(getattr(hparams, "mom2_update_weight",
                                                                          DEFAULT_LAMBDA)))


class D4SState:
    """A and S of one layer; its size depends on d_out and d_in only."""

    def __init__(self, d_out: int, d_in: int, dtype: torch.dtype, device):
        self.a = torch.zeros(d_out, d_in, dtype=dtype, device=device)
        self.s = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.count = 0

    def add(self, residual: torch.Tensor, keys: torch.Tensor) -> None:
        """Accumulate one step: ``residual [d_out, n]``, ``keys [d_in, n]`` (products formed where the
        inputs are, in the state's precision, then added to the state wherever it lives)."""
        same_device(residual, keys, what="D4S's residuals and keys")
        r, k = residual.to(self.a.dtype), keys.to(self.a.dtype)
        self.a += (r @ k.T).to(self.a.device)
        self.s += (k @ k.T).to(self.s.device)
        self.count += keys.shape[1]

    def solution(self, c0: torch.Tensor, weight: float, share: float, extra: tuple | None = None,
                 device=None) -> torch.Tensor:
        """ΔW = (share · A) (S + λ C0)⁻¹, solved in float64 on ``device`` (default: the state's).

        ``extra = (R, K)`` solves as if that step had been added, without adding it."""
        device = self.s.device if device is None else torch.device(device)
        system = self.s.to(device, torch.float64) + weight * c0.to(device, torch.float64)
        rhs = self.a.to(device, torch.float64)
        if extra is not None:
            r, k = (t.to(device, torch.float64) for t in extra)
            system += k @ k.T
            rhs = rhs + r @ k.T
        # X (S + λC0) = A  <=>  (S + λC0) Xᵀ = Aᵀ  (the system is symmetric)
        return (share * torch.linalg.solve(system, rhs.T).T).float()

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.s.numel() * self.s.element_size()


class D4S(Regularizer):
    name = "D4S"

    def __init__(self, params: D4SParams = D4SParams()):
        super().__init__(params)
        self.states: dict[int, D4SState] = {}
        self._pending: dict[int, tuple] = {}

    @property
    def weight(self) -> float:
        """λ (the editor's, once the runner has set it; :data:`DEFAULT_LAMBDA` otherwise)."""
        value = self.params.mom2_update_weight
        return DEFAULT_LAMBDA if value is None else value

    def start(self, model, originals, stats) -> None:
        from kelib.memory import MemoryPlan, check_plan, d4s_state_bytes, d4s_state_placement

        super().start(model, originals, stats)
        weights_device = next(iter(originals.values())).device  # W_0 lives with the weights it came from
        device, dtype = d4s_state_placement(self.params, weights_device)
        plan = MemoryPlan()
        shapes = {layer: tuple(w.shape) for layer, w in originals.items()}
        plan.add(device, d4s_state_bytes(shapes, dtype), f"D4S state ({str(dtype).removeprefix('torch.')})")
        check_plan(plan, "D4S", verbose=False)  # printed with the run's plan (kelib.memory.run_plan)
        self.solve_device = weights_device
        self.states = {layer: D4SState(*w.shape, dtype=dtype, device=device) for layer, w in originals.items()}

    def editor_overrides(self) -> dict:
        return {"residual_spread": self.params.residual_spread}

    @contextlib.contextmanager
    def editing(self, model) -> Iterator[None]:
        saved = {layer: get_weight(model, layer).detach().clone() for layer in self.originals}
        self._pending = {}
        try:
            for layer, w0 in self.originals.items():
                set_weight(model, layer, w0)
            with layer_weights(self._layer_weight):
                yield
        finally:
            for layer, w in saved.items():
                set_weight(model, layer, w)

    def _layer_weight(self, i: int, n_layers: int, layer: int, residual: torch.Tensor, keys: torch.Tensor):
        """D4S's loop: layer ``layer`` carries W_0 + its update over the history with this step added
        while the later layers' keys are read; the solution is kept for :meth:`transform`."""
        delta = self.states[layer].solution(self.stats[layer], self.weight, 1.0 / (n_layers - i),
                                            extra=(residual, keys), device=self.solve_device)
        self._pending[layer] = (residual, keys, delta)
        return self.originals[layer].to(delta.device).float() + delta

    def transform(self, result: EditResult, model) -> dict[int, torch.Tensor]:
        if not result.keys or not result.residuals:
            raise EditError("D4S needs the keys and residuals of a MEMIT-family editor (MEMIT, AlphaEdit)")
        layers = sorted(result.deltas)
        update = {}
        for i, layer in enumerate(layers):
            state = self.states[layer]
            residual, keys = result.residuals[layer], result.keys[layer]
            same_device(residual, keys, self.originals[layer], what="D4S's residuals, keys and W_0")
            pending = self._pending.pop(layer, None)
            if pending is not None and pending[0] is residual and pending[1] is keys:
                delta = pending[2]  # solved in the editor's loop with this step added
            else:
                delta = state.solution(self.stats[layer], self.weight, 1.0 / (len(layers) - i),
                                       extra=(residual, keys), device=getattr(self, "solve_device", None))
            state.add(residual, keys)
            target = self.originals[layer].float().to(delta.device) + delta
            update[layer] = target - get_weight(model, layer, result.part).float().to(delta.device)
        self._pending = {}
        return update

    def state_dict(self) -> dict:
        return {layer: {"a": s.a.cpu(), "s": s.s.cpu(), "count": s.count} for layer, s in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        for layer, saved in state.items():
            self.states[layer].a.copy_(saved["a"])
            self.states[layer].s.copy_(saved["s"])
            self.states[layer].count = saved["count"]
