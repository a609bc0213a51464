"""The slurm executor (kelib.cluster) through submitit's LocalExecutor: jobs are subprocesses of this
machine, no Slurm needed. Its table equals inline's; a preempted or killed job resumes its run."""

import os
import re
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kelib import cluster, experiments
from kelib.cluster import JobFailed, SlurmOptions
from kelib.config import ConfigError
from test_executors import fresh_cache

TESTS = Path(__file__).parent
RUNS = [{"editor": "ROME", "batch_size": 1}, {"editor": "MEMIT", "batch_size": 1, "regularizer": "RECT"}]
LOCAL = {"name": "slurm", "cluster": "local", "gpus_per_job": 0, "poll_s": 0.5, "time_min": 30}
COLUMNS = ["editor", "regularizer", "checkpoint", "scope", "layer", "metric"]


@pytest.fixture
def one_thread(monkeypatch):
    """Jobs and this process on one thread each: the tables are then equal to the last bit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_setup():
    """The micro model with a small abilities evaluator (its evaluation dominates a run's time)."""
    return experiments.load_setup("kelib-micro", n_facts=12, n_skill=12)


def in_process_jobs(setup, monkeypatch):
    """Jobs that run in this process (submitit's debug cluster) use ``setup`` instead of loading it
    again, and every run is quicker without its abilities evaluator (edit metrics only)."""
    from kelib.io import stable_hash

    setup.evaluators = {}
    monkeypatch.setitem(experiments._WORKER_SETUPS, stable_hash(setup.load_args), setup)


def table(grid):
    return grid.drop(columns="run_dir").sort_values(COLUMNS).reset_index(drop=True)


def inline_table(tmp_path, kelib_cache, monkeypatch, setup, runs, **grid):
    fresh_cache(tmp_path, "inline", kelib_cache, monkeypatch)
    return table(experiments.run_grid(setup, runs, progress=False, **grid))


def test_options_are_checked_and_reach_the_sbatch_script(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    with pytest.raises(ConfigError, match="unknown key"):
        cluster.parse_options({"partitio": "gpu"})
    with pytest.raises(ConfigError, match="inside <cache>/jobs"):
        cluster.parse_options({"log_folder": "../elsewhere"})
    with pytest.raises(ConfigError, match="executor must be one of"):
        experiments.run_grid(None, [], n_edits=1, executor={"name": "slurmm"})
    with pytest.raises(ConfigError, match="takes no options"):
        experiments.run_grid(None, [], n_edits=1, executor={"name": "local", "partition": "gpu"})
    options = cluster.parse_options({"partition": "gpu", "account": "lab", "gpus_per_job": 2, "time_min": 90,
                                     "mem_gb": 80, "max_parallel": 4, "extra": {"constraint": "a100"},
                                     "setup": ["module load cuda"]})
    assert options.folder.is_relative_to(Path(os.environ["KELIB_CACHE"]))
    # the parameters make_executor hands submitit's Slurm executor, written as sbatch's script
    script = _make_sbatch_string(command="python -m job", folder=tmp_path / "%j", job_name="kelib-run",
                                 partition="gpu", account="lab", gpus_per_node=2, time=90, mem="80GB",
                                 additional_parameters={"constraint": "a100"}, setup=["module load cuda"],
                                 array_parallelism=4, signal_delay_s=120)
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=2", "--time=90", "--mem=80GB",
                 "--constraint=a100", "module load cuda", "--signal=USR2@120"):
        assert line in script


def test_make_executor_maps_the_options_onto_submitit(monkeypatch):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="sbatch is not on PATH"):
        cluster.make_executor(SlurmOptions())
    monkeypatch.setattr(cluster.shutil, "which", lambda name: "/usr/bin/sbatch")
    options = SlurmOptions(partition="gpu", account="lab", gpus_per_job=2, time_min=90, mem_gb=80,
                           max_parallel=4, extra={"constraint": "a100"}, setup=["module load cuda"])
    params = cluster.make_executor(options)._executor.parameters
    assert {k: params[k] for k in ("partition", "account", "gpus_per_node", "time", "mem", "array_parallelism",
                                   "additional_parameters", "setup", "signal_delay_s")} == {
        "partition": "gpu", "account": "lab", "gpus_per_node": 2, "time": 90, "mem": "80GB",
        "array_parallelism": 4, "additional_parameters": {"constraint": "a100"}, "setup": ["module load cuda"],
        "signal_delay_s": 120}


def test_a_grid_of_in_process_jobs_reads_back_as_the_inline_grid(micro_dir, kelib_cache, tmp_path, monkeypatch,
                                                                   one_thread):
    """The submit, wait and read-back path with submitit's debug cluster (jobs run in this process):
    the table equals inline's; jobs are recorded inside the cache."""
    setup = small_setup()
    grid = dict(n_edits=2, checkpoints=[1])
    root = fresh_cache(tmp_path, "jobs", kelib_cache, monkeypatch)
    in_process_jobs(setup, monkeypatch)
    by_jobs = experiments.run_grid(setup, RUNS[:1], executor={**LOCAL, "cluster": "debug"}, progress=False, **grid)
    assert len(list((root / "jobs" / "slurm" / "submitted").glob("*.json"))) == 1 and len(by_jobs) > 0
    pd.testing.assert_frame_equal(table(by_jobs), inline_table(tmp_path, kelib_cache, monkeypatch, setup, RUNS[:1],
                                                               **grid))


def test_the_checkpoint_hook_resubmits_the_job_and_it_resumes_the_run(micro_dir, kelib_cache, tmp_path,
                                                                      monkeypatch, one_thread):
    """What submitit does on preemption, called by hand: the job stops after its first checkpoint,
    ``checkpoint()`` gives the submission that requeues it (the same job), and running that resumes
    the run from its folder: the uninterrupted table, with the edits before the checkpoint not redone."""
    from submitit.helpers import DelayedSubmission

    from kelib.runstore import RunStore

    setup = small_setup()
    runs, grid = RUNS[:1], dict(n_edits=3, checkpoints=[1])
    fresh_cache(tmp_path, "jobs", kelib_cache, monkeypatch)
    in_process_jobs(setup, monkeypatch)
    job = cluster.RunJob(experiments._run_in_worker, (setup.load_args, runs[0], 3, [1], None, 100, 0))
    save, saved = RunStore.save, []

    class Preempted(BaseException):
        pass

    def save_then_preempt(self, rows, done, complete, *rest, **kwargs):
        save(self, rows, done, complete, *rest, **kwargs)
        saved.append(done)
        if done == 1 and saved.count(1) == 1:
            raise Preempted

    monkeypatch.setattr(RunStore, "save", save_then_preempt)
    with pytest.raises(Preempted):
        job()
    requeued = job.checkpoint()
    assert isinstance(requeued, DelayedSubmission) and requeued.function is job
    assert requeued.result() == "done"
    assert saved == [0, 1, 3]  # resumed after edit 1: no checkpoint written twice
    monkeypatch.setattr(RunStore, "save", save)
    folder, complete = experiments.run_folder(setup, runs[0], **grid)
    assert complete
    fresh = experiments.run_grid(setup, runs, progress=False, **grid)  # read back from the jobs' cache
    assert set(fresh.run_dir) == {str(folder)}
    pd.testing.assert_frame_equal(table(fresh), inline_table(tmp_path, kelib_cache, monkeypatch, setup, runs, **grid))


@pytest.mark.slow  # about a minute on 2 cores: two job processes, each loads the setup
def test_a_grid_of_local_jobs_reads_back_as_the_inline_grid(micro_dir, kelib_cache, tmp_path, monkeypatch,
                                                              one_thread):
    """Two runs as a job array of two subprocesses: this process computes nothing and reads back the
    table inline computes, to the last bit; a second call finds both runs done and submits nothing."""
    from kelib.runner import EditRun

    setup = small_setup()
    grid = dict(n_edits=3, checkpoints=[1])
    root = fresh_cache(tmp_path, "jobs", kelib_cache, monkeypatch)

    def must_not_run(self):
        raise AssertionError("the parent process computed a run")

    with monkeypatch.context() as patch:
        patch.setattr(EditRun, "_sequential", must_not_run)
        by_jobs = experiments.run_grid(setup, RUNS, executor=LOCAL, progress=False, **grid)
        submitted = sorted((root / "jobs" / "slurm" / "submitted").glob("*.json"))
        assert len(submitted) == 2
        again = experiments.run_grid(setup, RUNS, executor=LOCAL, progress=False, **grid)
        assert sorted((root / "jobs" / "slurm" / "submitted").glob("*.json")) == submitted
    assert set(by_jobs.editor) == {"ROME", "MEMIT"} and not by_jobs.attrs["not_run"]
    pd.testing.assert_frame_equal(table(again), table(by_jobs))
    assert all(Path(d).is_relative_to(root) for d in by_jobs.run_dir)
    pd.testing.assert_frame_equal(table(by_jobs), inline_table(tmp_path, kelib_cache, monkeypatch, setup, RUNS,
                                                               **grid))


@pytest.mark.slow  # about a minute on 2 cores: two job processes, each loads the setup
@pytest.mark.parametrize("how", ["USR2", "KILL"])
def test_an_interrupted_job_resumes_its_run_and_gives_the_uninterrupted_table(how, micro_dir, kelib_cache, tmp_path,
                                                                               monkeypatch, one_thread, capsys):
    """USR2 (Slurm's warning before a preemption or time-out): submitit checkpoints the job and requeues
    it. KILL (no warning): the job ends without a result and is submitted again. Either way the run
    resumes from its saved checkpoint (1 of 3 edits) and the table is the uninterrupted one."""
    import cluster_jobs

    setup = small_setup()
    runs, grid = RUNS[:1], dict(n_edits=3, checkpoints=[1])
    fresh_cache(tmp_path, "jobs", kelib_cache, monkeypatch)
    marker = tmp_path / "interrupted"
    monkeypatch.setenv("KELIB_TEST_INTERRUPT", f"{how}:{marker}")
    monkeypatch.setattr(experiments, "_run_in_worker", cluster_jobs.interrupting_run)
    resumed = experiments.run_grid(setup, runs, executor=LOCAL, progress=False, **grid)
    assert marker.read_text().startswith(f"{how} at 1 edit(s)")
    out = capsys.readouterr().out
    assert ("submitting it again" in out) == (how == "KILL")
    logs = "".join(p.read_text() for p in (tmp_path / "jobs" / "jobs" / "slurm").glob("*/*_log.*"))
    if how == "USR2":  # submitit's own handler checkpointed and requeued the job
        assert "this job is preempted" in logs and "Requeued job" in logs
    run_dir = Path(resumed.run_dir.iloc[0])
    assert len(resumed) > 0
    monkeypatch.undo()
    pd.testing.assert_frame_equal(table(resumed), inline_table(tmp_path, kelib_cache, monkeypatch, setup, runs,
                                                               **grid))
    assert run_dir.exists()


def test_a_failed_job_is_shown_with_its_log_and_not_retried(micro_dir, kelib_cache, tmp_path, monkeypatch,
                                                             one_thread, capsys):
    import cluster_jobs

    setup = small_setup()
    fresh_cache(tmp_path, "jobs", kelib_cache, monkeypatch)
    monkeypatch.setattr(experiments, "_run_in_worker", cluster_jobs.failing_run)
    with pytest.raises(JobFailed, match=r"(?s)1 of 1 job\(s\) failed.*ROME: job \d+ failed.*"
                                        r"this job fails on purpose.*log: .*/jobs/slurm/\d+/\d+_0_log\.err"):
        experiments.run_grid(setup, RUNS[:1], n_edits=2, executor=LOCAL, progress=False)
    assert len(list((tmp_path / "jobs" / "jobs" / "slurm").glob("[0-9]*"))) == 1  # not submitted again
    from kelib.cli import main

    assert main(["collect"]) == 1  # kelib collect lists it, failed, with its log
    assert re.search(r"ROME: job \d+ \(local, submitted .*\): failed  log: .*_log\.err", capsys.readouterr().out)


@pytest.mark.slow  # a job process
def test_without_waiting_the_grid_returns_at_once_with_its_runs_pending(micro_dir, kelib_cache, tmp_path,
                                                                       monkeypatch, one_thread, capsys):
    """wait: false returns before the job has run: the run is pending, with the command that collects
    it; a second call does not submit it again while it runs; once it has finished, it is read back."""
    setup = small_setup()
    root = fresh_cache(tmp_path, "jobs", kelib_cache, monkeypatch)
    options = {**LOCAL, "wait": False}
    start = time.monotonic()
    grid = experiments.run_grid(setup, RUNS[:1], n_edits=2, executor=options, progress=False)
    assert time.monotonic() - start < 5 and grid.empty
    (pending,) = grid.attrs["pending"]
    assert pending["editor"] == "ROME" and "kelib collect --wait" in pending["reason"]
    assert "kelib collect --wait" in capsys.readouterr().out
    monkeypatch.setattr(cluster, "_SESSION_JOBS", {})  # as from another session: the job known by its record
    experiments.run_grid(setup, RUNS[:1], n_edits=2, executor=options, progress=False)
    assert "still queued or running; not submitted again" in capsys.readouterr().out
    (record,) = cluster.recorded_jobs()
    deadline = time.monotonic() + 300
    while cluster.recorded_jobs()[0]["active"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.recorded_jobs()[0]["state"] == "done"
    done = experiments.run_grid(setup, RUNS[:1], n_edits=2, executor=options, progress=False)
    assert set(done.editor) == {"ROME"} and not done.attrs["pending"]
    assert len(list((root / "jobs" / "slurm").glob("[0-9]*"))) == 1  # one job, submitted once


def test_a_claimed_run_folder_makes_a_second_process_wait_then_read_the_run(micro, kelib_cache, tmp_path,
                                                                            monkeypatch):
    """While one process holds a run folder's claim, another that needs the run waits (computes
    nothing, writes nothing); once the claim is released it computes (or reads) the run."""
    from kelib.io import file_lock

    setup = small_setup()
    setup.evaluators = {}
    fresh_cache(tmp_path, "claim", kelib_cache, monkeypatch)
    grid = dict(n_edits=2, checkpoints=[1])
    folder, complete = experiments.run_folder(setup, RUNS[0], **grid)
    assert not complete
    result = {}
    with file_lock(experiments.claim_path(folder)):
        second = threading.Thread(target=lambda: result.update(
            grid=experiments.run_grid(setup, RUNS[:1], progress=False, **grid)))
        second.start()
        second.join(timeout=3)
        assert second.is_alive() and not folder.exists()  # waiting on the claim, nothing written
    second.join(timeout=120)
    assert not second.is_alive() and experiments.run_folder(setup, RUNS[0], **grid) == (folder, True)
    assert set(result["grid"].run_dir) == {str(folder)}


def test_kelib_stats_finds_the_statistics_every_editor_reads(micro_stats, micro, kelib_cache, tmp_path, capsys,
                                                             monkeypatch):
    """``kelib stats`` (here, and in a job) names the files the editors' statistics come from; with
    them cached it computes nothing."""
    from kelib import stats
    from kelib.cli import main
    from kelib.editors import load_hparams

    model, _, _ = micro
    layers = load_hparams("MEMIT", "kelib-micro").layers
    micro_stats.prefetch(layers)  # what an editor's run computes
    fresh_cache(tmp_path, "stats", kelib_cache, monkeypatch)  # its statistics and models, no jobs record
    monkeypatch.setattr(stats, "_compute", lambda *a, **k: pytest.fail("computed statistics already cached"))
    expected = [f"layer {layer}: {stats.stats_path(model, layer, micro_stats.spec)}" for layer in layers]
    assert main(["stats", "kelib-micro"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert main(["stats", "kelib-micro", "--layers", str(layers[0]), "--executor", "slurm",
                 "--executor-option", "cluster=debug", "--executor-option", "log_folder=stats-test"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == expected[0]
    assert main(["stats", "kelib-micro", "--editor", "GRACE"]) == 2
    assert "uses no key statistics" in capsys.readouterr().err


def test_executor_options_on_the_command_line(capsys):
    from kelib.cli import _executor_value, _parser, main

    args = _parser().parse_args(["reproduce", "--executor", "slurm", "--executor-option", "partition=gpu",
                                 "--executor-option", "wait=false", "--executor-option", "time_min=600"])
    assert _executor_value(args) == {"name": "slurm", "partition": "gpu", "wait": False, "time_min": 600}
    assert _executor_value(_parser().parse_args(["reproduce", "--executor", "local"])) == "local"
    assert _executor_value(_parser().parse_args(["reproduce"])) is None
    assert main(["reproduce", "--executor-option", "partition=gpu"]) == 2
    assert "is for --executor slurm" in capsys.readouterr().err
