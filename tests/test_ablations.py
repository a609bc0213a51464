"""RECT's and PRUNE's ablations: the baselines keep RECT's budget, the k sweep's masks nest, PRUNE's F
across the α sweep, single-edit abilities, and the post-hoc α sweep from kept checkpoint weights."""

import math

import numpy as np
import pytest
import torch

from kelib import ablations
from kelib.editors.base import EditResult
from kelib.examples import Sample, Scores, read_examples
from kelib.regularizers import make_regularizer, pca_rank, pca_reduce, random_mask
from kelib.regularizers.prune import restrain_values
from kelib.regularizers.rect import rect_mask


@pytest.mark.parametrize("shape", [(16, 40), (7, 5), (256, 1024)])
@pytest.mark.parametrize("k", [0.05, 0.2, 0.33, 0.8])
def test_random_and_pca_keep_rects_budget(shape, k):
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(*shape, generator=generator)
    weight = torch.randn(*shape, generator=generator)
    budget = math.ceil(k * delta.numel())
    assert int(rect_mask(delta, weight, k).sum()) == budget
    assert int(random_mask(delta, k, generator).sum()) == budget  # exactly RECT's number of entries
    d_out, d_in = shape
    r = pca_rank(shape, k)  # the largest rank whose factors fit in RECT's kept entries
    if budget >= d_out + d_in:
        assert r * (d_out + d_in) <= budget < (r + 1) * (d_out + d_in)
    else:
        assert r == 1
    reduced = pca_reduce(delta, r)
    assert int(torch.linalg.matrix_rank(reduced)) == min(r, *shape)  # float32 tolerance: rounding is not rank
    assert pca_rank(shape, k, "components") == max(1, round(k * min(shape)))  # the RECT code's variant


def test_pca_keeps_an_update_of_rank_at_most_r_whole_and_random_masks_the_rest():
    u, v = torch.randn(32, 1), torch.randn(1, 64)
    delta = u @ v  # ROME's update: rank one
    result = EditResult(deltas={3: delta})
    assert make_regularizer("PCA", {"k": 0.05}).transform(result, None)[3] is delta
    masked = make_regularizer("random", {"k": 0.25}).transform(result, None)[3]
    kept = masked != 0
    assert int(kept.sum()) == math.ceil(0.25 * delta.numel())
    assert torch.equal(masked[kept], delta[kept])
    with pytest.raises(Exception, match="budget"):
        make_regularizer("PCA", {"k": 0.2, "budget": "rows"})
    assert ablations.budget_table({3: (32, 64)}, [0.2]).iloc[0]["PCA numbers"] <= math.ceil(0.2 * 32 * 64)


def test_the_k_sweeps_masks_are_nested():
    generator = torch.Generator().manual_seed(2)
    weight = torch.ones(24, 48)
    delta = torch.randint(0, 5, (24, 48), generator=generator).float()  # many ties across thresholds
    masks = [rect_mask(delta, weight, k) for k in ablations.RECT_KS]
    for smaller, larger in zip(masks, masks[1:]):
        assert int(smaller.sum()) < int(larger.sum())
        assert not (smaller & ~larger).any()  # every entry kept at a smaller k is kept at a larger one


def test_the_alpha_sweeps_f_is_monotone_below_sigma_and_ordered_by_alpha():
    bound = 6.0  # above 1/ln α for every base of the sweep (5.48 for α = 1.2): F restrains
    sigma = torch.linspace(bound, 400.0, 2000, dtype=torch.float64)
    restrained = {}
    for alpha in ablations.PRUNE_ALPHAS:
        f = restrain_values(sigma, bound, alpha)
        assert (torch.diff(f) > 0).all(), alpha  # increasing: the order of singular values is kept
        assert (f <= sigma + 1e-12).all(), alpha  # never above σ
        assert abs(float(f[0]) - bound) < 1e-12  # F(σ̄) = σ̄
        restrained[alpha] = f
    # a larger base restrains more: F_e <= F_2 <= F_1.5 <= F_1.2
    for stronger, weaker in [("e", 2.0), (2.0, 1.5), (1.5, 1.2)]:
        assert (restrained[stronger] <= restrained[weaker] + 1e-12).all()
    assert torch.allclose(restrained["linear"], (sigma + bound) / 2)


class CountingEvaluator:
    """Scores two examples by the edited model's output: differs after every edit."""

    key = "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, model, tok):
        self.calls += 1
        values = np.array([self.calls, 2 * self.calls], dtype=float)
        return Scores({"skill_x": float(values.mean())}, {"skill_x": Sample(values, ids=("a", "b"))})


def test_single_edits_record_abilities_averaged_per_example(micro, micro_stats, untouched, tmp_path):
    from kelib.editors import load_hparams
    from kelib.runner import RunSpec, run_edits

    model, tok, cases = micro
    hp = load_hparams("ROME", "kelib-micro")
    spec = RunSpec("ROME", "single", n_edits=3, ability_edits=2)
    evaluator = CountingEvaluator()
    table = run_edits(model, tok, cases, spec, hp, micro_stats, out_dir=tmp_path / "run",
                      evaluators={"abilities": evaluator}, progress=False)
    assert evaluator.calls == 2  # after the first two of the three single edits only
    row = table[(table.scope == "abilities") & (table.metric == "skill_x")]
    assert row.checkpoint.tolist() == [3] and row.value.tolist() == [pytest.approx(2.25)]  # mean of (1, 2), (2, 4)
    kept = read_examples(tmp_path / "run", 3)["abilities"]["skill_x"]
    assert kept.values.tolist() == [1.5, 3.0] and kept.ids == ("a", "b")
    # the field stays out of the identity of runs without it: runs cached before it keep their folders
    assert "ability_edits" not in RunSpec("ROME", "single", n_edits=3).identity()
    assert spec.identity()["ability_edits"] == 2
    with pytest.raises(ValueError, match="single"):
        RunSpec("ROME", "sequential", n_edits=3, ability_edits=1)


def test_posthoc_sweep_from_kept_weights_matches_prune_runs(micro, micro_stats, untouched):
    """Each α evaluated from the unrestrained run's checkpoint weights gives the PRUNE run's numbers."""
    from kelib import experiments

    model, tok, cases = micro
    setup = experiments.Setup("kelib-micro", model, tok, cases, {})
    alphas = ["e", "linear"]
    plain = experiments.run_grid(setup, [{"editor": "ROME", "batch_size": 1}], n_edits=4, checkpoints=[2],
                                 max_eval_cases=2, progress=False)
    rows, examples, missing = ablations.prune_posthoc_sweep(setup, plain, alphas, max_eval_cases=2)
    assert missing == []
    runs = experiments.run_grid(setup, ablations.prune_runs(["ROME"], alphas), n_edits=4, checkpoints=[2],
                                max_eval_cases=2, progress=False)
    reference = ablations.from_runs(runs)
    key = ["editor", "alpha", "mode", "checkpoint", "scope", "layer", "metric"]
    at2 = reference[(reference.checkpoint == 2)].set_index(key).value.sort_index()
    mine = rows[rows.checkpoint == 2].set_index(key).value.sort_index()
    assert len(mine) == len(at2) > 0
    assert np.allclose(mine.to_numpy(), at2.reindex(mine.index).to_numpy(), rtol=1e-6, atol=1e-9)
    table = ablations.tradeoff_table(rows)
    assert set(table.alpha) == {"e", "linear"} and {"edit_mean", "condition_number"} <= set(table.columns)
    assert ("ROME", "e", 2) in examples
    unrestrained = ablations.tradeoff_table(ablations.from_runs(plain)).set_index("checkpoint").condition_number[2]
    assert table.set_index(["alpha", "checkpoint"]).condition_number[("e", 2)] < unrestrained  # F acts here
