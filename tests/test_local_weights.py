"""Local weights and offline use (issue #15, item 3): hyperparameters found for a model given by path,
caches keyed by the weights rather than the folder name, the statistics corpus chosen per notebook."""

import dataclasses

import pytest
import torch

from kelib import stats
from kelib.config import ConfigError
from kelib.editors import load_hparams
from kelib.editors.base import hparams_path
from kelib.models import identity_fingerprint, load_model, set_weight, get_weight
from kelib.stats import StatsSpec, check_corpus, corpus_version

SPEC = StatsSpec(n_tokens=400, max_length=16, batch_size=4)


@pytest.fixture
def two_folders(tmp_path, tiny_tokenizer):
    """Two random GPT-2s saved as ``a/model`` and ``b/model``: same folder name, other weights."""
    from tests.conftest import make_tiny_model

    folders = []
    for seed, parent in enumerate("ab"):
        folder = tmp_path / parent / "model"
        make_tiny_model("gpt2", len(tiny_tokenizer), seed=seed).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_same_folder_name_other_weights_get_other_statistics_and_mend(two_folders, tmp_path, monkeypatch):
    from kelib.editors.mend import mend_path

    monkeypatch.setenv("KELIB_CACHE", str(tmp_path / "cache"))
    (m1, tok1), (m2, tok2) = (load_model(str(f)) for f in two_folders)
    assert stats.model_id(m1) == stats.model_id(m2) == "model"  # the name alone cannot tell them apart
    c1 = stats.second_moments(m1, tok1, [1], SPEC, progress=False)[1]
    c2 = stats.second_moments(m2, tok2, [1], SPEC, progress=False)[1]
    assert stats.stats_path(m1, 1, SPEC) != stats.stats_path(m2, 1, SPEC)
    assert not torch.allclose(c1, c2, rtol=1e-3)
    assert torch.allclose(c2, stats.second_moments(m2, tok2, [1], SPEC, progress=False)[1])
    hp = dataclasses.replace(load_hparams("MEND", "gpt2-xl"), layers=[1])
    assert mend_path(m1, hp) != mend_path(m2, hp)
    assert mend_path(m1, hp).parent == mend_path(m2, hp).parent  # same folder (by name), other files


def test_identity_is_taken_once_and_survives_in_place_edits(tiny_gpt2):
    model, _ = tiny_gpt2
    first = identity_fingerprint(model)
    w0 = get_weight(model, 1).detach().clone()
    set_weight(model, 1, w0 + 1.0)  # a sequential run edits in place: C0 stays the starting model's
    assert identity_fingerprint(model) == first
    set_weight(model, 1, w0)
    from tests.conftest import make_tiny_model

    other = make_tiny_model("gpt2", model.config.vocab_size, seed=3)
    assert identity_fingerprint(other) != first


def test_hparams_found_by_a_paths_basename_or_named_outright():
    assert hparams_path("ROME", "/data/models/gpt2-xl").stem == "gpt2-xl"
    assert hparams_path("ROME", "/data/models/gpt2-xl/").stem == "gpt2-xl"
    assert hparams_path("MEMIT", "/data/models/my-llama", hparams_set="llama3-8b").stem == "llama3-8b"
    assert hparams_path("MEMIT", "whatever", hparams_set="meta-llama/Meta-Llama-3-8B").stem == "llama3-8b"
    assert load_hparams("ROME", "/data/models/gpt2-xl") == load_hparams("ROME", "gpt2-xl")
    with pytest.raises(ConfigError, match=r"no hyperparameters for ROME on '/data/models/opt-13b'.*available sets: \[.*'gpt2-xl'.*\].*`hparams`"):
        load_hparams("ROME", "/data/models/opt-13b")
    with pytest.raises(ConfigError, match="hparams set 'gpt3'"):
        load_hparams("ROME", "/data/models/gpt2-xl", hparams_set="gpt3")


def test_a_folder_of_text_is_a_corpus_keyed_by_its_contents(tmp_path, tiny_gpt2):
    model, tok = tiny_gpt2
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("The capital of France is Paris.\n\nDanielle Darrieux is a native\nspeaker of French.\n\n" * 20)
    spec = StatsSpec(corpus=str(folder), n_tokens=200, max_length=16, batch_size=4)
    texts = list(stats._texts(str(folder)))
    assert texts[:2] == ["The capital of France is Paris.", "Danielle Darrieux is a native speaker of French."]
    c = stats.second_moments(model, tok, [1], spec, progress=False)[1]
    assert c.shape == (128, 128) and torch.isfinite(c).all()
    version = corpus_version(str(folder))
    (folder / "b.txt").write_text("Toko Yasuda plays the guitar.\n")
    assert corpus_version(str(folder)) != version
    assert check_corpus("wikitext2") == "wikitext2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        check_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown corpus 'reddit'.*folder of text"):
        StatsSpec(corpus="reddit")


def test_stats_corpus_and_hparams_set_flow_from_the_setup(micro):
    from kelib import experiments

    model, tok, cases = micro
    with pytest.raises(ConfigError, match="stats_corpus: unknown corpus"):
        experiments.load_setup("kelib-micro", stats_corpus="no-such-corpus")
    plain = experiments.Setup("kelib-micro", model, tok, cases, {})
    assert experiments.editor_hparams(plain, "MEMIT").mom2_dataset == "embedded_world"  # the embedded default
    offline = dataclasses.replace(plain, stats_corpus="wikitext2")
    assert experiments.editor_hparams(offline, "MEMIT").mom2_dataset == "wikitext2"
    assert experiments.editor_hparams(offline, "MEND") == load_hparams("MEND", "kelib-micro")  # no C0: unchanged
    by_set = dataclasses.replace(plain, model_name="/data/models/anything", hparams_set="kelib-micro")
    assert experiments.editor_hparams(by_set, "ROME") == load_hparams("ROME", "kelib-micro")


def test_command_line_values_reach_every_notebook_that_has_them():
    from kelib.reproduce import ParamsError, validate_variant

    plan = validate_variant("params/smoke", overrides={"device_map": "auto", "stats_corpus": "wikitext2",
                                                       "dtype": "float32"})
    assert plan and all(p["device_map"] == "auto" and p["stats_corpus"] == "wikitext2" for _, _, p in plan)
    with pytest.raises(ParamsError, match=r"no notebook .* has the parameter\(s\) \['devise_map'\]"):
        validate_variant("params/smoke", overrides={"devise_map": "auto"})
    with pytest.raises(ParamsError, match="annotated str"):
        validate_variant("params/smoke", overrides={"stats_corpus": 3})
