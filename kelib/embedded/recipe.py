"""The recipe of an embedded model: world size, skills, architecture and training schedule.

Defaults live here; ``params/embedded.yaml`` names the recipes kelib builds (``default``, ``micro``)
as overrides of these fields. Every field enters the cache key, so a changed recipe builds anew.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kelib.config import load_yaml, ConfigError
from kelib.paths import REPO_DIR

RECIPES_FILE = REPO_DIR / "params" / "embedded.yaml"


@dataclass(frozen=True)
class Recipe:
    # world
    # Splits (kelib/embedded/world.py); the model learns every fact of every split.
    n_cases: int = 1000  # eval: the CounterFact cases the notebooks edit (their facts and neighbours' facts)
    n_tune_cases: int = 100  # tune: cases for choosing hyperparameters and training MEND
    n_stats_facts: int = 300  # stats: the only facts whose prompts enter the editors' key statistics
    n_unedited_facts: int = 300  # unedited: facts no edit, probe or statistic touches (recall_unedited)
    skills: tuple[str, ...] = ("sentiment", "topic", "category", "fact_check")
    n_eval: int = 200  # held-out examples per skill
    heldout_text_every: int = 10  # every n-th WikiText paragraph is held out for perplexity
    # model (GPT-2 architecture)
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    n_positions: int = 128
    vocab_size: int = 4096  # BPE merges; objects are added as whole-word tokens on top
    whole_word_objects: bool = True  # each object is one token: edits change one token's odds
    # data mix per epoch (every fact statement appears once per epoch)
    skill_examples_per_epoch: int = 200  # per skill, times its weight
    skill_weights: dict = field(default_factory=lambda: {"fact_check": 3.0, "category": 2.0})
    text_fraction: float = 0.2  # share of each epoch's tokens that is WikiText
    # optimisation
    epochs: int = 24
    seq_len: int = 64
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # bf16 autocast measured 2.3-3x *slower* than fp32 on this 2-core CPU for 2-4 layer models
    # (0.45 s vs 1.35 s per 32x64 batch at 4 layers, d=256); it may pay off on a GPU.
    bf16: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the model


def load_recipe(name: str) -> Recipe:
    """The recipe called ``name`` in ``params/embedded.yaml``."""
    import yaml

    known = yaml.safe_load(RECIPES_FILE.read_text()) if RECIPES_FILE.exists() else {}
    if name not in known:
        raise ConfigError(
            f"unknown embedded model {name!r}; {RECIPES_FILE} defines {sorted(known)}"
        )
    return load_yaml(Recipe, RECIPES_FILE, section=name)
