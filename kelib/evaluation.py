"""General abilities of a (possibly edited) model through lm-evaluation-harness, offline and cached.

:func:`evaluate_abilities` runs lm-eval on the model object in memory (no save and reload after an
edit) over kelib's bundled tasks, one task per ``simple_evaluate`` call so that progress and caching
are per task, and returns a tidy table, one row per task and metric::

    frame = evaluate_abilities(model, tok, ["rect", "d4s_mmlu"], limit=100)
    frame.head(3)
    #          task                        metric  value  stderr    n
    #    rect_boolq                           acc  0.620     NaN  100
    #    rect_gsm8k      exact_match,strict-match  0.010     NaN  100
    #    rect_gsm8k  exact_match,flexible-extract  0.030     NaN  100

Tasks are the lm-eval YAMLs under ``kelib/tasks/`` (every one is registered; its group is its top-level
folder: ``rect``, ``prune``, ``d4s``, ...); :func:`list_tasks` and :func:`list_groups` name them.
Their data are subsets bundled with kelib (``kelib/tasks/PROVENANCE.md``), read without the network
and wherever the working directory is. ``builtin=True`` runs lm-eval's own versions instead (full
test sets, downloaded from the Hugging Face hub) where one exists, see :data:`BUILTIN`.

Results are cached on disk per (weights fingerprint, task, limit, task definition, ...): re-running a
notebook on an unchanged model reads them back instead of evaluating again. Edits kept outside the
weights (GRACE's codebook) are keyed by the view they declare (:func:`declared_view`); a model with
forward hooks that no view declared is evaluated afresh every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pandas as pd

from kelib.io import read_json, stable_hash, write_json
from kelib.models import weights_fingerprint  # noqa: F401  (a cache key here, defined beside the weights)
from kelib.paths import PACKAGE_DIR, cache_dir

log = logging.getLogger(__name__)

TASKS_DIR = PACKAGE_DIR / "tasks"
COLUMNS = ["task", "metric", "value", "stderr", "n"]
CACHE_VERSION = 1  # bump when the cached row format or the meaning of a key changes
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default for tasks that do not set max_gen_toks


class EvaluationError(ValueError):
    """An unknown task or group, a missing data file, or a task that cannot run on this model."""


# ---------------------------------------------------------------------------------------------
# Task discovery


@dataclass(frozen=True)
class TaskInfo:
    """One task YAML: its name, group (top-level folder), file and one-line description."""

    name: str
    group: str
    path: Path
    description: str
    config: dict = field(repr=False, compare=False)


def _load_config(path: Path) -> dict:
    """The YAML as lm-eval indexes it: ``include`` merged, ``!function`` left unresolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False, recursive=True)


def discover(task_dirs: Iterable[str | Path] = ()) -> dict[str, TaskInfo]:
    """Every task YAML under ``kelib/tasks`` and the extra ``task_dirs`` (later folders win on a name clash).

    A YAML counts when it has a ``task:`` key (group YAMLs and templates without one are skipped, as
    lm-eval skips them). Its group is the first folder below the root it was found in.
    """
    found: dict[str, TaskInfo] = {}
    for root in [TASKS_DIR, *map(Path, task_dirs)]:
        root = root.expanduser().resolve()
        if not root.is_dir():
            raise EvaluationError(f"task folder {root} does not exist")
        for path in sorted(root.rglob("*.yaml")):
            if {"__pycache__", ".ipynb_checkpoints"} & set(path.parts):
                continue
            try:
                config = _load_config(path)
            except Exception as err:  # a broken YAML must not hide the others; say which one
                log.warning("skipping task file %s: %s", path, err)
                continue
            name = config.get("task")
            if not isinstance(name, str) or "group" in config or "class" in config:
                continue
            rel = path.relative_to(root).parts
            group = rel[0] if len(rel) > 1 else root.name
            description = (config.get("metadata") or {}).get("description") or name
            if name in found:
                log.warning("task %s in %s overrides the one in %s", name, path, found[name].path)
            found[name] = TaskInfo(name, group, path, description, config)
    return found


def list_tasks(task_dirs: Iterable[str | Path] = ()) -> dict[str, str]:
    """``{task name: one-line description}`` of every task kelib can run, by group then name."""
    tasks = discover(task_dirs)
    return {name: tasks[name].description for name in sorted(tasks, key=lambda n: (tasks[n].group, n))}


def list_groups(task_dirs: Iterable[str | Path] = ()) -> dict[str, list[str]]:
    """``{group: [task names]}``; a group is a top-level folder of ``kelib/tasks`` (or of ``task_dirs``)."""
    return _groups(discover(task_dirs))


def _groups(tasks: dict[str, TaskInfo]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for info in tasks.values():
        groups.setdefault(info.group, []).append(info.name)
    return {group: sorted(names) for group, names in sorted(groups.items())}


def resolve_tasks(names: Sequence[str] | str, task_dirs: Iterable[str | Path] = ()) -> list[str]:
    """Task names with groups expanded, in the order given, without repeats; unknown names raise."""
    return _resolve(names, discover(task_dirs))


def _resolve(names: Sequence[str] | str, tasks: dict[str, TaskInfo]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    groups = _groups(tasks)
    resolved: list[str] = []
    unknown = []
    for name in names:
        members = [name] if name in tasks else groups.get(name)
        if members is None:
            unknown.append(name)
            continue
        resolved += [m for m in members if m not in resolved]
    if unknown:
        raise EvaluationError(
            f"unknown task or group {', '.join(map(repr, unknown))}.\n" + _catalogue(tasks, groups)
        )
    if not resolved:
        raise EvaluationError("no tasks given.\n" + _catalogue(tasks, groups))
    return resolved


def _catalogue(tasks: dict[str, TaskInfo], groups: dict[str, list[str]]) -> str:
    lines = ["Known groups: " + ", ".join(f"{g} ({len(m)} tasks)" for g, m in groups.items()), "Known tasks:"]
    lines += [f"  {name:<22} {tasks[name].description}" for names in groups.values() for name in names]
    return "\n".join(lines)


_DATA_SUFFIXES = (".json", ".jsonl", ".gz", ".csv", ".tsv", ".parquet", ".txt", ".arrow")


def _data_files(value) -> Iterator[str]:
    """File names mentioned in a ``dataset_kwargs`` value (strings ending like a data file)."""
    if isinstance(value, str) and value.endswith(_DATA_SUFFIXES):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _data_files(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _data_files(item)


def check_data(info: TaskInfo) -> None:
    """Raise :class:`EvaluationError` when a data file a task names is nowhere to be found.

    kelib's folders name files relative to their ``data/`` folder (``dataset_kwargs: {data_file: ...}``,
    read by the folder's ``utils.py``); a YAML may also give absolute paths (``data_files``).
    """
    here = info.path.parent
    for name in _data_files(info.config.get("dataset_kwargs") or {}):
        candidates = [here / "data" / name, here / name, Path(name).expanduser()]
        if not any(c.exists() for c in candidates):
            raise EvaluationError(
                f"task {info.name} ({info.path}) needs the data file {name!r}, which is missing "
                f"(looked in {here / 'data'}, {here} and {Path.cwd()}). Bundled data are listed in "
                f"{TASKS_DIR / 'PROVENANCE.md'}; reinstall kelib or restore the file."
            )


def task_hash(info: TaskInfo) -> str:
    """Hash of what defines a task: its YAML (and includes), every non-YAML file in its folder and
    below (``utils.py``, data), and :mod:`kelib.tasks.common`. Sibling YAMLs do not count."""
    digest = hashlib.sha256()
    here = info.path.parent
    # the parsed config (includes merged); unresolved !function values are absolute paths: drop the
    # folder so that moving the checkout keeps the cache
    digest.update(json.dumps(info.config, sort_keys=True, default=str).replace(str(here), "").encode())
    files = [p for p in sorted(here.rglob("*")) if p.is_file() and p.suffix not in (".yaml", ".pyc")]
    for name in _data_files(info.config.get("dataset_kwargs") or {}):  # data named by absolute path
        outside = Path(name).expanduser()
        if outside.is_absolute() and outside.is_file() and not outside.is_relative_to(here):
            files.append(outside)
    for path in [*files, TASKS_DIR / "common.py"]:
        digest.update(str(path.relative_to(here) if path.is_relative_to(here) else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# lm-eval's built-in versions


@dataclass(frozen=True)
class Builtin:
    """How a kelib task maps onto lm-eval's built-in task(s) (``evaluate_abilities(builtin=True)``)."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None  # None: lm-eval's own default
    rename: dict = field(default_factory=dict)  # {lm-eval task: {metric: kelib metric}}


BUILTIN: dict[str, Builtin] = {
    # RECT evaluates zero-shot; lm-eval's gsm8k defaults to 5 exemplars
    "rect_gsm8k": Builtin(("gsm8k",), num_fewshot=0),
    "rect_rte": Builtin(("rte",)),  # GLUE validation (277 pairs) instead of RECT's file
    "rect_nq_open": Builtin(("nq_open",)),
    "rect_boolq": Builtin(("boolq",)),
    "rect_mutual": Builtin(("mutual",)),
    "rect_sst2": Builtin(("sst2",)),
    "d4s_arc_challenge": Builtin(("arc_challenge",)),
    "d4s_hellaswag": Builtin(("hellaswag",)),
    "d4s_mmlu": Builtin(("mmlu",)),  # a group of 57 tasks; its size-weighted acc is reported
    "d4s_truthfulqa_mc": Builtin(
        ("truthfulqa_mc1", "truthfulqa_mc2"),
        rename={"truthfulqa_mc1": {"acc": "mc1"}, "truthfulqa_mc2": {"acc": "mc2"}},
    ),
    "d4s_winogrande": Builtin(("winogrande",)),
    "d4s_gsm8k": Builtin(("gsm8k",)),
}


# ---------------------------------------------------------------------------------------------
# Fingerprints (cache keys)

_VIEWS = "_kelib_views"  # instance attribute: the views a model is evaluated through right now


@contextlib.contextmanager
def declared_view(model, key: str) -> Iterator[None]:
    """Say, for the duration, that ``model`` answers through something its weights do not show
    (GRACE's codebook, applied by forward hooks), identified by ``key``.

    The weights fingerprint cannot see such a view, so :func:`evaluate_abilities` adds the declared
    keys to its cache key; an editor's ``view`` wraps its hooks in this."""
    views = model.__dict__.setdefault(_VIEWS, [])
    views.append(str(key))
    try:
        yield
    finally:
        views.reverse()  # drop the last occurrence: nested views of the same key stay balanced
        views.remove(str(key))
        views.reverse()


def view_keys(model) -> list[str] | None:
    """The keys of the views ``model`` is declared to answer through (``[]`` for none), or None when
    it carries forward hooks that no view declared: its answers then depend on something no cache
    key can name, and are not cached."""
    declared = list(model.__dict__.get(_VIEWS, []))
    if declared:
        return declared
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return None if hooked else []


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary, merges, normalisation and special tokens.

    Padding and truncation settings are left out (they do not change scores, and lm-eval sets them
    while it runs); :func:`evaluate_abilities` takes it after lm-eval has given the tokenizer a pad
    token if it had none, so the key is the same on every call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:  # a slow (Python) tokenizer
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["class"] = type(tokenizer).__name__
    spec["special"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return stable_hash(spec)


# ---------------------------------------------------------------------------------------------
# Running lm-eval quietly


def _lm_class():
    """HFLM whose default generation budget fits the model's context (built lazily: lm-eval is slow
    to import)."""
    from lm_eval.models.huggingface import HFLM

    class KelibLM(HFLM):
        answers_cut = 0  # answers scored on their first max_length tokens only, see _encode_pair

        @property
        def max_gen_toks(self) -> int:
            # lm-eval's 256 new tokens (gsm8k, nq_open) cannot fit a 128-token model and trip an
            # assertion; half the context leaves room for the prompt. Tasks that set their own
            # max_gen_toks are not affected.
            return min(DEFAULT_MAX_GEN_TOKS, max(1, self.max_length // 2))

        def _encode_pair(self, context, continuation):
            # lm-eval asserts that an answer (multiple-choice option) fits the context; on a
            # short-context model one long option would stop the whole task. Score its first
            # max_length tokens instead, and count it so that kelib can say so.
            context_enc, continuation_enc = super()._encode_pair(context, continuation)
            if len(continuation_enc) > self.max_length:
                self.answers_cut += 1
                continuation_enc = continuation_enc[: self.max_length]
            return context_enc, continuation_enc

    return KelibLM


def _silent_tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def _light_env_info(storage: dict) -> None:
    """Stands in for lm-eval's ``add_env_info``, which runs torch's collect_env (~0.5 s a call)."""
    import lm_eval
    import transformers

    storage["transformers_version"] = transformers.__version__
    storage["lm_eval_version"] = getattr(lm_eval, "__version__", "unknown")


class _TruncationCounter(logging.Filter):
    """Counts lm-eval's one-warning-per-request notices that an input was cut to fit the context
    (drops them, and its other records below ERROR), so that kelib can say it once per call."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Truncating" in message or "truncation applied" in message:
            self.count += 1
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet(enabled: bool = True) -> Iterator[_TruncationCounter]:
    """Silence lm-eval's chatter for the duration: INFO/WARNING logs of lm-eval, datasets and
    transformers (a warning per truncated prompt, per custom dataset...), its inner progress bars,
    the ``git describe`` it runs (which prints "fatal: not a git repository" outside a checkout) and
    its environment report. Errors are still logged and exceptions still raised. Everything is put
    back on exit. Yields a counter of inputs lm-eval cut to fit the context."""
    counter = _TruncationCounter()
    if not enabled:  # lm-eval speaks for itself, truncation notices included
        yield counter
        return
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface

    patches = [
        (lm_eval.api.model, "tqdm", _silent_tqdm),
        (lm_eval.api.task, "tqdm", _silent_tqdm),
        (lm_eval.models.huggingface, "tqdm", _silent_tqdm),
        (lm_eval.evaluator, "get_git_commit_hash", lambda: None),
        (lm_eval.evaluator, "add_env_info", _light_env_info),
    ]
    patches = [(mod, attr, new, getattr(mod, attr)) for mod, attr, new in patches if hasattr(mod, attr)]
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "transformers")]
    levels = [logger.level for logger in loggers]
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_level = hf_logger.level
    bars = datasets.utils.logging.is_progress_bar_enabled()
    try:
        hf_logger.addFilter(counter)
        for mod, attr, new, _ in patches:
            setattr(mod, attr, new)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        hf_logger.setLevel(logging.WARNING)  # let the truncation notices reach the counter
        datasets.disable_progress_bars()
        yield counter
    finally:
        for mod, attr, _, old in patches:
            setattr(mod, attr, old)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        hf_logger.setLevel(hf_level)
        hf_logger.removeFilter(counter)
        if bars:
            datasets.enable_progress_bars()


def _rows(results: dict, kelib_name: str, lm_names: Sequence[str], rename: dict) -> list[dict]:
    """Tidy rows from lm-eval's results: ``"acc,none"`` -> metric ``acc``; other filters stay in the
    name (``"exact_match,strict-match"``). ``n`` is the number of docs scored (summed over a group)."""
    children = results.get("group_subtasks", {})

    def leaves(task: str) -> list[str]:  # a group's tasks, through nested groups (mmlu -> stem -> ...)
        return [leaf for child in children[task] for leaf in leaves(child)] if children.get(task) else [task]

    rows = []
    for lm_name in lm_names:
        metrics = results["results"][lm_name]
        n = sum(results["n-samples"].get(t, {}).get("effective", 0) for t in leaves(lm_name))
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            metric = rename.get(lm_name, {}).get(metric, metric)
            rows.append(
                {
                    "task": kelib_name,
                    "metric": metric if filter_name == "none" else f"{metric},{filter_name}",
                    "value": _number(value),
                    "stderr": _number(stderr),
                    "n": int(n),
                }
            )
    return rows


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # "N/A" when no stderr was computed
        return math.nan


# ---------------------------------------------------------------------------------------------
# The entry point


def evaluate_abilities(
    model,
    tokenizer,
    tasks: Sequence[str] | str,
    limit: int | None = None,
    batch_size: int | str = 8,
    cache: bool = True,
    bootstrap_iters: int = 0,
    max_length: int | None = None,
    builtin: bool = False,
    task_dirs: Iterable[str | Path] = (),
    progress: bool = True,
    quiet: bool = True,
) -> pd.DataFrame:
    """Evaluate ``model`` (in memory, edited or not) on general-ability tasks with lm-eval.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``); evaluated on its own device.
        tokenizer: its tokenizer object (lm-eval would otherwise fetch one from the hub by name).
        tasks: task names and/or group names (``"rect"``, ``"prune"``, ``"d4s"``, ...): see
            :func:`list_tasks` and :func:`list_groups`.
        limit: evaluate the first ``limit`` docs of each task; ``None`` for all. An int only:
            lm-eval reads a float as a fraction, and ``1.0`` as *one* example, not 100%. The bundled
            subsets are stored in random order, so a prefix is a random sample (``prune_*`` keep
            PRUNE's order: their prefix is PRUNE's first examples).
        batch_size: lm-eval batch size (or ``"auto"``).
        cache: read and write results under ``kelib.paths.cache_dir("evaluations")``.
        bootstrap_iters: passed to lm-eval; 0 skips standard errors (``stderr`` is NaN). Any positive
            value gives the closed-form stderr of mean metrics; corpus metrics (entity F1) have none.
        max_length: context length for lm-eval (default: the model's); longer prompts are cut on
            the left. Tasks without their own budget generate at most ``min(256, max_length // 2)``.
        builtin: run lm-eval's built-in version of each task where :data:`BUILTIN` has one (full
            official test sets, downloaded from the hub: needs the network); others run bundled.
        task_dirs: extra folders of task YAMLs (groups are their top-level folders).
        progress: show one progress bar over tasks.
        quiet: silence lm-eval's logs below ERROR and its inner progress bars; what did not fit the
            context (prompts cut on the left, long answer options) is then said in one warning.

    Returns:
        A DataFrame with columns ``task, metric, value, stderr, n``: one row per task and metric,
        in the order the tasks were given. ``n`` is the number of docs scored.

    Raises:
        EvaluationError: an unknown task or group (the message lists them), a missing data file, a
            float or non-positive ``limit``, or a task whose generation budget exceeds the context.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise EvaluationError(
            f"limit must be an int count of examples or None, got {limit!r}: lm-eval reads a float "
            f"as a fraction of the task and 1.0 as ONE example, not all of them"
        )
    if limit is not None and limit < 1:
        raise EvaluationError(f"limit must be at least 1 (or None for every example), got {limit}")
    task_dirs = [Path(d) for d in task_dirs]
    infos = discover(task_dirs)
    names = _resolve(tasks, infos)
    for name in names:
        if not (builtin and name in BUILTIN):
            check_data(infos[name])

    from tqdm.auto import tqdm

    with _quiet(quiet):  # HFLM warns that a model object makes it ignore its loading arguments
        lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    views = view_keys(model) if cache else []
    if views is None:
        log.warning("the model carries forward hooks that no view declared (kelib.evaluation.declared_view): "
                    "its results are not cached")
        cache = False
    if cache:
        # after HFLM: it may give the tokenizer a pad token, which must not move the key between calls
        fingerprint = weights_fingerprint(model)
        base_key = {
            "version": CACHE_VERSION,
            "weights": fingerprint,
            "model_class": type(model).__name__,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "limit": limit,
            "max_length": lm.max_length,
            "max_gen_toks": lm.max_gen_toks,
            "bootstrap_iters": bootstrap_iters,
            "lm_eval": _lm_eval_version(),
        }
        if views:  # edits the weights do not show (GRACE's codebook): keyed by what the view holds
            base_key["views"] = views
    managers: dict[bool, object] = {}  # one TaskManager per call and kind: indexing is not free
    rows: list[dict] = []
    cuts: dict[str, dict] = {}  # task -> {"inputs": n, "answers": m} cut to fit the context
    bar = tqdm(names, desc="abilities", unit="task", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        spec = BUILTIN[name] if builtin and name in BUILTIN else None
        path = None
        if cache:
            definition = (
                {"builtin": list(spec.tasks), "num_fewshot": spec.num_fewshot} if spec else task_hash(infos[name])
            )
            key = {**base_key, "task": name, "definition": definition}
            path = cache_dir("evaluations", fingerprint) / f"{name}-{stable_hash(key)}.json"
            if path.exists():
                record = read_json(path)
                rows += record["rows"]
                cuts[name] = record.get("cut", {})
                continue
        start = time.perf_counter()
        task_rows, cuts[name] = _run_task(lm, name, spec, limit, bootstrap_iters, task_dirs, managers, quiet)
        seconds = time.perf_counter() - start
        if path is not None:
            write_json(
                path,
                {"key": key, "rows": task_rows, "cut": cuts[name], "seconds": seconds, "created": time.time()},
            )
        rows += task_rows
    _report_cuts(cuts, lm.max_length)
    return pd.DataFrame(rows, columns=COLUMNS)


def _report_cuts(cuts: dict[str, dict], max_length: int) -> None:
    """One warning per call for what did not fit the context, instead of lm-eval's one per input."""
    inputs = [f"{name} ({c['inputs']})" for name, c in cuts.items() if c.get("inputs")]
    answers = [f"{name} ({c['answers']})" for name, c in cuts.items() if c.get("answers")]
    if inputs:
        log.warning("inputs longer than the context (%d tokens) were cut on the left: %s",
                    max_length, ", ".join(inputs))
    if answers:
        log.warning("answer options longer than the context (%d tokens) were scored on their first "
                    "%d tokens: %s", max_length, max_length, ", ".join(answers))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _run_task(lm, name, spec, limit, bootstrap_iters, task_dirs, managers, quiet) -> tuple[list[dict], dict]:
    """One ``simple_evaluate`` call for one kelib task (or its built-in counterparts): its rows, and
    how many inputs and answer options were cut to fit the context."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    builtin = spec is not None
    if builtin not in managers:
        with _quiet(quiet):
            managers[builtin] = (
                TaskManager(include_defaults=True)
                if builtin  # lm-eval's ~200 built-in folders: ~13 s to index, so only when asked
                else TaskManager(include_path=[str(TASKS_DIR), *map(str, task_dirs)], include_defaults=False)
            )
    if builtin:
        lm_names, rename, num_fewshot = list(spec.tasks), spec.rename, spec.num_fewshot
    else:
        lm_names, rename, num_fewshot = [name], {}, None
    answers_before = lm.answers_cut
    try:
        with _quiet(quiet) as counter:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=lm_names,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                task_manager=managers[builtin],
                log_samples=False,
            )
    except FileNotFoundError as err:
        raise EvaluationError(f"task {name}: a data file is missing: {err}") from err
    except AssertionError as err:
        if "max tokens to generate" in str(err):
            raise EvaluationError(
                f"task {name} asks for more new tokens than the model's context holds ({err}); "
                f"pass a larger max_length if the model supports it"
            ) from err
        raise
    cut = {"inputs": counter.count, "answers": lm.answers_cut - answers_before}
    return _rows(results, name, lm_names, rename), cut
