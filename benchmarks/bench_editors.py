"""Editors on the embedded default: do single edits land, how fast, and what do sequential edits do?

    python benchmarks/bench_editors.py                       # single + batch editing, 50 cases, every editor
    python benchmarks/bench_editors.py --n 200 --leaky-c0    # the same with C0 as before issue #13 (the leak)
    python benchmarks/bench_editors.py --sequential 500      # plus 500 sequential ROME edits (minutes)
    python benchmarks/bench_editors.py --gpt2-xl-shape --device cuda   # timing on a GPT-2 XL-sized model
    python benchmarks/bench_editors.py --speed                     # seconds per edit, new vs old path
    python benchmarks/bench_editors.py --speed --long 1000         # plus 1,000 sequential edits, phase shares
    python benchmarks/bench_editors.py --model kelib-micro --speed --long 1000 --editors ROME MEMIT AlphaEdit PMET

``--speed`` (issue #14, :mod:`editing_speed`): seconds per edit of every editor, single and batches
of 10 / 100; the ratio of the path before issue #14 (the editors' ``reference_path`` and the old
edit metrics) to the new one, alternated in this run; with ``--long N``, N sequential edits of ROME,
MEMIT and MEMIT + D4S with checkpoints at 100 / 500 / 1,000, wall time and the shares spent in target
optimisation, the rest of the update, weight diagnostics and evaluation (``--long-old`` adds the same
runs on the old path). Runs on ``--threads`` threads (2 by default, the reference machine; on a
machine shared with other jobs, 2 threads on 2 cores oversubscribe and time mostly waiting: use 1).
``benchmarks/gpu_editing_speed.py`` times a GPT-2 XL-shaped model on a GPU.

Edits the eval split's cases (``--split tune`` for the tune split; hyperparameters are chosen there,
with ``tune_embedded.py``). ``--leaky-c0`` rebuilds C0 the way it was before issue #13, from the
prompts of every fact including the evaluated ones, to keep the leak's effect on record.

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from kelib.editors import load_hparams  # noqa: E402
from kelib.runner import RunSpec, run_edits  # noqa: E402
from kelib.stats import statistics_for  # noqa: E402

EDITORS = ("ROME", "MEMIT", "FT", "AlphaEdit", "PMET", "GRACE", "KN", "MEND")
MODEL = "kelib-default"  # --model


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
        hp = load_hparams(editor, MODEL)
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

    hp = load_hparams(editor, MODEL)
    layer = hp.layers[-1]
    stats = statistics_for(model, tok, hp, progress=False)
    print(f"\nneighbour's share of u·k (u = C0⁻¹k) at {editor}'s layer {layer}, first {n} cases: median (90th percentile)")
    for share in (0.0, hp.mom2_lookup_share):
        c0 = KeyStatistics(model, tok, stats.spec, progress=False, lookup_share=share)[layer]
        found = neighbour_key_share(model, tok, cases[:n], layer, c0)
        print(f"  lookup share {share:.2f}: {found.median():.3f} ({found.quantile(0.9):.3f})")


def sequential(model, tok, cases, n: int, editor: str = "ROME") -> None:
    from kelib.embedded import abilities_evaluator

    hp = load_hparams(editor, MODEL)
    stats = statistics_for(model, tok, hp, progress=False)
    checkpoints = sorted({0, *range(0, n + 1, max(n // 5, 1))})
    spec = RunSpec(editor, "sequential", n_edits=n, checkpoints=checkpoints, max_eval_cases=100)
    evaluators = {"abilities": abilities_evaluator(MODEL.removeprefix("kelib-"), n_skill=100)}
    start = time.perf_counter()
    table = run_edits(model, tok, cases, spec, hp, stats, evaluators=evaluators, progress=True)
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


def leaky_c0() -> None:
    """C0 as it was before issue #13, for the record of what the leak did: C_lookup from the prompts of
    *every* fact the model learned (eval cases, their neighbours and the unedited facts included) and
    C_text from every fact statement. Cached under its own corpus names, never mixed with the split C0."""
    import random

    import kelib.stats as stats
    from kelib.embedded.store import recipe_of, world_of
    from kelib.embedded.train import split_paragraphs
    from kelib.embedded.world import trained_prompts, training_statements

    def every_prompt(model):
        world = stats._embedded(model, "embedded_prompts", world_of)
        for fact in world.facts:
            yield from trained_prompts(fact, world.relations[fact.relation_id])

    def every_statement(model):
        def read(path):
            world = world_of(path)
            statements = [s for f in world.facts for s in training_statements(f, world.relations[f.relation_id])]
            return statements + split_paragraphs(recipe_of(path))[0]

        texts = stats._embedded(model, "embedded_world", read)
        random.Random(0).shuffle(texts)
        yield from texts

    stats._embedded_prompts, stats._embedded_world_texts = every_prompt, every_statement
    for corpus in ("embedded_prompts", "embedded_world"):
        stats.CORPUS_VERSIONS[corpus] += "-leaky-all-splits"


def speed(model, tok, cases, args) -> None:
    import editing_speed

    editors = args.editors or list(EDITORS)
    editing_speed.per_edit(model, tok, cases, MODEL, editors, sizes=(1, 10, 100), n_single=args.n_speed,
                           device=args.device)
    editing_speed.new_vs_old(model, tok, cases, MODEL, [e for e in editors if e in editing_speed.OPTIMISING],
                             n_single=args.n_speed, device=args.device)
    if args.long:
        from kelib.embedded import abilities_evaluator

        evaluators = {"abilities": abilities_evaluator(MODEL.removeprefix("kelib-"), n_skill=100)}
        for old in (False, True) if args.long_old else (False,):
            editing_speed.long_runs(model, tok, cases, MODEL, n=args.long, evaluators=evaluators, old=old,
                                    device=args.device)


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="embedded model (kelib-default, kelib-micro)")
    parser.add_argument("--n", type=int, default=50, help="single edits per editor")
    parser.add_argument("--batch", type=int, default=100, help="size of the batch edit")
    parser.add_argument("--editors", nargs="*", default=list(EDITORS), help="editors to benchmark (none: skip; "
                        "with --speed: every editor)")
    parser.add_argument("--sequential", type=int, default=0, metavar="N", help="N sequential ROME edits")
    parser.add_argument("--speed", action="store_true", help="seconds per edit and the new/old ratio (issue #14)")
    parser.add_argument("--n-speed", type=int, default=10, help="single edits timed per editor with --speed")
    parser.add_argument("--long", type=int, default=0, metavar="N", help="with --speed: N sequential edits of "
                        "ROME, MEMIT, MEMIT + D4S with phase shares")
    parser.add_argument("--long-old", action="store_true", help="with --long: the same runs on the old path")
    parser.add_argument("--split", choices=("eval", "tune"), default="eval", help="the world's cases to edit: "
                        "eval (published figures) or tune (choosing hyperparameters)")
    parser.add_argument("--leaky-c0", action="store_true", help="C0 from every fact's prompts, as before issue "
                        "#13 (for the record of the leak; never for published figures)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpt2-xl-shape", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    MODEL = args.model
    torch.set_num_threads(args.threads)

    if args.gpt2_xl_shape:
        gpt2_xl_shape(args.device)
        return
    from editing_speed import load, machine

    model, tok, cases = load(MODEL, args.device, args.split)
    if args.leaky_c0:
        leaky_c0()
    print(f"{MODEL} on {args.device}: {machine(args.device)}; {args.split} cases"
          f"{'; LEAKY C0 (every fact, as before issue #13)' if args.leaky_c0 else ''}")
    if args.speed:
        speed(model, tok, cases, args)
        return
    neighbour_share(model, tok, cases, args.n)
    if args.editors:
        single_and_batch(model, tok, cases, args.n, args.batch, args.editors)
    if args.sequential:
        sequential(model, tok, cases, args.sequential)


if __name__ == "__main__":
    main()
