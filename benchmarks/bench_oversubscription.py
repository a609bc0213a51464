"""Throughput of single-threaded editing processes on this machine's cores: 1, one per core, and two
per core (what two notebooks side by side with a worker per core each made of a 2-core machine).

    python benchmarks/bench_oversubscription.py            # MEMIT, 80 sequential edits per process

Each process loads the default model and its C0 (not timed), then times its edits; the figure that
matters is the work done per second by all of them together, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(editor: str, n: int) -> None:
    import torch

    torch.set_num_threads(1)
    from kelib.experiments import editor_hparams, load_setup
    from kelib.runner import EditRun, RunSpec
    from kelib.stats import statistics_for

    setup = load_setup("kelib-default")
    hparams = editor_hparams(setup, editor)
    stats = statistics_for(setup.model, setup.tok, hparams, progress=False)
    stats.prefetch(hparams.layers)
    spec = RunSpec(editor=editor, protocol="sequential", n_edits=n, batch_size=1, checkpoints=[0], max_eval_cases=10)
    run = EditRun(setup.model, setup.tok, setup.cases[:n], spec, hparams, stats, evaluators={}, progress=False)
    start = time.perf_counter()
    run.run()
    print(f"{time.perf_counter() - start:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", default="MEMIT")
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.editor, args.n)

    from editing_speed import machine
    from kelib.executors import available_cores

    cores = available_cores()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"kelib-default on cpu: {machine('cpu')}; {args.editor}, {args.n} sequential edits per process, "
          f"1 thread each, {cores} core(s)")
    print(f"{'processes':>9s} {'s per process':>14s} {'edits/s, all':>13s}")
    base = None
    for k in sorted({1, cores, 2 * cores}):
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--editor", args.editor, "--n", str(args.n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                 for _ in range(k)]
        seconds = [float(p.communicate()[0].split()[-1]) for p in procs]
        rate = sum(args.n / s for s in seconds)
        base = base or rate
        print(f"{k:9d} {sum(seconds) / k:14.1f} {rate:13.2f}  ({rate / base:.2f}x one process)")


if __name__ == "__main__":
    main()
