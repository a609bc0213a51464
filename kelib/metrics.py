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
from typing import Callable, Sequence

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


@torch.inference_mode()
def score_targets(
    model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
    forward: Callable | None = None,
) -> list[TargetScores]:
    """Teacher-forced NLL and argmax of ``targets[i]`` after ``prompts[i]``, batched.

    ``forward(model, input_ids, attention_mask)`` gives the logits (default: the model's forward;
    :meth:`kelib.unchanged_blocks.UnchangedBlocks.logits` reuses the blocks an edit left alone).

    A pair is read from the forward pass of the longest input it is a prefix of (causal attention:
    the logits at a position do not depend on what follows), so pairs that share their input (a
    prompt with its new and its true object, when both are one token) cost one row. Rows are sorted
    by length before batching, which keeps padding low."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = [with_target(tok, p, t) for p, t in zip(prompts, targets)]
    inputs = [tuple(full[:-1]) for full, _ in encoded]  # the last target token is predicted, never input
    row_of: dict[tuple, int] = {}  # every prefix of a chosen row -> that row
    rows: list[tuple] = []
    for ids in sorted(set(inputs), key=len, reverse=True):
        if ids not in row_of:
            for end in range(1, len(ids) + 1):
                row_of.setdefault(ids[:end], len(rows))
            rows.append(ids)
    pairs_of: dict[int, list[int]] = {}
    for i, ids in enumerate(inputs):
        pairs_of.setdefault(row_of[ids], []).append(i)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r]))
    device = device_of(model)
    out: list[TargetScores | None] = [None] * len(encoded)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        ids, mask = pad_batch([rows[r] for r in chunk], tok.pad_token_id, device)
        logits = forward(model, ids, mask) if forward else model(input_ids=ids, attention_mask=mask).logits
        # Every target token of every pair read from this chunk, in one gather.
        pairs = [i for r in chunk for i in pairs_of[r]]
        at_row = {r: k for k, r in enumerate(chunk)}
        token_row, token_pos, token_id = [], [], []
        for i in pairs:
            full, start = encoded[i]
            token_row += [at_row[row_of[inputs[i]]]] * (len(full) - start)
            token_pos += range(start - 1, len(full) - 1)
            token_id += full[start:]
        wanted = torch.tensor(token_id, device=device)
        lp = torch.log_softmax(logits[torch.tensor(token_row, device=device), torch.tensor(token_pos, device=device)]
                               .float(), -1)
        nll = (-lp.gather(-1, wanted[:, None]).squeeze(-1)).tolist()
        argmax = lp.argmax(-1).tolist()
        at = 0
        for i in pairs:
            full, start = encoded[i]
            n = len(full) - start
            nlls, best = nll[at : at + n], argmax[at : at + n]
            out[i] = TargetScores(
                nll=sum(nlls) / n,
                token_correct=tuple(b == t for b, t in zip(best, full[start:])),
                argmax=tuple(best),
            )
            at += n
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
    scores = score_targets(model, tok, [*prompts, *prompts], [*new, *true])  # one call: shared rows
    return [Comparison(a.nll, b.nll) for a, b in zip(scores[: len(prompts)], scores[len(prompts) :])]


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
    units = []  # (case, group name, prompts, new objects, true objects)
    for case in cases:
        groups = {
            "efficacy": ([case.prompt], case.target_new, case.target_true),
            "paraphrase": (list(case.paraphrase_prompts), case.target_new, case.target_true),
            # The neighbour's own answer must still beat the edit's new object.
            "neighborhood": (list(case.neighborhood_prompts), case.target_new, None),
        }
        for name, (prompts, new, true) in groups.items():
            if prompts:
                trues = list(case.neighborhood_answers) if true is None else [true] * len(prompts)
                units.append((case, name, prompts, [new] * len(prompts), trues))
    # Every case's comparisons in one batched call.
    all_comps = compare(model, tok, [p for u in units for p in u[2]], [n for u in units for n in u[3]],
                        [t for u in units for t in u[4]])
    at = 0
    for case, name, prompts, _, _ in units:
        comps, at = all_comps[at : at + len(prompts)], at + len(prompts)
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
