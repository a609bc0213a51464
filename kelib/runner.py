"""The editing runner: apply an editor's updates (through a regularizer), record what they do.

Protocols (named as in RECT's paper):

- ``single``: each case is edited on the original model, evaluated, and the weights restored; with
  ``ability_edits = N`` the evaluators (abilities) also run after each of the first N edits, and the
  table holds, per example, the mean of their scores over those N edited models.
- ``batch``: one batch of ``n_edits`` cases in one editor call (chunks of ``batch_size`` when the
  editor cannot batch, all from the original model), evaluated once, then restored.
- ``sequential``: batches of ``batch_size`` applied one after another to the current model, with an
  evaluation at every checkpoint; the last checkpoint evaluates every earlier edit on the final model.

At every checkpoint the runner writes, per edited layer, :func:`kelib.diagnostics.weight_diagnostics`
of W (L1 norm, Frobenius norm, σmax, σmin, condition number) and of the cumulative update ΔW = W - W_0,
plus the edit metrics of the edits so far and any extra evaluators' numbers, as a tidy table (one
row per checkpoint x scope x layer x metric). An evaluator with ``takes_edits`` set is also given the
cases edited so far (MQuAKE's multi-hop questions ask only about the chains they complete).

With an ``out_dir`` the run is kept in a folder (:mod:`kelib.runstore`): at every checkpoint the
table and everything the rest of the run depends on (edited weights, editor and regularizer state,
the run's context templates, random-number states) are written atomically. An interrupted run
resumes at its last checkpoint and produces the table the uninterrupted run would have, row for row;
a folder written with other inputs (spec, hyperparameters, weights, cases, evaluators, editor code)
is refused with a message saying what changed. A run starts from random-number states seeded with
``spec.seed`` and gives the caller's states back when it ends.

The edited matrices are :class:`kelib.edited_weights.EditedWeights`: only their originals are kept
(not a model copy), and :meth:`EditRun.restore` puts them back, checked bit-identical. On a model in
float16 or bfloat16 (issue #20) they are kept in float32 while the run edits them, so updates are
applied and accumulated in float32 and the diagnostics describe that float32 matrix; every applied
update is checked against the intended one (an update lost to rounding is an
:class:`~kelib.editors.base.EditError`).

Runs that make the same chain of edits share it (:mod:`kelib.chains`): with
:meth:`EditRun.share_chain_with`, a run whose every checkpoint another run kept (a 100-edit run inside a
1,000-edit one, post-hoc PRUNE on the unregularized chain) sets those weights and only evaluates.
Evaluations leave the random-number generators as they found them, so a chain does not depend on
where it is evaluated.

Editors that touch a second projection (PMET's attention output) have its diagnostics recorded under
scope ``weights:<part>``. Editors that keep their edits outside the weights (GRACE's codebook) are
evaluated inside their ``view``; their weights, and so their diagnostics, do not move.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from kelib.chains import chain_key, find_chain
from kelib.config import from_dict, to_dict
from kelib.diagnostics import weight_diagnostics
from kelib.editors.base import EditError, edited_parts, get_editor
from kelib.editors.context import pinned_templates
from kelib.examples import Sample, examples_of
from kelib.metrics import counterfact_scores, zsre_metrics
from kelib.edited_weights import EditedWeights
from kelib.models import check_layer, get_weight, same_device, weights_fingerprint
from kelib.runstore import (
    COLUMNS,
    RUN_FORMAT,
    RunStore,
    code_identity,
    editor_module,
    read_checkpoint_weights,
    rng_state,
    rng_untouched,
    seeded_rng,
    set_rng_state,
)

Protocol = Literal["single", "batch", "sequential"]
Evaluator = Callable[[object, object], dict]  # (model, tok) -> {metric: value}


@dataclass(frozen=True)
class RunSpec:
    """What to run. Plain data: it is the run's identity on disk (a changed spec starts afresh)."""

    editor: str
    protocol: Protocol = "sequential"
    n_edits: int = 10
    batch_size: int | None = None  # cases per editor call; None: n_edits for ``batch``, 1 otherwise
    regularizer: str = "none"
    regularizer_params: dict = field(default_factory=dict)
    checkpoints: list[int] = field(default_factory=list)  # edit counts to evaluate at; [] = the end only
    max_eval_cases: int = 200  # edits scored at an intermediate checkpoint (evenly spaced); the final one scores all
    seed: int = 0
    ability_edits: int = 0  # ``single``: evaluators (abilities) after each of the first N edits, averaged per example


    def __post_init__(self):
        if self.protocol not in ("single", "batch", "sequential"):
            raise ValueError(f"unknown protocol {self.protocol!r}; choose single, batch or sequential")
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", self.n_edits if self.protocol == "batch" else 1)
        if self.protocol == "batch" and self.batch_size != self.n_edits:
            raise ValueError(
                f"protocol 'batch' edits all {self.n_edits} cases in one editor call, so batch_size must be "
                f"n_edits ({self.n_edits}) or left out, got {self.batch_size}; for batches of {self.batch_size} "
                "applied one after another use protocol 'sequential'"
            )
        if self.n_edits < 1 or self.batch_size < 1:
            raise ValueError(f"n_edits and batch_size must be >= 1, got {self.n_edits}, {self.batch_size}")
        bad = [c for c in self.checkpoints if not 0 <= c <= self.n_edits]
        if bad:
            raise ValueError(f"checkpoints {bad} outside 0..{self.n_edits}")
        if self.ability_edits and self.protocol != "single":
            raise ValueError(f"ability_edits is for the single protocol (batch and sequential runs evaluate "
                             f"abilities at their checkpoints), got protocol {self.protocol!r}")
        if not 0 <= self.ability_edits <= self.n_edits:
            raise ValueError(f"ability_edits must be in 0..{self.n_edits}, got {self.ability_edits}")

    def identity(self) -> dict:
        """The spec as a run's identity: fields added after runs were first cached are left out at their
        default (:data:`ADDED_FIELDS`), so the runs cached before them keep their folders."""
        spec = to_dict(self)
        for name, default in ADDED_FIELDS.items():
            if spec.get(name) == default:
                del spec[name]
        return spec

    def checkpoint_list(self) -> list[int]:
        """Edit counts at which the sequential protocol evaluates (always including the end)."""
        return sorted(set(self.checkpoints) | {self.n_edits})


# RunSpec fields added later, with the default that reproduces the runs made before them
ADDED_FIELDS = {"ability_edits": 0}

# The edited layers' weights are kept at every checkpoint of a sequential run (``checkpoint_weights/``)
# when they take at most this many bytes: PRUNE's post-hoc sweep re-evaluates them (kelib.ablations)
CHECKPOINT_WEIGHTS_LIMIT = 64 * 2**20


def edit_metrics(model, tok, cases: Sequence) -> dict[str, float]:
    """The edit metrics matching the cases' dataset (ZsRE token accuracy, else CounterFact, whose
    result also carries each case's scores: :class:`kelib.examples.Scores`)."""
    if not cases:
        return {}
    if all(c.dataset.startswith("zsre") for c in cases):
        return zsre_metrics(model, tok, cases)
    return counterfact_scores(model, tok, cases)


def _concat(samples: Sequence[Sample]) -> Sample:
    """One sample of the examples of several (the per-case scores of a run's independent units)."""
    ids = None if any(s.ids is None for s in samples) else tuple(i for s in samples for i in s.ids)
    weights = None if all(s.weights is None for s in samples) else [
        w for s in samples for w in (s.weights if s.weights is not None else [1.0] * len(s))
    ]
    first = samples[0]
    return Sample([v for s in samples for v in s.values], weights, ids, first.log, first.higher_is_better)


def _spread(items: Sequence, at_most: int) -> list:
    if len(items) <= at_most:
        return list(items)
    step = len(items) / at_most
    return [items[int(i * step)] for i in range(at_most)]


class EditRun:
    """One run of ``spec`` on a model: ``run()`` it, read ``table``, ``restore()`` the weights."""

    def __init__(
        self,
        model,
        tok,
        cases: Sequence,
        spec: RunSpec,
        hparams,
        stats=None,
        out_dir: str | Path | None = None,
        evaluators: dict[str, Evaluator] | None = None,
        progress: bool = True,
        meta: dict | None = None,
    ):
        from kelib.regularizers import make_regularizer

        if len(cases) < spec.n_edits:
            raise ValueError(f"{spec.n_edits} edits asked for, only {len(cases)} cases given")
        self.model, self.tok, self.spec, self.stats = model, tok, spec, stats
        self.cases = list(cases[: spec.n_edits])
        self.editor = get_editor(spec.editor)
        self.regularizer = make_regularizer(spec.regularizer, spec.regularizer_params, hparams)
        overrides = self.regularizer.editor_overrides()
        known = {f.name for f in dataclasses.fields(hparams)}
        self.hparams = dataclasses.replace(hparams, **{k: v for k, v in overrides.items() if k in known})
        self.layers = [check_layer(model, layer) for layer in self.hparams.layers]
        other_parts = [p for p in edited_parts(self.hparams) if p != "mlp_out"]
        if other_parts and spec.regularizer != "none":
            raise ValueError(
                f"{spec.editor} also updates {other_parts}; regularizers transform MLP output updates "
                f"only, so {spec.regularizer} would leave those unregularized: run it without one"
            )
        self.weights = EditedWeights(model, self.layers, other_parts)
        half = self.weights.half_precision_dtypes()
        self.evaluators = evaluators or {}
        self.progress = progress
        self.editor_state: dict = {}
        self.templates: dict = {}  # the run's context templates, sampled at its first edit (unedited model)
        self.rows: list[dict] = []
        self.done = 0
        self.identity = {
            "spec": spec.identity(),
            "hparams": to_dict(self.hparams),
            "layers": self.layers,
            "cases": [c.case_id for c in self.cases],
            "evaluators": {name: getattr(fn, "key", name) for name, fn in self.evaluators.items()},
            "weights": weights_fingerprint(model),
            "code": code_identity(editor_module(self.editor), type(self.regularizer).__module__),
            **(meta or {}),
        }
        if half:  # runs from before edited matrices were kept in float32 measured rounding: not reused
            self.identity["edited_in"] = f"float32 (stored in {', '.join(half)})"
        self.chain = self._chain_key(meta)
        self.chain_runs: Path | None = None  # a folder of runs whose chains this run may take (share_chain_with)
        self.chain_source: Path | None = None  # the run whose kept weights this run evaluated
        self.store = RunStore(out_dir, self.identity, self.chain)
        self.regularizer.start(model, self.originals, stats)

    @property
    def fingerprint(self) -> str:
        """A hash of everything the run's numbers depend on (its folder is refused to any other run)."""
        return self.store.fingerprint

    def keep_in(self, out_dir: str | Path) -> None:
        """Keep the run in ``out_dir`` (e.g. a folder named after :attr:`fingerprint`)."""
        self.store = RunStore(out_dir, self.identity, self.chain)

    def share_chain_with(self, runs_dir: str | Path) -> None:
        """Take the weights at every checkpoint from a run folder in ``runs_dir`` that made the same
        chain of edits and kept them (:mod:`kelib.chains`), and only evaluate them; without one, edit
        as usual. A run whose weights other runs cannot stand in for (:attr:`chain` None) always edits."""
        self.chain_runs = Path(runs_dir)

    def _chain_key(self, meta: dict | None) -> str | None:
        """The key of the run's chain of edits (:mod:`kelib.chains`): what its weights after each edit
        depend on. None when kept weights cannot stand in for the evaluated model: protocols other than
        sequential, a second edited projection (PMET's attention: only the MLP's are kept), edits kept
        outside the weights (GRACE), weights wider than the float32 they are kept in."""
        if (self.spec.protocol != "sequential" or self.weights.other_originals
                or not self.editor.keeps_edits_in_weights
                or any(w.dtype != torch.float32 for w in self.originals.values())):
            return None
        changes = self.regularizer.changes_edits
        modules = [editor_module(self.editor)] + ([type(self.regularizer).__module__] if changes else [])
        return chain_key({
            "format": RUN_FORMAT, "editor": self.spec.editor, "batch_size": self.spec.batch_size,
            "seed": self.spec.seed, "hparams": self.identity["hparams"], "layers": self.layers,
            "weights": self.identity["weights"], "code": code_identity(*modules),
            "regularizer": [self.spec.regularizer, self.spec.regularizer_params] if changes else "none",
            "edited_in": self.identity.get("edited_in"), **(meta or {}),
        })

    # -- public --------------------------------------------------------------------------------

    def is_complete(self) -> bool:
        """Whether the run's folder holds it finished (its table is read back, nothing computed)."""
        saved = self.store.saved()
        return bool(saved is not None and saved.get("complete"))

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def run(self) -> pd.DataFrame:
        """Run the protocol, resuming a sequential run from ``out_dir`` when it was interrupted.

        A run that ``out_dir`` holds complete is not run again: its table is returned and the model
        is left as it is (unedited)."""
        if self.is_complete():
            self.rows = self.store.rows()
            return self.table
        self.rows = []
        self._keep_in_float32()
        with seeded_rng(self.spec.seed):
            if self.spec.protocol == "sequential":
                self._sequential()
            else:
                self._independent()
        return self.table

    def restore(self) -> None:
        """Put back the edited layers' original weights in the model's dtype, checked bit-identical
        (:meth:`kelib.edited_weights.EditedWeights.restore`)."""
        self.weights.restore()

    @property
    def originals(self) -> dict[int, torch.Tensor]:
        """W_0 of each edited MLP output projection, by layer (float32 or wider)."""
        return self.weights.originals

    def _keep_in_float32(self) -> None:
        self.weights.keep_in_float32(self.spec.editor)

    @contextlib.contextmanager
    def evaluation_view(self):
        """The model as the run's edits left it: the regularizer's view and the editor's (GRACE)."""
        with self.regularizer.evaluation_view(self.model), self.editor.view(self.model, self.editor_state):
            yield

    # -- protocols -------------------------------------------------------------------------------

    def _call_editor(self, batch: Sequence):
        with self.regularizer.editing(self.model), pinned_templates(self.templates):
            result = self.editor.compute_update(
                self.model, self.tok, batch, self.hparams, self.stats, state=self.editor_state
            )
        self._check_devices(result.deltas, result.part, f"{self.spec.editor}'s update")
        for part, deltas in result.other_parts.items():
            self._check_devices(deltas, part, f"{self.spec.editor}'s {part} update")
        result.check_finite()
        update = self.regularizer.transform(result, self.model)
        self._check_devices(update, result.part, f"the {self.regularizer.name} regularizer's update")
        for layer, delta in update.items():
            if not torch.isfinite(delta).all():
                raise EditError(f"the {self.regularizer.name} update of layer {layer} is not finite")
        return update, result

    def _check_devices(self, deltas: dict[int, torch.Tensor], part: str, what: str) -> None:
        """An update must be on its matrix's device (the seam between editor, regularizer and runner):
        a :class:`~kelib.models.DeviceMismatchError` names the component that left it elsewhere."""
        for layer, delta in deltas.items():
            same_device(delta, get_weight(self.model, layer, part), what=f"{what} of {part} at layer {layer} and W")

    def _chunks(self, cases: Sequence) -> list[list]:
        size = self.spec.batch_size if self.editor.batchable else 1
        return [list(cases[i : i + size]) for i in range(0, len(cases), size)]

    def _independent(self) -> None:
        """``single`` and ``batch``: every edit or batch starts from the original model."""
        units = [[c] for c in self.cases] if self.spec.protocol == "single" else [self.cases]
        bar = tqdm(total=len(self.cases), desc=f"{self.spec.editor} {self.spec.protocol}", unit="edit",
                   disable=not self.progress)
        per_unit, examples, abilities = [], {}, []
        try:
            for index, unit in enumerate(units):
                try:
                    for chunk in self._chunks(unit):  # a non-batchable editor: chunks applied in turn
                        update, result = self._call_editor(chunk)
                        self.weights.apply(update, result.other_parts)
                        bar.update(len(chunk))
                    with self.evaluation_view(), rng_untouched():
                        per_unit.append((len(unit), edit_metrics(self.model, self.tok, unit)))
                        if self.spec.protocol == "batch":
                            self._record_weights(len(self.cases))
                            examples.update(self._record_evaluators(len(self.cases)))
                        elif index < self.spec.ability_edits:
                            abilities.append(self._evaluate())
                finally:
                    self.weights.reset()  # still in float32 for the next unit; restore() releases them
                    self.regularizer.start(self.model, self.originals, self.stats)
                    self.editor_state = {}  # AlphaEdit's past keys, GRACE's codebook: this unit's only
        finally:
            bar.close()
        total = sum(n for n, _ in per_unit)
        for metric in per_unit[0][1]:
            value = sum(n * m[metric] for n, m in per_unit) / total
            self.rows.append(self._row(len(self.cases), "edits", None, metric, value))
        per_case = [examples_of(m) for _, m in per_unit]
        examples["edits"] = {metric: _concat([e[metric] for e in per_case]) for metric in per_case[0]}
        if abilities:
            examples.update(self._record_mean_evaluators(len(self.cases), abilities))
        self.store.save(self.rows, self.done, complete=True, templates=self.templates,
                        examples={len(self.cases): examples})

    def _sequential(self) -> None:
        self._resume()
        checkpoints = self.spec.checkpoint_list()
        if self.done == 0 and 0 in checkpoints and not self.rows:
            self._checkpoint(0)
        source = self._shared_chain(checkpoints)
        if source is not None:
            self._evaluate_chain_of(source, checkpoints)
            return
        chunks = self._chunks(self.cases)
        bar = tqdm(total=len(self.cases), initial=self.done, desc=f"{self.spec.editor} sequential",
                   unit="edit", disable=not self.progress)
        started, edited = time.time(), 0
        position = 0
        for chunk in chunks:
            position += len(chunk)
            if position <= self.done:
                continue  # done before an interruption
            update, result = self._call_editor(chunk)
            self.weights.apply(update, result.other_parts)
            self.done = position
            edited += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(edits_per_s=f"{edited / max(time.time() - started, 1e-9):.2f}")
            if any(position - len(chunk) < c <= position for c in checkpoints):
                self._checkpoint(position)
        bar.close()

    def _shared_chain(self, checkpoints: list[int]) -> Path | None:
        """A run folder that kept this run's weights at each checkpoint still to do, or None."""
        if self.chain is None or self.chain_runs is None:
            return None
        todo = [c for c in checkpoints if c > self.done]
        return find_chain(self.chain_runs, self.chain, [c.case_id for c in self.cases], todo,
                          exclude=self.store.out_dir)

    def _evaluate_chain_of(self, source: Path, checkpoints: list[int]) -> None:
        """Set the weights ``source`` kept at each checkpoint still to do and evaluate there: no edit
        is computed (the same chain of edits, :mod:`kelib.chains`)."""
        if self.progress:
            name = self.spec.editor + ("" if self.spec.regularizer == "none" else f" + {self.spec.regularizer}")
            print(f"{name}: its {self.spec.n_edits} edits are the first of run {source.name} (the same chain of "
                  f"edits); evaluating the weights it kept at {[c for c in checkpoints if c > self.done]}")
        self.chain_source = source
        for checkpoint in checkpoints:
            if checkpoint <= self.done:
                continue
            self.weights.load({"weights": read_checkpoint_weights(source, checkpoint), "other_weights": {}})
            self.done = checkpoint
            self._checkpoint(checkpoint)

    # -- recording -------------------------------------------------------------------------------

    def _row(self, checkpoint: int, scope: str, layer, metric: str, value: float) -> dict:
        return {"checkpoint": checkpoint, "scope": scope, "layer": layer, "metric": metric, "value": float(value)}

    def _record_weights(self, checkpoint: int) -> None:
        for layer in self.layers:
            stats = weight_diagnostics(get_weight(self.model, layer), self.originals[layer])
            self.rows += [self._row(checkpoint, "weights", layer, k, v) for k, v in stats.items()]
        for (part, layer), w0 in self.weights.other_originals.items():
            stats = weight_diagnostics(get_weight(self.model, layer, part), w0)
            self.rows += [self._row(checkpoint, f"weights:{part}", layer, k, v) for k, v in stats.items()]

    def _record_evaluators(self, checkpoint: int) -> dict[str, dict[str, Sample]]:
        """Rows of every evaluator's means; returns the per-example scores they gave, by evaluator."""
        examples = {}
        for name, evaluate in self.evaluators.items():
            if getattr(evaluate, "takes_edits", False):  # asks about the edits so far (kelib.multihop)
                result = evaluate(self.model, self.tok, self.cases[:checkpoint])
            else:
                result = evaluate(self.model, self.tok)
            for metric, value in result.items():
                self.rows.append(self._row(checkpoint, name, None, metric, value))
            examples[name] = examples_of(result)
        return examples

    def _evaluate(self) -> dict[str, tuple[dict, dict]]:
        """Every evaluator on the model as it is: ``{name: (means, per-example Samples)}``."""
        found = {}
        for name, evaluate in self.evaluators.items():
            result = evaluate(self.model, self.tok)
            found[name] = (dict(result), examples_of(result))
        return found

    def _record_mean_evaluators(self, checkpoint: int, evaluations: list[dict]) -> dict[str, dict[str, Sample]]:
        """Rows of the evaluators averaged over several edited models (single edits, each on the original
        model): per example, the mean of its scores after each edit (a Sample on the same examples,
        which :mod:`kelib.verdicts` pairs with the unedited model's); a metric without per-example
        scores gets the mean of its means."""
        examples = {}
        for name in self.evaluators:
            means = [e[name][0] for e in evaluations]
            samples = [e[name][1] for e in evaluations]
            examples[name] = {}
            for metric in means[0]:
                if all(metric in s for s in samples):
                    sample = _mean_sample([s[metric] for s in samples])
                    examples[name][metric] = sample
                    value = sample.mean
                else:
                    value = sum(m[metric] for m in means) / len(means)
                self.rows.append(self._row(checkpoint, name, None, metric, value))
        return examples

    def _checkpoint(self, n_done: int) -> None:
        final = n_done == self.spec.n_edits
        so_far = self.cases[:n_done]
        scored = so_far if final else _spread(so_far, self.spec.max_eval_cases)
        with self.evaluation_view(), rng_untouched():
            self._record_weights(n_done)
            scores = edit_metrics(self.model, self.tok, scored)
            for metric, value in scores.items():
                self.rows.append(self._row(n_done, "edits", None, metric, value))
            examples = {"edits": examples_of(scores), **self._record_evaluators(n_done)}
        self._save(complete=final, examples={n_done: examples}, checkpoint=n_done)

    # -- persistence -----------------------------------------------------------------------------
    # At a checkpoint the store gets the table, and while the run is unfinished its state: everything
    # the rest of it depends on. Resuming loads that state back; the protocol loop only skips the
    # edits already done.

    def _save(self, complete: bool, examples: dict | None = None, checkpoint: int | None = None) -> None:
        """Checkpoint a sequential run: its table, its state while unfinished (the final weights, as
        evaluated, once finished), and the edited layers' weights at this checkpoint when small
        (:data:`CHECKPOINT_WEIGHTS_LIMIT`)."""
        state = final_weights = weights_now = None
        if checkpoint and sum(w.numel() * 4 for w in self.originals.values()) <= CHECKPOINT_WEIGHTS_LIMIT:
            weights_now = {checkpoint: self.weights.current(torch.float32)}
        if complete:
            with self.regularizer.evaluation_view(self.model):
                final_weights = self.weights.current()
        elif self.chain_source is None:  # a run evaluating another's chain starts again if stopped (it is cheap)
            state = self._state()
        self.store.save(self.rows, self.done, complete, state=state, final_weights=final_weights,
                        templates=self.templates, examples=examples, checkpoint_weights=weights_now)

    def _state(self) -> dict:
        """Everything the rest of a sequential run depends on, as it is now."""
        return {"done": self.done, **self.weights.snapshot(), "regularizer": self.regularizer.state_dict(),
                "editor_state": self.editor_state, "templates": self.templates, "rng": rng_state()}

    def _resume(self) -> None:
        """Continue an interrupted sequential run from its last checkpoint, exactly where it was."""
        state = self.store.state() if self.store.saved() is not None else None
        if state is None:  # nothing saved, or stopped before its first checkpoint: start afresh
            return
        self.done = state["done"]
        # rows written after this state (a stop between the results and run.json) are recomputed
        self.rows = [r for r in self.store.rows() if r["checkpoint"] <= self.done]
        self.weights.load(state)
        self.regularizer.load_state_dict(state["regularizer"])
        self.editor_state = state["editor_state"]
        self.templates = state["templates"]
        set_rng_state(state["rng"])


def _mean_sample(samples: Sequence[Sample]) -> Sample:
    """Per example, the mean of several Samples of the same examples (same ids, weights and scale)."""
    first = samples[0]
    for other in samples[1:]:
        if len(other) != len(first) or other.ids != first.ids:
            raise ValueError("an evaluator scored other examples after another edit: cannot average per example")
    values = sum(s.values for s in samples) / len(samples)
    return Sample(values, first.weights, first.ids, first.log, first.higher_is_better)


def run_edits(model, tok, cases, spec: RunSpec | dict, hparams, stats=None, out_dir=None,
              evaluators=None, progress=True, restore=True, meta=None) -> pd.DataFrame:
    """Run ``spec`` and return its tidy table; the model is restored afterwards unless ``restore=False``."""
    if isinstance(spec, dict):
        spec = from_dict(RunSpec, spec, where="run spec")
    run = EditRun(model, tok, cases, spec, hparams, stats, out_dir, evaluators, progress, meta)
    try:
        return run.run()
    finally:
        if restore:
            run.restore()
