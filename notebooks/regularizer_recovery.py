# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Which regularizer undoes the damage? (RECT, PRUNE and D4S side by side)
# Each paper's main table in one: editors x {none, RECT, PRUNE, D4S} after N sequential edits,
# editing metrics beside general abilities, and the fraction of the editor's editing performance each
# regularizer keeps (RECT claims > 94%). D4S applies to MEMIT-family editors only (it needs their
# keys and residuals).

# %% tags=["parameters"]
out_dir: str = "../figures/default/regularizer_recovery"  # where figures, tables and numbers go
model_name: str = "kelib-default"  # an embedded model, a local path or a hub id
dataset: str = ""  # edit cases for non-embedded models (e.g. counterfact_edit); empty: the model world
ability_tasks: list = []  # lm-eval tasks or groups; empty: the embedded model skills
ability_limit: int = 100  # examples per lm-eval task
device: str = "cpu"  # cuda for real models
dtype: str = "float32"  # float16 or bfloat16 halves the memory of 7B models
device_map: str = ""  # e.g. auto: spread the model over the GPUs (from_pretrained's device_map); empty: all on device
hparams: str = ""  # editors' hyperparameter set for a model given by a path (gpt2-xl: params/hparams/<EDITOR>/gpt2-xl.yaml); empty: by the model's name
stats_corpus: str = ""  # text of the key statistics C0; empty: the editors hparams (Wikipedia for real models, as the papers); wikitext2 offline; or a folder of .txt files
n_edits: int = 1000  # sequential edits per run
checkpoints: list = [100, 250, 500, 750]  # intermediate evaluations (shared with the other notebooks' runs)
executor: object = "inline"  # where runs compute: inline (one after another, here), local (worker processes), slurm, or a mapping {name: slurm, partition: gpu, ...} (Slurm jobs through submitit; options: kelib.cluster.SlurmOptions)
workers: int = 0  # processes of the local executor; 0: one per CPU core (one per GPU on cuda)
editors: list = ["ROME", "MEMIT"]
regularizers: list = ["none", "RECT", "PRUNE", "D4S"]
rect_k: float = 0.2  # RECT keeps the top k of entries by relative change (paper: 20%)
prune_alpha: str = "e"  # PRUNE's log base

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kelib import experiments, plotting

plotting.set_style()
params = {"RECT": {"k": rect_k}, "PRUNE": {"alpha": prune_alpha if prune_alpha in ("e", "linear") else float(prune_alpha)}}
runs = [{"editor": e, "batch_size": 1, "regularizer": r, **({"regularizer_params": params[r]} if r in params else {})}
        for e in editors for r in regularizers if experiments.supports(e, r)]
setup = experiments.load_setup(model_name, dataset or None, device=device, dtype=dtype, ability_tasks=ability_tasks,
                               ability_limit=ability_limit, device_map=device_map, hparams=hparams,
                               stats_corpus=stats_corpus)
grid = experiments.run_grid(setup, runs, n_edits=n_edits, checkpoints=checkpoints,
                            executor=executor, workers=workers)
plotting.save_table(experiments.not_run(grid), out_dir, "not_run")  # runs this model cannot run, and why

# %%
table = experiments.summary(grid)
ability_cols = experiments.ability_columns(table.columns)
edit_cols = ["efficacy", "paraphrase", "specificity"]
table["edit_mean"] = table[edit_cols].mean(axis=1)
table["abilities_mean"] = table[ability_cols].mean(axis=1)
before = experiments.baseline(grid)
unedited = {c: before.get(c, np.nan) for c in ability_cols}
kept = experiments.fraction_kept(table, ["edit_mean", "abilities_mean"])
shown = table[["editor", "regularizer", *edit_cols, *ability_cols, "l1", "condition_number"]]
shown = pd.concat([pd.DataFrame([{"editor": "unedited", "regularizer": "", **unedited}]), shown], ignore_index=True)
plotting.save_table(shown.round(4), out_dir, "main_table")
plotting.save_table(kept.round(4), out_dir, "fraction_kept")
shown.round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, col, title in [(axes[0], "edit_mean", "editing (mean of efficacy, paraphrase, specificity)"),
                       (axes[1], "abilities_mean", "general abilities (mean)")]:
    x = np.arange(len(editors))
    width = 0.8 / len(regularizers)
    for i, reg in enumerate(regularizers):
        values = [table[(table.editor == e) & (table.regularizer == reg)][col].squeeze() if
                  ((table.editor == e) & (table.regularizer == reg)).any() else np.nan for e in editors]
        ax.bar(x + (i - (len(regularizers) - 1) / 2) * width, values, width, label=reg,
               **plotting.regularizer_style(reg, lines=False), edgecolor="white")
    if col == "abilities_mean":
        ax.axhline(np.nanmean(list(unedited.values())), color="black", lw=0.8, ls=":", label="unedited")
    ax.set_xticks(x, editors)
    ax.set_title(title)
axes[-1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
plotting.provenance_caption(fig, {**setup.description, "n_edits": n_edits, "RECT k": rect_k, "PRUNE alpha": prune_alpha})
plotting.save_figure(fig, out_dir, "recovery")

# %%
plain = table[table.regularizer == "none"].set_index("editor")
recovered = {}
for _, row in table[table.regularizer != "none"].iterrows():
    lost = np.nanmean(list(unedited.values())) - plain.abilities_mean[row.editor]
    regained = row.abilities_mean - plain.abilities_mean[row.editor]
    recovered[f"{row.editor}+{row.regularizer}"] = float(regained / lost) if lost > 1e-9 else float("nan")
kept_map = {f"{r.editor}+{r.regularizer}": float(r.edit_mean_kept) for r in kept.itertuples() if r.regularizer != "none"}
numbers = {
    "model": model_name,
    "n_edits": n_edits,
    "not_run": experiments.not_run(grid).to_dict("records"),
    "edit_mean": {f"{r.editor}+{r.regularizer}": float(r.edit_mean) for r in table.itertuples()},
    "abilities_mean": {f"{r.editor}+{r.regularizer}": float(r.abilities_mean) for r in table.itertuples()},
    "edit_performance_kept": kept_map,
    "ability_loss_recovered": recovered,
}
for key in kept_map:
    print(f"{key}: keeps {kept_map[key]:.1%} of the editor's editing performance, recovers "
          f"{recovered[key]:.0%} of the ability it lost")

# %% [markdown]
# **Verdicts.** Each regularizer against its editor alone, on the same examples and edit cases:
# abilities higher with it, and more than 94% of the editing performance kept (RECT's claim; the
# ratio of the mean per-case edit score, efficacy, paraphrase and specificity). Each with its
# bootstrap 95% interval; "holds" only when the interval clears zero (or 0.94).

# %%
grid["setting"] = grid.editor + "+" + grid.regularizer
found, missing = experiments.regularizer_verdicts(grid, edits=0.94)
numbers["verdicts"] = experiments.print_verdicts(found, missing)
numbers["rect_keeps_94"] = {v.claim.split(" keeps")[0]: v.holds for v in found
                            if "RECT" in v.claim and "editing performance" in v.claim}
numbers["abilities_recovered"] = {v.claim.split(" (vs")[0]: v.outcome for v in found if "mean ability" in v.claim}
plotting.write_numbers(out_dir, numbers)
print("RECT keeps > 94% of editing performance:", numbers["rect_keeps_94"])

# %% [markdown]
# **Claims:** RECT keeps > 94% of editing performance while recovering most lost abilities; PRUNE
# and D4S likewise preserve abilities. The printed lines are computed from this run ("recovers x%"
# is the share of the ability lost without a regularizer that the regularizer gives back; it is
# undefined when the editor lost nothing). Where a number falls short of a paper's claim, that is
# the finding on this model.

# %% [markdown]
# **Explore the runs.** In JupyterLab the cell below shows a panel over `grid`, this notebook's cached
# runs: pick the editor, regularizer, protocol, metric, layer and range of edits, absolute or relative
# to the unedited model; it starts on an ability as edits accumulate, per editor and regularizer.
# Every change redraws from the table, with no recomputation, and "reproduce this view" prints the
# `kelib reproduce` (or papermill) command that re-runs the notebook on the runs in view. Under
# papermill it shows nothing and writes nothing (`kelib/explore.py` says how it tells the two apart).

# %%
from kelib.explore import explore

explore(grid, "regularizer_recovery", globals(), scope=("abilities", "tasks"))
