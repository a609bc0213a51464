"""Run one editing run of tests/test_resume.py in a fresh process, optionally killing it with SIGKILL.

    python tests/resume_worker.py VARIANT OUT_DIR [--kill-at N]

``--kill-at N``: the process sends itself SIGKILL right after the checkpoint at N edits is on disk,
as a power cut or an out-of-memory kill would: no exception handler, no ``finally`` runs.
A fresh process matters: nothing cached in memory by an earlier run (templates, statistics,
random-number states) can stand in for what the run folder failed to save.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from resume_variants import run_variant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant")
    parser.add_argument("out_dir")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()

    if args.kill_at is not None:
        from kelib.runstore import RunStore

        save = RunStore.save

        def save_then_die(self, rows, done, complete, **kwargs):
            save(self, rows, done, complete, **kwargs)
            if done == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        RunStore.save = save_then_die
    run_variant(args.variant, args.out_dir)


if __name__ == "__main__":
    main()
