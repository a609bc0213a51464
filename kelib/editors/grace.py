"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook adaptor at one layer; the weights never change.

The adaptor wraps one projection (the MLP output, as EasyEdit's configs for GPT-J and LLaMA). Its
codebook holds entries (k_i, v_i, ε_i, y_i): a key (the projection's input at the edited prompt's last
token), a value (what the projection outputs instead), a deferral radius and the edit's label (its new
target). A token whose key h satisfies min_i ||h − k_i|| <= ε_i of its nearest entry i gets v_i as the
projection's output; every other token passes through unchanged.

Adding an edit with key k and label y (GRACE §3, EasyEdit's ``coverage`` expansion), with i the
nearest entry and d = ||k − k_i||:

- d > ε_i + ε_init: a new entry (k, v, ε_init);
- d <= ε_i + ε_init and y = y_i: the entry expands, ε_i ← max(ε_i, d), and its value is retrained
  (d with a relative margin of 1e-4: the key read again inside a longer forward differs from the one
  placed by float rounding, and a key exactly on the boundary could fall outside);
- d <= ε_i + ε_init and y != y_i: split, a new entry, and both radii become d / 2 (a key that
  coincides with the entry's, the same prompt edited again, relabels the entry instead).

The value is trained on the edit's target NLL alone (Adam, ``edit_lr``, at most ``n_iter`` steps,
stopping early), starting from the projection's own output (``warm``) or uniform noise (``cold``).

Deviation, on purpose: EasyEdit's adaptor compares the *last* token of every input against the
codebook (``replace_last``). kelib scores targets by teacher forcing, where the prompt's last token is
not the input's last, so the adaptor checks every token and replaces those inside a ball. A prompt
followed by its target behaves as the prompt alone would at the prompt's last token.

Because the weights stay bit-identical, the L1 norm and condition number of the edited layer are flat
under any number of GRACE edits: the runner records them anyway, and the notebooks show that line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from kelib.editors.base import EditError, EditResult, check_cases, register
from kelib.editors.context import keys_at
from kelib.editors.partial import freeze_below
from kelib.models import check_layer, device_of, edited_module, output_hidden, weight_shape
from kelib.tokens import pad_batch, with_target


@dataclass(frozen=True)
class GRACEHyperParams:
    layers: list[int]  # one layer; the adaptor wraps its MLP output projection
    eps: float = 1.0  # ε_init, the initial deferral radius (in key-space L2 distance)
    edit_lr: float = 1.0
    n_iter: int = 100
    early_stop_loss: float = 1e-2
    val_init: Literal["warm", "cold"] = "cold"
    seed: int = 0


def _empty_codebook(d_in: int, d_out: int, device) -> dict:
    return {
        "keys": torch.zeros(0, d_in, device=device),
        "values": torch.zeros(0, d_out, device=device),
        "epsilons": torch.zeros(0, device=device),
        "labels": [],
    }


def lookup(codebook: dict, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For keys ``[n, d_in]``: which entry each falls into (``[n]``, -1 for none) and the mask.

    Distances to every entry come from one matrix product (fast: the adaptor runs on every token of
    every evaluation), then the :data:`REFINED` nearest entries' distances are recomputed as exact
    differences, which decide: a key must be at distance 0 from itself, and the product's rounding
    (about 1e-7 of the keys' squared norm) must not move a key across a radius."""
    if len(codebook["keys"]) == 0:
        none = torch.full((len(hidden_in),), -1, dtype=torch.long, device=hidden_in.device)
        return none, none >= 0
    queries = hidden_in.float()
    keys = codebook["keys"].to(hidden_in.device).float()
    approx = torch.cdist(queries, keys, compute_mode="use_mm_for_euclid_dist")
    candidates = approx.topk(min(REFINED, len(keys)), dim=1, largest=False).indices  # [n, k]
    exact = (queries[:, None, :] - keys[candidates]).norm(dim=-1)
    nearest_dist, at = exact.min(1)
    nearest = candidates.gather(1, at[:, None]).squeeze(1)
    inside = nearest_dist <= codebook["epsilons"].to(hidden_in.device)[nearest]
    return torch.where(inside, nearest, -1), inside


# Entries whose distance lookup() recomputes exactly: the product's rounding can reorder only entries
# at nearly the same distance, far fewer than this.
REFINED = 8


@contextlib.contextmanager
def adaptor(model, layer: int, codebook: dict, values: torch.Tensor | None = None):
    """Run the model with the codebook in place at ``layer`` (``values`` overrides the stored values,
    so training can differentiate through them)."""
    module = edited_module(model, layer)

    def hook(_module, args, output):
        hidden = output_hidden(output)
        flat_in = args[0].reshape(-1, args[0].shape[-1])
        chosen, inside = lookup(codebook, flat_in)
        if not inside.any():
            return output
        table = codebook["values"] if values is None else values
        flat_out = hidden.reshape(-1, hidden.shape[-1])
        replaced = torch.where(inside[:, None], table.to(flat_out)[chosen.clamp_min(0)], flat_out)
        return replaced.view_as(hidden)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def view(model, state: dict):
    """The runner's evaluation view: the model answering through the run's codebook, declared to the
    lm-eval cache (the weights do not change, so their fingerprint alone would read back the
    unedited model's results)."""
    if "codebook" not in state:
        yield
        return
    from kelib.evaluation import declared_view

    with adaptor(model, state["layer"], state["codebook"]), \
            declared_view(model, f"GRACE:{codebook_fingerprint(state['layer'], state['codebook'])}"):
        yield


def codebook_fingerprint(layer: int, codebook: dict) -> str:
    """A hash of everything the adaptor answers with: layer, keys, values, radii and labels."""
    import hashlib

    digest = hashlib.sha256(f"{layer}|{codebook['labels']}".encode())
    for name in ("keys", "values", "epsilons"):
        digest.update(codebook[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@register("GRACE", GRACEHyperParams, batchable=False, view=view)
def compute_update(model, tok, cases: Sequence, hparams: GRACEHyperParams, stats=None, state: dict | None = None) -> EditResult:
    """Adds the cases to the codebook in ``state`` (one after another) and returns no weight update."""
    if len(hparams.layers) != 1:
        raise ValueError(f"GRACE wraps one layer, got layers={hparams.layers}")
    layer = check_layer(model, hparams.layers[0])
    check_cases(cases, tok)
    state = {} if state is None else state
    d_out, d_in = weight_shape(model, layer)
    codebook = {k: (v.clone() if torch.is_tensor(v) else list(v))
                for k, v in state.get("codebook", _empty_codebook(d_in, d_out, device_of(model))).items()}
    losses = []
    for case in cases:
        losses.append(add_edit(model, tok, case, layer, codebook, hparams))
    state["layer"], state["codebook"] = layer, codebook  # committed only once every case succeeded
    return EditResult(deltas={}, info={"loss": sum(losses) / len(losses), "codebook_size": float(len(codebook["labels"]))})


def add_edit(model, tok, case, layer: int, codebook: dict, hparams: GRACEHyperParams) -> float:
    """Insert one case into ``codebook`` (in place); returns the value's final training loss."""
    key, output = keys_at(model, tok, [case], ["{}"], [layer], "prompt_last")[layer]
    slot = place(codebook, key[0], output[0], case.target_new, hparams.eps)
    if hparams.val_init == "cold":
        generator = torch.Generator().manual_seed(hparams.seed)
        codebook["values"][slot] = torch.rand(output.shape[1], generator=generator).to(output)
    return train_value(model, tok, case, layer, codebook, slot, hparams)


def place(codebook: dict, key: torch.Tensor, value: torch.Tensor, label: str, eps: float) -> int:
    """GRACE's codebook rule for a new key (see the module docstring); returns the entry to train.

    A key that coincides with an entry's (distance below 1e-6 of its norm: the same prompt edited
    again) takes that entry over when the label differs, since halving a zero distance would leave
    both balls empty."""
    if not codebook["labels"]:
        return _append(codebook, key, value, eps, label)
    dists = (codebook["keys"] - key.to(codebook["keys"])).norm(dim=1)
    d, i = (float(x) for x in dists.min(0))
    i = int(i)
    if d > float(codebook["epsilons"][i]) + eps:
        return _append(codebook, key, value, eps, label)
    if codebook["labels"][i] == label:
        codebook["epsilons"][i] = max(float(codebook["epsilons"][i]), d * (1 + BOUNDARY_MARGIN))
        return i
    if d <= 1e-6 * float(key.norm()):
        codebook["labels"][i] = label
        return i
    slot = _append(codebook, key, value, d / 2, label)
    codebook["epsilons"][i] = d / 2 - 1e-5  # the old entry yields the boundary
    return slot


BOUNDARY_MARGIN = 1e-4


def _append(codebook: dict, key, value, eps: float, label: str) -> int:
    codebook["keys"] = torch.cat([codebook["keys"], key[None].to(codebook["keys"])])
    codebook["values"] = torch.cat([codebook["values"], value[None].to(codebook["values"])])
    codebook["epsilons"] = torch.cat([codebook["epsilons"], torch.tensor([eps]).to(codebook["epsilons"])])
    codebook["labels"].append(label)
    return len(codebook["labels"]) - 1


def train_value(model, tok, case, layer: int, codebook: dict, slot: int, hparams: GRACEHyperParams) -> float:
    """Fit ``codebook["values"][slot]`` so the edited prompt predicts the target (teacher forcing)."""
    full, start = with_target(tok, case.prompt, case.target_new)
    ids, mask = pad_batch([full], tok.pad_token_id, device_of(model))
    targets = ids[0, start:]
    # the blocks below the adaptor's run once; each step runs the blocks from its layer up
    upper = freeze_below(model, ids, mask, layer)
    rows = torch.zeros(len(targets), dtype=torch.long, device=ids.device)
    cols = torch.arange(start - 1, len(full) - 1, device=ids.device)
    value = codebook["values"][slot].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([value], lr=hparams.edit_lr)
    loss_value = float("nan")
    for _ in range(hparams.n_iter):
        table = torch.cat([codebook["values"][:slot], value[None], codebook["values"][slot + 1 :]])
        with adaptor(model, layer, codebook, values=table):
            logits = upper.run(upper.hidden, rows, cols).float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss_value = loss.item()
        if loss_value < hparams.early_stop_loss:
            break
        if not loss.requires_grad:  # place() guarantees the ball holds the key; this would be a bug, said plainly
            raise EditError(f"GRACE: the key of {case.prompt!r} at layer {layer} falls outside its codebook entry "
                            f"{slot} (radius {float(codebook['epsilons'][slot]):.4g}); its value cannot be trained")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    codebook["values"][slot] = value.detach()
    return loss_value

