"""The ``slurm`` executor: a grid's runs as Slurm jobs, submitted, watched and requeued by submitit.

Each run of :func:`kelib.experiments.run_grid` becomes one job (or one task of a job array per grid,
``array: true``) that loads the same setup, computes the run into the shared run cache
(``<cache>/runs/``, claimed so that no two jobs write one run folder) and ends; the caller then reads
the finished runs back, so the table is the one ``inline`` would give. Nothing is written outside the
cache: submitit's pickles and the jobs' logs go to ``<cache>/jobs/<log_folder>/<job id>/``.

Preemption and time-outs: Slurm signals the job (``USR2``, ``signal_delay_s`` before the end); submitit
calls :meth:`RunJob.checkpoint`, which resubmits the same job, and the requeued job resumes the run
from its last checkpoint in the run folder (the runner resumes from its cache, row for row). A job
killed without that warning (``SIGKILL``, a node failure) ends without a result; it is submitted again
(``resubmit`` times) and resumes the same way. A job that raised is not retried: its error is shown
with its log's path and last lines.

With ``wait: false`` the jobs are submitted and :func:`run_jobs` returns at once: the runs not yet
finished are listed as pending, and the command to collect them is printed (``kelib collect --wait``
then the same notebook or ``kelib reproduce`` command again). A run whose job is still queued or
running is not submitted twice (``<cache>/jobs/<log_folder>/submitted/<run folder>.json``).

Options (:class:`SlurmOptions`, defaults in one place) come from the ``executor`` parameter as a
mapping: ``executor: {name: slurm, partition: gpu, gpus_per_job: 1, time_min: 240}``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kelib.config import ConfigError, from_dict
from kelib.io import read_json, write_json
from kelib.paths import cache_dir

CLUSTERS = ("slurm", "local", "debug")  # submitit's: Slurm, local subprocesses (tests, a workstation), in-process


@dataclass
class SlurmOptions:
    """How the ``slurm`` executor submits a grid's runs (the ``executor`` parameter's other keys)."""

    partition: str | None = None  # --partition; None: the cluster's default
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    gpus_per_job: int = 1  # GPUs per run (--gpus-per-node); 2+ with device_map: auto for 7B-8B models
    cpus_per_job: int = 8  # --cpus-per-task
    mem_gb: float | None = 64  # --mem; None: the partition's default
    time_min: int = 240  # --time, in minutes; a run that needs longer is requeued and resumes
    array: bool = True  # one job array per grid (submitit's executor.batch()); false: one job per run
    max_parallel: int | None = None  # array tasks running at once (--array=...%N); None: no limit
    wait: bool = True  # wait for the jobs (progress bar), then read the runs; false: return at once
    resubmit: int = 1  # times a job killed without a result (SIGKILL, node failure) is submitted again
    max_requeues: int = 3  # time-outs/preemptions a job may be requeued after (submitit's max_num_timeout)
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to finish the current step
    log_folder: str = "slurm"  # under <cache>/jobs/: submitit's pickles and the jobs' logs
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load, source venv)
    extra: dict = field(default_factory=dict)  # more sbatch options, e.g. {constraint: a100, exclude: node12}
    cluster: str = "slurm"  # submitit's cluster: slurm; local (subprocesses here, no Slurm: tests); debug
    poll_s: float = 30.0  # seconds between checks of the jobs' states while waiting

    def __post_init__(self):
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"executor slurm: cluster must be one of {list(CLUSTERS)}, got {self.cluster!r}")
        if self.gpus_per_job < 0 or self.cpus_per_job < 1 or self.time_min < 1 or self.resubmit < 0:
            raise ConfigError("executor slurm: gpus_per_job >= 0, cpus_per_job >= 1, time_min >= 1 and "
                              f"resubmit >= 0, got {self.gpus_per_job}, {self.cpus_per_job}, {self.time_min}, "
                              f"{self.resubmit}")
        parts = Path(self.log_folder).parts
        if not parts or Path(self.log_folder).is_absolute() or ".." in parts:
            raise ConfigError(f"executor slurm: log_folder is a folder inside <cache>/jobs/ (no jobs write "
                              f"outside the cache), got {self.log_folder!r}")

    @property
    def folder(self) -> Path:
        """Where submitit keeps this executor's pickles and logs: ``<cache>/jobs/<log_folder>``."""
        return cache_dir("jobs", self.log_folder)


def parse_options(options: dict | SlurmOptions | None) -> SlurmOptions:
    if isinstance(options, SlurmOptions):
        return options
    return from_dict(SlurmOptions, options, where="executor slurm")


def make_executor(options: SlurmOptions):
    """submitit's executor for ``options`` (its folder inside the cache, one subfolder per job)."""
    import submitit

    if options.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor slurm: no Slurm here (sbatch is not on PATH). Submit from a login node "
                          "of the cluster, or set cluster: local to run the jobs as subprocesses of this "
                          "machine through submitit (what the tests do)")
    executor = submitit.AutoExecutor(folder=options.folder / "%j", cluster=options.cluster,
                                     slurm_max_num_timeout=options.max_requeues,
                                     local_max_num_timeout=options.max_requeues)
    params: dict[str, Any] = {
        "name": "kelib-run", "timeout_min": options.time_min, "gpus_per_node": options.gpus_per_job,
        "cpus_per_task": options.cpus_per_job, "tasks_per_node": 1, "nodes": 1,
    }
    if options.cluster == "slurm":
        params["slurm_signal_delay_s"] = options.signal_delay_s
        if options.mem_gb is not None:
            params["mem_gb"] = options.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(options, key) is not None:
                params[f"slurm_{key}"] = getattr(options, key)
        if options.max_parallel is not None:
            params["slurm_array_parallelism"] = options.max_parallel
        if options.setup:
            params["slurm_setup"] = list(options.setup)
        if options.extra:
            params["slurm_additional_parameters"] = dict(options.extra)
    else:  # local: submitit's own signal delay (30 s)
        if options.setup:
            params["local_setup"] = list(options.setup)
    executor.update_parameters(**params)
    return executor


class RunJob:
    """One job: ``work(*args)`` (a module-level function that computes a run into the run cache).

    A submitit *checkpointable* callable: on preemption or time-out submitit calls :meth:`checkpoint`,
    which resubmits this same job; the requeued job calls ``work`` again and the runner resumes the
    run from its last checkpoint in the run folder (nothing else to save: the cache is the state)."""

    def __init__(self, work: Callable, args: tuple):
        self.work, self.args = work, tuple(args)

    def __call__(self) -> Any:
        return self.work(*self.args)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


class JobFailed(RuntimeError):
    """Jobs of a grid failed; the message names each with its log's path and last lines."""


@dataclass
class Submitted:
    """A run handed to the cluster: the job that computes it and the record that says so."""

    name: str  # the run's setting, for messages
    key: str  # the run folder's name: the record's name
    job: Any
    tries: int = 1


def _record_path(options: SlurmOptions, key: str) -> Path:
    return options.folder / "submitted" / f"{key}.json"


def _write_record(options: SlurmOptions, item: Submitted) -> None:
    write_json(_record_path(options, item.key), {
        "setting": item.name, "job_id": str(item.job.job_id), "cluster": options.cluster,
        "folder": str(options.folder), "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "tries": item.tries})


_SESSION_JOBS: dict[str, Any] = {}  # jobs submitted by this process, by id: their live state


def _job_of(record: dict):
    """submitit's job object for a recorded job (its state and logs, from its folder and id)."""
    import submitit

    if record["job_id"] in _SESSION_JOBS:
        return _SESSION_JOBS[record["job_id"]]
    folder = Path(record["folder"]) / "%j"
    if record["cluster"] == "local":
        return _RecordedLocalJob(folder, record["job_id"])
    if record["cluster"] == "debug":
        return None
    return submitit.SlurmJob(folder, record["job_id"])


def _recorded_local_job_class():
    import submitit

    class RecordedLocalJob(submitit.LocalJob):
        """A local job of another process: running while its controller process (id = job id) lives."""

        def done(self, force_check: bool = False) -> bool:
            if self.paths.result_pickle.exists():
                return True
            try:
                os.kill(int(self.job_id), 0)
                stat = Path(f"/proc/{self.job_id}/stat")
                return stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z"
            except (OSError, ValueError):
                return True

    return RecordedLocalJob


def _RecordedLocalJob(folder, job_id):  # noqa: N802 (a class, built when submitit is first needed)
    return _recorded_local_job_class()(folder, job_id)


def still_active(job) -> bool:
    """Whether ``job`` is queued or running (asks Slurm, through submitit, for a Slurm job)."""
    if job is None:
        return False
    try:
        return not job.done(force_check=True)
    except Exception:  # noqa: BLE001 (sacct unreachable: treat as ended; the run cache decides)
        return False


def log_tail(job, lines: int = 30) -> str:
    """The last ``lines`` of a job's stderr (else its stdout), with the paths of both."""
    paths = job.paths
    text = ""
    for path in (paths.stderr, paths.stdout):
        if path.exists():
            text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if text.strip():
                break
    return f"log: {paths.stderr}\n(stdout: {paths.stdout})\n---- last lines ----\n{text}"


def pending_note(n: int, options: SlurmOptions) -> str:
    """What to do about ``n`` runs left queued or running by ``wait: false``."""
    return (f"{n} run(s) are queued or running and are left out of this table. Collect them with "
            f"`{collect_command(options)}` (waits for the jobs, shows failures with their logs), then run this "
            "notebook (or the same kelib reproduce command, with --force) again: the finished runs are read from "
            "the cache and runs still queued are not submitted twice.")


def run_jobs(work: Callable, jobs: Sequence[tuple], keys: Sequence[str], names: Sequence[str],
             options: SlurmOptions, progress: bool = True) -> dict[str, str]:
    """Compute ``work(*job)`` for each job as cluster jobs; ``keys`` are the run folders' names (a run
    whose recorded job is still queued or running is not submitted again), ``names`` their settings.

    Returns ``{key: outcome}``: the job's return value (``"done"``, ``"not run: <why>"``) for the jobs
    that finished, ``"pending: <message>"`` for those still queued or running (``wait: false``).
    Raises :class:`JobFailed` when a job raised, or was killed more than ``resubmit`` times."""
    if not jobs:
        return {}
    executor = make_executor(options)
    items: list[Submitted] = []
    new: list[tuple[int, tuple]] = []
    for i, (job, key, name) in enumerate(zip(jobs, keys, names)):
        record = _record_path(options, key)
        if record.exists():
            old = read_json(record)
            previous = _job_of(old)
            if old.get("cluster") == options.cluster and still_active(previous):
                print(f"{name}: job {old['job_id']} (submitted {old['submitted']}) is still queued or running; "
                      "not submitted again")
                items.append(Submitted(name, key, previous, int(old.get("tries", 1))))
                continue
        items.append(Submitted(name, key, None))
        new.append((i, job))
    _submit(executor, options, work, [(items[i], job) for i, job in new])
    if new:
        print(f"{len(new)} job(s) submitted ({options.cluster}); logs under {options.folder}")
    if not options.wait:
        return {item.key: f"pending: {_pending_message(item, options)}" for item in items}
    return _wait(executor, options, work, items, {item.key: job for item, job in zip(items, jobs)}, progress)


def _submit(executor, options: SlurmOptions, work: Callable, pairs: list[tuple[Submitted, tuple]]) -> None:
    if not pairs:
        return
    if options.array and len(pairs) > 1:
        with executor.batch():
            submitted = [executor.submit(RunJob(work, job)) for _, job in pairs]
    else:
        submitted = [executor.submit(RunJob(work, job)) for _, job in pairs]
    for (item, _), job in zip(pairs, submitted):
        item.job = job
        _SESSION_JOBS[str(job.job_id)] = job
        _write_record(options, item)


def _pending_message(item: Submitted, options: SlurmOptions) -> str:
    return (f"queued as job {item.job.job_id} ({options.cluster}), log {item.job.paths.stderr}; "
            f"collect with `{collect_command(options)}`, then run the same notebook or command again")


def collect_command(options: SlurmOptions) -> str:
    return "kelib collect --wait" + (f" --log-folder {options.log_folder}" if options.log_folder != "slurm" else "")


def _wait(executor, options: SlurmOptions, work: Callable, items: list[Submitted], args: dict[str, tuple],
          progress: bool) -> dict[str, str]:
    """Poll the jobs until each has ended: a progress bar over jobs; a job killed without a result is
    submitted again (``resubmit`` times); the outcomes, or :class:`JobFailed` naming every failure."""
    from submitit.core.utils import FailedJobError, UncompletedJobError
    from tqdm.auto import tqdm

    outcomes: dict[str, str] = {}
    failures: list[str] = []
    waiting = list(items)
    bar = tqdm(total=len(items), desc=f"jobs ({options.cluster})", unit="job", disable=not progress)
    while waiting:
        still = []
        for item in waiting:
            if still_active(item.job):
                still.append(item)
                continue
            item.job._results_timeout_s = min(getattr(item.job, "_results_timeout_s", 15), 15)
            try:
                outcomes[item.key] = item.job.result()
                bar.update(1)
            except FailedJobError as err:  # the job raised: shown with its log, not retried
                failures.append(f"{item.name}: job {item.job.job_id} failed: {_last_line(err)}\n"
                                f"{log_tail(item.job)}")
                bar.update(1)
            except UncompletedJobError:  # killed with no result: SIGKILL, OOM, node failure
                if item.tries <= options.resubmit:
                    print(f"{item.name}: job {item.job.job_id} ended without a result (state {item.job.state}); "
                          f"submitting it again ({item.tries} of {options.resubmit}); it resumes from the "
                          "run's last checkpoint")
                    item.tries += 1
                    _submit(executor, dataclasses.replace(options, array=False), work, [(item, args[item.key])])
                    still.append(item)
                else:
                    failures.append(f"{item.name}: job {item.job.job_id} ended without a result "
                                    f"({item.tries} tries)\n{log_tail(item.job)}")
                    bar.update(1)
            except Exception as err:  # noqa: BLE001 (the debug cluster raises the job's own error)
                failures.append(f"{item.name}: job {item.job.job_id} failed: {_last_line(err)}\n"
                                f"{log_tail(item.job)}")
                bar.update(1)
        waiting = still
        if waiting:
            time.sleep(options.poll_s)
    bar.close()
    if failures:
        raise JobFailed(f"{len(failures)} of {len(items)} job(s) failed:\n\n" + "\n\n".join(failures))
    return outcomes


def _last_line(err: BaseException) -> str:
    """The error's own line (``RuntimeError: ...``) out of submitit's message with the job's traceback."""
    lines = [line for line in str(err).splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    errors = [line for line in lines if not line.startswith(" ") and ("Error" in line or "Exception" in line)]
    return (errors or lines or [type(err).__name__])[-1].strip()


def recorded_jobs(log_folder: str = "slurm") -> list[dict]:
    """Every job recorded under ``<cache>/jobs/<log_folder>/submitted/``, with its current state."""
    folder = cache_dir("jobs", log_folder) / "submitted"
    out = []
    for path in sorted(folder.glob("*.json")):
        record = read_json(path)
        job = _job_of(record)
        record["run"] = path.stem
        record["active"] = still_active(job)
        record["state"] = "queued or running" if record["active"] else _ended_state(job)
        record["log"] = str(job.paths.stderr) if job is not None else ""
        out.append(record)
    return out


def _ended_state(job) -> str:
    if job is None:
        return "ended"
    if job.paths.result_pickle.exists():
        from submitit.core.utils import pickle_load

        outcome, value = pickle_load(job.paths.result_pickle)
        if outcome != "success":
            return "failed"
        return value if isinstance(value, str) and value.startswith("not run") else "done"
    return "ended without a result"

