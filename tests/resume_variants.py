"""The runs tests/test_resume.py interrupts: one per editor family and regularizer, on the micro model.

Each is small (a few edits, checkpoints on the way) but exercises the state its family carries across
edits: ROME's and KN-style templates, MEMIT's batches, AlphaEdit's past keys, MEND's hypernetwork,
GRACE's codebook, D4S's A and S, PRUNE's per-step restraint, RECT's masks.
"""

from __future__ import annotations

import pandas as pd

# name: (editor, regularizer, regularizer params, n_edits, batch_size, checkpoints, kill after)
VARIANTS = {
    "ROME": ("ROME", "none", {}, 4, 1, [2], 2),
    "MEMIT": ("MEMIT", "none", {}, 6, 2, [2, 4], 4),
    "AlphaEdit": ("AlphaEdit", "none", {}, 4, 2, [2], 2),
    "MEND": ("MEND", "none", {}, 4, 2, [2], 2),
    "GRACE": ("GRACE", "none", {}, 4, 1, [2], 2),
    "MEMIT+D4S": ("MEMIT", "D4S", {}, 4, 2, [2], 2),
    "MEMIT+PRUNE": ("MEMIT", "PRUNE", {"mode": "per_step"}, 4, 2, [2], 2),
    "ROME+RECT": ("ROME", "RECT", {"k": 0.2}, 4, 1, [2], 2),
}


def run_variant(name: str, out_dir) -> pd.DataFrame:
    """Run variant ``name`` on the micro model into ``out_dir`` (resuming what is there)."""
    from kelib.editors import load_hparams
    from kelib.embedded import ensure_model, world_cases
    from kelib.embedded.report import abilities_evaluator
    from kelib.models import load_model
    from kelib.runner import RunSpec, run_edits
    from kelib.stats import statistics_for

    editor, regularizer, params, n_edits, batch_size, checkpoints, _ = VARIANTS[name]
    model, tok = load_model(str(ensure_model("micro", progress=False)))
    hparams = load_hparams(editor, "kelib-micro")
    if regularizer == "D4S":
        params = {**params, "mom2_update_weight": hparams.mom2_update_weight}
    stats = statistics_for(model, tok, hparams, progress=False)
    spec = RunSpec(editor, "sequential", n_edits=n_edits, batch_size=batch_size, regularizer=regularizer,
                   regularizer_params=params, checkpoints=checkpoints)
    evaluators = {"abilities": abilities_evaluator("micro", n_facts=20, n_skill=8, n_text=4)}
    return run_edits(model, tok, world_cases("micro"), spec, hparams, stats, out_dir=out_dir,
                     evaluators=evaluators, progress=False)
