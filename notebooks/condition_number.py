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
# # Condition number of edited matrices (PRUNE's claim)
# Ma et al. (ICLR 2025): as sequential edits accumulate, the condition number of the edited matrix
# grows, driven by a few large singular values of the accumulated update Δ = W_n − W_0; restraining
# those above σmax(W_0) (PRUNE) bounds it and preserves general abilities.

# %% tags=["parameters"]
out_dir: str = "../figures/default/condition_number"  # where figures, tables and numbers go
model_name: str = "kelib-default"  # an embedded model, a local path or a hub id
dataset: str = ""  # edit cases for non-embedded models (e.g. counterfact_edit); empty: the model world
ability_tasks: list = []  # lm-eval tasks or groups, e.g. prune; empty: the embedded model skills
ability_limit: int = 100  # examples per lm-eval task
device: str = "cpu"  # cuda for real models
dtype: str = "float32"  # float16 or bfloat16 halves the memory of 7B models
device_map: str = ""  # e.g. auto: spread the model over the GPUs (from_pretrained's device_map); empty: all on device
hparams: str = ""  # editors' hyperparameter set for a model given by a path (gpt2-xl: params/hparams/<EDITOR>/gpt2-xl.yaml); empty: by the model's name
stats_corpus: str = ""  # text of the key statistics C0; empty: the editors hparams (Wikipedia for real models, as the papers); wikitext2 offline; or a folder of .txt files
n_edits: int = 1000  # sequential edits per run
checkpoints: list = [100, 250, 500, 750]  # intermediate evaluations
executor: object = "inline"  # where runs compute: inline (one after another, here), local (worker processes), slurm, or a mapping {name: slurm, partition: gpu, ...} (Slurm jobs through submitit; options: kelib.cluster.SlurmOptions)
workers: int = 0  # processes of the local executor; 0: one per CPU core (one per GPU on cuda)
prune_alpha: str = "e"  # log base of PRUNE's F: e, 2, 1.5, 1.2 or linear
runs: list = [
    {"editor": "ROME", "batch_size": 1},
    {"editor": "MEMIT", "batch_size": 1},
    {"editor": "MEND", "batch_size": 1},
    {"editor": "ROME", "batch_size": 1, "regularizer": "PRUNE"},
    {"editor": "MEMIT", "batch_size": 1, "regularizer": "PRUNE"},
    {"editor": "MEND", "batch_size": 1, "regularizer": "PRUNE"},
]

# %%
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

from kelib import experiments, plotting, verdicts
from kelib.diagnostics import singular_values

plotting.set_style()
alpha = prune_alpha if prune_alpha in ("e", "linear") else float(prune_alpha)
runs_ = [{**r, "regularizer_params": {"alpha": alpha}} if r.get("regularizer") == "PRUNE" else r for r in runs]
setup = experiments.load_setup(model_name, dataset or None, device=device, dtype=dtype, ability_tasks=ability_tasks,
                               ability_limit=ability_limit, device_map=device_map, hparams=hparams,
                               stats_corpus=stats_corpus)
grid = experiments.run_grid(setup, runs_, n_edits=n_edits, checkpoints=checkpoints,
                            executor=executor, workers=workers)
plotting.save_table(experiments.not_run(grid), out_dir, "not_run")  # runs this model cannot run, and why
grid["setting"] = grid.editor + np.where(grid.regularizer == "none", "", " + " + grid.regularizer)

# %%
weights = grid[grid.scope == "weights"]
last_layer = weights.groupby("setting").layer.transform("max")
spectrum = weights[weights.layer == last_layer].pivot_table(index=["setting", "checkpoint"], columns="metric", values="value").reset_index()
plotting.save_table(spectrum[["setting", "checkpoint", "condition_number", "sigma_max", "sigma_min", "delta_sigma_max"]].round(5),
                    out_dir, "condition_number")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
for ax, col, title in [(axes[0], "condition_number", "condition number κ(W)"), (axes[1], "sigma_max", "σmax(W)")]:
    sns.lineplot(data=spectrum, x="checkpoint", y=col, hue="setting", style="setting", markers=True, ax=ax,
                 palette=plotting.setting_palette(spectrum.setting.unique()), legend=ax is axes[-1])
    ax.set_title(title)
    ax.set_xlabel("sequential edits")
    ax.set_ylabel("")
axes[-1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
plotting.provenance_caption(fig, {**setup.description, "n_edits": n_edits, "PRUNE alpha": prune_alpha, "layer": "last edited"})
plotting.save_figure(fig, out_dir, "condition_number_vs_edits")

# %%
# The spectra of W_0, Δ and W_0 + Δ after the last edit, for each editor with and without PRUNE.
editors = list(dict.fromkeys(r.get("label", r["editor"]) for r in runs))  # a labelled run gets its own panel
fig, axes = plt.subplots(1, len(editors), figsize=(4.5 * len(editors), 3.2), sharey=True, squeeze=False)
axes = axes[0]
bounds = {}
for ax, editor in zip(axes, editors):
    for regularizer in ["none", "PRUNE"]:
        rows = grid[(grid.editor == editor) & (grid.regularizer == regularizer)]
        if rows.empty:
            continue
        layer, w0, delta = experiments.final_update(rows.run_dir.iloc[0], setup.model)  # on the model's device
        w0, delta = w0.cpu(), delta.cpu()  # the spectra are plotted from the CPU
        style = plotting.regularizer_style(regularizer)
        if regularizer == "none":
            ax.plot(singular_values(w0).numpy(), color="black", lw=1, label="W_0")
        ax.plot(singular_values(delta).numpy(), color=style["color"], ls="--", label=f"Δ ({regularizer})")
        ax.plot(singular_values(w0 + delta).numpy(), color=style["color"], ls="-", label=f"W_0 + Δ ({regularizer})")
        bounds[f"{editor}+{regularizer}"] = {
            "sigma_max_w0": float(singular_values(w0)[0]),
            "sigma_max_delta": float(singular_values(delta)[0]),
        }
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-2)  # Δ has rank <= n_edits: below that, singular values are rounding noise
    ax.set_title(f"{editor}, layer {layer}, after {n_edits} edits")
    ax.set_xlabel("index")
axes[0].set_ylabel("singular value")
axes[-1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
plotting.provenance_caption(fig, {**setup.description, "n_edits": n_edits, "PRUNE alpha": prune_alpha})
plotting.save_figure(fig, out_dir, "spectra")

# %% [markdown]
# **Verdicts.** PRUNE keeps the condition number lower only if its growth is lower than its editor's
# by more than 1% (a PRUNE that restrains nothing, or only rounds through its SVD, does not pass);
# it preserves abilities only where its abilities after the last edit beat its editor's on the same
# examples, with a bootstrap 95% interval that excludes zero.

# %%
final = spectrum.groupby("setting").last()
first = spectrum.groupby("setting").first()
growth = (final.condition_number / first.condition_number).to_dict()
scores = experiments.summary(grid)
scores["setting"] = scores.editor + np.where(scores.regularizer == "none", "", " + " + scores.regularizer)
scores["abilities_mean"] = scores[experiments.ability_columns(scores.columns)].mean(axis=1)
lower = {s: verdicts.compare_values(f"{s} keeps the condition number's growth below {s.replace(' + PRUNE', '')}'s",
                                    growth[s], growth[s.replace(" + PRUNE", "")], "lower")
         for s in growth if "PRUNE" in s}
ability_verdicts, missing = experiments.regularizer_verdicts(grid)
for s, g in growth.items():
    print(f"{s}: condition number x{g:.2f} over {n_edits} edits; mean ability "
          f"{scores.set_index('setting').abilities_mean[s]:.3f}")
judged = experiments.print_verdicts([*lower.values(), *ability_verdicts], missing)
numbers = {
    "model": model_name,
    "n_edits": n_edits,
    "not_run": experiments.not_run(grid).to_dict("records"),
    "condition_number_growth": growth,
    "sigma": bounds,
    "abilities_mean": scores.set_index("setting").abilities_mean.to_dict(),
    "grows": {s: bool(g > 1.5) for s, g in growth.items() if "PRUNE" not in s},
    "prune_lower": {s: v.holds for s, v in lower.items()},
    "verdicts": judged,
}
plotting.write_numbers(out_dir, numbers)
print(f"Condition number grows (>1.5x) without PRUNE: {numbers['grows']}; PRUNE keeps it lower: {numbers['prune_lower']}.")

# %% [markdown]
# **Claim:** the condition number of edited matrices grows with the number of edits, and PRUNE's
# restraint of Δ's singular values above σmax(W_0) bounds it and keeps abilities. The printed lines
# are computed from this run, each verdict with its evidence; the spectra show which singular values
# of Δ PRUNE restrained.

# %% [markdown]
# **Explore the runs.** In JupyterLab the cell below shows a panel over `grid`, this notebook's cached
# runs: pick the editor, regularizer, protocol, metric, layer and range of edits, absolute or relative
# to the unedited model; it starts on the condition number of the last edited layer, as in the first
# figure. Every change redraws from the table, with no recomputation, and "reproduce this view" prints
# the `kelib reproduce` (or papermill) command that re-runs the notebook on the runs in view. Under
# papermill it shows nothing and writes nothing (`kelib/explore.py` says how it tells the two apart).

# %%
from kelib.explore import explore

explore(grid, "condition_number", globals(), metric="condition_number")
