"""Job functions for tests/test_cluster.py, importable by the jobs submitit starts (tests/ on PYTHONPATH).

``interrupting_run`` is :func:`kelib.experiments._run_in_worker` with one interruption: once the run
has saved its first checkpoint past 0 edits, the job process signals itself, at most once per marker
file (``KELIB_TEST_INTERRUPT=<signal>:<marker>``): ``USR2`` is what Slurm sends before a preemption or
time-out (submitit checkpoints and requeues the job), ``KILL`` is a death without warning.
"""

import os
import signal
from pathlib import Path


def interrupting_run(*args):
    from kelib import experiments
    from kelib.runstore import RunStore

    how, marker = os.environ["KELIB_TEST_INTERRUPT"].split(":", 1)
    save = RunStore.save

    def save_then_interrupt(self, rows, done, complete, *rest, **kwargs):
        save(self, rows, done, complete, *rest, **kwargs)
        if done >= 1 and not complete and not Path(marker).exists():
            Path(marker).write_text(f"{how} at {done} edit(s), pid {os.getpid()}\n")
            os.kill(os.getpid(), getattr(signal, f"SIG{how}"))

    RunStore.save = save_then_interrupt
    try:
        return experiments._run_in_worker(*args)
    finally:
        RunStore.save = save


def failing_run(*args):
    raise RuntimeError("this job fails on purpose")
