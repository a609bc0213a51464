"""Preflight: what would stop or starve a batch, found in seconds before any run starts.

``kelib check MODEL --params VARIANT`` (and the start of ``kelib reproduce``) reads the variant's
notebook parameters and the model's *config* only (no weights: the model is instantiated on the
``meta`` device, which has shapes and no data), then checks, for every editor a notebook would run:

- its hyperparameters exist (``params/hparams/<editor>/<model>.yaml``) and name layers (and parts)
  the model has;
- the regularizer applies to it (:func:`kelib.experiments.supports`);
- MEND is trained for the model where it is needed (embedded models train it on first use);
- the key-statistics corpus is cached, bundled, or reachable (Wikipedia needs the hub online);

and prints a memory plan: the weights in the chosen dtype, the edited matrices in float32 (with the
runner's W_0 copies), the key statistics while they are accumulated on the device, and D4S's state,
against the device's free memory (``torch.cuda.mem_get_info`` on cuda, available RAM on the CPU).
Activations, the optimiser state of FT and MEND's network are not counted.

The same editor checks run at the start of :func:`kelib.experiments.run_grid` with the loaded model
(:func:`editor_problems`), so a notebook reports every run that cannot run before its first run.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


@dataclass
class Finding:
    """One check's outcome: ``ok`` False is a problem that stops a run; notes are information."""

    where: str  # notebook / editor (/ regularizer)
    message: str
    ok: bool = False

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.where}: {self.message}"


@dataclass
class MemoryLine:
    what: str
    nbytes: int
    device: str  # "device" or "cpu"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    memory: list[MemoryLine] = field(default_factory=list)
    available: dict[str, int | None] = field(default_factory=dict)  # "device"/"cpu" -> free bytes
    device: str = "cpu"

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def ok(self) -> bool:
        return not self.problems and all(self._fits(where) is not False for where in ("device", "cpu"))

    def needed(self, where: str) -> int:
        return sum(m.nbytes for m in self.memory if m.device == where)

    def _fits(self, where: str) -> bool | None:
        free = self.available.get(where)
        return None if free is None or not self.needed(where) else self.needed(where) <= free

    def format(self) -> str:
        lines = [str(f) for f in self.findings]
        if self.memory:
            lines.append(f"memory plan on {self.device} (peak of the largest run; activations not counted):")
            lines += [f"  {_gib(m.nbytes):>10}  {m.what}" + ("  [CPU]" if m.device == "cpu" and self.device != "cpu"
                                                           else "") for m in self.memory]
            for where in (("device", "cpu") if self.device != "cpu" else ("device",)):
                free = self.available.get(where)
                label = self.device if where == "device" else "cpu RAM"
                need = self.needed(where)
                if free is None:
                    lines.append(f"  {_gib(need):>10}  needed on {label}; its free memory is unknown here")
                else:
                    verdict = "fits" if need <= free else "DOES NOT FIT"
                    lines.append(f"  {_gib(need):>10}  needed on {label}, {_gib(free)} free: {verdict}")
        n = len(self.problems)
        lines.append("preflight: all checks passed" if self.ok else
                     f"preflight: {n} problem(s)" + ("" if all(self._fits(w) is not False for w in ("device", "cpu"))
                                                     else ", and the memory plan does not fit"))
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# The model from its config


def model_config(model_name: str):
    """``(config, name_or_path, note)`` of ``model_name`` without loading weights.

    Embedded models: the built model's ``config.json``, or (not built yet) the recipe's shape.
    Hub ids and local paths: ``transformers.AutoConfig`` (offline, from the hub cache only)."""
    from transformers import AutoConfig

    from kelib.models import EMBEDDED_MODELS

    if model_name in EMBEDDED_MODELS:
        from kelib.embedded.recipe import load_recipe
        from kelib.embedded.store import model_dir

        recipe_name = model_name.removeprefix("kelib-")
        folder = model_dir(recipe_name)
        if (folder / "report.json").exists():
            return AutoConfig.from_pretrained(folder), str(folder), None
        from transformers import GPT2Config

        recipe = load_recipe(recipe_name)
        config = GPT2Config(n_layer=recipe.n_layer, n_embd=recipe.n_embd, n_head=recipe.n_head,
                            n_positions=recipe.n_positions, vocab_size=recipe.vocab_size,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0)
        config._name_or_path = str(folder)
        return config, str(folder), (f"{model_name} is not built yet: the first notebook builds it "
                                     f"(`kelib build-model {recipe_name}`); MEND and statistics follow it")
    return AutoConfig.from_pretrained(model_name), model_name, None


def meta_model(config):
    """The model of ``config`` on the ``meta`` device: module names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Editor checks (shared with run_grid)


def runs_of(params: dict) -> list[dict]:
    """The runs a notebook's parameters ask for: ``runs``, ``editors`` x ``regularizers`` (the
    supported pairs, as regularizer_recovery builds them) or one ``editor`` (the tour)."""
    from kelib.experiments import supports

    if isinstance(params.get("runs"), list):
        return [r for r in params["runs"] if isinstance(r, dict) and "editor" in r]
    if isinstance(params.get("editors"), list):
        regs = params.get("regularizers") or ["none"]
        return [{"editor": e, "regularizer": r} for e in params["editors"] for r in regs if supports(e, r)]
    if isinstance(params.get("editor"), str):
        return [{"editor": params["editor"]}]
    return []


def _setting(run: dict) -> str:
    """How run_grid names a run (:func:`kelib.experiments.run_setting`)."""
    from kelib.experiments import run_setting

    return run_setting(run)


def editor_problems(model, model_name: str, runs: Sequence[dict], hparams_overrides: dict | None = None,
                    statistics: bool = False, hparams_set: str | None = None) -> dict[str, str]:
    """``{setting: reason}`` for every run of ``runs`` that cannot run on ``model`` (loaded, or on
    ``meta`` from its config): missing hyperparameters, layers or parts the model lacks, a regularizer
    that does not apply, MEND not trained (for a model that does not train it on first use), and with
    ``statistics`` a key-statistics corpus neither cached nor reachable."""
    problems: dict[str, str] = {}
    for run in runs:
        overrides = {**((hparams_overrides or {}).get(run["editor"]) or {}), **(run.get("overrides") or {})}
        reason = _run_problem(model, model_name, run, overrides or None, statistics, hparams_set)
        if reason:
            problems.setdefault(_setting(run), reason)
    return problems


def _run_problem(model, model_name, run, overrides, statistics, hparams_set=None) -> str | None:
    from kelib.config import ConfigError
    from kelib.editors import load_hparams
    from kelib.editors.base import EditError, edited_parts
    from kelib.experiments import supports
    from kelib.models import ModelError, check_layer, edited_module
    from kelib.regularizers import REGULARIZERS

    editor, regularizer = run["editor"], run.get("regularizer", "none")
    try:
        hparams = load_hparams(editor, model_name, overrides, hparams_set=hparams_set)
    except (ConfigError, EditError) as err:
        return " ".join(str(err).split())
    if regularizer not in REGULARIZERS:
        return f"unknown regularizer {regularizer!r}; kelib has {sorted(REGULARIZERS)}"
    if not supports(editor, regularizer):
        return f"{regularizer} does not apply to {editor} (kelib.experiments.supports)"
    try:
        for layer in hparams.layers:
            check_layer(model, layer)
            for part in edited_parts(hparams):
                edited_module(model, layer, part)
    except ModelError as err:
        return f"{editor}'s hyperparameters name layers the model lacks: {err}"
    if editor == "MEND":
        reason = mend_problem(model, hparams)
        if reason:
            return reason
    if statistics:
        found = statistics_status(model, hparams)
        if found is not None and not found[0]:
            return found[1]
    return None


def mend_problem(model, hparams) -> str | None:
    """Why MEND cannot edit ``model`` with ``hparams`` (not trained, and not an embedded model that
    trains it on first use), or None."""
    from kelib.editors.base import EditError
    from kelib.editors.mend import embedded_dir, mend_path

    try:
        path = mend_path(model, hparams)
    except EditError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 (a cache key that needs the weights: cannot tell from a config)
        return None if _is_meta(model) else f"cannot locate MEND's trained network: {type(err).__name__}: {err}"
    if path.exists() or embedded_dir(model) is not None or _embedded_not_built(model):
        return None
    if _is_meta(model) and any(path.parent.glob("*.pt")):
        # the cache is keyed by the weights, which a config cannot show: a network trained for a model
        # of this name is taken as found (the run itself checks the weights)
        return None
    name = str(getattr(model.config, "_name_or_path", ""))
    return (f"MEND is not trained for {name!r} with these hyperparameters (no {path}): run "
            f"`kelib train-mend {name}` once (add --device cuda on a GPU)")


def _is_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _embedded_not_built(model) -> bool:
    from kelib.paths import cache_dir

    name = str(getattr(model.config, "_name_or_path", ""))
    return bool(name) and Path(name).parent == cache_dir("models") and not (Path(name) / "report.json").exists()


def statistics_status(model, hparams) -> tuple[bool, str] | None:
    """``(ok, message)`` about the key statistics ``hparams`` need (None for editors without them)."""
    from kelib.stats import CORPORA, SecondMomentSettings, stats_path, stats_spec_for

    if not isinstance(hparams, SecondMomentSettings):
        return None
    spec = stats_spec_for(hparams)
    try:
        paths = [stats_path(model, layer, spec) for layer in hparams.layers]
        cached = all(p.exists() for p in paths)
        if not cached and _is_meta(model):
            # keyed by the weights, which a config cannot show: statistics of these layers for a model
            # of this name are taken as found (the run itself checks the weights)
            cached = all(any(p.parent.glob(f"layer{layer}_mlp_out_*.pt")) for layer, p in zip(hparams.layers, paths))
    except Exception:  # noqa: BLE001 (a cache key that needs the weights: unknown from a config)
        cached = False
    if cached:
        return True, f"key statistics ({spec.corpus}) cached for layers {list(hparams.layers)}"
    if spec.corpus == "wikipedia":
        reachable = _hub_reachable()
        if not reachable:
            return False, ("key statistics need Wikipedia (wikimedia/wikipedia via datasets), which is neither "
                           "cached for this model nor reachable (offline or HF_DATASETS_OFFLINE set); compute them "
                           "online once, or use mom2_dataset: wikitext2")
        return True, f"key statistics: Wikipedia reachable, {spec.n_tokens} tokens to compute"
    return True, f"key statistics: {CORPORA[spec.corpus].split(',')[0]}, computed on first use"


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) in ("1", "true", "True") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Memory


def memory_plan(model, model_name: str, dtype: str, notebook_runs: dict[str, list[dict]],
                hparams_set: str | None = None) -> list[MemoryLine]:
    """The device memory of the weights and of the largest run's extras, plus the statistics."""
    from kelib.config import ConfigError
    from kelib.editors import load_hparams
    from kelib.editors.base import EditError, edited_parts
    from kelib.models import get_weight
    from kelib.regularizers import D4SParams
    from kelib.stats import SecondMomentSettings, stats_spec_for

    n_params = sum(p.numel() for p in model.parameters())
    lines = [MemoryLine(f"weights: {n_params / 1e6:,.1f}M parameters in {dtype}", n_params * BYTES[dtype], "device")]
    half = BYTES[dtype] < 4
    worst: tuple[int, list[MemoryLine]] = (0, [])
    stats_device, stats_cpu = 0, 0
    seen_stats: set = set()
    for runs in notebook_runs.values():
        for run in runs:
            try:
                hparams = load_hparams(run["editor"], model_name, run.get("overrides"), hparams_set=hparams_set)
            except (ConfigError, EditError):
                continue
            try:
                shapes = [(layer, part, tuple(get_weight(model, layer, part).shape))
                          for layer in hparams.layers for part in edited_parts(hparams)]
            except Exception:  # noqa: BLE001, S112 (reported by the editor checks)
                continue
            numel = sum(a * b for _, _, (a, b) in shapes)
            extra = [MemoryLine(f"{_setting(run)}: W_0 copies of {len(shapes)} edited matrices (float32)",
                                numel * 4, "device")]
            if half:
                extra.append(MemoryLine(f"{_setting(run)}: edited matrices kept in float32", numel * (4 - BYTES[dtype]),
                                        "device"))
            if run.get("regularizer") == "D4S":
                from kelib.config import from_dict
                from kelib.memory import d4s_state_bytes, d4s_state_placement

                d4s_params = from_dict(D4SParams, run.get("regularizer_params") or {}, where="D4S")
                where, state = d4s_state_placement(d4s_params, "meta")  # meta: the model's device
                mlp = {layer: shape for layer, part, shape in shapes if part == "mlp_out"}
                extra.append(MemoryLine(f"{_setting(run)}: D4S state A and S ({str(state).removeprefix('torch.')})",
                                        d4s_state_bytes(mlp, state), "cpu" if where.type == "cpu" else "device"))
            total = sum(m.nbytes for m in extra)
            if total > worst[0]:
                worst = (total, extra)
            if isinstance(hparams, SecondMomentSettings):  # an editor's layers are accumulated in one pass
                spec = stats_spec_for(hparams)
                squares = {layer: b * b for layer, part, (_, b) in shapes if part == "mlp_out"}
                stats_device = max(stats_device, sum(squares.values()) * BYTES[spec.dtype])
                for layer, square in squares.items():
                    if (layer, spec) not in seen_stats:
                        seen_stats.add((layer, spec))
                        stats_cpu += square * 4
    lines += worst[1]
    if stats_device:
        lines.append(MemoryLine("key statistics K Kᵀ while accumulated (one editor's layers at once)", stats_device,
                                "device"))
    if stats_cpu:
        lines.append(MemoryLine(f"key statistics C0 kept for {len(seen_stats)} layer(s) (float32)", stats_cpu, "cpu"))
    return lines


def free_memory(device: str) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on cuda (None without cuda here), else
    the available system RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


# ---------------------------------------------------------------------------------------------
# A variant


def notebook_settings(source: Path, params: dict) -> dict:
    """The notebook's parameters as it will run: its defaults (from the parameters cell) updated by
    ``params``."""
    from kelib.reproduce import notebook_parameters

    settings = {}
    for name, p in notebook_parameters(source).items():
        try:
            settings[name] = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError, TypeError):
            continue
    return {**settings, **params}


def check_variant(variant_dir: str | Path, model_name: str | None = None, device: str | None = None,
                  dtype: str | None = None, only: list[str] | None = None,
                  notebooks_dir: str | Path | None = None, overrides: dict | None = None) -> Report:
    """Preflight of every notebook of a params variant (see the module docstring); ``model_name``,
    ``device`` and ``dtype`` override the notebooks' own, ``overrides`` any parameter (as
    ``kelib reproduce --set`` does)."""
    from kelib.reproduce import validate_variant

    plan = validate_variant(variant_dir, only, notebooks_dir, overrides)
    by_model: dict[tuple, dict[str, list[dict]]] = {}
    report = Report()
    for name, source, params in plan:
        settings = notebook_settings(source, params)
        runs = runs_of(settings)
        model = model_name or settings.get("model_name")
        if not runs or not model:
            continue
        key = (model, device or settings.get("device", "cpu"), dtype or settings.get("dtype", "float32"),
               settings.get("hparams") or None)
        by_model.setdefault(key, {})[name] = runs
    if not by_model:
        report.findings.append(Finding("preflight", "no notebook of this variant names a model and editors", ok=True))
        return report
    for (model, dev, dt, hparams_set), notebook_runs in by_model.items():
        check_model(model, dev, dt, notebook_runs, report, hparams_set)
    return report


def check_model(model_name: str, device: str, dtype: str, notebook_runs: dict[str, list[dict]],
                report: Report | None = None, hparams_set: str | None = None) -> Report:
    """The checks and memory plan for one model's notebooks (``{notebook: runs}``), into ``report``;
    ``hparams_set`` names the editors' hyperparameter files for a model given by a path."""
    report = report or Report()
    report.device = device
    if dtype not in BYTES or dtype == "float64":
        report.findings.append(Finding(model_name, f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16"))
        return report
    try:
        config, path, note = model_config(model_name)
    except Exception as err:  # noqa: BLE001 (offline hub, bad path: reported, not raised)
        report.findings.append(Finding(model_name, f"cannot read the model's config: {type(err).__name__}: "
                                                   f"{str(err).splitlines()[0] if str(err) else ''}"))
        return report
    if note:
        report.findings.append(Finding(model_name, note, ok=True))
    from kelib.models import ModelError, architecture

    model = meta_model(config)
    model.config._name_or_path = path
    try:
        architecture(model)
    except ModelError as err:
        report.findings.append(Finding(model_name, str(err)))
        return report
    report.findings.append(Finding(model_name, f"config read ({config.model_type}, "
                                               f"{model.config.num_hidden_layers} layers), no weights loaded", ok=True))
    for notebook, runs in notebook_runs.items():
        problems = editor_problems(model, model_name, runs, statistics=True, hparams_set=hparams_set)
        for setting, reason in problems.items():
            report.findings.append(Finding(f"{notebook} / {setting}", reason))
        checked = [s for s in dict.fromkeys(_setting(r) for r in runs) if s not in problems]
        if checked:
            report.findings.append(Finding(notebook, f"hyperparameters, layers, MEND and statistics ok for "
                                                     f"{', '.join(checked)}", ok=True))
    report.memory += memory_plan(model, model_name, dtype, notebook_runs, hparams_set)
    report.available = {"device": free_memory(device)}
    if torch.device(device).type != "cpu":
        report.available["cpu"] = free_memory("cpu")
    else:  # one memory: the CPU lines count against the same RAM
        report.memory = [dataclasses.replace(m, device="device") for m in report.memory]
    return report
