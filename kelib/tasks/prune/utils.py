"""Loaders and scorers of the ``prune`` tasks: PRUNE's ``test_tasks.py`` protocol in lm-eval form."""

from __future__ import annotations

from pathlib import Path

from kelib.tasks import common

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, **kwargs):
    """``custom_dataset``: the bundled subset ``data/<data_file>`` as a ``test`` split (cwd-independent)."""
    return common.dataset(DATA / data_file)


def gsm8k_results(doc, results):
    """Correct when the gold number (after "#### ") is a substring of the generated tokens, as PRUNE
    checks ``answers in predict``."""
    gold = doc["answer"].split("#### ")[1]
    return {"acc": float(gold in results[0])}


def rte_results(doc, results):
    """PRUNE's reading of one generated token: an answer is valid when it contains "true" or "false";
    "true" is right for entailment (label 0). ``acc`` counts invalid answers as wrong (PRUNE's
    "total accuracy"); ``acc_valid`` is over valid answers only (PRUNE's "accuracy")."""
    answer = results[0].lower()
    says_true, says_false = "true" in answer, "false" in answer
    valid = says_true or says_false
    correct = (says_true and doc["label"] == 0) or (says_false and doc["label"] == 1)
    return {"acc": float(correct), "acc_valid": (int(correct), int(valid)), "valid": float(valid)}


def nq_results(doc, results):
    return {"em": float(common.lenient_match(results[0], doc["answer"]))}


def rouge_results(doc, results):
    return common.rouge(results[0], doc["summary"])


ratio = common.ratio
