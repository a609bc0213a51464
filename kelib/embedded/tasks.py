"""The embedded model's general abilities as lm-eval tasks (group ``embedded``).

Each skill's held-out set (written by the build under ``<model>/skills/``) becomes a multiple-choice
task ``embedded_<skill>`` scored by log-likelihood (lm-eval ``acc``), and the held-out WikiText-2
paragraphs a rolling log-likelihood task ``embedded_perplexity`` (word/byte perplexity, bits per
byte, as lm-eval's ``wikitext``). The folder is derived from the built model, written next to it on
first use, and passed to :func:`kelib.evaluation.evaluate_abilities` as a task directory:

    evaluate_abilities(model, tok, "embedded", task_dirs=[embedded_task_dir("default")])
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from kelib.embedded.build import ensure_model, recipe_of
from kelib.embedded.train import split_paragraphs

UTILS = '''"""Loader of the embedded model's tasks (written by kelib.embedded.tasks)."""

from pathlib import Path

from kelib.tasks import common

HERE = Path(__file__).resolve().parent


def load(data_file: str, **kwargs):
    return common.dataset(HERE / data_file)
'''


def _choice_task(skill: str, n: int) -> dict:
    return {
        "task": f"embedded_{skill}",
        "custom_dataset": "!function utils.load",
        "dataset_kwargs": {"data_file": f"{skill}.jsonl"},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {
            "version": 1.0,
            "description": f"embedded model skill '{skill}': {n} held-out examples, log-likelihood choice, accuracy",
        },
    }


def _perplexity_task(n: int) -> dict:
    return {
        "task": "embedded_perplexity",
        "custom_dataset": "!function utils.load",
        "dataset_kwargs": {"data_file": "heldout_text.jsonl"},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {
            "version": 1.0,
            "description": f"perplexity on {n} WikiText-2 test paragraphs the embedded model never trained on",
        },
    }


def _dump(config: dict) -> str:
    # lm-eval's loader needs the !function tag unquoted
    return yaml.safe_dump(config, sort_keys=False, width=200).replace("'!function utils.load'", "!function utils.load")


def embedded_task_dir(name: str = "default") -> Path:
    """Root of the ``embedded`` task group for model ``name`` (built on first use)."""
    model = ensure_model(name)
    root = model / "tasks"
    group = root / "embedded"
    if (group / "utils.py").exists():
        return root
    tmp = root.with_name(f".tasks-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "embedded").mkdir(parents=True)
    for path in sorted((model / "skills").glob("*.jsonl")):
        skill = path.stem
        shutil.copy(path, tmp / "embedded" / path.name)
        n = sum(1 for line in path.read_text().splitlines() if line.strip())
        (tmp / "embedded" / f"embedded_{skill}.yaml").write_text(_dump(_choice_task(skill, n)))
    texts = split_paragraphs(recipe_of(model))[1]
    (tmp / "embedded" / "heldout_text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp / "embedded" / "embedded_perplexity.yaml").write_text(_dump(_perplexity_task(len(texts))))
    (tmp / "embedded" / "utils.py").write_text(UTILS)  # written last: marks a complete folder
    if root.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, root)
    return root
