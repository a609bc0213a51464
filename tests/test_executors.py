"""Executors: runs computed in worker processes land in the run cache and read back as inline runs do."""

import os

import pandas as pd
import pytest

from kelib import executors, experiments
from kelib.config import ConfigError
from kelib.executors import ExecutorError, plan_workers, run_local


def pid_and(value):
    if value == "fail":
        raise RuntimeError("this job fails on purpose")
    return os.getpid(), value


def test_workers_share_the_cores_and_never_outnumber_the_jobs(monkeypatch):
    monkeypatch.setattr(executors, "available_cores", lambda: 8)
    assert plan_workers(0, 20, "cpu") == (8, [None] * 8, 1)
    assert plan_workers(2, 20, "cpu") == (2, [None, None], 4)
    assert plan_workers(0, 3, "cpu") == (3, [None] * 3, 2)
    with pytest.raises(ValueError, match="workers"):
        plan_workers(-1, 3, "cpu")


def test_kelib_cores_caps_the_cores_workers_are_planned_for(monkeypatch):
    """kelib reproduce gives each notebook it runs side by side its share of the cores: its runs get
    that many workers, not one per core of the machine."""
    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("KELIB_CORES", "2")
    assert executors.available_cores() == 2
    assert plan_workers(0, 20, "cpu") == (2, [None, None], 1)
    monkeypatch.setenv("KELIB_CORES", "16")  # a share above the affinity mask: the mask
    assert executors.available_cores() == 8
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("KELIB_CORES", bad)
        with pytest.raises(ValueError, match="KELIB_CORES"):
            executors.available_cores()


def test_local_jobs_run_in_other_processes_in_order_and_failures_carry_their_traceback():
    results = run_local(pid_and, [("a",), ("b",), ("c",)], workers=2, progress=False)
    assert [value for _, value in results] == ["a", "b", "c"]
    pids = {pid for pid, _ in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    with pytest.raises(ExecutorError, match=r"(?s)1 of 2 run\(s\) failed.*RuntimeError: this job fails on purpose"):
        run_local(pid_and, [("ok",), ("fail",)], workers=2, progress=False)


def started_at(value):
    import time

    return time.monotonic(), value  # CLOCK_MONOTONIC: one clock for every process of the machine


def fresh_cache(tmp_path, name, kelib_cache, monkeypatch):
    """An empty run cache beside the session's built models and statistics."""
    root = tmp_path / name
    root.mkdir()
    for shared in ("models", "stats"):
        (kelib_cache / shared).mkdir(exist_ok=True)
        (root / shared).symlink_to(kelib_cache / shared)
    monkeypatch.setenv("KELIB_CACHE", str(root))
    return root


def test_a_grid_computed_by_workers_reads_back_as_the_inline_grid(micro_dir, kelib_cache, tmp_path, monkeypatch):
    """Two runs on the micro model by two worker processes: this process computes nothing (its
    runner is disabled) and reads back the table an inline grid computes from scratch."""
    from kelib.runner import EditRun

    runs = [{"editor": "ROME", "batch_size": 1}, {"editor": "MEMIT", "batch_size": 1, "regularizer": "RECT"}]
    fresh_cache(tmp_path, "local", kelib_cache, monkeypatch)
    setup = experiments.load_setup("kelib-micro")

    def must_not_run(self):
        raise AssertionError("the parent process computed a run")

    with monkeypatch.context() as patch:
        patch.setattr(EditRun, "_sequential", must_not_run)
        by_workers = experiments.run_grid(setup, runs, n_edits=3, checkpoints=[1], executor="local", workers=2,
                                          progress=False)
    fresh_cache(tmp_path, "inline", kelib_cache, monkeypatch)
    inline = experiments.run_grid(setup, runs, n_edits=3, checkpoints=[1], progress=False)
    columns = ["editor", "regularizer", "checkpoint", "scope", "layer", "metric"]
    a = by_workers.drop(columns="run_dir").sort_values(columns).reset_index(drop=True)
    b = inline.drop(columns="run_dir").sort_values(columns).reset_index(drop=True)
    assert len(a) == len(b) > 0 and set(a.editor) == {"ROME", "MEMIT"}
    # the workers ran with one thread each, this process with all: float rounding differs (measured up
    # to 1.6e-3 relative, 5e-5 absolute, after 3 edits), never the rows
    pd.testing.assert_frame_equal(a, b, rtol=5e-3, atol=1e-4)


def test_unknown_executor_and_a_hand_made_setup_are_clear_errors(micro):
    model, tok, cases = micro
    setup = experiments.Setup("kelib-micro", model, tok, cases, {})
    with pytest.raises(ConfigError, match="executor must be one of"):
        experiments.run_grid(setup, [{"editor": "ROME"}], n_edits=1, executor="slurmm")
    with pytest.raises(ConfigError, match="needs a setup made by load_setup"):
        experiments.run_grid(setup, [{"editor": "ROME"}], n_edits=1, executor="local")


def test_jobs_start_longest_first_and_results_keep_the_given_order():
    from kelib.executors import longest_first

    jobs = [("short",), ("long",), ("middle",), ("long too",)]
    cost = {"short": 1, "long": 10, "middle": 5, "long too": 10}
    assert longest_first(jobs, lambda job: cost[job[0]]) == [1, 3, 2, 0]
    assert longest_first(jobs, None) == [0, 1, 2, 3]
    # one worker runs them one at a time in that order; the results still come back in the jobs' order
    results = run_local(started_at, jobs, workers=1, progress=False, cost=lambda job: cost[job[0]])
    assert [value for _, value in results] == ["short", "long", "middle", "long too"]
    started = sorted(results)
    assert [value for _, value in started] == ["long", "long too", "middle", "short"]


def test_a_runs_estimated_length_orders_the_papers_runs_sensibly():
    from kelib.experiments import estimated_seconds

    def length(editor, regularizer="none", n=1000, **params):
        return estimated_seconds({"editor": editor, "regularizer": regularizer, "regularizer_params": params},
                                 n, [100, 500])

    assert length("PMET") > length("MEMIT", "D4S") > length("MEMIT") > length("ROME") > length("MEND")
    assert length("ROME", n=100) < length("ROME", n=1000)
    assert length("SomeNewEditor") >= length("KN")  # unknown editors are not started last
    # post-hoc PRUNE evaluates the unregularized run's chain (kelib.chains): it starts after the runs that edit
    assert length("MEMIT", "PRUNE") < length("MEND") and length("MEMIT", "PRUNE", mode="post_hoc") < length("MEND")
    assert length("MEMIT", "PRUNE", mode="per_step") == length("MEMIT")
    assert length("MEMIT", "RECT", k=0.2) == length("MEMIT")
