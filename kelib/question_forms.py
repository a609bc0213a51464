"""One fact, three question forms: D4S's data perspective, built from CounterFact / ZsRE cases.

D4S (Huang et al., NeurIPS 2024; its data perspective) edits the same kinds of facts written as True/False
questions, multiple-choice questions and directly generated answers (its MQD dataset), and finds
that the decline of the edited model follows the *form*: the perplexity of the editing targets and
their length. MQD itself is not obtainable offline, so kelib builds an MQD-style set from the cases
it already edits (this is not MQD): each :class:`~kelib.data.EditCase` ``(subject, prompt, true ->
new)`` becomes

- ``direct``: the case itself ("The mother tongue of X is" -> "English"): the answer is generated;
- ``true_false``: "Is it true that the mother tongue of X is English?" -> "Yes" (true target "No");
- ``multiple_choice``: "The mother tongue of X is: (A) French (B) English. Answer:" -> "B" (true
  target "A"); which letter holds the new object is fixed per case by a hash of its id.

A question-form prompt (ZsRE's "What is ...?") is phrased "What is ...? Is it English?" and
"What is ...? (A) French (B) English. Answer:". Paraphrases are turned the same way. CounterFact
neighbours ask about the edit's *new* object for another subject ("Is it true that the mother tongue
of Y is English?" -> "No"; options with the new object at the edit's letter), so specificity asks
whether the edit leaked into the neighbour in the same form; a neighbour whose true object is the new
object is dropped. ZsRE's neighbours (NQ questions) are unrelated to the edit and kept as they are.

The forms of one fact share its subject and its new and true objects (the answer), so a run per form
edits the same facts; only what the editor is asked to write differs. The ``direct`` form returns the
case unchanged (same id), so its runs are the runs other notebooks make on the same cases; the other
forms get ids ``<case id>#tf`` and ``<case id>#mc`` (a run is keyed by its cases' ids).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

from kelib.data import DataError, EditCase

FORMS = ("true_false", "multiple_choice", "direct")
FORM_NAMES = {"true_false": "True/False", "multiple_choice": "multiple choice", "direct": "direct generation"}
_SUFFIX = {"true_false": "#tf", "multiple_choice": "#mc"}
YES, NO = "Yes", "No"
LETTERS = ("A", "B")


def check_form(form: str) -> str:
    if form not in FORMS:
        raise DataError(f"unknown question form {form!r}; choose from {', '.join(FORMS)}")
    return form


def new_letter(case: EditCase) -> int:
    """0 or 1: the option that holds the new object in the case's multiple-choice form (a hash of the
    case id, so it is the same in every process and balanced over cases)."""
    return hashlib.sha256(case.case_id.encode()).digest()[0] % 2


def _is_question(prompt: str) -> bool:
    return prompt.rstrip().endswith("?")


# first words lowered after "Is it true that" (a name, "Michel Rocard is ...", keeps its capital)
_LOWERED = {"The", "A", "An", "In", "On", "At", "Its", "His", "Her", "Their", "This", "That", "These", "Those",
            "Where", "What", "Which", "Who", "When", "How"}


def _lower_first(prompt: str, subject: str = "") -> str:
    """"The mother tongue of X is" -> "the mother tongue of X is"; other first words, and a prompt
    that starts with its subject ("The Men Who Built America was ..."), as they are."""
    first, _, rest = prompt.partition(" ")
    if first not in _LOWERED or not rest or (subject and prompt.startswith(subject)):
        return prompt
    return first.lower() + " " + rest


def true_false_prompt(prompt: str, obj: str, subject: str = "") -> str:
    """The yes/no question stating ``prompt`` + ``obj``."""
    if _is_question(prompt):
        return f"{prompt.rstrip()} Is it {obj}?"
    if "?" in prompt:  # a question answered in a cloze ("What is ...? It is")
        return f"{prompt.rstrip()} {obj}. Is that true?"
    return f"Is it true that {_lower_first(prompt, subject)} {obj}?"


def multiple_choice_prompt(prompt: str, options: Sequence[str]) -> str:
    """``prompt`` with lettered options and "Answer:" (the letter follows)."""
    listed = " ".join(f"({letter}) {option}" for letter, option in zip(LETTERS, options))
    head = prompt.rstrip() if _is_question(prompt) else f"{prompt.rstrip()}:"
    return f"{head} {listed}. Answer:"


def as_form(case: EditCase, form: str) -> EditCase:
    """``case`` written in question form ``form`` (see the module docstring); ``direct`` returns it as is."""
    check_form(form)
    if form == "direct":
        return case
    zsre = case.dataset.startswith("zsre")
    new, true = case.target_new, case.target_true
    if form == "true_false":
        turn = lambda p: true_false_prompt(p, new, case.subject)  # noqa: E731
        targets = (YES, NO)
    else:
        at = new_letter(case)
        options = [true, true]
        options[at] = new
        turn = lambda p: multiple_choice_prompt(p, options)  # noqa: E731
        targets = (LETTERS[at], LETTERS[1 - at])
    if zsre:
        neighbours, answers = case.neighborhood_prompts, case.neighborhood_answers
    else:
        kept = [(p, a) for p, a in zip(case.neighborhood_prompts, case.neighborhood_answers)
                if a.strip() != new.strip()]
        if form == "true_false":  # "is the neighbour's object the edit's new object?": No
            neighbours = tuple(true_false_prompt(p, new) for p, _ in kept)
            answers = (NO,) * len(kept)
        else:  # the neighbour's own object where the edit's true object was, the new object at its letter
            neighbours, answers = [], []
            for p, a in kept:
                opts = [a, a]
                opts[at] = new
                neighbours.append(multiple_choice_prompt(p, opts))
                answers.append(LETTERS[1 - at])
            neighbours, answers = tuple(neighbours), tuple(answers)
    return dataclasses.replace(
        case, case_id=case.case_id + _SUFFIX[form], prompt=turn(case.prompt),
        target_new=targets[0], target_true=targets[1],
        paraphrase_prompts=tuple(turn(p) for p in case.paraphrase_prompts),
        neighborhood_prompts=neighbours, neighborhood_answers=answers)


def form_cases(cases: Sequence[EditCase], form: str) -> list[EditCase]:
    """Every case of ``cases`` in question form ``form``, in their order."""
    check_form(form)
    return [as_form(c, form) for c in cases]


def base_id(case_id: str) -> str:
    """The id of the fact a form case was built from (``counterfact/7#tf`` -> ``counterfact/7``)."""
    for suffix in _SUFFIX.values():
        if case_id.endswith(suffix):
            return case_id[: -len(suffix)]
    return case_id


def target_statistics(model, tok, cases: Sequence[EditCase]) -> dict[str, float]:
    """What D4S relates the decline to, measured on the model as given (unedited): the perplexity of
    the editing targets (``exp`` of the mean per-token NLL of ``target_new`` after the prompt, averaged
    over cases on the log scale: the geometric mean of the cases' perplexities) and their length in
    tokens (mean over cases)."""
    from kelib.metrics import score_targets

    if not cases:
        raise ValueError("no cases to measure")
    scores = score_targets(model, tok, [c.prompt for c in cases], [c.target_new for c in cases])
    lengths = [len(s.token_correct) for s in scores]  # one entry per target token
    nll = sum(s.nll for s in scores) / len(scores)
    return {"target_perplexity": math.exp(nll), "target_nll": nll, "target_tokens": sum(lengths) / len(lengths)}
