"""kelib: what knowledge editing does to a model's general abilities, and which regularizers undo it.

A small library behind one notebook per paper claim (RECT, D4S, PRUNE). Modules have one job each:

- ``kelib.models``      load a causal LM, address and read/write the edited MLP projection, capture keys/values
- ``kelib.data``        edit cases (CounterFact, ZsRE, MQuAKE) in one record type
- ``kelib.question_forms`` one fact as a True/False, multiple-choice or direct question (D4S's data perspective)
- ``kelib.multihop``    MQuAKE's multi-hop questions, asked of a run once its edits complete a chain
- ``kelib.stats``       key second moments C = E[k kᵀ], cached on disk
- ``kelib.metrics``     edit metrics (efficacy, paraphrase, specificity) and weight diagnostics
- ``kelib.editors``     ROME, MEMIT, FT, AlphaEdit: each computes ΔW per layer, never applies it
- ``kelib.regularizers`` RECT, PRUNE, D4S (and RECT's random and PCA baselines): transform updates
- ``kelib.runner``      applies updates under a protocol and records diagnostics
- ``kelib.edited_weights`` the matrices a run edits: originals, W ← W + ΔW with its check, restore
- ``kelib.executors``   where a grid's runs compute: inline or local worker processes (``kelib.cluster``: Slurm)
- ``kelib.ablations``   RECT's k sweep and baselines, PRUNE's α sweep
- ``kelib.evaluation``  general abilities through lm-eval
- ``kelib.embedded``    the small default model kelib trains offline
- ``kelib.explore``     widget panels over a notebook's finished runs (JupyterLab only)
"""

__version__ = "0.1.0"
