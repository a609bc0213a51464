"""Explore finished runs in JupyterLab: a widget panel over a notebook's grid table.

``explore(grid, "condition_number", globals())``, the last cell of each claim notebook, shows
dropdowns for the editor, regularizer, protocol, metric and layer, a checkpoint-range slider and an
absolute / relative-to-unedited switch. Each change redraws one line per run from ``grid``, the table
:func:`kelib.experiments.run_grid` returned: nothing is recomputed and nothing is written (out_dir
included). A button shows the ``kelib reproduce`` and papermill commands that re-run the notebook on
the runs and edits in view, and the ``explore(...)`` call that draws this view again.

**Interactive or not** (:func:`interactive`). The panel is built only in an IPython kernel whose
current cell came from a front end that can answer ``input()``: the execute request's
``allow_stdin`` is true from JupyterLab, Notebook and VS Code, and false from papermill, ``jupyter
nbconvert --execute`` and every other nbclient-based executor (nbclient sets it false). Anywhere
else (the batch, plain Python, tests) :func:`explore` returns ``None`` at once: it imports no widget,
draws nothing, writes nothing, so the batch's figures, tables and ``numbers.json`` are those of a
notebook without the cell. ``KELIB_EXPLORE=1`` forces the panel (a front end that renders widgets
but sends ``allow_stdin`` false, e.g. Voila), ``KELIB_EXPLORE=0`` turns it off. A notebook parameter
(``interactive: bool``) was not used: it would change the batch's parameters and their fingerprints.
"""

from __future__ import annotations

import ast
import io as _io
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

ALL = "all"
ENV = "KELIB_EXPLORE"
# parameters that say where a run computes, not what: left out of the reproduce command
RUNTIME_ONLY = ("out_dir", "executor", "workers")
_MISSING = object()


def interactive() -> bool:
    """Whether a front end that can show widgets is running this cell (see the module docstring)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    import sys

    if "IPython" not in sys.modules:  # no IPython, no front end (and nothing to import)
        return False
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:  # plain Python or a terminal IPython: nothing renders widgets
        return False
    try:
        parent = kernel.get_parent("shell")
    except Exception:  # noqa: BLE001 (an older or foreign kernel: fall back to its flag)
        parent = None
    if parent and isinstance(parent.get("content"), Mapping) and "allow_stdin" in parent["content"]:
        return bool(parent["content"]["allow_stdin"])
    return bool(getattr(kernel, "_allow_stdin", False))


@dataclass(frozen=True)
class View:
    """What the panel shows: a filter on the runs, one metric, its layer, a checkpoint range."""

    scope: str
    metric: str
    editor: str = ALL
    regularizer: str = ALL
    protocol: str = ALL
    layer: Any = "last"  # "last" (each run's last edited layer), "sum" (over edited layers) or a layer
    checkpoints: tuple[int, int] | None = None  # (first, last) shown; None: all
    relative: bool = False  # divided by the unedited value (checkpoint 0)


def is_weights(scope: str) -> bool:
    return scope.startswith("weights")


def metric_options(grid: pd.DataFrame) -> list[tuple[str, tuple[str, str]]]:
    """``[(label, (scope, metric))]`` of the grid, weight diagnostics first."""
    pairs = grid[["scope", "metric"]].drop_duplicates()
    pairs = sorted(map(tuple, pairs.to_numpy()), key=lambda p: (not is_weights(p[0]), p[0], p[1]))
    return [(f"{metric} ({scope})", (scope, metric)) for scope, metric in pairs]


def run_label(editor: str, regularizer: str, protocol: str, batch_size, detail: bool) -> str:
    label = editor if regularizer == "none" else f"{editor} + {regularizer}"
    return f"{label} {protocol} (b={batch_size})" if detail else label


def view_table(grid: pd.DataFrame, view: View) -> tuple[pd.DataFrame, list[str]]:
    """The lines of ``view``: ``label, run_dir, checkpoint, value`` (one line per run), and notes
    on what it had to leave out. Relative values divide by the run's own checkpoint-0 value, or, for
    a run without one (the batch protocol), by the unedited model's (any run's checkpoint 0)."""
    notes = []
    rows = grid[(grid.scope == view.scope) & (grid.metric == view.metric)].copy()
    for key in ("editor", "regularizer", "protocol"):
        chosen = getattr(view, key)
        if chosen != ALL:
            rows = rows[rows[key] == chosen]
    rows["layer"] = pd.to_numeric(rows.layer, errors="coerce")
    if view.relative:
        rows["lkey"] = rows.layer.fillna(-1)
        own = rows[rows.checkpoint == 0].groupby(["run_dir", "lkey"]).value.first().rename("own")
        start = grid[(grid.checkpoint == 0) & (grid.scope == view.scope) & (grid.metric == view.metric)]
        unedited = (start.assign(lkey=pd.to_numeric(start.layer, errors="coerce").fillna(-1))
                    .groupby("lkey").value.mean().rename("unedited"))
        rows = rows.join(own, on=["run_dir", "lkey"]).join(unedited, on="lkey")
        rows["base"] = rows.own.fillna(rows.unedited)
    if is_weights(view.scope):
        if view.layer == "last":
            rows = rows[rows.layer == rows.groupby("run_dir").layer.transform("max")]
        elif view.layer != "sum":
            rows = rows[rows.layer == view.layer]
    sums = {"value": ("value", lambda s: s.sum(min_count=1))}
    if view.relative:
        sums["base"] = ("base", lambda s: s.sum(min_count=1))
    run_keys = ["run_dir", "editor", "regularizer", "protocol", "batch_size"]
    lines = rows.groupby([*run_keys, "checkpoint"], dropna=False).agg(**sums).reset_index()
    if view.checkpoints is not None:
        first, last = view.checkpoints
        lines = lines[(lines.checkpoint >= first) & (lines.checkpoint <= last)]
    if view.relative:
        missing = lines.base.isna() | (lines.base == 0)
        if missing.any():
            notes.append(f"{view.metric} ({view.scope}) has no unedited value at checkpoint 0 for "
                         f"{lines[missing].run_dir.nunique()} run(s): left out of the relative view")
        lines = lines[~missing].assign(value=lambda t: t.value / t.base)
    detail = grid[["protocol", "batch_size"]].drop_duplicates().shape[0] > 1
    lines["label"] = [run_label(e, r, p, b, detail) for e, r, p, b in
                      zip(lines.editor, lines.regularizer, lines.protocol, lines.batch_size)]
    lines = lines.sort_values(["label", "run_dir", "checkpoint"])
    return lines[["label", "run_dir", "editor", "regularizer", "checkpoint", "value"]].reset_index(drop=True), notes


def draw(lines: pd.DataFrame, view: View, fig=None):
    """One line per run of :func:`view_table`'s table on a new (or cleared) matplotlib Figure, in
    the suite's styles (the editor's colour, the regularizer's line and marker)."""
    from matplotlib.figure import Figure

    from kelib.plotting import editor_color, regularizer_style

    def style(editor: str, regularizer: str) -> dict:
        try:
            kwargs = regularizer_style(regularizer)
        except KeyError:
            kwargs = {"marker": "o"}
        try:
            kwargs["color"] = editor_color(editor)
        except KeyError:
            kwargs.pop("color", None)
        return kwargs

    fig = fig or Figure(figsize=(7.0, 3.4))
    fig.clear()
    ax = fig.subplots()
    for (label, _), line in lines.groupby(["label", "run_dir"], sort=False):
        ax.plot(line.checkpoint.to_numpy(), line.value.to_numpy(), label=label,
                **style(line.editor.iloc[0], line.regularizer.iloc[0]))
    if lines.empty:
        ax.text(0.5, 0.5, "no rows for this selection", ha="center", va="center", transform=ax.transAxes)
    where = ""
    if is_weights(view.scope):
        where = {"last": ", last edited layer", "sum": ", summed over edited layers"}.get(view.layer, f", layer {view.layer}")
    ax.set_title(f"{view.metric} ({view.scope}{where})" + (" / unedited" if view.relative else ""))
    ax.set_xlabel("edits")
    if len(lines):
        ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# the command that reproduces a view


def notebook_defaults(notebook: str) -> dict[str, Any]:
    """The values of ``notebook``'s ``parameters`` cell (literals only), read from its source."""
    from kelib.reproduce import _parameter_cells, notebook_path, read_notebook

    nb = read_notebook(notebook_path(notebook))
    cells = _parameter_cells(nb)
    if len(cells) != 1:
        raise ValueError(f"notebook {notebook} has {len(cells)} parameters cells (needs one)")
    values = {}
    for node in ast.parse(nb.cells[cells[0]].source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                values[target.id] = _MISSING  # not a literal: always passed on the command line
    return values


def variant_of(out_dir: str | None, notebook: str) -> str:
    """The params variant a notebook's ``out_dir`` belongs to (``figures/<variant>/<notebook>``),
    ``default`` when it names none."""
    from kelib.reproduce import PARAMS_DIR

    if out_dir:
        name = Path(out_dir).parent.name
        if (PARAMS_DIR / name / f"{notebook}.yaml").exists():
            return name
    return "default"


def view_overrides(view: View, params: Mapping[str, Any]) -> dict[str, Any]:
    """The notebook parameters that restrict a re-run to the runs and edits of ``view``.

    A notebook with a ``runs`` list keeps the runs the filters select, plus, for each selected run
    with a regularizer, its editor alone (the notebooks judge a regularizer against it); one with
    ``editors`` and ``regularizers`` lists keeps the selected ones (``none`` always: the baseline).
    A checkpoint range that ends before ``n_edits`` becomes ``n_edits`` and the checkpoints below it.
    """
    out: dict[str, Any] = {}
    runs = params.get("runs")
    if isinstance(runs, list):
        def picked(run: Mapping) -> bool:
            return all(view_value in (ALL, run_value) for view_value, run_value in [
                (view.editor, run.get("editor")), (view.regularizer, run.get("regularizer", "none")),
                (view.protocol, run.get("protocol", "sequential"))])

        chosen = [r for r in runs if picked(r)]
        pairs = {(r.get("editor"), r.get("protocol", "sequential")) for r in chosen
                 if r.get("regularizer", "none") != "none"}
        kept = [r for r in runs if picked(r) or (r.get("regularizer", "none") == "none"
                                                and (r.get("editor"), r.get("protocol", "sequential")) in pairs)]
        if kept != runs:
            out["runs"] = kept
    elif isinstance(params.get("editors"), list) and isinstance(params.get("regularizers"), list):
        if view.editor != ALL:
            out["editors"] = [view.editor]
        if view.regularizer != ALL:
            out["regularizers"] = list(dict.fromkeys(["none", view.regularizer]))
    n_edits = params.get("n_edits")
    if view.checkpoints is not None and isinstance(n_edits, int) and view.checkpoints[1] < n_edits:
        last = int(view.checkpoints[1])
        out["n_edits"] = last
        if isinstance(params.get("checkpoints"), list):
            out["checkpoints"] = [c for c in params["checkpoints"] if c < last]
    return out


def _yaml_text(value: Any) -> str:
    """``value`` as text that ``--set`` (YAML) and papermill read back to the same value."""
    import yaml

    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def commands(notebook: str, variant: str, overrides: Mapping[str, Any], view: View) -> str:
    """The commands that re-run ``notebook`` of ``variant`` with ``overrides`` (run from the
    repository root), and the ``explore`` call that then draws ``view``."""
    sets = " ".join(f"--set {shlex.quote(f'{k}={_yaml_text(v)}')}" for k, v in overrides.items())
    params_file = f"params/{variant}/{notebook}.yaml"
    yaml_text = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in overrides.items()) + "}"
    papermill = (f"mkdir -p runs/explore && papermill notebooks/{notebook}.ipynb runs/explore/{notebook}.ipynb "
                 f"--cwd notebooks -f {params_file} -p out_dir ../runs/explore/{notebook}"
                 + (f" -y {shlex.quote(yaml_text)}" if overrides else ""))
    return "\n".join([
        (f"# re-run the notebook on these runs (runs in the run cache are read back; a shorter range of edits "
         f"is a new run); writes figures/{variant}/{notebook}/"),
        f"kelib reproduce --params params/{variant} --only {notebook} --force {sets}".rstrip(),
        "# or, leaving the batch's figures alone, into runs/explore/ (git ignores it):",
        papermill,
        "# then, in the executed notebook, this view:",
        explore_call(notebook, view),
    ])


def explore_call(notebook: str | None, view: View) -> str:
    args = ["grid"] + ([repr(notebook), "globals()"] if notebook else [])
    fields = {"metric": view.metric, "scope": view.scope, "editor": view.editor, "regularizer": view.regularizer,
              "protocol": view.protocol, "layer": view.layer, "checkpoints": view.checkpoints,
              "relative": view.relative}
    defaults = {"editor": ALL, "regularizer": ALL, "protocol": ALL, "layer": "last", "checkpoints": None,
                "relative": False}
    if not is_weights(view.scope):
        fields.pop("layer")
    args += [f"{k}={v!r}" for k, v in fields.items() if defaults.get(k, _MISSING) != v]
    return f"explore({', '.join(args)})"


# --------------------------------------------------------------------------------------------------
# the panel


class Explorer:
    """The widget panel over ``grid`` (see :func:`explore`); its controls are attributes, so tests
    and users can set ``explorer.editor.value = "MEMIT"`` and read ``explorer.figure``."""

    def __init__(self, grid: pd.DataFrame, notebook: str | None = None,
                 namespace: Mapping[str, Any] | None = None, **initial):
        import ipywidgets as w

        if grid is None or grid.empty:
            raise ValueError("explore needs the grid table of finished runs (run_grid's); it is empty")
        missing = {"editor", "regularizer", "protocol", "batch_size", "checkpoint", "scope", "layer", "metric",
                   "value", "run_dir"} - set(grid.columns)
        if missing:
            raise ValueError(f"explore needs run_grid's table; this one lacks {sorted(missing)}")
        unknown = set(initial) - {f for f in View.__dataclass_fields__}
        if unknown:
            raise TypeError(f"explore got unknown view settings {sorted(unknown)}; "
                            f"known: {list(View.__dataclass_fields__)}")
        self.grid = grid
        self.notebook = notebook
        self.params = {}
        self.overrides_base: dict[str, Any] = {}
        self.variant = "default"
        if notebook is not None:
            self._read_params(namespace or {})

        def choices(column):
            return [ALL, *sorted(map(str, grid[column].dropna().unique()))]

        def check(name, value, options):
            if value not in options:
                raise ValueError(f"explore: {name}={value!r} is not in this table; choose from {options}")
            return value

        metrics = metric_options(grid)
        pairs = [p for _, p in metrics]
        metric = initial.pop("metric", None)
        scope = initial.pop("scope", None)
        if metric is None:  # the first metric of the first scope named (weight diagnostics if none is)
            preferred = [scope] if isinstance(scope, str) else list(scope or [])
            ranked = [p for want in preferred for p in pairs if p[0] == want] + pairs
            scope, metric = ranked[0]
        else:
            found = [p for p in pairs if p[1] == metric and scope in (None, p[0])]
            if not found:
                raise ValueError(f"explore: metric {metric!r}" + (f" in scope {scope!r}" if scope else "")
                                 + f" is not in this table; choose from {[m for _, m in pairs]}")
            scope, metric = found[0]
        layers = sorted(int(x) for x in pd.to_numeric(grid.layer, errors="coerce").dropna().unique())
        layer_options = [("last edited", "last"), ("sum over layers", "sum"), *((f"layer {x}", x) for x in layers)]
        checkpoints = sorted(int(c) for c in grid.checkpoint.unique())
        span = initial.pop("checkpoints", None) or (checkpoints[0], checkpoints[-1])
        for c in span:
            check("checkpoints", c, checkpoints)

        self.editor = w.Dropdown(description="editor", options=choices("editor"),
                                 value=check("editor", initial.pop("editor", ALL), choices("editor")))
        self.regularizer = w.Dropdown(description="regularizer", options=choices("regularizer"),
                                      value=check("regularizer", initial.pop("regularizer", ALL), choices("regularizer")))
        self.protocol = w.Dropdown(description="protocol", options=choices("protocol"),
                                   value=check("protocol", initial.pop("protocol", ALL), choices("protocol")))
        self.metric = w.Dropdown(description="metric", options=metrics, value=(scope, metric))
        self.layer = w.Dropdown(description="layer", options=layer_options,
                                value=check("layer", initial.pop("layer", "last"), [v for _, v in layer_options]))
        self.checkpoints = w.SelectionRangeSlider(description="edits", options=checkpoints, index=(
            checkpoints.index(span[0]), checkpoints.index(span[1])), continuous_update=False)
        self.relative = w.ToggleButtons(options=[("absolute", False), ("relative to unedited (checkpoint 0)", True)],
                                        value=bool(initial.pop("relative", False)))
        self.button = w.Button(description="reproduce this view", icon="terminal",
                               tooltip="the commands that re-run this notebook on the runs in view")
        self.command = w.Textarea(layout=w.Layout(width="100%", height="9em", display="none"))
        self.note = w.HTML()
        self.image = w.Image(format="png")
        self.figure = None
        self.lines = pd.DataFrame()
        controls = [self.editor, self.regularizer, self.protocol, self.metric, self.layer, self.checkpoints,
                    self.relative]
        for control in controls:
            control.observe(lambda _change: self.redraw(), names="value")
        self.button.on_click(lambda _button: self.show_command())
        self.panel = w.VBox([w.HBox([self.editor, self.regularizer, self.protocol]),
                             w.HBox([self.metric, self.layer]), w.HBox([self.checkpoints, self.relative]),
                             self.image, self.note, self.button, self.command])
        self.redraw()

    def _read_params(self, namespace: Mapping[str, Any]) -> None:
        from kelib.reproduce import PARAMS_DIR, load_params

        defaults = notebook_defaults(self.notebook)
        self.params = {k: namespace[k] for k in defaults if k in namespace}
        self.variant = variant_of(self.params.get("out_dir"), self.notebook)
        params_file = PARAMS_DIR / self.variant / f"{self.notebook}.yaml"
        base = {**defaults, **(load_params(params_file) if params_file.exists() else {})}
        self.overrides_base = {k: v for k, v in self.params.items()
                               if k not in RUNTIME_ONLY and base.get(k, _MISSING) != v}

    @property
    def view(self) -> View:
        scope, metric = self.metric.value
        options = list(self.checkpoints.options)
        span = tuple(int(c) for c in self.checkpoints.value)
        return View(scope=scope, metric=metric, editor=self.editor.value, regularizer=self.regularizer.value,
                    protocol=self.protocol.value, layer=self.layer.value,
                    checkpoints=None if span == (options[0], options[-1]) else span, relative=self.relative.value)

    def redraw(self) -> None:
        """Redraw from the cached table (no run is touched) and refresh the command if shown."""
        view = self.view
        self.layer.disabled = not is_weights(view.scope)
        self.lines, notes = view_table(self.grid, view)
        self.figure = draw(self.lines, view, self.figure)
        buffer = _io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        self.image.value = buffer.getvalue()
        self.note.value = "<br>".join(notes)
        if self.command.layout.display != "none":
            self.command.value = self.command_text()

    def command_text(self) -> str:
        view = self.view
        if self.notebook is None:
            return ("# this table was made in this notebook; each claim notebook's panel shows its kelib reproduce "
                    "command\n" + explore_call(None, view))
        full = {k: v for k, v in self.params.items() if k not in RUNTIME_ONLY}
        overrides = {**self.overrides_base, **view_overrides(view, full)}
        return commands(self.notebook, self.variant, overrides, view)

    def show_command(self) -> None:
        self.command.value = self.command_text()
        self.command.layout.display = None

    def _ipython_display_(self):
        from IPython.display import display

        display(self.panel)


def explore(grid: pd.DataFrame | None, notebook: str | None = None, namespace: Mapping[str, Any] | None = None,
            **view) -> Explorer | None:
    """A panel over ``grid`` in JupyterLab; ``None`` (at once, nothing imported or drawn) elsewhere.

    Args:
        grid: the table :func:`kelib.experiments.run_grid` returned (the notebook's ``grid``).
        notebook: the notebook's name (``condition_number``), for the reproduce command; ``None``
            for a table made elsewhere (no command then).
        namespace: the notebook's ``globals()``: its parameters' values, compared with its params
            variant's (``out_dir`` says which) to write the command's ``--set`` options.
        view: the first view: ``metric`` (``scope`` when a name is in several; without a metric,
            ``scope`` may list scopes in order of preference, and their first metric is shown), ``editor``,
            ``regularizer``, ``protocol``, ``layer`` ("last", "sum" or a layer), ``checkpoints``
            (first, last) and ``relative``.

    The panel shows when it is a cell's last expression (or with ``display``).
    """
    if not interactive():
        return None
    return Explorer(grid, notebook, namespace, **view)
