"""MEND (Mitchell et al. 2022, "Fast Model Editing at Scale"): a trained hypernetwork turns the
fine-tuning gradient of an edit into a weight update in one step.

For an edited layer W (``d_out x d_in``) the gradient of the edit loss L is a sum of rank-one terms,

    ∇W L = Σ_t δ_t u_tᵀ,

u_t the layer's input and δ_t = ∂L/∂(W u_t) the gradient at its output, at token t. MEND maps each
pair through a small network g, shared by the edited layers (they have one shape),

    z = [ (u_t - μ_u) / σ_u , (δ_t - μ_δ) / σ_δ ]          (standardised with training statistics)
    h = z + relu(s_l ⊙ (U_1 V_1 z + b_1) + o_l)            (low rank; U = 0 at init: g starts as the identity)
    [ũ_t, δ̃_t] = h + relu(s'_l ⊙ (U_2 V_2 h + b_2) + o'_l)  (s_l, o_l: layer l's scale and shift)

and edits with a learned per-layer step α_l:

    ΔW_l = -α_l Σ_t δ̃_t ũ_tᵀ.

kelib takes the loss on the ``target_new`` tokens only, as the sum over cases of each case's mean
token NLL, and reads (u_t, δ_t) at the positions whose logits predict those tokens. So ΔW has rank at
most the number of target tokens in the batch, and each case contributes what it would alone: the
update of a batch is the sum of its cases' updates.

Differences from MEND's code (eric-mitchell/mend, EasyEdit's copy), stated plainly:

- Only the MLP output projection (``mlp_out``) is edited; MEND also edits the MLP input projections
  of the same layers (``c_fc``, ``fc_in``, ``gate_proj``/``up_proj``).
- (u_t, δ_t) are read at the target-predicting positions only. MEND's code uses every token up to the
  last target token: below the last layer δ_t is not zero at the prompt's tokens, so its ΔW has rank
  up to the number of such tokens.
- MEND's code takes the mean NLL over all target tokens of a batch, which shrinks each case's δ as
  the batch grows; kelib sums the cases' mean NLLs.
- The sign: ΔW = -α ∇̃W as in the paper; the code adds +α ∇̃W and lets training find the sign.
- Training runs a fixed number of steps, without MEND's validation split and early stopping.

The hypernetwork is trained by :mod:`kelib.editors.mend_train` and cached with the model (see
:func:`mend_path`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kelib.config import to_dict
from kelib.editors.base import EditError, EditResult, check_cases, model_key, register
from kelib.io import stable_hash
from kelib.models import check_layer, device_of, edited_module, weight_shape
from kelib.paths import cache_dir
from kelib.tokens import pad_batch, with_target

# Bump when a change to this file or mend_train.py changes what training produces: old caches go stale.
MEND_VERSION = 1


@dataclass(frozen=True)
class MENDHyperParams:
    layers: list[int]  # mlp_out layers edited (MEND: the last three of GPT-2 XL / GPT-J)
    rank: int = 1920  # rank of each low-rank layer of g (MEND's `rank`)
    n_hidden: int = 1  # g has n_hidden + 1 residual layers
    edit_lr: float = 1e-4  # initial α_l (learned)
    # Training (MEND §3.2)
    training_data: str = "zsre_train"  # "world": the embedded model's tune-split facts; else a kelib.data name
    n_train_edits: int = 1000  # distinct training edits
    n_locality: int = 1  # locality prompts per training edit
    train_steps: int = 10_000  # Adam steps
    batch_size: int = 10  # training edits per step, each edited alone (EasyEdit: 1, accumulated over 10)
    lr: float = 1e-6  # Adam, hypernetwork parameters
    lr_lr: float = 1e-4  # Adam, the α_l
    c_edit: float = 0.1  # weight of the edit NLL
    c_loc: float = 1.0  # weight of KL(p_before || p_after) on locality prompts
    grad_clip: float = 100.0
    seed: int = 42


# ---------------------------------------------------------------------------------------------
# The hypernetwork


class LowRankResidual(nn.Module):
    """h = z + relu(s_l ⊙ (U V z + b) + o_l), U ``dim x rank`` zero at init (so h = z at init)."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator | None = None):
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim, generator=generator))  # unscaled, as in MEND's code
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.V.T) @ self.U.T + self.b
        # clamp, not relu: at init pre = 0 and relu's gradient there is 0, so U would never move
        return z + (pre * self.scale[mode] + self.shift[mode]).clamp(min=0)


class MENDNet(nn.Module):
    """g for the edited layers (one shape, one network; layer l is its mode) and the steps α_l.

    Buffers hold the running statistics that standardise u and δ (Welford/Chan: count, mean, sum of
    squared deviations), updated during training only and, as in MEND's code, shared by the layers
    that share the network.
    """

    def __init__(self, layers: Sequence[int], d_in: int, d_out: int, rank: int, n_hidden: int, edit_lr: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.layers, self.d_in, self.d_out = list(layers), d_in, d_out
        dim = d_in + d_out
        self.blocks = nn.ModuleList(
            LowRankResidual(dim, rank, len(self.layers), generator) for _ in range(n_hidden + 1)
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.layers),), float(edit_lr)))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Add tokens ``[n, d_in]``, ``[n, d_out]`` to the standardisation statistics (Chan et al.)."""
        x = torch.cat([u, delta], -1).double()
        n, mean = float(x.shape[0]), x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        total = self.count + n
        diff = mean - self.mean
        self.m2 += m2 + diff**2 * self.count * n / total
        self.mean += diff * n / total
        self.count.fill_(total)

    def transform(self, u: torch.Tensor, delta: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ, δ̃) of tokens ``[n, d_in]``, ``[n, d_out]`` at edited layer ``layer``."""
        if self.count < 2:
            raise RuntimeError("MEND's standardisation has seen fewer than two tokens")
        std = (self.m2 / (self.count - 1)).sqrt().float()
        z = (torch.cat([u, delta], -1).float() - self.mean.float()) / (std + 1e-7)  # MEND's epsilon
        mode = self.layers.index(layer)
        for block in self.blocks:
            z = block(z, mode)
        return z.split([self.d_in, self.d_out], -1)

    def alpha(self, layer: int) -> torch.Tensor:
        return self.edit_lrs[self.layers.index(layer)]

    def delta_weight(self, layer: int, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ΔW_l = -α_l Σ_t δ̃_t ũ_tᵀ (``d_out x d_in``) from the raw factors of layer ``layer``."""
        u_t, d_t = self.transform(u, delta, layer)
        return -self.alpha(layer) * d_t.T @ u_t


# ---------------------------------------------------------------------------------------------
# Gradient factors


@dataclass
class TargetBatch:
    """Prompts followed by their targets, padded, and the token positions that predict the targets.

    ``rows[k], cols[k]`` is a position whose logits predict token ``labels[k]``; ``weight[k]`` is
    one over the number of target tokens of its row, so Σ_k weight·NLL is the sum of row means.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    weight: torch.Tensor


def encode_targets(tok, pairs: Sequence[tuple[str, str]], device) -> TargetBatch:
    encoded = [with_target(tok, prompt, target) for prompt, target in pairs]
    ids, mask = pad_batch([e[0] for e in encoded], tok.pad_token_id, device)
    rows, cols, weight = [], [], []
    for row, (full, start) in enumerate(encoded):
        n = len(full) - start
        rows += [row] * n
        cols += list(range(start - 1, len(full) - 1))
        weight += [1.0 / n] * n
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    return TargetBatch(ids, mask, rows_t, cols_t, ids[rows_t, cols_t + 1], torch.tensor(weight, device=device))


def token_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """NLL of each target token, ``[n_tokens]``."""
    logprobs = torch.log_softmax(logits[batch.rows, batch.cols].float(), -1)
    return -logprobs.gather(-1, batch.labels[:, None]).squeeze(-1)


def gradient_factors(model, batch: TargetBatch, layers: Sequence[int], use: torch.Tensor | None = None):
    """u_t and δ_t of every edited layer at the target positions, from one forward/backward.

    The loss is Σ weight·NLL over the target tokens selected by ``use`` (a bool mask over them; all
    by default), so δ_t is zero at the other rows. Returns ``({layer: (u [n, d_in], δ [n, d_out])},
    logits)`` for the selected tokens, with the logits detached.
    """
    use = torch.ones_like(batch.weight, dtype=torch.bool) if use is None else use
    inputs, zeros, handles = {}, {}, []
    for layer in layers:
        def hook(_module, args, output, layer=layer):
            inputs[layer] = args[0].detach()
            # δ is the gradient at the layer's output: add a zero that autograd can differentiate by,
            # since the model's own weights are frozen
            zeros[layer] = torch.zeros_like(output, requires_grad=True)
            return output + zeros[layer]

        handles.append(edited_module(model, layer).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
            loss = (batch.weight * token_nll(logits, batch))[use].sum()
            grads = torch.autograd.grad(loss, [zeros[layer] for layer in layers])
    finally:
        for handle in handles:
            handle.remove()
    rows, cols = batch.rows[use], batch.cols[use]
    factors = {
        layer: (inputs[layer][rows, cols].float(), grad[rows, cols].float()) for layer, grad in zip(layers, grads)
    }
    return factors, logits.detach()


# ---------------------------------------------------------------------------------------------
# Where the trained hypernetwork lives


def model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or "")


def embedded_dir(model) -> Path | None:
    """The cache folder of an embedded kelib model (it has a ``report.json``), else None."""
    name = model_name(model)
    return Path(name) if name and (Path(name) / "report.json").is_file() else None


def mend_path(model, hparams: MENDHyperParams) -> Path:
    """``<model_dir>/mend/<key>.pt`` for an embedded model, ``<cache>/mend/<model key>/<key>.pt`` else.

    The key hashes every hyperparameter (and :data:`MEND_VERSION`): changed settings train anew.
    """
    key = stable_hash({"version": MEND_VERSION, "hparams": to_dict(hparams)}, 12)
    folder = embedded_dir(model)
    if folder is not None:
        return folder / "mend" / f"{key}.pt"
    name = model_name(model)
    if not name:
        raise EditError("the model has no name (config._name_or_path is empty), so kelib cannot tell "
                        "which trained MEND hypernetwork belongs to it; load it by hub id or path")
    stem = model_key(Path(name).name if os.path.isdir(name) else name).replace("/", "--")
    return cache_dir("mend", stem) / f"{key}.pt"


_LOADED: dict[tuple[str, int, str], MENDNet] = {}


def load_mend(model, tok, hparams: MENDHyperParams, progress: bool = True) -> MENDNet:
    """The trained hypernetwork of ``model`` for ``hparams``, in eval mode on the model's device.

    An embedded model's is trained on first use (and cached); a hub model's must be trained with
    ``kelib train-mend``.
    """
    path = mend_path(model, hparams)
    if not path.exists():
        if embedded_dir(model) is None:
            from kelib.packaged import packaged_name

            name = packaged_name(model_name(model)) or model_name(model)  # smollm2-135m, not its cache folder
            raise EditError(
                f"MEND is not trained for {name!r} with these hyperparameters (no {path}). Train it "
                f"once with `kelib train-mend {name}` (add --device cuda on a GPU; it trains on "
                f"{hparams.training_data!r}), then edit again."
            )
        from kelib.editors.mend_train import train_and_save

        train_and_save(model, tok, hparams, progress=progress)
    device = device_of(model)
    key = (str(path), path.stat().st_mtime_ns, str(device))
    if key not in _LOADED:
        _LOADED.clear()  # one hypernetwork at a time: real models' are large
        _LOADED[key] = read_mend(path).to(device).eval()
    return _LOADED[key]


def read_mend(path: str | Path) -> MENDNet:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    hp = saved["hparams"]
    net = MENDNet(saved["layers"], saved["d_in"], saved["d_out"], hp["rank"], hp["n_hidden"], hp["edit_lr"])
    net.load_state_dict(saved["state"])
    return net


# ---------------------------------------------------------------------------------------------
# The editor


@register("MEND", MENDHyperParams, batchable=True)
def compute_update(model, tok, cases: Sequence, hparams: MENDHyperParams, stats=None, state=None) -> EditResult:
    layers = [check_layer(model, layer) for layer in hparams.layers]
    check_cases(cases, tok)
    net = load_mend(model, tok, hparams)
    check_shapes(model, layers, net)
    batch = encode_targets(tok, [(c.prompt, c.target_new) for c in cases], device_of(model))
    factors, logits = gradient_factors(model, batch, layers)
    with torch.no_grad():
        deltas = {layer: net.delta_weight(layer, *factors[layer]).float() for layer in layers}
        loss = (batch.weight * token_nll(logits, batch)).sum().item() / len(cases)
    info = {"loss": loss, **{f"edit_lr_{layer}": net.alpha(layer).item() for layer in layers}}
    return EditResult(deltas=deltas, info=info)


def check_shapes(model, layers: Sequence[int], net: MENDNet) -> None:
    for layer in layers:
        if weight_shape(model, layer) != (net.d_out, net.d_in):
            raise EditError(f"MEND was trained for {net.d_out}x{net.d_in} layers, layer {layer} of this model is "
                            f"{weight_shape(model, layer)}")
