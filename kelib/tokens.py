"""Token bookkeeping shared by editors and metrics: where the subject ends, where a target starts.

The lesson of a failed prototype (see the embedded-default notes): the key used to compute an edit
must be read at exactly the token the model sees at evaluation. Positions here are therefore always
computed by tokenizing the text *up to* the subject's end, so BPE merges match the full prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch


class TokenError(ValueError):
    """A subject that is not in its prompt, or a target that tokenizes to nothing."""


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own special tokens (e.g. LLaMA's BOS)."""
    return list(tok(text)["input_ids"])


def subject_last_index(tok, prompt: str, subject: str, start: int = 0) -> int:
    """Index, in ``encode(tok, prompt)``, of the last token of the first occurrence of ``subject``
    at or after character ``start`` (context prefixes put the prompt after ``start``)."""
    start = prompt.find(subject, start) if subject else -1
    if start < 0:
        raise TokenError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    prefix_ids = encode(tok, prompt[: start + len(subject)])
    full_ids = encode(tok, prompt)
    if full_ids[: len(prefix_ids)] != prefix_ids:
        # The subject's last token merged with what follows it: take the token that covers its end.
        return _covering_token(tok, prompt, start + len(subject) - 1)
    return len(prefix_ids) - 1


def _covering_token(tok, text: str, char_index: int) -> int:
    encoded = tok(text, return_offsets_mapping=True)
    for i, (lo, hi) in enumerate(encoded["offset_mapping"]):
        if lo <= char_index < hi:
            return i
    raise TokenError(f"no token covers character {char_index} of {text!r}")


def with_target(tok, prompt: str, target: str) -> tuple[list[int], int]:
    """Ids of ``prompt + " " + target`` and the index of the first target token.

    A leading space is added to the target when missing (as ROME does). Raises :class:`TokenError`
    when the target adds no token.
    """
    if not target or not target.strip():
        raise TokenError(f"empty target for prompt {prompt!r}")
    spaced = target if target.startswith(" ") else " " + target
    prompt_ids = encode(tok, prompt)
    full_ids = encode(tok, prompt + spaced)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # Prompt and target merged across the boundary: keep them apart, as teacher forcing needs.
        full_ids = prompt_ids + list(tok(spaced, add_special_tokens=False)["input_ids"])
    if len(full_ids) <= len(prompt_ids):
        raise TokenError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return full_ids, len(prompt_ids)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``(input_ids, attention_mask)``, both ``[batch, max_len]``."""
    if not sequences:
        raise TokenError("empty batch")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)
