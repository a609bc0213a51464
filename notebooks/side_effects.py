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
# # Side effects of editing on general abilities (RECT's claim)
# Gu et al. (EMNLP 2024): editing a model (ROME, MEMIT, ...) harms its general abilities, the more
# so the more edits it takes, whether edits come one at a time (instance-sequential), as one batch
# (batch-single) or as batches in a row (batch-sequential). Here: abilities before and after N
# edits per editor and protocol, and abilities as edits accumulate.

# %% tags=["parameters"]
out_dir: str = "../figures/default/side_effects"  # where figures, tables and numbers go
model_name: str = "kelib-default"  # an embedded model, a local path or a hub id
dataset: str = ""  # edit cases for non-embedded models (e.g. zsre, counterfact_edit); empty: the model world
ability_tasks: list = []  # lm-eval tasks or groups, e.g. rect; empty: the embedded model skills
ability_limit: int = 100  # examples per lm-eval task
device: str = "cpu"  # cuda for real models
dtype: str = "float32"  # float16 or bfloat16 halves the memory of 7B models
device_map: str = ""  # e.g. auto: spread the model over the GPUs (from_pretrained's device_map); empty: all on device
hparams: str = ""  # editors' hyperparameter set for a model given by a path (gpt2-xl: params/hparams/<EDITOR>/gpt2-xl.yaml); empty: by the model's name
stats_corpus: str = ""  # text of the key statistics C0; empty: the editors hparams (Wikipedia for real models, as the papers); wikitext2 offline; or a folder of .txt files
n_edits: int = 100  # edits per run
checkpoints: list = [10, 25, 50, 75]  # intermediate evaluations of the sequential runs
executor: object = "inline"  # where runs compute: inline (one after another, here), local (worker processes), slurm, or a mapping {name: slurm, partition: gpu, ...} (Slurm jobs through submitit; options: kelib.cluster.SlurmOptions)
workers: int = 0  # processes of the local executor; 0: one per CPU core (one per GPU on cuda)
batch_size: int = 10  # cases per batch in batch-sequential runs
runs: list = [  # editor x protocol, as in RECT's Table 1 (KN and ROME edit instances, MEND and MEMIT batches)
    {"editor": "KN", "protocol": "sequential", "batch_size": 1},
    {"editor": "ROME", "protocol": "sequential", "batch_size": 1},
    {"editor": "MEND", "protocol": "batch"},
    {"editor": "MEND", "protocol": "sequential"},
    {"editor": "MEMIT", "protocol": "batch"},
    {"editor": "MEMIT", "protocol": "sequential"},
]

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from kelib import experiments, plotting

plotting.set_style()
setup = experiments.load_setup(model_name, dataset or None, device=device, dtype=dtype, ability_tasks=ability_tasks,
                               ability_limit=ability_limit, device_map=device_map, hparams=hparams,
                               stats_corpus=stats_corpus)
runs_ = [{**r, "batch_size": r.get("batch_size", n_edits if r["protocol"] == "batch" else batch_size)} for r in runs]
grid = experiments.run_grid(setup, runs_, n_edits=n_edits, checkpoints=checkpoints,
                            executor=executor, workers=workers)
plotting.save_table(experiments.not_run(grid), out_dir, "not_run")  # runs this model cannot run, and why
grid["setting"] = grid.editor + " " + grid.protocol.map({"sequential": "seq.", "batch": "batch", "single": "single"}) + " (b=" + grid.batch_size.astype(str) + ")"

# %%
ability = grid[grid.scope.isin(["abilities", "tasks"])]
before = experiments.baseline(grid)
after = experiments.final_rows(grid)
after = after[after.scope.isin(["abilities", "tasks"])].pivot_table(index="setting", columns="metric", values="value")
table = pd.concat([before.to_frame("unedited").T, after])
edits = experiments.final_rows(grid)
edits = edits[edits.scope == "edits"].pivot_table(index="setting", columns="metric", values="value")
table = table.join(edits.rename(columns=experiments.KEY_METRICS)[["efficacy", "paraphrase", "specificity"]])
plotting.save_table(table.reset_index(names="model"), out_dir, "abilities_before_after")
table.round(3)

# %% [markdown]
# Each ability with its standard error over its examples (perplexity's is that of the log-perplexity):
# a change smaller than about twice these cannot be told from noise.

# %%
errors = experiments.example_table(grid)
plotting.save_table(errors.round(5), out_dir, "abilities_stderr")
errors.pivot_table(index="setting", columns="metric", values=["mean", "stderr"], sort=False).round(4)

# %%
curves = ability[ability.protocol == "sequential"]
metrics = sorted(curves.metric.unique())
fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.0), sharex=True, squeeze=False)
for ax, metric in zip(axes[0], metrics):
    sns.lineplot(data=curves[curves.metric == metric], x="checkpoint", y="value", hue="setting", style="setting",
                 markers=True, palette=plotting.setting_palette(curves.setting.unique()), ax=ax, legend=ax is axes[0][-1])
    ax.axhline(before[metric], color="grey", lw=0.8, ls=":")
    ax.set_title(metric.replace("skill_", "skill: "))
    ax.set_xlabel("edits")
    ax.set_ylabel("")
axes[0][-1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
fig.suptitle(f"General abilities as sequential edits accumulate ({model_name})", y=1.06)
plotting.provenance_caption(fig, {**setup.description, "n_edits": n_edits, "batch_size": batch_size})
plotting.save_figure(fig, out_dir, "abilities_vs_edits")

# %% [markdown]
# **Verdicts.** For each setting, each ability after the last edit against the unedited model on the
# same examples: the mean paired change, its bootstrap 95% interval, and "holds" only when the whole
# interval lies below zero (above, for perplexity); an interval around zero is "no detectable effect".

# %%
verdicts, missing = experiments.editing_verdicts(grid)
judged = experiments.print_verdicts(verdicts, missing)
pooled = {s: judged.get(f"{s} lowers the mean ability", {}).get("outcome") for s in after.index}
accuracies = experiments.ability_columns(before.index)
drops = (table.drop(index="unedited")[accuracies] - before[accuracies]).mean(axis=1)
numbers = {
    "model": model_name,
    "n_edits": n_edits,
    "not_run": experiments.not_run(grid).to_dict("records"),
    "abilities_unedited": before.to_dict(),
    "abilities_after": after.to_dict(orient="index"),
    "edit_metrics_after": edits.to_dict(orient="index"),
    "mean_ability_change": drops.to_dict(),
    "verdicts": judged,
    "mean_ability_verdict": pooled,
    "claim_holds": all(v == "holds" for v in pooled.values()),
}
plotting.write_numbers(out_dir, numbers)
counts = pd.Series(list(pooled.values())).value_counts().to_dict()
print(f"On {model_name} after {n_edits} edits, 'editing lowers the mean ability' per setting: "
      + ", ".join(f"{s}: {v}" for s, v in pooled.items())
      + f". RECT's claim {'holds on every setting' if numbers['claim_holds'] else 'does not hold on every setting'} ({counts}).")

# %% [markdown]
# **Claim:** editing harms general abilities, increasingly with the number of edits. The printed
# lines above are computed from this run: per editor and protocol, how much each ability and the
# mean ability changed, with a 95% interval, and whether the loss is distinguishable from noise. Small models trained from scratch store facts and
# skills differently from GPT-2 XL or LLaMA; where a setting shows no loss, that is the result on
# this model, not a failure to reproduce the paper's setting (run `params/gpt2-xl/` on a GPU for that).

# %% [markdown]
# **Explore the runs.** In JupyterLab the cell below shows a panel over `grid`, this notebook's cached
# runs: pick the editor, regularizer, protocol, metric, layer and range of edits, absolute or relative
# to the unedited model; it starts on an ability as edits accumulate, as in the last figure. Every
# change redraws from the table, with no recomputation, and "reproduce this view" prints the `kelib
# reproduce` (or papermill) command that re-runs the notebook on the runs in view. Under papermill it
# shows nothing and writes nothing (`kelib/explore.py` says how it tells the two apart).

# %%
from kelib.explore import explore

explore(grid, "side_effects", globals(), scope=("abilities", "tasks"))
