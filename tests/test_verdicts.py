"""Verdicts on synthetic numbers: each claim must come out holds, does not hold, or no detectable effect."""

import math

import numpy as np
import pytest

from kelib.examples import Sample, Scores, example_checkpoints, examples_of, read_examples, write_examples
from kelib.verdicts import (
    DOES_NOT_HOLD,
    HOLDS,
    NO_EFFECT,
    ability_verdicts,
    compare,
    compare_pooled,
    compare_values,
    growth_halves,
    norm_flattens,
    paired_bootstrap,
)


def accuracy_before_after(n: int, lost: int, gained: int, seed: int = 0):
    """0/1 scores of ``n`` examples before, and after ``lost`` right answers turned wrong and ``gained``
    wrong answers turned right."""
    rng = np.random.default_rng(seed)
    before = (rng.random(n) < 0.7).astype(float)
    after = before.copy()
    right, wrong = np.flatnonzero(before == 1), np.flatnonzero(before == 0)
    after[rng.choice(right, lost, replace=False)] = 0
    after[rng.choice(wrong, gained, replace=False)] = 1
    return before, after


@pytest.mark.parametrize(
    "lost, gained, expected",
    [(40, 0, HOLDS), (0, 40, DOES_NOT_HOLD), (0, 0, NO_EFFECT), (3, 2, NO_EFFECT)],
)
def test_ability_drop_verdicts(lost, gained, expected):
    before, after = accuracy_before_after(300, lost, gained)
    verdict = compare("editing lowers the skill", before, after, "lower")
    assert verdict.outcome == expected
    assert verdict.estimate == pytest.approx((gained - lost) / 300)
    assert verdict.low <= verdict.estimate <= verdict.high
    assert str(verdict).endswith(expected) and "95% CI, n=300" in str(verdict)


def test_interval_matches_normal_theory_and_is_reproducible():
    rng = np.random.default_rng(1)
    before = rng.normal(0, 1, 500)
    after = before + rng.normal(-0.1, 1, 500)
    diff = after - before
    interval = paired_bootstrap(before, after)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert interval.estimate == pytest.approx(diff.mean())
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.1)
    assert interval.low == pytest.approx(diff.mean() - half, abs=0.02)
    assert paired_bootstrap(before, after) == interval  # fixed seed


def test_pairing_removes_the_spread_between_examples():
    """Examples that differ a lot from each other but all move by the same small amount: the paired
    interval is tight around that amount (an unpaired comparison would see nothing)."""
    before = np.linspace(0, 100, 200)
    verdict = compare("lower", before, before - 0.01, "lower")
    assert verdict.outcome == HOLDS
    assert verdict.low == pytest.approx(-0.01) and verdict.high == pytest.approx(-0.01)


def test_weighted_log_samples_compare_perplexities():
    """Per-paragraph NLL weighted by tokens: the sample's mean is the corpus perplexity and the
    verdict's estimate the log-ratio of perplexities."""
    nll = np.array([3.0, 4.0, 5.0, 3.5] * 25)
    tokens = np.array([10, 30, 60, 20] * 25)
    before = Sample(nll, tokens, log=True, higher_is_better=False)
    after = Sample(nll + np.where(tokens > 20, 0.2, 0.1), tokens, log=True, higher_is_better=False)
    assert before.mean == pytest.approx(math.exp(np.sum(tokens * nll) / tokens.sum()))
    expected = np.sum(tokens * np.where(tokens > 20, 0.2, 0.1)) / tokens.sum()
    verdict = compare("raises perplexity", before, after, "higher")
    assert verdict.outcome == HOLDS and verdict.estimate == pytest.approx(expected)
    assert after.mean / before.mean == pytest.approx(math.exp(expected))
    assert compare("lowers perplexity", before, after, "lower").outcome == DOES_NOT_HOLD


def test_stderr_of_a_sample():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    assert Sample(values).stderr == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)))
    assert Sample(values, np.full(8, 3.0)).stderr == pytest.approx(Sample(values).stderr)  # scale-free


@pytest.mark.parametrize("kept, expected", [(199, HOLDS), (150, DOES_NOT_HOLD), (188, NO_EFFECT)])
def test_ratio_against_a_threshold(kept, expected):
    """RECT's "keeps > 94% of editing performance", per case: 200 cases all edited by the editor
    alone, ``kept`` of them with the regularizer."""
    plain = np.ones(200)
    regularized = np.r_[np.ones(kept), np.zeros(200 - kept)]
    verdict = compare("keeps 94%", plain, regularized, "higher", threshold=0.94, statistic="ratio")
    assert verdict.estimate == pytest.approx(kept / 200)
    assert verdict.outcome == expected


def test_pooled_verdict_over_metrics():
    a = accuracy_before_after(200, 30, 0, seed=1)
    b = accuracy_before_after(200, 30, 0, seed=2)
    flat = accuracy_before_after(200, 0, 0, seed=3)
    verdict = compare_pooled("mean ability falls", [a, b, flat], "lower")
    assert verdict.outcome == HOLDS
    assert verdict.estimate == pytest.approx(-30 / 200 * 2 / 3)
    assert verdict.n == 600
    assert compare_pooled("mean ability falls", [flat, flat], "lower").outcome == NO_EFFECT


def test_ability_verdicts_follow_each_metrics_direction():
    acc_b, acc_a = accuracy_before_after(300, 45, 0)
    nll = np.linspace(2, 6, 300)
    before = {"skill_x": Sample(acc_b), "heldout_perplexity": Sample(nll, np.full(300, 50), log=True, higher_is_better=False)}
    after = {"skill_x": Sample(acc_a), "heldout_perplexity": Sample(nll + 0.3, np.full(300, 50), log=True, higher_is_better=False)}
    verdicts = {v.claim: v for v in ability_verdicts("ROME", before, after, "worse")}
    assert verdicts["ROME lowers skill_x"].outcome == HOLDS
    assert verdicts["ROME raises heldout_perplexity"].outcome == HOLDS
    pooled = verdicts["ROME lowers the mean ability"]  # accuracy-like metrics only
    assert pooled.outcome == HOLDS and pooled.estimate == pytest.approx(-45 / 300)
    better = {v.claim: v.outcome for v in ability_verdicts("RECT", before, after, "better")}
    assert better == {"RECT raises skill_x": DOES_NOT_HOLD, "RECT lowers heldout_perplexity": DOES_NOT_HOLD,
                      "RECT raises the mean ability": DOES_NOT_HOLD}


def test_pairs_by_ids_and_refuses_different_examples():
    before = Sample([1.0, 0.0, 1.0], ids=("a", "b", "c"))
    after = Sample([0.0, 1.0, 1.0], ids=("b", "a", "c"))  # same scores, other order
    assert paired_bootstrap(before, after).estimate == 0.0
    with pytest.raises(ValueError, match="different examples"):
        paired_bootstrap(before, Sample([1.0, 0.0, 1.0], ids=("a", "b", "d")))
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0, 0.0], [1.0, 0.0, 1.0])


@pytest.mark.parametrize(
    "value, expected",
    [(2.0, HOLDS), (4.0, NO_EFFECT), (4.0 * (1 - 1e-6), NO_EFFECT), (5.0, DOES_NOT_HOLD)],
)
def test_prune_lower_is_strict(value, expected):
    """PRUNE's growth of the condition number against its editor's (x4): a PRUNE that does nothing,
    or only rounds through its SVD, must not pass."""
    verdict = compare_values("PRUNE keeps the condition number lower", value, 4.0, "lower")
    assert verdict.outcome == expected


def test_growth_halves_interpolates_the_midpoint():
    assert growth_halves([0, 10, 25, 50, 75, 100], [1, 1.5, 2, 3, 4, 5]) == pytest.approx((2.0, 2.0))
    assert growth_halves([0, 40, 100], [2, 4, 5]) == pytest.approx(((4 + 1 / 6 - 2) / 2, (5 - 4 - 1 / 6) / 2))


def test_d4s_bounds_the_norm_only_when_its_growth_flattens():
    steps = [0, 100, 250, 500, 750, 1000]
    exploding = [1, 1.5, 2.5, 5, 9, 15]  # the editor alone: growth accelerates
    flattening = [1, 1.6, 2.0, 2.3, 2.4, 2.45]
    steady = [1, 1.2, 1.5, 2.0, 2.5, 3.0]  # ends far below the editor, but still growing linearly
    late_flattening = [1, 10, 20, 30, 35, 38]  # flattens, but its second half outgrows the editor's
    assert norm_flattens("D4S", steps, flattening, steps, exploding).outcome == HOLDS
    assert norm_flattens("D4S", steps, steady, steps, exploding).outcome == DOES_NOT_HOLD
    assert norm_flattens("D4S", steps, late_flattening, steps, [1, 1.1, 1.2, 1.3, 1.4, 1.5]).outcome == DOES_NOT_HOLD
    assert "second half" in str(norm_flattens("D4S", steps, flattening, steps, exploding))


def test_examples_round_trip_through_a_run_folder(tmp_path):
    scores = Scores({"skill_a": 0.5}, {"skill_a": Sample([1.0, 0.0], ids=("x", "y"))})
    assert dict(scores) == {"skill_a": 0.5} and list(scores.items()) == [("skill_a", 0.5)]
    assert examples_of({"skill_a": 0.5}) == {}
    write_examples(tmp_path, 0, {"abilities": examples_of(scores)})
    ppl = Sample([3.0, 4.0], [5, 7], log=True, higher_is_better=False)
    write_examples(tmp_path, 100, {"abilities": {"heldout_perplexity": ppl}, "edits": {}})
    assert example_checkpoints(tmp_path) == [0, 100]
    last = read_examples(tmp_path)
    assert set(last) == {"abilities"}
    back = last["abilities"]["heldout_perplexity"]
    assert back.mean == pytest.approx(ppl.mean) and back.log and not back.higher_is_better
    assert read_examples(tmp_path, 0)["abilities"]["skill_a"].ids == ("x", "y")
    assert read_examples(tmp_path / "nothing") == {}
