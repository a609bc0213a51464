"""Half-precision models (issue #20): edited matrices kept in float32, updates applied as computed,
FT finite in float16, and an update lost in the apply is a clear error.

Stand-ins: the tiny random LLaMA and GPT-J of conftest (GPT-2's Conv1D where the hooks matter),
cast to float16 or bfloat16 as ``load_model(dtype=...)`` would load them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_tiny_model
from kelib import models
from kelib.data import EditCase
from kelib.diagnostics import weight_diagnostics
from kelib.editors import EDITORS, get_editor
from kelib.editors.base import EditError, EditResult
from kelib.editors.ft import FTHyperParams
from kelib.editors.memit import MEMITHyperParams
from kelib.runner import EditRun, RunSpec

HALF = [torch.float16, torch.bfloat16]

CASES = [
    EditCase("tiny/0", "tiny", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French", "English"),
    EditCase("tiny/1", "tiny", "Michel Rocard", "Michel Rocard is a native speaker of", "French", "Italian"),
]


class IdentityStats:
    """C0 = I for every layer and part: MEMIT without a prior over keys, enough to place an update."""

    def __init__(self, model, part: str = "mlp_out"):
        self.model, self.part = model, part

    def prefetch(self, layers) -> None:
        pass

    def __getitem__(self, layer: int) -> torch.Tensor:
        return torch.eye(models.weight_shape(self.model, layer, self.part)[1])

    def for_part(self, part: str) -> "IdentityStats":
        return IdentityStats(self.model, part)


def half_model(family: str, dtype: torch.dtype, tok):
    return make_tiny_model(family, len(tok)).to(dtype)


def memit_hparams(**changes) -> MEMITHyperParams:
    return MEMITHyperParams(layers=[0, 1], v_num_grad_steps=5, context_template_starts=["The"],
                            context_template_length=3, mom2_update_weight=10.0, **changes)


def dtypes_outside(model, sites) -> set[torch.dtype]:
    edited = {id(p) for layer, part in sites for p in models.edited_module(model, layer, part).parameters()}
    return {p.dtype for p in model.parameters() if id(p) not in edited}


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama"])
@pytest.mark.parametrize("dtype", HALF)
def test_keep_in_float32_converts_only_the_edited_modules(family, dtype, tiny_tokenizer):
    """The edited projections become float32, the rest stays in half precision, the model's outputs
    stay in its dtype and move only by the float32 rounding of those matrix products; idempotent;
    released, the model is as it was, bit for bit and dtype for dtype."""
    model = half_model(family, dtype, tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("The mother tongue of Danielle Darrieux is")["input_ids"]])
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sites = [(0, "mlp_out"), (1, "mlp_out"), (1, "attn_out")]
    added = models.keep_in_float32(model, sites)
    expected = sum(models.edited_module(model, layer, part).weight.numel() * 2 for layer, part in sites)
    assert added >= expected  # weights (+ biases where the family has them): 4 bytes instead of 2
    assert all(models.get_weight(model, layer, part).dtype == torch.float32 for layer, part in sites)
    assert dtypes_outside(model, sites) == {dtype}
    assert models.keep_in_float32(model, sites) == 0  # idempotent: no second conversion, no second hook
    module = models.edited_module(model, 1)
    assert len(module._forward_pre_hooks) == 1 and len(module._forward_hooks) == 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.dtype == dtype
    assert torch.allclose(after.float(), before.float(), atol=0.05, rtol=0.05)
    models.release_float32(model, sites)
    assert not module._forward_pre_hooks and not module._forward_hooks
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in before_state.items())


@pytest.mark.parametrize("family", ["gptj", "llama"])
@pytest.mark.parametrize("dtype", HALF)
def test_memit_update_lands_exactly_on_a_half_precision_model(family, dtype, tiny_tokenizer, monkeypatch, capsys):
    """Two sequential MEMIT batches on a half-precision stand-in: the edited matrices hold
    (W0 + ΔW1) + ΔW2 summed in float32, bit for bit what a float32 model holds, the diagnostics
    describe that float32 matrix, the rest of the model stays in half precision, and ``restore``
    gives back the half-precision model exactly."""
    tok = tiny_tokenizer
    model = half_model(family, dtype, tok)
    hp = memit_hparams()
    sites = [(layer, "mlp_out") for layer in hp.layers]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    w0 = {layer: models.get_weight(model, layer).float().clone() for layer in hp.layers}
    real = get_editor("MEMIT")
    computed = []

    def recording(*args, **kwargs):
        result = real.compute_update(*args, **kwargs)
        computed.append({layer: d.clone() for layer, d in result.deltas.items()})
        return result

    monkeypatch.setitem(EDITORS, "MEMIT", dataclasses.replace(real, compute_update=recording))
    run = EditRun(model, tok, CASES, RunSpec("MEMIT", "sequential", n_edits=2, batch_size=1), hp,
                  IdentityStats(model), progress=False)
    table = run.run()
    assert "kept in float32" in capsys.readouterr().out  # the memory cost is printed
    assert len(computed) == 2
    assert all(models.get_weight(model, layer).dtype == torch.float32 for layer in hp.layers)
    assert dtypes_outside(model, sites) == {dtype}
    weights = table[table.scope == "weights"].set_index(["layer", "metric"]).value
    for layer in hp.layers:
        stored = models.get_weight(model, layer)
        # exactly what float32 storage holds after the same two updates (what a float32 model gets)
        assert torch.equal(stored, (w0[layer] + computed[0][layer]) + computed[1][layer])
        intended = (computed[0][layer] + computed[1][layer]).double()
        applied = stored.double() - w0[layer].double()
        error = float((applied - intended).norm() / intended.norm())
        # The change read back is the intended one up to float32's own rounding of W + ΔW (two sums,
        # at most half an ulp per entry each), as on a float32 model: measured 1e-4 of ΔW on the LLaMA
        # stand-in (|ΔW| / |W| = 3.4e-4, MEMIT's size on real models), 1e-5 on GPT-J (4e-3).
        assert float((applied - intended).norm()) <= 2 * 2**-24 * float(stored.double().norm())
        # Added to the half-precision weight, the same update loses far more: measured on LLaMA 0.91
        # (bfloat16) and 0.46 (float16) of it, the 0.89 and 0.45; on GPT-J 0.41 and 0.06.
        in_half = float(((w0[layer].to(dtype).double() + intended).to(dtype).double() - w0[layer].double()
                         - intended).norm() / intended.norm())
        assert in_half > 100 * error
        expected = weight_diagnostics(models.get_weight(model, layer), w0[layer])
        for metric in ("l1", "delta_frobenius", "condition_number"):
            assert weights[(layer, metric)] == pytest.approx(expected[metric], rel=1e-6)
    run.restore()
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in state_before.items())


def test_ft_update_is_finite_in_float16(tiny_tokenizer):
    """FT trains W in float32 even on a float16 model (its Adam state underflowed to 0 / 0 = NaN),
    and leaves the model as it found it."""
    model = half_model("llama", torch.float16, tiny_tokenizer)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = FTHyperParams(layers=[1], lr=1e-3, num_steps=5, norm_constraint=5e-3)
    result = get_editor("FT").compute_update(model, tiny_tokenizer, CASES, hp)
    delta = result.deltas[1]
    assert torch.isfinite(delta).all() and delta.abs().max() > 0
    assert delta.abs().max() <= hp.norm_constraint * (1 + 1e-5)  # float32 rounding of (W + ΔW) - W
    assert torch.isfinite(torch.tensor(result.info["loss"]))
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in state_before.items())


def test_ft_runs_in_the_runner_on_a_float16_model(tiny_tokenizer):
    model = half_model("llama", torch.float16, tiny_tokenizer)
    hp = FTHyperParams(layers=[1], lr=1e-3, num_steps=5, norm_constraint=5e-3)
    run = EditRun(model, tiny_tokenizer, CASES, RunSpec("FT", "sequential", n_edits=2), hp, progress=False)
    try:
        table = run.run()
    finally:
        run.restore()
    delta = table[(table.scope == "weights") & (table.metric == "delta_frobenius")].value
    assert delta.notna().all() and (delta > 0).all()


def small_update_editor(scale: float):
    """An editor whose ΔW is ``scale`` times a fixed random sign pattern times |W| (MEMIT's relative
    size is about 3e-4 on real models)."""

    def compute_update(model, tok, cases, hparams, stats=None, state=None):
        g = torch.Generator().manual_seed(0)
        deltas = {}
        for layer in hparams.layers:
            w = models.get_weight(model, layer).float()
            signs = torch.randint(0, 2, w.shape, generator=g).float() * 2 - 1
            deltas[layer] = scale * w.abs() * signs
        return EditResult(deltas=deltas)

    return compute_update


def test_an_update_that_does_not_land_is_a_clear_error(tiny_tokenizer, monkeypatch):
    """The applied-update check: an apply that drops the update, or half-precision storage that rounds
    a small update away (the runner's float32 switched off), stops the run naming layer and dtype."""
    from kelib import edited_weights

    tok = tiny_tokenizer
    model = half_model("llama", torch.bfloat16, tok)
    hp = memit_hparams()
    real = get_editor("MEMIT")
    monkeypatch.setitem(EDITORS, "MEMIT", dataclasses.replace(real, compute_update=small_update_editor(3e-4)))
    spec = RunSpec("MEMIT", "sequential", n_edits=1)

    dropped = EditRun(model, tok, CASES, spec, hp, IdentityStats(model), progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(edited_weights, "set_weight", lambda *args, **kwargs: None)
        with pytest.raises(EditError, match=r"mlp_out at layer 0 was not applied as computed.*float32.*1 away"):
            dropped.run()
    dropped.restore()

    rounded = EditRun(model, tok, CASES, spec, hp, IdentityStats(model), progress=False)
    monkeypatch.setattr(EditRun, "_keep_in_float32", lambda self: None)
    with pytest.raises(EditError, match=r"stored in bfloat16, the applied change is (1|0\.9\d*) away"):
        rounded.run()
    rounded.restore()
    assert models.get_weight(model, 0).dtype == torch.bfloat16


def test_a_run_that_cannot_run_is_reported_and_the_grid_goes_on(tiny_tokenizer, monkeypatch, tmp_path, capsys):
    """run_grid on a float16 stand-in: MEND, untrained for it, is reported as not run with its reason
    (printed, in ``not_run`` and in the description every figure caption shows); FT runs."""
    from kelib import experiments

    model = half_model("llama", torch.float16, tiny_tokenizer)
    monkeypatch.setattr(experiments, "statistics_for", lambda model, tok, hparams, progress=True: IdentityStats(model))
    monkeypatch.setattr(experiments, "cache_dir", lambda *parts: tmp_path.joinpath(*parts))
    setup = experiments.Setup("kelib-micro", model, tiny_tokenizer, CASES, {}, {"model": "tiny LLaMA", "dtype": "float16"})
    grid = experiments.run_grid(setup, [{"editor": "MEND"}, {"editor": "FT"}], n_edits=2, progress=False)
    skipped = experiments.not_run(grid)
    assert list(skipped.editor) == ["MEND"] and "MEND" in skipped.reason[0]
    assert "MEND not run: " in capsys.readouterr().out
    assert setup.description["not run"].startswith("MEND (")
    assert set(grid.editor) == {"FT"}
    delta = grid[(grid.scope == "weights") & (grid.metric == "delta_frobenius") & (grid.checkpoint == 2)].value
    assert len(delta) == 1 and 0 < float(delta.iloc[0]) < float("inf")
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # the model leaves the grid as it came


def test_a_float64_model_is_restored_exactly(tiny_tokenizer):
    """The originals are kept in at least float32, never narrowed: a float64 model comes back bit for bit."""
    tok = tiny_tokenizer
    model = make_tiny_model("llama", len(tok)).double()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = memit_hparams()
    w0 = models.get_weight(model, hp.layers[0]).clone()
    run = EditRun(model, tok, CASES, RunSpec("MEMIT", "sequential", n_edits=1), hp, IdentityStats(model),
                  progress=False)
    assert all(w.dtype == torch.float64 for w in run.originals.values())
    run.run()
    assert not torch.equal(models.get_weight(model, hp.layers[0]), w0)  # the edit landed
    run.restore()
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in state_before.items())



def test_runs_that_cannot_run_are_reported_before_the_first_run(tiny_tokenizer, monkeypatch, tmp_path, capsys):
    """Issue #21: an untrained MEND (and hyperparameters naming a layer the model lacks) are found
    before the grid's first run starts, not when their turn comes."""
    import dataclasses

    from kelib import experiments
    from kelib.editors import base

    model = half_model("llama", torch.float16, tiny_tokenizer)
    monkeypatch.setattr(experiments, "statistics_for", lambda model, tok, hparams, progress=True: IdentityStats(model))
    monkeypatch.setattr(experiments, "cache_dir", lambda *parts: tmp_path.joinpath(*parts))
    real_load = base.load_hparams

    def load(method, model_name, overrides=None, hparams_set=None):  # KN's file names a layer the model lacks
        hp = real_load(method, model_name, overrides, hparams_set=hparams_set)
        return dataclasses.replace(hp, layers=[7]) if method == "KN" else hp

    monkeypatch.setattr("kelib.editors.load_hparams", load)
    started = []
    real_run_one = experiments._run_one
    monkeypatch.setattr(experiments, "_run_one", lambda setup, run, *a: started.append(run["editor"]) or
                        real_run_one(setup, run, *a))
    setup = experiments.Setup("kelib-micro", model, tiny_tokenizer, CASES, {}, {})
    grid = experiments.run_grid(setup, [{"editor": "FT"}, {"editor": "MEND"}, {"editor": "KN"}], n_edits=2,
                                progress=False)
    out = capsys.readouterr().out
    header = out.index("Checked before the first run: 2 setting(s) cannot run")
    assert header < out.index("MEND not run: ") and header < out.index("KN not run: ")
    assert "layer 7 does not exist" in out
    assert started == ["FT"]  # neither MEND nor KN was started
    assert list(experiments.not_run(grid).editor) == ["MEND", "KN"]
