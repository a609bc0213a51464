"""D4S's layer loop as in its code, its λ, and its state kept on the CPU (issue #15, items 4 and 5)."""


import pytest
import torch

from kelib.editors import load_hparams
from kelib.editors.context import pinned_templates
from kelib.editors.memit import memit_keys, solve_update
from kelib.editors.base import EditResult
from kelib.models import get_weight, set_weight
from kelib.regularizers import D4S, D4SParams, make_regularizer
from kelib.runner import EditRun, RunSpec

N_STEPS = 3


def _direct(model, tok, cases, hp, stats, residuals, templates, official: bool):
    """MEMIT's batch solution over the whole history, each step's keys read directly (memit_keys) on
    weights set by hand: earlier layers carry W_0 + the update over the history so far (``official``,
    D4S's loop) or W_0 + this step's own MEMIT ΔW (the loop kelib had before)."""
    layers = hp.layers
    w0 = {l: get_weight(model, l).detach().float().clone() for l in layers}
    a = {l: torch.zeros(w0[l].shape, dtype=torch.float64) for l in layers}
    s = {l: torch.zeros(w0[l].shape[1], w0[l].shape[1], dtype=torch.float64) for l in layers}
    delta = {}
    try:
        for t, case in enumerate(cases):
            for i, layer in enumerate(layers):
                r = residuals[t][layer].double()
                with pinned_templates(templates):
                    k = memit_keys(model, tok, [case], layer, hp).double()
                a[layer] += r @ k.T
                s[layer] += k @ k.T
                system = s[layer] + hp.mom2_update_weight * stats[layer].double()
                delta[layer] = (torch.linalg.solve(system, a[layer].T).T / (len(layers) - i)).float()
                own = solve_update(r.float() / (len(layers) - i), k.float(), stats[layer], hp.mom2_update_weight)
                set_weight(model, layer, w0[layer] + (delta[layer] if official else own))
            for layer in layers:  # D4S's code restores W_0 before every step
                set_weight(model, layer, w0[layer])
    finally:
        for layer in layers:
            set_weight(model, layer, w0[layer])
    return {l: w0[l] + delta[l] for l in layers}


def test_d4s_runs_its_official_layer_loop_and_equals_the_batch_solution(micro, micro_stats, untouched):
    model, tok, cases = micro
    memit = load_hparams("MEMIT", "kelib-micro")
    assert len(memit.layers) >= 2  # the loop only matters from the second layer on
    spec = RunSpec("MEMIT", "sequential", n_edits=N_STEPS, batch_size=1, regularizer="D4S")
    run = EditRun(model, tok, cases, spec, memit, micro_stats, progress=False)
    assert run.regularizer.params.mom2_update_weight == memit.mom2_update_weight  # λ defaults to the editor's
    residuals = []
    transform = run.regularizer.transform

    def spy(result, model_):
        residuals.append({l: r.detach().clone() for l, r in result.residuals.items()})
        return transform(result, model_)

    run.regularizer.transform = spy
    run.run()
    edited = {l: get_weight(model, l).detach().float().clone() for l in memit.layers}
    templates = run.templates
    run.restore()

    hp = run.hparams  # residual_spread: fixed, as D4S's code
    assert hp.residual_spread == "fixed"
    official = _direct(model, tok, cases[:N_STEPS], hp, micro_stats, residuals, templates, official=True)
    before = _direct(model, tok, cases[:N_STEPS], hp, micro_stats, residuals, templates, official=False)
    w0 = {l: get_weight(model, l).detach().float() for l in memit.layers}
    for layer in memit.layers:
        size = float((official[layer] - w0[layer]).norm())
        assert size > 0
        assert float((edited[layer] - official[layer]).norm()) <= 1e-4 * size
    # the first layer's keys never depend on the loop; the last one's do, measurably
    last = memit.layers[-1]
    assert float((before[last] - official[last]).norm()) > 100 * float((edited[last] - official[last]).norm())


def test_d4s_lambda_is_the_editors_unless_given():
    memit = load_hparams("MEMIT", "kelib-micro")
    assert make_regularizer("D4S", {}, memit).params.mom2_update_weight == memit.mom2_update_weight
    assert make_regularizer("D4S", {"mom2_update_weight": 7.0}, memit).params.mom2_update_weight == 7.0
    alpha = load_hparams("AlphaEdit", "kelib-micro")  # no λ of its own: D4S's default
    from kelib.regularizers.d4s import DEFAULT_LAMBDA

    assert make_regularizer("D4S", {}, alpha).params.mom2_update_weight == DEFAULT_LAMBDA


def test_state_on_the_cpu_in_float32_gives_the_same_update(tiny_gpt2):
    model, _ = tiny_gpt2
    w0 = get_weight(model, 1).detach().clone()
    d_out, d_in = w0.shape
    torch.manual_seed(0)
    c0 = torch.randn(d_in, 4 * d_in)
    c0 = c0 @ c0.T / (4 * d_in)
    updates = {}
    for params in (D4SParams(mom2_update_weight=2.0), D4SParams(mom2_update_weight=2.0, state_device="cpu")):
        reg = D4S(params)
        reg.start(model, {1: w0}, {1: c0})
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            r, k = torch.randn(d_out, 2, generator=gen), torch.randn(d_in, 2, generator=gen)
            update = reg.transform(EditResult(deltas={1: torch.zeros_like(w0)}, keys={1: k}, residuals={1: r}), model)
        updates[params.state_device] = update[1]
        state = reg.states[1]
        expected = torch.float32 if params.state_device == "cpu" else torch.float64
        assert state.a.dtype == state.s.dtype == expected and state.a.device.type == "cpu"
    assert torch.allclose(updates["cpu"], updates["model"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="state_device"):
        make_regularizer("D4S", {"state_device": "disk"})
