"""MQuAKE's multi-hop questions as an evaluator of a run: does the model chain the edits it took?

An MQuAKE case (:class:`kelib.data.MultiHopCase`) holds several rewrites (MQuAKE-hard: four) and a
multi-hop question whose answer changes only when all of them are in. A run edits the rewrites one
after another (``load_cases("mquake_hard")`` lists each case's rewrites in order), so after N edits
the cases whose every rewrite is among the first N are *complete*, and only those are asked.

Scoring follows CounterFact's efficacy (:mod:`kelib.metrics`), not MQuAKE's chain-of-thought
generation with exact match: per question, success when the new answer's mean token NLL after the
question is below the old answer's; per case, the mean over its (paraphrased) questions. That keeps
it a likelihood comparison as every other edit metric here, and says nothing about generation.
"""

from __future__ import annotations

from typing import Sequence

from kelib.data import MultiHopCase
from kelib.io import stable_hash


def complete_cases(cases: Sequence[MultiHopCase], edited_ids) -> list[MultiHopCase]:
    """The cases whose every rewrite's case id is in ``edited_ids``."""
    done = set(edited_ids)
    return [c for c in cases if all(e.case_id in done for e in c.edits)]


def multi_hop_scores(model, tok, cases: Sequence[MultiHopCase]):
    """``multi_hop_success`` over ``cases`` (mean of per-case success), with each case's value
    (:class:`kelib.examples.Scores`); empty when there are no cases."""
    from kelib.examples import Sample, Scores
    from kelib.metrics import compare

    if not cases:
        return Scores()
    prompts = [q for c in cases for q in c.questions]
    new = [c.new_answer for c in cases for _ in c.questions]
    old = [c.answer for c in cases for _ in c.questions]
    comparisons = compare(model, tok, prompts, new, old)
    per_case, at = [], 0
    for c in cases:
        wins = [comp.new_wins for comp in comparisons[at : at + len(c.questions)]]
        per_case.append(sum(wins) / len(wins))
        at += len(c.questions)
    sample = Sample(per_case, ids=[c.case_id for c in cases])
    return Scores({"multi_hop_success": sample.mean}, {"multi_hop_success": sample})


def multi_hop_evaluator(cases: Sequence[MultiHopCase], name: str):
    """An evaluator for :class:`kelib.runner.EditRun` that the runner calls with the edits made so far
    (``takes_edits``): the multi-hop success of the cases those edits complete (nothing before the
    first case is complete). ``name`` (the dataset) and the case ids are its key in the run cache."""
    cases = list(cases)

    def evaluate(model, tok, edited: Sequence = ()):
        return multi_hop_scores(model, tok, complete_cases(cases, [e.case_id for e in edited]))

    evaluate.takes_edits = True
    evaluate.key = {"multi_hop": name, "n_cases": len(cases), "cases": stable_hash([c.case_id for c in cases])}
    return evaluate
