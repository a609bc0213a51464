"""FT-L: fine-tune one MLP output projection on the new target, with every entry of ΔW kept within
an L∞ ball (ROME's constrained fine-tuning baseline, the FT of the D4S tables).

Minimises the mean token NLL of ``target_new`` after the prompt with Adam; after each step ΔW is
clipped to ``[-norm_constraint, norm_constraint]`` element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import EditResult, check_cases, register
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
    labels = torch.full_like(ids, -100)
    for row, (full, start) in enumerate(encoded):
        labels[row, start : len(full)] = ids[row, start : len(full)]
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
        try:
            for _ in range(hparams.num_steps):
                optimizer.zero_grad()
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                loss = _token_nll(logits, labels)
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


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over cases of the mean NLL of each case's target tokens."""
    logprobs = torch.log_softmax(logits[:, :-1], -1)
    targets = labels[:, 1:]
    valid = targets != -100
    picked = logprobs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1) * valid
    return (-(picked.sum(1) / valid.sum(1).clamp_min(1))).mean()
