"""The papers' settings in the real-model params: ROME's 2022 key use, the reference code's statistics
windows and sample counts, RECT's GPT-2 XL ROME, and the corrected-key comparison runs."""

import pytest
import yaml

from kelib.editors import load_hparams
from kelib.paths import REPO_DIR
from kelib.stats import StatsSpec, _windows, stats_spec_for, stats_path

PAPER_MODELS = {  # model -> statistics window (the reference code's maxlen for it)
    "gpt2-xl": 1024,
    "gpt-j-6b": 2048,
    "llama-2-7b": 4096,
    "llama3-8b": 8192,
}
SAMPLES = {("ROME", "llama3-8b"): 10_000}  # PRUNE's; every other file 100,000 articles


@pytest.mark.parametrize("model", sorted(PAPER_MODELS))
def test_papers_params_use_the_2022_rome_and_the_reference_statistics(model):
    rome = load_hparams("ROME", model)
    assert rome.original_key_use is True
    assert rome.mom2_adjustment is True  # ROME's and PRUNE's files (RECT's override is per notebook)
    for editor in ("ROME", "MEMIT", "PMET", "AlphaEdit"):
        hp = load_hparams(editor, model)
        assert hp.mom2_dataset == "wikipedia"
        assert hp.mom2_n_samples == SAMPLES.get((editor, model), 100_000)
        assert hp.mom2_max_length == PAPER_MODELS[model]
        spec = stats_spec_for(hp)
        assert (spec.n_texts, spec.n_tokens, spec.max_length) == (hp.mom2_n_samples, None, PAPER_MODELS[model])


def _runs(variant, notebook):
    return yaml.safe_load((REPO_DIR / "params" / variant / f"{notebook}.yaml").read_text())["runs"]


@pytest.mark.parametrize("variant", [*sorted(PAPER_MODELS), "smollm2-135m"])
@pytest.mark.parametrize("notebook", ["l1_norm_explosion", "condition_number"])
def test_l1_and_kappa_params_compare_the_corrected_key_use(variant, notebook):
    runs = _runs(variant, notebook)
    plain = [r for r in runs if r["editor"] == "ROME" and "label" not in r and "regularizer" not in r]
    corrected = [r for r in runs if r.get("label") == "ROME (corrected keys)"]
    assert len(plain) == 1 and "overrides" not in plain[0]  # the papers' ROME: the file's 2022 key use
    assert len(corrected) == 1 and corrected[0]["editor"] == "ROME"
    assert corrected[0]["overrides"] == {"original_key_use": False}


def test_rects_gpt2_xl_rome_runs_without_the_c_adjustment():
    (rome,) = [r for r in _runs("gpt2-xl", "side_effects") if r["editor"] == "ROME"]
    assert rome["overrides"] == {"mom2_adjustment": False}


def test_counting_texts_reads_the_first_window_of_each_text(tiny_tokenizer):
    from kelib.stats import _texts

    spec = StatsSpec(corpus="wikitext2", n_tokens=None, n_texts=6, max_length=16, batch_size=100)
    (ids, mask), = list(_windows(tiny_tokenizer, spec))
    texts = [t for t in list(_texts("wikitext2"))[:6] if len(tiny_tokenizer(t)["input_ids"]) >= 8]
    assert len(ids) == len(texts) >= 4  # one window per text, at most 6 texts
    for row, m, text in zip(ids, mask, texts):
        first = tiny_tokenizer(text)["input_ids"][:16]
        assert row[: int(m.sum())].tolist() == first
    with pytest.raises(ValueError, match="not both"):
        StatsSpec(n_texts=5)  # n_tokens keeps its default: ambiguous


def test_text_counts_get_their_own_statistics_file(tiny_gpt2):
    model, _ = tiny_gpt2
    by_tokens = stats_path(model, 0, StatsSpec(n_tokens=1000, max_length=1024))
    by_texts = stats_path(model, 0, StatsSpec(n_tokens=None, n_texts=1000, max_length=1024))
    assert by_tokens != by_texts
    assert stats_path(model, 0, StatsSpec()) == stats_path(model, 0, StatsSpec())


def test_a_run_can_override_its_editors_hparams_under_a_label(micro, micro_stats, untouched):
    from kelib import experiments

    model, tok, cases = micro
    setup = experiments.Setup("kelib-micro", model, tok, cases, {})
    runs = [{"editor": "ROME", "batch_size": 1},  # the micro model's file: corrected key use
            {"editor": "ROME", "batch_size": 1, "label": "ROME (2022 keys)", "overrides": {"original_key_use": True}}]
    grid = experiments.run_grid(setup, runs, n_edits=2, max_eval_cases=2, progress=False)
    assert sorted(grid.editor.unique()) == ["ROME", "ROME (2022 keys)"]
    assert grid.run_dir.nunique() == 2  # two hyperparameter sets, two runs
    with pytest.raises(ValueError, match="unknown key"):
        experiments.run_grid(setup, [{"editor": "ROME", "overide": {}}], n_edits=1, progress=False)


def _params(variant, notebook):
    """The notebook's parameters as the variant runs it: its defaults, updated by the params file."""
    from kelib.preflight import notebook_settings

    params = yaml.safe_load((REPO_DIR / "params" / variant / f"{notebook}.yaml").read_text())
    return notebook_settings(REPO_DIR / "notebooks" / f"{notebook}.py", params)


@pytest.mark.parametrize("variant", [*sorted(PAPER_MODELS), "smollm2-135m", "smoke"])
def test_data_perspective_edits_what_the_l1_notebook_edits(variant):
    """The direct form's runs are the L1 notebook's (same model, cases, tasks, edits and checkpoints):
    computed once; every form of the question is edited."""
    from kelib.experiments import run_setting
    from kelib.question_forms import FORMS

    forms, l1 = _params(variant, "data_perspective"), _params(variant, "l1_norm_explosion")
    for key in ("model_name", "dataset", "device", "dtype", "stats_corpus", "ability_tasks", "ability_limit",
                "n_edits", "checkpoints"):
        assert forms.get(key) == l1.get(key), key
    assert sorted(forms["forms"]) == sorted(FORMS)
    l1_runs = {run_setting(r) for r in l1["runs"] if r.get("batch_size") == 1 and "overrides" not in r}
    assert set(forms["editors"]) <= l1_runs


@pytest.mark.parametrize("variant", [*sorted(PAPER_MODELS), "smollm2-135m"])
def test_mquake_table_runs_d4s_table3_editors(variant):
    from kelib.experiments import run_setting

    l1 = _params(variant, "l1_norm_explosion")
    assert l1["mquake_dataset"] == "mquake_hard"
    assert sorted(l1["mquake_settings"]) == sorted(["FT", "ROME", "MEMIT", "GRACE", "PMET", "MEMIT + D4S"])
    assert set(l1["mquake_settings"]) <= {run_setting(r) for r in l1["runs"]}


def test_llama1_7b_params_are_rects_easyedit_files_and_fit_the_models_shape(monkeypatch, tmp_path):
    """RECT's LLaMA-1-7B (params/llama-7b): EasyEdit's llama-7b files (ROME without C0, as RECT's fork),
    statistics windows of LLaMA-1's 2,048 positions, and a preflight against LLaMA-1-7B's config
    (built here, offline) that finds every editor's layers and only MEND untrained."""
    from transformers import LlamaConfig

    from kelib import preflight
    from kelib.reproduce import PARAMS_DIR

    rome, memit = load_hparams("ROME", "llama-7b"), load_hparams("MEMIT", "llama-7b")
    assert rome.mom2_adjustment is False and rome.original_key_use is True and rome.layers == [5]
    assert memit.layers == [4, 5, 6, 7, 8] and memit.mom2_update_weight == 15000 and memit.clamp_norm_factor == 4
    for hp in (rome, memit):
        assert (hp.mom2_n_samples, hp.mom2_max_length) == (100_000, 2048)
    for notebook in ("side_effects", "regularizer_recovery"):
        params = yaml.safe_load((REPO_DIR / "params" / "llama-7b" / f"{notebook}.yaml").read_text())
        assert params["model_name"] == "huggyllama/llama-7b" and params["hparams"] == "llama-7b"
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         max_position_embeddings=2048, vocab_size=32000)
    config._name_or_path = "huggyllama/llama-7b"
    monkeypatch.setattr(preflight, "model_config", lambda name: (config, name, None))
    report = preflight.check_variant(PARAMS_DIR / "llama-7b", device="cuda", dtype="float16")
    failed = {f.where: f.message for f in report.problems}
    assert not any("layers the model lacks" in m or "no hyperparameters" in m for m in failed.values()), failed
    assert any("MEND is not trained" in m for m in failed.values()), failed
    assert report.memory[0].nbytes == 2 * 6_738_415_616  # LLaMA-1-7B's parameters in float16
