"""The embedded models against their targets: recall, skills, perplexity, training time; where facts live.

    python benchmarks/bench_embedded.py                 # the default model (built on first use, ~12 min)
    python benchmarks/bench_embedded.py --name micro
    python benchmarks/bench_embedded.py --trace 40      # plus causal tracing over 40 facts

Prints the training report (built once and cached: the time is that of the build, on the machine and
thread count it records) with each target and whether it is met, then, with ``--trace``, ROME's
causal tracing averaged by token position and layer: which states carry the fact to the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelib.embedded import ensure_model, world_cases  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default", choices=["default", "micro"])
    parser.add_argument("--trace", type=int, default=0, metavar="N", help="causal tracing over N facts")
    args = parser.parse_args()

    path = ensure_model(args.name)
    report = json.loads((path / "report.json").read_text())
    metrics, targets = report["metrics"], report["targets"]
    print(f"embedded model {args.name!r} at {path}")
    print(f"  {report['n_parameters']:,} parameters, {report['n_facts']:,} facts ({report['n_cases']:,} edit cases), "
          f"{report['n_statements']:,} training statements")
    minutes = report["train_seconds"] / 60
    limit = targets.get("minutes")
    verdict = "" if limit is None else f"  target <= {limit} min: {'met' if minutes <= limit else 'NOT met'}"
    print(f"  training: {minutes:.1f} min on {report['threads']} threads ({report['machine']}){verdict}")
    for key, value in metrics.items():
        target = targets.get(key) or (targets.get("skill") if key.startswith("skill_") else None)
        line = f"  {key:<28} {value:8.3f}"
        if target is not None:
            line += f"   target >= {target}: {'met' if value >= target else 'NOT met'}"
        print(line)

    if args.trace:
        import torch

        from kelib.models import load_model
        from kelib.tracing import average_effects

        torch.set_grad_enabled(False)
        model, tok = load_model(str(path))
        effects = average_effects(model, tok, world_cases(args.name)[: args.trace], kind="block", samples=4)
        table = effects.pivot_table(index="bucket", columns="layer", values="effect")
        print(f"\ncausal tracing (ROME): mean restored P(answer) - corrupted, residual stream, {args.trace} facts")
        print(table.round(3).to_string())
        best = effects.loc[effects.effect.idxmax()]
        print(f"largest effect: {best.bucket!r} after layer {int(best.layer)} ({best.effect:.3f})")


if __name__ == "__main__":
    main()
