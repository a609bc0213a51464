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
    assert evaluate.key == {"abilities": 2, "model": "micro", "n_facts": 50, "n_skill": 40, "n_text": 40}
