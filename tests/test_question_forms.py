"""kelib.question_forms: one fact in three forms (D4S's data perspective, MQD-style), and the runs that edit them."""

import math

import pytest

from kelib.data import DataError, EditCase, load_cases
from kelib.question_forms import (FORMS, LETTERS, NO, YES, as_form, base_id, form_cases, new_letter,
                                  target_statistics)

CASE = EditCase("counterfact/0", "counterfact_edit", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is",
                "French", "English", ("Where Danielle Darrieux is from, people speak the language of",),
                ("Michel Rocard is a native speaker of", "The mother tongue of Anna Smith is"), ("French", "English"))


def test_the_three_forms_of_one_fact_share_subject_and_answer():
    tf, mc, direct = (as_form(CASE, f) for f in ("true_false", "multiple_choice", "direct"))
    assert direct is CASE  # the case as it is: its runs are the other notebooks' runs
    assert {c.subject for c in (tf, mc, direct)} == {"Danielle Darrieux"}
    assert {base_id(c.case_id) for c in (tf, mc, direct)} == {"counterfact/0"}
    assert len({c.case_id for c in (tf, mc, direct)}) == 3  # a run is keyed by case ids: never the same run
    # the answer: the new object is what the T/F question asserts and what the MC answer points at
    assert tf.prompt == "Is it true that the mother tongue of Danielle Darrieux is English?"
    assert (tf.target_new, tf.target_true) == (YES, NO)
    at = new_letter(CASE)
    assert mc.target_new == LETTERS[at] and mc.target_true == LETTERS[1 - at]
    options = {LETTERS[at]: "English", LETTERS[1 - at]: "French"}
    assert mc.prompt == (f"The mother tongue of Danielle Darrieux is: (A) {options['A']} (B) {options['B']}. Answer:")
    # paraphrases take the same form
    assert tf.paraphrase_prompts == ("Is it true that where Danielle Darrieux is from, people speak the language of "
                                     "English?",)
    assert mc.paraphrase_prompts[0].startswith("Where Danielle Darrieux is from, people speak the language of: (A)")


def test_neighbours_ask_whether_the_edit_leaked_in_the_same_form():
    tf, mc = as_form(CASE, "true_false"), as_form(CASE, "multiple_choice")
    # the second neighbour's own answer is the new object: no wrong answer to ask about, dropped
    assert tf.neighborhood_prompts == ("Is it true that Michel Rocard is a native speaker of English?",)
    assert tf.neighborhood_answers == (NO,)
    (prompt,), (answer,) = mc.neighborhood_prompts, mc.neighborhood_answers
    at = new_letter(CASE)
    assert f"({LETTERS[at]}) English" in prompt and f"({LETTERS[1 - at]}) French" in prompt
    assert answer == LETTERS[1 - at] != mc.target_new  # the neighbour's object, not the edit's letter


def test_the_new_object_letter_is_balanced_and_stable():
    cases = load_cases("counterfact_edit", limit=200)
    letters = [new_letter(c) for c in cases]
    assert letters == [new_letter(c) for c in load_cases("counterfact_edit", limit=200)]
    assert 70 < sum(letters) < 130


def test_zsre_questions_keep_their_question_and_their_nq_neighbour():
    case = load_cases("zsre", limit=1)[0]
    tf, mc = as_form(case, "true_false"), as_form(case, "multiple_choice")
    assert tf.prompt == f"{case.prompt} Is it {case.target_new}?"
    assert mc.prompt.startswith(case.prompt + " (A) ") and mc.prompt.endswith(". Answer:")
    for c in (tf, mc):
        assert c.dataset == "zsre"  # scored with ZsRE's token accuracy, as the direct form
        assert (c.neighborhood_prompts, c.neighborhood_answers) == (case.neighborhood_prompts, case.neighborhood_answers)
        assert c.subject == case.subject and c.subject in c.prompt


def test_unknown_form_is_refused():
    with pytest.raises(DataError, match="unknown question form 'essay'"):
        form_cases([CASE], "essay")


def test_target_statistics_are_the_unedited_models_perplexity_and_length(tiny_gpt2):
    from kelib.metrics import score_targets
    from kelib.tokens import with_target

    model, tok = tiny_gpt2
    cases = [CASE, as_form(CASE, "true_false")]
    stats = target_statistics(model, tok, cases)
    nll = [s.nll for s in score_targets(model, tok, [c.prompt for c in cases], [c.target_new for c in cases])]
    assert stats["target_perplexity"] == pytest.approx(math.exp(sum(nll) / 2))
    lengths = [len(with_target(tok, c.prompt, c.target_new)[0]) - len(tok(c.prompt)["input_ids"]) for c in cases]
    assert stats["target_tokens"] == pytest.approx(sum(lengths) / 2)
    assert lengths[1] >= 1


def test_forms_are_built_from_the_eval_split_only(micro_dir):
    """The forms of the embedded world's eval cases bring in no subject, fact or case of another split."""
    from kelib.embedded import tune_cases, world_cases
    from kelib.embedded.build import split_facts

    evals = world_cases("micro")
    others = {f.subject for split in ("tune", "stats", "unedited") for f in split_facts("micro", split)}
    others |= {c.subject for c in tune_cases("micro")}
    tune_ids = {c.case_id for c in tune_cases("micro")}
    for form in FORMS:
        cases = form_cases(evals, form)
        assert [base_id(c.case_id) for c in cases] == [c.case_id for c in evals]
        assert not {base_id(c.case_id) for c in cases} & tune_ids
        assert not {c.subject for c in cases} & others


def test_a_form_run_asks_the_editor_for_the_forms_targets(micro, micro_stats, monkeypatch, tmp_path, untouched):
    from kelib import experiments
    import dataclasses

    from kelib.editors.base import EDITORS

    monkeypatch.setattr(experiments, "cache_dir", lambda *parts: tmp_path.joinpath(*parts))  # runs made here

    model, tok, cases = micro
    rome = EDITORS["ROME"]
    asked = []

    def spy(model, tok, batch, *args, **kwargs):
        asked.extend((c.case_id, c.prompt, c.target_new) for c in batch)
        return rome.compute_update(model, tok, batch, *args, **kwargs)

    spy.__module__ = rome.compute_update.__module__  # the run's code identity reads the editor's module
    monkeypatch.setitem(EDITORS, "ROME", dataclasses.replace(rome, compute_update=spy))
    setup = experiments.Setup("kelib-micro", model, tok, cases, {})
    runs = [{"editor": "ROME", "form": f, "label": f"ROME ({f})"} for f in ("true_false", "multiple_choice", "direct")]
    grid = experiments.run_grid(setup, runs, n_edits=2, max_eval_cases=2, progress=False)
    expected = [(c.case_id, c.prompt, c.target_new) for f in ("true_false", "multiple_choice", "direct")
                for c in form_cases(cases[:2], f)]
    assert asked == expected
    assert sorted(grid.form.unique()) == ["direct", "multiple_choice", "true_false"]
    assert grid.run_dir.nunique() == 3
    # the direct form is the plain run: the same folder as a run without a form
    plain = experiments.run_grid(setup, [{"editor": "ROME"}], n_edits=2, max_eval_cases=2, progress=False)
    assert set(plain.run_dir) == set(grid[grid.form == "direct"].run_dir)
    assert "form" not in plain
    # efficacy is scored on the form's own prompt and targets: the T/F edit makes "Yes" win
    tf = grid[(grid.form == "true_false") & (grid.metric == "efficacy_success")]
    assert tf.value.iloc[-1] == pytest.approx(1.0)
