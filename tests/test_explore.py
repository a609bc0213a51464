"""kelib.explore: the widget panel redraws from the grid table, says how to reproduce the view, and
stays silent (None, nothing imported) outside an interactive front end."""

import shlex
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import yaml

from kelib import explore as ex
from kelib.explore import ALL, Explorer, explore, interactive

RUNS = [  # editor, regularizer, protocol, batch_size, checkpoints
    ("ROME", "none", "sequential", 1, [0, 2, 4]),
    ("ROME", "PRUNE", "sequential", 1, [0, 2, 4]),
    ("MEMIT", "none", "sequential", 1, [0, 2, 4]),
    ("MEMIT", "none", "batch", 4, [4]),
]


def value(run: int, scope: str, layer, metric: str, checkpoint: int) -> float:
    """Distinct, known values: the test recomputes what each line must show."""
    code = {"l1": 1000.0, "condition_number": 50.0, "skill_a": 0.9, "efficacy": 0.5}[metric]
    return code * (1 + 0.1 * (layer or 0)) * (1 + 0.05 * (run + 1) * checkpoint) + 0.001 * run


def synthetic_grid() -> pd.DataFrame:
    """A table with run_grid's columns: weights at layers 1 and 2, an ability, an edit metric
    (which, as in the runner, has no checkpoint 0)."""
    rows = []
    for i, (editor, regularizer, protocol, batch_size, checkpoints) in enumerate(RUNS):
        run_dir = f"/cache/runs/{editor}-{regularizer}-{protocol}-b{batch_size}"
        settings = {"editor": editor, "regularizer": regularizer, "protocol": protocol, "batch_size": batch_size,
                    "run_dir": run_dir}
        for c in checkpoints:
            for layer in (1, 2):
                for metric in ("l1", "condition_number"):
                    rows.append(dict(checkpoint=c, scope="weights", layer=layer, metric=metric,
                                     value=value(i, "weights", layer, metric, c), **settings))
            rows.append(dict(checkpoint=c, scope="abilities", layer=None, metric="skill_a",
                             value=value(i, "abilities", None, "skill_a", c), **settings))
            if c > 0:
                rows.append(dict(checkpoint=c, scope="edits", layer=None, metric="efficacy",
                                 value=value(i, "edits", None, "efficacy", c), **settings))
    return pd.DataFrame(rows)


def plotted(explorer: Explorer) -> dict[str, tuple[list, list]]:
    ax = explorer.figure.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


@pytest.fixture
def grid():
    return synthetic_grid()


def test_lines_follow_the_selected_metric_layer_and_runs(grid):
    panel = Explorer(grid, metric="condition_number")
    # every run, each at its last edited layer (2)
    lines = plotted(panel)
    assert len(lines) == 4
    panel.protocol.value = "sequential"
    panel.editor.value = "MEMIT"
    lines = plotted(panel)
    assert list(lines) == ["MEMIT sequential (b=1)"]
    assert lines["MEMIT sequential (b=1)"] == ([0, 2, 4], [value(2, "weights", 2, "condition_number", c) for c in (0, 2, 4)])

    panel.metric.value = ("weights", "l1")
    panel.layer.value = 1
    assert plotted(panel)["MEMIT sequential (b=1)"][1] == [value(2, "weights", 1, "l1", c) for c in (0, 2, 4)]
    panel.layer.value = "sum"
    summed = [value(2, "weights", 1, "l1", c) + value(2, "weights", 2, "l1", c) for c in (0, 2, 4)]
    assert np.allclose(plotted(panel)["MEMIT sequential (b=1)"][1], summed)

    panel.editor.value = ALL
    panel.regularizer.value = "PRUNE"
    assert list(plotted(panel)) == ["ROME + PRUNE sequential (b=1)"]

    panel.metric.value = ("abilities", "skill_a")
    assert panel.layer.disabled
    assert plotted(panel)["ROME + PRUNE sequential (b=1)"][1] == [value(1, "abilities", None, "skill_a", c)
                                                                 for c in (0, 2, 4)]


def test_relative_divides_by_the_unedited_value_and_the_range_cuts_checkpoints(grid):
    panel = Explorer(grid, metric="l1", editor="ROME", regularizer="none", layer="sum")
    absolute = plotted(panel)["ROME sequential (b=1)"][1]
    panel.relative.value = True
    relative = plotted(panel)["ROME sequential (b=1)"]
    assert relative[0] == [0, 2, 4]
    assert np.allclose(relative[1], np.array(absolute) / absolute[0])
    assert relative[1][0] == pytest.approx(1.0)

    # a batch run has no checkpoint 0 of its own: the unedited model's value (any run's) divides it
    panel.editor.value = "MEMIT"
    panel.protocol.value = "batch"
    unedited = np.mean([value(i, "weights", 1, "l1", 0) + value(i, "weights", 2, "l1", 0) for i in (0, 1, 2)])
    batch = plotted(panel)["MEMIT batch (b=4)"]
    assert batch[0] == [4]
    assert batch[1][0] == pytest.approx((value(3, "weights", 1, "l1", 4) + value(3, "weights", 2, "l1", 4)) / unedited)

    panel.protocol.value = ALL
    panel.checkpoints.value = (2, 4)
    assert plotted(panel)["MEMIT sequential (b=1)"][0] == [2, 4]
    panel.checkpoints.value = (0, 2)
    assert plotted(panel)["MEMIT sequential (b=1)"][0] == [0, 2]
    assert "MEMIT batch (b=4)" not in plotted(panel)

    # edit metrics start after the first edit: nothing to divide by, said in the note
    panel.metric.value = ("edits", "efficacy")
    assert plotted(panel) == {}
    assert "no unedited value at checkpoint 0" in panel.note.value
    panel.relative.value = False
    assert plotted(panel)["MEMIT sequential (b=1)"][1] == [value(2, "edits", None, "efficacy", 2)]


def reproduce_sets(text: str) -> tuple[list[str], dict]:
    line = next(l for l in text.splitlines() if l.startswith("kelib reproduce"))
    argv = shlex.split(line)[1:]
    sets = {}
    for i, arg in enumerate(argv):
        if arg == "--set":
            key, _, raw = argv[i + 1].partition("=")
            sets[key] = yaml.safe_load(raw)
    return argv, sets


def condition_number_namespace(**changes):
    """What the condition-number notebook's globals hold after a smoke-variant run (papermill's
    injected values over the parameters cell)."""
    import yaml

    from kelib.reproduce import PARAMS_DIR

    namespace = ex.notebook_defaults("condition_number")
    namespace.update(yaml.safe_load((PARAMS_DIR / "smoke" / "condition_number.yaml").read_text()))
    namespace.update(out_dir="../figures/smoke/condition_number", grid=None, setup=object())
    namespace.update(changes)
    return namespace


def test_reproduce_command_reflects_the_selections(grid):
    from kelib.cli import _parser
    from kelib.reproduce import validate_variant

    namespace = condition_number_namespace(prune_alpha="2")
    runs = namespace["runs"]
    panel = Explorer(grid, "condition_number", namespace, metric="condition_number")
    assert panel.variant == "smoke"
    argv, sets = reproduce_sets(panel.command_text())
    assert argv[:5] == ["reproduce", "--params", "params/smoke", "--only", "condition_number"]
    assert sets == {"prune_alpha": "2"}  # the one parameter that differs from the smoke variant, as a string

    panel.regularizer.value = "PRUNE"
    panel.editor.value = "ROME"
    panel.checkpoints.value = (0, 2)
    panel.relative.value = True
    assert panel.command.layout.display == "none"
    panel.button.click()
    text = panel.command.value
    assert panel.command.layout.display != "none" and text == panel.command_text()
    argv, sets = reproduce_sets(text)
    # ROME + PRUNE and, to judge it against, ROME alone; the edits cut at the range's end
    assert sets["runs"] == [r for r in runs if r["editor"] == "ROME"]
    assert [r.get("regularizer", "none") for r in sets["runs"]] == ["none", "PRUNE"]
    assert sets["n_edits"] == 2 and sets["checkpoints"] == []
    assert "explore(grid, 'condition_number', globals(), metric='condition_number', scope='weights', " \
           "editor='ROME', regularizer='PRUNE', checkpoints=(0, 2), relative=True)" in text
    papermill = next(l for l in text.splitlines() if "papermill" in l)
    assert "-f params/smoke/condition_number.yaml" in papermill
    papermill_values = yaml.safe_load(shlex.split(papermill.split("&&")[1])[-1])
    assert papermill_values["runs"] == sets["runs"] and papermill_values["prune_alpha"] == "2"

    # the command line parses, and every --set is a parameter of the notebook with the right type
    args = _parser().parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    (name, _, params), = validate_variant(args.params, args.only, overrides=overrides)
    assert name == "condition_number" and params["n_edits"] == 2

    # a view of everything re-runs the notebook as it ran
    panel.editor.value = panel.regularizer.value = ALL
    panel.checkpoints.value = (0, 4)
    assert reproduce_sets(panel.command_text())[1] == {"prune_alpha": "2"}


def test_recovery_notebook_keeps_the_unregularized_baseline(grid):
    view = ex.View(scope="weights", metric="l1", editor="MEMIT", regularizer="RECT")
    overrides = ex.view_overrides(view, {"editors": ["ROME", "MEMIT"], "regularizers": ["none", "RECT", "PRUNE"],
                                         "n_edits": 1000, "checkpoints": [100, 500]})
    assert overrides == {"editors": ["MEMIT"], "regularizers": ["none", "RECT"]}


def test_scope_preferences_pick_the_first_metric_of_a_scope_the_table_has(grid):
    assert Explorer(grid, scope=("tasks", "abilities")).metric.value == ("abilities", "skill_a")
    assert Explorer(grid, scope="tasks").metric.value[0] == "weights"  # no such scope: weights first
    with pytest.raises(ValueError, match="metric 'l1' in scope 'abilities'"):
        Explorer(grid, metric="l1", scope="abilities")


def test_bad_view_settings_are_clear_errors(grid):
    with pytest.raises(ValueError, match="metric 'nope'"):
        Explorer(grid, metric="nope")
    with pytest.raises(ValueError, match="editor='KN'"):
        Explorer(grid, editor="KN")
    with pytest.raises(TypeError, match="unknown view settings"):
        Explorer(grid, colour="red")
    with pytest.raises(ValueError, match="lacks"):
        Explorer(grid.drop(columns="run_dir"))


def fake_kernel(monkeypatch, allow_stdin):
    import IPython

    kernel = types.SimpleNamespace(get_parent=lambda channel="shell": {"content": {"allow_stdin": allow_stdin}})
    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=kernel))


def test_only_a_front_end_that_takes_input_gets_the_panel(monkeypatch, grid):
    monkeypatch.delenv(ex.ENV, raising=False)
    assert not interactive() and explore(grid, metric="l1") is None  # no kernel (pytest)
    fake_kernel(monkeypatch, allow_stdin=False)  # papermill / nbclient
    assert not interactive() and explore(grid) is None
    fake_kernel(monkeypatch, allow_stdin=True)  # JupyterLab
    assert interactive() and isinstance(explore(grid), Explorer)
    monkeypatch.setenv(ex.ENV, "0")
    assert explore(grid) is None
    fake_kernel(monkeypatch, allow_stdin=False)
    monkeypatch.setenv(ex.ENV, "1")
    assert interactive()


def test_outside_a_front_end_explore_costs_nothing():
    code = ("import sys; from kelib.explore import explore; assert explore(None, 'condition_number', {}) is None; "
            "print(sorted(m for m in ('ipywidgets', 'matplotlib', 'IPython', 'kelib.reproduce') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(__import__("kelib").__path__[0] + "/..")})
    assert out.stdout.strip() == "[]"


def test_a_real_kernel_shows_the_panel_to_a_front_end_and_nothing_to_nbclient():
    """In a real ipykernel: JupyterLab's execute requests allow stdin, papermill's (nbclient's) do
    not; the first get the panel (a widget view), the second no output at all."""
    import os

    from jupyter_client.manager import start_new_kernel

    grid = synthetic_grid().to_json()
    km, kc = start_new_kernel(kernel_name="python3", env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def run(allow_stdin: bool) -> list[dict]:
            outputs = []
            reply = kc.execute_interactive(
                "import io, os; import pandas as pd; os.environ.pop('KELIB_EXPLORE', None)\n"
                "from kelib.explore import explore, interactive\n"
                f"grid = pd.read_json(io.StringIO({grid!r}))\n"
                "print(interactive())\n"
                "explore(grid, metric='l1')",
                allow_stdin=allow_stdin, timeout=120,
                output_hook=lambda msg: outputs.append(msg) if msg["msg_type"] in (
                    "stream", "display_data", "execute_result", "error") else None)
            assert reply["content"]["status"] == "ok", reply["content"]
            return outputs

        shown = run(allow_stdin=True)
        assert shown[0]["content"]["text"].strip() == "True"
        assert any("application/vnd.jupyter.widget-view+json" in m["content"].get("data", {}) for m in shown[1:])
        batch = run(allow_stdin=False)
        assert [m["content"].get("text", "").strip() for m in batch] == ["False"]  # and nothing else
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_batch_writes_the_same_bytes_with_and_without_the_explore_cell(micro_dir, tmp_path):
    """condition_number on the micro model through the batch runner, once as committed and once with
    its explore cells cut off: every file it writes (figures, tables, numbers.json) is byte-identical."""
    from pathlib import Path

    from kelib.reproduce import NOTEBOOKS_DIR, reproduce

    source = (Path(NOTEBOOKS_DIR) / "condition_number.py").read_text()
    cut = source.index("# %% [markdown]\n# **Explore the runs.**")
    without = tmp_path / "without"
    without.mkdir()
    (without / "condition_number.py").write_text(source[:cut])
    outputs = {}
    for name, notebooks in (("with", NOTEBOOKS_DIR), ("without", without)):
        [result] = reproduce("params/smoke", only=["condition_number"], out_root=tmp_path / name,
                             runs_root=tmp_path / f"runs-{name}", notebooks_dir=notebooks, progress_bar=False,
                             log=lambda line: None, preflight=False)
        assert result.ok, result.error
        folder = tmp_path / name / "smoke" / "condition_number"
        outputs[name] = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".inputs.json"}
    assert "explore(" in source[cut:] and "explore(" not in source[:cut]
    assert {"numbers.json", "spectra.png", "spectra.pdf"} <= set(outputs["with"])
    assert outputs["with"] == outputs["without"]
