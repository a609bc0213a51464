"""Run a causal LM from one block upward, on hidden states that a first pass fixed below it.

While an edit's target value is optimised, δ enters at one layer L; everything below L is the same
at every optimisation step. :func:`freeze_below` runs the model once, without gradients, and keeps
the hidden states entering block ``start`` and the arguments the model passed to each block from
``start`` up (attention mask, position ids, LLaMA's rotary ``position_embeddings``: whatever the
family's own forward builds, so no family's mask or rotary code is re-implemented here).
:meth:`Upper.run` then runs only the blocks from ``start`` and the unembedding at the positions asked
for.

Blocks are called as the model calls them, with the arguments it passed (``use_cache=False``, so no
key-value cache is carried between calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kelib.models import architecture, get_module, output_hidden

_Call = tuple[tuple, dict]  # a block's positional arguments after the hidden states, and its keywords


class _Stop(Exception):
    """Ends the freezing pass once every needed block has been seen."""


@dataclass
class Upper:
    """The model above ``start``: ``hidden`` ``[batch, seq, d]`` enters block ``start`` (the final
    norm when ``start`` is the number of blocks) and ``calls[i]`` are block ``start + i``'s other
    arguments."""

    model: Any
    start: int
    hidden: torch.Tensor
    calls: list[_Call]

    def run(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits ``[len(rows), vocab]`` at ``(rows, cols)`` with ``hidden`` entering block ``start``."""
        arch = architecture(self.model)
        blocks = get_module(self.model, arch.blocks)
        for block, (args, kwargs) in zip(list(blocks)[self.start :], self.calls):
            hidden = output_hidden(block(hidden, *args, **kwargs))
        # The final norm acts per position, so it and the unembedding run on the read positions only.
        picked = get_module(self.model, arch.final_norm)(hidden[rows, cols])
        return get_module(self.model, arch.lm_head)(picked)

    def subset(self, rows: torch.Tensor) -> "Upper":
        """The same, for the batch rows ``rows`` only (cases whose optimisation stopped drop out).

        Batched arguments are the tensors whose first dimension is the batch size (the attention
        mask); position ids and rotary tables have a first dimension of 1 and are shared."""
        size = self.hidden.shape[0]
        memo: dict[int, Any] = {}

        def take(value):
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == size:
                if id(value) not in memo:
                    memo[id(value)] = value[rows]
                return memo[id(value)]
            if isinstance(value, (tuple, list)):
                return type(value)(take(v) for v in value)
            return value

        calls = [(take(args), {k: take(v) for k, v in kwargs.items()}) for args, kwargs in self.calls]
        return Upper(self.model, self.start, self.hidden[rows], calls)


@torch.no_grad()
def freeze_below(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> Upper:
    """One pass of the model up to block ``start``'s input, recording what :class:`Upper` needs.

    Hooks the caller registers (e.g. :func:`kelib.models.capture` at a lower layer) see this pass.
    The pass runs through the top blocks as well (their arguments are recorded as they are called)
    and stops before the final norm.
    """
    arch = architecture(model)
    blocks = list(get_module(model, arch.blocks))
    final_norm = get_module(model, arch.final_norm)
    entry: dict[str, torch.Tensor] = {}
    calls: list[_Call] = []

    def record(module, args, kwargs):
        if args:
            hidden, rest, keywords = args[0], tuple(args[1:]), dict(kwargs)
        else:
            keywords = dict(kwargs)
            hidden, rest = keywords.pop("hidden_states"), ()
        if "hidden" not in entry:
            entry["hidden"] = hidden.detach()
        if module is final_norm:
            raise _Stop
        calls.append((rest, keywords))

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks[start:]]
    handles.append(final_norm.register_forward_pre_hook(record, with_kwargs=True))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return Upper(model, start, entry["hidden"], calls)
