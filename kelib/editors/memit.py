"""MEMIT (Meng et al. 2023): spread a batch of edits over several MLP output projections.

1. For each case, optimise z, the residual stream after the last edited layer L at the lookup
   position (:mod:`kelib.editors.target` with ``part="block"``).
2. For each edited layer l (ascending), on the model with this call's earlier layers already updated:
   K = keys at l (½ plain prompt + ½ mean over context templates), R = Z - h_L (current model), and

       ΔW_l = (R / (number of layers left)) Kᵀ (λ C0 + K Kᵀ)⁻¹          (solved in float64)

   ``residual_spread: fixed`` computes R once before the loop, as D4S's code does; the layers then
   receive 1/L, 1/(L-1), ..., 1 of the same residual.

Within :func:`layer_weights` (D4S's loop) a caller decides what each layer carries while the later
layers' keys are read: D4S puts W_0 + its update over the whole history there, as its code does,
instead of this call's ΔW_l. The returned deltas are MEMIT's own either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch

from kelib.editors.base import EditResult, check_cases, register
from kelib.editors.context import keys_at, lookup_index, memit_templates, split_template
from kelib.editors.target import TargetSettings, on_reference_path, optimize_cases, optimize_targets_reference
from kelib.models import add_to_weight, capture, check_layer, device_of, forward_through, get_weight, set_weight
from kelib.stats import SecondMomentSettings
from kelib.tokens import encode, pad_batch


@dataclass(frozen=True, kw_only=True)
class MEMITHyperParams(TargetSettings, SecondMomentSettings):
    layers: list[int]
    mom2_update_weight: float = 20000.0  # λ: weight of the preserved keys' second moment
    context_template_starts: list[str] = ("The", "Therefore", "Because", "I", "You")
    context_template_length: int = 10
    residual_spread: Literal["recompute", "fixed"] = "recompute"


def memit_templates_flat(model, tok, hparams) -> tuple[list[str], list[list[str]]]:
    groups = memit_templates(model, tok, hparams.context_template_starts, hparams.context_template_length, hparams.seed)
    return [t for g in groups for t in g], groups


def compute_targets(model, tok, cases, hparams) -> tuple[torch.Tensor, dict]:
    """Z: ``[d_model, n]`` targets of the residual stream after the last edited layer."""
    flat, _ = memit_templates_flat(model, tok, hparams)
    last = hparams.layers[-1]
    if on_reference_path():
        found = [optimize_targets_reference(model, tok, c, last, ["block"], flat, hparams)[0] for c in cases]
    else:  # all cases in one optimisation, each with its own δ and early stop
        found = [t.targets[0] for t in optimize_cases(model, tok, cases, last, ["block"], flat, hparams)]
    info = {
        "loss": sum(t.loss for t in found) / len(found),
        "steps": sum(t.steps for t in found) / len(found),
        "target_prob": sum(t.target_prob for t in found) / len(found),
    }
    return torch.stack([t.value for t in found], 1), info


def memit_keys(model, tok, cases, layer: int, hparams, part: str = "mlp_out") -> torch.Tensor:
    """K at ``layer``: ``[d_in, n]``, the mean of the plain-prompt key and the context-templates key."""
    _, groups = memit_templates_flat(model, tok, hparams)
    per_group = [keys_at(model, tok, cases, g, [layer], hparams.fact_token, part)[layer][0] for g in groups]
    return torch.stack(per_group).mean(0).T


def current_outputs(model, tok, cases, hparams, part: str = "block") -> torch.Tensor:
    """The output of ``part`` of the last edited layer (h_L for ``block``) at the plain prompts' lookup
    positions on the model as it is now: ``[d_out, n]``."""
    last = hparams.layers[-1]
    return keys_at(model, tok, cases, ["{}"], [last], hparams.fact_token, part=part)[last][1].T


def keys_and_outputs(model, tok, cases, layer: int, hparams, part: str = "mlp_out",
                     out_part: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`memit_keys` at ``layer`` and :func:`current_outputs` of ``out_part``, from one forward pass
    over every template (the plain prompt is MEMIT's first template group), stopped after the last
    edited layer."""
    if on_reference_path():
        return memit_keys(model, tok, cases, layer, hparams, part), current_outputs(model, tok, cases, hparams, out_part)
    flat, groups = memit_templates_flat(model, tok, hparams)
    texts, positions = [], []
    for case in cases:
        for template in flat:
            prefix = split_template(template)
            texts.append(encode(tok, prefix + case.prompt))
            positions.append(lookup_index(tok, prefix, case.prompt, case.subject, hparams.fact_token))
    ids, mask = pad_batch(texts, tok.pad_token_id, device_of(model))
    last = hparams.layers[-1]
    with capture(model, [layer], part) as at_key, capture(model, [last], out_part) as at_out:
        forward_through(model, ids, mask, max(layer, last))
    rows, cols = torch.arange(len(texts), device=ids.device), torch.as_tensor(positions, device=ids.device)
    shape = (len(cases), len(flat), -1)
    keys = at_key[layer]["key"][rows, cols].float().view(shape)
    bounds = torch.tensor([0, *(len(g) for g in groups)]).cumsum(0).tolist()
    k = torch.stack([keys[:, lo:hi].mean(1) for lo, hi in zip(bounds, bounds[1:])]).mean(0).T
    outputs = at_out[last]["value"][rows, cols].float().view(shape)[:, flat.index("{}")].T
    return k, outputs


def solve_update(residual: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λ C0 + K Kᵀ)⁻¹ in float64: ``R: [d_out, n]``, ``K: [d_in, n]`` -> ``[d_out, d_in]``.

    With n keys and d_in ≫ n, through the Woodbury identity
    (λC0 + KKᵀ)⁻¹K = A⁻¹K (I + KᵀA⁻¹K)⁻¹ with A = λC0, whose Cholesky factor is computed once per C0
    tensor and λ: O(d_in² n) per call instead of a d_in x d_in solve."""
    k = keys.double()
    factor = None if on_reference_path() else _cholesky(c0, weight, k.device)
    if factor is None:
        system = weight * c0.to(k.device).double() + k @ k.T
        adj = torch.linalg.solve(system, k)  # (λC0 + KKᵀ)⁻¹ K, [d_in, n]; the system is symmetric
    else:
        a_inv_k = torch.cholesky_solve(k, factor)
        small = torch.eye(k.shape[1], dtype=k.dtype, device=k.device) + k.T @ a_inv_k
        adj = torch.linalg.solve(small, a_inv_k.T).T  # small is symmetric
    return (residual.double() @ adj.T).float()


_FACTORS: dict[tuple, tuple] = {}  # (id of C0, device) -> (weak reference, version, λ, Cholesky factor of λC0)


def _cholesky(c0: torch.Tensor, weight: float, device) -> torch.Tensor | None:
    """The Cholesky factor of λ C0 (float64, on ``device``), cached while the same C0 tensor lives
    unchanged; None if λ C0 is not positive definite (the caller solves directly)."""
    key = (id(c0), str(device))
    hit = _FACTORS.get(key)
    if hit is not None and hit[0]() is c0 and hit[1] == c0._version and hit[2] == weight:
        return hit[3]
    factor, info = torch.linalg.cholesky_ex(weight * c0.to(device).double())
    if int(info) != 0:
        return None
    for stale in [k for k, v in _FACTORS.items() if v[0]() is None]:
        del _FACTORS[stale]
    _FACTORS[key] = (weakref.ref(c0), c0._version, weight, factor)
    return factor


# fn(i, n_layers, layer, residual, keys) -> the weight layer carries while later layers' keys are read
LayerWeight = Callable[[int, int, int, torch.Tensor, torch.Tensor], torch.Tensor]
_LAYER_WEIGHT: contextvars.ContextVar[LayerWeight | None] = contextvars.ContextVar("kelib_memit_layer_weight",
                                                                                      default=None)


@contextlib.contextmanager
def layer_weights(fn: LayerWeight) -> Iterator[None]:
    """Within this block MEMIT sets each edited layer to ``fn(i, n_layers, layer, R, K)`` (R the full
    residual, before the spread; K the layer's keys) after solving it, instead of adding its own ΔW_l,
    so the keys of the later layers are read on the weights ``fn`` chose (D4S's loop)."""
    token = _LAYER_WEIGHT.set(fn)
    try:
        yield
    finally:
        _LAYER_WEIGHT.reset(token)


@register("MEMIT", MEMITHyperParams, batchable=True)
def compute_update(model, tok, cases: Sequence, hparams: MEMITHyperParams, stats, state=None) -> EditResult:
    layers = [check_layer(model, layer) for layer in hparams.layers]
    check_cases(cases, tok)
    stats.prefetch(layers)
    z, info = compute_targets(model, tok, cases, hparams)
    originals = {layer: get_weight(model, layer).detach().clone() for layer in layers}
    result = EditResult(deltas={}, info=info)
    try:
        residual = None
        for i, layer in enumerate(layers):
            keys, outputs = keys_and_outputs(model, tok, cases, layer, hparams)
            if residual is None or hparams.residual_spread == "recompute":
                residual = z - outputs
            delta = solve_update(residual / (len(layers) - i), keys, stats[layer], hparams.mom2_update_weight)
            chosen = _LAYER_WEIGHT.get()
            if chosen is None:
                add_to_weight(model, layer, delta)  # later layers' keys and residuals see this layer's edit
            else:
                set_weight(model, layer, chosen(i, len(layers), layer, residual, keys))
            result.deltas[layer] = delta
            result.keys[layer] = keys
            result.residuals[layer] = residual
    finally:
        for layer, weight in originals.items():
            set_weight(model, layer, weight)
    return result
