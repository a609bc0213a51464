"""Causal tracing (ROME, Meng et al. 2022): where does a model store a fact?

Corrupt the subject's token embeddings with Gaussian noise, then restore one hidden state, at one
token position and one layer, to its clean value. The recovered probability of the true object,
minus the corrupted probability, is that state's *indirect effect*. ROME found GPT-2 XL's effect
peaks at the subject's last token in middle-layer MLPs; a model that looks facts up elsewhere needs
its edits elsewhere (the editors' ``fact_token`` parameter).

``kind`` chooses what is restored: ``"block"`` (the residual stream after a block), ``"mlp"`` (the MLP
output) or ``"attn"`` (the attention output).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from kelib.models import architecture, device_of, get_module, module_name, n_layers, patch_output, same_device
from kelib.tokens import encode, with_target

KIND_PART = {"block": "block", "mlp": "mlp", "attn": "attn_out"}


@dataclass
class Trace:
    tokens: list[str]
    subject_range: tuple[int, int]  # [first, last] token indices of the subject
    effect: torch.Tensor  # [positions, layers]: restored probability of the answer
    clean: float  # probability of the answer's first token without noise
    corrupted: float  # with noise and nothing restored


@torch.no_grad()
def trace_fact(
    model, tok, prompt: str, subject: str, answer: str, kind: str = "block",
    samples: int = 8, noise: float | None = None, seed: int = 0,
) -> Trace:
    """Indirect effect of every (position, layer) state on ``answer`` after ``prompt``."""
    if kind not in KIND_PART:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KIND_PART)}")
    full, start = with_target(tok, prompt, answer)
    device = device_of(model)
    ids = torch.tensor(full[:start], device=device)[None]  # on the model's device (cuda: not the CPU)
    answer_id = full[start]
    first, last = _subject_range(tok, prompt, subject)
    embed = get_module(model, architecture(model).embed)
    same_device(ids, embed.weight, what="causal tracing's token ids and the model's embedding")
    scale = noise if noise is not None else 3 * float(embed.weight.float().std())
    layers = n_layers(model)
    positions = ids.shape[1]

    def prob(logits):
        return torch.softmax(logits[:, -1].float(), -1)[:, answer_id]

    clean_states = {}
    names = [module_name(model, layer, KIND_PART[kind]) for layer in range(layers)]
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(patch_output(model, n, lambda h, n=n: _keep(clean_states, n, h)))
        clean = float(prob(model(input_ids=ids).logits))

    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same noise on every device
    batch = ids.repeat(samples, 1)
    noise_tensor = (torch.randn(samples, last - first + 1, embed.weight.shape[1], generator=gen) * scale).to(device)

    def corrupt(h):
        h = h.clone()
        same_device(h, noise_tensor, what="causal tracing's noise and the embeddings")
        h[:, first : last + 1] += noise_tensor.to(h.dtype)
        return h

    with patch_output(model, architecture(model).embed, corrupt):
        corrupted = float(prob(model(input_ids=batch).logits).mean())
        effect = torch.zeros(positions, layers)  # on the CPU: filled with Python floats
        for layer, name in enumerate(names):
            for pos in range(positions):
                def restore(h, name=name, pos=pos):
                    h = h.clone()
                    same_device(h, clean_states[name], what=f"the corrupted and clean states of {name}")
                    h[:, pos] = clean_states[name][:, pos]
                    return h

                with patch_output(model, name, restore):
                    effect[pos, layer] = float(prob(model(input_ids=batch).logits).mean())
    tokens = [tok.decode([t]) for t in ids[0].tolist()]
    return Trace(tokens, (first, last), effect, clean, corrupted)


def _keep(store: dict, name: str, hidden: torch.Tensor) -> torch.Tensor:
    store[name] = hidden.detach().clone()
    return hidden


def _subject_range(tok, prompt: str, subject: str) -> tuple[int, int]:
    start = prompt.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} not in prompt {prompt!r}")
    before = len(encode(tok, prompt[:start])) if start > 0 else len(encode(tok, ""))
    through = len(encode(tok, prompt[: start + len(subject)]))
    return before, through - 1


def position_bucket(pos: int, trace: Trace) -> str:
    first, last = trace.subject_range
    final = len(trace.tokens) - 1
    if pos == final:
        return "prompt last"
    if pos < first:
        return "before subject"
    if pos == last:
        return "subject last"
    if first <= pos < last:
        return "subject other"
    return "after subject"


def average_effects(
    model, tok, cases: Sequence, kind: str = "block", samples: int = 8, seed: int = 0
) -> pd.DataFrame:
    """Mean indirect effect per (position bucket, layer) over edit cases' true facts.

    Returns a tidy frame: ``bucket, layer, effect, clean, corrupted, n`` where ``effect`` is the mean
    restored probability minus the mean corrupted probability.
    """
    rows = []
    for i, case in enumerate(cases):
        trace = trace_fact(model, tok, case.prompt, case.subject, case.target_true, kind, samples, seed=seed + i)
        for pos in range(len(trace.tokens)):
            for layer in range(trace.effect.shape[1]):
                rows.append({
                    "bucket": position_bucket(pos, trace),
                    "layer": layer,
                    "effect": float(trace.effect[pos, layer]) - trace.corrupted,
                    "clean": trace.clean,
                    "corrupted": trace.corrupted,
                })
    frame = pd.DataFrame(rows)
    summary = frame.groupby(["bucket", "layer"], as_index=False).agg(
        effect=("effect", "mean"), clean=("clean", "mean"), corrupted=("corrupted", "mean"), n=("effect", "size")
    )
    summary["kind"] = kind
    return summary
