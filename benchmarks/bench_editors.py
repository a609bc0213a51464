"""Editors on the embedded default: do single edits land, how fast, and what do sequential edits do?

    python benchmarks/bench_editors.py                       # single + batch editing, 50 cases, every editor
    python benchmarks/bench_editors.py --sequential 500      # plus 500 sequential ROME edits (minutes)
    python benchmarks/bench_editors.py --gpt2-xl-shape --device cuda   # timing on a GPT-2 XL-sized model

Prints the share of an edit's u·k that reaches a same-template neighbour (with C0 from text alone
and with the lookup keys mixed in); per editor: single-edit efficacy / paraphrase / neighbourhood specificity (CounterFact
probability comparisons) and seconds per edit; a batch edit's metrics and seconds per batch; with
``--sequential N``, ROME applied N times in a row with the L1 norm and condition number of the edited
layer, the recall of unedited facts and the skills at checkpoints (the collapse the papers report).

``--gpt2-xl-shape`` builds a randomly initialised GPT-2 with GPT-2 XL's shape (48 layers, width 1600)
from its config and times ROME and MEMIT with GPT-2 XL's published hyperparameters; the edits mean
nothing on random weights, only the time does (reference: about 2 s per ROME edit on an A6000).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kelib.editors import load_hparams  # noqa: E402
from kelib.runner import RunSpec, run_edits  # noqa: E402
from kelib.stats import statistics_for  # noqa: E402

EDITORS = ("ROME", "MEMIT", "FT", "AlphaEdit", "PMET", "GRACE", "KN", "MEND")


def metric(table, name, checkpoint=None):
    rows = table[(table.metric == name) & (table.scope != "weights")]
    if checkpoint is not None:
        rows = rows[rows.checkpoint == checkpoint]
    return float(rows.value.iloc[-1])


def single_and_batch(model, tok, cases, n: int, batch: int, editors) -> None:
    print(f"\nsingle edits ({n} cases, each on the original model) and one batch of {batch}")
    print(f"{'editor':<10} {'efficacy':>9} {'paraphr.':>9} {'specif.':>9} {'s/edit':>8} | "
          f"{'batch eff.':>10} {'batch spec.':>11} {'s/batch':>8}")
    for editor in editors:
        hp = load_hparams(editor, "kelib-default")
        stats = statistics_for(model, tok, hp, progress=False)
        stats.prefetch(hp.layers)
        start = time.perf_counter()
        single = run_edits(model, tok, cases, RunSpec(editor, "single", n_edits=n), hp, stats, progress=False)
        per_edit = (time.perf_counter() - start) / n
        line = (f"{editor:<10} {metric(single, 'efficacy_success'):9.3f} {metric(single, 'paraphrase_success'):9.3f} "
                f"{metric(single, 'neighborhood_success'):9.3f} {per_edit:8.2f} | ")
        start = time.perf_counter()
        many = run_edits(model, tok, cases[n:], RunSpec(editor, "batch", n_edits=batch, batch_size=batch), hp, stats,
                         progress=False)
        line += (f"{metric(many, 'efficacy_success'):10.3f} {metric(many, 'neighborhood_success'):11.3f} "
                 f"{time.perf_counter() - start:8.1f}")
        print(line, flush=True)


def neighbour_share(model, tok, cases, n: int, editor: str = "ROME") -> None:
    """How much of an edit's u·k reaches a same-template neighbour, with and without the lookup share."""
    from kelib.stats import KeyStatistics, neighbour_key_share

    hp = load_hparams(editor, "kelib-default")
    layer = hp.layers[-1]
    stats = statistics_for(model, tok, hp, progress=False)
    print(f"\nneighbour's share of u·k (u = C0⁻¹k) at {editor}'s layer {layer}, first {n} cases: median (90th percentile)")
    for share in (0.0, hp.mom2_lookup_share):
        c0 = KeyStatistics(model, tok, stats.spec, progress=False, lookup_share=share)[layer]
        found = neighbour_key_share(model, tok, cases[:n], layer, c0)
        print(f"  lookup share {share:.2f}: {found.median():.3f} ({found.quantile(0.9):.3f})")


def sequential(model, tok, cases, n: int, editor: str = "ROME") -> None:
    from kelib.embedded import abilities_evaluator

    hp = load_hparams(editor, "kelib-default")
    stats = statistics_for(model, tok, hp, progress=False)
    checkpoints = sorted({0, *range(0, n + 1, max(n // 5, 1))})
    spec = RunSpec(editor, "sequential", n_edits=n, checkpoints=checkpoints, max_eval_cases=100)
    start = time.perf_counter()
    table = run_edits(model, tok, cases, spec, hp, stats, evaluators={"abilities": abilities_evaluator(n_skill=100)},
                      progress=True)
    seconds = time.perf_counter() - start
    layer = hp.layers[-1]
    weights = table[(table.scope == "weights") & (table.layer == layer)].pivot_table(
        index="checkpoint", columns="metric", values="value")
    others = table[table.scope != "weights"].pivot_table(index="checkpoint", columns="metric", values="value")
    print(f"\n{n} sequential {editor} edits at layer {layer} ({seconds / n:.2f} s per edit incl. checkpoints)")
    cols = ["efficacy_success", "neighborhood_success", "recall_unedited"] + [c for c in others if c.startswith("skill_")]
    view = weights[["l1", "condition_number", "sigma_max"]].join(others[[c for c in cols if c in others]])
    print(view.round(3).to_string())
    print(f"L1 norm grew {weights.l1.iloc[-1] / weights.l1.iloc[0]:.1f}x; condition number "
          f"{weights.condition_number.iloc[0]:.0f} -> {weights.condition_number.iloc[-1]:.0f}; unedited recall "
          f"{others.recall_unedited.iloc[0]:.3f} -> {others.recall_unedited.iloc[-1]:.3f}")


def gpt2_xl_shape(device: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from kelib.embedded import ensure_model, world_cases
    from kelib.models import load_model

    _, tok = load_model(str(ensure_model("default")))
    config = GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=len(tok))
    model = GPT2LMHeadModel(config).to(device).eval().requires_grad_(False)
    cases = world_cases("default")
    print(f"\nGPT-2 XL-shaped random model on {device}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    for editor in ("ROME", "MEMIT"):
        hp = load_hparams(editor, "gpt2-xl", {"mom2_dataset": "wikitext2", "mom2_n_tokens": 100_000})
        stats = statistics_for(model, tok, hp, progress=False)
        stats.prefetch(hp.layers)
        run_edits(model, tok, cases, RunSpec(editor, "single", n_edits=1), hp, stats, progress=False)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_edits(model, tok, cases[1:], RunSpec(editor, "single", n_edits=5), hp, stats, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"  {editor}: {(time.perf_counter() - start) / 5:.2f} s per edit (edit + metrics + restore)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="single edits per editor")
    parser.add_argument("--batch", type=int, default=100, help="size of the batch edit")
    parser.add_argument("--editors", nargs="*", default=list(EDITORS), help="editors to benchmark (none: skip)")
    parser.add_argument("--sequential", type=int, default=0, metavar="N", help="N sequential ROME edits")
    parser.add_argument("--gpt2-xl-shape", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    if args.gpt2_xl_shape:
        gpt2_xl_shape(args.device)
        return
    from kelib.embedded import world_cases
    from kelib.models import load_model

    model, tok = load_model("kelib-default", device=args.device)
    cases = world_cases("default")
    print(f"kelib-default on {args.device}, {torch.get_num_threads()} threads")
    neighbour_share(model, tok, cases, args.n)
    if args.editors:
        single_and_batch(model, tok, cases, args.n, args.batch, args.editors)
    if args.sequential:
        sequential(model, tok, cases, args.sequential)


if __name__ == "__main__":
    main()
