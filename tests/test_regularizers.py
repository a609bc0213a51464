"""RECT, PRUNE and D4S: their defining properties on constructed cases."""

import math

import pytest
import torch

from kelib.editors.base import EditError, EditResult
from kelib.editors.memit import solve_update
from kelib.regularizers import D4S, PRUNE, RECT, D4SParams, PRUNEParams, RECTParams, make_regularizer, rect, restrain
from kelib.regularizers.d4s import D4SState
from kelib.regularizers.prune import restrain_values


def test_rect_keeps_exactly_the_top_fraction_by_relative_change():
    torch.manual_seed(0)
    weight = torch.randn(16, 40)
    delta = torch.randn(16, 40) * 0.1
    for k in (0.2, 0.4, 0.05, 1.0):
        out = rect(delta, weight, k)
        kept = out != 0
        assert int(kept.sum()) == math.ceil(k * delta.numel())
        rel = (delta.abs() / weight.abs())
        # every kept entry has a relative change at least as large as every dropped one
        assert rel[kept].min() >= rel[~kept].max() if (~kept).any() else True
        assert torch.equal(out[kept], delta[kept])  # kept entries keep their original values


def test_rect_ties_are_deterministic_and_zero_weights_are_guarded():
    weight = torch.ones(2, 5)
    delta = torch.full((2, 5), 0.5)  # all relative changes tie
    out = rect(delta, weight, 0.3)  # ceil(3) entries: the first three in row-major order
    assert out.flatten().nonzero().flatten().tolist() == [0, 1, 2]
    weight[1, 4] = 0.0  # |W| = 0: no division by zero, and the change there ranks first
    out = rect(delta, weight, 0.1)
    assert torch.isfinite(out).all()
    assert out.flatten().nonzero().flatten().tolist() == [9]
    with pytest.raises(ValueError):
        RECTParams(k=0)


def test_rect_mask_is_the_stable_sort_of_relative_changes():
    """Selection, not a sort: the same mask as ranking every δ (descending, ties by position), with
    many ties straddling the threshold."""
    from kelib.diagnostics import relative_change
    from kelib.regularizers.rect import rect_mask

    generator = torch.Generator().manual_seed(3)
    weight = torch.ones(64, 96)
    delta = torch.randint(0, 7, (64, 96), generator=generator).float() / 10  # 7 values: ties everywhere
    for k in (0.01, 0.2, 0.33, 0.5, 0.97):
        rel = relative_change(delta, weight).flatten()
        order = torch.argsort(rel, descending=True, stable=True)[: math.ceil(k * rel.numel())]
        expected = torch.zeros(rel.numel(), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(rect_mask(delta, weight, k), expected.view_as(delta)), k


def test_rect_regularizer_masks_each_layer_against_the_current_weight(tiny_gpt2):
    model, _ = tiny_gpt2
    from kelib.models import get_weight

    delta = torch.randn_like(get_weight(model, 1))
    out = RECT(RECTParams(k=0.25)).transform(EditResult(deltas={1: delta}), model)
    assert torch.equal(out[1], rect(delta, get_weight(model, 1), 0.25))


def constructed_case(seed=0):
    """W_0 with σ_max 3 and an accumulated Δ with singular values far above and below it."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    w0 = (u[:, :8] * torch.linspace(3.0, 0.5, 8, dtype=torch.float64)) @ v[:, :8].T
    u2, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v2, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    sigma = torch.tensor([50.0, 12.0, 3.5, 2.0, 0.3, 0.0, 0.0, 0.0], dtype=torch.float64)
    delta = (u2 * sigma) @ v2[:, :8].T
    return w0, delta, sigma


@pytest.mark.parametrize("alpha", ["e", 2.0, 1.5, 1.2, "linear"])
def test_prune_bounds_large_singular_values_and_keeps_small_ones(alpha):
    w0, delta, sigma = constructed_case()
    bound = float(torch.linalg.svdvals(w0)[0])
    restrained = restrain(delta, bound, alpha)
    s_new = torch.linalg.svdvals(restrained)
    f = restrain_values(sigma[sigma > 1e-9], bound, alpha)
    assert torch.allclose(s_new[: len(f)], torch.sort(f, descending=True).values, atol=1e-8)
    # no restrained value exceeds F's bound: σ̄ + log_α(σ_max / σ̄) (or (σ_max + σ̄)/2)
    if alpha == "linear":
        ceiling = (50.0 + bound) / 2
    else:
        base = math.e if alpha == "e" else alpha
        ceiling = bound + math.log(50.0 / bound, base)
    assert s_new.max() <= ceiling + 1e-9
    assert s_new.max() < 50.0
    # values below σ̄ are untouched
    below = sigma[(sigma < bound) & (sigma > 1e-9)]
    for value in below:
        assert torch.isclose(s_new, value, atol=1e-8).any()
    # the condition number of W_0 + Δ' is not larger than that of W_0 + Δ
    def kappa(m):
        s = torch.linalg.svdvals(m)
        return float(s[0] / s[-1])

    assert kappa(w0 + restrained) <= kappa(w0 + delta)


def test_prune_regularizer_modes_use_w0_plus_restrained_delta(tiny_gpt2):
    from kelib.models import get_weight, set_weight

    model, _ = tiny_gpt2
    w0 = get_weight(model, 1).detach().clone()
    delta = torch.randn_like(w0) * 5
    per_step = PRUNE(PRUNEParams(mode="per_step"))
    per_step.start(model, {1: w0}, None)
    update = per_step.transform(EditResult(deltas={1: delta}), model)
    expected = w0 + restrain(delta, per_step.bounds[1])
    assert torch.allclose(w0 + update[1], expected, atol=1e-4)

    post_hoc = PRUNE(PRUNEParams(mode="post_hoc"))
    post_hoc.start(model, {1: w0}, None)
    assert torch.equal(post_hoc.transform(EditResult(deltas={1: delta}), model)[1], delta)
    set_weight(model, 1, w0 + delta)
    with post_hoc.evaluation_view(model):
        assert torch.allclose(get_weight(model, 1), expected, atol=1e-4)  # W_0 + Δ', not W_n + Δ'
    assert torch.allclose(get_weight(model, 1), w0 + delta)  # the unrestrained chain continues
    set_weight(model, 1, w0)


def test_d4s_sequence_equals_one_memit_batch_and_state_size_is_constant():
    torch.manual_seed(0)
    d_out, d_in, lam = 6, 10, 3.0
    c0 = torch.randn(d_in, 50)
    c0 = c0 @ c0.T / 50
    steps = [(torch.randn(d_out, 2), torch.randn(d_in, 2)) for _ in range(7)]
    state = D4SState(d_out, d_in, torch.float64, "cpu")
    size = state.nbytes()
    for r, k in steps:
        state.add(r, k)
        assert state.nbytes() == size
    sequential = state.solution(c0, lam, share=1.0)
    all_r = torch.cat([r for r, _ in steps], 1)
    all_k = torch.cat([k for _, k in steps], 1)
    batch = solve_update(all_r, all_k, c0, lam)
    assert torch.allclose(sequential, batch, atol=1e-5)
    assert state.count == 14


def test_d4s_regularizer_needs_keys_and_sets_w0_plus_solution(tiny_gpt2):
    from kelib.models import get_weight

    model, _ = tiny_gpt2
    w0 = get_weight(model, 1).detach().clone()
    d_out, d_in = w0.shape
    c0 = torch.eye(d_in)
    reg = D4S(D4SParams(mom2_update_weight=2.0))
    reg.start(model, {1: w0}, {1: c0})
    with pytest.raises(EditError, match="keys and residuals"):
        reg.transform(EditResult(deltas={1: torch.zeros_like(w0)}), model)
    r, k = torch.randn(d_out, 3), torch.randn(d_in, 3)
    update = reg.transform(EditResult(deltas={1: torch.zeros_like(w0)}, keys={1: k}, residuals={1: r}), model)
    assert torch.allclose(get_weight(model, 1) + update[1], w0 + solve_update(r, k, c0, 2.0), atol=1e-5)
    assert reg.editor_overrides() == {"residual_spread": "fixed"}


def test_make_regularizer_checks_names_and_parameters():
    assert make_regularizer("RECT", {"k": 0.4}).params.k == 0.4
    assert make_regularizer("none").name == "none"
    with pytest.raises(ValueError, match="unknown regularizer"):
        make_regularizer("L2")
    with pytest.raises(ValueError, match="unknown key"):
        make_regularizer("PRUNE", {"alpha": 2.0, "treshold": 1})


def test_prune_restrains_iff_sigma_max_of_w0_is_at_least_one_over_ln_alpha():
    """F(σ) ≤ σ for every σ ≥ σ̄ exactly when σ̄ ≥ 1/ln α (issue #21: the docstring's condition)."""
    from kelib.regularizers.prune import raised_range

    grid = torch.linspace(0, 6, 4001, dtype=torch.float64)
    for alpha, log_alpha in [("e", 1.0), (2.0, math.log(2)), (1.2, math.log(1.2))]:
        for bound in [0.3 / log_alpha, 0.9 / log_alpha, 1.0 / log_alpha, 1.5 / log_alpha]:
            sigma = bound * torch.exp(grid)  # σ from σ̄ to e⁶ σ̄
            raised = restrain_values(sigma, bound, alpha) > sigma + 1e-12
            span = raised_range(bound, alpha)
            assert bool(raised.any()) == (bound * log_alpha < 1 - 1e-12) == (span is not None), (alpha, bound)
            if span is not None:  # exactly the values inside (σ̄, σ*) are raised
                inside = (sigma > span[0] + 1e-9) & (sigma < span[1] - 1e-9)
                near_edge = (sigma - span[1]).abs() < 1e-6 * span[1]
                assert torch.equal(raised[~near_edge], inside[~near_edge])
    assert raised_range(0.01, "linear") is None
    # the issue's stand-in: σ̄ = 0.28, Δ's σmax 0.89 became 1.44
    assert float(restrain_values(torch.tensor([0.89], dtype=torch.float64), 0.28, "e")) == pytest.approx(1.436, abs=1e-3)


def test_prune_warns_at_run_start_when_it_would_raise_singular_values():
    from kelib.regularizers.prune import PRUNEConditionWarning

    torch.manual_seed(0)
    w = torch.randn(16, 24)
    small = w / torch.linalg.svdvals(w)[0] * 0.28  # σmax(W_0) = 0.28 < 1 = 1/ln e
    large = w / torch.linalg.svdvals(w)[0] * 1.5
    prune = PRUNE(PRUNEParams(alpha="e"))
    with pytest.warns(PRUNEConditionWarning, match=r"1/ln α = 1\b.*layer 3: σmax\(W_0\) = 0\.28, raised for σ in \(0\.28, "):
        prune.start(None, {2: large, 3: small}, None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune.start(None, {3: small}, None)  # once per regularizer (the runner restarts it per unit)
        PRUNE(PRUNEParams(alpha="e")).start(None, {2: large}, None)
        PRUNE(PRUNEParams(alpha="linear")).start(None, {3: small}, None)
    with pytest.warns(PRUNEConditionWarning, match=r"1/ln α = 1\.44"):
        PRUNE(PRUNEParams(alpha=2.0)).start(None, {2: large * 0.8}, None)  # σ̄ = 1.2 >= 1 but < 1/ln 2
