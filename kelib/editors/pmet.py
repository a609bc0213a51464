"""PMET (Li et al., AAAI 2024, "Precise Model Editing in a Transformer"): MEMIT with the attention
output and the FFN output of the last edited layer L optimised jointly.

1. For each case, optimise δ_attn and δ_ffn together (:func:`kelib.editors.target.optimize_targets`):
   both are added at the lookup position, to the attention output and to the FFN output of layer L,
   with one NLL + KL loss and a decay ``||δ|| / ||v_0||`` per part (PMET's form). The targets are the
   module outputs z_attn = a_L + δ_attn and z_ffn = m_L + δ_ffn, not the residual stream.
2. For each edited layer l (ascending) and each rewritten projection p (``parts``), on the model with
   the earlier updates of this call in place: K = keys of p at l (MEMIT's key averaging), R = z_p − (the
   current output of p at layer L), and

       ΔW_l^p = (R / sqrt(number of layers left)) Kᵀ (λ C0^p + K Kᵀ)⁻¹        (float64)

   C0^p is the second moment of p's keys (the attention heads' concatenated output for ``attn_out``).
   The square-root spread is PMET's code's (MEMIT divides by the number of layers left).

``parts: [mlp_out, attn_out]`` (kelib's default) rewrites both output projections; ``[mlp_out]`` is
the FFN-only update of the paper's final method (its text: the optimised attention state only helps
fit the FFN target) and of EasyEdit's published configs, which list the FFN module alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import EditError, EditResult, check_cases, register
from kelib.editors.memit import MEMITHyperParams, keys_and_outputs, memit_templates_flat, solve_update
from kelib.editors.target import on_reference_path, optimize_cases, optimize_targets_reference
from kelib.models import add_to_weight, check_layer, get_weight, set_weight

PARTS = ("mlp_out", "attn_out")


@dataclass(frozen=True, kw_only=True)
class PMETHyperParams(MEMITHyperParams):
    parts: list[str] = ("mlp_out", "attn_out")  # projections rewritten; the attention output is always optimised


@register("PMET", PMETHyperParams, batchable=True)
def compute_update(model, tok, cases: Sequence, hparams: PMETHyperParams, stats, state=None) -> EditResult:
    layers = [check_layer(model, layer) for layer in hparams.layers]
    parts = list(hparams.parts)
    if not parts or set(parts) - set(PARTS):
        raise EditError(f"PMET rewrites a non-empty subset of {list(PARTS)}, got parts={parts}")
    check_cases(cases, tok)
    stats_of = {part: stats.for_part(part) for part in parts}
    for part in parts:
        stats_of[part].prefetch(layers)
    targets, info = joint_targets(model, tok, cases, hparams)
    originals = {(part, layer): get_weight(model, layer, part).detach().clone() for part in parts for layer in layers}
    result = EditResult(deltas={}, info=info)
    try:
        for i, layer in enumerate(layers):
            for part in parts:
                keys, outputs = keys_and_outputs(model, tok, cases, layer, hparams, part, out_part=part)
                residual = targets[part] - outputs
                delta = solve_update(residual / math.sqrt(len(layers) - i), keys, stats_of[part][layer],
                                     hparams.mom2_update_weight)
                add_to_weight(model, layer, delta, part)
                if part == "mlp_out":
                    result.deltas[layer] = delta
                    result.keys[layer] = keys
                    result.residuals[layer] = residual
                else:
                    result.other_parts.setdefault(part, {})[layer] = delta
    finally:
        for (part, layer), weight in originals.items():
            set_weight(model, layer, weight, part)
    return result


def joint_targets(model, tok, cases, hparams) -> tuple[dict[str, torch.Tensor], dict]:
    """``{part: Z}`` with Z ``[d_model, n]``: the optimised outputs of the attention and FFN of layer L."""
    flat, _ = memit_templates_flat(model, tok, hparams)
    last = hparams.layers[-1]
    if on_reference_path():
        found = [optimize_targets_reference(model, tok, c, last, PARTS, flat, hparams, decay_power=1.0)
                 for c in cases]
    else:
        found = [t.targets for t in optimize_cases(model, tok, cases, last, PARTS, flat, hparams, decay_power=1.0)]
    info = {
        "loss": sum(t[0].loss for t in found) / len(found),
        "steps": sum(t[0].steps for t in found) / len(found),
        "target_prob": sum(t[0].target_prob for t in found) / len(found),
    }
    return {part: torch.stack([t[i].value for t in found], 1) for i, part in enumerate(PARTS)}, info
