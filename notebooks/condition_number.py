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
# PRUNE's ablation (the section below): the α sweep post hoc, and per-step against post-hoc
sweep_editors: list = ["ROME", "MEMIT", "MEND"]  # editors alone in `runs` whose chain the α sweep restrains
sweep_alphas: list = ["e", 2, 1.5, 1.2, "linear"]  # PRUNE's bases (and its linear F)
sweep_checkpoints: list = []  # milestones of the sweep (among the runs' checkpoints and n_edits); empty: all
sweep_eval_cases: int = 100  # edits scored per milestone (evenly spaced), as at the runs' intermediate checkpoints
per_step_alphas: list = ["e"]  # α of the per-step PRUNE runs
per_step_edits: int = 0  # sequential edits of the per-step runs; 0: n_edits (and the same checkpoints)
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
import pandas as pd
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
# ## PRUNE's ablation: the base α, and per-step against post-hoc
# PRUNE's F compresses the singular values of Δ = W_n − W_0 above σmax(W_0) with log base α (e, 2,
# 1.5, 1.2; a larger base restrains more) or halves their excess (linear). Post hoc (PRUNE's code),
# every α restrains the *same* chain of edits, the editor's own: each α is evaluated here from the
# weights the editor's run above kept at its checkpoints, without editing again (kelib/ablations.py;
# a run that kept none, as on 7B models, gets one PRUNE run per α instead, which computes the same
# numbers). Per step, PRUNE restrains after every edit and the next edit starts from the restrained
# weights: a chain of its own, run for `per_step_alphas` over `per_step_edits` edits. At each
# milestone: efficacy, paraphrase and specificity beside the condition number of the last edited
# layer; the same `sweep_eval_cases` evenly spaced edits are scored at every milestone of the sweep.

# %%
from kelib import ablations

sweep_grid = grid[grid.editor.isin(sweep_editors)]
if sweep_checkpoints:
    sweep_grid = sweep_grid[sweep_grid.checkpoint.isin([0, *sweep_checkpoints])]
sweep, sweep_examples, no_weights = ablations.prune_posthoc_sweep(setup, sweep_grid, sweep_alphas,
                                                                  max_eval_cases=sweep_eval_cases)
parts = [sweep, ablations.from_runs(sweep_grid[sweep_grid.regularizer == "none"])]
if no_weights:  # no checkpoint weights kept: one PRUNE run per α computes the same views
    print(f"No checkpoint weights kept by the runs of {no_weights} (matrices over kelib.runner.CHECKPOINT_WEIGHTS_LIMIT, "
          "half precision, or runs cached before kelib kept them; deleting such a run's folder recomputes it once, "
          "with them): one post-hoc PRUNE run per α instead.")
    posthoc_grid = experiments.run_grid(setup, ablations.prune_runs(no_weights, sweep_alphas, "post_hoc"), n_edits=n_edits,
                                        checkpoints=checkpoints, executor=executor, workers=workers)
    parts.append(ablations.from_runs(posthoc_grid))
step_edits = per_step_edits or n_edits
step_grid = experiments.run_grid(setup, ablations.prune_runs(sweep_editors, per_step_alphas, "per_step"), n_edits=step_edits,
                                 checkpoints=[c for c in checkpoints if c < step_edits], executor=executor, workers=workers)
parts.append(ablations.from_runs(step_grid))
tradeoff = ablations.tradeoff_table(pd.concat(parts, ignore_index=True))
tradeoff = tradeoff[tradeoff.checkpoint > 0]
plotting.save_table(tradeoff.round(5), out_dir, "prune_ablation")
raises = ablations.prune_raises(setup, {e: experiments.editor_hparams(setup, e).layers[-1:] for e in sweep_editors},
                                sweep_alphas)
plotting.save_table(raises.round(4), out_dir, "prune_ablation_raises")  # where F raises instead of restrains
raises

# %%
# The trade-off: κ of the last edited layer against the edits (top), editing performance against κ (bottom)
alpha_order = ["none", *[ablations.alpha_name(ablations.parse_alpha(a)) for a in sweep_alphas]]
palette = dict(zip(alpha_order, ["black", *sns.color_palette("viridis", len(alpha_order) - 1)]))
fig, axes = plt.subplots(2, len(sweep_editors), figsize=(4.2 * len(sweep_editors), 6.4), squeeze=False)
for col, editor in enumerate(sweep_editors):
    mine = tradeoff[tradeoff.editor == editor]
    for (base, mode), line in sorted(mine.groupby(["alpha", "mode"]), key=lambda g: (alpha_order.index(g[0][0]), g[0][1])):
        line = line.sort_values("checkpoint")
        style = {"color": palette.get(base, "grey"), "label": "none" if base == "none" else f"α={base} {mode.replace('_', '-')}",
                 "ls": "--" if mode == "per_step" else "-", "marker": "s" if mode == "per_step" else "o", "ms": 4}
        axes[0, col].plot(line.checkpoint, line.condition_number, **style)
        axes[1, col].plot(line.condition_number, line.edit_mean, **style)
        for point in line.itertuples():
            axes[1, col].annotate(f"{point.checkpoint}", (point.condition_number, point.edit_mean), fontsize=6,
                                  xytext=(2, 2), textcoords="offset points", color=style["color"])
    axes[0, col].set(yscale="log", title=f"{editor}: κ(W) of the last edited layer", xlabel="sequential edits")
    axes[1, col].set(xscale="log", title=f"{editor}: editing vs κ (labels: edits)", xlabel="κ(W)",
                     ylabel="mean of efficacy, paraphrase, specificity" if col == 0 else "")
axes[0, -1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7)
fig.subplots_adjust(hspace=0.45)
plotting.provenance_caption(fig, {**setup.description, "n_edits": n_edits, "per-step edits": step_edits,
                                  "α": sweep_alphas, "per-step α": per_step_alphas,
                                  "edits scored per milestone": sweep_eval_cases})
plotting.save_figure(fig, out_dir, "prune_ablation")
tradeoff[["editor", "alpha", "mode", "checkpoint", *ablations.EDIT_COLUMNS, "edit_mean", "condition_number"]].round(3)

# %% [markdown]
# **Verdicts of the ablation.** At each editor's last milestone: every post-hoc α against the editor
# alone, κ lower (no sampling noise: more than 1% lower) and editing performance lower per case (the
# price of the restraint; "no detectable effect" if none); per step against post hoc at the per-step
# runs' last milestone, on the cases both scored, and on the abilities where the post-hoc PRUNE run
# above (α = `prune_alpha`) measured them at that milestone.

# %%
main_prune = {ablations.alpha_name(alpha): grid[(grid.regularizer == "PRUNE") & (grid.protocol == "sequential")]}
ablation_verdicts = ablations.prune_verdicts(tradeoff, sweep_examples, sweep_grid, step_grid,
                                            posthoc_grid if no_weights else None, main_prune)
numbers["prune_ablation"] = {
    "alphas": [ablations.alpha_name(ablations.parse_alpha(a)) for a in sweep_alphas],
    "per_step_alphas": [ablations.alpha_name(ablations.parse_alpha(a)) for a in per_step_alphas],
    "per_step_edits": step_edits,
    "from_checkpoint_weights": [e for e in sweep_editors if e not in no_weights],
    "table": tradeoff.round(6).to_dict("records"),
    "raises": raises.round(6).to_dict("records"),
    "verdicts": experiments.print_verdicts(ablation_verdicts),
}
plotting.write_numbers(out_dir, numbers)

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
