"""Build, cache and reuse embedded models.

``ensure_model(name)`` trains the recipe ``name`` on first use and caches it (the folder's layout and
cache key: :mod:`kelib.embedded.store`). A build writes into a temporary folder that is renamed into
place only when complete: an interrupted build leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from kelib.data import EditCase
from kelib.embedded.recipe import Recipe, load_recipe
from kelib.embedded.report import knowledge_report
# model_dir, recipe_of and world_of are read here too by callers that also build
from kelib.embedded.store import model_dir, provenance, recipe_of, world_of  # noqa: F401
from kelib.embedded.world import Fact
from kelib.io import atomic_folder, write_json

# Targets of the embedded-default issue; the report says whether each one is met.
TARGETS = {
    "default": {"recall_prompt": 0.95, "recall_paraphrase": 0.90, "skill": 0.85, "minutes": 15},
    "micro": {"recall_prompt": 0.90, "minutes": 1.5},
}


def ensure_model(name: str = "default", recipe: Recipe | None = None, progress: bool = True,
                 device: str = "cpu") -> Path:
    """Path of the built model ``name`` (a recipe in ``params/embedded.yaml``), building it if needed.

    ``device="cuda"`` trains on a GPU (a larger recipe, say); such a model is cached apart from a
    CPU-trained one of the same recipe, since the two differ in their last bits.
    """
    recipe = recipe or load_recipe(name)
    target = model_dir(name, recipe, device)
    if (target / "report.json").exists():
        return target
    with atomic_folder(target, "building") as tmp:  # another process may finish the same build first
        _build(name, recipe, tmp, progress, device=device)
    return target


def _build(name: str, recipe: Recipe, out: Path, progress: bool, device: str = "cpu") -> None:
    from kelib.embedded.train import train  # deferred: training pulls in the tokenizers and data layer

    threads = torch.get_num_threads()
    model, tok, data, seconds = train(recipe, progress=progress, device=device)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_json(out / "world.json", data.world.to_dict())
    for skill, examples in data.heldout_skills.items():
        lines = "".join(json.dumps(ex.as_record()) + "\n" for ex in examples)
        (out / "skills").mkdir(exist_ok=True)
        (out / "skills" / f"{skill}.jsonl").write_text(lines)
    started = time.time()
    report = knowledge_report(model, tok, data.world, data.heldout_skills, data.text_heldout)
    report = {
        "name": name,
        "metrics": report,
        "targets": TARGETS.get(name, {}),
        "train_seconds": round(seconds, 1),
        "report_seconds": round(time.time() - started, 1),
        "threads": threads,
        "device": device,
        "machine": platform.processor() or platform.machine(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_facts": len(data.world.facts),
        "n_cases": len(data.world.cases["eval"]),
        "splits": data.world.sizes(),
        "n_statements": len(data.statements),
        "provenance": provenance(recipe),
    }
    write_json(out / "report.json", report)  # written last: its presence marks a complete build


def load_report(name: str = "default") -> dict:
    return json.loads((ensure_model(name) / "report.json").read_text())


def world_cases(name: str = "default") -> list[EditCase]:
    """The *eval* edit cases of model ``name``'s world, the ones notebooks edit (facts it knows;
    paraphrase = held-out template; their neighbours are the specificity probes)."""
    return list(world_of(ensure_model(name)).cases["eval"])


def tune_cases(name: str = "default") -> list[EditCase]:
    """The *tune* edit cases of model ``name``'s world: for choosing hyperparameters (never the eval cases)."""
    return list(world_of(ensure_model(name)).cases["tune"])


def split_facts(name: str, split: str) -> list[Fact]:
    """The facts of one split (tune, stats, eval, unedited) of model ``name``'s world."""
    return list(world_of(ensure_model(name)).facts_in(split))
