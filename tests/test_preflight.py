"""The preflight (``kelib check``, issue #21): config only, every editor's hyperparameters, layers,
MEND and statistics checked, and a memory plan, in seconds."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from kelib import preflight
from kelib.cli import main
from kelib.reproduce import PARAMS_DIR


def test_smoke_variant_on_the_micro_model_passes_with_its_real_parameter_count(micro, micro_dir, capsys):
    model = micro[0]
    start = time.perf_counter()
    report = preflight.check_variant(PARAMS_DIR / "smoke")
    seconds = time.perf_counter() - start
    assert report.ok, report.format()
    assert seconds < 60  # no weights loaded, no run started (a cold start imports transformers)
    weights = report.memory[0]
    n_params = sum(p.numel() for p in model.parameters())
    assert weights.nbytes == 4 * n_params  # from the config alone, the loaded model's exact size
    text = report.format()
    assert "kelib-micro: config read (gpt2, 2 layers), no weights loaded" in text
    assert "condition_number: hyperparameters, layers, MEND and statistics ok for ROME, MEMIT, MEND" in text
    assert "D4S state A and S (float64)" in text and "fits" in text
    assert main(["check", "--params", str(PARAMS_DIR / "smoke"), "--only", "00_tour"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_half_precision_plan_counts_the_float32_copies(micro_dir):
    report = preflight.check_variant(PARAMS_DIR / "smoke", dtype="bfloat16", only=["l1_norm_explosion"])
    full = preflight.check_variant(PARAMS_DIR / "smoke", only=["l1_norm_explosion"])
    assert report.memory[0].nbytes * 2 == full.memory[0].nbytes
    (kept,) = [m for m in report.memory if "kept in float32" in m.what]
    (copies,) = [m for m in report.memory if "W_0 copies" in m.what]
    assert kept.nbytes * 2 == copies.nbytes > 0  # 2 extra bytes per entry, W_0 kept in 4
    assert not [m for m in full.memory if "kept in float32" in m.what]


@pytest.fixture
def missing_rome(tmp_path, monkeypatch):
    """A copy of params/hparams without ROME's file for kelib-micro, and a variant that runs ROME."""
    from kelib.editors import base

    hparams = tmp_path / "hparams"
    shutil.copytree(PARAMS_DIR / "hparams", hparams)
    (hparams / "ROME" / "kelib-micro.yaml").unlink()
    monkeypatch.setattr(base, "HPARAMS_DIR", hparams)
    variant = tmp_path / "broken"
    variant.mkdir()
    (variant / "condition_number.yaml").write_text(json.dumps({"model_name": "kelib-micro", "n_edits": 4}) + "\n")
    return variant


def test_a_missing_hparams_file_is_reported_with_its_path(micro_dir, missing_rome, capsys):
    report = preflight.check_variant(missing_rome)
    assert not report.ok
    failed = {f.where: f.message for f in report.problems}
    assert set(failed) == {"condition_number / ROME", "condition_number / ROME + PRUNE"}
    assert "no hyperparameters for ROME on 'kelib-micro'" in failed["condition_number / ROME"]
    assert "ROME/kelib-micro.yaml" in failed["condition_number / ROME"]
    assert "ok for MEMIT, MEND, MEMIT + PRUNE, MEND + PRUNE" in report.format()
    assert main(["check", "kelib-micro", "--params", str(missing_rome)]) == 1
    out = capsys.readouterr().out
    assert "FAIL condition_number / ROME: no hyperparameters" in out and "preflight: 2 problem(s)" in out


def test_reproduce_runs_the_preflight_first(micro_dir, missing_rome, monkeypatch):
    import papermill

    lines = []
    ran = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: ran.append(lines[:]) or None)
    from kelib import reproduce as rp

    rp.reproduce(missing_rome, out_root=missing_rome / "out", runs_root=missing_rome / "runs", log=lines.append)
    assert ran, "the notebook was not started"
    before = "\n".join(ran[0])
    assert "preflight | FAIL condition_number / ROME: no hyperparameters" in before
    lines.clear()
    rp.reproduce(missing_rome, out_root=missing_rome / "out", runs_root=missing_rome / "runs", log=lines.append,
                 force=True, preflight=False)
    assert not any(line.startswith("preflight") for line in lines)


def test_gpt2_xl_variant_on_a_config_finds_untrained_mend_and_offline_wikipedia(monkeypatch, tmp_path):
    """The papers' GPT-2 XL settings checked against GPT-2 XL's shape (its config, built here: offline,
    the hub has none): every editor's layers exist; MEND is untrained; Wikipedia is unreachable."""
    from transformers import GPT2Config

    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = GPT2Config(n_layer=48, n_embd=1600, n_head=25)
    config._name_or_path = "gpt2-xl"
    monkeypatch.setattr(preflight, "model_config", lambda name: (config, name, None))
    report = preflight.check_variant(PARAMS_DIR / "gpt2-xl", device="cuda", dtype="float16")
    failed = {f.where: f.message for f in report.problems}
    assert any("MEND is not trained for 'gpt2-xl'" in m and "kelib train-mend gpt2-xl" in m
               for m in failed.values()), failed
    assert not any("layers the model lacks" in m or "no hyperparameters" in m for m in failed.values()), failed
    assert "Wikipedia" in failed["condition_number / MEMIT"]  # the papers' C0, neither cached nor reachable
    assert "l1_norm_explosion / GRACE" not in failed and "l1_norm_explosion / FT" not in failed
    assert report.memory[0].nbytes == 2 * 1_557_611_200  # GPT-2 XL's parameters in float16
    text = report.format()
    assert "edited matrices kept in float32" in text
    if not __import__("torch").cuda.is_available():
        assert "free memory is unknown here" in text


def test_caches_keyed_by_weights_are_found_by_the_models_name_from_a_config(monkeypatch, tmp_path):
    """MEND's network and C0 are keyed by the weights, which a config cannot show: once a network
    and statistics exist for a model of that name, the config-only check does not call them missing."""
    from transformers import GPT2Config

    from kelib.editors import load_hparams
    from kelib.editors.mend import mend_path
    from kelib.stats import stats_path, stats_spec_for

    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = GPT2Config(n_layer=48, n_embd=1600, n_head=25)
    config._name_or_path = "gpt2-xl"
    model = preflight.meta_model(config)
    mend_hp, memit_hp = load_hparams("MEND", "gpt2-xl"), load_hparams("MEMIT", "gpt2-xl")
    assert "MEND is not trained" in preflight.mend_problem(model, mend_hp)
    assert preflight.statistics_status(model, memit_hp)[0] is False
    # files as a run on the real weights would leave them: same folders, other weights' keys
    trained = mend_path(model, mend_hp).with_name("0123456789ab.pt")
    trained.parent.mkdir(parents=True, exist_ok=True)
    trained.write_bytes(b"")
    for layer in memit_hp.layers:
        path = stats_path(model, layer, stats_spec_for(memit_hp))
        path.with_name(f"layer{layer}_mlp_out_feedc0ffee.pt").write_bytes(b"")
    assert preflight.mend_problem(model, mend_hp) is None
    assert preflight.statistics_status(model, memit_hp)[0] is True


def test_a_model_in_a_folder_of_another_name_uses_the_named_hparams_set(micro, micro_dir, tmp_path):
    """Weights at a path whose name matches no hyperparameter set: every editor is "without
    hyperparameters" until ``hparams`` names the set, in the variant check and in run_grid's own."""
    folder = tmp_path / "my-local-model"
    folder.symlink_to(micro_dir, target_is_directory=True)
    bare = preflight.check_variant(PARAMS_DIR / "smoke", model_name=str(folder), only=["l1_norm_explosion"])
    assert any("hyperparameters" in f.message for f in bare.problems)
    named = preflight.check_variant(PARAMS_DIR / "smoke", model_name=str(folder), only=["l1_norm_explosion"],
                                    overrides={"hparams": "kelib-micro"})
    assert not any("hyperparameters" in f.message for f in named.problems), named.format()
    runs = [{"editor": "ROME"}, {"editor": "MEMIT", "label": "MEMIT (λ 5)", "overrides": {"mom2_update_weight": 5.0}}]
    assert set(preflight.editor_problems(micro[0], str(folder), runs)) == {"ROME", "MEMIT (λ 5)"}
    assert preflight.editor_problems(micro[0], str(folder), runs, hparams_set="kelib-micro") == {}
