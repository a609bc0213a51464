"""FT-L: fine-tune one MLP output projection on the new target, with every entry of ΔW kept within
an L∞ ball (ROME's constrained fine-tuning baseline, the FT of the D4S tables).

Minimises the mean token NLL of ``target_new`` after the prompt with Adam; after each step ΔW is
clipped to ``[-norm_constraint, norm_constraint]`` element-wise. Blocks below the lowest edited layer
do not change while training: they run once (:func:`kelib.editors.partial.freeze_below`), each step
runs the blocks from that layer up and unembeds the target positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import EditResult, check_cases, register
from kelib.editors.partial import freeze_below
from kelib.models import check_layer, device_of, edited_module, float32_while, get_weight, set_weight
from kelib.tokens import pad_batch, with_target


@dataclass(frozen=True)
class FTHyperParams:
    layers: list[int]
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float = 5e-4  # L∞ bound on each entry of ΔW
    seed: int = 0


@register("FT", FTHyperParams, batchable=True)
def compute_update(model, tok, cases: Sequence, hparams: FTHyperParams, stats=None, state=None) -> EditResult:
    layers = [check_layer(model, layer) for layer in hparams.layers]
    check_cases(cases, tok)
    encoded = [with_target(tok, c.prompt, c.target_new) for c in cases]
    ids, mask = pad_batch([e[0] for e in encoded], tok.pad_token_id, device_of(model))
    # (row, position) of every target token's prediction and its id; a case is its row
    rows, cols, wanted = [], [], []
    for row, (full, start) in enumerate(encoded):
        rows += [row] * (len(full) - start)
        cols += range(start - 1, len(full) - 1)
        wanted += full[start:]
    rows, cols, wanted = (torch.tensor(x, device=ids.device) for x in (rows, cols, wanted))
    n_tokens = torch.bincount(rows, minlength=len(cases)).float()
    # W trains in float32 (its Adam state too): in float16, Adam's eps and most of its second moment
    # (1 - β2) g² are 0, and 0 / 0 made every entry of ΔW NaN (issue #20). A no-op when the runner
    # keeps W in float32 already.
    with float32_while(model, [(layer, "mlp_out") for layer in layers]):
        originals = {layer: get_weight(model, layer).detach().clone() for layer in layers}
        params = [edited_module(model, layer).weight for layer in layers]
        for p in params:
            p.requires_grad_(True)
        torch.manual_seed(hparams.seed)
        optimizer = torch.optim.Adam(params, lr=hparams.lr)
        loss_value = float("nan")
        upper = freeze_below(model, ids, mask, min(layers))
        try:
            for _ in range(hparams.num_steps):
                optimizer.zero_grad()
                logits = upper.run(upper.hidden, rows, cols).float()
                nll = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
                # the mean over cases of each case's mean token NLL
                loss = (torch.zeros(len(cases), device=nll.device).index_add(0, rows, nll) / n_tokens).mean()
                loss_value = loss.item()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for layer in layers:
                        delta = (get_weight(model, layer).float() - originals[layer].float()).clamp(
                            -hparams.norm_constraint, hparams.norm_constraint
                        )
                        set_weight(model, layer, originals[layer].float() + delta)
            deltas = {layer: (get_weight(model, layer).float() - originals[layer].float()).detach() for layer in layers}
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            for layer, weight in originals.items():
                set_weight(model, layer, weight)
    return EditResult(deltas=deltas, info={"loss": loss_value, "steps": float(hparams.num_steps)})

