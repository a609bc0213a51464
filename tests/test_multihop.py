"""MQuAKE's multi-hop questions as a run's evaluator (kelib.multihop), and D4S's milestone tables."""

import math

import pandas as pd
import pytest

from kelib.data import load_cases, load_mquake
from kelib.experiments import milestone_table
from kelib.multihop import complete_cases, multi_hop_evaluator, multi_hop_scores


def test_only_cases_whose_every_rewrite_is_in_are_complete():
    cases = load_mquake(limit=3)
    edits = load_cases("mquake_hard", limit=7)  # the first case's four rewrites, three of the second's
    assert complete_cases(cases, [e.case_id for e in edits]) == [cases[0]]
    assert complete_cases(cases, [e.case_id for e in edits[1:]]) == []
    assert complete_cases(cases, [e.case_id for e in load_cases("mquake_hard", limit=12)]) == cases


def test_multi_hop_success_compares_new_and_old_answers_per_question(tiny_gpt2):
    from kelib.metrics import compare

    model, tok = tiny_gpt2
    cases = load_mquake(limit=2)
    scores = multi_hop_scores(model, tok, cases)
    sample = scores.examples["multi_hop_success"]
    assert sample.ids == tuple(c.case_id for c in cases)
    for case, value in zip(cases, sample.values):
        wins = [c.new_wins for c in compare(model, tok, list(case.questions), [case.new_answer] * len(case.questions),
                                            [case.answer] * len(case.questions))]
        assert value == pytest.approx(sum(wins) / len(wins))
    assert scores["multi_hop_success"] == pytest.approx(sample.values.mean())
    assert dict(multi_hop_scores(model, tok, [])) == {}
    evaluate = multi_hop_evaluator(cases, "mquake_hard")
    assert evaluate.takes_edits and dict(evaluate(model, tok, [])) == {}  # nothing edited: nothing asked


def test_the_runner_asks_only_the_chains_its_edits_completed(micro_dir, monkeypatch, tmp_path):
    from kelib import experiments

    setup = experiments.load_setup("kelib-micro", ability_tasks=["d4s"], ability_limit=2)
    assert experiments.with_dataset(setup, "mquake_hard").load_args["ability_tasks"] == ["d4s"]
    mq = experiments.with_dataset(setup, "mquake_hard", abilities=False)
    assert mq.model is setup.model and mq.load_args["dataset"] == "mquake_hard" and mq.load_args["ability_tasks"] == []
    assert set(mq.evaluators) == {"multi_hop"} and mq.description["data"] == "mquake_hard"
    assert [c.case_id for c in mq.cases[:4]] == [e.case_id for e in load_mquake(limit=1)[0].edits]
    monkeypatch.setattr(experiments, "cache_dir", lambda *parts: tmp_path.joinpath(*parts))
    grid = experiments.run_grid(mq, [{"editor": "ROME", "batch_size": 1}], n_edits=6, checkpoints=[3, 4],
                                max_eval_cases=6, progress=False)
    hops = grid[grid.scope == "multi_hop"]
    assert sorted(hops.checkpoint) == [4, 6]  # nothing complete after 3 edits; the first case after 4 (and 6)
    examples = experiments.run_examples(grid, grid.run_dir.iloc[0], 6)
    assert examples["multi_hop"]["multi_hop_success"].ids == (load_mquake(limit=1)[0].case_id,)
    table = experiments.milestone_table(grid.assign(setting="ROME"), [4, 6], ["efficacy", "multi_hop", "specificity"])
    assert list(table.edits) == [4, 6] and table.specificity.isna().all()
    assert table.average.tolist() == pytest.approx(((table.efficacy + table.multi_hop) / 2).tolist())


def test_milestone_table_keeps_the_evaluated_milestones_and_averages_the_metrics():
    rows = [{"setting": "A", "checkpoint": c, "scope": "edits", "layer": None, "metric": m, "value": v}
            for c, vals in {100: (1.0, 0.5, 0.9), 250: (0.9, 0.4, 0.8), 500: (0.8, 0.3, 0.7)}.items()
            for m, v in zip(["efficacy_success", "paraphrase_success", "neighborhood_success"], vals)]
    grid = pd.DataFrame(rows)
    table = milestone_table(grid, [100, 500, 1000], ["efficacy", "paraphrase", "specificity"])
    assert list(table.edits) == [100, 500]
    assert table.average.tolist() == pytest.approx([0.8, 0.6])
    assert not any(math.isnan(v) for v in table.specificity)

