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

from typing import Sequence

import torch

from kelib.editors.base import EditError, EditResult, check_cases, register
from kelib.editors.mend_net import (  # noqa: F401  (MEND's names, importable from the editor's module)
    MEND_VERSION,
    MENDHyperParams,
    MENDNet,
    embedded_dir,
    encode_targets,
    gradient_factors,
    mend_path,
    model_name,
    read_mend,
    token_nll,
)
from kelib.editors import mend_train
from kelib.io import file_lock
from kelib.models import check_layer, device_of, weight_shape


# ---------------------------------------------------------------------------------------------
# Loading (training on first use for embedded models)


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
        with file_lock(path.with_suffix(".lock")):  # one process trains it; others wait and load it
            if not path.exists():
                mend_train.train_and_save(model, tok, hparams, progress=progress)
    device = device_of(model)
    key = (str(path), path.stat().st_mtime_ns, str(device))
    if key not in _LOADED:
        _LOADED.clear()  # one hypernetwork at a time: real models' are large
        _LOADED[key] = read_mend(path).to(device).eval()
    return _LOADED[key]


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
