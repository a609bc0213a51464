"""Edit metrics, each named after the paper definition it follows.

CounterFact (ROME/MEMIT ``summarize.py``): for a prompt and two candidate objects, compare the mean
per-token NLL of ``" " + target_new`` and ``" " + target_true`` (teacher forced).
- efficacy / paraphrase *success*: ``1[NLL_true > NLL_new]``; *magnitude*: ``exp(-NLL_new) - exp(-NLL_true)``
- neighbourhood *success*: ``1[NLL_true < NLL_new]``; magnitude ``exp(-NLL_true) - exp(-NLL_new)``
ZsRE (MEMIT ``eval_utils_zsre.py``): teacher-forced token accuracy of the target (the new object on
the prompt and paraphrase, the NQ answer on the neighbourhood question).
EasyEdit locality: fraction of target positions where the post-edit argmax equals the pre-edit one.
Recall: all target tokens are the argmax (teacher forced): the "top-1 recall" of a known fact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kelib.models import device_of
from kelib.tokens import pad_batch, with_target


@dataclass(frozen=True)
class TargetScores:
    """Teacher-forced scores of one target after one prompt."""

    nll: float  # mean per-token negative log-likelihood of the target tokens
    token_correct: tuple[bool, ...]  # argmax == target token, per target token
    argmax: tuple[int, ...]  # the model's argmax at each target position

    @property
    def token_accuracy(self) -> float:
        return sum(self.token_correct) / len(self.token_correct)

    @property
    def exact(self) -> bool:
        return all(self.token_correct)


@torch.no_grad()
def score_targets(
    model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64
) -> list[TargetScores]:
    """Teacher-forced NLL and argmax of ``targets[i]`` after ``prompts[i]``, batched."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = [with_target(tok, p, t) for p, t in zip(prompts, targets)]
    device = device_of(model)
    out: list[TargetScores] = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        ids, mask = pad_batch([e[0] for e in chunk], tok.pad_token_id, device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (full, start) in enumerate(chunk):
            positions = torch.arange(start - 1, len(full) - 1, device=device)
            wanted = ids[row, start : len(full)]
            lp = logprobs[row, positions]
            nll = -lp.gather(-1, wanted[:, None]).squeeze(-1)
            argmax = lp.argmax(-1)
            out.append(
                TargetScores(
                    nll=nll.mean().item(),
                    token_correct=tuple((argmax == wanted).tolist()),
                    argmax=tuple(argmax.tolist()),
                )
            )
    return out


def recall(model, tok, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of prompts whose answer is the model's greedy (teacher-forced) continuation."""
    scores = score_targets(model, tok, prompts, answers)
    return sum(s.exact for s in scores) / max(len(scores), 1)


@dataclass(frozen=True)
class Comparison:
    """New vs true object on one prompt (CounterFact probability comparison)."""

    nll_new: float
    nll_true: float

    @property
    def new_wins(self) -> bool:
        return self.nll_true > self.nll_new

    @property
    def magnitude(self) -> float:
        """``P(new) - P(true)`` with P the geometric-mean token probability."""
        return float(torch.exp(torch.tensor(-self.nll_new)) - torch.exp(torch.tensor(-self.nll_true)))


def compare(model, tok, prompts: Sequence[str], new: Sequence[str], true: Sequence[str]) -> list[Comparison]:
    nll_new = score_targets(model, tok, prompts, new)
    nll_true = score_targets(model, tok, prompts, true)
    return [Comparison(a.nll, b.nll) for a, b in zip(nll_new, nll_true)]


def counterfact_metrics(model, tok, cases) -> dict[str, float]:
    """CounterFact success and magnitude metrics over ``cases`` (means, in [0, 1] / [-1, 1]).

    Paraphrase and neighbourhood values are averaged within a case first, as ROME's summarize does.
    Keys: efficacy_success, efficacy_magnitude, paraphrase_success, paraphrase_magnitude,
    neighborhood_success, neighborhood_magnitude, score (harmonic mean of the three successes).
    """
    return dict(counterfact_scores(model, tok, cases))


def counterfact_scores(model, tok, cases):
    """:func:`counterfact_metrics` as a :class:`kelib.examples.Scores`: the same means, with each
    metric's per-case values (ids: the case ids) attached for verdicts over cases. ``score`` is a
    harmonic mean of means and has no per-case values."""
    from kelib.examples import Sample, Scores

    rows = {k: [] for k in ("efficacy", "paraphrase", "neighborhood")}
    for case in cases:
        groups = {
            "efficacy": ([case.prompt], case.target_new, case.target_true),
            "paraphrase": (list(case.paraphrase_prompts), case.target_new, case.target_true),
            # The neighbour's own answer must still beat the edit's new object.
            "neighborhood": (list(case.neighborhood_prompts), case.target_new, None),
        }
        for name, (prompts, new, true) in groups.items():
            if not prompts:
                continue
            trues = list(case.neighborhood_answers) if true is None else [true] * len(prompts)
            comps = compare(model, tok, prompts, [new] * len(prompts), trues)
            if name == "neighborhood":
                success = [not c.new_wins for c in comps]
                magnitude = [-c.magnitude for c in comps]
            else:
                success = [c.new_wins for c in comps]
                magnitude = [c.magnitude for c in comps]
            rows[name].append((case.case_id, sum(success) / len(success), sum(magnitude) / len(magnitude)))
    result: dict[str, float] = {}
    examples = {}
    for name, values in rows.items():
        if values:
            ids = tuple(v[0] for v in values)
            for k, kind in ((1, "success"), (2, "magnitude")):
                per_case = [v[k] for v in values]
                result[f"{name}_{kind}"] = sum(per_case) / len(per_case)
                examples[f"{name}_{kind}"] = Sample(per_case, ids=ids)
    successes = [result[k] for k in ("efficacy_success", "paraphrase_success", "neighborhood_success") if k in result]
    result["score"] = _harmonic(successes)
    return Scores(result, examples)


def zsre_metrics(model, tok, cases) -> dict[str, float]:
    """ZsRE token accuracy (MEMIT): efficacy and paraphrase of the new object, neighbourhood of the
    neighbourhood question's own answer (so an unedited model scores below 1 here)."""
    def acc(prompts, targets):
        scores = score_targets(model, tok, prompts, targets)
        return [s.token_accuracy for s in scores]

    eff = acc([c.prompt for c in cases], [c.target_new for c in cases])
    para_p = [(p, c.target_new) for c in cases for p in c.paraphrase_prompts]
    neigh_p = [(p, a) for c in cases for p, a in zip(c.neighborhood_prompts, c.neighborhood_answers)]
    result = {"efficacy_token_acc": _mean(eff)}
    if para_p:
        result["paraphrase_token_acc"] = _mean(acc(*zip(*para_p)))
    if neigh_p:
        result["neighborhood_token_acc"] = _mean(acc(*zip(*neigh_p)))
    result["score"] = _harmonic(list(result.values()))
    return result


def locality_agreement(before: Sequence[TargetScores], after: Sequence[TargetScores]) -> float:
    """EasyEdit locality: mean fraction of target positions whose argmax did not change."""
    fractions = [
        sum(a == b for a, b in zip(x.argmax, y.argmax)) / len(x.argmax) for x, y in zip(before, after)
    ]
    return _mean(fractions)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _harmonic(values: Sequence[float]) -> float:
    if not values or any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)
