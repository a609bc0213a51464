"""What the notebooks call: load a model and its edit cases, run a grid of editing runs, summarise.

A notebook names a model (``kelib-default`` offline, or a hub model such as ``gpt2-xl``), editors,
regularizers and protocols; :func:`run_grid` runs each combination with :func:`kelib.runner.run_edits`
and returns one tidy table with ``editor, regularizer, protocol, batch_size`` columns added. Every run
is kept under ``<cache>/runs/``, keyed by the model's weights, the run's spec, hyperparameters, cases
and evaluators: a notebook re-run reads finished runs back and resumes interrupted ones, and two
notebooks that need the same run share it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from kelib.config import ConfigError
from kelib.editors import get_editor, load_hparams
from kelib.editors.base import EditError
from kelib.models import EMBEDDED_MODELS, ModelError
from kelib.paths import cache_dir
from kelib.runner import RunSpec
from kelib.runstore import COLUMNS
from kelib.stats import statistics_for



def _recipe_name(model_name: str) -> str | None:
    """``"default"`` for ``kelib-default`` (a recipe in params/embedded.yaml); None for other models."""
    return model_name.removeprefix("kelib-") if model_name in EMBEDDED_MODELS else None

KEY_METRICS = {
    "efficacy_success": "efficacy",
    "paraphrase_success": "paraphrase",
    "neighborhood_success": "specificity",
    "efficacy_token_acc": "efficacy",
    "paraphrase_token_acc": "paraphrase",
    "neighborhood_token_acc": "specificity",
    "multi_hop_success": "multi_hop",
}


@dataclass
class Setup:
    """A loaded model with its edit cases and its general-ability evaluator."""

    model_name: str
    model: object
    tok: object
    cases: list
    evaluators: dict
    description: dict = field(default_factory=dict)  # for figure captions
    hparams_set: str | None = None  # params/hparams/<EDITOR>/<set>.yaml; None: found by the model's name
    stats_corpus: str | None = None  # every editor's C0 corpus; None: each editor's hparams (mom2_dataset)
    load_args: dict | None = None  # load_setup's arguments: worker processes load the same setup


def load_setup(
    model_name: str = "kelib-default",
    dataset: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    ability_tasks: Sequence[str] = (),
    ability_limit: int | None = None,
    n_facts: int = 300,
    n_skill: int | None = None,  # every held-out example of each skill (the recipe's n_eval)
    device_map: str | dict | None = None,
    hparams: str | None = None,
    stats_corpus: str | None = None,
) -> Setup:
    """Model, tokenizer, cases and evaluators for ``model_name``.

    Embedded models edit the facts of their own world (``dataset=None``) and measure abilities with
    their skills and unedited facts. Other models edit ``dataset`` (e.g. ``counterfact_edit``, ``zsre``)
    and measure abilities with lm-eval on ``ability_tasks`` (e.g. ``["rect"]``) at ``ability_limit``.

    ``device_map`` (e.g. ``"auto"``) is passed to ``from_pretrained`` instead of moving the model to
    ``device``. ``hparams`` names the hyperparameter set of every editor (``gpt2-xl`` reads
    ``params/hparams/<EDITOR>/gpt2-xl.yaml``) for a model given by a path; ``stats_corpus`` replaces every
    editor's statistics corpus (``wikitext2`` offline, ``wikipedia``, or a folder of text files). Empty
    strings mean None: the model's own sets, the hparams' corpora.
    ``"<dataset>:known"`` keeps the cases the model answers top-1 before editing (:mod:`kelib.known`).
    """
    from kelib.models import load_model
    from kelib.stats import check_corpus

    hparams, stats_corpus = hparams or None, stats_corpus or None
    load_args = {"model_name": model_name, "dataset": dataset, "device": device, "dtype": dtype,
                 "ability_tasks": list(ability_tasks), "ability_limit": ability_limit, "n_facts": n_facts,
                 "n_skill": n_skill, "device_map": device_map, "hparams": hparams, "stats_corpus": stats_corpus}
    if stats_corpus is not None:
        try:
            check_corpus(stats_corpus)
        except ValueError as err:
            raise ConfigError(f"stats_corpus: {err}") from None
    model, tok = load_model(model_name, dtype=dtype, device=device, device_map=device_map or None)
    cases, evaluators, dataset = _cases_and_evaluators(model, tok, model_name, dataset, ability_tasks, ability_limit,
                                                       n_facts, n_skill)
    description = {"model": model_name, "data": dataset, "device": _device_name(device), "dtype": dtype}
    if device_map:
        description["device_map"] = device_map
    if hparams:
        description["hparams"] = hparams
    if stats_corpus:
        description["stats corpus"] = stats_corpus
    return Setup(model_name, model, tok, cases, evaluators, description, hparams, stats_corpus, load_args)


def _cases_and_evaluators(model, tok, model_name, dataset, ability_tasks, ability_limit, n_facts, n_skill):
    """:func:`load_setup`'s cases and evaluators for a loaded model, and the dataset's description.
    An MQuAKE dataset adds the ``multi_hop`` evaluator (:mod:`kelib.multihop`) over its cases."""
    evaluators = {}
    recipe = _recipe_name(model_name)
    if recipe is not None and dataset is None:
        from kelib.embedded import abilities_evaluator, world_cases

        cases = world_cases(recipe)
        evaluators["abilities"] = abilities_evaluator(recipe, n_facts=n_facts, n_skill=n_skill)
        dataset = "world of the embedded model"
    else:
        from kelib.data import DATASETS, load_cases, load_mquake
        from kelib.known import eval_cases, known_cases, split_known

        if dataset is None:
            raise ValueError(f"{model_name} has no world of its own: name a dataset (e.g. counterfact_edit)")
        base, known_only = split_known(dataset)
        cases = load_cases(base)
        if known_only:  # the facts the model answers top-1 before editing, less the tune split (kelib.known)
            cases = eval_cases(model, tok, known_cases(model, tok, cases, base))
        if DATASETS[base].schema == "mquake":  # its multi-hop questions, asked once their chain is edited
            from kelib.multihop import multi_hop_evaluator

            evaluators["multi_hop"] = multi_hop_evaluator(load_mquake(base), base)
    if ability_tasks:
        evaluators["tasks"] = lm_eval_evaluator(list(ability_tasks), ability_limit, model_name)
    return cases, evaluators, dataset


def with_dataset(setup: Setup, dataset: str, abilities: bool = True) -> Setup:
    """``setup``'s model on another dataset's cases (``mquake_hard``, ``zsre``...), with the evaluators
    :func:`load_setup` would give it, without loading the model again; worker processes load it from
    the returned setup's arguments. ``abilities=False`` leaves out the lm-eval tasks (a table of edit
    metrics only, such as D4S's on MQuAKE, need not pay for them at every checkpoint)."""
    if setup.load_args is None:
        raise ConfigError("with_dataset needs a setup made by load_setup (it reuses its arguments)")
    args = {**setup.load_args, "dataset": dataset}
    if not abilities:
        args["ability_tasks"] = []
    cases, evaluators, data = _cases_and_evaluators(
        setup.model, setup.tok, args["model_name"], dataset, args["ability_tasks"], args["ability_limit"],
        args["n_facts"], args["n_skill"])
    return dataclasses.replace(setup, cases=cases, evaluators=evaluators, load_args=args,
                               description={**setup.description, "data": data})


def editor_hparams(setup: Setup, editor: str, overrides: dict | None = None):
    """``editor``'s hyperparameters for ``setup``: its hparams set (by the model's name, or the set
    ``setup.hparams_set`` names), with ``setup.stats_corpus`` as the statistics corpus when given."""
    overrides = dict(overrides or {})
    if setup.stats_corpus and "mom2_dataset" in {f.name for f in dataclasses.fields(get_editor(editor).hparams_class)}:
        overrides.setdefault("mom2_dataset", setup.stats_corpus)
    return load_hparams(editor, setup.model_name, overrides or None, hparams_set=setup.hparams_set)


def key_statistics(model_name: str, layers: Sequence[int] | None = None, editor: str = "MEMIT",
                   hparams: str | None = None, stats_corpus: str | None = None, device: str = "cpu",
                   dtype: str = "float32", device_map: str | None = None, progress: bool = True) -> dict[int, str]:
    """Compute (or find) the key statistics C0 that ``editor`` uses on ``model_name`` for ``layers``
    (default: the editor's layers), in the cache every run reads (``<cache>/stats/``, under the same
    lock): what ``kelib stats`` does, so that a cluster computes them once before the grid. One pass
    over the corpus serves every layer. Returns ``{layer: file}``."""
    from kelib.models import load_model
    from kelib.stats import SecondMomentSettings, stats_path, stats_spec_for

    model, tok = load_model(model_name, dtype=dtype, device=device, device_map=device_map or None)
    setup = Setup(model_name, model, tok, [], {}, hparams_set=hparams or None, stats_corpus=stats_corpus or None)
    settings = editor_hparams(setup, editor)
    if not isinstance(settings, SecondMomentSettings):
        raise ConfigError(f"{editor} uses no key statistics; name an editor that does (ROME, MEMIT, ...)")
    layers = list(layers or settings.layers)
    statistics_for(model, tok, settings, progress=progress).prefetch(layers)
    return {layer: str(stats_path(model, layer, stats_spec_for(settings))) for layer in layers}


def _run_meta(setup: Setup, hparams) -> dict:
    """What a run's identity adds about the model and its statistics: the model's name and, for a
    folder corpus, its contents' hash (the hparams hold only its path)."""
    from kelib.stats import CORPORA, corpus_version

    meta = {"model": setup.model_name}
    corpus = getattr(hparams, "mom2_dataset", None)
    if corpus is not None and corpus not in CORPORA:
        meta["stats_corpus"] = corpus_version(corpus)
    return meta


def _device_name(device: str) -> str:
    """``cuda (NVIDIA H200)`` for a GPU, so that a figure's caption names the hardware; else ``device``."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return str(device)


def lm_eval_evaluator(tasks: list[str], limit: int | None, model_name: str):
    """An evaluator running lm-eval tasks (kelib's bundled ones, plus ``embedded`` for embedded models)."""
    from kelib.evaluation import evaluate_abilities

    task_dirs = []
    if _recipe_name(model_name) is not None:
        from kelib.embedded import embedded_task_dir

        task_dirs.append(embedded_task_dir(_recipe_name(model_name)))

    def evaluate(model, tok) -> dict[str, float]:
        table = evaluate_abilities(model, tok, tasks, limit=limit, task_dirs=task_dirs, progress=False)
        return {f"{r.task}/{r.metric}": r.value for r in table.itertuples()}

    evaluate.key = {"tasks": tasks, "limit": limit}
    return evaluate


def run_grid(
    setup: Setup,
    runs: Sequence[dict],
    n_edits: int,
    checkpoints: Sequence[int] = (),
    hparams_overrides: dict | None = None,
    max_eval_cases: int = 100,
    first_case: int = 0,
    progress: bool = True,
    executor: str | dict = "inline",
    workers: int = 0,
) -> pd.DataFrame:
    """Run each of ``runs`` (dicts with ``editor`` and optionally ``regularizer``,
    ``regularizer_params``, ``protocol``, ``batch_size``, ``overrides``, ``label`` and ``ability_edits``)
    on ``n_edits`` cases, cached and resumable.

    ``ability_edits: N`` (protocol ``single``) measures the abilities after each of the first N single
    edits and records, per example, their mean (:class:`~kelib.runner.RunSpec`).

    ``overrides`` changes the editor's hyperparameters for this run only (on top of
    ``hparams_overrides[editor]``), e.g. ``{"original_key_use": False}``; ``label`` then names the run
    in the table's ``editor`` column (``"ROME (corrected keys)"``), so that it is told apart from the
    editor's plain run (its first word should stay the editor's name: figures colour by it).
    ``form`` edits the cases written in a question form (:mod:`kelib.question_forms`: ``true_false``,
    ``multiple_choice``, ``direct``); the table then has a ``form`` column. ``direct`` is the cases as
    they are, so its run is the one a run without ``form`` makes.

    Returns the runs' tidy tables stacked, with the run's settings as extra columns.

    ``executor`` says where runs are computed (:mod:`kelib.executors`): ``inline`` here, one after
    another; ``local`` in ``workers`` processes of this machine (0: one per core, or per GPU on cuda),
    which load the same setup (``setup`` must come from :func:`load_setup`) and write into the run
    cache; the finished runs are then read back here, so the table is the same either way. ``slurm``
    (a mapping: ``{"name": "slurm", "partition": "gpu", ...}``, :class:`kelib.cluster.SlurmOptions`)
    submits one cluster job per run through submitit and waits for them with a progress bar; with
    ``wait: False`` it returns at once, the runs not yet finished listed by :func:`not_run` as pending
    (``grid.attrs["pending"]``) with the command that collects them.

    A run that cannot run on this model (an :class:`~kelib.editors.base.EditError`,
    :class:`~kelib.config.ConfigError` or :class:`~kelib.models.ModelError`: MEND not trained for it,
    no hyperparameters for it, an update that is not finite) is reported, not fatal: its reason is
    printed, listed by :func:`not_run` (``grid.attrs["not_run"]``) and added to
    ``setup.description``, which every figure's caption shows; it has no rows, and the other runs
    go on. Any other error stops the grid.

    Before the first run, every run is checked (:func:`kelib.preflight.editor_problems`: its
    hyperparameters and layers, the regularizer, MEND trained for this model): those that cannot run
    are printed at once and skipped, rather than found hours later when their turn comes.
    """
    from kelib.executors import ExecutorError, executor_choice, run_local
    from kelib.preflight import editor_problems

    executor, executor_options = executor_choice(executor)
    cases = setup.cases[first_case : first_case + n_edits]
    tables, skipped = [], []
    blocked = editor_problems(setup.model, setup.model_name, runs, hparams_overrides, hparams_set=setup.hparams_set)
    names = [run_setting(run) for run in runs]
    if blocked:
        print(f"Checked before the first run: {len(blocked)} setting(s) cannot run on {setup.model_name} "
              "and are skipped:")
        for setting, reason in blocked.items():
            print(f"{setting} not run: {' '.join(reason.split())}")
    outcomes: dict[int, str] = {}  # a job's outcome, by the run's index: "done", "not run: ...", "pending: ..."
    if executor != "inline" and setup.load_args is None:
        raise ConfigError(f"executor {executor!r} needs a setup made by load_setup: its worker processes (or "
                          "jobs) load the same model from load_setup's arguments")
    grid_args = (n_edits, list(checkpoints), hparams_overrides, max_eval_cases, first_case)
    if executor == "local":
        jobs = [(setup.load_args, run, *grid_args) for run, name in zip(runs, names) if name not in blocked]
        run_local(_run_in_worker, jobs, workers, setup.load_args["device"], progress,
                  describe=lambda job: run_setting(job[1]),
                  cost=lambda job: estimated_seconds(job[1], n_edits, checkpoints))
    if executor == "slurm":
        outcomes = _run_on_cluster(setup, {i: run for i, (run, name) in enumerate(zip(runs, names))
                                           if name not in blocked}, grid_args, executor_options, progress)
    for i, (run, name) in enumerate(zip(runs, names)):
        if name in blocked:
            skipped.append(_not_run_record(run, blocked[name]))
            continue
        outcome = outcomes.get(i, "done")
        if outcome != "done":  # its job found it cannot run, or it is still queued (wait: false)
            skipped.append(_not_run_record(run, outcome.removeprefix("not run: ")))
            print(f"{name} not run: {skipped[-1]['reason']}")
            continue
        try:
            table = _run_one(setup, run, cases, n_edits, checkpoints, hparams_overrides, max_eval_cases,
                             progress, executor != "slurm")  # slurm: only read, never compute here
            if table is None:
                raise ExecutorError(
                    f"{name}: its job ended, but the run cache does not hold the run complete where this process "
                    "looks for it. A run's folder is keyed by a fingerprint of the weights taken on the device "
                    "they are on: run the notebook on the same kind of device as the jobs (e.g. in a job of the "
                    "same partition, with the same device and dtype)")
            tables.append(table)
        except NOT_RUN_ERRORS as err:
            skipped.append(_not_run_record(run, str(err)))
            print(f"{name} not run: {skipped[-1]['reason']}")
    grid = (pd.concat(tables, ignore_index=True) if tables
            else pd.DataFrame(columns=[*COLUMNS, "editor", "regularizer", "protocol", "batch_size", "run_dir"]))
    grid.attrs["not_run"] = skipped
    grid.attrs["pending"] = [s for s in skipped if s["reason"].startswith("pending: ")]
    if skipped:
        setup.description["not run"] = "; ".join(
            f"{_setting(s['editor'], s['regularizer'])} ({_short(s['reason'])})" for s in skipped)
    return grid


# Seconds per edit on the default model, one thread (measured in `make reproduce`'s 1,000-edit runs and
# bench_editors.py --speed), and per checkpoint evaluation: only to start long runs first
# (:func:`estimated_seconds`), never part of a result.
EDIT_SECONDS = {"ROME": 0.15, "MEMIT": 0.2, "PMET": 0.5, "AlphaEdit": 1.0, "FT": 0.25, "GRACE": 0.08, "KN": 0.75,
                "MEND": 0.03}
REGULARIZER_FACTOR = {"D4S": 1.5}
CHECKPOINT_SECONDS = 12.0


def estimated_seconds(run: dict, n_edits: int, checkpoints: Sequence[int]) -> float:
    """A rough length of ``run`` (a :func:`run_grid` run) of ``n_edits`` edits, to order work by: the
    editor's seconds per edit (editors it does not know count as the slowest), its regularizer's
    factor, and an evaluation per checkpoint. A run that only evaluates another's chain of edits
    counts its evaluations only, so it starts after the runs that edit."""
    per_edit = EDIT_SECONDS.get(run["editor"], max(EDIT_SECONDS.values()))
    per_edit *= REGULARIZER_FACTOR.get(run.get("regularizer", "none"), 1.0)
    if _evaluates_only(run):  # its chain is the unregularized run's (kelib.chains), started before it
        per_edit = 0.0
    if run.get("protocol", "sequential") == "sequential":
        evaluations = len(set(checkpoints) | {0, n_edits})
    else:
        evaluations = 1 + run.get("ability_edits", 0)  # single edits: abilities after each of the first N
    return n_edits * per_edit + evaluations * CHECKPOINT_SECONDS


def _evaluates_only(run: dict) -> bool:
    """Whether ``run``'s regularizer changes only the evaluated view (post-hoc PRUNE): its edits are the
    unregularized run's, which it evaluates once that run is cached (:mod:`kelib.chains`)."""
    from kelib.regularizers import make_regularizer

    name = run.get("regularizer", "none")
    try:
        return name != "none" and not make_regularizer(name, run.get("regularizer_params")).changes_edits
    except (ValueError, ConfigError):  # refused before the first run (kelib.preflight)
        return False


RUN_KEYS = {"editor", "regularizer", "regularizer_params", "protocol", "batch_size", "overrides", "label", "form",
            "ability_edits"}

# Errors that mean "this run cannot run on this model", as opposed to a bug (see :func:`run_grid`).
NOT_RUN_ERRORS = (EditError, ConfigError, ModelError)


def not_run(grid: pd.DataFrame) -> pd.DataFrame:
    """The runs of ``grid`` that :func:`run_grid` could not run: editor, regularizer, protocol,
    batch_size and the reason (empty when every run ran)."""
    return pd.DataFrame(grid.attrs.get("not_run", []),
                        columns=["editor", "regularizer", "protocol", "batch_size", "reason"])


_WORKER_SETUPS: dict[str, Setup] = {}  # a worker process loads each setup once, for all its runs


def _run_in_worker(load_args: dict, run: dict, n_edits, checkpoints, hparams_overrides, max_eval_cases,
                   first_case) -> str:
    """One run of :func:`run_grid` in a worker process of the ``local`` executor or a job of the
    ``slurm`` one: computed into the run cache ("done"), or ``"not run: <reason>"`` (the caller reports
    it as :func:`run_grid` does)."""
    from kelib.io import stable_hash

    key = stable_hash(load_args)
    if key not in _WORKER_SETUPS:
        _WORKER_SETUPS[key] = load_setup(**load_args)
    setup = _WORKER_SETUPS[key]
    cases = setup.cases[first_case : first_case + n_edits]
    try:
        _run_one(setup, run, cases, n_edits, checkpoints, hparams_overrides, max_eval_cases, progress=False)
    except NOT_RUN_ERRORS as err:
        return f"not run: {err}"
    return "done"


def _run_on_cluster(setup: Setup, runs: dict[int, dict], grid_args: tuple, options: dict, progress: bool
                    ) -> dict[int, str]:
    """The ``slurm`` executor of :func:`run_grid` (:mod:`kelib.cluster`): a job for each of ``runs`` (by
    index) that the run cache does not hold complete. ``{index: outcome}``: ``"done"`` (runs found
    complete are not submitted), ``"not run: <why>"``, or ``"pending: <message>"`` (``wait: false``)."""
    from kelib.cluster import parse_options, pending_note, run_jobs

    options = parse_options(options)
    outcomes: dict[int, str] = {}
    todo: dict[int, Path] = {}
    for i, run in runs.items():
        try:
            folder, complete = run_folder(setup, run, *grid_args)
        except NOT_RUN_ERRORS as err:
            outcomes[i] = f"not run: {err}"
            continue
        if complete:
            outcomes[i] = "done"
        else:
            todo[i] = folder
    if runs and not todo:
        print(f"every run of the grid is in the run cache ({cache_dir('runs')}): no job to submit")
    found = run_jobs(_run_in_worker, [(setup.load_args, runs[i], *grid_args) for i in todo],
                     [folder.name for folder in todo.values()], [run_setting(runs[i]) for i in todo], options,
                     progress)
    for i, folder in todo.items():
        outcomes[i] = str(found[folder.name])
    pending = sum(outcome.startswith("pending: ") for outcome in outcomes.values())
    if pending:
        print(pending_note(pending, options))
    return outcomes


def _setting(editor: str, regularizer: str) -> str:
    return editor if regularizer == "none" else f"{editor} + {regularizer}"


def run_setting(run: dict) -> str:
    """How :func:`run_grid` names a run in printed lines and captions: its label (or editor), with its
    regularizer (``"MEMIT + D4S"``)."""
    return _setting(run.get("label", run["editor"]), run.get("regularizer", "none"))


def _not_run_record(run: dict, reason: str) -> dict:
    """A row of :func:`not_run`: the run's settings as the table names them, and why, on one line."""
    return {"editor": run.get("label", run["editor"]), "regularizer": run.get("regularizer", "none"),
            "protocol": run.get("protocol", "sequential"), "batch_size": run.get("batch_size"),
            "reason": " ".join(reason.split())}


def _short(reason: str, at_most: int = 120) -> str:
    """The first sentence of a reason, cut to ``at_most`` characters (a caption has little room)."""
    first = reason.split(". ")[0]
    return first if len(first) <= at_most else first[: at_most - 1] + "…"


def _run_one(setup: Setup, run: dict, cases, n_edits, checkpoints, hparams_overrides, max_eval_cases,
             progress, compute: bool = True) -> pd.DataFrame | None:
    """One run of :func:`run_grid`: its table with the run's settings added.

    The run folder is claimed for the run (:func:`claim_run`): a second process that needs the same
    run (another worker, Slurm job or notebook) waits, then reads the finished run instead of computing
    it again. ``compute=False`` only reads: ``None`` when the cache does not hold the run complete."""
    edit_run, out_dir, spec = _prepare_run(setup, run, cases, n_edits, checkpoints, hparams_overrides,
                                           max_eval_cases, progress)
    if not compute and not edit_run.is_complete():
        return None
    try:
        with claim_run(out_dir):
            table = edit_run.run()
    finally:
        edit_run.restore()
    table = table.assign(editor=run.get("label", spec.editor), regularizer=spec.regularizer, protocol=spec.protocol,
                         batch_size=spec.batch_size, run_dir=str(out_dir))
    return table.assign(form=run["form"]) if "form" in run else table


def _prepare_run(setup: Setup, run: dict, cases, n_edits, checkpoints, hparams_overrides, max_eval_cases,
                 progress):
    """``(EditRun, its folder in the run cache, RunSpec)`` of one run of :func:`run_grid`, not yet run."""
    from kelib.runner import EditRun

    editor = run["editor"]
    unknown = sorted(set(run) - RUN_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in run {run}; a run takes {sorted(RUN_KEYS)}")
    if "form" in run:  # the same facts as a question form (kelib.question_forms); direct: the cases as they are
        from kelib.question_forms import form_cases

        cases = form_cases(cases, run["form"])
    overrides = {**((hparams_overrides or {}).get(editor) or {}), **(run.get("overrides") or {})}
    hparams = editor_hparams(setup, editor, overrides or None)
    regularizer = run.get("regularizer", "none")
    params = dict(run.get("regularizer_params") or {})  # D4S takes its λ from the editor (D4SParams.for_editor)
    protocol = run.get("protocol", "sequential")
    spec = RunSpec(
        editor=editor,
        protocol=protocol,
        n_edits=n_edits,
        batch_size=run.get("batch_size"),
        regularizer=regularizer,
        regularizer_params=params,
        checkpoints=sorted(set(checkpoints) | {0}) if protocol == "sequential" else [],
        max_eval_cases=max_eval_cases,
        ability_edits=run.get("ability_edits", 0),  # single edits: abilities after the first N of them
    )
    # what the run adds in memory (C0, D4S's state), printed; refused (not run) when it cannot fit
    from kelib.memory import check_plan, run_plan
    from kelib.stats import SecondMomentSettings

    uses_stats = isinstance(hparams, SecondMomentSettings) or regularizer == "D4S"
    check_plan(run_plan(setup.model, editor, hparams.layers, regularizer, params, uses_stats),
               _setting(editor, regularizer))
    stats = statistics_for(setup.model, setup.tok, hparams, progress=progress)  # lazy: computed at first use
    edit_run = EditRun(setup.model, setup.tok, cases, spec, hparams, stats, evaluators=setup.evaluators,
                       progress=progress, meta=_run_meta(setup, hparams))
    # the folder is named by everything the run depends on (weights, spec, hyperparameters, cases,
    # evaluators, editor code): a changed input gets a new run, never a mixed one
    label = f"{editor}-{regularizer}-{spec.protocol}-b{spec.batch_size}-n{n_edits}-{edit_run.fingerprint[:12]}"
    out_dir = cache_dir("runs", setup.model_name.replace("/", "_")) / label
    edit_run.keep_in(out_dir)
    edit_run.share_chain_with(out_dir.parent)  # a run cached with the same chain of edits saves editing again
    return edit_run, out_dir, spec


def claim_path(out_dir: str | Path) -> Path:
    """The lock file that claims run folder ``out_dir`` (beside it, hidden)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.lock")


def claim_run(out_dir: str | Path):
    """Hold run folder ``out_dir`` for this process while it computes (or reads) the run: two processes
    never write one run folder at once; the second waits, then finds the run complete. The claim is an
    ``flock`` (:func:`kelib.io.file_lock`), released when the process ends, however it ends."""
    from kelib.io import file_lock

    return file_lock(claim_path(out_dir))


def run_folder(setup: Setup, run: dict, n_edits: int, checkpoints: Sequence[int] = (),
               hparams_overrides: dict | None = None, max_eval_cases: int = 100, first_case: int = 0
               ) -> tuple[Path, bool]:
    """``(folder, complete)``: where :func:`run_grid` keeps ``run`` in the run cache, and whether it is
    finished there, without running it (the model is left as it was)."""
    cases = setup.cases[first_case : first_case + n_edits]
    edit_run, out_dir, _ = _prepare_run(setup, run, cases, n_edits, checkpoints, hparams_overrides,
                                        max_eval_cases, progress=False)
    return out_dir, edit_run.is_complete()


def supports(editor: str, regularizer: str) -> bool:
    """Whether a regularizer applies to an editor: D4S needs MEMIT-family keys and residuals, GRACE
    changes no weight a regularizer could transform, and PMET's attention update is not regularized
    (the runner refuses the pair)."""
    if regularizer == "none":
        return True
    if editor in ("GRACE", "PMET"):
        return False
    return regularizer != "D4S" or editor in ("MEMIT", "AlphaEdit")


def final_rows(grid: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last checkpoint."""
    last = grid.groupby("run_dir").checkpoint.transform("max")
    return grid[grid.checkpoint == last]


def ability_columns(columns) -> list[str]:
    """The accuracy-like abilities among ``columns`` (higher is better, in [0, 1]): the embedded
    skills, unedited recall and lm-eval task metrics, not perplexities, which averaging would swamp."""
    def accuracy_like(name: str) -> bool:
        if any(word in name for word in ("perplexity", "bits_per_byte")):
            return False
        return name.startswith("skill_") or name == "recall_unedited" or "/" in name

    return [c for c in columns if isinstance(c, str) and accuracy_like(c)]


def is_weights(scope: pd.Series) -> pd.Series:
    """Rows of weight diagnostics: ``weights`` (the MLP output) and ``weights:<part>`` (PMET's
    attention output), as opposed to scores (edits, abilities, tasks)."""
    return scope.str.startswith("weights")


def score_table(grid: pd.DataFrame, index: Sequence[str] = ("setting", "checkpoint")) -> pd.DataFrame:
    """Edit metrics and abilities, one column per metric (``efficacy``, ``paraphrase``, ``specificity``
    for the key edit metrics), one row per ``index``; weight diagnostics of every part left out."""
    table = grid[~is_weights(grid.scope)].pivot_table(index=list(index), columns="metric", values="value")
    return table.rename(columns=KEY_METRICS).reset_index()


def summary(grid: pd.DataFrame, layer_metrics: Sequence[str] = ("l1", "condition_number")) -> pd.DataFrame:
    """One row per run at its final checkpoint: edit metrics, abilities, and weight diagnostics
    (of the last edited layer's MLP output, the one that takes the full residual)."""
    final = final_rows(grid)
    keys = ["editor", "regularizer", "protocol", "batch_size"]
    scores = final[~is_weights(final.scope)].pivot_table(index=keys, columns="metric", values="value")
    scores = scores.rename(columns=KEY_METRICS)
    weights = final[final.scope == "weights"]
    last_layer = weights.groupby(keys).layer.transform("max")
    weights = weights[weights.layer == last_layer].pivot_table(index=keys, columns="metric", values="value")
    return scores.join(weights[list(layer_metrics)]).reset_index()


def milestone_table(grid: pd.DataFrame, milestones: Sequence[int], metrics: Sequence[str],
                    label: str = "setting") -> pd.DataFrame:
    """D4S's Tables 2 and 3: per run and milestone (edits so far; those a run was evaluated at), the
    edit metrics ``metrics`` (names as :func:`score_table` gives them) and ``average``, their mean.
    A metric the dataset lacks (MQuAKE has no neighbourhood prompts: no specificity) is an empty
    column and left out of the average."""
    scores = score_table(grid, index=(label, "checkpoint"))
    table = scores[scores.checkpoint.isin(list(milestones))].reindex(columns=[label, "checkpoint", *metrics])
    table["average"] = table[list(metrics)].mean(axis=1)
    return table.rename(columns={"checkpoint": "edits"}).reset_index(drop=True)


def baseline(grid: pd.DataFrame) -> pd.Series:
    """Scores of the unedited model (checkpoint 0 of the sequential runs; all runs agree)."""
    start = grid[(grid.checkpoint == 0) & (grid.scope.isin(["abilities", "tasks"]))]
    return start.groupby("metric").value.mean()


def fraction_kept(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """``metric(editor + regularizer) / metric(editor alone)``: RECT's "keeps >94% of edit performance"."""
    rows = []
    for _, row in table.iterrows():
        plain = table[(table.editor == row.editor) & (table.regularizer == "none") & (table.protocol == row.protocol)]
        if plain.empty:
            continue
        base = plain.iloc[0]
        rows.append({"editor": row.editor, "regularizer": row.regularizer,
                     **{f"{m}_kept": row[m] / base[m] if base[m] else float("nan") for m in metrics}})
    return pd.DataFrame(rows)


def final_weights(run_dir: str | Path, device: str | torch.device | None = "cpu") -> dict[int, torch.Tensor]:
    """The edited layers' weights at the end of a finished sequential run, on ``device`` (the run
    saved them from the CPU; pass the model's device to combine them with its weights)."""
    return torch.load(Path(run_dir) / "final_weights.pt", weights_only=True, map_location=device)


def final_update(run_dir: str | Path, model, layer: int | None = None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(layer, W_0, Δ)`` of a finished sequential run, in float32 on the model's device: W_0 from
    ``model`` (unedited), Δ = W_n − W_0 with W_n from the run (``layer``: the last edited by default)."""
    from kelib.models import get_weight, same_device

    final = final_weights(run_dir)
    layer = max(final) if layer is None else layer
    w0 = get_weight(model, layer).detach().float()
    wn = final[layer].to(w0.device)  # the layer's own device (a model sharded with device_map has several)
    same_device(wn, w0, what=f"the run's final weights and the model's W_0 (layer {layer})")
    return layer, w0, wn.float() - w0


def fact_table(model, tok, case) -> pd.DataFrame:
    """P(true object) and P(new object) (geometric mean over tokens) on a case's prompt, paraphrases
    and neighbours: what the tour shows before and after one edit."""
    from kelib.metrics import score_targets

    rows = [("prompt", case.prompt, case.target_true)]
    rows += [("paraphrase", p, case.target_true) for p in case.paraphrase_prompts]
    rows += [("neighbour", p, a) for p, a in zip(case.neighborhood_prompts, case.neighborhood_answers)]
    prompts = [r[1] for r in rows]
    true = score_targets(model, tok, prompts, [r[2] for r in rows])
    new = score_targets(model, tok, prompts, [case.target_new] * len(rows))
    return pd.DataFrame({
        "kind": [r[0] for r in rows],
        "prompt": prompts,
        "true answer": [r[2] for r in rows],
        "P(true)": [math.exp(-s.nll) for s in true],
        f"P({case.target_new})": [math.exp(-s.nll) for s in new],
    })


def edit_once(setup: Setup, case, editor: str = "ROME"):
    """Apply one edit to ``setup.model`` in place; returns the :class:`~kelib.runner.EditRun`, whose
    ``restore()`` undoes it exactly."""
    from kelib.runner import EditRun

    hparams = editor_hparams(setup, editor)
    stats = statistics_for(setup.model, setup.tok, hparams, progress=False)
    run = EditRun(setup.model, setup.tok, [case], RunSpec(editor, "sequential", n_edits=1), hparams, stats,
                  progress=False)
    run.run()
    return run


# ---------------------------------------------------------------------------------------------
# Verdicts over examples (kelib.verdicts), from the per-example scores the runs keep

ABILITY_SCOPES = ("abilities", "tasks")
EDIT_SUCCESS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def run_examples(grid: pd.DataFrame, run_dir: str, checkpoint: int | None = None) -> dict:
    """``{scope: {metric: Sample}}`` a run kept at ``checkpoint`` (default: its last in ``grid``)."""
    from kelib.examples import read_examples

    if checkpoint is None:
        checkpoint = int(grid[grid.run_dir == run_dir].checkpoint.max())
    return read_examples(run_dir, checkpoint)


def abilities_of(examples: dict) -> dict:
    """The ability metrics among a checkpoint's examples (the embedded evaluator's and lm-eval's)."""
    return {m: s for scope in ABILITY_SCOPES for m, s in examples.get(scope, {}).items()}


def edit_mean_of(examples: dict):
    """Per case, the mean of efficacy, paraphrase and specificity success (the notebooks' ``edit_mean``,
    whose mean over cases it is); None without per-case edit scores."""
    from kelib.examples import Sample

    edits = examples.get("edits", {})
    parts = [edits[m] for m in EDIT_SUCCESS if m in edits]
    if not parts or any(p.ids != parts[0].ids for p in parts):
        return None  # a metric missing for some case (no paraphrase): no per-case mean
    return Sample(sum(p.values for p in parts) / len(parts), ids=parts[0].ids)


def unedited_examples(grid: pd.DataFrame) -> dict:
    """Ability examples of the unedited model: checkpoint 0 of the first run that kept them (every
    run starts from the same weights)."""
    for run_dir in grid[grid.checkpoint == 0].run_dir.unique():
        found = abilities_of(run_examples(grid, run_dir, 0))
        if found:
            return found
    return {}


def _runs(grid: pd.DataFrame, label: str) -> pd.DataFrame:
    return grid.drop_duplicates("run_dir")[[label, "editor", "regularizer", "protocol", "batch_size", "run_dir"]]


def editing_verdicts(grid: pd.DataFrame, label: str = "setting") -> tuple[list, list[str]]:
    """RECT's claim, run by run: abilities after the last edit are lower than the unedited model's
    (per metric, and the mean of the accuracy-like ones), on the same examples. Returns the verdicts
    and the labels of runs that kept no per-example scores (made before the runner kept them)."""
    from kelib.verdicts import ability_verdicts

    before = unedited_examples(grid)
    verdicts, missing = [], []
    for run in _runs(grid, label).itertuples():
        after = abilities_of(run_examples(grid, run.run_dir))
        if not before or not after:
            missing.append(getattr(run, label))
            continue
        verdicts += ability_verdicts(str(getattr(run, label)), before, after, "worse")
    return verdicts, missing


def regularizer_verdicts(grid: pd.DataFrame, label: str = "setting", edits: float | str | None = None
                         ) -> tuple[list, list[str]]:
    """Each regularized run against its editor alone (same editor, protocol and batch size), at the
    last checkpoint, on the same examples: abilities higher with the regularizer (per metric and
    mean). ``edits``: also judge editing performance per case, either ``"better"`` (higher mean of
    efficacy, paraphrase and specificity) or a number r (the regularized run keeps more than r of
    the editor's, a ratio: RECT's 0.94). Returns the verdicts and the labels lacking examples."""
    from kelib.verdicts import ability_verdicts, compare

    runs = _runs(grid, label)
    verdicts, missing = [], []
    for run in runs[runs.regularizer != "none"].itertuples():
        plain = runs[(runs.editor == run.editor) & (runs.regularizer == "none") & (runs.protocol == run.protocol)
                     & (runs.batch_size == run.batch_size)]
        if plain.empty:
            continue
        name, base = str(getattr(run, label)), str(getattr(plain.iloc[0], label))
        mine, theirs = run_examples(grid, run.run_dir), run_examples(grid, plain.run_dir.iloc[0])
        if not abilities_of(mine) or not abilities_of(theirs):
            missing.append(name)
            continue
        verdicts += ability_verdicts(f"{name} (vs {base})", abilities_of(theirs), abilities_of(mine), "better")
        ours, ref = edit_mean_of(mine), edit_mean_of(theirs)
        if edits is None or ours is None or ref is None:
            continue
        if edits == "better":
            verdicts.append(compare(f"{name} edits better than {base} (mean of efficacy, paraphrase, specificity)",
                                    ref, ours, "higher"))
        else:
            verdicts.append(compare(f"{name} keeps more than {float(edits):.0%} of {base}'s editing performance",
                                    ref, ours, "higher", threshold=float(edits), statistic="ratio"))
    return verdicts, missing


def example_table(grid: pd.DataFrame, label: str = "setting") -> pd.DataFrame:
    """Every ability with its standard error: the unedited model, then each run after its last edit
    (``label, metric, mean, stderr, n``; perplexity's stderr is that of the log-perplexity)."""
    rows = []
    found = {"unedited": unedited_examples(grid)}
    for run in _runs(grid, label).itertuples():
        found[str(getattr(run, label))] = abilities_of(run_examples(grid, run.run_dir))
    for name, metrics in found.items():
        rows += [{label: name, "metric": m, "mean": s.mean, "stderr": s.stderr, "n": len(s)} for m, s in metrics.items()]
    return pd.DataFrame(rows, columns=[label, "metric", "mean", "stderr", "n"])


def print_verdicts(verdicts: Sequence, missing: Sequence[str] = ()) -> dict:
    """Print each verdict's line (claim, estimate, 95% interval, outcome); returns them for
    numbers.json, keyed by claim."""
    for verdict in verdicts:
        print(verdict)
    if missing:
        print(f"No per-example scores for {', '.join(map(str, missing))}: re-run them to judge them.")
    return {v.claim: v.to_dict() for v in verdicts}
