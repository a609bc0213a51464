"""What the notebooks compute from a grid of runs, on hand-made grids and run folders."""

import numpy as np
import pandas as pd
import pytest

from kelib import experiments
from kelib.examples import Sample, write_examples
from kelib.verdicts import DOES_NOT_HOLD, HOLDS, NO_EFFECT


def rows(run_dir, editor, regularizer, checkpoint, scope, layer, metric, value):
    return {"run_dir": str(run_dir), "editor": editor, "regularizer": regularizer, "protocol": "sequential",
            "batch_size": 1, "checkpoint": checkpoint, "scope": scope, "layer": layer, "metric": metric,
            "value": value}


def test_summary_and_score_table_leave_out_every_weights_scope():
    """PMET's attention-output diagnostics (scope weights:attn_out) are no scores: they must not
    reach the score columns (the L1 notebook's merge would then produce l1_x / l1_y)."""
    grid = pd.DataFrame([
        rows("pmet", "PMET", "none", 10, "edits", None, "efficacy_success", 0.9),
        rows("pmet", "PMET", "none", 10, "abilities", None, "skill_topic", 0.8),
        rows("pmet", "PMET", "none", 10, "weights", 3, "l1", 100.0),
        rows("pmet", "PMET", "none", 10, "weights", 3, "condition_number", 7.0),
        rows("pmet", "PMET", "none", 10, "weights:attn_out", 3, "l1", 55.0),
        rows("pmet", "PMET", "none", 10, "weights:attn_out", 3, "condition_number", 9.0),
    ])
    table = experiments.summary(grid)
    assert table.loc[0, "l1"] == 100.0 and table.loc[0, "condition_number"] == 7.0  # the MLP output's
    assert table.loc[0, "efficacy"] == 0.9 and table.loc[0, "skill_topic"] == 0.8
    grid["setting"] = grid.editor
    scores = experiments.score_table(grid)
    assert "l1" not in scores and "condition_number" not in scores
    l1 = grid[grid.scope == "weights"].groupby(["setting", "checkpoint"]).value.sum().rename("l1").reset_index()
    assert list(l1.merge(scores, on=["setting", "checkpoint"]).columns) == [
        "setting", "checkpoint", "l1", "efficacy", "skill_topic"]


def accuracy(n, right, seed):
    values = np.zeros(n)
    values[np.random.default_rng(seed).choice(n, right, replace=False)] = 1
    return values


@pytest.fixture
def grid(tmp_path):
    """Three runs on 300 ability examples and 200 cases: ROME loses 60 right answers, ROME + RECT
    gets them back, ROME + PRUNE changes nothing; per-example scores written as the runner keeps them."""
    before = accuracy(300, 240, 0)
    hurt = before.copy()
    hurt[np.flatnonzero(before)[:60]] = 0
    cases = tuple(f"counterfact/{i}" for i in range(200))
    edits_rome = {m: Sample(np.ones(200), ids=cases) for m in experiments.EDIT_SUCCESS}
    edits_rect = {m: Sample(np.r_[np.ones(198), np.zeros(2)], ids=cases) for m in experiments.EDIT_SUCCESS}
    runs = {"ROME": (hurt, edits_rome), "ROME + RECT": (before, edits_rect), "ROME + PRUNE": (hurt, edits_rome)}
    table = []
    for setting, (after, edits) in runs.items():
        run_dir = tmp_path / setting.replace(" ", "")
        editor, _, regularizer = setting.partition(" + ")
        write_examples(run_dir, 0, {"abilities": {"skill_topic": Sample(before)}})
        write_examples(run_dir, 100, {"abilities": {"skill_topic": Sample(after)}, "edits": edits})
        for checkpoint, values in [(0, before), (100, after)]:
            table.append({**rows(run_dir, editor, regularizer or "none", checkpoint, "abilities", None,
                                 "skill_topic", values.mean()), "setting": setting})
    return pd.DataFrame(table)


def test_editing_and_regularizer_verdicts_from_run_folders(grid):
    verdicts, missing = experiments.editing_verdicts(grid)
    outcomes = {v.claim: v.outcome for v in verdicts}
    assert missing == []
    assert outcomes["ROME lowers skill_topic"] == HOLDS
    assert outcomes["ROME + RECT lowers skill_topic"] == NO_EFFECT  # back where it started
    assert outcomes["ROME lowers the mean ability"] == HOLDS
    assert [v.estimate for v in verdicts if v.claim == "ROME lowers skill_topic"] == [pytest.approx(-0.2)]

    verdicts, _ = experiments.regularizer_verdicts(grid, edits=0.94)
    outcomes = {v.claim: v.outcome for v in verdicts}
    assert outcomes["ROME + RECT (vs ROME) raises skill_topic"] == HOLDS
    assert outcomes["ROME + PRUNE (vs ROME) raises skill_topic"] == NO_EFFECT  # a PRUNE that did nothing
    assert outcomes["ROME + RECT keeps more than 94% of ROME's editing performance"] == HOLDS
    better = {v.claim: v.outcome for v in experiments.regularizer_verdicts(grid, edits="better")[0]}
    assert better["ROME + RECT edits better than ROME (mean of efficacy, paraphrase, specificity)"] == NO_EFFECT
    assert better["ROME + PRUNE edits better than ROME (mean of efficacy, paraphrase, specificity)"] == NO_EFFECT
    lines = experiments.print_verdicts(verdicts)
    assert lines["ROME + RECT (vs ROME) raises skill_topic"]["outcome"] == HOLDS


def test_lower_abilities_with_a_regularizer_do_not_hold(grid):
    swapped = grid.copy()
    swapped["setting"] = swapped.setting.map({"ROME": "ROME + X", "ROME + RECT": "ROME"}).fillna(swapped.setting)
    swapped["regularizer"] = np.where(swapped.setting == "ROME + X", "X", np.where(swapped.setting == "ROME", "none", swapped.regularizer))
    swapped = swapped[swapped.setting != "ROME + PRUNE"]
    outcomes = {v.claim: v.outcome for v in experiments.regularizer_verdicts(swapped)[0]}
    assert outcomes["ROME + X (vs ROME) raises skill_topic"] == DOES_NOT_HOLD


def test_runs_without_examples_are_listed_not_judged(grid, tmp_path):
    old = grid.copy()
    old.loc[old.setting == "ROME", "run_dir"] = str(tmp_path / "made-before-examples")
    verdicts, missing = experiments.editing_verdicts(old)
    assert missing == ["ROME"]
    assert not any(v.claim.startswith("ROME lowers") for v in verdicts)


def test_example_table_has_standard_errors(grid):
    table = experiments.example_table(grid).set_index("setting")
    unedited = table.loc["unedited"]
    assert unedited["mean"] == pytest.approx(0.8) and unedited["n"] == 300
    assert unedited["stderr"] == pytest.approx(np.sqrt(0.8 * 0.2 / 299))


def test_ability_columns_leave_out_perplexities():
    columns = ["skill_topic", "recall_unedited", "heldout_perplexity", "rect_sst2/acc",
               "embedded_perplexity/word_perplexity", "embedded_perplexity/bits_per_byte", "efficacy", "l1"]
    assert experiments.ability_columns(columns) == ["skill_topic", "recall_unedited", "rect_sst2/acc"]
