"""KN (Knowledge Neurons) on the micro model: attribution, neuron selection, the edit, bad input."""

import dataclasses
import math

import pytest
import torch

from kelib.editors import EditError, get_editor, load_hparams
from kelib.editors.kn import attribution_prompts, neuron_attributions, select_neurons
from kelib.models import ModelError, add_to_weight, edited_module, get_weight, set_weight
from kelib.runner import RunSpec, run_edits
from kelib.tokens import encode, with_target


def target_prob(model, tok, prompt, target, zero_layer=None):
    """P(target's first token | prompt); with ``zero_layer``, that layer's neurons at the last token set to 0."""
    full, start = with_target(tok, prompt, target)
    ids = torch.tensor([encode(tok, prompt)])

    def zero(_module, args):
        hidden = args[0].clone()
        hidden[:, -1] = 0
        return (hidden, *args[1:])

    handle = None if zero_layer is None else edited_module(model, zero_layer).register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            return torch.softmax(model(ids).logits[0, -1].float(), -1)[full[start]].item()
    finally:
        if handle is not None:
            handle.remove()


def test_kn_rewrites_only_the_selected_neurons_and_the_edit_lands(micro, untouched):
    model, tok, cases = micro
    hp = load_hparams("KN", "kelib-micro")
    # cases[51]: the edit lands there; on cases[50] (Florence -> Lyon) KN erases the old answer but does not
    # raise the new one, which the efficacy test below counts among its misses.
    case = cases[51]
    prompts = attribution_prompts(model, tok, case, hp)
    assert prompts[0] == case.prompt and len(prompts) > 1
    scores = neuron_attributions(model, tok, prompts, case.target_true, hp.layers, hp.steps, hp.batch_size)
    selected = select_neurons(model, tok, case, hp)
    assert sum(len(n) for n in selected.values()) > 0

    # The refinement rule: coarse (>= threshold x the prompt's max over all layers) in >= p of the prompts.
    peak = torch.stack([scores[layer].max(1).values for layer in hp.layers]).max(0).values  # [n_prompts]
    passing = {layer: ((scores[layer] >= hp.adaptive_threshold * peak[:, None]) & (scores[layer] > 0)).sum(0)
               >= math.ceil(hp.p * len(prompts)) for layer in hp.layers}
    assert hp.max_neurons is None  # so every passing neuron is kept, and only those
    for layer, neurons in selected.items():
        assert torch.equal(passing[layer].nonzero().flatten(), neurons)
    # A cap keeps the passing neurons of largest mean attribution over the prompts.
    means = {layer: scores[layer].mean(0) for layer in hp.layers}
    ranked = sorted(((means[l][i].item(), l, i) for l, n in selected.items() for i in n.tolist()), reverse=True)
    capped = select_neurons(model, tok, case, dataclasses.replace(hp, max_neurons=3))
    assert sorted((l, i) for l, n in capped.items() for i in n.tolist()) == sorted((l, i) for _, l, i in ranked[:3])

    before_weights = {layer: get_weight(model, layer).detach().clone() for layer in hp.layers}
    result = get_editor("KN").compute_update(model, tok, [case], hp, None)
    for layer, weight in before_weights.items():  # returned, never applied
        assert torch.equal(get_weight(model, layer), weight)
    assert result.info["n_neurons"] == sum(len(n) for n in selected.values())
    embedding = model.get_output_embeddings().weight
    true_id = with_target(tok, case.prompt, case.target_true)[0][len(encode(tok, case.prompt))]
    new_id = with_target(tok, case.prompt, case.target_new)[0][len(encode(tok, case.prompt))]
    change = hp.add_scale * embedding[new_id] - hp.erase_scale * embedding[true_id]
    for layer in hp.layers:
        delta = result.deltas[layer]
        assert delta.shape == get_weight(model, layer).shape
        columns = delta.abs().sum(0).nonzero().flatten()
        assert torch.equal(columns, selected[layer])  # zero outside the selected columns, nonzero in each
        for i in selected[layer]:
            assert torch.allclose(delta[:, i], change, atol=1e-6)  # v_i += -λ_erase e(true) + λ_add e(new)

    before = target_prob(model, tok, case.prompt, case.target_new)
    originals = {layer: get_weight(model, layer).detach().clone() for layer in result.deltas}
    for layer, delta in result.deltas.items():
        add_to_weight(model, layer, delta)
    try:
        after = target_prob(model, tok, case.prompt, case.target_new)
        after_true = target_prob(model, tok, case.prompt, case.target_true)
    finally:
        for layer, weight in originals.items():
            set_weight(model, layer, weight)
    assert after > before + 0.1 and after > after_true


def test_integrated_gradients_is_complete(micro, untouched):
    """Σ_i Attr(w_i) = P(w̄) - P(0) for the scaled layer, up to the Riemann sum's error (shrinking with m)."""
    model, tok, cases = micro
    case = cases[0]
    full = target_prob(model, tok, case.prompt, case.target_true)
    for layer in (0, 1):
        gap = full - target_prob(model, tok, case.prompt, case.target_true, zero_layer=layer)
        coarse = neuron_attributions(model, tok, [case.prompt], case.target_true, [layer], steps=20)[layer][0]
        fine = neuron_attributions(model, tok, [case.prompt], case.target_true, [layer], steps=200)[layer][0]
        assert abs(gap) > 0.1  # both layers matter to this fact, so the check has something to measure
        # Measured: 20 steps within 0.012, 200 steps within 0.0012 of the gap on this case.
        assert abs(coarse.sum().item() - gap) < 0.03
        assert abs(fine.sum().item() - gap) < 0.005


def test_single_kn_edits_land_on_the_micro_model(micro, micro_stats, untouched):
    model, tok, cases = micro
    hp = load_hparams("KN", "kelib-micro")
    table = run_edits(model, tok, cases[50:60], RunSpec("KN", "single", n_edits=10), hp, micro_stats,
                      progress=False)
    rows = table[table.scope == "edits"].set_index("metric").value
    # Measured on these 10 cases: efficacy 0.8, paraphrase 0.8 (the unedited model: 0.0 and 0.1); the
    # floors leave one case of slack.
    assert rows["efficacy_success"] >= 0.7
    assert rows["paraphrase_success"] >= 0.7
    # No specificity floor: KN writes at the prompt's last token, where the micro model's same-relation
    # neighbours share most of the activation pattern (neighbourhood success 0.2 here, 1.0 unedited).


def test_bad_input_is_a_clear_error(micro, untouched):
    model, tok, cases = micro
    hp = load_hparams("KN", "kelib-micro")
    kn = get_editor("KN")
    with pytest.raises(ModelError, match="layer 7 does not exist"):
        kn.compute_update(model, tok, cases[:1], dataclasses.replace(hp, layers=[0, 7]), None)
    no_true = dataclasses.replace(cases[0])
    object.__setattr__(no_true, "target_true", " ")
    with pytest.raises(EditError, match="empty target"):
        kn.compute_update(model, tok, [no_true], hp, None)
    with pytest.raises(EditError, match="p <= 1"):
        kn.compute_update(model, tok, cases[:1], dataclasses.replace(hp, p=0.0), None)
    for name in ("gpt2-xl", "EleutherAI/gpt-j-6B", "meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B",
                 "kelib-default", "kelib-micro"):
        assert load_hparams("KN", name).layers
    assert load_hparams("KN", "gpt2-xl").layers == list(range(48))


def test_kn_edits_every_family(tiny_model):
    """The neuron hook and the column update work for GPT-2 (Conv1D), GPT-J and LLaMA (gated MLP)."""
    from kelib.data import EditCase
    from kelib.editors.kn import KNHyperParams

    model, tok = tiny_model
    case = EditCase("tiny/0", "tiny", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is",
                    "French", "Christianity")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = KNHyperParams(layers=[0, 1, 2], p=1.0, context_template_length_params=[])  # plain prompt only
    selected = select_neurons(model, tok, case, hp)
    result = get_editor("KN").compute_update(model, tok, [case], hp, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(len(n) for n in selected.values()) > 0  # the prompt's best neuron passes its own threshold
    for layer, delta in result.deltas.items():
        assert delta.shape == get_weight(model, layer).shape
        assert torch.equal(delta.abs().sum(0).nonzero().flatten(), selected[layer])


def test_attributions_equal_the_whole_models_gradients(tiny_model):
    """The scaled rows run from the attributed layer's block up (the blocks below once per prompt):
    the attribution equals w̄ times the mean over the steps of ∂P/∂w taken through the whole model, one
    unpadded prompt at a time, for every family and prompts of different lengths (so padded rows)."""
    from kelib.models import keys_and_values

    model, tok = tiny_model
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of"]
    target, steps = " French", 3
    found = neuron_attributions(model, tok, prompts, target, [0, 2], steps=steps, batch_size=4)
    for layer in (0, 2):
        for index, prompt in enumerate(prompts):
            ids = torch.tensor([encode(tok, prompt)], device=model.device)
            full, start = with_target(tok, prompt, target)
            w_bar = keys_and_values(model, ids, None, [ids.shape[1] - 1], [layer])[layer][0][0]
            grads = []
            for k in range(1, steps + 1):
                neurons = (w_bar * k / steps).clone().requires_grad_(True)

                def replace(_module, args, neurons=neurons):
                    hidden = args[0].clone()
                    hidden[:, -1] = neurons
                    return (hidden, *args[1:])

                handle = edited_module(model, layer).register_forward_pre_hook(replace)
                try:
                    prob = torch.softmax(model(ids).logits[0, -1].float(), -1)[full[start]]
                    grads.append(torch.autograd.grad(prob, neurons)[0])
                finally:
                    handle.remove()
            expected = w_bar * torch.stack(grads).mean(0)
            assert expected.abs().max() > 0  # the check has something to compare
            torch.testing.assert_close(found[layer][index], expected, rtol=1e-4, atol=1e-7)
