"""The batch reproduction machinery: papermill runs, failure reports, skips, params validation, pairing.

Runs two fixture notebooks (``tests/fixtures/notebooks/``) through real kernels: four kernel starts in
all, about 20 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest

from kelib import plotting
from kelib import reproduce as rp
from kelib.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"


def _write_params(variant_dir: Path, **files: dict) -> Path:
    variant_dir.mkdir(parents=True, exist_ok=True)
    for name, params in files.items():
        (variant_dir / f"{name}.yaml").write_text(json.dumps(params) + "\n")  # JSON is YAML
    return variant_dir


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One batch over both fixtures (``double`` with x=3, ``fails``); the results and the folders.

    kelib's own code is frozen at its first hash for these tests, so an edit to kelib during the test
    session does not turn an expected skip into a run (``test_library_changes_...`` covers that part).
    """
    root = tmp_path_factory.mktemp("reproduce")
    variant = _write_params(root / "params" / "smoke", double={"x": 3}, fails={})
    lines: list[str] = []
    kwargs = dict(
        notebooks_dir=FIXTURES, out_root=root / "figures", runs_root=root / "runs", log=lines.append
    )
    kwargs["frozen"] = rp.library_digest()
    results = _run(variant, **kwargs)
    return {"root": root, "variant": variant, "results": results, "lines": lines, "kwargs": kwargs}


def _run(variant, frozen, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rp, "library_digest", lambda *a, **k: frozen)
        return rp.reproduce(variant, **kwargs)


def test_batch_runs_good_notebook_and_reports_failing_one(batch):
    root, results = batch["root"], batch["results"]
    assert [r.name for r in results] == ["double", "fails"]
    double, fails = results
    assert double.status == "ok" and double.ok
    assert double.out_dir == root / "figures" / "smoke" / "double"
    numbers = json.loads((double.out_dir / "numbers.json").read_text())
    assert numbers["double"] == 6 and numbers["x"] == 3
    # papermill's "python3" resolved to this environment's kernel, not some other Python
    assert numbers["python"] == sys.executable
    assert rp.kernel_executable("python3") == sys.executable
    for f in ("line.png", "line.pdf", "table.csv", "table.md", ".inputs.json"):
        assert (double.out_dir / f).exists(), f
    assert rp.last_seconds(double.out_dir) == pytest.approx(double.seconds, abs=0.06)  # orders the next batch
    assert (double.out_dir / "table.md").read_text() == "| x | double |\n| ---: | ---: |\n| 3 | 6 |\n"
    # executed notebooks go to runs/<variant>/, the sources stay untouched
    assert double.output == root / "runs" / "smoke" / "double.ipynb" and double.output.exists()
    executed = nbformat.read(str(double.output), as_version=4)
    assert executed.metadata.papermill.parameters["x"] == 3
    assert rp.check_pairing(FIXTURES) == []

    assert fails.status == "failed" and not fails.ok
    assert fails.cell == 3
    assert fails.error.startswith("fails: cell 3 ")
    # the line that raised, from the kernel's traceback, not the cell's first line (issue #21)
    assert "line 7 `explode(z)` raised RuntimeError: fixture failure, value=2" in fails.error
    assert f'(raised in In[{fails.error.split("(In [")[1].split("]")[0]}]:3 `raise RuntimeError(f"fixture failure, ' \
           'value={value}")`)' in fails.error
    assert "this cell fails on purpose" not in fails.error
    assert fails.output.exists()
    assert not (fails.out_dir / ".inputs.json").exists()
    progress = "\n".join(batch["lines"])
    assert "[1/2] double: ok in" in progress and "[2/2] fails: FAILED" in progress


def test_rerun_skips_unchanged_reruns_after_param_change_and_on_force(batch):
    kwargs, variant = batch["kwargs"], batch["variant"]
    (skipped,) = _run(variant, only=["double"], **kwargs)
    assert skipped.status == "skipped"

    _write_params(variant, double={"x": 4})
    (rerun,) = _run(variant, only=["double"], **kwargs)
    assert rerun.status == "ok"
    assert json.loads((rerun.out_dir / "numbers.json").read_text())["double"] == 8
    assert any("changed: params" in line for line in batch["lines"])
    assert _run(variant, only=["double"], **kwargs)[0].status == "skipped"

    (rerun.out_dir / "stale.png").write_bytes(b"old")
    (forced,) = _run(variant, only=["double"], force=True, **kwargs)
    assert forced.status == "ok"
    assert not (forced.out_dir / "stale.png").exists()  # a run starts from an empty out_dir


def test_notebooks_side_by_side_give_the_results_of_one_at_a_time(batch, tmp_path, monkeypatch):
    """Two notebooks executed at once, each in its own process: the statuses, numbers, failure report
    and files of the batch that ran them one after the other (its first run, x=3), in the plan's order."""
    from kelib.executors import available_cores

    lines: list[str] = []
    kwargs = {**batch["kwargs"], "out_root": tmp_path / "figures", "runs_root": tmp_path / "runs", "log": lines.append}
    variant = _write_params(tmp_path / "params" / "smoke", double={"x": 3}, fails={})
    costed = []
    cost = rp.notebook_cost
    monkeypatch.setattr(rp, "notebook_cost", lambda job: costed.append(job.name) or cost(job))
    together = _run(variant, notebooks_at_once=2, **kwargs)
    assert costed == ["double", "fails"]  # side by side, the jobs were ordered longest first (no records: as planned)
    assert f"reproduce smoke: 2 notebooks at a time, {max(1, available_cores() // 2)} thread(s) each" in lines
    serial = batch["results"]
    assert [r.name for r in together] == ["double", "fails"]
    assert [r.status for r in together] == [r.status for r in serial]
    assert together[1].error == serial[1].error and together[1].cell == serial[1].cell
    numbers = json.loads((together[0].out_dir / "numbers.json").read_text())
    share = str(max(1, available_cores() // 2))
    assert numbers["omp_threads"] == numbers["kelib_cores"] == share  # the kernel's share of the cores
    assert numbers["double"] == 6 and numbers["x"] == 3 and numbers["python"] == sys.executable
    assert (together[0].out_dir / "table.md").read_text() == "| x | double |\n| ---: | ---: |\n| 3 | 6 |\n"
    assert (together[0].out_dir / ".inputs.json").exists() and not (together[1].out_dir / ".inputs.json").exists()
    with pytest.raises(ValueError, match="notebooks_at_once"):
        _run(variant, notebooks_at_once=0, force=True, **kwargs)


def test_side_by_side_the_notebooks_that_took_longest_start_first(tmp_path):
    from types import SimpleNamespace

    from kelib.executors import longest_first

    recorded = {"short": 40.0, "unknown": None, "long": 900.5, "broken": "x", "middle": 300}
    jobs = []
    for name, seconds in recorded.items():
        (tmp_path / name).mkdir()
        if seconds is not None:
            (tmp_path / name / ".inputs.json").write_text(json.dumps({"all": "f", "seconds": seconds}))
        jobs.append(SimpleNamespace(name=name, out_dir=tmp_path / name))
    (tmp_path / "broken" / ".inputs.json").write_text("{not json")
    assert rp.last_seconds(tmp_path / "long") == 900.5 and rp.last_seconds(tmp_path / "unknown") is None
    assert rp.last_seconds(tmp_path / "broken") is None
    # no record counts as longest, ties keep the plan's order
    order = longest_first(jobs, rp.notebook_cost)
    assert [jobs[i].name for i in order] == ["unknown", "broken", "long", "middle", "short"]


def test_library_changes_change_the_fingerprint(tmp_path):
    (tmp_path / "embedded.yaml").write_text("default: {epochs: 60}\n")
    (tmp_path / "hparams").mkdir()
    (tmp_path / "hparams" / "rome.yaml").write_text("layers: [5]\n")
    before = rp.library_digest(tmp_path)
    assert set(before) == {"kelib", "shared_params"}
    (tmp_path / "hparams" / "rome.yaml").write_text("layers: [6]\n")
    after = rp.library_digest(tmp_path)
    assert after["shared_params"] != before["shared_params"] and after["kelib"] == before["kelib"]
    nb = rp.read_notebook(FIXTURES / "double.py")
    a, b = rp._fingerprint(nb, {"x": 1}, before), rp._fingerprint(nb, {"x": 1}, after)
    assert a["all"] != b["all"] and a["notebook"] == b["notebook"]
    # out_dir is not an input: the checkout may move without re-running everything
    assert rp._fingerprint(nb, {"x": 1, "out_dir": "/elsewhere"}, before)["all"] == a["all"]


def test_failure_message_quotes_the_line_that_raised():
    """The message from papermill's error (ename, evalue, the kernel's ANSI-coloured traceback)."""
    from papermill.exceptions import PapermillExecutionError

    traceback = [
        "\x1b[31m-----\x1b[39m",
        "\x1b[31mValueError\x1b[39m   Traceback (most recent call last)",
        "\x1b[36mCell\x1b[39m\x1b[36m \x1b[39m\x1b[32mIn[5]\x1b[39m\x1b[32m, line 3\x1b[39m\n"
        "\x1b[32m      1\x1b[39m import matplotlib.pyplot as plt\n\x1b[32m      2\x1b[39m x = 1\n"
        "\x1b[32m----> \x1b[39m\x1b[32m3\x1b[39m grid = run(x)\n",
        "\x1b[36mFile \x1b[39m\x1b[32m~/kelib/experiments.py:120\x1b[39m, in \x1b[36mrun\x1b[39m\x1b[34m(x)\x1b[39m\n"
        "\x1b[32m    119\x1b[39m     y = 2\n\x1b[32m--> \x1b[39m\x1b[32m120\x1b[39m     raise ValueError('bad x')\n",
        "\x1b[31mValueError\x1b[39m: bad x",
    ]
    source = "import matplotlib.pyplot as plt\nx = 1\ngrid = run(x)\n"
    err = PapermillExecutionError(4, 5, source, "ValueError", "bad x", traceback)
    message, cell = rp._failure_message("nb", err, None, 1, Path("unused"))
    assert cell == 4  # the injected-parameters cell after the parameters cell is not counted
    assert message == ("nb: cell 4 (In [5]) line 3 `grid = run(x)` raised ValueError: bad x "
                       "(raised in ~/kelib/experiments.py:120 `raise ValueError('bad x')`)")
    frames = rp.traceback_frames(traceback)
    assert [(f.where, f.line) for f in frames] == [("In[5]", 3), ("~/kelib/experiments.py", 120)]
    # no traceback to read: the cell's first line, as before
    bare = PapermillExecutionError(4, 5, source, "ValueError", "bad x", [])
    assert "`import matplotlib.pyplot as plt`" in rp._failure_message("nb", bare, None, 1, Path("u"))[0]


def test_unknown_param_is_an_error_naming_file_and_key(tmp_path):
    variant = _write_params(tmp_path / "smoke", double={"x": 2, "n_edit": 10})
    with pytest.raises(rp.ParamsError) as err:
        rp.reproduce(variant, notebooks_dir=FIXTURES, out_root=tmp_path, runs_root=tmp_path)
    message = str(err.value)
    assert str(variant / "double.yaml") in message and "n_edit" in message
    assert "x: int = 1" in message and "the number to double" in message  # lists the parameters
    assert not (tmp_path / "smoke").joinpath("double").exists()  # nothing ran


def test_repo_notebooks_are_paired_and_every_variant_validates():
    """The committed notebooks (stale .ipynb, outputs) and every params/<variant>/ (typos): no kernel."""
    assert rp.check_pairing(rp.NOTEBOOKS_DIR) == []
    for variant in rp.list_variants(rp.PARAMS_DIR):
        rp.validate_variant(rp.PARAMS_DIR / variant)


def test_params_validation(tmp_path):
    nb = FIXTURES / "double.py"
    assert set(rp.validate_params(nb, {"x": 2})) == {"out_dir", "x"}
    with pytest.raises(rp.ParamsError, match="annotated int"):
        rp.validate_params(nb, {"x": "two"}, "p.yaml")
    no_params = tmp_path / "plain.py"
    no_params.write_text("# %%\nx = 1\n")
    with pytest.raises(rp.ParamsError, match="0 cells tagged 'parameters'"):
        rp.validate_params(no_params, {}, "plain.yaml")
    out_dir_set = _write_params(tmp_path / "v", double={"out_dir": "elsewhere"})
    with pytest.raises(rp.ParamsError, match="set by the runner"):
        rp.reproduce(out_dir_set, notebooks_dir=FIXTURES, out_root=tmp_path, runs_root=tmp_path)


def test_unknown_notebook_name_lists_notebooks(tmp_path):
    variant = _write_params(tmp_path / "smoke", double={})
    with pytest.raises(rp.ReproduceError, match=r"unknown notebook\(s\) \['doubel'\].*\['double'\]"):
        rp.reproduce(variant, only=["doubel"], notebooks_dir=FIXTURES, out_root=tmp_path, runs_root=tmp_path)
    orphan = _write_params(tmp_path / "orphan", missing={})
    with pytest.raises(rp.ParamsError, match="no notebook 'missing'"):
        rp.reproduce(orphan, notebooks_dir=FIXTURES, out_root=tmp_path, runs_root=tmp_path)


def test_order_variants_and_listing(tmp_path, capsys):
    assert rp.sort_names(["b", "a", "00_tour", "01_x"]) == ["00_tour", "01_x", "a", "b"]
    _write_params(tmp_path / "params" / "smoke", double={})
    (tmp_path / "params" / "hparams").mkdir()
    (tmp_path / "params" / "hparams" / "rome.yaml").write_text("layers: [5]\n")
    (tmp_path / "params" / "embedded.yaml").write_text("default: {}\n")
    assert rp.list_variants(tmp_path / "params") == ["smoke"]
    assert main(["list", "--notebooks", str(FIXTURES), "--params-root", str(tmp_path / "params")]) == 0
    out = capsys.readouterr().out
    assert "x: int = 1" in out and "the number to double" in out and "smoke: double" in out


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    bad = _write_params(tmp_path / "bad", double={"nope": 1})
    assert main(["reproduce", "--params", str(bad), "--notebooks", str(FIXTURES)]) == 2
    assert "nope" in capsys.readouterr().err

    def fake(*args, **kwargs):
        return [
            rp.NotebookResult("a", "ok", 1.0, None, tmp_path),
            rp.NotebookResult("b", "failed", 1.0, None, tmp_path, "b: cell 2"),
        ]

    monkeypatch.setattr(rp, "reproduce", fake)
    assert main(["reproduce", "--params", str(bad)]) == 1
    assert main(["reproduce", "--params", str(bad), "--notebooks-at-once", "0"]) == 2
    assert "--notebooks-at-once must be at least 1" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(rp, "reproduce", lambda *a, **k: seen.update(k) or [])
    assert main(["reproduce", "--notebooks-at-once", "2"]) == 0 and seen["notebooks_at_once"] == 2
    assert main(["check-notebooks", "--notebooks", str(FIXTURES)]) == 0


def _figure():
    import matplotlib.pyplot as plt

    plotting.set_style()
    fig, ax = plt.subplots(layout="constrained")
    for editor in ("ROME", "MEMIT"):
        ax.plot([1, 10, 100], [0.9, 0.7, 0.4], color=plotting.editor_color(editor), label=editor)
    ax.plot([1, 10, 100], [0.9, 0.8, 0.7], **plotting.regularizer_style("PRUNE"), label="ROME + PRUNE")
    ax.set(xscale="log", xlabel="edits", ylabel="accuracy", title="fixture – ünïcode")
    ax.legend()
    plotting.provenance_caption(fig, {"model": "none", "editor": "ROME", "seed": 0})
    return fig


def test_figures_are_byte_stable(tmp_path):
    import matplotlib.pyplot as plt

    first = plotting.save_figure(_figure(), tmp_path / "a", "fig")
    time.sleep(1.1)  # the PDF CreationDate has second resolution
    second = plotting.save_figure(_figure(), tmp_path / "b", "fig")
    plt.close("all")
    assert [p.name for p in first] == ["fig.png", "fig.pdf"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_figure_needs_provenance_caption(tmp_path):
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="provenance"):
        plotting.save_figure(fig, tmp_path, "bare")
    with pytest.raises(ValueError, match="empty"):
        plotting.provenance_caption(fig, "  ")
    plt.close(fig)


def test_table_and_numbers(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"editor": ["ROME", "a|b"], "acc": [0.912345, float("nan")], "n": [1, 2]})
    csv, md = plotting.save_table(df, tmp_path, "t")
    assert csv.read_text().splitlines()[0] == "editor,acc,n"
    assert md.read_text() == (
        "| editor | acc | n |\n| :--- | ---: | ---: |\n| ROME | 0.9123 | 1 |\n| a\\|b |  | 2 |\n"
    )
    path = plotting.write_numbers(tmp_path, {"b": 1, "a": 0.5})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": 1}
    with pytest.raises(KeyError, match="known"):
        plotting.editor_color("NOPE")
    assert plotting.editor_color("alphaedit") == plotting.EDITOR_COLORS["AlphaEdit"]


def test_check_pairing_catches_stale_and_executed_notebooks(tmp_path):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    assert rp.check_pairing(tmp_path) == []

    py = tmp_path / "double.py"
    py.write_text(py.read_text().replace("x: int = 1", "x: int = 2"))
    problems = rp.check_pairing(tmp_path)
    assert len(problems) == 1 and "double.ipynb is stale" in problems[0]

    path = tmp_path / "fails.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[1].execution_count = 2
    nb.metadata["papermill"] = {"parameters": {}}
    nbformat.write(nb, str(path))
    problems = " ".join(rp.check_pairing(tmp_path))
    assert "cell 2 has outputs" in problems and "papermill metadata" in problems
    assert main(["check-notebooks", "--notebooks", str(tmp_path)]) == 1

    (tmp_path / "fails.ipynb").unlink()
    assert any("no paired fails.ipynb" in p for p in rp.check_pairing(tmp_path))
