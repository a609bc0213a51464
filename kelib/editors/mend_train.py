"""Training MEND's hypernetwork (Mitchell et al. 2022, §3.2) on edits that are not evaluated.

Each training edit (x_e, y_e) comes with equivalent prompts x_e' (same fact, other wording) and
locality prompts x_loc (other facts). The edit's ΔW is computed from its own gradient alone (MEND
trains with one edit per ΔW; EasyEdit accumulates 10 such edits per Adam step, here ``batch_size``)
and applied functionally, through forward hooks that add x ΔWᵀ to each edited layer's output, so the
loss reaches g and the α_l while the base model stays frozen and untouched:

    L = c_edit · NLL(y_e | x_e and each x_e', after ΔW) + c_loc · KL(p_before(·|x_loc) || p_after(·|x_loc))

Training edits:
- ``training_data: world`` (embedded models): the facts of the world's *tune* split (its cases' edited
  facts and their neighbours; ``kelib.embedded.world``), each rewritten to another object of its
  category (seeded); one of the fact's other templates (drawn per training edit) is its equivalent
  prompt, and other tune facts' prompts with their objects, of the same relation where possible, are
  its locality prompts. No eval case, specificity probe, stats fact or unedited fact is among them:
  MEND never trains on what it is scored on.
- any other name: ``kelib.data.load_cases(name)`` (``zsre_train``: the prompt's rephrase is its
  equivalent, the NQ question its locality prompt, as in MEND's zsRE setup).

How this differs from MEND's code is listed in :mod:`kelib.editors.mend`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kelib.config import to_dict
from kelib.data import EditCase, load_cases
from kelib.editors.base import EditError
from kelib.editors.mend_net import (
    MEND_VERSION,
    MENDHyperParams,
    MENDNet,
    embedded_dir,
    encode_targets,
    gradient_factors,
    mend_path,
    model_name,
    token_nll,
)
from kelib.io import atomic_path
from kelib.models import check_layer, device_of, edited_module, weight_shape


def training_cases(model, hparams: MENDHyperParams) -> list[EditCase]:
    """The training edits of ``hparams.training_data`` for ``model`` (never its evaluation cases)."""
    if hparams.training_data == "world":
        folder = embedded_dir(model)
        if folder is None:
            raise EditError(f"training_data 'world' needs an embedded kelib model; {model_name(model)!r} is not one "
                            "(use e.g. zsre_train)")
        return world_training_cases(folder, hparams.n_train_edits, hparams.n_locality, hparams.seed)
    cases = load_cases(hparams.training_data, on_invalid="drop")[: hparams.n_train_edits]
    return [_keep_locality(c, hparams.n_locality) for c in cases]


def _keep_locality(case: EditCase, n: int) -> EditCase:
    from dataclasses import replace

    return replace(case, neighborhood_prompts=case.neighborhood_prompts[:n],
                   neighborhood_answers=case.neighborhood_answers[:n])


def world_training_cases(model_dir: str | Path, n: int, n_locality: int, seed: int) -> list[EditCase]:
    """``n`` edits of the world's tune facts, each to another object of the same category."""
    from kelib.embedded.store import world_of

    world = world_of(model_dir)
    tune = list(world.facts_in("tune"))
    if len(tune) < 2:
        raise EditError(f"MEND trains on the tune split of {model_dir}, which has {len(tune)} facts")
    objects = world.objects_by_category
    by_relation: dict[str, list] = {}
    for fact in tune:
        by_relation.setdefault(fact.relation_id, []).append(fact)
    rng = random.Random(seed)
    out: list[EditCase] = []
    order: list = []
    while len(out) < n:
        if not order:  # every fact once before any twice
            order = tune[:]
            rng.shuffle(order)
        fact = order.pop()
        relation = world.relations[fact.relation_id]
        # Locality prompts of the same relation where there are enough: as CounterFact's
        # neighbourhood, they share the edit's wording and are the ones an edit most easily disturbs.
        same = [g for g in by_relation[fact.relation_id] if g is not fact]
        pool = same if len(same) >= n_locality else [g for g in tune if g is not fact]
        others = rng.sample(pool, n_locality)
        templates = [t for t in relation.templates if t != fact.prompt_template]
        out.append(EditCase(
            case_id=f"mend-world/{len(out)}",
            dataset="world-mend-train",
            subject=fact.subject,
            prompt=fact.prompt(),
            target_true=fact.obj,
            target_new=rng.choice([o for o in objects[relation.category] if o != fact.obj]),
            paraphrase_prompts=(fact.prompt(rng.choice(templates)),),  # one per edit: the step stays small
            neighborhood_prompts=tuple(g.prompt() for g in others),
            neighborhood_answers=tuple(g.obj for g in others),
        ))
    return out


def train_mend(model, tok, hparams: MENDHyperParams, progress: bool = True) -> tuple[MENDNet, dict]:
    """Train g and the α_l for ``model`` (left untouched); returns ``(net, info)``.

    ``info["history"]`` holds ``[total, edit, locality]`` loss per step, ``info["seconds"]`` the time.
    """
    layers = [check_layer(model, layer) for layer in hparams.layers]
    shapes = {weight_shape(model, layer) for layer in layers}
    if len(shapes) != 1:
        raise EditError(f"MEND shares one network across its layers; layers {layers} have shapes {shapes}")
    (d_out, d_in), device = shapes.pop(), device_of(model)
    cases = training_cases(model, hparams)
    if len(cases) < hparams.batch_size:
        raise EditError(f"only {len(cases)} MEND training edits for batch_size {hparams.batch_size}")
    generator = torch.Generator().manual_seed(hparams.seed)
    net = MENDNet(layers, d_in, d_out, hparams.rank, hparams.n_hidden, hparams.edit_lr, generator).to(device).train()
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in net.named_parameters() if n != "edit_lrs"], "lr": hparams.lr},
        {"params": [net.edit_lrs], "lr": hparams.lr_lr},
    ])
    rng = random.Random(hparams.seed)
    order: list[int] = []
    history: list[list[float]] = []
    started = time.time()
    bar = tqdm(range(hparams.train_steps), desc="training MEND", unit="step", disable=not progress)
    for _ in bar:
        batch_cases = []
        for _ in range(hparams.batch_size):
            if not order:
                order = list(range(len(cases)))
                rng.shuffle(order)
            batch_cases.append(cases[order.pop()])
        total, edit, loc = training_loss(model, tok, net, batch_cases, layers, hparams, device)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), hparams.grad_clip)
        optimizer.step()
        history.append([total.item(), edit.item(), loc.item()])
        bar.set_postfix(edit=f"{edit.item():.3f}", loc=f"{loc.item():.4f}")
    bar.close()
    return net.eval(), {"history": history, "seconds": time.time() - started, "n_train_edits": len(cases)}


def training_loss(model, tok, net: MENDNet, cases: Sequence[EditCase], layers, hparams: MENDHyperParams, device):
    """``(total, edit NLL, locality KL)`` of one step: each case edited alone, all in one batch.

    The unedited model gives δ on the edit prompts and p_before on the locality prompts; one forward
    over every row (edit prompt, equivalents, locality prompts), each with its own case's ΔW, gives
    the loss.
    """
    edit_batch = encode_targets(tok, [(c.prompt, c.target_new) for c in cases], device)
    factors, _ = gradient_factors(model, edit_batch, layers)
    with torch.no_grad():
        for layer in layers:
            net.observe(*factors[layer])
    pairs, kinds, owners = [], [], []
    for e, case in enumerate(cases):
        rows = [(case.prompt, case.target_new, 0)] + [(p, case.target_new, 0) for p in case.paraphrase_prompts]
        rows += [(p, a, 1) for p, a in zip(case.neighborhood_prompts, case.neighborhood_answers)]
        pairs += [(p, t) for p, t, _ in rows]
        kinds += [k for _, _, k in rows]
        owners += [e] * len(rows)
    batch = encode_targets(tok, pairs, device)
    is_loc = torch.tensor(kinds, device=device, dtype=torch.bool)[batch.rows]
    # same[r, n]: edit token n belongs to row r's case, so each row sees its own case's ΔW only
    same = (torch.tensor(owners, device=device)[:, None] == edit_batch.rows[None, :]).float()
    transformed = {layer: net.transform(*factors[layer], layer) for layer in layers}
    handles = []
    for layer in layers:
        def hook(_module, args, output, layer=layer):
            u_t, d_t = transformed[layer]
            coef = (args[0].float() @ u_t.T) * same[:, None, :]  # x·ũ_n
            return output + (-net.alpha(layer) * coef @ d_t).to(output.dtype)  # x ΔWᵀ = -α Σ_n (x·ũ_n) δ̃_n

        handles.append(edited_module(model, layer).register_forward_hook(hook))
    try:
        logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    nll = batch.weight * token_nll(logits, batch)
    edit = nll[~is_loc].sum() / (len(kinds) - sum(kinds))  # mean over rows of each row's mean NLL
    loc = torch.zeros((), device=device)
    if is_loc.any():
        loc_pairs = [pair for pair, k in zip(pairs, kinds) if k]
        loc_batch = encode_targets(tok, loc_pairs, device)  # its tokens are the is_loc tokens, in order
        with torch.no_grad():
            before = model(input_ids=loc_batch.ids, attention_mask=loc_batch.mask, use_cache=False).logits
            before = torch.log_softmax(before[loc_batch.rows, loc_batch.cols].float(), -1)
        after = torch.log_softmax(logits[batch.rows[is_loc], batch.cols[is_loc]].float(), -1)
        loc = (before.exp() * (before - after)).sum(-1).mean()  # KL(p_before || p_after) per token
    return hparams.c_edit * edit + hparams.c_loc * loc, edit.detach(), loc.detach()


def train_and_save(model, tok, hparams: MENDHyperParams, progress: bool = True) -> Path:
    """Train MEND for ``model`` and write it (atomically) where :func:`~kelib.editors.mend.load_mend` looks."""
    path = mend_path(model, hparams)
    net, info = train_mend(model, tok, hparams, progress=progress)
    saved = {
        "version": MEND_VERSION,
        "model": model_name(model),
        "hparams": to_dict(hparams),
        "layers": net.layers,
        "d_in": net.d_in,
        "d_out": net.d_out,
        "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        **info,
    }
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)
    return path
