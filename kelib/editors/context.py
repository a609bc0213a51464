"""Context templates and lookup positions shared by ROME-family editors.

ROME averages the key over the prompt preceded by short texts the model itself generates (top-5
sampling), so the edit does not hinge on one exact context. Sampling is seeded: the same seed gives
the same templates, hence the same edit. A template is a string with ``{}`` where the prompt goes.

The *lookup position* is where a fact is read and written: the subject's last token (ROME/MEMIT's
``subject_last``, right for GPT-2 XL and friends per causal tracing) or the prompt's last token
(``prompt_last``, where a small model trained from scratch may look facts up instead).
"""

from __future__ import annotations

from typing import Sequence

import torch

from kelib.models import device_of, keys_and_values
from kelib.tokens import encode, pad_batch, subject_last_index

_TEMPLATE_CACHE: dict[tuple, list[str]] = {}


@torch.no_grad()
def generated_texts(model, tok, starts: Sequence[str], length: int, count: int, seed: int) -> list[str]:
    """``count`` sampled continuations (top-5, ``length`` new tokens) of each start string."""
    device = device_of(model)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    texts = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for start in starts:
            ids = encode(tok, start) if start else [bos]
            inputs = torch.tensor([ids] * count, device=device)
            out = model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                pad_token_id=tok.pad_token_id,
            )
            for row in out:
                text = tok.decode(row, skip_special_tokens=True)
                texts.append(text.replace("{", " ").replace("}", " ").strip())
    return texts


def rome_templates(model, tok, length_params: Sequence[Sequence[int]], seed: int) -> list[str]:
    """ROME's ``["{}"] + [text + ". {}"]``: for each ``(length, count)``, ``count`` texts generated
    from the beginning-of-text token."""
    key = ("rome", id(model), tuple(map(tuple, length_params)), seed)
    if key not in _TEMPLATE_CACHE:
        texts = []
        for i, (length, count) in enumerate(length_params):
            texts += generated_texts(model, tok, [""], length, count, seed + i)
        _TEMPLATE_CACHE[key] = ["{}"] + [t + ". {}" for t in texts]
    return _TEMPLATE_CACHE[key]


def memit_templates(model, tok, starts: Sequence[str], length: int, seed: int) -> list[list[str]]:
    """MEMIT's two groups: ``[["{}"], [one text from each start word + ". {}"]]``."""
    key = ("memit", id(model), tuple(starts), length, seed)
    if key not in _TEMPLATE_CACHE:
        texts = generated_texts(model, tok, starts, length, 1, seed)
        _TEMPLATE_CACHE[key] = [t + ". {}" for t in texts]
    return [["{}"], _TEMPLATE_CACHE[key]]


def lookup_index(tok, prefix: str, prompt: str, subject: str, fact_token: str) -> int:
    """Token index, in ``encode(tok, prefix + prompt)``, where the fact is read."""
    text = prefix + prompt
    if fact_token == "prompt_last":
        return len(encode(tok, text)) - 1
    if fact_token == "subject_last":
        return subject_last_index(tok, text, subject, start=len(prefix))
    raise ValueError(f"unknown fact_token {fact_token!r}; choose subject_last or prompt_last")


def split_template(template: str) -> str:
    """The prefix before ``{}`` (templates put the prompt last)."""
    prefix, _, rest = template.partition("{}")
    if rest:
        raise ValueError(f"context template {template!r} must end with '{{}}'")
    return prefix


def keys_at(
    model, tok, cases, templates: Sequence[str], layers: Sequence[int], fact_token: str, part: str = "mlp_out"
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Mean key and value over ``templates`` for each case, per layer.

    Returns ``{layer: (K, V)}`` with ``K: [n_cases, d_in]`` and ``V: [n_cases, d_out]``.
    """
    texts, positions = [], []
    for case in cases:
        for template in templates:
            prefix = split_template(template)
            texts.append(encode(tok, prefix + case.prompt))
            positions.append(lookup_index(tok, prefix, case.prompt, case.subject, fact_token))
    ids, mask = pad_batch(texts, tok.pad_token_id, device_of(model))
    found = keys_and_values(model, ids, mask, positions, layers, part)
    n = len(templates)
    return {
        layer: (k.view(len(cases), n, -1).mean(1), v.view(len(cases), n, -1).mean(1))
        for layer, (k, v) in found.items()
    }
