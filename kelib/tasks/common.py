"""Helpers shared by the task folders: reading the bundled subsets and scoring generated text.

The task folders' ``utils.py`` files are imported by lm-eval from their path (``!function utils.x``
resolves next to the YAML), so they stay thin and call into this module; what is here can be tested
without lm-eval. Scoring follows the papers' own scripts where lm-eval has no built-in metric
(PRUNE's lenient exact match and substring checks, RECT/PRUNE's ROUGE mean) and says where it differs.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from pathlib import Path
from typing import Iterable, Sequence


# ---------------------------------------------------------------------------------------------
# Data


def read_records(path: str | Path) -> list[dict]:
    """Records of a ``.jsonl``, ``.jsonl.gz``, ``.json`` or ``.json.gz`` file (a JSON file holds a list)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"task data file {path} is missing: the kelib checkout is incomplete "
            f"(see kelib/tasks/PROVENANCE.md for what belongs there)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def dataset(test_file: str | Path, fewshot_file: str | Path | None = None, explode=None):
    """A ``datasets.DatasetDict`` with a ``test`` split (and a ``train`` split of few-shot examples).

    Built in memory with ``Dataset.from_list``: a few hundred records need no Arrow cache on disk,
    and nothing here depends on the working directory. ``explode`` maps one record to several docs.
    """
    import datasets

    def build(path):
        records = read_records(path)
        if explode is not None:
            records = [doc for record in records for doc in explode(record)]
        return datasets.Dataset.from_list(records)

    splits = {"test": build(test_file)}
    if fewshot_file is not None:
        splits["train"] = build(fewshot_file)
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------
# Answers


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (lower case, no punctuation, no articles, single spaces), as PRUNE uses."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def lenient_match(prediction: str, answers: Sequence[str]) -> bool:
    """PRUNE's lenient exact match: some contiguous run of the normalised prediction's words equals a
    normalised gold answer (PRUNE's loop does this, with a counting bug this version leaves out)."""
    words = f" {normalize_answer(prediction)} "  # split() inside also turns newlines into spaces
    return any(
        (gold := normalize_answer(answer)) and f" {gold} " in words for answer in answers
    )


# ---------------------------------------------------------------------------------------------
# ROUGE


_ROUGE = None


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures in [0, 1] and their mean (the single number RECT and PRUNE report).

    RECT/PRUNE use the ``rouge`` package; kelib uses Google's ``rouge_score`` (an lm-eval dependency)
    without stemming, which tokenises alike (lower case, alphanumeric runs). A prediction of at most
    one character scores 0, as in their scripts.
    """
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    prediction = prediction.strip()
    if len(prediction) <= 1:
        scores = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    else:
        raw = _ROUGE.score(reference, prediction)
        scores = {name: float(raw[name].fmeasure) for name in ("rouge1", "rouge2", "rougeL")}
    scores["rouge_avg"] = sum(scores.values()) / 3
    return scores


# ---------------------------------------------------------------------------------------------
# Named entities (CoNLL-2003)

ENTITY_TYPES = {"PER": "Person", "LOC": "Location", "ORG": "Organization", "MISC": "Miscellaneous"}
_NO_ENTITY = {"", "none", "no entity", "no entities", "na", "null", "nothing"}


def detokenize(tokens: Sequence[str]) -> str:
    """CoNLL tokens as a sentence: spaces between tokens, none before closing punctuation."""
    text = " ".join(tokens)
    text = re.sub(r" ([,.;:!?)\]}])", r"\1", text)
    return re.sub(r"([(\[{]) ", r"\1", text)


def entities_from_bio(tokens: Sequence[str], tags: Sequence[str]) -> dict[str, list[str]]:
    """Entity strings per type (``PER``, ``LOC``, ``ORG``, ``MISC``) from IOB tags.

    An ``I-`` tag after ``O`` or after another type starts a new entity (CoNLL's IOB1 habit).
    """
    found: dict[str, list[str]] = {kind: [] for kind in ENTITY_TYPES}
    current: list[str] = []
    kind = None
    for token, tag in [*zip(tokens, tags), ("", "O")]:
        prefix, _, tag_kind = tag.partition("-")
        continues = prefix == "I" and tag_kind == kind
        if current and not continues:
            found[kind].append(" ".join(current))
            current, kind = [], None
        if prefix in ("B", "I") and not continues:
            current, kind = [token], tag_kind
        elif continues:
            current.append(token)
    return found


def normalize_entity(text: str) -> str:
    """Lower case, letters and digits only, single spaces: ``"U.S."`` and ``"u.s"`` compare equal."""
    return " ".join(re.sub(r"[^0-9a-z ]+", "", text.lower()).split())


def parse_entity_list(generation: str) -> set[str]:
    """The entities a model listed: items separated by commas, semicolons, ``|`` or " and ",
    normalised; empty items and "none"-like answers are dropped."""
    first_line = generation.strip().split("\n")[0]
    items = re.split(r"[,;|]| and ", first_line)
    return {norm for item in items if (norm := normalize_entity(item)) not in _NO_ENTITY}


def entity_counts(generation: str, gold: Iterable[str]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of one prediction against a gold list."""
    predicted = parse_entity_list(generation)
    expected = {normalize_entity(g) for g in gold} - {""}
    tp = len(predicted & expected)
    return tp, len(predicted) - tp, len(expected) - tp


def _totals(items) -> tuple[int, int, int]:
    tp = sum(item[0] for item in items)
    fp = sum(item[1] for item in items)
    fn = sum(item[2] for item in items)
    return tp, fp, fn


def micro_f1(items) -> float:
    """Corpus-level F1 from per-doc ``(tp, fp, fn)``: 2TP / (2TP + FP + FN); 0 when both are empty."""
    tp, fp, fn = _totals(items)
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0


def micro_precision(items) -> float:
    tp, fp, _ = _totals(items)
    return tp / (tp + fp) if (tp + fp) else 0.0


def micro_recall(items) -> float:
    tp, _, fn = _totals(items)
    return tp / (tp + fn) if (tp + fn) else 0.0


def ratio(items) -> float:
    """Sum of numerators over sum of denominators of ``(num, den)`` pairs; NaN when nothing counts."""
    num = sum(item[0] for item in items)
    den = sum(item[1] for item in items)
    return num / den if den else float("nan")
