"""Edit metrics and weight diagnostics on hand-built cases whose answers are known."""

import math
from types import SimpleNamespace

import pytest
import torch

from kelib import diagnostics, metrics
from kelib.tokens import TokenError, subject_last_index, with_target

WORDS = ["<pad>", "The", "capital", "of", "France", "is", "Paris", "Rome", "Italy", "Berlin", "city"]


@pytest.fixture(scope="module")
def word_tok():
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(tmodels.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<pad>")


class BigramLM(torch.nn.Module):
    """Next-token logits depend only on the current token: probabilities are known by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def bigram(next_of: dict[str, dict[str, float]]) -> BigramLM:
    """``next_of[word] = {next_word: probability}``; the rest of the mass is spread evenly."""
    n = len(WORDS)
    table = torch.full((n, n), 1.0 / n).log()
    for word, dist in next_of.items():
        rest = (1 - sum(dist.values())) / (n - len(dist))
        probs = torch.full((n,), rest)
        for nxt, p in dist.items():
            probs[WORDS.index(nxt)] = p
        table[WORDS.index(word)] = probs.log()
    return BigramLM(table)


def case(prompt, subject, new, true, para=(), neigh=(), neigh_ans=()):
    return SimpleNamespace(case_id="t", prompt=prompt, subject=subject, target_new=new, target_true=true,
                           paraphrase_prompts=tuple(para), neighborhood_prompts=tuple(neigh),
                           neighborhood_answers=tuple(neigh_ans))


def test_score_targets_gives_the_mean_token_nll(word_tok):
    model = bigram({"is": {"Paris": 0.6, "Rome": 0.3}, "Paris": {"city": 0.5}})
    (one,) = metrics.score_targets(model, word_tok, ["The capital of France is"], ["Paris city"])
    assert one.nll == pytest.approx(-(math.log(0.6) + math.log(0.5)) / 2, rel=1e-5)
    assert one.token_correct == (True, True)
    assert one.exact and one.token_accuracy == 1.0


def test_counterfact_success_and_magnitude(word_tok):
    model = bigram({"is": {"Paris": 0.6, "Rome": 0.3}, "of": {"Rome": 0.5, "Paris": 0.1}})
    c = case("The capital of France is", "France", new="Rome", true="Paris",
             para=["The capital of"], neigh=["capital of France is"], neigh_ans=["Paris"])
    result = metrics.counterfact_metrics(model, word_tok, [c])
    assert result["efficacy_success"] == 0.0  # P(Paris)=0.6 > P(Rome)=0.3 after "is"
    assert result["efficacy_magnitude"] == pytest.approx(0.3 - 0.6, abs=1e-5)
    assert result["paraphrase_success"] == 1.0  # after "of": Rome 0.5 > Paris 0.1
    assert result["paraphrase_magnitude"] == pytest.approx(0.4, abs=1e-5)
    assert result["neighborhood_success"] == 1.0  # the neighbour's answer Paris still wins
    assert result["neighborhood_magnitude"] == pytest.approx(0.3, abs=1e-5)
    assert result["score"] == 0.0  # harmonic mean with a zero


def test_counterfact_scores_per_case(word_tok):
    """Per-case values (for verdicts over cases) average to the metrics, and carry the case ids."""
    model = bigram({"is": {"Paris": 0.6, "Rome": 0.3}, "of": {"Rome": 0.5, "Paris": 0.1}})
    first = case("The capital of France is", "France", new="Rome", true="Paris",
                 para=["The capital of", "capital of France is"], neigh=["capital of France is"], neigh_ans=["Paris"])
    second = SimpleNamespace(**{**vars(first), "case_id": "u", "target_new": "Berlin"})
    scores = metrics.counterfact_scores(model, word_tok, [first, second])
    assert dict(scores) == metrics.counterfact_metrics(model, word_tok, [first, second])
    paraphrase = scores.examples["paraphrase_success"]
    assert paraphrase.ids == ("t", "u")
    assert paraphrase.values.tolist() == [0.5, 0.0]  # Rome wins after "of" only; Berlin never
    assert scores.examples["efficacy_success"].values.tolist() == [0.0, 0.0]
    assert scores["paraphrase_success"] == pytest.approx(paraphrase.values.mean())
    assert "score" not in scores.examples


def test_zsre_token_accuracy_and_locality(word_tok):
    model = bigram({"is": {"Rome": 0.9}, "Rome": {"city": 0.2, "Italy": 0.7}})
    c = case("The capital of France is", "France", new="Rome city", true="Paris",
             para=["capital of France is"], neigh=["France is"], neigh_ans=["Rome Italy"])
    result = metrics.zsre_metrics(model, word_tok, [c])
    assert result["efficacy_token_acc"] == 0.5  # "Rome" right, "city" wrong (argmax is Italy)
    assert result["paraphrase_token_acc"] == 0.5
    assert result["neighborhood_token_acc"] == 1.0
    before = metrics.score_targets(model, word_tok, ["France is"], ["Rome Italy"])
    after = metrics.score_targets(bigram({"is": {"Rome": 0.9}, "Rome": {"city": 0.8}}), word_tok,
                                  ["France is"], ["Rome Italy"])
    assert metrics.locality_agreement(before, after) == 0.5


def test_recall_counts_exact_greedy_answers(word_tok):
    model = bigram({"is": {"Paris": 0.6}})
    assert metrics.recall(model, word_tok, ["France is", "France is"], ["Paris", "Rome"]) == 0.5


def test_subject_and_target_positions(word_tok, tiny_tokenizer):
    ids, start = with_target(word_tok, "The capital of France is", "Paris")
    assert start == 5 and len(ids) == 6
    assert subject_last_index(word_tok, "The capital of France is", "France") == 3
    with pytest.raises(TokenError, match="does not occur"):
        subject_last_index(word_tok, "The capital of France is", "Spain")
    with pytest.raises(TokenError, match="empty target"):
        with_target(word_tok, "The capital of France is", "  ")
    # BPE: the subject's last token is read from the prefix tokenisation, which matches the prompt
    prompt = "The mother tongue of Danielle Darrieux is"
    i = subject_last_index(tiny_tokenizer, prompt, "Danielle Darrieux")
    tokens = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer(prompt)["input_ids"])
    assert "".join(tokens[: i + 1]).replace("Ġ", " ").endswith("Darrieux")


def test_weight_diagnostics_on_a_known_matrix():
    w = torch.diag(torch.tensor([4.0, 2.0, 0.5]))
    w = torch.cat([w, torch.zeros(3, 2)], 1)  # 3 x 5, singular values 4, 2, 0.5
    d = diagnostics.weight_diagnostics(w)
    assert d["l1"] == pytest.approx(6.5)
    assert d["l1_per_element"] == pytest.approx(6.5 / 15)
    assert d["frobenius"] == pytest.approx(math.sqrt(16 + 4 + 0.25))
    assert d["sigma_max"] == pytest.approx(4.0)
    assert d["sigma_min"] == pytest.approx(0.5)
    assert d["condition_number"] == pytest.approx(8.0)
    w2 = w.clone()
    w2[0, 0] = 6.0
    d2 = diagnostics.weight_diagnostics(w2, original=w)
    assert d2["delta_l1"] == pytest.approx(2.0)
    assert d2["delta_sigma_max"] == pytest.approx(2.0)
    rel = diagnostics.relative_change(w2 - w, w)
    assert rel[0, 0] == pytest.approx(0.5) and rel[1, 1] == 0


def test_condition_number_ignores_numerically_zero_singular_values():
    rank_two = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0])) + torch.outer(
        torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 5.0, 0.0]))
    d = diagnostics.weight_diagnostics(rank_two)
    sigma = torch.linalg.svdvals(rank_two.double())
    assert d["sigma_min"] == pytest.approx(float(sigma[1]), rel=1e-6)
    assert math.isfinite(d["condition_number"])
