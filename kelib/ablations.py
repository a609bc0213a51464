"""RECT's and PRUNE's ablations: the run lists, budgets and re-evaluations their notebook sections call.

**RECT** (Gu et al., EMNLP 2024) keeps the top k of an update's entries by relative change; its ablation
sweeps k and compares two baselines at the same budget (:mod:`kelib.regularizers.random_mask`,
:mod:`kelib.regularizers.pca`). :func:`rect_runs` builds the runs (labelled ``"ROME k=0.2"``: the
editor first, as figures colour by it), :func:`label_rect` reads k back, :func:`budget_table` states
what each of them keeps.

**PRUNE** (Ma et al., ICLR 2025) restrains the accumulated update Δ = W_n − W_0 with F (base α).
Applied post hoc (PRUNE's code: edit unrestrained, restrain at N, evaluate), every α is a view of the
*same* chain of edits, the unrestrained run's. So :func:`prune_posthoc_sweep` evaluates each α from the
weights the unrestrained run kept at its checkpoints (``checkpoint_weights/``,
:data:`kelib.runner.CHECKPOINT_WEIGHTS_LIMIT`), with no edit recomputed; it scores the same
``max_eval_cases`` evenly spaced edits the runner scores at an intermediate checkpoint (at the last
one too, where a run scores every edit). A run without those weights (matrices above the limit, a
model in half precision, a run made before they were kept) gets PRUNE runs instead, one per α
(:func:`prune_runs`), which compute the same numbers from scratch (``tests/test_ablations.py``
checks the two agree). Per-step PRUNE changes the chain, so it is always a run of its own.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import pandas as pd
import torch

from kelib.regularizers.pca import pca_rank
from kelib.regularizers.rect import kept_entries

RECT_KS = (0.05, 0.1, 0.2, 0.4, 0.8)  # the sweep's values (RECT's k from 5% to 80%)
PRUNE_ALPHAS = ("e", 2.0, 1.5, 1.2, "linear")  # PRUNE's bases: e, 2, 1.5, 1.2 and the linear F
EDIT_COLUMNS = ["efficacy", "paraphrase", "specificity"]

# -- RECT --------------------------------------------------------------------------------------------


def rect_runs(editors: Sequence[str | dict], ks: Sequence[float] = RECT_KS, baselines: Sequence[str] = ("random", "PCA"),
              baseline_ks: Sequence[float] | None = None, pca_budget: str = "entries") -> list[dict]:
    """Each editor alone, with RECT at every k, and with each baseline at every k of ``baseline_ks``
    (default: ``ks``), as :func:`kelib.experiments.run_grid` runs. An editor is a name or a run dict
    without a regularizer (``{"editor": "MEMIT", "batch_size": 100}``, with ``overrides`` if need be;
    sequential, one edit per batch by default). Labels name the editor and k."""
    runs = []
    for spec in editors:
        common = {"protocol": "sequential", "batch_size": 1, **({"editor": spec} if isinstance(spec, str) else spec)}
        if {"regularizer", "regularizer_params", "label"} & set(common):
            raise ValueError(f"an ablation editor names no regularizer or label, got {spec}")
        editor = common["editor"]
        runs.append({**common, "label": editor})
        for k in ks:
            runs.append({**common, "regularizer": "RECT", "regularizer_params": {"k": float(k)}, "label": f"{editor} k={k:g}"})
        for baseline in baselines:
            for k in (ks if baseline_ks is None else baseline_ks):
                params = {"k": float(k), **({"budget": pca_budget} if baseline == "PCA" else {})}
                runs.append({**common, "regularizer": baseline, "regularizer_params": params, "label": f"{editor} k={k:g}"})
    return runs


def label_rect(grid: pd.DataFrame) -> pd.DataFrame:
    """``grid`` with ``editor`` back to the editor's name (so that each run pairs with its editor alone
    in :func:`kelib.experiments.regularizer_verdicts`), ``k`` (NaN for the editor alone) and ``setting``
    (``"ROME + RECT k=0.2"``)."""
    out = grid.copy()
    label = out.editor.astype(str)
    out["editor"] = label.str.split(" ").str[0]
    out["k"] = label.str.extract(r"k=([0-9.eE+-]+)")[0].astype(float)
    out["setting"] = [editor if reg == "none" else f"{editor} + {reg} k={k:g}"
                      for editor, reg, k in zip(out.editor, out.regularizer, out.k)]
    return out


def run_table(grid: pd.DataFrame) -> pd.DataFrame:
    """One row per run of a :func:`label_rect` grid at its last checkpoint: ``setting, editor,
    regularizer, k``, the edit metrics, abilities, ``edit_mean``, ``abilities_mean`` (accuracy-like
    abilities) and the last edited layer's L1 norm and condition number."""
    from kelib.experiments import ability_columns, summary

    table = summary(grid.assign(editor=grid.setting)).rename(columns={"editor": "setting"})
    runs = grid.drop_duplicates("setting").set_index("setting")
    table.insert(1, "editor", table.setting.map(runs.editor))
    table.insert(3, "k", table.setting.map(runs.k))
    table["edit_mean"] = table[[c for c in EDIT_COLUMNS if c in table]].mean(axis=1)
    table["abilities_mean"] = table[ability_columns(table.columns)].mean(axis=1)
    return table


def against_unedited(grid: pd.DataFrame, unedited: dict, what: str = "", label: str = "setting") -> tuple[list, list]:
    """Each run of ``grid`` (its last checkpoint) against the unedited model's ability examples
    (:func:`kelib.experiments.unedited_examples` of any grid of the same setup): abilities lower after
    editing. Returns the verdicts and the runs without per-example abilities."""
    from kelib.experiments import abilities_of, run_examples
    from kelib.verdicts import ability_verdicts

    verdicts, missing = [], []
    for run in grid.drop_duplicates("run_dir").itertuples():
        after = abilities_of(run_examples(grid, run.run_dir))
        name = f"{getattr(run, label)} {what}".strip()
        if not unedited or not after:
            missing.append(name)
            continue
        verdicts += ability_verdicts(name, unedited, after, "worse")
    return verdicts, missing


def budget_table(shapes: dict[int, tuple[int, int]], ks: Sequence[float], pca_budget: str = "entries") -> pd.DataFrame:
    """What RECT and its baselines keep of an update to each edited matrix (``{layer: (d_out, d_in)}``):
    RECT's and the random mask's entries (the same number, ceil(k · n)), and PCA's rank r with the
    numbers its factors take, r · (d_out + d_in)."""
    rows = []
    for layer, (d_out, d_in) in sorted(shapes.items()):
        n = d_out * d_in
        for k in ks:
            rank = pca_rank((d_out, d_in), k, pca_budget)
            rows.append({"layer": layer, "shape": f"{d_out} x {d_in}", "k": k, "entries": n,
                         "RECT kept": kept_entries((d_out, d_in), k), "random kept": kept_entries((d_out, d_in), k),
                         "PCA rank": rank, "PCA numbers": rank * (d_out + d_in),
                         "PCA share": rank * (d_out + d_in) / n})
    return pd.DataFrame(rows)


# -- PRUNE -------------------------------------------------------------------------------------------


def alpha_name(alpha) -> str:
    """``"e"``, ``"linear"`` or the base as written (``"1.5"``)."""
    return alpha if isinstance(alpha, str) else f"{float(alpha):g}"


def parse_alpha(alpha):
    """A params file's α (``"e"``, ``"linear"``, ``2``, ``"1.5"``) as PRUNEParams takes it."""
    return alpha if alpha in ("e", "linear") else float(alpha)


def prune_runs(editors: Sequence[str], alphas: Sequence = PRUNE_ALPHAS, mode: str = "post_hoc",
               batch_size: int = 1) -> list[dict]:
    """PRUNE runs of each editor at each α in one mode, labelled ``"ROME PRUNE α=e per_step"``."""
    return [{"editor": editor, "batch_size": batch_size, "regularizer": "PRUNE",
             "regularizer_params": {"alpha": parse_alpha(alpha), "mode": mode},
             "label": f"{editor} PRUNE α={alpha_name(parse_alpha(alpha))} {mode}"}
            for editor in editors for alpha in alphas]


def prune_view_scores(setup, weights: dict[int, torch.Tensor], cases: Sequence, alpha) -> tuple[list[dict], dict]:
    """Post-hoc PRUNE at base ``alpha`` on the chain's weights ``weights`` (``{layer: W_n}``): set
    W_0 + F(W_n − W_0) in ``setup.model`` (W_0: the model's own, unedited, weights), score ``cases`` and
    each layer's weight diagnostics, put W_0 back. Returns rows (scope, layer, metric, value) and the
    per-case edit scores."""
    from kelib.diagnostics import weight_diagnostics
    from kelib.examples import examples_of
    from kelib.models import get_weight, set_weight
    from kelib.regularizers import PRUNE, PRUNEParams
    from kelib.runner import edit_metrics

    model = setup.model
    originals = {layer: get_weight(model, layer).detach().clone() for layer in weights}
    reg = PRUNE(PRUNEParams(alpha=parse_alpha(alpha), mode="post_hoc"))
    with warnings.catch_warnings():  # whether F restrains on this model: :func:`prune_raises` reports it
        warnings.simplefilter("ignore")
        reg.start(model, {layer: w.float() for layer, w in originals.items()}, None)
    rows = []
    try:
        for layer, wn in weights.items():
            set_weight(model, layer, reg.restrained_weight(layer, wn.to(originals[layer].device).float()))
        scores = edit_metrics(model, setup.tok, cases)
        rows += [{"scope": "edits", "layer": None, "metric": m, "value": float(v)} for m, v in scores.items()]
        for layer in weights:
            stats = weight_diagnostics(get_weight(model, layer), originals[layer].float())
            rows += [{"scope": "weights", "layer": layer, "metric": m, "value": float(v)} for m, v in stats.items()]
    finally:
        for layer, w0 in originals.items():
            set_weight(model, layer, w0)
    return rows, {"edits": examples_of(scores)}


def prune_posthoc_sweep(setup, grid: pd.DataFrame, alphas: Sequence = PRUNE_ALPHAS, max_eval_cases: int = 100,
                        first_case: int = 0) -> tuple[pd.DataFrame, dict, list[str]]:
    """Every α of post-hoc PRUNE at every checkpoint of each unrestrained run in ``grid`` (its
    ``regularizer == "none"`` runs, from :func:`kelib.experiments.run_grid` with the same
    ``first_case``), from the weights the run kept there.

    Returns the tidy rows (``editor, alpha, mode, checkpoint, scope, layer, metric, value``), the
    per-case edit scores ``{(editor, alpha, checkpoint): examples}`` and the editors whose run kept no
    weights (evaluate them with :func:`prune_runs` instead)."""
    from kelib.models import get_weight
    from kelib.runner import _spread
    from kelib.runstore import read_checkpoint_weights

    rows, examples, missing = [], {}, []
    plain = grid[grid.regularizer == "none"]
    for editor, run in plain.groupby("editor", sort=False):
        run_dir = run.run_dir.iloc[0]
        checkpoints = sorted(c for c in run.checkpoint.unique() if c > 0)
        kept = {c: read_checkpoint_weights(run_dir, c) for c in checkpoints}
        in_float32 = all(get_weight(setup.model, layer).dtype == torch.float32
                         for w in kept.values() if w for layer in w)
        if not checkpoints or any(w is None for w in kept.values()) or not in_float32:
            missing.append(editor)
            continue
        cases = setup.cases[first_case: first_case + max(checkpoints)]
        for checkpoint in checkpoints:
            scored = _spread(cases[:checkpoint], max_eval_cases)
            for alpha in alphas:
                found, by_scope = prune_view_scores(setup, kept[checkpoint], scored, alpha)
                name = alpha_name(parse_alpha(alpha))
                rows += [{"editor": editor, "alpha": name, "mode": "post_hoc", "checkpoint": checkpoint, **r}
                         for r in found]
                examples[(editor, name, checkpoint)] = by_scope
    columns = ["editor", "alpha", "mode", "checkpoint", "scope", "layer", "metric", "value"]
    return pd.DataFrame(rows, columns=columns), examples, missing


def from_runs(grid: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`prune_runs` runs (and the editors alone, α ``none``) in the sweep's columns."""
    label = grid.editor.astype(str)
    parsed = label.str.extract(r"^(\S+) PRUNE α=(\S+) (\S+)$")
    out = grid.assign(editor=parsed[0].fillna(label.str.split(" ").str[0]),
                      alpha=parsed[1].where(grid.regularizer == "PRUNE", "none"),
                      mode=parsed[2].where(grid.regularizer == "PRUNE", "none"))
    return out[["editor", "alpha", "mode", "checkpoint", "scope", "layer", "metric", "value"]]


def tradeoff_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per editor, α, mode and checkpoint: efficacy, paraphrase, specificity, their mean
    (``edit_mean``) and the condition number and σmax of the last edited layer."""
    from kelib.experiments import KEY_METRICS

    keys = ["editor", "alpha", "mode", "checkpoint"]
    edits = rows[rows.scope == "edits"].pivot_table(index=keys, columns="metric", values="value").rename(columns=KEY_METRICS)
    weights = rows[rows.scope == "weights"]
    last = weights.groupby(["editor"]).layer.transform("max")
    weights = weights[weights.layer == last].pivot_table(index=keys, columns="metric", values="value")
    table = edits.join(weights[["condition_number", "sigma_max"]], how="outer").reset_index()
    present = [c for c in EDIT_COLUMNS if c in table]
    table["edit_mean"] = table[present].mean(axis=1)
    return table


def prune_raises(setup, editors_layers: dict[str, Sequence[int]], alphas: Sequence = PRUNE_ALPHAS) -> pd.DataFrame:
    """Per editor, layer and α: σmax(W_0), 1 / ln α, and whether F *raises* singular values there
    (σmax(W_0) < 1 / ln α; :func:`kelib.regularizers.prune.raised_range`)."""
    from kelib.diagnostics import singular_values
    from kelib.models import get_weight
    from kelib.regularizers.prune import raised_range

    rows = []
    for editor, layers in editors_layers.items():
        for layer in layers:
            bound = float(singular_values(get_weight(setup.model, layer).float())[0])
            for alpha in alphas:
                a = parse_alpha(alpha)
                span = raised_range(bound, a)
                rows.append({"editor": editor, "layer": layer, "alpha": alpha_name(a), "sigma_max_w0": bound,
                             "one_over_ln_alpha": None if a == "linear" else 1 / math.log(math.e if a == "e" else a),
                             "F raises σ in": "" if span is None else f"({span[0]:.3g}, {span[1]:.3g})"})
    return pd.DataFrame(rows)


def common_cases(before, after):
    """Two per-case Samples restricted to the cases both scored (by id), in ``before``'s order: a
    run's final checkpoint scores every edit, the post-hoc sweep an evenly spaced subset."""
    from kelib.examples import Sample

    if before.ids is None or after.ids is None:
        raise ValueError("pairing by case needs the cases' ids")
    theirs = {str(i): k for k, i in enumerate(after.ids)}
    mine = [k for k, i in enumerate(before.ids) if str(i) in theirs]
    idx = [theirs[str(before.ids[k])] for k in mine]

    def pick(s, where):
        return Sample(s.values[where], None if s.weights is None else s.weights[where],
                      tuple(s.ids[i] for i in where), s.log, s.higher_is_better)

    return pick(before, mine), pick(after, idx)


def _edit_means(examples: dict):
    from kelib.experiments import edit_mean_of

    return edit_mean_of(examples) if examples else None


def _run_examples(grid: pd.DataFrame, label: str, checkpoint: int) -> dict:
    from kelib.experiments import run_examples

    runs = grid[grid.editor == label]
    if runs.empty or checkpoint not in set(runs.checkpoint):
        return {}
    return run_examples(grid, runs.run_dir.iloc[0], checkpoint)


def prune_verdicts(tradeoff: pd.DataFrame, sweep_examples: dict, plain_grid: pd.DataFrame,
                   step_grid: pd.DataFrame | None = None, posthoc_grid: pd.DataFrame | None = None,
                   posthoc_runs: dict[str, pd.DataFrame] | None = None) -> list:
    """The ablation's verdicts (:mod:`kelib.verdicts`) at each editor's last milestone of the sweep:
    every post-hoc α against the editor alone (κ lower, by more than 1%; editing performance lower
    per case, the price of restraining), and each per-step run against post hoc at the same α at the
    per-step run's last milestone (κ lower; edits better, on the cases both scored).

    ``sweep_examples`` from :func:`prune_posthoc_sweep`; ``plain_grid`` holds the editors alone,
    ``step_grid`` the per-step runs and ``posthoc_grid`` any post-hoc runs made instead of the sweep
    (:func:`prune_runs` labels). ``posthoc_runs`` (``{α: grid}``, the editors' post-hoc PRUNE runs of the
    notebook's main grid, editor-named) adds, where such a run has the abilities at the per-step runs'
    last milestone, per step against post hoc on the abilities (higher per step)."""
    from kelib.experiments import abilities_of
    from kelib.verdicts import ability_verdicts, compare, compare_values

    found = []
    table = tradeoff.set_index(["editor", "alpha", "mode", "checkpoint"])

    def kappa(editor, alpha, mode, checkpoint):
        key = (editor, alpha, mode, checkpoint)
        return float(table.condition_number[key]) if key in table.index else math.nan

    def posthoc_examples(editor, alpha, checkpoint):
        if (editor, alpha, checkpoint) in sweep_examples:
            return sweep_examples[(editor, alpha, checkpoint)]
        if posthoc_grid is not None:
            return _run_examples(posthoc_grid, f"{editor} PRUNE α={alpha} post_hoc", checkpoint)
        return {}

    posthoc = tradeoff[tradeoff["mode"] == "post_hoc"]
    for editor, rows in posthoc.groupby("editor", sort=False):
        last = int(rows.checkpoint.max())
        plain = _edit_means(_run_examples(plain_grid, editor, last))
        for alpha in rows.alpha.unique():
            name = f"{editor} + PRUNE α={alpha} (post hoc)"
            found.append(compare_values(f"{name} keeps κ below {editor}'s at {last} edits",
                                        kappa(editor, alpha, "post_hoc", last), kappa(editor, "none", "none", last), "lower"))
            mine = _edit_means(posthoc_examples(editor, alpha, last))
            if plain is not None and mine is not None:
                before, after = common_cases(plain, mine)
                found.append(compare(f"{name} edits worse than {editor} alone at {last} edits "
                                     "(mean of efficacy, paraphrase, specificity)", before, after, "lower"))
    if step_grid is not None and not step_grid.empty:
        for label, rows in from_runs(step_grid).groupby(step_grid.editor.astype(str), sort=False):
            editor, alpha, last = rows.editor.iloc[0], rows.alpha.iloc[0], int(rows.checkpoint.max())
            name = f"{editor} + PRUNE α={alpha} per step"
            reference = kappa(editor, alpha, "post_hoc", last)
            found.append(compare_values(f"{name} keeps κ below post hoc at {last} edits",
                                        kappa(editor, alpha, "per_step", last), reference, "lower"))
            mine = _edit_means(_run_examples(step_grid, label, last))
            theirs = _edit_means(posthoc_examples(editor, alpha, last))
            if mine is not None and theirs is not None:
                before, after = common_cases(theirs, mine)
                found.append(compare(f"{name} edits better than post hoc at {last} edits "
                                     "(mean of efficacy, paraphrase, specificity)", before, after, "higher"))
            reference_run = (posthoc_runs or {}).get(alpha)
            if reference_run is not None:
                theirs = abilities_of(_run_examples(reference_run, editor, last))
                mine = abilities_of(_run_examples(step_grid, label, last))
                if theirs and mine:
                    found += ability_verdicts(f"{name} (vs post hoc at {last} edits)", theirs, mine, "better")
    return found
