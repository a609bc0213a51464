"""Loaders and scorers of the ``d4s`` tasks: lm-eval's built-in definitions over the bundled subsets."""

from __future__ import annotations

import re
from pathlib import Path

from kelib.tasks import common

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, fewshot_file: str | None = None, **kwargs):
    """``custom_dataset``: ``data/<data_file>`` as the ``test`` split and, when given, ``data/<fewshot_file>``
    as the ``train`` split few-shot examples are drawn from (cwd-independent)."""
    return common.dataset(DATA / data_file, DATA / fewshot_file if fewshot_file else None)


# --- HellaSwag: lm-eval's tasks/hellaswag/utils.py preprocessing (MIT) ---------------------------


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # bracketed markers are WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def split_context(query: str) -> tuple[str, str, str]:
    """``(activity_label, ctx_a, ctx_b)`` recovered from the joined ``"label: ctx_a ctx_b"``.

    The source joined the three without lm-eval's ``ctx_b.capitalize()``. ctx_b, when there is one, is
    the unfinished sentence after the last ". " and starts in lower case ("... on a roof. he"); so a
    lower-case start there marks it (true of 3,243 of the 10,042 validation contexts; a context with no
    ctx_b ends in a full sentence, which starts in upper case). A sentence inside ctx_a that starts in
    lower case would be mistaken for ctx_b: rare, and it changes only letter case.
    """
    label, _, ctx = query.partition(": ")
    cut = ctx.rfind(". ")
    if cut >= 0 and ctx[cut + 2 : cut + 3].islower():
        return label, ctx[: cut + 1], ctx[cut + 2 :]
    return label, ctx, ""


def hellaswag_docs(dataset):
    """lm-eval's ``process_docs``: ``preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())`` and
    cleaned endings. The source had already removed the [header]/[title]/[step] markers (as lm-eval
    does); cleaning again removes the other [..] spans, as lm-eval does."""

    def query(doc):
        label, ctx_a, ctx_b = split_context(doc["query"])
        return _hellaswag_clean(label + ": " + ctx_a + " " + ctx_b.capitalize())

    return dataset.map(
        lambda doc: {
            "query": query(doc),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
    )


# --- TruthfulQA: mc1 and mc2 in one task ----------------------------------------------------------


def truthfulqa_choices(doc):
    """mc1's choices then mc2's: one pass scores both lm-eval tasks, truthfulqa_mc1 and truthfulqa_mc2."""
    return doc["mc1_targets"]["choices"] + doc["mc2_targets"]["choices"]


def truthfulqa_results(doc, results):
    """mc1 = lm-eval's truthfulqa_mc1 ``acc`` (the best of the mc1 choices is the true one, index 0);
    mc2 = lm-eval's truthfulqa_mc2 ``acc`` (normalised probability mass on the true mc2 answers)."""
    import numpy as np

    lls = np.array([ll for ll, _ in results])
    n1 = len(doc["mc1_targets"]["choices"])
    mc1 = float(np.argmax(lls[:n1]) == 0)
    probs = np.exp(lls[n1:])
    probs = probs / probs.sum()
    mc2 = float(probs[np.array(doc["mc2_targets"]["labels"]) == 1].sum())
    return {"mc1": mc1, "mc2": mc2}


# --- WinoGrande: lm-eval's partial scoring (the option is in the context, the rest is scored) -----


def winogrande_text(doc):
    return doc["gold"]  # an int: lm-eval then reads the choices as contexts (multiple-input task)


def winogrande_target(doc):
    return doc["continuation"]


def winogrande_choices(doc):
    return doc["context_options"]
