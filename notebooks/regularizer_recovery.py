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
# RECT's ablation (its own, smaller runs; see the section below)
ablation_runs: list = [{"editor": "ROME", "batch_size": 1}]  # editors of the k sweep: run dicts without a regularizer
ablation_edits: int = 100  # sequential edits per ablation run, judged at the end
rect_ks: list = [0.05, 0.1, 0.2, 0.4, 0.8]  # RECT's k sweep
baseline_ks: list = [0.05, 0.1, 0.2, 0.4, 0.8]  # the k of the random and PCA baselines (each at RECT's budget)
pca_budget: str = "entries"  # PCA's rank: factors within RECT's kept entries, or RECT code's fraction of components
single_edits: int = 20  # single edits (each on the unedited model) per single-edit run
single_ability_edits: int = 5  # abilities measured after each of the first N single edits, averaged per example

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
# ## RECT's ablation: k, and two baselines at the same budget
# RECT keeps the top k of each update's entries by relative change |ΔW| / |W|. Its ablation sweeps k
# and compares two baselines that keep as much: a **random** mask of exactly the same number of entries,
# ceil(k · d_out · d_in), and a **PCA** reduction to ΔW's top r singular directions, r the largest rank
# whose factors, r · (d_out + d_in) numbers, fit in that many entries (`pca_budget: components` takes
# RECT code's r = k · min(d_out, d_in) instead). Every mask applies to each update before it is added,
# as in RECT's code. A rank-one update (ROME's, MEMIT's per layer for one edit) has rank ≤ r at every k,
# so PCA keeps it whole: for single-instance editing the PCA baseline is the editor itself. The table
# below gives each budget on this model's edited matrices. These runs are their own: `ablation_edits`
# sequential edits, judged after the last (kelib/ablations.py).

# %%
from kelib import ablations
from kelib.models import get_weight

ab_runs = ablations.rect_runs(ablation_runs, rect_ks, baseline_ks=baseline_ks, pca_budget=pca_budget)
ab_grid = ablations.label_rect(experiments.run_grid(setup, ab_runs, n_edits=ablation_edits, executor=executor,
                                                    workers=workers))
shapes = {layer: tuple(get_weight(setup.model, layer).shape)
          for layer in experiments.editor_hparams(setup, ablation_runs[0]["editor"]).layers}
budgets = ablations.budget_table(shapes, sorted(set(rect_ks) | set(baseline_ks)), pca_budget)
plotting.save_table(budgets, out_dir, "rect_ablation_budgets")
ab_table = ablations.run_table(ab_grid)  # one row per run: setting, editor, regularizer, k, scores
plotting.save_table(ab_table.round(4), out_dir, "rect_ablation")
budgets.round(4)

# %%
ab_editors = list(dict.fromkeys(spec["editor"] for spec in ablation_runs))
fig, axes = plt.subplots(len(ab_editors), 2, figsize=(10, 3.2 * len(ab_editors)), squeeze=False)
for row, editor in zip(axes, ab_editors):
    mine = ab_table[ab_table.editor == editor]
    alone = mine[mine.regularizer == "none"]
    for ax, col, title in [(row[0], "edit_mean", "editing (mean of efficacy, paraphrase, specificity)"),
                           (row[1], "abilities_mean", "general abilities (mean)")]:
        for reg in ["RECT", "random", "PCA"]:
            points = mine[mine.regularizer == reg].sort_values("k")
            if not points.empty:
                ax.plot(points.k, points[col], label=reg, **plotting.regularizer_style(reg))
        if not alone.empty:
            ax.axhline(alone[col].iloc[0], color="black", lw=0.8, ls=":", label=f"{editor} alone")
        if col == "abilities_mean":
            ax.axhline(np.nanmean(list(unedited.values())), color="grey", lw=0.8, ls="--", label="unedited")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted(set(rect_ks) | set(baseline_ks)), [f"{k:g}" for k in sorted(set(rect_ks) | set(baseline_ks))])
        ax.set_xlabel("k (share of entries kept)")
        ax.set_title(f"{editor}: {title}")
axes[0, -1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
plotting.provenance_caption(fig, {**setup.description, "n_edits": ablation_edits, "runs": ablation_runs,
                                  "PCA": f"rank at RECT's budget ({pca_budget})"})
plotting.save_figure(fig, out_dir, "rect_ablation")

# %% [markdown]
# **Abilities after single edits.** RECT reports abilities after single edits too; each single edit
# starts from the unedited model, so here the abilities are measured after each of the first
# `single_ability_edits` edits and averaged per example, then compared with the unedited model on the
# same examples, for each ablation editor alone and with RECT at k = `rect_k`.

# %%
single_runs = [{"editor": spec["editor"], "protocol": "single", "ability_edits": single_ability_edits,
                **({"overrides": spec["overrides"]} if "overrides" in spec else {}), **extra}
               for spec in ablation_runs
               for extra in ({"label": spec["editor"]},
                             {"regularizer": "RECT", "regularizer_params": {"k": rect_k}, "label": f"{spec['editor']} k={rect_k:g}"})]
single_grid = ablations.label_rect(experiments.run_grid(setup, single_runs, n_edits=single_edits, executor=executor,
                                                        workers=workers))
single_table = experiments.final_rows(single_grid)
single_table = single_table[single_table.scope.isin(["abilities", "tasks", "edits"])].pivot_table(
    index="setting", columns="metric", values="value").rename(columns=experiments.KEY_METRICS)
single_table = pd.concat([pd.DataFrame([unedited], index=["unedited"]), single_table])
plotting.save_table(single_table.reset_index(names="setting").round(4), out_dir, "single_edit_abilities")
single_table.round(3)

# %% [markdown]
# **Verdicts of the ablation.** Each masked run against its editor alone, on the same examples and edit
# cases (as above: abilities higher, more than 94% of the editing performance kept); single edits
# against the unedited model (abilities lower after them).

# %%
ab_found, ab_missing = experiments.regularizer_verdicts(ab_grid, edits=0.94)
single_found, single_missing = ablations.against_unedited(single_grid, experiments.unedited_examples(grid),
                                                           "(single edits)")
numbers["rect_ablation"] = {
    "n_edits": ablation_edits,
    "runs": ablation_runs,
    "pca_budget": pca_budget,
    "table": ab_table.round(6).to_dict("records"),
    "verdicts": experiments.print_verdicts(ab_found, ab_missing),
    "single_edits": {"n_edits": single_edits, "ability_edits": single_ability_edits,
                     "verdicts": experiments.print_verdicts(single_found, single_missing)},
}
plotting.write_numbers(out_dir, numbers)

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
