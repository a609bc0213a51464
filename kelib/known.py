"""The edit cases a model already knows: edits are only meaningful on facts it answers before editing.

A case is *known* when the model's top-1 next token after the case's prompt is the first token of
``target_true`` (greedy, no sampling; the prompt as is, with the tokenizer's own special tokens).
The embedded models know their world by construction; a pretrained model knows part of CounterFact
(SmolLM2-135M: see ``params/hparams/ROME/smollm2-135m.yaml``). The list is cached per dataset and
per weights (:func:`kelib.models.weights_fingerprint`), as the case ids in the dataset's order.

A notebook asks for it by dataset name: ``counterfact_edit:known`` is the known subset of
``counterfact_edit`` (:func:`kelib.experiments.load_setup`), less the tune split: the first
:data:`TUNE_FACTS` facts of :data:`TUNE_DATASET` the model knows are kept for choosing
hyperparameters (SmolLM2's edited layers come from causal tracing on them,
``benchmarks/trace_smollm2.py``) and are never edited or scored, whichever dataset a notebook edits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kelib.io import read_json, write_json
from kelib.models import device_of, weights_fingerprint
from kelib.paths import cache_dir
from kelib.tokens import TokenError, encode, pad_batch, with_target

KNOWN_SUFFIX = ":known"
TUNE_DATASET = "counterfact_edit"  # whose first TUNE_FACTS known facts (in its order) are the tune split
TUNE_FACTS = 30  # the facts tuning reads and no notebook edits, whatever dataset it edits


@torch.no_grad()
def answers_top1(model, tok, cases: Sequence, batch_size: int = 32) -> list[bool]:
    """Per case, whether the model's argmax after the prompt is the first token of ``target_true``
    (False where the target cannot be tokenised after the prompt)."""
    out = []
    device = device_of(model)
    for lo in range(0, len(cases), batch_size):
        chunk = cases[lo : lo + batch_size]
        prompts, firsts = [], []
        for case in chunk:
            try:
                full, start = with_target(tok, case.prompt, case.target_true)
            except TokenError:
                full, start = encode(tok, case.prompt) + [-1], len(encode(tok, case.prompt))
            prompts.append(full[:start])
            firsts.append(full[start])
        ids, mask = pad_batch(prompts, tok.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        top = logits[torch.arange(len(chunk), device=device), last].argmax(-1).tolist()
        out += [t == f for t, f in zip(top, firsts)]
    return out


def known_cases(model, tok, cases: Sequence, dataset: str, progress: bool = True) -> list:
    """The cases of ``dataset`` (``cases``, as loaded) that the model answers top-1, in their order;
    computed once per dataset and weights, then read from ``<cache>/known/``."""
    path = cache_dir("known") / f"{dataset}-{len(cases)}-{weights_fingerprint(model)}.json"
    if path.exists():
        ids = set(read_json(path)["known"])
    else:
        if progress:
            print(f"finding the {dataset} facts the model knows (top-1, {len(cases)} prompts; cached after)")
        flags = answers_top1(model, tok, cases)
        ids = {c.case_id for c, ok in zip(cases, flags) if ok}
        write_json(path, {"dataset": dataset, "n_cases": len(cases), "n_known": len(ids),
                          "known": [c.case_id for c in cases if c.case_id in ids]})
    return [c for c in cases if c.case_id in ids]


def tune_cases(model, tok) -> list:
    """The tune split: the first :data:`TUNE_FACTS` facts of :data:`TUNE_DATASET` the model knows, for
    hyperparameter choices only (causal tracing picks SmolLM2's layers on them)."""
    from kelib.data import load_cases

    return known_cases(model, tok, load_cases(TUNE_DATASET), TUNE_DATASET)[:TUNE_FACTS]


def eval_cases(model, tok, known: Sequence) -> list:
    """``known`` (any dataset's :func:`known_cases`) less the tune split's facts, by case id (CounterFact
    and its edit subset share ids): what notebooks edit and score."""
    tuned = {c.case_id for c in tune_cases(model, tok)}
    return [c for c in known if c.case_id not in tuned]


def split_known(dataset: str) -> tuple[str, bool]:
    """``("counterfact_edit", True)`` for ``"counterfact_edit:known"``; the name unchanged otherwise."""
    if dataset.endswith(KNOWN_SUFFIX):
        return dataset[: -len(KNOWN_SUFFIX)], True
    return dataset, False
