"""KN, Knowledge Neurons (Dai et al. 2022): find the MLP neurons that express a fact, rewrite their values.

Neurons. The MLP of layer l is ``FFN(h) = W_out · act(W_in h)``; its intermediate activations
w⁽ˡ⁾ (``d_ff`` of them, the input of the ``mlp_out`` projection) are the neurons. Column i of W_out
(``d_model``) is neuron i's value vector v_i: what the neuron writes into the residual stream.

Attribution (Dai et al. Eq. 2-3). With P_x(ŵ) the probability of the fact's answer y* (the first
token of ``target_true``) after prompt x when the neurons of one layer at the prompt's last token
are set to ŵ, and w̄ their actual values,

    Attr(w_i) = w̄_i ∫₀¹ ∂P_x(α w̄) / ∂w_i dα  ≈  w̄_i / m Σ_{k=1..m} ∂P_x(k/m · w̄) / ∂w_i

(a right Riemann sum with m = ``steps``). One layer is scaled at a time; its m steps for every prompt
run as rows of one batch (of at most ``batch_size`` rows), from that layer's block up: the blocks
below see the same prompts at every step, so they run once (:func:`kelib.editors.partial.freeze_below`).
Integrated gradients is *complete*: Σ_i Attr(w_i) → P_x(w̄) - P_x(0) as m grows (tests/test_kn.py
checks it).

Selection (§3.3). The prompts are the case prompt behind ROME's generated context prefixes
(``{}`` first, so the plain prompt is one of them; repeated prompts counted once). For each prompt, a
neuron is *coarse* when its attribution is positive and at least ``adaptive_threshold`` times that
prompt's largest attribution over all edited layers (EasyEdit's adaptive threshold t); a neuron is
kept when it is coarse in at least a fraction ``p`` of the prompts (the refinement step), at most
``max_neurons`` of them, those with the largest mean attribution over the prompts.

Edit (§5, "updating facts"). For each kept neuron (l, i),

    v_i ← v_i - λ_erase · e(y*) + λ_add · e(y_new)

with e(·) the row of the output embedding (unembedding) of a target's first token. ΔW is therefore
nonzero only in the kept neurons' columns. Several cases in one call are edited one after another,
each on the model with the earlier ones applied (as ROME's code does); the returned ΔW is their sum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import EditError, EditResult, check_cases, register
from kelib.editors.context import rome_templates, split_template
from kelib.editors.partial import Upper, freeze_below
from kelib.models import (
    add_to_weight,
    check_layer,
    device_of,
    edited_module,
    get_weight,
    keys_and_values,
    set_weight,
)
from kelib.tokens import TokenError, encode, pad_batch, with_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KNHyperParams:
    layers: list[int]  # layers whose neurons are attributed and may be edited (EasyEdit: all)
    steps: int = 20  # m, Riemann steps of the integrated gradients
    adaptive_threshold: float = 0.2  # coarse: Attr >= this x the prompt's max Attr
    p: float = 0.7  # kept: coarse in at least this fraction of the prompts
    max_neurons: int | None = None  # keep at most this many (largest mean Attr); None: all that pass
    erase_scale: float = 1.0  # λ_erase on e(target_true)
    add_scale: float = 8.0  # λ_add on e(target_new)
    context_template_length_params: list[list[int]] = ((5, 5),)  # [] attributes on the plain prompt only
    batch_size: int = 200  # rows (prompt x step) per forward pass of the attribution
    seed: int = 0  # context templates are sampled


@register("KN", KNHyperParams, batchable=False)
def compute_update(model, tok, cases: Sequence, hparams: KNHyperParams, stats=None, state=None) -> EditResult:
    layers = [check_layer(model, layer) for layer in hparams.layers]
    _check_hparams(hparams)
    check_cases(cases, tok)
    _check_true_targets(cases, tok)
    originals = {layer: get_weight(model, layer).detach().clone() for layer in layers}
    totals = {layer: torch.zeros_like(w, dtype=torch.float32) for layer, w in originals.items()}
    n_neurons = 0
    try:
        for case in cases:
            selected = select_neurons(model, tok, case, hparams)
            n_neurons += sum(len(i) for i in selected.values())
            for layer, delta in neuron_update(model, tok, case, selected, hparams).items():
                add_to_weight(model, layer, delta)  # the next case is attributed on the edited model
                totals[layer] += delta
    finally:
        for layer, weight in originals.items():
            set_weight(model, layer, weight)
    return EditResult(deltas=totals, info={"n_neurons": n_neurons / len(cases)})


def _check_hparams(hparams: KNHyperParams) -> None:
    if hparams.steps < 1 or hparams.batch_size < 1:
        raise EditError(f"KN needs steps >= 1 and batch_size >= 1, got {hparams.steps}, {hparams.batch_size}")
    if not 0.0 < hparams.p <= 1.0 or not 0.0 <= hparams.adaptive_threshold <= 1.0:
        raise EditError(f"KN needs 0 < p <= 1 and 0 <= adaptive_threshold <= 1, got {hparams.p}, "
                        f"{hparams.adaptive_threshold}")
    if hparams.max_neurons is not None and hparams.max_neurons < 1:
        raise EditError(f"max_neurons must be >= 1 or null, got {hparams.max_neurons}")


def _check_true_targets(cases: Sequence, tok) -> None:
    """KN attributes the true answer too: it must tokenize after the prompt (check_cases checks the new one)."""
    for case in cases:
        try:
            with_target(tok, case.prompt, case.target_true)
        except TokenError as err:
            raise EditError(f"case {case.case_id}: {err}") from err


def attribution_prompts(model, tok, case, hparams: KNHyperParams) -> list[str]:
    """The case prompt behind each of ROME's context templates (the plain prompt first), each once."""
    templates = rome_templates(model, tok, hparams.context_template_length_params, hparams.seed)
    # A small model samples the same prefix more than once; a repeated prompt is no new evidence.
    return list(dict.fromkeys(split_template(t) + case.prompt for t in templates))


def select_neurons(model, tok, case, hparams: KNHyperParams) -> dict[int, torch.Tensor]:
    """The knowledge neurons of ``case``'s fact: ``{layer: LongTensor of neuron indices}`` (every layer
    of ``hparams.layers``, possibly empty)."""
    prompts = attribution_prompts(model, tok, case, hparams)
    attributions = neuron_attributions(
        model, tok, prompts, case.target_true, hparams.layers, hparams.steps, hparams.batch_size
    )
    return refine(attributions, hparams.adaptive_threshold, hparams.p, hparams.max_neurons)


def refine(
    attributions: dict[int, torch.Tensor], adaptive_threshold: float, p: float, max_neurons: int | None
) -> dict[int, torch.Tensor]:
    """Neurons coarse in at least a fraction ``p`` of the prompts (see the module docstring).

    Args:
        attributions: ``{layer: [n_prompts, d_ff]}`` from :func:`neuron_attributions`.
    """
    layers = list(attributions)
    scores = torch.stack([attributions[layer] for layer in layers], 1)  # [n_prompts, n_layers, d_ff]
    n_prompts = scores.shape[0]
    peak = scores.flatten(1).max(1).values.clamp_min(0)[:, None, None]
    # A neuron must also help (Attr > 0): a prompt whose best neuron is negative has no coarse ones.
    coarse = (scores >= adaptive_threshold * peak) & (scores > 0)
    needed = math.ceil(p * n_prompts - 1e-9)
    kept = coarse.sum(0) >= needed  # [n_layers, d_ff]
    mean = scores.mean(0).masked_fill(~kept, float("-inf"))
    order = mean.flatten().argsort(descending=True)[: int(kept.sum())]
    if max_neurons is not None:
        order = order[:max_neurons]
    width = scores.shape[2]
    chosen = {layer: [] for layer in layers}
    for flat in order.tolist():
        chosen[layers[flat // width]].append(flat % width)
    return {layer: torch.tensor(sorted(idx), dtype=torch.long) for layer, idx in chosen.items()}


def neuron_attributions(
    model, tok, prompts: Sequence[str], target: str, layers: Sequence[int], steps: int = 20, batch_size: int = 200
) -> dict[int, torch.Tensor]:
    """Integrated-gradients attribution of each neuron of each layer to P(target's first token | prompt).

    Returns ``{layer: [n_prompts, d_ff]}`` (float32): Attr(w_i) of the neurons at each prompt's last
    token, each layer scaled on its own (Dai et al. Eq. 3, see the module docstring).
    """
    device = device_of(model)
    encoded = [encode(tok, p) for p in prompts]
    target_ids = [full[start] for full, start in (with_target(tok, p, target) for p in prompts)]
    last = [len(e) - 1 for e in encoded]
    ids, mask = pad_batch(encoded, tok.pad_token_id, device)
    found = keys_and_values(model, ids, mask, last, layers)
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    # Row r of the scaled batch is prompt r // steps at step r % steps.
    rows = torch.arange(len(prompts), device=device).repeat_interleave(steps)
    result = {}
    for layer in layers:
        w_bar = found[layer][0]  # [n_prompts, d_ff]
        scaled = (w_bar[:, None, :] * alphas[None, :, None]).flatten(0, 1)  # [n_prompts * steps, d_ff]
        # The neurons sit inside block ``layer``: the blocks below see the same prompts at every step,
        # so they run once per prompt and the scaled rows start at that block.
        upper = freeze_below(model, ids, mask, layer)
        grads = torch.cat([
            _probability_grad(model, layer, upper.subset(rows[c]), torch.tensor([last[r] for r in rows[c].tolist()]),
                              [target_ids[r] for r in rows[c].tolist()], scaled[c])
            for c in torch.arange(len(rows), device=device).split(batch_size)
        ])
        result[layer] = w_bar * grads.view(len(prompts), steps, -1).mean(1)
    return result


def _probability_grad(model, layer, upper: Upper, last: torch.Tensor, target_ids, neurons) -> torch.Tensor:
    """∂P(target | prompt)/∂w for each row of ``upper`` (the model from block ``layer`` up), with the
    layer's neurons at the last token set to ``neurons``."""
    neurons = neurons.detach().clone().requires_grad_(True)
    rows = torch.arange(len(last), device=upper.hidden.device)
    cols = last.to(upper.hidden.device)

    def replace(_module, args, kwargs):
        # The neurons are the input of mlp_out: overwrite it at the last token, out of place so the
        # gradient reaches ``neurons``.
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        hidden = hidden.index_put((rows, cols), neurons.to(hidden.dtype))
        if args:
            return (hidden, *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else "input"
        return args, {**kwargs, key: hidden}

    handle = edited_module(model, layer).register_forward_pre_hook(replace, with_kwargs=True)
    try:
        with torch.enable_grad():
            logits = upper.run(upper.hidden, rows, cols).float()
            probs = torch.softmax(logits, -1)[rows, torch.tensor(target_ids, device=rows.device)]
            # Rows are independent, so the gradient of the sum is each row's own gradient.
            (grad,) = torch.autograd.grad(probs.sum(), neurons)
    finally:
        handle.remove()
    return grad.float()


def neuron_update(model, tok, case, selected: dict[int, torch.Tensor], hparams: KNHyperParams) -> dict:
    """ΔW per layer: ``-λ_erase e(target_true) + λ_add e(target_new)`` in each selected neuron's column."""
    embedding = model.get_output_embeddings().weight  # [vocab, d_model]
    true_id = _first_token(tok, case.prompt, case.target_true)
    new_id = _first_token(tok, case.prompt, case.target_new)
    change = hparams.add_scale * embedding[new_id].float() - hparams.erase_scale * embedding[true_id].float()
    deltas = {}
    for layer, neurons in selected.items():
        delta = torch.zeros_like(get_weight(model, layer), dtype=torch.float32)
        delta[:, neurons.to(delta.device)] = change.to(delta.device)[:, None]
        deltas[layer] = delta
    if not any(len(n) for n in selected.values()):
        log.warning("KN: no neuron of case %s passed the refinement; its update is zero", case.case_id)
    return deltas


def _first_token(tok, prompt: str, target: str) -> int:
    full, start = with_target(tok, prompt, target)
    return full[start]
