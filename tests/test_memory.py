"""The memory a run adds (D4S's state, the statistics), printed before it starts, and refused when it
cannot fit (issue #15, item 5)."""

import pytest
import torch

from kelib import memory
from kelib.memory import MemoryPlanError, check_plan, d4s_state_bytes, run_plan, statistics_bytes
from kelib.models import get_weight
from kelib.regularizers import D4S, D4SParams

GB = 1e9


@pytest.mark.parametrize("d_out, d_in, layers, total_gb", [
    (1600, 6400, 5, 2.05),    # GPT-2 XL (the reference notes' table, float64 on the GPU)
    (4096, 11008, 5, 6.65),   # Llama-2-7B
    (4096, 14336, 5, 10.6),   # Llama-3-8B
])
def test_d4s_state_size_matches_the_reference_table(d_out, d_in, layers, total_gb):
    shapes = {layer: (d_out, d_in) for layer in range(layers)}
    assert d4s_state_bytes(shapes) / GB == pytest.approx(total_gb, rel=0.01)
    assert d4s_state_bytes(shapes, torch.float32) * 2 == d4s_state_bytes(shapes)
    assert statistics_bytes(shapes) == layers * d_in * d_in * 4


def test_plan_counts_the_state_where_it_is_kept(tiny_gpt2):
    model, _ = tiny_gpt2
    d_out, d_in = get_weight(model, 1).shape
    on_device = run_plan(model, "MEMIT", [1, 2], "D4S", {})
    on_cpu = run_plan(model, "MEMIT", [1, 2], "D4S", {"state_device": "cpu"})
    state64 = 2 * (d_out * d_in + d_in * d_in) * 8
    stats = 2 * d_in * d_in * 4
    factors = 2 * d_in * d_in * 8  # MEMIT keeps λC0's Cholesky factor per layer
    solve = (d_in * d_in + d_out * d_in) * 8
    assert on_device.needs == {"cpu": stats + factors + state64 + solve}  # a CPU model: one pool
    assert on_cpu.needs["cpu"] == stats + factors + state64 // 2 + solve
    assert any("D4S state" in line and "float64" in line for line in on_device.lines)
    assert run_plan(model, "ROME", [1]).needs == {"cpu": d_in * d_in * 4 + d_in * d_in * 8}


def test_a_run_that_does_not_fit_is_refused_with_its_plan(tiny_gpt2, monkeypatch, capsys):
    model, _ = tiny_gpt2
    plan = run_plan(model, "MEMIT", [1, 2], "D4S", {})
    monkeypatch.setattr(memory, "available_bytes", lambda device: plan.needs["cpu"] + 1)
    check_plan(plan, "MEMIT + D4S")  # fits: printed, not refused
    printed = capsys.readouterr().out
    assert "kelib: MEMIT + D4S: D4S state A and S of 2 layer(s) (float64)" in printed
    assert "key statistics C0 of 2 layer(s)" in printed
    monkeypatch.setattr(memory, "available_bytes", lambda device: plan.needs["cpu"] - 1)
    with pytest.raises(MemoryPlanError, match=r"MEMIT \+ D4S would not fit: it needs about .* GiB more on cpu"):
        check_plan(plan, "MEMIT + D4S")
    # the regularizer refuses to allocate a state that does not fit, whoever runs it
    w0 = get_weight(model, 1).detach().clone()
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10)
    with pytest.raises(MemoryPlanError, match="D4S would not fit"):
        D4S(D4SParams()).start(model, {1: w0}, {1: torch.eye(w0.shape[1])})
    # a device whose free memory cannot be told refuses nothing
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    check_plan(plan, "MEMIT + D4S")


def test_run_grid_reports_a_run_that_does_not_fit_as_not_run(micro, monkeypatch):
    from kelib import experiments

    model, tok, cases = micro
    setup = experiments.Setup("kelib-micro", model, tok, cases, {})
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    grid = experiments.run_grid(setup, [{"editor": "MEMIT", "regularizer": "D4S"}], n_edits=1, progress=False)
    reasons = experiments.not_run(grid).reason.tolist()
    assert len(reasons) == 1 and "would not fit" in reasons[0] and "state_device: cpu" in reasons[0]
