"""The embedded abilities evaluator on the micro model: per-example scores and held-out perplexity."""

import math

import pytest
import torch

from kelib.embedded import abilities_evaluator
from kelib.embedded.report import choice_accuracy, heldout_skills, heldout_texts, paragraph_nll
from kelib.embedded.train import split_paragraphs, wikitext_paragraphs
from kelib.models import get_weight, set_weight
from kelib.verdicts import HOLDS, compare


@pytest.fixture(scope="module")
def scores(micro):
    model, tok, _ = micro
    evaluate = abilities_evaluator("micro", n_facts=50, n_skill=40, n_text=40)
    return evaluate, evaluate(model, tok)


def test_means_are_the_means_of_the_examples(micro, scores):
    model, tok, _ = micro
    _, result = scores
    assert set(result) == {"recall_unedited", "skill_sentiment", "skill_topic", "heldout_perplexity"}
    assert set(result.examples) == set(result)
    for metric, sample in result.examples.items():
        assert result[metric] == pytest.approx(sample.mean)
    assert len(result.examples["recall_unedited"]) == 50 and len(result.examples["skill_topic"]) == 40
    assert set(result.examples["recall_unedited"].values) <= {0.0, 1.0}  # top-1 recall, fact by fact
    assert result["skill_topic"] == pytest.approx(choice_accuracy(model, tok, heldout_skills("micro")["topic"][:40]))
    assert 1 < result["heldout_perplexity"] < 1e4
    ppl = result.examples["heldout_perplexity"]
    assert ppl.log and not ppl.higher_is_better and ppl.stderr > 0


def test_perplexity_paragraphs_were_never_trained_on(micro_dir):
    from kelib.embedded.build import recipe_of

    trained, held_out = split_paragraphs(recipe_of(micro_dir))
    assert heldout_texts("micro") == held_out
    assert held_out and not set(held_out) & set(trained)
    assert len(trained) + len(held_out) == len(wikitext_paragraphs())


def test_paragraph_nll_is_the_models_own_loss(micro):
    model, tok, _ = micro
    texts = heldout_texts("micro")
    short = min(texts, key=len)
    ids = torch.tensor([tok(short)["input_ids"]])
    assert ids.shape[1] < 128
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    (nll,), (tokens,) = paragraph_nll(model, tok, [short])
    assert tokens == ids.shape[1] - 1
    assert nll == pytest.approx(expected, rel=1e-4)
    # a batch of paragraphs (one longer than a window, padded beside short ones) gives the same values
    nlls, counts = paragraph_nll(model, tok, [short, max(texts, key=len), short], batch_size=2)
    assert nlls[0] == pytest.approx(nll, rel=1e-4) and nlls[2] == pytest.approx(nll, rel=1e-4)
    n = len(tok(max(texts, key=len))["input_ids"])
    assert n > 128 and counts[1] == n - math.ceil((n - 1) / 128)  # each window predicts all but its first token


def test_a_damaged_layer_raises_perplexity_measurably(micro, scores, untouched):
    """Noise on one MLP output projection: the verdict on perplexity must come out "holds"."""
    model, tok, _ = micro
    evaluate, before = scores
    w = get_weight(model, 0).clone()
    try:
        set_weight(model, 0, w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        after = evaluate(model, tok)
    finally:
        set_weight(model, 0, w)
    assert after["heldout_perplexity"] > before["heldout_perplexity"]
    verdict = compare("noise raises perplexity", before.examples["heldout_perplexity"],
                      after.examples["heldout_perplexity"], "higher")
    assert verdict.outcome == HOLDS
    assert math.exp(verdict.estimate) == pytest.approx(after["heldout_perplexity"] / before["heldout_perplexity"])


def test_the_evaluator_has_a_cache_key_of_its_own(scores):
    evaluate, _ = scores
    assert evaluate.key == {"abilities": 3, "model": "micro", "n_facts": 50, "n_skill": 40, "n_text": 40}


def test_choices_are_scored_as_one_forward_per_choice_would(micro):
    """Choices read from shared prompt rows give the verdicts of scoring each prompt + choice on its own
    (the summed log-probability of the choice's tokens, the best choice winning)."""
    from kelib.embedded.report import choice_correct

    model, tok, _ = micro
    examples = [ex for skill in heldout_skills("micro").values() for ex in skill[:15]]
    expected = []
    with torch.no_grad():
        for ex in examples:
            prompt = tok(ex.prompt)["input_ids"]
            totals = []
            for choice in ex.choices:
                ids = prompt + tok(" " + choice, add_special_tokens=False)["input_ids"]
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
                totals.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt), len(ids))))
            expected.append(max(range(len(totals)), key=totals.__getitem__) == ex.label)
    assert choice_correct(model, tok, examples, batch_size=7) == expected
    assert 0 < sum(expected) < len(expected) or len(set(expected)) == 1


def test_an_unchanged_model_is_evaluated_once(micro, scores, untouched, monkeypatch, tmp_path):
    """The abilities of a model are kept by its weights: the same weights read back the same scores
    (every run's checkpoint 0), changed weights or an undeclared hook are evaluated afresh."""
    from kelib.embedded import report

    model, tok, _ = micro
    evaluate, before = scores
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))  # an empty cache: nothing kept from other tests
    calls = []
    real = report.paragraph_nll
    monkeypatch.setattr(report, "paragraph_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, again = evaluate(model, tok), evaluate(model, tok)
    assert calls == [1] and dict(first) == dict(again) == dict(before) and list(again) == list(first)  # order kept
    assert all(list(again.examples[m].values) == list(s.values) for m, s in before.examples.items())
    assert all(again.examples[m].weights is None or list(again.examples[m].weights) == list(s.weights)
               for m, s in before.examples.items())
    w = get_weight(model, 0).clone()
    try:
        set_weight(model, 0, w * 1.01)
        changed = evaluate(model, tok)
    finally:
        set_weight(model, 0, w)
    assert calls == [1, 1] and changed["heldout_perplexity"] != before["heldout_perplexity"]
    handle = model.transformer.h[0].register_forward_hook(lambda module, args, out: None)
    try:
        evaluate(model, tok)
        evaluate(model, tok)
    finally:
        handle.remove()
    assert calls == [1, 1, 1, 1]  # a hook no view declares could change anything: never read back
