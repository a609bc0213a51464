"""GRACE on the micro model: weights bit-identical, the edited prompt answered from the codebook."""

import dataclasses

import pytest
import torch

from kelib.editors import load_hparams
from kelib.editors.context import keys_at
from kelib.editors.grace import adaptor, add_edit, lookup, place, view
from kelib.metrics import score_targets
from kelib.models import capture
from kelib.runner import EditRun, RunSpec
from kelib.tokens import encode


def top1(model, tok, prompt: str) -> int:
    ids = torch.tensor([encode(tok, prompt)])
    return int(model(input_ids=ids).logits[0, -1].argmax())


def target_id(tok, target: str) -> int:
    return tok(" " + target, add_special_tokens=False)["input_ids"][0]


def test_grace_leaves_weights_bit_identical_and_answers_from_its_codebook(micro, untouched):
    model, tok, cases = micro
    hp = load_hparams("GRACE", "kelib-micro")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = EditRun(model, tok, cases[60:65], RunSpec("GRACE", "sequential", n_edits=5, checkpoints=[0, 2]), hp,
                  progress=False)
    table = run.run()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no restore needed: nothing moved
    weights = table[table.scope == "weights"]
    assert (weights[weights.metric == "delta_l1"].value == 0).all()
    assert weights[weights.metric == "l1"].value.nunique() == 1  # the flat L1 line of the notebooks
    final = table[(table.checkpoint == 5) & (table.scope == "edits")].set_index("metric").value
    assert final["efficacy_success"] == 1.0  # every earlier edit, on the final model
    # Inside the view the edited prompt's top token is the new target; outside, the model is unedited.
    codebook = run.editor_state["codebook"]
    assert len(codebook["labels"]) == 5
    case = cases[60]
    with view(model, run.editor_state):
        assert top1(model, tok, case.prompt) == target_id(tok, case.target_new)
        # and the projection's output at the prompt's last token is exactly the stored value
        layer = hp.layers[0]
        with capture(model, [layer]) as rec:
            model(input_ids=torch.tensor([encode(tok, case.prompt)]))
        assert torch.equal(rec[layer]["value"][0, -1], codebook["values"][0].to(rec[layer]["value"]))
    assert top1(model, tok, case.prompt) != target_id(tok, case.target_new)


def test_grace_codebook_rule_adds_expands_and_splits():
    eps = 1.0
    codebook = {"keys": torch.zeros(0, 2), "values": torch.zeros(0, 3), "epsilons": torch.zeros(0), "labels": []}
    v = torch.zeros(3)
    assert place(codebook, torch.tensor([0.0, 0.0]), v, "Paris", eps) == 0
    assert place(codebook, torch.tensor([1.5, 0.0]), v, "Paris", eps) == 0  # same label within ε_0 + ε: expand
    assert codebook["epsilons"].tolist() == pytest.approx([1.5 * (1 + 1e-4)])  # d, with a rounding margin
    # the same key read again in another forward differs by rounding: it must still fall inside
    assert lookup(codebook, torch.tensor([[1.5 * (1 + 1e-6), 0.0]]))[1].item()
    assert place(codebook, torch.tensor([10.0, 0.0]), v, "Rome", eps) == 1  # far away: a new entry
    assert place(codebook, torch.tensor([0.0, 2.0]), v, "Rome", eps) == 2  # conflict at d = 2: split
    assert codebook["epsilons"].tolist() == pytest.approx([1.0 - 1e-5, 1.0, 1.0])
    assert codebook["labels"] == ["Paris", "Rome", "Rome"]
    chosen, inside = lookup(codebook, torch.tensor([[0.0, 0.5], [0.0, 1.6], [5.0, 5.0]]))
    assert chosen.tolist() == [0, 2, -1] and inside.tolist() == [True, True, False]


def test_lookup_decides_on_exact_distances():
    """Large keys (norm ~ 300, where a matrix product's distance is off by ~0.1): each key falls in its
    own entry even at a radius of 1e-6, and random queries get the entry exact differences give."""
    generator = torch.Generator().manual_seed(0)
    keys = 10 * torch.randn(600, 256, generator=generator) + 5
    codebook = {"keys": keys, "values": torch.zeros(600, 3), "labels": ["x"] * 600,
                "epsilons": torch.full((600,), 1e-6)}
    chosen, inside = lookup(codebook, keys[::7].clone())
    assert inside.all() and chosen.tolist() == list(range(0, 600, 7))
    queries = keys[torch.randint(600, (400,), generator=generator)] + 4 * torch.randn(400, 256, generator=generator)
    codebook["epsilons"] = torch.linspace(60, 70, 600)  # about half of the queries land inside
    dists = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist")
    nearest_dist, nearest = dists.min(1)
    expected_inside = nearest_dist <= codebook["epsilons"][nearest]
    chosen, inside = lookup(codebook, queries)
    assert 50 < int(expected_inside.sum()) < 350
    assert torch.equal(inside, expected_inside)
    assert torch.equal(chosen, torch.where(expected_inside, nearest, -1))


def test_grace_reediting_a_prompt_relabels_its_entry(micro, untouched):
    model, tok, cases = micro
    hp = load_hparams("GRACE", "kelib-micro", {"n_iter": 30})
    layer = hp.layers[0]
    case = cases[70]
    key, value = keys_at(model, tok, [case], ["{}"], [layer], "prompt_last")[layer]
    codebook = {"keys": torch.zeros(0, key.shape[1]), "values": torch.zeros(0, value.shape[1]),
                "epsilons": torch.zeros(0), "labels": []}
    add_edit(model, tok, case, layer, codebook, hp)
    add_edit(model, tok, case, layer, codebook, hp)  # the same fact again: no new entry
    assert codebook["labels"] == [case.target_new]
    other = next(c.target_new for c in cases if c.target_new != case.target_new)
    add_edit(model, tok, dataclasses.replace(case, target_new=other), layer, codebook, hp)
    assert codebook["labels"] == [other]
    with adaptor(model, layer, codebook):
        assert top1(model, tok, case.prompt) == target_id(tok, other)


def test_grace_single_protocol_starts_every_edit_from_an_empty_codebook(micro, untouched):
    model, tok, cases = micro
    hp = load_hparams("GRACE", "kelib-micro", {"n_iter": 30})
    run = EditRun(model, tok, cases[60:63], RunSpec("GRACE", "single", n_edits=3), hp, progress=False)
    run.run()
    assert run.editor_state == {}  # reset after each unit
    scores = score_targets(model, tok, [c.prompt for c in cases[60:63]], [c.target_true for c in cases[60:63]])
    assert all(s.exact for s in scores)  # the unedited model still answers as trained


def test_grace_edit_changes_a_cached_lm_eval_answer(micro, untouched, tmp_path, monkeypatch):
    """lm-eval results are cached by a weights fingerprint, which a GRACE edit does not move: the
    codebook its view declares must enter the key, or every checkpoint reads back the unedited answer."""
    import json

    from kelib.evaluation import evaluate_abilities

    monkeypatch.setenv("KELIB_CACHE", str(tmp_path / "cache"))
    model, tok, cases = micro
    case = cases[60]
    folder = tmp_path / "tasks" / "probe"
    folder.mkdir(parents=True)
    data = folder / "probe.jsonl"
    data.write_text(json.dumps({"prompt": case.prompt, "choices": [case.target_true, case.target_new], "label": 1}) + "\n")
    (folder / "probe.yaml").write_text(
        f"task: grace_probe\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )

    def new_object_wins() -> float:
        table = evaluate_abilities(model, tok, ["grace_probe"], task_dirs=[tmp_path / "tasks"], progress=False)
        return float(table.set_index("metric").value["acc"])

    assert new_object_wins() == 0.0  # the unedited model answers the true object (and is cached)
    run = EditRun(model, tok, [case], RunSpec("GRACE", "sequential", n_edits=1), load_hparams("GRACE", "kelib-micro"),
                  progress=False)
    run.run()
    with run.evaluation_view():
        assert new_object_wins() == 1.0
        assert new_object_wins() == 1.0  # read back under the codebook's own key
    assert new_object_wins() == 0.0
    assert len(list((tmp_path / "cache" / "evaluations").rglob("*.json"))) == 2


def test_grace_value_is_trained_on_the_full_models_loss(micro, untouched):
    """The value trains on the blocks from the adaptor's layer up: it is the value the plain loop
    (Adam on the whole model's target NLL through the adaptor) reaches, to float rounding."""
    from kelib.editors.grace import _empty_codebook, train_value
    from kelib.models import weight_shape
    from kelib.tokens import with_target

    model, tok, cases = micro
    hp = dataclasses.replace(load_hparams("GRACE", "kelib-micro"), n_iter=8, early_stop_loss=0.0)
    layer = hp.layers[0]
    case = dataclasses.replace(cases[7], target_new=f"{cases[7].target_new} {cases[8].target_new}")  # two tokens
    key, output = keys_at(model, tok, [case], ["{}"], [layer], "prompt_last")[layer]
    codebook = _empty_codebook(*reversed(weight_shape(model, layer)), "cpu")
    slot = place(codebook, key[0], output[0], case.target_new, hp.eps)
    codebook["values"][slot] = torch.rand(output.shape[1], generator=torch.Generator().manual_seed(1))
    start_value = codebook["values"][slot].clone()
    train_value(model, tok, case, layer, codebook, slot, hp)

    full, start = with_target(tok, case.prompt, case.target_new)
    ids = torch.tensor([full])
    value = start_value.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([value], lr=hp.edit_lr)
    for _ in range(hp.n_iter):
        with adaptor(model, layer, codebook, values=value[None]):
            logits = model(input_ids=ids).logits[0, start - 1 : len(full) - 1]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, ids[0, start:]).backward()
        optimizer.step()
    assert len(full) - start == 2 and not torch.equal(value.detach(), start_value)
    assert float((codebook["values"][slot] - value.detach()).norm() / (value.detach() - start_value).norm()) < 1e-4
