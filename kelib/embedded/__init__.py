"""The embedded default: a small GPT-2-architecture model that kelib trains offline and caches.

``ensure_model("default")`` returns the path of the built model (building it on first use);
``kelib.models.load_model("kelib-default")`` loads it like any Hugging Face model;
``world_cases("default")`` are the eval cases its notebooks edit, ``tune_cases("default")`` the cases
for choosing hyperparameters, ``split_facts("default", split)`` the facts of any split;
``embedded_task_dir("default")`` is its skills and held-out perplexity as lm-eval tasks.
"""

_EXPORTS = {
    "ensure_model": "kelib.embedded.build",
    "load_report": "kelib.embedded.build",
    "model_dir": "kelib.embedded.store",
    "world_cases": "kelib.embedded.build",
    "tune_cases": "kelib.embedded.build",
    "split_facts": "kelib.embedded.build",
    "embedded_task_dir": "kelib.embedded.tasks",
    "abilities_evaluator": "kelib.embedded.report",
    "heldout_skills": "kelib.embedded.report",
    "Recipe": "kelib.embedded.recipe",
    "load_recipe": "kelib.embedded.recipe",
}


def __getattr__(name):  # imported lazily: training pulls in the data layer and tokenizers
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
