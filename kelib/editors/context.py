"""Context templates and lookup positions shared by ROME-family editors.

ROME averages the key over the prompt preceded by short texts the model itself generates (top-5
sampling), so the edit does not hinge on one exact context. Sampling is seeded: the same seed gives
the same templates, hence the same edit. A template is a string with ``{}`` where the prompt goes.

The *lookup position* is where a fact is read and written: the subject's last token (ROME/MEMIT's
``subject_last``, right for GPT-2 XL and friends per causal tracing) or the prompt's last token
(``prompt_last``, where a small model trained from scratch may look facts up instead).

Templates are a function of the weights they were sampled from. A sequential run samples them once,
from the unedited model, and keeps them for all its edits: the runner pins them with
:func:`pinned_templates` and saves them with every checkpoint, so a run resumed in a new process
reuses them instead of sampling new ones from the edited weights. Outside a pin, templates are
cached per process by a fingerprint of the model's weights (never by ``id(model)``, which Python
reuses for a new model once the old one is freed).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import torch

from kelib.models import device_of, keys_and_values, weights_fingerprint
from kelib.tokens import encode, pad_batch, subject_last_index

_TEMPLATE_CACHE: dict[tuple, list[str]] = {}
_PINNED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kelib_pinned_templates", default=None)


@contextlib.contextmanager
def pinned_templates(store: dict | None = None) -> Iterator[dict]:
    """Within this block, templates are read from (and first put into) ``store``.

    ``store`` maps a key (``"rome|<length params, seed>"``) to its template list. The runner keeps one
    store per run and saves it; every registered editor call pins a store of its own when none is
    pinned (``store=None`` keeps an enclosing one), so all layers of one MEMIT call see the same
    templates even though the call edits the weights between layers."""
    if store is None and _PINNED.get() is not None:
        yield _PINNED.get()
        return
    token = _PINNED.set({} if store is None else store)
    try:
        yield _PINNED.get()
    finally:
        _PINNED.reset(token)


def _templates(kind: str, params, model, sample: Callable[[], list[str]]) -> list[str]:
    """The templates of ``kind`` with ``params``: pinned ones, else those sampled from these exact
    weights earlier in this process, else newly sampled (and pinned, if a store is)."""
    store = _PINNED.get()
    key = f"{kind}|{params!r}"
    if store is not None and key in store:
        return store[key]
    cache_key = (key, weights_fingerprint(model))
    if cache_key not in _TEMPLATE_CACHE:
        _TEMPLATE_CACHE[cache_key] = list(sample())
    if store is not None:
        store[key] = _TEMPLATE_CACHE[cache_key]
    return _TEMPLATE_CACHE[cache_key]


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
    lengths = [list(map(int, p)) for p in length_params]

    def sample() -> list[str]:
        texts = []
        for i, (length, count) in enumerate(lengths):
            texts += generated_texts(model, tok, [""], length, count, seed + i)
        return ["{}"] + [t + ". {}" for t in texts]

    return _templates("rome", (lengths, seed), model, sample)


def memit_templates(model, tok, starts: Sequence[str], length: int, seed: int) -> list[list[str]]:
    """MEMIT's two groups: ``[["{}"], [one text from each start word + ". {}"]]``."""
    starts = list(starts)

    def sample() -> list[str]:
        return [t + ". {}" for t in generated_texts(model, tok, starts, length, 1, seed)]

    return [["{}"], _templates("memit", (starts, int(length), seed), model, sample)]


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
