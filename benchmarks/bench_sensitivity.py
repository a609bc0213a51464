"""How far 1,000 sequential edits move when C0 moves by float32 rounding.

Two batches of `make reproduce` differed in one C0 file by at most 4.8e-7 and MEMIT's κ growth
after 1,000 edits went from x9.8 to x5.6, with each run deterministic (README, "fragile"). The
bootstrap intervals of the notebooks resample cases and examples of *one* run; they say nothing
about this. Here the same run is repeated with every C0 it reads multiplied entrywise by
1 + ε·(R + Rᵀ)/2, R uniform in [-1, 1] (a symmetric perturbation of float32 rounding's size, ε = 1e-6
by default; seed 0 is the C0 as computed), and the figures the notebooks report are printed per
seed with their spread:

    python benchmarks/bench_sensitivity.py                                  # MEMIT, 4 seeds
    python benchmarks/bench_sensitivity.py --runs MEMIT MEMIT+D4S --seeds 3

Runs are not written to the run cache (their C0 is not the cached one); the unedited model's
abilities are read from the evaluation cache like any run's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editing_speed import machine  # noqa: E402


class PerturbedStatistics:
    """A :class:`kelib.stats.KeyStatistics` whose matrices are perturbed, the same way at every read."""

    def __init__(self, stats, epsilon: float, seed: int, stream: int = 0):
        self.stats, self.epsilon, self.seed, self.stream = stats, epsilon, seed, stream
        self._cache: dict[int, torch.Tensor] = {}
        self._siblings: dict[str, PerturbedStatistics] = {}

    def prefetch(self, layers) -> None:
        self.stats.prefetch(layers)

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self._cache:
            c0 = self.stats[layer]
            if self.seed == 0:
                self._cache[layer] = c0
            else:
                generator = torch.Generator().manual_seed(1000 * self.seed + 100 * self.stream + layer)
                noise = 2 * torch.rand(c0.shape, generator=generator, dtype=torch.float64) - 1
                factor = 1 + self.epsilon * (noise + noise.T) / 2
                self._cache[layer] = (c0.double() * factor).to(c0.dtype)
        return self._cache[layer]

    def for_part(self, part: str) -> "PerturbedStatistics":
        if part not in self._siblings:
            sibling = self.stats.for_part(part)
            # another part's C0 (PMET's attention keys) draws its own noise; seed 0 stays unperturbed
            self._siblings[part] = self if sibling is self.stats else PerturbedStatistics(
                sibling, self.epsilon, self.seed, self.stream + 1)
        return self._siblings[part]


def figures(table, n_edits: int) -> dict[str, float]:
    """What the notebooks report of one run: edit success and mean ability at the end, the L1 growth
    of the edited layers (summed, end over start, as the L1 notebook), the last edited layer's κ
    growth (as the condition-number notebook), and the mean ability's change."""
    from kelib.experiments import ability_columns

    weights = table[table.scope == "weights"]
    last = weights[weights.layer == weights.layer.max()]
    at = {c: last[last.checkpoint == c].set_index("metric").value for c in (0, n_edits)}
    l1 = weights[weights.metric == "l1"].groupby("checkpoint").value.sum()
    scores = table[~table.scope.str.startswith("weights")]
    end = scores[scores.checkpoint == n_edits].set_index("metric").value
    start = scores[scores.checkpoint == 0].set_index("metric").value
    abilities = ability_columns(list(end.index))
    return {
        "efficacy": end["efficacy_success"],
        "paraphrase": end["paraphrase_success"],
        "neighbourhood": end["neighborhood_success"],
        "mean ability": sum(end[a] for a in abilities) / len(abilities),
        "ability change": sum(end[a] - start[a] for a in abilities) / len(abilities),
        "perplexity": end["heldout_perplexity"],
        "L1 growth": l1[n_edits] / l1[0],
        "κ growth": at[n_edits]["condition_number"] / at[0]["condition_number"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["MEMIT"], help="EDITOR or EDITOR+REGULARIZER")
    parser.add_argument("--n", type=int, default=1000, help="sequential edits per run")
    parser.add_argument("--seeds", type=int, default=4, help="seed 0 (C0 as computed) and seeds-1 perturbed")
    parser.add_argument("--epsilon", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kelib.experiments import editor_hparams, load_setup
    from kelib.runner import EditRun, RunSpec
    from kelib.stats import statistics_for

    setup = load_setup("kelib-default")
    print(f"kelib-default on cpu: {machine('cpu')}; {args.n} sequential single edits (eval cases), "
          f"C0 x (1 + ε(R+Rᵀ)/2), ε = {args.epsilon:g}")
    for name in args.runs:
        editor, _, regularizer = name.partition("+")
        hparams = editor_hparams(setup, editor)
        stats = statistics_for(setup.model, setup.tok, hparams, progress=False)
        rows = []
        for seed in range(args.seeds):
            spec = RunSpec(editor=editor, protocol="sequential", n_edits=args.n, batch_size=1,
                           regularizer=regularizer or "none", checkpoints=[0], max_eval_cases=100)
            run = EditRun(setup.model, setup.tok, setup.cases[: args.n], spec, hparams,
                          PerturbedStatistics(stats, args.epsilon, seed), evaluators=setup.evaluators, progress=False)
            start = time.perf_counter()
            try:
                table = run.run()
            finally:
                run.restore()
            rows.append(figures(table, args.n))
            print(f"{name} seed {seed} ({'C0 as computed' if seed == 0 else 'perturbed'}, "
                  f"{time.perf_counter() - start:.0f} s): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()), flush=True)
        print(f"{name}: {'figure':16s} {'min':>10s} {'max':>10s} {'sd':>10s}")
        for key in rows[0]:
            values = [r[key] for r in rows]
            print(f"{name}: {key:16s} {min(values):10.4g} {max(values):10.4g} {statistics.stdev(values):10.3g}")


if __name__ == "__main__":
    main()
