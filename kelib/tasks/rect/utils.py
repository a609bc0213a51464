"""Loaders and scorers of the ``rect`` tasks (imported by lm-eval from this path; see the YAMLs)."""

from __future__ import annotations

from pathlib import Path

from kelib.tasks import common

DATA = Path(__file__).resolve().parent / "data"


def load(data_file: str, **kwargs):
    """``custom_dataset``: the bundled subset ``data/<data_file>`` as a ``test`` split (cwd-independent)."""
    return common.dataset(DATA / data_file)


# --- NQ-open -----------------------------------------------------------------------------------


def nq_docs(dataset):
    """RECT's copy of NQ-open ends every question with "?"; the Hugging Face copy lm-eval reads has
    none and its template adds one, so drop it here to give lm-eval's exact prompt."""
    return dataset.map(lambda doc: {"question": doc["question"].rstrip().removesuffix("?")})


# --- MuTual (process_docs and process_results copied from lm-eval's tasks/mutual/utils.py, MIT) --


def _detokenize(text: str) -> str:
    for old, new in [
        (" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), ("`` ", '"'), ("''", '"'),
        (" :", ":"), (" ;", ";"), (" !", "!"), (" ?", "?"), (" ,", ","), (" .", "."),
    ]:
        text = text.replace(old, new)
    return text


def mutual_docs(dataset):
    return dataset.map(
        lambda doc: {
            "article": _detokenize(doc["article"]),
            "options": [_detokenize(option) for option in doc["options"]],
        }
    )


def mutual_results(doc, results):
    import numpy as np

    gold = ["A", "B", "C", "D"].index(doc["answers"])
    r4_1 = np.argmax(results) == gold  # recall@1 = accuracy
    ranks = sorted(results, reverse=True)
    r4_2 = (ranks.index(results[gold]) == 1) + r4_1
    mrr = 1.0 / (ranks.index(results[gold]) + 1)
    return {"r@1": r4_1, "r@2": r4_2, "mrr": mrr}


# --- SAMSum ------------------------------------------------------------------------------------


def rouge_results(doc, results):
    return common.rouge(results[0], doc["summary"])


# --- CoNLL-2003 --------------------------------------------------------------------------------


def conll_docs(record: dict) -> list[dict]:
    """One sentence -> four docs, one per entity type, each with the gold entities of that type."""
    sentence = common.detokenize(record["tokens"])
    entities = common.entities_from_bio(record["tokens"], record["ner_tags"])
    return [
        {"row": record["row"], "id": record["id"], "sentence": sentence, "entity_type": name,
         "gold": entities[kind]}
        for kind, name in common.ENTITY_TYPES.items()
    ]


def load_conll(data_file: str, **kwargs):
    return common.dataset(DATA / data_file, explode=conll_docs)


def conll_results(doc, results):
    counts = common.entity_counts(results[0], doc["gold"])
    return {"f1": counts, "precision": counts, "recall": counts}


micro_f1 = common.micro_f1
micro_precision = common.micro_precision
micro_recall = common.micro_recall
