"""Device placement (issue #21): the seams where tensors from different components meet.

Every test runs on the CPU. Where a second device is needed, the ``meta`` device stands in for an
accelerator: it has shapes and a device of its own but no data, so code that keeps every tensor on
the model's device runs until it first reads a number, and code that leaves a tensor on the CPU is
stopped at the seam by :func:`kelib.models.same_device` (the two bugs of the issue: the tracer's token
ids, the condition-number notebook's final weights). With ``KELIB_TEST_DEVICE=cuda`` the last tests
run the tracer and an edit on the accelerator itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kelib import tracing
from kelib.models import DeviceMismatchError, get_weight, same_device
from tests.conftest import make_tiny_model

PROMPT, SUBJECT, ANSWER = "Danielle Darrieux is a native speaker of", "Danielle Darrieux", "French"


def test_same_device_names_the_devices_and_the_tensors():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    assert same_device(cpu, None, torch.ones(3)) == torch.device("cpu")
    assert same_device() is None
    with pytest.raises(DeviceMismatchError, match=r"the update and W are on different devices \(cpu, meta\)"):
        same_device(cpu, meta, what="the update and W")


def test_tracer_keeps_its_inputs_on_the_model_device(tiny_tokenizer, monkeypatch):
    """On a model on ``meta`` the tracer gets past every seam and fails only where it reads a
    probability; with its token ids left on the CPU (the bug) the seam check stops it."""
    model = make_tiny_model("gpt2", len(tiny_tokenizer), device="cpu").to("meta")
    with pytest.raises(RuntimeError, match="meta") as err:
        tracing.trace_fact(model, tiny_tokenizer, PROMPT, SUBJECT, ANSWER, samples=2, noise=0.1)
    assert not isinstance(err.value, DeviceMismatchError)
    assert "item() cannot be called on meta tensors" in str(err.value)  # the clean run's probability

    monkeypatch.setattr(tracing, "device_of", lambda _model: torch.device("cpu"))  # the old code's ids
    with pytest.raises(DeviceMismatchError, match="token ids and the model's embedding"):
        tracing.trace_fact(model, tiny_tokenizer, PROMPT, SUBJECT, ANSWER, samples=2, noise=0.1)


def test_final_update_is_on_the_device_of_w0(tiny_tokenizer, tmp_path):
    """The condition-number notebook's spectra: W_n (saved from the CPU) minus W_0 (on the model's device)."""
    from kelib import experiments

    model = make_tiny_model("gpt2", len(tiny_tokenizer), device="cpu")
    final = {1: get_weight(model, 1).detach().clone() + 1.0, 2: get_weight(model, 2).detach().clone()}
    torch.save(final, tmp_path / "final_weights.pt")
    layer, w0, delta = experiments.final_update(tmp_path, model)
    assert layer == 2 and torch.equal(delta, torch.zeros_like(delta))
    layer, w0, delta = experiments.final_update(tmp_path, model, layer=1)
    assert torch.allclose(delta, torch.ones_like(delta), atol=1e-6)

    model.to("meta")
    layer, w0, delta = experiments.final_update(tmp_path, model)
    assert w0.device.type == delta.device.type == "meta" and delta.shape == w0.shape
    with pytest.raises(RuntimeError):  # the notebook's old line: final weights as loaded, minus W_0
        experiments.final_weights(tmp_path)[layer].float() - w0


def _fake_editor(device: str):
    """ROME's registration with an update computed on ``device`` whatever the model's."""
    from kelib.editors.base import EditResult

    def compute_update(model, tok, cases, hparams, stats=None, state=None):
        layer = hparams.layers[0]
        return EditResult(deltas={layer: torch.zeros(get_weight(model, layer).shape, device=device)})

    return compute_update


def test_runner_stops_an_update_left_on_another_device(tiny_tokenizer, monkeypatch):
    from kelib.data import EditCase
    from kelib.editors import EDITORS, load_hparams
    from kelib.runner import RunSpec, run_edits

    model = make_tiny_model("gpt2", len(tiny_tokenizer), device="cpu")
    case = EditCase("t/0", "t", SUBJECT, PROMPT, "French", "English")
    hparams = dataclasses.replace(load_hparams("ROME", "kelib-micro"), layers=[1])
    before = get_weight(model, 1).clone()
    monkeypatch.setitem(EDITORS, "ROME", dataclasses.replace(EDITORS["ROME"], compute_update=_fake_editor("meta")))
    with pytest.raises(DeviceMismatchError, match=r"ROME's update of mlp_out at layer 1 and W .*\(meta, cpu\)"):
        run_edits(model, tiny_tokenizer, [case], RunSpec("ROME", n_edits=1), hparams, progress=False)
    assert torch.equal(get_weight(model, 1), before)  # refused before anything was applied


def test_regularizers_refuse_w0_on_another_device():
    from kelib.editors.base import EditResult
    from kelib.regularizers import D4S, PRUNE, RECT, PRUNEParams

    w = torch.randn(8, 12)
    prune = PRUNE(PRUNEParams(alpha="linear"))
    prune.start(None, {0: w}, None)
    prune.originals = {0: w.to("meta")}  # W_0 kept on another device than the weights
    with pytest.raises(DeviceMismatchError, match="PRUNE's W_0"):
        prune.restrained_weight(0, w)
    d4s = D4S()
    d4s.start(None, {0: w.to("meta")}, {0: torch.eye(12)})
    with pytest.raises(DeviceMismatchError, match="D4S's residuals, keys and W_0"):
        d4s.transform(EditResult({0: w}, keys={0: torch.randn(12, 2)}, residuals={0: torch.randn(8, 2)}), None)

    import sys

    with pytest.MonkeyPatch.context() as mp:  # the model's W on another device than the update
        mp.setattr(sys.modules["kelib.regularizers.rect"], "get_weight", lambda model, layer, part: w.to("meta"))
        with pytest.raises(DeviceMismatchError, match="RECT"):
            RECT().transform(EditResult({0: w}), None)


def test_tracing_and_an_edit_on_the_test_device(micro, micro_stats, test_device, untouched):
    """Runs where KELIB_TEST_DEVICE says (the CPU by default, cuda on a GPU machine): the tracer's
    effects and a MEMIT + PRUNE run, everything on the model's device."""
    from kelib.editors import load_hparams
    from kelib.models import device_of
    from kelib.runner import RunSpec, run_edits

    model, tok, cases = micro
    assert device_of(model).type == test_device.type
    case = cases[0]
    trace = tracing.trace_fact(model, tok, case.prompt, case.subject, case.target_true, samples=2)
    assert trace.effect.shape == (len(trace.tokens), model.config.n_layer)
    assert torch.isfinite(trace.effect).all() and 0 <= trace.clean <= 1
    hparams = load_hparams("MEMIT", "kelib-micro")
    table = run_edits(model, tok, cases[:2], RunSpec("MEMIT", n_edits=2, regularizer="PRUNE"), hparams,
                      micro_stats, progress=False)
    assert table[table.metric == "efficacy_success"].value.iloc[0] >= 0.5
