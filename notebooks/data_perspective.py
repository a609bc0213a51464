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
# # The data perspective: does the form of the edited knowledge matter? (D4S)
# Huang et al. (NeurIPS 2024) edit facts written as True/False questions, multiple-choice questions
# and directly generated answers (their MQD dataset) and report that the model's decline after
# editing depends on the form: it follows the **perplexity of the editing targets** and their
# **length**, and directly generated answers do the most harm.
#
# **Where the questions come from.** MQD is not obtainable offline, so this notebook builds an
# *MQD-style* set; it is **not MQD**. The same facts the other notebooks edit (the embedded model's
# eval cases, from CounterFact; bundled CounterFact or ZsRE cases for real models) are written in
# three forms by `kelib.question_forms`: "Is it true that the mother tongue of X is English?" → Yes;
# "The mother tongue of X is: (A) French (B) English. Answer:" → B; "The mother tongue of X is" →
# English. Each form's run edits the same facts, the same number of them, sequentially; only what the
# editor is asked to write differs. Paraphrases and neighbours are turned into the same form (the
# neighbour asks whether the edit's new object now holds for another subject: "No").

# %% tags=["parameters"]
out_dir: str = "../figures/default/data_perspective"  # where figures, tables and numbers go
model_name: str = "kelib-default"  # an embedded model, a local path or a hub id
dataset: str = ""  # edit cases for non-embedded models (e.g. counterfact_edit, zsre); empty: the model world
ability_tasks: list = []  # lm-eval tasks or groups, e.g. d4s; empty: the embedded model skills
ability_limit: int = 100  # examples per lm-eval task
device: str = "cpu"  # cuda for real models
dtype: str = "float32"  # float16 or bfloat16 halves the memory of 7B models
device_map: str = ""  # e.g. auto: spread the model over the GPUs (from_pretrained's device_map); empty: all on device
hparams: str = ""  # editors' hyperparameter set for a model given by a path (gpt2-xl: params/hparams/<EDITOR>/gpt2-xl.yaml); empty: by the model's name
stats_corpus: str = ""  # text of the key statistics C0; empty: the editors hparams (Wikipedia for real models, as the papers); wikitext2 offline; or a folder of .txt files
n_edits: int = 100  # sequential edits per form (the same facts in every form)
checkpoints: list = [50]  # intermediate evaluations
executor: str = "inline"  # where runs compute: inline (one after another, here) or local (worker processes)
workers: int = 0  # processes of the local executor; 0: one per CPU core (one per GPU on cuda)
editors: list = ["ROME", "MEMIT"]  # each edits every form, one edit at a time
forms: list = ["true_false", "multiple_choice", "direct"]  # kelib.question_forms.FORMS
batch_size: int = 1  # cases per sequential step (D4S edits one at a time)

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from kelib import experiments, plotting, question_forms, verdicts

plotting.set_style()
for form in forms:
    question_forms.check_form(form)
setup = experiments.load_setup(model_name, dataset or None, device=device, dtype=dtype, ability_tasks=ability_tasks,
                               ability_limit=ability_limit, device_map=device_map, hparams=hparams,
                               stats_corpus=stats_corpus)
name = question_forms.FORM_NAMES
edited = setup.cases[:n_edits]
examples = pd.DataFrame([{"form": name[f], "prompt": c.prompt, "new target": c.target_new, "true target": c.target_true,
                          "paraphrase": c.paraphrase_prompts[0] if c.paraphrase_prompts else "",
                          "neighbour": c.neighborhood_prompts[0] if c.neighborhood_prompts else "",
                          "neighbour answer": c.neighborhood_answers[0] if c.neighborhood_answers else ""}
                         for f in forms for c in [question_forms.as_form(edited[0], f)]])
plotting.save_table(examples, out_dir, "forms_of_one_fact")
examples

# %% [markdown]
# What each form asks the editor to write, measured on the unedited model over the edited cases: the
# perplexity of the new target after the prompt (the geometric mean over cases) and its length in
# tokens. The embedded model's tokenizer makes every object one token, so there all forms have
# length 1 and only perplexity varies; real models' objects run to several tokens.

# %%
targets = pd.DataFrame([{"form": f, **question_forms.target_statistics(setup.model, setup.tok,
                                                                       question_forms.form_cases(edited, f))}
                        for f in forms])
plotting.save_table(targets.round(5), out_dir, "target_statistics")
runs = [{"editor": e, "batch_size": batch_size, "form": f, "label": f"{e} ({name[f]})"} for e in editors for f in forms]
grid = experiments.run_grid(setup, runs, n_edits=n_edits, checkpoints=checkpoints, executor=executor, workers=workers)
plotting.save_table(experiments.not_run(grid), out_dir, "not_run")  # runs this model cannot run, and why
grid["setting"] = grid.editor
grid["base_editor"] = grid.editor.str.split(" ").str[0]
targets

# %%
scores = experiments.score_table(grid)
forms_of = grid.drop_duplicates("setting").set_index("setting")[["base_editor", "form"]]
scores = scores.join(forms_of, on="setting")
abilities = experiments.ability_columns(scores.columns)
scores["abilities_mean"] = scores[abilities].mean(axis=1)
before = experiments.baseline(grid)
unedited_mean = float(before[abilities].mean()) if len(before) else float("nan")
scores["form_name"] = scores.form.map(name)
plotting.save_table(scores.drop(columns="form_name").round(5), out_dir, "abilities_by_form")

panels = ["abilities_mean", *abilities]
fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 3.0), sharex=True, squeeze=False)
for ax, metric in zip(axes[0], panels):
    sns.lineplot(data=scores, x="checkpoint", y=metric, hue="base_editor", style="form_name", markers=True,
                 palette=plotting.setting_palette(scores.base_editor.unique()), ax=ax, legend=ax is axes[0][-1])
    ax.set_title("mean ability" if metric == "abilities_mean" else metric.replace("skill_", "skill: "))
    ax.set_xlabel("sequential edits")
    ax.set_ylabel("")
axes[0][-1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
fig.suptitle(f"General abilities as edits of each question form accumulate ({model_name})", y=1.06)
caption = {**setup.description, "n_edits per form": n_edits, "batch": batch_size,
           "forms": "MQD-style, built from the same edited facts by kelib.question_forms (not MQD)"}
plotting.provenance_caption(fig, caption)
plotting.save_figure(fig, out_dir, "abilities_vs_edits_by_form")

# %% [markdown]
# Abilities after the last edit against what each run was asked to write: one point per editor and
# form, the change of the mean ability from the unedited model against the targets' perplexity
# (before editing) and their length. D4S's finding is a falling line: the harder the targets are for
# the unedited model, the more editing them costs.

# %%
final = scores[scores.checkpoint == scores.groupby("setting").checkpoint.transform("max")]
final = final.merge(targets, on="form")
final["ability_change"] = final.abilities_mean - unedited_mean
edit_cols = [c for c in ("efficacy", "paraphrase", "specificity") if c in final]
plotting.save_table(final[["setting", "base_editor", "form", "target_perplexity", "target_tokens", *edit_cols,
                           "abilities_mean", "ability_change"]].round(5), out_dir, "abilities_vs_targets")
fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
for ax, x, label in zip(axes, ["target_perplexity", "target_tokens"],
                        ["target perplexity before editing (log)", "target length (tokens)"]):
    sns.scatterplot(data=final.assign(form_name=final.form.map(name)), x=x, y="ability_change", hue="base_editor",
                    style="form_name", s=70, palette=plotting.setting_palette(final.base_editor.unique()), ax=ax,
                    legend=ax is axes[-1])
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(label)
    ax.set_ylabel(f"mean ability change after {n_edits} edits")
axes[0].set_xscale("log")
axes[-1].legend(loc="center left", bbox_to_anchor=(1, 0.5))
plotting.provenance_caption(fig, caption)
plotting.save_figure(fig, out_dir, "abilities_vs_target_perplexity")
final[["setting", "target_perplexity", "target_tokens", *edit_cols, "ability_change"]].round(4)

# %% [markdown]
# **Verdicts.** For each run, the abilities after its last edit against the unedited model's on the
# same examples (does editing this form lower them?). Then D4S's two claims per editor, on the same
# ability examples after the last edit of two runs (paired bootstrap 95% interval of the mean over
# abilities): the form with the most perplexing targets leaves lower abilities than the form with the
# least, and directly generated answers leave lower abilities than each question form. With three
# forms, a correlation over runs would say little; the comparisons say which gap is real.

# %%
edit_verdicts, missing = experiments.editing_verdicts(grid)
pooled_name = {s: f"{s} lowers the mean ability" for s in final.setting}
after = {run.setting: experiments.abilities_of(experiments.run_examples(grid, run.run_dir))
         for run in grid.drop_duplicates("run_dir").itertuples()}


def lower_after(editor, worse_form, better_form, why):
    """"``editor`` editing ``worse_form`` leaves lower abilities than editing ``better_form``"."""
    worse, better = after[f"{editor} ({name[worse_form]})"], after[f"{editor} ({name[better_form]})"]
    pairs = [(better[m], worse[m]) for m in sorted(set(worse) & set(better))
             if worse[m].higher_is_better and not worse[m].log]
    return verdicts.compare_pooled(f"{editor}: editing {name[worse_form]} leaves lower abilities than "
                                   f"{name[better_form]} ({why})", pairs, "lower")


form_verdicts = []
ppl = targets.set_index("form").target_perplexity
for editor in final.base_editor.unique():
    ran = [f for f in forms if f"{editor} ({name[f]})" in after and after[f"{editor} ({name[f]})"]]
    if len(ran) < 2:
        continue
    hardest, easiest = max(ran, key=ppl.get), min(ran, key=ppl.get)
    if hardest != easiest:
        form_verdicts.append(lower_after(editor, hardest, easiest, "targets of higher perplexity"))
    if "direct" in ran:
        form_verdicts += [lower_after(editor, "direct", f, "directly generated answers") for f in ran if f != "direct"]
judged = experiments.print_verdicts([*edit_verdicts, *form_verdicts], missing)

log_ppl = np.log(final.target_perplexity)
correlation = {e: float(np.corrcoef(log_ppl[f.index], f.ability_change)[0, 1]) if len(f) > 2 else None
               for e, f in final.groupby("base_editor")}
numbers = {
    "model": model_name,
    "n_edits_per_form": n_edits,
    "forms": list(forms),
    "not_run": experiments.not_run(grid).to_dict("records"),
    "target_statistics": targets.set_index("form").to_dict(orient="index"),
    "abilities_mean_unedited": unedited_mean,
    "abilities_mean_final": final.set_index("setting").abilities_mean.to_dict(),
    "ability_change_final": final.set_index("setting").ability_change.to_dict(),
    "edit_metrics_final": final.set_index("setting")[edit_cols].to_dict(orient="index"),
    "correlation_log_perplexity_vs_ability_change": correlation,
    "mean_ability_verdict": {s: judged.get(k, {}).get("outcome") for s, k in pooled_name.items()},
    "form_verdicts": {v.claim: v.outcome for v in form_verdicts},
    "verdicts": judged,
}
plotting.write_numbers(out_dir, numbers)
for editor, r in correlation.items():
    print(f"{editor}: correlation over its {len(forms)} forms of log target perplexity with the ability change: "
          + ("n/a" if r is None else f"{r:+.2f}") + " (three points: read the verdicts above)")

# %% [markdown]
# **Claim (D4S):** the decline after editing depends on the form of the edited knowledge, following
# the targets' perplexity and length; directly generated answers are the worst. The printed lines are
# computed from this run. On the embedded model every object is one token, so length cannot matter
# there; and its editors read keys at the prompt's last token (see the README), which every question
# of a form shares ("?", "Answer:"), so question forms may spread an edit to other questions of the
# same form (low specificity) in a way subject-keyed editors on real models would not.

# %% [markdown]
# **Explore the runs.** In JupyterLab the cell below shows a panel over `grid`, this notebook's cached
# runs (editor names carry the form); under papermill it shows nothing and writes nothing.

# %%
from kelib.explore import explore

explore(grid, "data_perspective", globals(), scope=("abilities", "tasks"))
