"""Batch reproduction: run every notebook of a parameter variant through papermill.

Layout (one notebook per paper claim):

- ``notebooks/<name>.py``: the reviewed source (jupytext py:percent, kernelspec ``python3``), paired with
  ``notebooks/<name>.ipynb`` (committed without outputs). The ``.py`` is what runs; ``check_pairing``
  makes a stale ``.ipynb`` fail the tests.
- ``params/<variant>/<name>.yaml``: the parameters of ``<name>`` in a variant (``default``, ``smoke``,
  ``gpt2-xl``, ...). A notebook runs in a variant iff it has a YAML there. Every key must be a parameter
  of the notebook (papermill only warns on unknown ones; here it is a ``ParamsError``).
- ``runs/<variant>/<name>.ipynb``: the executed notebook (gitignored; never over the source).
- ``figures/<variant>/<name>/``: what the notebook writes (the runner passes ``out_dir``, absolute):
  figures, tables, ``numbers.json``, and the runner's ``.inputs.json``. A re-run skips a notebook whose
  inputs (notebook cells, parameters, kelib's code, ``params/embedded.yaml``, ``params/hparams/**``) are
  unchanged and whose ``numbers.json`` exists. ``.inputs.json`` also records how long the notebook took:
  side by side, the notebooks that took longest last time start first.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from kelib import io
from kelib.paths import PACKAGE_DIR, REPO_DIR

NOTEBOOKS_DIR = REPO_DIR / "notebooks"
PARAMS_DIR = REPO_DIR / "params"
FIGURES_DIR = REPO_DIR / "figures"
RUNS_DIR = REPO_DIR / "runs"
FIRST_NOTEBOOK = "00_tour"
OUT_DIR_PARAM = "out_dir"
INPUTS_FILE = ".inputs.json"
SECONDS_KEY = "seconds"  # in INPUTS_FILE: how long the notebook's last run took (to order the next batch)
NUMBERS_FILE = "numbers.json"
# papermill/nbclient bookkeeping that must never be committed in a source notebook
_PAPERMILL_CELL_KEYS = ("papermill", "execution")
_PAPERMILL_TAGS = ("injected-parameters", "papermill-error-cell-tag")
# the runner itself does not shape what a notebook computes: editing it re-runs nothing
_RUNNER_FILES = {"reproduce.py", "cli.py", "__main__.py"}


class ReproduceError(ValueError):
    """A batch that cannot start: missing notebook, unknown name in ``only``, bad variant folder."""


class ParamsError(ReproduceError):
    """A params file that does not match its notebook's ``parameters`` cell."""


@dataclass
class NotebookResult:
    name: str
    status: str  # "ok" | "skipped" | "failed"
    seconds: float
    output: Path | None  # the executed notebook under runs/
    out_dir: Path
    error: str | None = None  # for failures: notebook, cell, exception
    cell: int | None = None  # 1-based index of the failing cell in the source notebook

    @property
    def ok(self) -> bool:
        return self.status != "failed"


# --------------------------------------------------------------------------------------------------
# notebooks, variants and parameters


def sort_names(names) -> list[str]:
    """``00_tour`` first, then alphabetical."""
    return sorted(set(names), key=lambda n: (n != FIRST_NOTEBOOK, n))


def notebook_path(name: str, notebooks_dir: str | Path = NOTEBOOKS_DIR) -> Path:
    """The source of notebook ``name``: ``<name>.py`` if it exists, else ``<name>.ipynb``."""
    notebooks_dir = Path(notebooks_dir)
    for ext in (".py", ".ipynb"):
        path = notebooks_dir / f"{name}{ext}"
        if path.exists():
            return path
    raise ReproduceError(
        f"no notebook {name!r} in {notebooks_dir} (notebooks: {list_notebooks(notebooks_dir)})"
    )


def list_notebooks(notebooks_dir: str | Path = NOTEBOOKS_DIR) -> list[str]:
    notebooks_dir = Path(notebooks_dir)
    names = [p.stem for p in notebooks_dir.glob("*.py")] + [p.stem for p in notebooks_dir.glob("*.ipynb")]
    return sort_names(names)


def list_variants(params_dir: str | Path = PARAMS_DIR) -> list[str]:
    """Subfolders of ``params/`` holding notebook YAMLs (``hparams/`` is editor settings, not a variant)."""
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in params_dir.iterdir()
        if p.is_dir() and p.name != "hparams" and any(p.glob("*.yaml"))
    )


def read_notebook(path: str | Path):
    """The notebook at ``path`` (``.py`` via jupytext, ``.ipynb`` via nbformat) as a NotebookNode."""
    import jupytext

    return jupytext.read(str(path))


def notebook_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {name, inferred_type_name, default, help}}`` of the notebook's ``parameters`` cell.

    Via ``papermill.inspect_notebook`` (a ``.py`` source is converted to a temporary ``.ipynb`` first).
    Empty when the notebook has no ``parameters`` cell.
    """
    import nbformat
    import papermill as pm

    path = Path(path)
    if path.suffix == ".ipynb":
        return pm.inspect_notebook(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_nb = Path(tmp) / f"{path.stem}.ipynb"
        nbformat.write(read_notebook(path), str(tmp_nb))
        return pm.inspect_notebook(str(tmp_nb))


def _parameter_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def validate_params(
    notebook: str | Path, params: dict[str, Any], params_file: str | Path | None = None
) -> dict[str, dict[str, Any]]:
    """Check ``params`` against the notebook's ``parameters`` cell; return the notebook's parameters.

    Raises ``ParamsError`` (naming ``params_file``, the offending key(s) and the notebook's parameters)
    when the notebook has no (or more than one) ``parameters`` cell, when a key is not a parameter, or
    when a value's type contradicts a plain annotation (``int``, ``float``, ``str``, ``bool``, ``list``,
    ``dict``; other annotations are not checked).
    """
    notebook = Path(notebook)
    where = f"{params_file}" if params_file else "parameters"
    n_cells = len(_parameter_cells(read_notebook(notebook)))
    if n_cells != 1:
        raise ParamsError(
            f"{where}: notebook {notebook} has {n_cells} cells tagged 'parameters' (needs exactly one; "
            "tag it with `# %% tags=[\"parameters\"]` in the .py)"
        )
    known = notebook_parameters(notebook)
    listing = "; ".join(_describe(p) for p in known.values()) or "(none)"
    if not isinstance(params, dict):
        raise ParamsError(f"{where}: expected a mapping of parameters, got {type(params).__name__}")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ParamsError(
            f"{where}: unknown parameter(s) {unknown} for notebook {notebook.name}; "
            f"its parameters are: {listing}"
        )
    for key, value in params.items():
        check = _TYPE_CHECKS.get(known[key]["inferred_type_name"])
        if check is not None and not check(value):
            raise ParamsError(
                f"{where}: parameter {key!r} of notebook {notebook.name} is annotated "
                f"{known[key]['inferred_type_name']}, got {value!r}"
            )
    return known


def _describe(p: dict[str, Any]) -> str:
    kind = p["inferred_type_name"] if p["inferred_type_name"] not in (None, "None") else "?"
    text = f"{p['name']}: {kind} = {p['default']}"
    return f"{text}  # {p['help']}" if p.get("help") else text


def load_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameters, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# input fingerprints (what decides a skip)


def _cells_digest(nb) -> str:
    cells = [
        [c.cell_type, c.source, sorted(c.get("metadata", {}).get("tags", []))] for c in nb.cells
    ]
    return io.stable_hash(cells, length=64)


def _files_digest(root: Path, paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root).as_posix()).encode() + b"\0")
        digest.update(io.sha256_file(path).encode() + b"\0")
    return digest.hexdigest()


def library_digest(params_dir: str | Path = PARAMS_DIR) -> dict[str, str]:
    """Hashes of what every notebook depends on besides itself: kelib's code and the shared params."""
    params_dir = Path(params_dir)
    kelib_py = [
        p
        for p in PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts and p.relative_to(PACKAGE_DIR).as_posix() not in _RUNNER_FILES
    ]
    shared = [params_dir / "embedded.yaml"] if (params_dir / "embedded.yaml").exists() else []
    hparams = params_dir / "hparams"
    if hparams.is_dir():
        shared += [p for p in hparams.rglob("*") if p.is_file()]
    return {
        "kelib": _files_digest(PACKAGE_DIR, kelib_py),
        "shared_params": _files_digest(params_dir, shared),
    }


def _fingerprint(nb, params: dict[str, Any], library: dict[str, str]) -> dict[str, str]:
    parts = {
        "notebook": _cells_digest(nb),
        # out_dir is where the record lives, not an input; leaving it out lets the checkout move
        "params": io.stable_hash({k: v for k, v in params.items() if k != OUT_DIR_PARAM}, length=64),
        **library,
    }
    parts["all"] = io.stable_hash(parts, length=64)
    return parts


def last_seconds(out_dir: Path) -> float | None:
    """How long the notebook writing into ``out_dir`` took on its last successful run, if recorded."""
    try:
        seconds = io.read_json(out_dir / INPUTS_FILE).get(SECONDS_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) else None


def notebook_cost(job: _NotebookJob) -> float:
    """How long ``job``'s notebook took on its last run, to start the longest first side by side
    (:func:`kelib.executors.longest_first`); a notebook with no record counts as the longest (it may
    be). The batch then ends with short notebooks rather than one long one running alone."""
    seconds = last_seconds(job.out_dir)
    return math.inf if seconds is None else seconds


def _changed(out_dir: Path, fingerprint: dict[str, str]) -> str | None:
    """``None`` when the recorded inputs equal ``fingerprint`` and the outputs exist, else why not."""
    record = out_dir / INPUTS_FILE
    if not (out_dir / NUMBERS_FILE).exists():
        return "new" if not record.exists() else f"no {NUMBERS_FILE}"
    if not record.exists():
        return f"no {INPUTS_FILE}"
    try:
        old = io.read_json(record)
    except (OSError, ValueError):
        return f"unreadable {INPUTS_FILE}"
    if old.get("all") == fingerprint["all"]:
        return None
    changed = [k for k in fingerprint if k != "all" and old.get(k) != fingerprint[k]]
    return "changed: " + ", ".join(changed or ["inputs"])


# --------------------------------------------------------------------------------------------------
# running


def kernel_executable(kernel_name: str = "python3") -> str:
    """The Python executable kernel ``kernel_name`` runs (``"python"`` in a spec means this Python)."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv = KernelSpecManager().get_kernel_spec(kernel_name).argv
    major, minor = sys.version_info[:2]
    if argv and argv[0] in {"python", f"python{major}", f"python{major}.{minor}"}:
        return sys.executable  # what jupyter_client's KernelManager.format_kernel_cmd does
    return argv[0]


@dataclass
class Frame:
    """One frame of an IPython traceback: ``where`` (``In[3]`` for a cell, else a file), the line
    number and the code of the line that raised there (its ``---->`` line)."""

    where: str
    line: int
    code: str


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_HEADER = re.compile(r"^(?:Cell (In\[\d+\]), line (\d+)|File (.+?):(\d+))")
_ARROW = re.compile(r"^-+>\s*(\d+)\s?(.*)$")


def traceback_frames(traceback: list[str]) -> list[Frame]:
    """The frames of an IPython traceback as a kernel sends it (``ename``/``evalue``/``traceback`` of
    an error; ANSI colours stripped), outermost first."""
    frames = []
    for entry in traceback:
        text = _ANSI.sub("", str(entry)).splitlines()
        header = _HEADER.match(text[0].strip()) if text else None
        if header is None:
            continue
        cell, cell_line, path, path_line = header.groups()
        code = next((m.group(2).strip() for m in map(_ARROW.match, (t.strip() for t in text[1:])) if m), "")
        frames.append(Frame(cell or path, int(cell_line or path_line), code))
    return frames


def _failure_message(
    name: str, err: Exception, nb, param_cell: int, output: Path
) -> tuple[str, int | None]:
    """``("<name>: cell N (In [k]) line L `the line that raised` raised E: message", N)`` for a failed run.

    The line is the failing cell's line in the traceback (the call into kelib, say); when the error
    came from deeper down, the innermost frame's file, line and code follow in brackets."""
    from papermill.exceptions import PapermillExecutionError

    def source_cell(executed_index: int) -> int:
        # the executed notebook has the injected-parameters cell right after the parameters cell
        return executed_index - (1 if executed_index > param_cell else 0) + 1

    def first_line(source: str) -> str:
        return next((line for line in str(source).splitlines() if line.strip()), "").strip()

    if isinstance(err, PapermillExecutionError):
        cell = source_cell(err.cell_index)
        evalue = str(err.evalue).strip().splitlines()[0] if str(err.evalue).strip() else ""
        frames = traceback_frames(err.traceback or [])
        mine = next((f for f in frames if f.where == f"In[{err.exec_count}]"), None)
        if mine is None:  # no traceback to read (a kernel that sent none): the cell's first line
            return (f"{name}: cell {cell} (In [{err.exec_count}]) `{first_line(err.source)}` "
                    f"raised {err.ename}: {evalue}", cell)
        lines = str(err.source).splitlines()
        code = lines[mine.line - 1].strip() if 0 < mine.line <= len(lines) else mine.code
        inner = frames[-1]
        via = f" (raised in {inner.where}:{inner.line} `{inner.code}`)" if inner is not mine and inner.code else ""
        return (
            f"{name}: cell {cell} (In [{err.exec_count}]) line {mine.line} `{code}` "
            f"raised {err.ename}: {evalue}{via}",
            cell,
        )
    # a timeout or a dead kernel: the last cell papermill started is the culprit
    text = str(err).strip().splitlines()
    what = f"{type(err).__name__}: {text[0] if text else ''}"
    try:
        import nbformat

        cells = nbformat.read(str(output), as_version=4).cells
        started = [
            i
            for i, c in enumerate(cells)
            if c.get("metadata", {}).get("papermill", {}).get("status") in ("running", "completed", "failed")
        ]
        if started and "injected-parameters" not in cells[started[-1]].metadata.get("tags", []):
            cell = source_cell(started[-1])
            return f"{name}: cell {cell} `{first_line(cells[started[-1]].source)}`: {what}", cell
    except Exception:  # noqa: BLE001 (the message is best effort; the error itself is reported)
        pass
    return f"{name}: {what}", None


def validate_variant(
    variant_dir: str | Path, only: list[str] | None = None, notebooks_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[tuple[str, Path, dict[str, Any]]]:
    """``[(name, source, params)]`` of a variant folder, in run order, every params file validated.

    ``overrides`` (e.g. ``{"device_map": "auto", "stats_corpus": "wikitext2"}`` from the command line)
    replace the files' values in every notebook that has that parameter; a key no notebook of the
    batch has is a ``ParamsError``.

    No kernel starts, so tests can check every variant (the real-model ones included) in seconds.
    Raises ``ParamsError`` / ``ReproduceError``.
    """
    overrides = dict(overrides or {})
    if OUT_DIR_PARAM in overrides:
        raise ParamsError(f"`{OUT_DIR_PARAM}` is set by the runner; it cannot be overridden")
    used: set[str] = set()
    variant_dir = _resolve(variant_dir)
    if not variant_dir.is_dir():
        raise ReproduceError(
            f"no parameter folder {variant_dir} (variants: {list_variants(PARAMS_DIR)})"
        )
    variant = variant_dir.name
    notebooks_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    available = sort_names(p.stem for p in variant_dir.glob("*.yaml"))
    if only:
        unknown = [n for n in only if n not in available]
        if unknown:
            raise ReproduceError(
                f"unknown notebook(s) {unknown} for variant {variant!r} ({variant_dir}); "
                f"notebooks with params there: {available}; "
                f"all notebooks: {list_notebooks(notebooks_dir)}"
            )
        names = sort_names(only)
    else:
        names = available
    if not names:
        raise ReproduceError(f"{variant_dir} has no notebook params (*.yaml)")

    plan = []
    for name in names:
        params_file = variant_dir / f"{name}.yaml"
        params = load_params(params_file)
        try:
            source = notebook_path(name, notebooks_dir)
        except ReproduceError as err:
            raise ParamsError(f"{params_file}: {err}") from None
        known = validate_params(source, params, params_file)
        if overrides:
            mine = {k: v for k, v in overrides.items() if k in known}
            used |= set(mine)
            params = {**params, **mine}
            validate_params(source, params, f"{params_file} with the command line's values")
        if OUT_DIR_PARAM not in known:
            raise ParamsError(
                f"notebook {source} has no `{OUT_DIR_PARAM}: str` parameter (the runner passes where "
                "figures, tables and numbers go)"
            )
        if OUT_DIR_PARAM in params:
            raise ParamsError(f"{params_file}: `{OUT_DIR_PARAM}` is set by the runner; remove it")
        plan.append((name, source, params))
    unused = sorted(set(overrides) - used)
    if unused:
        raise ParamsError(f"no notebook of {variant_dir} has the parameter(s) {unused} given on the command line")
    return plan


def reproduce(
    variant_dir: str | Path = "params/default",
    only: list[str] | None = None,
    force: bool = False,
    out_root: str | Path | None = None,
    runs_root: str | Path | None = None,
    kernel_name: str = "python3",
    timeout_per_cell: float | None = None,
    notebooks_dir: str | Path | None = None,
    progress_bar: bool | None = None,
    log: Callable[[str], None] | None = None,
    overrides: dict[str, Any] | None = None,
    preflight: bool = True,
    notebooks_at_once: int = 1,
) -> list[NotebookResult]:
    """Run every notebook with a YAML in ``variant_dir`` through papermill; return one result each.

    Args:
        variant_dir: ``params/<variant>``; a relative path is tried against the cwd, then the repo root.
        only: run just these notebook names (each needs a YAML in the variant).
        force: run even when the inputs are unchanged.
        out_root: outputs go to ``<out_root>/<variant>/<name>/`` (default ``figures/``).
        runs_root: executed notebooks go to ``<runs_root>/<variant>/<name>.ipynb`` (default ``runs/``).
        kernel_name: always ``python3``, this environment's kernel (a warning says when it is not).
        timeout_per_cell: seconds before a cell counts as hung (default: none).
        notebooks_dir: where the notebook sources are (default ``notebooks/``).
        progress_bar: papermill's per-cell bar (default: when stderr is a terminal).
        log: receives one line per notebook (default: print to stdout).
        overrides: parameter values for every notebook that has the parameter, over the params files'
            (see :func:`validate_variant`); they are part of the inputs that decide a skip.
        preflight: first run :func:`kelib.preflight.check_variant` (config only, seconds) and log its
            report: editors that cannot run, MEND untrained, statistics unreachable, the memory plan.
            Its problems are reported, not fatal: the notebooks report such runs as not run.
        notebooks_at_once: notebooks executed side by side, each in a process of its own. On the CPU,
            two keep both cores busy while one notebook waits for its last run, loads its model or
            plots; notebooks that share a run wait for the one computing it (the run folder is claimed).
            They start longest first, by the seconds each took on its last run (:func:`notebook_cost`).
            Results and figures are the same as one at a time.

    Every params file is validated before anything runs (``ParamsError``). A failing notebook is reported
    with its cell and the others still run.
    """
    if notebooks_at_once < 1:
        raise ValueError(f"notebooks_at_once must be at least 1, got {notebooks_at_once}")
    log = log or (lambda line: print(line, flush=True))
    variant_dir = _resolve(variant_dir)
    variant = variant_dir.name
    notebooks_dir = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    out_root = Path(out_root or FIGURES_DIR).resolve()
    runs_root = Path(runs_root or RUNS_DIR).resolve()
    if progress_bar is None:
        progress_bar = sys.stderr.isatty()

    # validate everything first: a typo in the last YAML must fail in seconds, not after hours
    plan = validate_variant(variant_dir, only, notebooks_dir, overrides)
    if preflight:
        from kelib.preflight import check_variant

        try:
            report = check_variant(variant_dir, only=only, notebooks_dir=notebooks_dir, overrides=overrides)
            for line in report.format().splitlines():
                log(f"preflight | {line}")
        except Exception as err:  # noqa: BLE001 (the preflight informs; it must not stop a batch)
            log(f"preflight | could not run: {type(err).__name__}: {err}")

    executable = kernel_executable(kernel_name)
    if os.path.abspath(executable) != os.path.abspath(sys.executable):
        warnings.warn(
            f"kernel {kernel_name!r} runs {executable}, not this environment's {sys.executable}: "
            "the notebooks may not see this kelib"
        )

    library = library_digest(PARAMS_DIR)
    log(f"reproduce {variant}: {len(plan)} notebook(s) from {notebooks_dir} -> {out_root / variant}")
    by_name: dict[str, NotebookResult] = {}
    todo = []
    for i, (name, source, params) in enumerate(plan, 1):
        out_dir = out_root / variant / name
        output = runs_root / variant / f"{name}.ipynb"
        nb = read_notebook(source)
        fingerprint = _fingerprint(nb, params, library)
        reason = "forced" if force else _changed(out_dir, fingerprint)
        prefix = f"[{i}/{len(plan)}] {name}"
        if reason is None:
            kept = output if output.exists() else None
            by_name[name] = NotebookResult(name, "skipped", 0.0, kept, out_dir)
            log(f"{prefix}: skipped (inputs unchanged)")
            continue
        todo.append(_NotebookJob(name, prefix, reason, nb, source, params, fingerprint, out_dir, output, kernel_name,
                                 timeout_per_cell, progress_bar and notebooks_at_once == 1))
    if notebooks_at_once == 1 or len(todo) <= 1:
        for job in todo:
            by_name[job.name], line = _execute(job)
            log(line)
    else:
        # spawned processes: each papermill run has its own kernel client and event loop
        from kelib.executors import available_cores, longest_first

        context = multiprocessing.get_context("spawn")
        threads = max(1, available_cores() // notebooks_at_once)
        todo = [todo[i] for i in longest_first(todo, notebook_cost)]
        with concurrent.futures.ProcessPoolExecutor(notebooks_at_once, mp_context=context, initializer=_share_cores,
                                                    initargs=(threads,)) as pool:
            log(f"reproduce {variant}: {notebooks_at_once} notebooks at a time, {threads} thread(s) each")
            for future in concurrent.futures.as_completed([pool.submit(_execute, job) for job in todo]):
                result, line = future.result()
                by_name[result.name] = result
                log(line)
    results = [by_name[name] for name, _, _ in plan]

    failed = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    log(f"reproduce {variant}: {counts['ok']} ran, {counts['skipped']} skipped, {counts['failed']} failed")
    for r in failed:
        log(f"  FAILED {r.error}")
    return results


@dataclass
class _NotebookJob:
    """One notebook to execute: everything :func:`_execute` needs, picklable for a worker process."""

    name: str
    prefix: str
    reason: str
    nb: Any
    source: Path
    params: dict
    fingerprint: dict
    out_dir: Path
    output: Path
    kernel_name: str
    timeout_per_cell: float | None
    progress_bar: bool


def _share_cores(threads: int) -> None:
    """Give the kernels this process starts ``threads`` cores each (they inherit the environment):
    that many threads, and as many local-executor workers (``KELIB_CORES``,
    :func:`kelib.executors.available_cores`). Notebooks side by side with a thread per core each
    would oversubscribe the cores, and OpenMP threads that wait by spinning make that many times
    slower (seen in a first batch without this: a notebook's own evaluations ran roughly ten times
    longer than alone; observed, not benchmarked). Even single-threaded, four editing processes on
    two cores get through 8-17% fewer edits per second than two (two runs of
    ``benchmarks/bench_oversubscription.py``), so each notebook's runs get workers for its share of
    the cores only."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KELIB_CORES"):
        os.environ[name] = str(threads)


def _execute(job: _NotebookJob) -> tuple[NotebookResult, str]:
    """Execute one notebook through papermill into ``job.out_dir`` (cleared first: stale figures of an
    older version must not survive a re-run); its result and the line to log."""
    import papermill as pm

    if job.out_dir.exists():
        shutil.rmtree(job.out_dir)
    job.out_dir.mkdir(parents=True)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {} if job.timeout_per_cell is None else {"execution_timeout": job.timeout_per_cell}
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            job.nb,
            str(job.output),
            parameters={**job.params, OUT_DIR_PARAM: str(job.out_dir)},
            kernel_name=job.kernel_name,
            cwd=str(job.source.parent),
            progress_bar=job.progress_bar,
            **engine_kwargs,
        )
    except Exception as err:  # noqa: BLE001 (a failing notebook must not stop the batch)
        seconds = time.perf_counter() - start
        message, cell = _failure_message(job.name, err, job.nb, _parameter_cells(job.nb)[0], job.output)
        return (NotebookResult(job.name, "failed", seconds, job.output, job.out_dir, message, cell),
                f"{job.prefix}: FAILED after {seconds:.1f}s ({job.reason}): {message}; see {job.output}")
    seconds = time.perf_counter() - start
    if not (job.out_dir / NUMBERS_FILE).exists():
        message = f"{job.name}: ran but wrote no {NUMBERS_FILE} to out_dir"
        return (NotebookResult(job.name, "failed", seconds, job.output, job.out_dir, message),
                f"{job.prefix}: FAILED after {seconds:.1f}s: {message}")
    io.write_json(job.out_dir / INPUTS_FILE, {**job.fingerprint, SECONDS_KEY: round(seconds, 1)})
    return (NotebookResult(job.name, "ok", seconds, job.output, job.out_dir),
            f"{job.prefix}: ok in {seconds:.1f}s ({job.reason})")


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO_DIR / path
    return path.resolve()


# --------------------------------------------------------------------------------------------------
# pairing of the .py sources and the committed .ipynb


def check_pairing(notebooks_dir: str | Path = NOTEBOOKS_DIR) -> list[str]:
    """Problems with the notebook pairs in ``notebooks_dir``; empty when all is well.

    Every ``<name>.py`` needs a ``<name>.ipynb`` with the same cells (type, source, tags) and vice versa;
    both must name the ``python3`` kernel; no ``.ipynb`` may hold outputs, execution counts or papermill
    metadata (``jupytext --sync notebooks/<name>.py`` and the nbstripout filter fix these).
    """
    import nbformat

    notebooks_dir = Path(notebooks_dir)
    problems = []
    py = {p.stem: p for p in notebooks_dir.glob("*.py")}
    ipynb = {p.stem: p for p in notebooks_dir.glob("*.ipynb")}
    for name in sort_names(set(py) | set(ipynb)):
        if name not in ipynb:
            problems.append(f"{py[name]}: no paired {name}.ipynb (run `jupytext --sync {py[name]}`)")
            continue
        if name not in py:
            problems.append(
                f"{ipynb[name]}: no paired {name}.py source (run `jupytext --sync {ipynb[name]}`)"
            )
            continue
        try:
            src, paired = read_notebook(py[name]), read_notebook(ipynb[name])
            raw = nbformat.read(str(ipynb[name]), as_version=4)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{name}: cannot read the pair: {type(err).__name__}: {err}")
            continue
        for label, nb in ((py[name].name, src), (ipynb[name].name, paired)):
            kernel = nb.metadata.get("kernelspec", {}).get("name")
            if kernel != "python3":
                problems.append(f"{label}: kernelspec name is {kernel!r}, needs 'python3'")
        a, b = _cell_list(src), _cell_list(paired)
        if a != b:
            where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            problems.append(
                f"{ipynb[name]} is stale: its cells differ from {py[name].name} from cell {where + 1} on "
                f"({len(b)} vs {len(a)} cells; run `jupytext --sync {py[name]}`)"
            )
        problems += [f"{ipynb[name]}: {p}" for p in _execution_traces(raw)]
    return problems


def _cell_list(nb) -> list[tuple]:
    return [
        (c.cell_type, c.source.strip("\n"), tuple(c.get("metadata", {}).get("tags", []))) for c in nb.cells
    ]


def _execution_traces(nb) -> list[str]:
    found = []
    if "papermill" in nb.metadata:
        found.append("has papermill metadata (metadata.papermill)")
    for i, cell in enumerate(nb.cells, 1):
        if cell.cell_type == "code" and cell.get("outputs"):
            found.append(f"cell {i} has outputs")
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            found.append(f"cell {i} has an execution count")
        keys = [k for k in _PAPERMILL_CELL_KEYS if k in cell.get("metadata", {})]
        if keys:
            found.append(f"cell {i} has execution metadata {keys}")
        tags = [t for t in cell.get("metadata", {}).get("tags", []) if t in _PAPERMILL_TAGS]
        if tags:
            found.append(f"cell {i} is a papermill cell {tags}")
    return found

