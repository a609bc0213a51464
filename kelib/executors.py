"""Where a grid's runs execute: here, one after another (``inline``), in worker processes on this
machine (``local``), each with its share of the CPU cores or one GPU of its own, or as Slurm jobs
through submitit (``slurm``, :mod:`kelib.cluster`).

An executor only *computes* runs: every run writes itself into kelib's run cache (``<cache>/runs/``,
keyed by everything it depends on, written atomically, resumable), and the caller then reads the
finished runs back in order (:func:`kelib.experiments.run_grid`). So the notebook's table is the same
whichever executor made it, and an interrupted batch resumes from the cache whatever ran it.

Why processes and not threads in one process: the default model's matrices are small (256 x 1024),
so one run gains little from a second BLAS thread, while two runs side by side keep both cores busy.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import traceback
from typing import Any, Callable, Sequence

EXECUTORS = ("inline", "local", "slurm")  # slurm: kelib.cluster (jobs through submitit)


class ExecutorError(RuntimeError):
    """A run failed in a worker process; the message carries the worker's traceback."""


def executor_choice(executor: str | dict) -> tuple[str, dict]:
    """``(name, options)`` of the ``executor`` parameter: a name (``"local"``), or a mapping with a
    ``name`` and that executor's options (``{"name": "slurm", "partition": "gpu", "wait": False}``,
    :class:`kelib.cluster.SlurmOptions`)."""
    from kelib.config import ConfigError

    options: dict = {}
    if isinstance(executor, dict):
        options = dict(executor)
        executor = options.pop("name", None)
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {list(EXECUTORS)} (or a mapping with a name among them and "
                          f"its options), got {executor!r}")
    if options and executor != "slurm":
        raise ConfigError(f"executor {executor!r} takes no options (its workers are a parameter of their own), "
                          f"got {sorted(options)}")
    return executor, options


def available_cores() -> int:
    """CPU cores this process may use: the affinity mask (not the host's count), or fewer when
    ``KELIB_CORES`` says so (``kelib reproduce`` gives each notebook it runs side by side its share)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    share = os.environ.get("KELIB_CORES", "").strip()
    if share:
        if not share.isdigit() or int(share) < 1:
            raise ValueError(f"KELIB_CORES must be a whole number of cores, 1 or more, got {share!r}")
        cores = min(cores, int(share))
    return cores


def plan_workers(workers: int, n_jobs: int, device: str) -> tuple[int, list[str | None], int]:
    """``(processes, GPU per process, torch threads per process)`` for ``n_jobs`` runs.

    ``workers = 0`` means one process per GPU on ``cuda`` (every visible one), else one per core.
    On the CPU the cores are shared out evenly; on ``cuda`` each process sees one GPU
    (``CUDA_VISIBLE_DEVICES``)."""
    if workers < 0:
        raise ValueError(f"workers must be 0 (automatic) or more, got {workers}")
    gpus: list[str | None] = [None]
    if str(device).startswith("cuda"):
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("device is cuda but no GPU is visible")
        gpus = [str(i) for i in range(count)]
        workers = workers or count
    else:
        workers = workers or available_cores()
    workers = max(1, min(workers, n_jobs))
    per_process = [gpus[i % len(gpus)] for i in range(workers)]
    threads = max(1, available_cores() // workers)
    return workers, per_process, threads


def _start_worker(slots, threads: int) -> None:
    """Pool initializer: claim a GPU (or none) and a thread budget before torch starts using them."""
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    torch.set_num_threads(threads)


def _call(work: Callable, args: tuple) -> tuple[str, Any]:
    try:
        return "ok", work(*args)
    except BaseException:  # noqa: BLE001 (sent back whole: the parent decides)
        return "error", traceback.format_exc()


def longest_first(jobs: Sequence[tuple], cost: Callable[[tuple], float] | None) -> list[int]:
    """The order to start ``jobs`` in: by decreasing ``cost`` (ties and no cost: as given).

    Longest first keeps the workers busy to the end: a long run started last would leave the
    others idle while it finishes alone."""
    if cost is None:
        return list(range(len(jobs)))
    costs = [cost(job) for job in jobs]
    return sorted(range(len(jobs)), key=lambda i: -costs[i])


def run_local(work: Callable, jobs: Sequence[tuple], workers: int = 0, device: str = "cpu",
              progress: bool = True, describe: Callable[[tuple], str] = str,
              cost: Callable[[tuple], float] | None = None) -> list[Any]:
    """``[work(*job) for job in jobs]`` in worker processes (spawned: nothing of this process's state,
    e.g. a loaded model, is inherited), results in the jobs' order. ``work`` must be a module-level
    function. Jobs start by decreasing ``cost`` (an estimate of their length; :func:`longest_first`).

    A job that raises makes this raise :class:`ExecutorError` with its traceback once every job has
    finished (the others' results are in the cache by then)."""
    from tqdm.auto import tqdm

    if not jobs:
        return []
    n, gpus, threads = plan_workers(workers, len(jobs), device)
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for gpu in gpus:
        slots.put(gpu)
    results: list[Any] = [None] * len(jobs)
    failures = []
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=context, initializer=_start_worker,
                                                initargs=(slots, threads)) as pool:
        futures = {pool.submit(_call, work, jobs[i]): i for i in longest_first(jobs, cost)}
        bar = tqdm(total=len(jobs), desc=f"runs ({n} processes)", unit="run", disable=not progress)
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            status, value = future.result()
            if status == "ok":
                results[i] = value
            else:
                failures.append(f"{describe(jobs[i])}:\n{value}")
            bar.update(1)
        bar.close()
    if failures:
        raise ExecutorError(f"{len(failures)} of {len(jobs)} run(s) failed in worker processes:\n\n"
                            + "\n\n".join(failures))
    return results
