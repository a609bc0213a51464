"""The runner: protocols, per-checkpoint diagnostics, exact restore, resuming an interrupted run."""

import dataclasses

import pandas as pd
import pytest
import torch

from kelib.editors import EDITORS, get_editor, load_hparams
from kelib.models import get_weight
from kelib.runner import RunSpec, run_edits


@pytest.fixture
def rome(micro):
    return load_hparams("ROME", "kelib-micro")


def test_sequential_run_records_diagnostics_and_restores_exactly(micro, micro_stats, untouched, rome):
    model, tok, cases = micro
    layer = rome.layers[0]
    w0 = get_weight(model, layer).detach().clone()
    spec = RunSpec("ROME", "sequential", n_edits=4, checkpoints=[0, 2])
    table = run_edits(model, tok, cases, spec, rome, micro_stats, progress=False)
    weights = table[table.scope == "weights"].pivot_table(index="checkpoint", columns="metric", values="value")
    assert list(weights.index) == [0, 2, 4]
    for metric in ("l1", "l1_per_element", "frobenius", "sigma_max", "sigma_min", "condition_number", "delta_frobenius"):
        assert metric in weights.columns
    assert weights.loc[0, "delta_l1"] == 0
    assert weights.loc[0, "l1"] == pytest.approx(float(w0.abs().sum()), rel=1e-5)
    assert weights.loc[4, "delta_frobenius"] > weights.loc[2, "delta_frobenius"] > 0
    edits = table[table.scope == "edits"].pivot_table(index="checkpoint", columns="metric", values="value")
    assert edits.loc[4, "efficacy_success"] >= 0.75  # all four earlier edits, scored on the final model
    assert torch.equal(get_weight(model, layer), w0)


def test_an_interrupted_run_resumes_where_it_stopped(micro, micro_stats, untouched, rome, tmp_path, monkeypatch):
    model, tok, cases = micro
    spec = RunSpec("ROME", "sequential", n_edits=4, checkpoints=[2])
    reference = run_edits(model, tok, cases, spec, rome, micro_stats, out_dir=tmp_path / "ref", progress=False)

    real = get_editor("ROME")
    calls = []

    def dies_on_third_edit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real.compute_update(*args, **kwargs)

    monkeypatch.setitem(EDITORS, "ROME", dataclasses.replace(real, compute_update=dies_on_third_edit))
    with pytest.raises(KeyboardInterrupt):
        run_edits(model, tok, cases, spec, rome, micro_stats, out_dir=tmp_path / "run", progress=False)
    saved = pd.read_csv(tmp_path / "run" / "results.csv")
    assert sorted(saved.checkpoint.unique()) == [2]
    assert (tmp_path / "run" / "state.pt").exists()

    calls.clear()
    monkeypatch.setitem(EDITORS, "ROME", dataclasses.replace(real, compute_update=lambda *a, **k: (calls.append(1), real.compute_update(*a, **k))[1]))
    resumed = run_edits(model, tok, cases, spec, rome, micro_stats, out_dir=tmp_path / "run", progress=False)
    assert len(calls) == 2  # only edits 3 and 4 are computed again
    assert not (tmp_path / "run" / "state.pt").exists()
    merged = reference.merge(resumed, on=["checkpoint", "scope", "layer", "metric"], how="outer", suffixes=("_ref", "_run"))
    assert len(merged) == len(reference)
    assert ((merged.value_ref - merged.value_run).abs() <= 1e-4 * merged.value_ref.abs().clip(lower=1)).all()

    calls.clear()  # a complete run is read back, not run again
    again = run_edits(model, tok, cases, spec, rome, micro_stats, out_dir=tmp_path / "run", progress=False)
    assert not calls and len(again) == len(resumed)
    with pytest.raises(ValueError, match="different run"):
        run_edits(model, tok, cases, dataclasses.replace(spec, n_edits=3), rome, micro_stats,
                  out_dir=tmp_path / "run", progress=False)


def test_regularizers_plug_into_the_runner(micro, micro_stats, untouched):
    model, tok, cases = micro
    memit = load_hparams("MEMIT", "kelib-micro")
    results = {}
    for reg, params in [("none", {}), ("RECT", {"k": 0.2}), ("PRUNE", {}), ("D4S", {"mom2_update_weight": memit.mom2_update_weight})]:
        spec = RunSpec("MEMIT", "sequential", n_edits=6, batch_size=2, regularizer=reg, regularizer_params=params)
        table = run_edits(model, tok, cases, spec, memit, micro_stats, progress=False)
        results[reg] = table[(table.scope == "weights") & (table.checkpoint == 6)].set_index(["layer", "metric"]).value
    layer = memit.layers[-1]
    # RECT keeps a fifth of each update's entries: the cumulative change has fewer non-zeros, a smaller norm.
    assert results["RECT"][(layer, "delta_l1")] < results["none"][(layer, "delta_l1")]
    # PRUNE only restrains singular values above σmax(W_0): σmax of the edited weight never rises past F's bound.
    assert results["PRUNE"][(layer, "delta_sigma_max")] <= results["none"][(layer, "delta_sigma_max")] + 1e-6


def test_bad_specs_are_errors(micro, rome):
    model, tok, cases = micro
    with pytest.raises(ValueError, match="unknown protocol"):
        RunSpec("ROME", "lifelong")
    with pytest.raises(ValueError, match="checkpoints"):
        RunSpec("ROME", n_edits=3, checkpoints=[5])
    with pytest.raises(ValueError, match="only"):
        run_edits(model, tok, cases[:2], RunSpec("ROME", n_edits=3), rome, progress=False)
    with pytest.raises(ValueError, match="batch_size must be n_edits"):
        RunSpec("MEMIT", "batch", n_edits=4, batch_size=1)  # would silently have run sequentially
    assert RunSpec("MEMIT", "batch", n_edits=4).batch_size == 4
    assert RunSpec("MEMIT", "sequential", n_edits=4).batch_size == 1


def test_per_example_scores_are_kept_per_checkpoint(micro, micro_stats, untouched, tmp_path):
    """The edit metrics of every scored case, and an evaluator's per-example scores, go to
    ``examples/<checkpoint>.json`` beside the table; their means are the table's numbers."""
    from kelib.examples import Sample, Scores, read_examples

    model, tok, cases = micro
    memit = load_hparams("MEMIT", "kelib-micro")

    def evaluator(model, tok):
        values = [float(i % 3 == 0) for i in range(9)]
        return Scores({"thirds": sum(values) / 9}, {"thirds": Sample(values)})

    spec = RunSpec("MEMIT", "sequential", n_edits=4, batch_size=2, checkpoints=[2])
    table = run_edits(model, tok, cases, spec, memit, micro_stats, out_dir=tmp_path, progress=False,
                      evaluators={"toy": evaluator})
    for checkpoint, n_scored in [(2, 2), (4, 4)]:
        found = read_examples(tmp_path, checkpoint)
        efficacy = found["edits"]["efficacy_success"]
        assert len(efficacy) == n_scored and efficacy.ids == tuple(c.case_id for c in cases[:n_scored])
        row = table[(table.checkpoint == checkpoint) & (table.metric == "efficacy_success")].value.item()
        assert efficacy.mean == pytest.approx(row)
        assert found["toy"]["thirds"].mean == pytest.approx(1 / 3)

    single = run_edits(model, tok, cases, RunSpec("ROME", "single", n_edits=3), load_hparams("ROME", "kelib-micro"),
                       micro_stats, out_dir=tmp_path / "single", progress=False)
    per_case = read_examples(tmp_path / "single", 3)["edits"]["efficacy_success"]
    assert per_case.ids == tuple(c.case_id for c in cases[:3])  # the units' cases, concatenated in order
    assert per_case.mean == pytest.approx(single[single.metric == "efficacy_success"].value.item())
