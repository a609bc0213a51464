"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of preserved keys.

P = Û Ûᵀ, with Û the eigenvectors of C0 whose eigenvalues are below ``nullspace_threshold`` (the
directions ordinary text barely uses). For each edited layer, as in MEMIT with the residual
recomputed per layer,

    ΔW = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + α I)⁻¹          (α = ``L2``)

solved, as the authors' code does, in the transposed form ``(P (K Kᵀ + K_p K_pᵀ) + α I) X = P K Rᵀ``.
K_p K_pᵀ accumulates the keys of all earlier edits of the run (``state``), recomputed after each
call's update is in place. λ C0 does not enter the update: C0 only builds P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import EditResult, check_cases, register
from kelib.editors.target import TargetSettings, on_reference_path
from kelib.editors.memit import compute_targets, keys_and_outputs, memit_keys
from kelib.models import add_to_weight, check_layer, get_weight, set_weight
from kelib.stats import SecondMomentSettings


@dataclass(frozen=True, kw_only=True)
class AlphaEditHyperParams(TargetSettings, SecondMomentSettings):
    layers: list[int]
    nullspace_threshold: float = 2e-2  # eigenvalues of C0 below this span the protected null space
    L2: float = 10.0  # α, ridge on the update
    context_template_starts: list[str] = ("The", "Therefore", "Because", "I", "You")
    context_template_length: int = 10


def null_space_projection(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C0 with eigenvalue < ``threshold`` (``d_in x d_in``)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(c0.double())
    basis = eigenvectors[:, eigenvalues < threshold]
    return (basis @ basis.T).float()


@register("AlphaEdit", AlphaEditHyperParams, batchable=True)
def compute_update(model, tok, cases: Sequence, hparams: AlphaEditHyperParams, stats, state: dict | None = None) -> EditResult:
    """``state`` carries P and the accumulated K_p K_pᵀ across the calls of one sequential run."""
    state = {} if state is None else state
    layers = [check_layer(model, layer) for layer in hparams.layers]
    check_cases(cases, tok)
    projections = state.setdefault("P", {})
    past = state.setdefault("past_keys_moment", {})
    for layer in layers:
        if layer not in projections:
            projections[layer] = null_space_projection(stats[layer], hparams.nullspace_threshold)
    z, info = compute_targets(model, tok, cases, hparams)
    originals = {layer: get_weight(model, layer).detach().clone() for layer in layers}
    result = EditResult(deltas={}, info=info)
    try:
        for i, layer in enumerate(layers):
            keys, outputs = keys_and_outputs(model, tok, cases, layer, hparams)
            keys = keys.double()
            residual = (z - outputs).double() / (len(layers) - i)
            p = projections[layer].to(keys.device).double()
            moment = keys @ keys.T + past.get(layer, torch.zeros_like(p)).to(keys.device).double()
            system = p @ moment + hparams.L2 * torch.eye(len(p), dtype=p.dtype, device=p.device)
            delta = torch.linalg.solve(system, p @ keys @ residual.T).T.float()
            add_to_weight(model, layer, delta)
            result.deltas[layer] = delta
            result.keys[layer] = keys.float()
            result.residuals[layer] = residual.float() * (len(layers) - i)
        info["projected_fraction"] = float(sum(torch.trace(projections[l]) for l in layers) / sum(len(projections[l]) for l in layers))
        # The authors' code reads the keys again after the whole update. A layer's keys depend only on
        # the weights below its W, which were in place when its update was solved: they are the same.
        for layer in layers:
            if on_reference_path():
                keys = memit_keys(model, tok, cases, layer, hparams).double().cpu()
            else:
                keys = result.keys[layer].double().cpu()
            past[layer] = past.get(layer, 0) + keys @ keys.T
    finally:
        for layer, weight in originals.items():
            set_weight(model, layer, weight)
    return result
