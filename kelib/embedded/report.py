"""What an embedded model knows and can do: recall, skill accuracy, held-out perplexity.

The same functions score the model before and after edits (the notebooks reuse them), so the
training report and the damage measured later use one definition.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from kelib.embedded.skills import SkillExample
from kelib.metrics import recall
from kelib.models import device_of
from kelib.tokens import pad_batch


@torch.no_grad()
def choice_accuracy(model, tok, examples: Sequence[SkillExample], batch_size: int = 64) -> float:
    """Multiple-choice accuracy: the choice with the highest summed log-probability wins (lm-eval ``acc``)."""
    if not examples:
        return float("nan")
    flat = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    scores = torch.empty(len(flat))
    device = device_of(model)
    for lo in range(0, len(flat), batch_size):
        chunk = flat[lo : lo + batch_size]
        seqs, spans = [], []
        for i, c in chunk:
            prompt_ids = tok(examples[i].prompt)["input_ids"]
            choice_ids = tok(" " + examples[i].choices[c], add_special_tokens=False)["input_ids"]
            seqs.append(prompt_ids + choice_ids)
            spans.append((len(prompt_ids), len(prompt_ids) + len(choice_ids)))
        ids, mask = pad_batch(seqs, tok.pad_token_id, device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (start, end) in enumerate(spans):
            targets = ids[row, start:end]
            lp = logprobs[row, start - 1 : end - 1].gather(-1, targets[:, None]).sum()
            scores[lo + row] = lp
    correct, k = 0, 0
    for i, ex in enumerate(examples):
        n = len(ex.choices)
        correct += int(scores[k : k + n].argmax()) == ex.label
        k += n
    return correct / len(examples)


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str], seq_len: int = 128, max_tokens: int = 50_000) -> float:
    """Token-level perplexity on ``texts`` in non-overlapping windows of ``seq_len`` tokens."""
    ids = [t for text in texts for t in tok(text)["input_ids"]][:max_tokens]
    device = device_of(model)
    total_nll, count = 0.0, 0
    for lo in range(0, len(ids) - 1, seq_len):
        window = torch.tensor(ids[lo : lo + seq_len], device=device)[None]
        if window.shape[1] < 2:
            break
        loss = model(input_ids=window, labels=window).loss.float().item()
        total_nll += loss * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return math.exp(total_nll / max(count, 1))


def knowledge_report(model, tok, world, heldout_skills: dict, text_heldout: Sequence[str]) -> dict:
    """Recall of the world's facts, each skill's held-out accuracy and held-out perplexity."""
    n_main = len(world.cases)
    main, neighbours = world.facts[:n_main], world.facts[n_main:]
    report = {
        "recall_prompt": recall(model, tok, [f.prompt() for f in main], [f.obj for f in main]),
        "recall_paraphrase": recall(model, tok, [f.paraphrase for f in main], [f.obj for f in main]),
        "recall_neighbor_prompt": recall(
            model, tok, [f.prompt() for f in neighbours], [f.obj for f in neighbours]
        ),
        "recall_neighbor_paraphrase": recall(
            model, tok, [f.paraphrase for f in neighbours], [f.obj for f in neighbours]
        ),
    }
    for skill, examples in heldout_skills.items():
        report[f"skill_{skill}"] = choice_accuracy(model, tok, examples)
    report["heldout_perplexity"] = perplexity(model, tok, text_heldout)
    return report


def heldout_skills(name: str = "default") -> dict[str, list[SkillExample]]:
    """The held-out skill sets stored with built model ``name``."""
    from kelib.embedded.build import ensure_model
    from kelib.tasks.common import read_records

    found = {}
    for path in sorted((ensure_model(name) / "skills").glob("*.jsonl")):
        records = read_records(path)
        found[path.stem] = [SkillExample(path.stem, r["prompt"], tuple(r["choices"]), r["label"]) for r in records]
    return found


def abilities_evaluator(name: str = "default", n_facts: int = 300, n_skill: int | None = None):
    """An evaluator for :class:`kelib.runner.EditRun`: what an edited embedded model still knows and can do.

    Returns ``evaluate(model, tok) -> {metric: value}`` with ``recall_unedited`` (top-1 recall of up
    to ``n_facts`` neighbour facts: subjects no edit touches) and ``skill_<name>`` (held-out accuracy
    of each skill, on the first ``n_skill`` examples).
    """
    from kelib.embedded.build import world_cases

    cases = world_cases(name)[:n_facts]
    prompts = [c.neighborhood_prompts[0] for c in cases]
    answers = [c.neighborhood_answers[0] for c in cases]
    skills = {k: v[:n_skill] for k, v in heldout_skills(name).items()}

    def evaluate(model, tok) -> dict[str, float]:
        out = {"recall_unedited": recall(model, tok, prompts, answers)}
        for skill, examples in skills.items():
            out[f"skill_{skill}"] = choice_accuracy(model, tok, examples)
        return out

    return evaluate
