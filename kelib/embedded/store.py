"""Where built embedded models live and what each one records, read without ever building.

A model lives in ``<cache>/models/<name>-<key>/`` with its weights, tokenizer, config, its world
(``world.json``: relations, every fact with its split, the tune and eval edit cases), the held-out
skill sets, and ``report.json`` (targets, timing, data hashes). The key hashes the recipe, the world
it defines (so a change in how the world or its splits are drawn builds anew, not only a changed
recipe), the bundled data it reads and the versions that change training.

Building lives in :mod:`kelib.embedded.build`, which scores what it trained with
:mod:`kelib.embedded.report`; the report's evaluators read built models through this module, so
neither of the two imports the other in a circle.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from kelib.config import to_dict
from kelib.embedded.recipe import Recipe, load_recipe
from kelib.embedded.world import RELATIONS_FILE, World, world_for
from kelib.io import sha256_file, stable_hash
from kelib.paths import BUNDLED_DIR, cache_dir

# Bump when the skills or training code changes what a recipe produces (the world is hashed itself).
BUILD_VERSION = 2  # 2: the world in splits (tune, stats, eval, unedited), stored as world.json
DATA_FILES = (
    "editing/counterfact-edit.json.gz",
    "editing/counterfact-train.json.gz",
    "editing/counterfact-val.json.gz",
    "corpus/wiki.test.raw.gz",
)


def provenance(recipe: Recipe) -> dict:
    import transformers

    return {
        "recipe": to_dict(recipe),
        "build_version": BUILD_VERSION,
        "world_sha256": stable_hash(world_for(recipe).to_dict(), 64),
        "data_sha256": {f: sha256_file(BUNDLED_DIR / f) for f in DATA_FILES}
        | {"relations.yaml": sha256_file(RELATIONS_FILE)},
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def model_dir(name: str, recipe: Recipe | None = None, device: str = "cpu") -> Path:
    """Where model ``name`` (its recipe, trained on ``device``) is, or will be once built."""
    recipe = recipe or load_recipe(name)
    key = provenance(recipe) | ({} if device == "cpu" else {"trained_on": torch.device(device).type})
    return cache_dir("models") / f"{name}-{stable_hash(key, 12)}"


def built_dir(name: str) -> Path:
    """The folder of built model ``name``; an error naming the command that builds it if there is none."""
    path = model_dir(name)
    if not (path / "report.json").exists():
        raise FileNotFoundError(f"embedded model {name!r} is not built yet: run `kelib build-model {name}` "
                                "(or kelib.embedded.ensure_model)")
    return path


def recipe_of(model_path: str | Path) -> Recipe:
    """The recipe a built model was trained from (recorded in its ``report.json``)."""
    from kelib.config import from_dict

    report = Path(model_path) / "report.json"
    if not report.exists():
        raise FileNotFoundError(f"{model_path} is not a built embedded model: it has no report.json")
    return from_dict(Recipe, json.loads(report.read_text())["provenance"]["recipe"], where=str(report))


def world_of(model_path: str | Path) -> World:
    """The world (relations, facts in their splits, edit cases) a built model was trained on, as stored
    with it: what a consumer may use is what the model says, whatever the current code would draw."""
    path = Path(model_path) / "world.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_path} is not a built embedded model with splits: it has no world.json "
                                "(built before kelib stored them; build it again)")
    return _read_world(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _read_world(path: str, mtime_ns: int) -> World:
    return World.from_dict(json.loads(Path(path).read_text()))
