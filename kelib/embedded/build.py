"""Build, cache and reuse embedded models.

A model lives in ``<cache>/models/<name>-<key>/`` with its weights, tokenizer, config, the edit
cases and held-out skill sets of its world, and ``report.json`` (targets, timing, data hashes). The
key hashes the recipe, the bundled data it reads and the versions that change training, so a
changed recipe or data builds a new model. A build writes into a temporary folder that is renamed
into place only when complete: an interrupted build leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from kelib.config import to_dict
from kelib.data import EditCase
from kelib.embedded.recipe import Recipe, load_recipe
from kelib.embedded.world import RELATIONS_FILE, World, build_world
from kelib.io import sha256_file, stable_hash, write_json
from kelib.paths import BUNDLED_DIR, cache_dir

# Bump when the world, skills or training code changes what a recipe produces.
BUILD_VERSION = 1
DATA_FILES = (
    "editing/counterfact-edit.json.gz",
    "editing/counterfact-train.json.gz",
    "editing/counterfact-val.json.gz",
    "corpus/wiki.test.raw.gz",
)
# Targets of the embedded-default issue; the report says whether each one is met.
TARGETS = {
    "default": {"recall_prompt": 0.95, "recall_paraphrase": 0.90, "skill": 0.85, "minutes": 15},
    "micro": {"recall_prompt": 0.90, "minutes": 1.5},
}


def provenance(recipe: Recipe) -> dict:
    import transformers

    return {
        "recipe": to_dict(recipe),
        "build_version": BUILD_VERSION,
        "data_sha256": {f: sha256_file(BUNDLED_DIR / f) for f in DATA_FILES}
        | {"relations.yaml": sha256_file(RELATIONS_FILE)},
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def model_dir(name: str, recipe: Recipe | None = None, device: str = "cpu") -> Path:
    recipe = recipe or load_recipe(name)
    key = provenance(recipe) | ({} if device == "cpu" else {"trained_on": torch.device(device).type})
    return cache_dir("models") / f"{name}-{stable_hash(key, 12)}"


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
    tmp = target.with_name(f".{target.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(name, recipe, tmp, progress, device=device)
        if target.exists():  # another process finished the same build first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(name: str, recipe: Recipe, out: Path, progress: bool, device: str = "cpu") -> None:
    from kelib.embedded.report import knowledge_report
    from kelib.embedded.train import train

    threads = torch.get_num_threads()
    model, tok, data, seconds = train(recipe, progress=progress, device=device)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cases = [case_to_dict(c) for c in data.world.cases]
    write_json(out / "cases.json", cases)
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
        "n_cases": len(data.world.cases),
        "n_statements": len(data.statements),
        "provenance": provenance(recipe),
    }
    write_json(out / "report.json", report)  # written last: its presence marks a complete build


def recipe_of(model_path: str | Path) -> Recipe:
    """The recipe a built model was trained from (recorded in its ``report.json``)."""
    from kelib.config import from_dict

    report = Path(model_path) / "report.json"
    if not report.exists():
        raise FileNotFoundError(f"{model_path} is not a built embedded model: it has no report.json")
    return from_dict(Recipe, json.loads(report.read_text())["provenance"]["recipe"], where=str(report))


def world_of(model_path: str | Path) -> World:
    """The world (facts, relations, edit cases) a built model was trained on, rebuilt from its recipe."""
    recipe = recipe_of(model_path)
    return build_world(recipe.n_cases, seed=recipe.seed)


def load_report(name: str = "default") -> dict:
    return json.loads((ensure_model(name) / "report.json").read_text())


def case_to_dict(case: EditCase) -> dict:
    from dataclasses import asdict

    return asdict(case)


def world_cases(name: str = "default") -> list[EditCase]:
    """The edit cases of model ``name``'s world (facts it knows; paraphrase = held-out template)."""
    raw = json.loads((ensure_model(name) / "cases.json").read_text())
    return [EditCase(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}) for r in raw]
