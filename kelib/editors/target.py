"""The target value an edit must write: ROME's v* (``compute_v``) and MEMIT's z (``compute_z``).

A vector δ is added to one module's output at the lookup position of every rewriting prompt
(context template + prompt + all target tokens but the last). δ minimises

    NLL(target_new | rewriting prompts)                      (mean per token, mean over prompts)
  + kl_factor · KL(p_δ || p_0) on "{subject} is a"          (next-token distribution at its lookup position)
  + v_weight_decay · ||δ|| / ||v_0||²

with Adam, projecting δ onto the ball ``||δ|| <= clamp_norm_factor · ||v_0||`` after every step and
stopping early once the loss is below 5e-2. ``v_0`` is the module's output at the plain prompt's
lookup position; the result is ``v* = v_0 + δ``. ROME hooks the MLP output of the edited layer
(``part="mlp_out"``); MEMIT the residual stream after its last edited layer (``part="block"``).

:func:`optimize_targets` optimises one δ per part jointly (PMET: the attention and the MLP output of
the same layer), each with its own decay term and clamp ball.

How it is computed (:func:`optimize_cases`, issue #14): all cases of a batch at once, one δ each and
each with its own early stop; one pass without gradients fixes everything below the edited layer,
and every step runs only the blocks above it, the unembedding at the positions the loss reads, and
one gather for the NLL of all rows. The per-template, full-forward computation it replaced is kept as
:func:`optimize_targets_reference`; :func:`reference_path` switches the editors back to it for the
equivalence tests and the speed benchmark.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.editors.base import FactToken
from kelib.editors.context import lookup_index, split_template
from kelib.editors.partial import Upper, freeze_below
from kelib.models import capture, device_of, module_name, patch_output
from kelib.tokens import encode, pad_batch, with_target

EARLY_STOP_LOSS = 5e-2
# Rows (templates + KL prompt, per case) of one optimisation pass: bounds the activations kept for the
# backward pass (on GPT-2 XL, about 30 blocks above the edited layer).
ROWS_PER_PASS = 256


@dataclass(frozen=True, kw_only=True)
class TargetSettings:
    """Hyperparameters of the target-value optimisation, shared by ROME, MEMIT and AlphaEdit (whose
    hyperparameter classes extend this one and may change its defaults)."""

    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    seed: int = 0  # context templates are sampled


@dataclass
class Target:
    value: torch.Tensor  # v* = v_0 + δ, [d]
    initial: torch.Tensor  # v_0, [d]
    loss: float
    steps: int
    target_prob: float  # mean probability of the target tokens at the end


@dataclass
class CaseTargets:
    """What the optimisation finds for one case: a :class:`Target` per part, and the key statistics of
    W = the MLP output projection of ``layer`` read in the same pass (ROME's k̄ and W k̄ + b)."""

    targets: list[Target]  # in the order of ``parts``
    key: torch.Tensor  # k̄: the input of W at the lookup position, mean over the templates, [d_in]
    key_output: torch.Tensor  # W k + b at the same positions, mean over the templates, [d_out]


_reference = False


@contextlib.contextmanager
def reference_path():
    """Run the editors on their code path from before issue #14 (per-template loss, a full forward per
    step, separate passes for keys), for the equivalence tests and the benchmark's before/after ratio."""
    global _reference
    previous, _reference = _reference, True
    try:
        yield
    finally:
        _reference = previous


def on_reference_path() -> bool:
    return _reference


def optimize_target(
    model, tok, case, layer: int, part: str, templates: Sequence[str], settings: TargetSettings
) -> Target:
    """v* for one case at ``(layer, part)``; see the module docstring."""
    return optimize_targets(model, tok, case, layer, [part], templates, settings)[0]


def optimize_targets(
    model, tok, case, layer: int, parts: Sequence[str], templates: Sequence[str], settings: TargetSettings,
    decay_power: float = 2.0,
) -> list[Target]:
    """One v* per part of ``layer``, optimised jointly (one δ per part in the same forward pass).

    ``decay_power``: the decay term is ``||δ|| / ||v_0||^decay_power`` per part (2 in ROME's and
    MEMIT's code, 1 in PMET's).
    """
    if _reference:
        return optimize_targets_reference(model, tok, case, layer, parts, templates, settings, decay_power)
    return optimize_cases(model, tok, [case], layer, parts, templates, settings, decay_power)[0].targets


# Families whose blocks add the MLP output to the residual stream as their last operation, so that δ
# on the MLP output at a position is δ on the block's output there (no norm after the MLP, as in
# Gemma 2 or OLMo 2). Others re-run the edited block with the δ hooked in.
_MLP_OUT_ENDS_BLOCK = {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"}


@dataclass
class _Rows:
    """The rewriting prompts and KL prompts of a batch of cases, and where the loss reads them."""

    ids: torch.Tensor  # [rows, seq]: per case, one row per template, then its KL prompt
    mask: torch.Tensor
    lookup: torch.Tensor  # [rows]: the lookup position of each row
    case: torch.Tensor  # [rows]: the case each row belongs to
    first: torch.Tensor  # [cases]: each case's first row (its first template: where v_0 is read)
    kl: torch.Tensor  # [cases]: each case's KL row
    token_row: torch.Tensor  # [tokens]: per target token, its row ...
    token_pos: torch.Tensor  # ... the position that predicts it ...
    token_id: torch.Tensor  # ... its id ...
    token_weight: torch.Tensor  # ... and 1 / (target length x templates): NLL per token, mean over templates


def _rows(tok, cases, templates: Sequence[str], fact_token: str, device) -> _Rows:
    rows, lookup, case_of, first, kl = [], [], [], [], []
    token_row, token_pos, token_id, token_weight = [], [], [], []
    for c, case in enumerate(cases):
        first.append(len(rows))
        for template in templates:
            prefix = split_template(template)
            full, start = with_target(tok, prefix + case.prompt, case.target_new)
            r = len(rows)
            rows.append(full[:-1])  # the last target token is predicted, never input
            lookup.append(lookup_index(tok, prefix, case.prompt, case.subject, fact_token))
            n = len(full) - start
            token_row += [r] * n
            token_pos += range(start - 1, len(full) - 1)
            token_id += full[start:]
            token_weight += [1.0 / (n * len(templates))] * n
        kl_prompt = f"{case.subject} is a"
        kl.append(len(rows))
        rows.append(encode(tok, kl_prompt))
        lookup.append(lookup_index(tok, "", kl_prompt, case.subject, fact_token))
        case_of += [c] * (len(templates) + 1)
    ids, mask = pad_batch(rows, tok.pad_token_id, device)

    def t(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return _Rows(ids, mask, t(lookup), t(case_of), t(first), t(kl), t(token_row), t(token_pos), t(token_id),
                 t(token_weight, torch.float32))


def optimize_cases(
    model, tok, cases: Sequence, layer: int, parts: Sequence[str], templates: Sequence[str],
    settings: TargetSettings, decay_power: float = 2.0,
) -> list[CaseTargets]:
    """:func:`optimize_targets` for every case of a batch at once, with the same result per case.

    The cases' losses are separable (each δ_i enters only its own case's rows), so one forward and one
    backward over all rows give each δ_i the gradient it gets alone, and Adam, elementwise, makes the
    same step. A case stops, as alone, once its loss is below the early-stop threshold: its δ is kept
    from that step and its rows leave the batch.

    One pass without gradients fixes the hidden states below ``layer`` and reads v_0 and the keys;
    each step then runs only the blocks above the edited one (:mod:`kelib.editors.partial`) and the
    unembedding at the target and KL positions, and takes the NLL with one gather over all rows.
    Batches of more than :data:`ROWS_PER_PASS` rows are optimised in consecutive groups of cases.
    """
    per_pass = max(1, ROWS_PER_PASS // (len(templates) + 1))
    if len(cases) > per_pass:
        return [found for lo in range(0, len(cases), per_pass)
                for found in optimize_cases(model, tok, cases[lo : lo + per_pass], layer, parts, templates,
                                            settings, decay_power)]
    device = device_of(model)
    plan = _rows(tok, cases, templates, settings.fact_token, device)
    n_cases = len(cases)
    additive = all(p == "block" or (p == "mlp_out" and model.config.model_type in _MLP_OUT_ENDS_BLOCK)
                   for p in parts)
    template_rows = torch.ones(len(plan.case), dtype=torch.bool, device=device)
    template_rows[plan.kl] = False
    with contextlib.ExitStack() as stack:
        seen = {p: stack.enter_context(capture(model, [layer], p))[layer] for p in {*parts, "mlp_out"}}
        upper = freeze_below(model, plan.ids, plan.mask, layer + 1 if additive else layer)
    initial = {p: seen[p]["value"][plan.first, plan.lookup[plan.first]].float() for p in parts}
    # k̄ and W k̄ + b per case: the mean over its template rows (causal attention: the target tokens
    # after the lookup position do not change what is read there).
    rows = torch.nonzero(template_rows).squeeze(1)
    keys = seen["mlp_out"]["key"][rows, plan.lookup[rows]].float().view(n_cases, len(templates), -1).mean(1)
    outs = seen["mlp_out"]["value"][rows, plan.lookup[rows]].float().view(n_cases, len(templates), -1).mean(1)
    del seen

    deltas = {p: torch.zeros_like(initial[p], requires_grad=True) for p in parts}
    optimizer = torch.optim.Adam(list(deltas.values()), lr=settings.v_lr)
    limits = {p: settings.clamp_norm_factor * initial[p].norm(dim=1) for p in parts}
    scales = {p: initial[p].norm(dim=1) ** decay_power for p in parts}
    found = {p: torch.zeros_like(initial[p]) for p in parts}
    loss_of, steps_of, prob_of = [float("nan")] * n_cases, [0] * n_cases, [0.0] * n_cases
    active = list(range(n_cases))
    kl_init = None
    view = None  # (active cases, their rows' indices into the plan, the upper model on those rows)
    for step in range(settings.v_num_grad_steps):
        if view is None or view[0] != active:
            view = _view(plan, upper, active, n_cases)
        _, sel, part_upper, local = view
        delta_rows = {p: deltas[p][plan.case[sel]] for p in parts}
        logits = _forward(model, layer, part_upper, plan.lookup[sel], delta_rows, additive, local)
        logprobs = torch.log_softmax(logits.float(), -1)
        n_tok = len(local["token_case"])
        lp = logprobs[:n_tok].gather(-1, local["token_id"][:, None]).squeeze(-1)
        weights = local["token_weight"]
        nll = torch.zeros(len(active), device=device).index_add(0, local["token_case"], -lp * weights)
        prob = torch.zeros(len(active), device=device).index_add(0, local["token_case"], lp.detach().exp() * weights)
        kl_logprobs = logprobs[n_tok:]
        if kl_init is None:
            kl_init = kl_logprobs.detach().clone()  # every case is active at step 0
        kl = settings.kl_factor * torch.nn.functional.kl_div(
            kl_init[active], kl_logprobs, log_target=True, reduction="none").sum(-1)
        decay = sum(settings.v_weight_decay * deltas[p][active].norm(dim=1) / scales[p][active] for p in parts)
        loss = nll + kl + decay
        values, probs = loss.tolist(), prob.tolist()
        last = step == settings.v_num_grad_steps - 1
        still = []
        for i, c in enumerate(active):
            loss_of[c], steps_of[c], prob_of[c] = values[i], step + 1, probs[i]
            if values[i] < EARLY_STOP_LOSS or last:
                for p in parts:
                    found[p][c] = deltas[p][c].detach()
            else:
                still.append(i)
        if not still:
            break
        optimizer.zero_grad()
        loss[still].sum().backward()
        optimizer.step()
        active = [active[i] for i in still]
        with torch.no_grad():
            for p, delta in deltas.items():
                norms = delta.norm(dim=1)
                over = norms > limits[p]
                delta[over] *= (limits[p][over] / norms[over])[:, None]
    return [
        CaseTargets(
            [Target(initial[p][c] + found[p][c], initial[p][c], loss_of[c], steps_of[c], prob_of[c]) for p in parts],
            keys[c], outs[c])
        for c in range(n_cases)
    ]


def _view(plan: _Rows, upper: Upper, active: list[int], n_cases: int):
    """The batch restricted to the rows of the ``active`` cases, with the loss's indices renumbered."""
    device = plan.ids.device
    if len(active) == n_cases:
        sel = torch.arange(len(plan.case), device=device)
        part_upper = upper
    else:
        keep = torch.zeros(n_cases, dtype=torch.bool, device=device)
        keep[active] = True
        sel = torch.nonzero(keep[plan.case]).squeeze(1)
        part_upper = upper.subset(sel)
    new_row = torch.full((len(plan.case),), -1, dtype=torch.long, device=device)
    new_row[sel] = torch.arange(len(sel), device=device)
    new_case = torch.full((n_cases,), -1, dtype=torch.long, device=device)
    new_case[active] = torch.arange(len(active), device=device)
    tokens = torch.nonzero(new_row[plan.token_row] >= 0).squeeze(1)
    rows = new_row[plan.token_row[tokens]]
    kl_rows = new_row[plan.kl[active]]
    local = {
        "token_case": new_case[plan.case[plan.token_row[tokens]]],
        "token_id": plan.token_id[tokens],
        "token_weight": plan.token_weight[tokens],
        "read_rows": torch.cat([rows, kl_rows]),
        "read_cols": torch.cat([plan.token_pos[tokens], plan.lookup[plan.kl[active]]]),
    }
    return list(active), sel, part_upper, local


def _forward(model, layer: int, upper: Upper, lookup: torch.Tensor, delta_rows: dict, additive: bool, local):
    """Logits at the loss's positions with each row's δ added at its lookup position."""
    rows = torch.arange(len(lookup), device=lookup.device)

    def add(hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return hidden.index_put((rows, lookup), delta.to(hidden.dtype), accumulate=True)

    if additive:  # δ enters the residual stream leaving block ``layer``: ``upper`` starts above it
        hidden = upper.hidden
        for delta in delta_rows.values():
            hidden = add(hidden, delta)
        return upper.run(hidden, local["read_rows"], local["read_cols"])
    with contextlib.ExitStack() as patches:
        for part, delta in delta_rows.items():
            patches.enter_context(patch_output(model, module_name(model, layer, part),
                                               lambda hidden, delta=delta: add(hidden, delta)))
        return upper.run(upper.hidden, local["read_rows"], local["read_cols"])

def optimize_targets_reference(
    model, tok, case, layer: int, parts: Sequence[str], templates: Sequence[str], settings: TargetSettings,
    decay_power: float = 2.0,
) -> list[Target]:
    """:func:`optimize_targets` as kelib computed it before issue #14: a full forward pass per step and
    the NLL gathered one template at a time. Kept as the reference the vectorised path is tested and
    benchmarked against (:func:`reference_path`); not used otherwise."""
    device = device_of(model)
    rows, lookups, target_spans, targets = [], [], [], []
    for template in templates:
        prefix = split_template(template)
        full, start = with_target(tok, prefix + case.prompt, case.target_new)
        rows.append(full[:-1])  # the last target token is predicted, never input
        target_spans.append((start, len(full)))
        targets.append(torch.tensor(full[start:], device=device))
        lookups.append(lookup_index(tok, prefix, case.prompt, case.subject, settings.fact_token))
    kl_prompt = f"{case.subject} is a"
    rows.append(encode(tok, kl_prompt))
    lookups.append(lookup_index(tok, "", kl_prompt, case.subject, settings.fact_token))
    ids, mask = pad_batch(rows, tok.pad_token_id, device)
    row_index = torch.arange(len(rows), device=device)
    lookup_tensor = torch.tensor(lookups, device=device)
    initial: dict[str, torch.Tensor] = {}
    deltas = {part: torch.zeros(_width(model, layer, part, ids, mask), device=device, requires_grad=True)
              for part in parts}

    def add_delta(part: str):
        def fn(hidden: torch.Tensor) -> torch.Tensor:
            if part not in initial:
                initial[part] = hidden[0, lookups[0]].detach().float().clone()
            hidden = hidden.clone()
            hidden[row_index, lookup_tensor] = hidden[row_index, lookup_tensor] + deltas[part].to(hidden.dtype)
            return hidden

        return fn

    optimizer = torch.optim.Adam(list(deltas.values()), lr=settings.v_lr)
    kl_init = None
    loss_value, steps, target_prob = float("nan"), 0, 0.0
    for step in range(settings.v_num_grad_steps):
        optimizer.zero_grad()
        with contextlib.ExitStack() as patches:
            for part in parts:
                patches.enter_context(patch_output(model, module_name(model, layer, part), add_delta(part)))
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits, -1)
        nlls, probs = [], []
        for r, (s, e) in enumerate(target_spans):
            lp = logprobs[r, s - 1 : e - 1].gather(-1, targets[r][:, None]).squeeze(-1)
            nlls.append(-lp.mean())
            probs.append(lp.exp().mean())
        nll = torch.stack(nlls).mean()
        kl_logprobs = logprobs[-1, lookups[-1]]
        if kl_init is None:
            kl_init = kl_logprobs.detach().clone()
        kl = settings.kl_factor * torch.nn.functional.kl_div(
            kl_init, kl_logprobs, log_target=True, reduction="sum"
        )
        decay = sum(
            settings.v_weight_decay * deltas[p].norm() / initial[p].norm() ** decay_power for p in parts
        )
        loss = nll + kl + decay
        loss_value, steps, target_prob = loss.item(), step + 1, torch.stack(probs).mean().item()
        if loss_value < EARLY_STOP_LOSS:
            break
        if step == settings.v_num_grad_steps - 1:
            break
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for part, delta in deltas.items():
                limit = settings.clamp_norm_factor * initial[part].norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return [
        Target(initial[p] + deltas[p].detach(), initial[p], loss_value, steps, target_prob) for p in parts
    ]


@torch.no_grad()
def _width(model, layer: int, part: str, ids, mask) -> int:
    seen = {}

    def grab(hidden):
        seen["d"] = hidden.shape[-1]
        return hidden

    with patch_output(model, module_name(model, layer, part), grab):
        model(input_ids=ids[:1, :2], attention_mask=mask[:1, :2])
    return seen["d"]
