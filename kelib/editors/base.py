"""The editor interface: given a model and a batch of edit cases, return ΔW per layer; never apply it.

An editor is one module that defines a hyperparameter dataclass and a function

    compute_update(model, tok, cases, hparams, stats, state=None) -> EditResult

registered with :func:`register`. The runner applies updates, regularizers transform them. Editors
leave the model exactly as they found it (they may modify weights temporarily, e.g. MEMIT's
layer-by-layer insertion, and restore them before returning).

``state`` is a dict the runner keeps for the editor across the calls of one sequential run (and
saves with the run): AlphaEdit's past keys, GRACE's codebook. An editor that keeps its edits outside
the weights (GRACE) also registers a ``view(model, state)`` context manager, inside which the model
answers with those edits; the runner evaluates inside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Literal, Sequence

import torch

from kelib.config import ConfigError, load_yaml
from kelib.paths import REPO_DIR

HPARAMS_DIR = REPO_DIR / "params" / "hparams"

FactToken = Literal["subject_last", "prompt_last"]


class EditError(ValueError):
    """An edit that cannot be computed: bad case, missing layer, or a non-finite update."""


@dataclass
class EditResult:
    """What an editor returns.

    Attributes:
        deltas: ``{layer: ΔW}`` with ΔW ``d_out x d_in`` (float32, on the model's device), to be added
            to the layer's current W. ``part`` says which projection (``mlp_out`` for all of the papers'
            locate-then-edit methods).
        other_parts: ``{part: {layer: ΔW}}``, updates of further projections (PMET's attention output
            ``attn_out``), applied by the runner like ``deltas``; regularizers see only ``deltas``.
        keys: ``{layer: K}`` (``d_in x n``), the keys the update was solved for (MEMIT-family);
            D4S and AlphaEdit accumulate them.
        residuals: ``{layer: R}`` (``d_out x n``), the residual each layer was asked to write (before
            MEMIT's spread over the remaining layers), measured on the model the editor saw.
        info: scalars worth logging (optimisation loss, steps, target probabilities).
    """

    deltas: dict[int, torch.Tensor]
    part: str = "mlp_out"
    other_parts: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)
    info: dict[str, float] = field(default_factory=dict)

    def check_finite(self) -> None:
        for part, deltas in [(self.part, self.deltas), *self.other_parts.items()]:
            for layer, delta in deltas.items():
                if not torch.isfinite(delta).all():
                    raise EditError(
                        f"the {part} update of layer {layer} contains NaN or inf; the model is left unchanged"
                    )


def _no_view(model, state):
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Editor:
    name: str
    hparams_class: type
    compute_update: Callable[..., EditResult]
    batchable: bool  # whether one call may carry several cases at once
    view: Callable[[object, dict], ContextManager] = _no_view  # edits kept outside the weights

    @property
    def keeps_edits_in_weights(self) -> bool:
        """Whether the edited model is its weights alone (no ``view``, as GRACE's codebook is)."""
        return self.view is _no_view


EDITORS: dict[str, Editor] = {}


def register(name: str, hparams_class: type, batchable: bool, view: Callable | None = None):
    """Register ``compute_update`` under ``name``; each call runs with its context templates pinned
    (:func:`kelib.editors.context.pinned_templates`), to the run's store when the runner gave one."""

    def wrap(fn):
        @functools.wraps(fn)
        def compute_update(*args, **kwargs) -> EditResult:
            from kelib.editors.context import pinned_templates

            with pinned_templates():
                return fn(*args, **kwargs)

        EDITORS[name] = Editor(name, hparams_class, compute_update, batchable, view or _no_view)
        return fn

    return wrap


def edited_parts(hparams) -> tuple[str, ...]:
    """The projections an editor's updates touch: ``hparams.parts`` where it has one (PMET), else the
    MLP output projection."""
    return tuple(getattr(hparams, "parts", ("mlp_out",)))


def get_editor(name: str) -> Editor:
    import kelib.editors  # noqa: F401  (registers the editors)

    if name not in EDITORS:
        raise EditError(f"unknown editor {name!r}; kelib has {sorted(EDITORS)}")
    return EDITORS[name]


# Hub ids and local names of the papers' models -> the file stem of their hyperparameters.
MODEL_KEYS = {
    "gpt2-xl": "gpt2-xl",
    "openai-community/gpt2-xl": "gpt2-xl",
    "eleutherai/gpt-j-6b": "gpt-j-6b",
    "gpt-j-6b": "gpt-j-6b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "llama-2-7b": "llama-2-7b",
    "meta-llama/meta-llama-3-8b": "llama3-8b",
    "meta-llama/llama-3.1-8b": "llama3-8b",
    "llama3-8b": "llama3-8b",
    "smollm2-135m": "smollm2-135m",  # the packaged GGUF (kelib.packaged)
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
}


def model_key(model_name: str) -> str:
    """The hyperparameter file stem for a model name (``kelib-default`` and friends map to themselves)."""
    return MODEL_KEYS.get(model_name.lower(), model_name)


def hparams_path(method: str, model_name: str, hparams_set: str | None = None) -> Path:
    """``params/hparams/<method>/<set>.yaml`` for ``model_name``.

    ``hparams_set`` (a file stem such as ``gpt2-xl``, or a model name :data:`MODEL_KEYS` knows) names the
    set outright: for a model given by a path whose folder name says nothing. Without it the model
    name is tried, then, for a path or a hub id, its last part (``/data/models/gpt2-xl`` finds
    ``gpt2-xl``). A :class:`ConfigError` lists the sets there are when none is found.
    """
    folder = HPARAMS_DIR / method
    if hparams_set:
        tried = [model_key(hparams_set)]
    else:
        tried = [model_key(model_name)]
        base = Path(model_name.rstrip("/\\")).name
        if base and model_key(base) not in tried:
            tried.append(model_key(base))
    for stem in tried:
        if (folder / f"{stem}.yaml").exists():
            return folder / f"{stem}.yaml"
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    asked = f"hparams set {hparams_set!r}" if hparams_set else repr(model_name)
    raise ConfigError(
        f"no hyperparameters for {method} on {asked} (looked for {', '.join(f'{folder}/{t}.yaml' for t in tried)}); "
        f"available sets: {available}. Name one with the notebook parameter `hparams` (e.g. hparams: "
        f"{available[0] if available else 'gpt2-xl'}) for a model whose name is none of them"
    )


def load_hparams(method: str, model_name: str, overrides: dict | None = None, hparams_set: str | None = None):
    """Hyperparameters of ``method`` for a model, from ``params/hparams/<method>/<key>.yaml``.

    ``model_name`` is a hub id, a known short name, a local path or an embedded model
    (``kelib-default``); see :data:`MODEL_KEYS` and :func:`hparams_path` (``hparams_set`` names the
    file outright). ``overrides`` (a dict of field -> value, e.g. from a notebook parameter) are
    applied last and checked like the file's keys.
    """
    editor = get_editor(method)
    path = hparams_path(method, model_name, hparams_set)
    hparams = load_yaml(editor.hparams_class, path)
    if overrides:
        known = {f.name for f in dataclasses.fields(hparams)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown {method} hyperparameter(s) {unknown}; known: {sorted(known)}")
        from kelib.config import from_dict

        hparams = from_dict(editor.hparams_class, {**dataclasses.asdict(hparams), **overrides}, where=str(path))
    return hparams


def check_cases(cases: Sequence, tok) -> None:
    """Reject cases an editor cannot use, before touching the model."""
    from kelib.tokens import TokenError, subject_last_index, with_target

    if not cases:
        raise EditError("no edit cases given")
    for case in cases:
        try:
            subject_last_index(tok, case.prompt, case.subject)
            with_target(tok, case.prompt, case.target_new)
        except TokenError as err:
            raise EditError(f"case {case.case_id}: {err}") from err


def available_hparams() -> dict[str, list[str]]:
    return {
        p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in sorted(Path(HPARAMS_DIR).iterdir()) if p.is_dir()
    }
