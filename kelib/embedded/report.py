"""What an embedded model knows and can do: recall, skill accuracy, held-out perplexity.

The same functions score the model before and after edits (the notebooks reuse them), so the
training report and the damage measured later use one definition.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from kelib.embedded.skills import SkillExample
from kelib.io import read_json, stable_hash, write_json
from kelib.metrics import score_targets
from kelib.models import device_of
from kelib.tokens import pad_batch
from kelib.unchanged_blocks import UnchangedBlocks


def choice_accuracy(model, tok, examples: Sequence[SkillExample], batch_size: int = 64) -> float:
    """Multiple-choice accuracy: the choice with the highest summed log-probability wins (lm-eval ``acc``)."""
    if not examples:
        return float("nan")
    correct = choice_correct(model, tok, examples, batch_size)
    return sum(correct) / len(correct)


def choice_correct(model, tok, examples: Sequence[SkillExample], batch_size: int = 64,
                   forward: Callable | None = None) -> list[bool]:
    """Per example: whether the choice with the highest summed log-probability is the label.

    Scored with :func:`kelib.metrics.score_targets` (``forward`` as there), which reads every choice
    from the forward pass of the longest input it is a prefix of: one-token choices of an example
    cost one forward of its prompt, not one per choice."""
    prompts = [ex.prompt for ex in examples for _ in ex.choices]
    choices = [choice for ex in examples for choice in ex.choices]
    scores = score_targets(model, tok, prompts, choices, batch_size, forward)
    logprob = [-s.nll * len(s.token_correct) for s in scores]  # summed over the choice's tokens
    correct, k = [], 0
    for ex in examples:
        n = len(ex.choices)
        mine = logprob[k : k + n]
        correct.append(max(range(n), key=mine.__getitem__) == ex.label)
        k += n
    return correct


def perplexity(model, tok, texts: Sequence[str], seq_len: int = 128) -> float:
    """Token-level perplexity on ``texts``, each scored on its own (see :func:`paragraph_nll`)."""
    nll, tokens = paragraph_nll(model, tok, texts, seq_len)
    return math.exp(sum(n * t for n, t in zip(nll, tokens)) / max(sum(tokens), 1))


@torch.inference_mode()
def paragraph_nll(model, tok, texts: Sequence[str], seq_len: int = 128, batch_size: int = 8,
                  forward: Callable | None = None) -> tuple[list[float], list[int]]:
    """Per text: the mean next-token NLL and the number of tokens predicted, in non-overlapping
    windows of ``seq_len`` tokens within the text (each text on its own, from its start token).
    ``forward`` as in :func:`kelib.metrics.score_targets`.

    The token-weighted mean of the NLLs is the log-perplexity of all texts, so per-paragraph values
    let a verdict resample paragraphs and still speak about perplexity."""
    windows, owner = [], []
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        for lo in range(0, max(len(ids) - 1, 0), seq_len):
            window = ids[lo : lo + seq_len]
            if len(window) >= 2:
                windows.append(window)
                owner.append(i)
    total = [0.0] * len(texts)
    count = [0] * len(texts)
    device = device_of(model)
    # windows of similar length share a batch: a text's last window is short, and padding it to a
    # full one was a fifth of the work. Batches of 8 windows: 1.3x faster than 32 on one CPU thread
    # (their activations stay in cache; benchmarks/bench_scoring.py)
    order = sorted(range(len(windows)), key=lambda w: len(windows[w]))
    for lo in range(0, len(order), batch_size):
        chunk = [windows[w] for w in order[lo : lo + batch_size]]
        ids, mask = pad_batch(chunk, tok.pad_token_id, device)
        logits = (forward(model, ids, mask) if forward else model(input_ids=ids, attention_mask=mask).logits)
        logits = logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll = nll.view(ids.shape[0], -1) * mask[:, 1:]
        for row, window in enumerate(chunk):
            total[owner[order[lo + row]]] += float(nll[row].sum())
            count[owner[order[lo + row]]] += len(window) - 1
    keep = [i for i in range(len(texts)) if count[i]]
    return [total[i] / count[i] for i in keep], [count[i] for i in keep]


def knowledge_report(model, tok, world, heldout_skills: dict, text_heldout: Sequence[str]) -> dict:
    """Recall of the world's facts (all of them, then per split), each skill's held-out accuracy and
    held-out perplexity."""
    from kelib.embedded.world import SPLITS

    answers = [f.obj for f in world.facts]
    report = {}
    for kind, prompts in (("prompt", [f.prompt() for f in world.facts]),
                          ("paraphrase", [f.paraphrase for f in world.facts])):
        exact = [s.exact for s in score_targets(model, tok, prompts, answers)]
        report[f"recall_{kind}"] = sum(exact) / len(exact)
        for split in SPLITS:
            mine = [e for e, f in zip(exact, world.facts) if f.split == split]
            report[f"recall_{kind}_{split}"] = sum(mine) / len(mine) if mine else float("nan")
    for skill, examples in heldout_skills.items():
        report[f"skill_{skill}"] = choice_accuracy(model, tok, examples)
    report["heldout_perplexity"] = perplexity(model, tok, text_heldout)
    return report


def heldout_skills(name: str = "default") -> dict[str, list[SkillExample]]:
    """The held-out skill sets stored with built model ``name``."""
    from kelib.embedded.store import built_dir
    from kelib.tasks.common import read_records

    found = {}
    for path in sorted((built_dir(name) / "skills").glob("*.jsonl")):
        records = read_records(path)
        found[path.stem] = [SkillExample(path.stem, r["prompt"], tuple(r["choices"]), r["label"]) for r in records]
    return found


def heldout_texts(name: str = "default") -> list[str]:
    """The WikiText paragraphs built model ``name`` never trained on (its recipe's held-out split,
    the one the ``embedded_perplexity`` task reads)."""
    from kelib.embedded.store import built_dir, recipe_of
    from kelib.embedded.train import split_paragraphs

    return split_paragraphs(recipe_of(built_dir(name)))[1]


def abilities_evaluator(name: str = "default", n_facts: int = 300, n_skill: int | None = None,
                        n_text: int | None = None):
    """An evaluator for :class:`kelib.runner.EditRun`: what an edited embedded model still knows and can do.

    Returns ``evaluate(model, tok) -> Scores`` with ``recall_unedited`` (top-1 recall of up to
    ``n_facts`` facts of the world's *unedited* split: no edit, probe or statistic touches them),
    ``skill_<name>`` (held-out accuracy of each skill, on the first ``n_skill`` examples) and
    ``heldout_perplexity`` (perplexity on the first ``n_text`` held-out WikiText paragraphs, a
    continuous ability that moves before accuracy does). The result is a :class:`kelib.examples.Scores`: the means, with every example's score
    attached (1/0 per fact and skill example; per paragraph, its mean NLL weighted by its tokens).
    """
    from kelib.embedded.store import built_dir, world_of
    from kelib.examples import Sample, Scores

    facts = world_of(built_dir(name)).facts_in("unedited")[:n_facts]
    prompts = [f.prompt() for f in facts]
    answers = [f.obj for f in facts]
    skills = {k: v[:n_skill] for k, v in heldout_skills(name).items()}
    texts = heldout_texts(name)[:n_text]
    # the same texts and questions at every checkpoint: their passes start at the first edited block
    unchanged = UnchangedBlocks()

    def evaluate(model, tok) -> Scores:
        path = _cached_path(model, tok, evaluate.key)
        if path is not None and path.exists():
            return Scores.from_json(read_json(path))
        forward = unchanged.for_model(model)
        examples = {"recall_unedited": Sample([s.exact for s in score_targets(model, tok, prompts, answers,
                                                                               forward=forward)])}
        for skill, items in skills.items():
            examples[f"skill_{skill}"] = Sample(choice_correct(model, tok, items, forward=forward))
        nll, tokens = paragraph_nll(model, tok, texts, forward=forward)
        examples["heldout_perplexity"] = Sample(nll, tokens, log=True, higher_is_better=False)
        scores = Scores({metric: sample.mean for metric, sample in examples.items()}, examples)
        if path is not None:
            write_json(path, {"key": evaluate.key, **scores.to_json()})
        return scores

    # the run cache keys on this: runs made before perplexity and per-example scores (1), or before
    # perplexity's batches of 8 windows (2: its NLLs moved by up to 1e-6), are not reused
    evaluate.key = {"abilities": 3, "model": name, "n_facts": n_facts, "n_skill": n_skill, "n_text": n_text}
    return evaluate


def _cached_path(model, tok, key: dict) -> Path | None:
    """Where the abilities of exactly this model (its weights, and any view it answers through:
    GRACE's codebook) are kept, or None when they cannot be keyed (undeclared forward hooks).

    Every run of a notebook starts from the same unedited model: its abilities at checkpoint 0 are
    computed once and read back by the other runs, as lm-eval's results are
    (:func:`kelib.evaluation.evaluate_abilities`)."""
    from kelib.evaluation import tokenizer_fingerprint, view_keys
    from kelib.models import weights_fingerprint
    from kelib.paths import cache_dir
    from kelib.runstore import code_identity

    views = view_keys(model)
    if views is None:
        return None
    fingerprint = weights_fingerprint(model)
    full = {"evaluator": key, "weights": fingerprint, "views": views, "tokenizer": tokenizer_fingerprint(tok),
            "model_class": type(model).__name__,
            "code": code_identity("kelib.embedded.report", "kelib.examples", "kelib.metrics", "kelib.tokens",
                                  "kelib.unchanged_blocks")}
    return cache_dir("evaluations", fingerprint) / f"embedded-abilities-{stable_hash(full)}.json"
