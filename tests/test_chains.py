"""Runs that make the same chain of edits share it (kelib.chains): a run evaluates the weights another
kept at its checkpoints instead of editing again, and its table is the one it would have computed."""

import dataclasses
import functools

import pandas as pd
import pytest
import torch

from kelib.editors import EDITORS, get_editor, load_hparams
from kelib.models import get_weight
from kelib.runner import EditRun, RunSpec


@pytest.fixture
def rome(micro):
    return load_hparams("ROME", "kelib-micro")


def weight_sum(model, tok):
    """A stand-in evaluator: it reads the edited weights and draws from the random generators, as lm-eval
    (which seeds them) may; the chain of edits must not depend on it."""
    torch.rand(7)
    return {"w_sum": float(sum(get_weight(model, layer).double().sum() for layer in range(2)))}


weight_sum.key = "weight_sum"


def make_run(micro, stats, hparams, runs_dir, name, share=True, cases=None, **spec):
    model, tok, all_cases = micro
    spec = RunSpec(**{"editor": "ROME", "protocol": "sequential", **spec})
    run = EditRun(model, tok, all_cases if cases is None else cases, spec, hparams, stats,
                  out_dir=runs_dir / name, evaluators={"probe": weight_sum}, progress=False)
    if share:
        run.share_chain_with(runs_dir)
    return run


def never_edit(monkeypatch, editor="ROME"):
    """Makes every call to ``editor`` fail the test (its code identity, and so the run's chain, unchanged)."""
    real = get_editor(editor)

    @functools.wraps(real.compute_update)
    def edit(*args, **kwargs):
        pytest.fail(f"{editor} was called")

    monkeypatch.setitem(EDITORS, editor, dataclasses.replace(real, compute_update=edit))


def run_and_restore(run) -> pd.DataFrame:
    try:
        return run.run()
    finally:
        run.restore()


def test_post_hoc_prune_evaluates_the_unregularized_chain(micro, micro_stats, untouched, rome, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    source = make_run(micro, micro_stats, rome, runs, "none", n_edits=4, checkpoints=[0, 2])
    run_and_restore(source)
    prune = {"regularizer": "PRUNE", "regularizer_params": {"alpha": "linear"}, "n_edits": 4, "checkpoints": [0, 2]}
    computed = run_and_restore(make_run(micro, micro_stats, rome, tmp_path / "alone", "prune", share=False, **prune))

    never_edit(monkeypatch)
    derived_run = make_run(micro, micro_stats, rome, runs, "prune", **prune)
    assert derived_run.chain == source.chain  # post-hoc PRUNE changes only the evaluated view
    derived = run_and_restore(derived_run)
    assert derived_run.chain_source == runs / "none"
    pd.testing.assert_frame_equal(derived, computed)  # row for row, to the bit
    # PRUNE restrains what is evaluated: its weight rows differ from the unregularized run's at 4 edits
    kappa = derived[(derived.metric == "condition_number") & (derived.checkpoint == 4)].value.to_numpy()
    plain = source.table[(source.table.metric == "condition_number") & (source.table.checkpoint == 4)].value.to_numpy()
    assert not (kappa == plain).all()
    for name in ("final_weights.pt",):
        mine, theirs = (torch.load(d / name) for d in (runs / "prune", tmp_path / "alone" / "prune"))
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not (runs / "prune" / "state.pt").exists()


def test_a_shorter_run_is_the_first_edits_of_a_longer_one(micro, micro_stats, untouched, rome, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run_and_restore(make_run(micro, micro_stats, rome, runs, "long", n_edits=4, checkpoints=[0, 2]))
    computed = run_and_restore(make_run(micro, micro_stats, rome, tmp_path / "alone", "short", share=False,
                                        n_edits=2, checkpoints=[0], max_eval_cases=1))
    never_edit(monkeypatch)
    short = make_run(micro, micro_stats, rome, runs, "short", n_edits=2, checkpoints=[0], max_eval_cases=1)
    table = run_and_restore(short)
    assert short.chain_source == runs / "long"
    pd.testing.assert_frame_equal(table, computed)


def test_runs_on_another_chain_edit(micro, micro_stats, untouched, rome, tmp_path):
    runs = tmp_path / "runs"
    model, tok, cases = micro
    source = make_run(micro, micro_stats, rome, runs, "none", n_edits=4, checkpoints=[0, 2])
    run_and_restore(source)
    others = {
        "a regularizer that changes the edits": dict(regularizer="RECT", regularizer_params={"k": 0.5}, n_edits=2),
        "a checkpoint the source did not keep": dict(n_edits=3),
        "other cases": dict(n_edits=2, cases=cases[1:]),
        "another batch size": dict(n_edits=2, batch_size=2),
        "other hyperparameters": dict(n_edits=2, hparams=dataclasses.replace(rome, v_num_grad_steps=3)),
    }
    for why, spec in others.items():
        hparams = spec.pop("hparams", rome)
        run = make_run(micro, micro_stats, hparams, runs, why.replace(" ", "_"), **spec)
        run_and_restore(run)
        assert run.chain_source is None, why
    assert make_run(micro, micro_stats, rome, runs, "single", protocol="single", n_edits=2).chain is None


def test_kept_weights_stand_in_only_for_editors_that_keep_their_edits_in_them(micro, untouched, tmp_path):
    grace = make_run(micro, None, load_hparams("GRACE", "kelib-micro"), tmp_path, "grace", editor="GRACE", n_edits=2)
    assert grace.chain is None  # its codebook is outside the weights
    pmet = make_run(micro, None, load_hparams("PMET", "kelib-micro"), tmp_path, "pmet", editor="PMET", n_edits=2)
    assert pmet.chain is None  # its attention weights are not kept at checkpoints


def test_evaluations_leave_the_random_generators_alone(micro, micro_stats, untouched, rome, tmp_path):
    """The random regularizer draws a mask per edit: whether the run evaluates between edits (with an
    evaluator that draws too) must not change the edits that follow."""
    random_k = {"regularizer": "random", "regularizer_params": {"k": 0.5}, "n_edits": 3}
    dense = make_run(micro, micro_stats, rome, tmp_path / "a", "dense", share=False, checkpoints=[0, 1, 2], **random_k)
    sparse = make_run(micro, micro_stats, rome, tmp_path / "b", "sparse", share=False, checkpoints=[], **random_k)
    assert dense.chain == sparse.chain
    finals = []
    for run in (dense, sparse):
        run_and_restore(run)
        finals.append(torch.load(run.store.out_dir / "final_weights.pt"))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_an_interrupted_run_that_evaluates_a_chain_starts_again(micro, micro_stats, untouched, rome, tmp_path,
                                                               monkeypatch):
    runs = tmp_path / "runs"
    run_and_restore(make_run(micro, micro_stats, rome, runs, "none", n_edits=4, checkpoints=[0, 2]))
    prune = {"regularizer": "PRUNE", "regularizer_params": {"alpha": "linear"}, "n_edits": 4, "checkpoints": [0, 2]}
    reference = run_and_restore(make_run(micro, micro_stats, rome, runs, "reference", **prune))
    stopping = make_run(micro, micro_stats, rome, runs, "prune", **prune)
    real_checkpoint = stopping._checkpoint

    def stop_at_the_end(n_done):
        if n_done == 4:
            raise KeyboardInterrupt
        real_checkpoint(n_done)

    monkeypatch.setattr(stopping, "_checkpoint", stop_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        run_and_restore(stopping)
    assert sorted(pd.read_csv(runs / "prune" / "results.csv").checkpoint.unique()) == [0, 2]
    assert not (runs / "prune" / "final_weights.pt").exists()  # written only when the run is complete
    again = make_run(micro, micro_stats, rome, runs, "prune", **prune)
    pd.testing.assert_frame_equal(run_and_restore(again), reference)
    assert again.chain_source is not None
