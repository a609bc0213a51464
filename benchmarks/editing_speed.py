"""Editing speed (issue #14): seconds per edit, the new path against the one before it, and where
the time of long sequential runs goes.

Used by ``bench_editors.py --speed`` and ``gpu_editing_speed.py``. The old path is the editors'
:func:`kelib.editors.target.reference_path` (per-template loss, a full forward per step, separate
key passes) with the CounterFact metrics as computed before the issue (copied below), so the ratio
is measured in one process, on the same cases, with runs alternated.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from kelib.editors import get_editor, load_hparams
from kelib.editors.target import reference_path
from kelib.runner import RunSpec, run_edits
from kelib.stats import statistics_for

BEFORE = "bc696d5"  # the last commit before issue #14: the old path reproduces its code
EDITORS = ("ROME", "MEMIT", "FT", "AlphaEdit", "PMET", "GRACE", "KN", "MEND")
OPTIMISING = ("ROME", "MEMIT", "AlphaEdit", "PMET")  # the editors with a reference path


def machine(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    line = f"{cpu}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.startswith("cuda"):
        line += f", {torch.cuda.get_device_name(device)}"
    return line


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# The path before issue #14


@torch.no_grad()
def _old_score_targets(model, tok, prompts, targets, batch_size: int = 64):
    """``kelib.metrics.score_targets`` as of :data:`BEFORE`: every pair its own row, full log-softmax."""
    from kelib.metrics import TargetScores
    from kelib.models import device_of
    from kelib.tokens import pad_batch, with_target

    encoded = [with_target(tok, p, t) for p, t in zip(prompts, targets)]
    device = device_of(model)
    out = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        ids, mask = pad_batch([e[0] for e in chunk], tok.pad_token_id, device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (full, start) in enumerate(chunk):
            positions = torch.arange(start - 1, len(full) - 1, device=device)
            wanted = ids[row, start : len(full)]
            lp = logprobs[row, positions]
            nll = -lp.gather(-1, wanted[:, None]).squeeze(-1)
            argmax = lp.argmax(-1)
            out.append(TargetScores(nll=nll.mean().item(), token_correct=tuple((argmax == wanted).tolist()),
                                    argmax=tuple(argmax.tolist())))
    return out


def _old_counterfact_metrics(model, tok, cases) -> dict[str, float]:
    """``kelib.metrics.counterfact_metrics`` as of :data:`BEFORE`: two scoring calls per case and group."""
    from kelib.metrics import Comparison, _harmonic

    rows = {k: [] for k in ("efficacy", "paraphrase", "neighborhood")}
    for case in cases:
        groups = {"efficacy": ([case.prompt], case.target_true), "paraphrase": (list(case.paraphrase_prompts),
                  case.target_true), "neighborhood": (list(case.neighborhood_prompts), None)}
        for name, (prompts, true) in groups.items():
            if not prompts:
                continue
            trues = list(case.neighborhood_answers) if true is None else [true] * len(prompts)
            new = _old_score_targets(model, tok, prompts, [case.target_new] * len(prompts))
            old = _old_score_targets(model, tok, prompts, trues)
            comps = [Comparison(a.nll, b.nll) for a, b in zip(new, old)]
            sign = -1 if name == "neighborhood" else 1
            success = [c.new_wins != (sign < 0) for c in comps]
            magnitude = [sign * c.magnitude for c in comps]
            rows[name].append((sum(success) / len(success), sum(magnitude) / len(magnitude)))
    result = {}
    for name, values in rows.items():
        if values:
            result[f"{name}_success"] = sum(v[0] for v in values) / len(values)
            result[f"{name}_magnitude"] = sum(v[1] for v in values) / len(values)
    result["score"] = _harmonic([result[k] for k in ("efficacy_success", "paraphrase_success",
                                                     "neighborhood_success") if k in result])
    return result


@contextlib.contextmanager
def old_path():
    """The editors' reference path and the edit metrics before issue #14."""
    import kelib.runner

    # the runner has called the CounterFact metrics under either name (a plain dict is a valid result)
    names = [n for n in ("counterfact_metrics", "counterfact_scores") if hasattr(kelib.runner, n)]
    saved = {name: getattr(kelib.runner, name) for name in names}
    try:
        for name in names:
            setattr(kelib.runner, name, _old_counterfact_metrics)
        with reference_path():
            yield
    finally:
        for name, fn in saved.items():
            setattr(kelib.runner, name, fn)


# ---------------------------------------------------------------------------------------------
# Phases


class Phases:
    """Wall time per phase of a run, by wrapping the functions that do each phase.

    optimisation: the target optimisation (v*, z); update: the rest of the editor call (keys, solves,
    the regularizer's transform) and applying ΔW; diagnostics: the weight diagnostics at checkpoints;
    evaluation: edit metrics and the extra evaluators (abilities)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _wrap(self, owner, name: str, phase: str, stack: contextlib.ExitStack) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, name, timed)
        stack.callback(setattr, owner, name, original)

    @contextlib.contextmanager
    def watching(self):
        import kelib.editors.memit
        import kelib.editors.pmet
        import kelib.editors.rome
        import kelib.runner

        with contextlib.ExitStack() as stack:
            for module in (kelib.editors.rome, kelib.editors.memit, kelib.editors.pmet):
                for name in ("optimize_cases", "optimize_targets_reference"):
                    self._wrap(module, name, "optimisation", stack)
            self._wrap(kelib.runner.EditRun, "_call_editor", "editor call", stack)
            self._wrap(kelib.runner.EditRun, "_apply", "apply", stack)
            self._wrap(kelib.runner, "weight_diagnostics", "diagnostics", stack)
            self._wrap(kelib.runner, "edit_metrics", "evaluation", stack)
            self._wrap(kelib.runner.EditRun, "_record_evaluators", "evaluation", stack)
            yield self

    def shares(self, wall: float) -> dict[str, float]:
        s = self.seconds
        update = s["editor call"] - s["optimisation"] + s["apply"]
        parts = {"optimisation": s["optimisation"], "update": update, "diagnostics": s["diagnostics"],
                 "evaluation": s["evaluation"]}
        parts["other"] = wall - sum(parts.values())
        return parts


# ---------------------------------------------------------------------------------------------
# Measurements


def _prepared(model, tok, model_name: str, editor: str, overrides: dict | None = None):
    hp = load_hparams(editor, model_name, overrides)
    stats = statistics_for(model, tok, hp, progress=False)
    if stats is not None and hasattr(hp, "layers"):
        stats.prefetch(hp.layers)
    return hp, stats


def per_edit(model, tok, cases, model_name: str, editors=EDITORS, sizes=(1, 10, 100), n_single: int = 10,
             device: str = "cpu", overrides: dict | None = None) -> dict:
    """Seconds per edit through the runner (edit, metrics of the edited cases, restore): ``n_single``
    single edits, and one batch of each size (a non-batchable editor edits the batch one by one)."""
    print(f"\nseconds per edit (runner: edit + its metrics + restore), {n_single} single edits, batches of "
          f"{', '.join(str(s) for s in sizes if s > 1)}")
    print(f"{'editor':<10}" + "".join(f"{('single' if s == 1 else f'batch {s}'):>11}" for s in sizes))
    found = {}
    for editor in editors:
        hp, stats = _prepared(model, tok, model_name, editor, overrides)
        run_edits(model, tok, cases, RunSpec(editor, "single", n_edits=1), hp, stats, progress=False)  # warm-up
        line = f"{editor:<10}"
        for size in sizes:
            spec = (RunSpec(editor, "single", n_edits=n_single) if size == 1
                    else RunSpec(editor, "batch", n_edits=size, batch_size=size))
            _sync(device)
            start = time.perf_counter()
            run_edits(model, tok, cases[1:], spec, hp, stats, progress=False)
            _sync(device)
            found[(editor, size)] = (time.perf_counter() - start) / spec.n_edits
            line += f"{found[(editor, size)]:11.3f}"
        print(line, flush=True)
    return found


def new_vs_old(model, tok, cases, model_name: str, editors=OPTIMISING, sizes=(1, 10), n_single: int = 5,
               repeats: int = 2, device: str = "cpu", overrides: dict | None = None) -> dict:
    """Per editor and size: seconds per edit of the editor call alone and through the runner (with the
    edit metrics), old path and new, alternated ``repeats`` times on the same cases; best of each."""
    print(f"\nnew path vs the path before issue #14 (same cases, alternated, best of {repeats}); "
          "seconds per edit")
    print(f"{'editor':<10}{'size':>5} | {'editor call: old':>16}{'new':>8}{'speed-up':>9} | "
          f"{'with metrics: old':>18}{'new':>8}{'speed-up':>9}")
    found = {}
    for editor in editors:
        hp, stats = _prepared(model, tok, model_name, editor, overrides)
        compute = get_editor(editor).compute_update
        run_edits(model, tok, cases, RunSpec(editor, "single", n_edits=1), hp, stats, progress=False)  # warm-up
        for size in sizes:
            batches = [cases[i : i + size] for i in range(0, n_single * size if size == 1 else size, size)]
            n_edits = sum(len(b) for b in batches)
            spec = (RunSpec(editor, "single", n_edits=n_single) if size == 1
                    else RunSpec(editor, "batch", n_edits=size, batch_size=size))
            best = defaultdict(lambda: float("inf"))
            for _ in range(repeats):
                for label, path in (("old", old_path), ("new", contextlib.nullcontext)):
                    with path():
                        _sync(device)
                        start = time.perf_counter()
                        for batch in batches:
                            compute(model, tok, batch, hp, stats, state={})
                        _sync(device)
                        best[("call", label)] = min(best[("call", label)], (time.perf_counter() - start) / n_edits)
                        start = time.perf_counter()
                        run_edits(model, tok, cases, spec, hp, stats, progress=False)
                        _sync(device)
                        best[("run", label)] = min(best[("run", label)], (time.perf_counter() - start) / spec.n_edits)
            found[(editor, size)] = dict(best)
            print(f"{editor:<10}{size:>5} | {best['call', 'old']:16.3f}{best['call', 'new']:8.3f}"
                  f"{best['call', 'old'] / best['call', 'new']:8.1f}x | {best['run', 'old']:18.3f}"
                  f"{best['run', 'new']:8.3f}{best['run', 'old'] / best['run', 'new']:8.1f}x", flush=True)
    return found


def long_runs(model, tok, cases, model_name: str, n: int = 1000, checkpoints=(100, 500, 1000), evaluators=None,
              runs=(("ROME", None), ("MEMIT", None), ("MEMIT", "D4S")), old: bool = False,
              device: str = "cpu", overrides: dict | None = None) -> dict:
    """``n`` sequential single edits per run, checkpoints at ``checkpoints``: wall time and its shares."""
    label = "old path" if old else "new path"
    if len(cases) < n:  # the micro model has 200 cases: timing only, so they repeat
        print(f"note: {len(cases)} cases, each edited up to {-(-n // len(cases))} times")
        cases = (list(cases) * (n // len(cases) + 1))[:n]
    print(f"\n{n} sequential edits ({label}), checkpoints at {', '.join(map(str, checkpoints))}: wall time "
          "and its shares")
    print(f"{'run':<12}{'wall s':>8}{'s/edit':>8} | {'optimisation':>12}{'update':>8}{'diagnostics':>12}"
          f"{'evaluation':>11}{'other':>7}")
    found = {}
    for editor, regularizer in runs:
        hp, stats = _prepared(model, tok, model_name, editor, overrides)
        params = {"mom2_update_weight": hp.mom2_update_weight} if regularizer == "D4S" else {}
        spec = RunSpec(editor, "sequential", n_edits=n, batch_size=1, regularizer=regularizer or "none",
                       regularizer_params=params, checkpoints=[c for c in checkpoints if c <= n])
        phases = Phases(device)
        with phases.watching(), (old_path() if old else contextlib.nullcontext()):
            _sync(device)
            start = time.perf_counter()
            run_edits(model, tok, cases, spec, hp, stats, evaluators=evaluators, progress=False)
            _sync(device)
            wall = time.perf_counter() - start
        shares = phases.shares(wall)
        name = editor + (f"+{regularizer}" if regularizer else "")
        found[name] = {"wall": wall, **shares}
        print(f"{name:<12}{wall:8.1f}{wall / n:8.3f} | " + "".join(
            f"{shares[k] / wall:{w}.0%}" for k, w in (("optimisation", 12), ("update", 8), ("diagnostics", 12),
                                                      ("evaluation", 11), ("other", 7))), flush=True)
    return found


def load(model_name: str, device: str, split: str = "eval"):
    """Model, tokenizer and the edit cases of one split (eval or tune) of an embedded model."""
    from kelib.embedded import tune_cases, world_cases
    from kelib.models import load_model

    model, tok = load_model(model_name, device=device)
    cases = (world_cases if split == "eval" else tune_cases)(model_name.removeprefix("kelib-"))
    return model, tok, cases


if __name__ == "__main__":
    sys.exit("run benchmarks/bench_editors.py --speed")
