"""Regularizers on the embedded default after many sequential edits: do they keep edits and abilities?

    python benchmarks/bench_regularizers.py                          # ROME and MEMIT x {none, RECT, PRUNE, D4S}, 500 edits
    python benchmarks/bench_regularizers.py --editors ROME --n 1000

Runs go through :func:`kelib.experiments.run_grid`, so they are cached and resumable (an interrupted
benchmark picks up where it stopped) and shared with notebooks that ask for the same runs. Prints, per
run at the last checkpoint: efficacy, paraphrase and specificity of every edit on the final model,
each skill and the recall of unedited facts, the L1 norm and condition number of the last edited
layer, and the share of editing performance a regularizer keeps relative to its editor alone.
About 0.6 s per ROME edit and 0.4 s per MEMIT edit on 2 cores, plus the checkpoints (39 minutes for
the default grid of seven runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from kelib import experiments  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="sequential edits per run")
    parser.add_argument("--editors", nargs="+", default=["ROME", "MEMIT"])
    parser.add_argument("--regularizers", nargs="+", default=["none", "RECT", "PRUNE", "D4S"])
    args = parser.parse_args()

    setup = experiments.load_setup("kelib-default")
    runs = [{"editor": e, "regularizer": r} for e in args.editors for r in args.regularizers if experiments.supports(e, r)]
    checkpoints = list(range(0, args.n, max(args.n // 5, 1)))
    start = time.perf_counter()
    grid = experiments.run_grid(setup, runs, n_edits=args.n, checkpoints=checkpoints)
    table = experiments.summary(grid)
    edit_cols = ["efficacy", "paraphrase", "specificity"]
    table["edit_mean"] = table[edit_cols].mean(axis=1)
    kept = experiments.fraction_kept(table, ["edit_mean"]).set_index(["editor", "regularizer"])
    table = table.set_index(["editor", "regularizer"]).join(kept).drop(columns=["protocol", "batch_size"])
    before = experiments.baseline(grid)
    pd.set_option("display.width", 200)
    print(f"\n{args.n} sequential edits on kelib-default ({time.perf_counter() - start:.0f} s, cached runs included)")
    print("unedited:", ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
