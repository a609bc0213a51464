"""ROME (Meng et al. 2022): a rank-one update of one MLP output projection.

    ΔW = (v* - W k - b) uᵀ / (uᵀ k),    u = C⁻¹ k̄ / ||C⁻¹ k̄||    (u = k̄ / ||k̄|| without the C adjustment)

k̄ is the key at the lookup position averaged over ROME's context templates, v* the optimised value
(:mod:`kelib.editors.target`), C = E[k kᵀ] the key second moment. After the update, W maps the key
k to v* exactly.

Key use: with ``original_key_use: false`` (default, the fix of Gupta et al. 2024 "Rebuilding ROME",
EasyEdit's R-ROME) the same averaged key k̄ (and its averaged output) appears in the numerator and
the denominator. ``original_key_use: true`` reproduces the 2022 code, which puts the plain-prompt key
k* in ``W k*`` and ``uᵀ k*`` while u is built from k̄; when ``uᵀ k*`` is small the update explodes
("disabling edits"). Papers before 2024 ran the original.

Several cases in one call are edited one after another, each seeing the previous updates, as in
ROME's own code; the returned ΔW is their sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import EditResult, check_cases, register
from kelib.editors.context import keys_at, rome_templates
from kelib.editors.target import TargetSettings, on_reference_path, optimize_cases, optimize_targets_reference
from kelib.models import add_to_weight, check_layer, get_weight, set_weight
from kelib.stats import SecondMomentSettings


@dataclass(frozen=True, kw_only=True)
class ROMEHyperParams(TargetSettings, SecondMomentSettings):
    layers: list[int]  # ROME edits exactly one layer
    clamp_norm_factor: float = 4.0
    mom2_adjustment: bool = True  # u = C⁻¹ k̄ (EasyEdit's hparams switch this off)
    context_template_length_params: list[list[int]] = ((5, 10), (10, 10))
    original_key_use: bool = False  # True: the 2022 code's k* in the denominator (see module doc)


@register("ROME", ROMEHyperParams, batchable=False)
def compute_update(model, tok, cases: Sequence, hparams: ROMEHyperParams, stats, state=None) -> EditResult:
    if len(hparams.layers) != 1:
        raise ValueError(f"ROME edits one layer, got layers={hparams.layers}")
    layer = check_layer(model, hparams.layers[0])
    check_cases(cases, tok)
    templates = rome_templates(model, tok, hparams.context_template_length_params, hparams.seed)
    original = get_weight(model, layer).detach().clone()
    total = torch.zeros_like(original, dtype=torch.float32)
    info = {"loss": 0.0, "steps": 0.0, "target_prob": 0.0}
    try:
        for case in cases:
            delta, target = rank_one_update(model, tok, case, layer, templates, hparams, stats)
            add_to_weight(model, layer, delta)
            total += delta
            info["loss"] += target.loss / len(cases)
            info["steps"] += target.steps / len(cases)
            info["target_prob"] += target.target_prob / len(cases)
    finally:
        set_weight(model, layer, original)
    return EditResult(deltas={layer: total}, info=info)


def rank_one_update(model, tok, case, layer: int, templates, hparams: ROMEHyperParams, stats):
    """ΔW for one case on the model as it is now; returns ``(ΔW, Target)``.

    k̄ and W k̄ + b are read in the target optimisation's first pass (the reference path reads them in a
    pass of their own)."""
    if on_reference_path():
        k_bar, out_bar = (t[0] for t in keys_at(model, tok, [case], templates, [layer], hparams.fact_token)[layer])
        target = optimize_targets_reference(model, tok, case, layer, ["mlp_out"], templates, hparams)[0]
    else:
        found = optimize_cases(model, tok, [case], layer, ["mlp_out"], templates, hparams)[0]
        k_bar, out_bar, target = found.key, found.key_output, found.targets[0]
    if hparams.mom2_adjustment:
        c = stats[layer].to(k_bar.device, torch.float64)
        u = torch.linalg.solve(c, k_bar.double()).float()
    else:
        u = k_bar.clone()
    u = u / u.norm()
    if hparams.original_key_use:
        k, out = (t[0] for t in keys_at(model, tok, [case], ["{}"], [layer], hparams.fact_token)[layer])
    else:
        k, out = k_bar, out_bar  # mean of W k + b over templates = W k̄ + b: the layer is linear
    right = (target.value - out) / torch.dot(k, u)
    return torch.outer(right, u), target
