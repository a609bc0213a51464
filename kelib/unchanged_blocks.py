"""Forward passes over fixed inputs that start at the first block an edit changed.

A sequential run scores the same held-out texts, skill questions and unedited facts at every
checkpoint, and an edit changes a few blocks, often the top ones (ROME's and GRACE's layer 3 of the
default model's 4). The hidden states entering the blocks below the lowest changed one are the same
at every checkpoint. :class:`UnchangedBlocks` keeps them, per input batch, from the first pass that
saw the batch, and later passes run only the blocks from the first one that differs: the same
logits, bit for bit, as ``model(input_ids, attention_mask).logits`` (the blocks are called with the
arguments the model itself passed them: :func:`kelib.editors.partial.freeze_below`).

"Differs" is checked, not assumed: at each evaluation (:meth:`UnchangedBlocks.for_model`) the
parameters outside the blocks and of every block are compared with those of the model the hidden
states were recorded on, and a block with a forward hook (GRACE's codebook) counts as changed. A
hook outside the blocks turns the memory off.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from kelib.editors.partial import freeze_below
from kelib.models import architecture, get_module, output_hidden

# what the kept hidden states may take; batches beyond it are run whole and not kept
DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class _Kept:
    entering: list[torch.Tensor]  # hidden states entering block 0, 1, ... (the last: the final norm)
    calls: list  # each block's other arguments, as the model passed them


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class UnchangedBlocks:
    """``logits(model, input_ids, attention_mask)``: ``model(...).logits``, run from the first block
    that changed since the batch was first seen.

    The first pass over a batch records the hidden states entering every block; the model's
    parameters at that time are the *reference*. A later pass compares the model with the reference
    (parameters outside the blocks, then block by block): when block ``s`` is the first that differs
    (or carries a hook), the pass starts there, from the kept hidden states entering it. When
    something below the blocks differs (the embeddings), the pass runs whole and the reference is
    renewed; hidden states kept against the old one are recorded again when their batch comes back.
    Hidden states recorded while blocks differed from the reference are kept only up to the first
    differing block: a block restored to the reference later must not meet states that passed
    through its edited version.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._kept: dict[tuple, _Kept] = {}
        self._bytes = 0
        self._reference: list[list[torch.Tensor]] | None = None  # outside parameters, then each block's
        self._model_id: int | None = None
        self.blocks_run = 0  # blocks called by this memory's passes (for tests and benchmarks)

    def logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, vocab]`` logits of ``model``, equal to ``model(input_ids, attention_mask).logits``."""
        return self.for_model(model)(model, input_ids, attention_mask)

    def for_model(self, model) -> Callable:
        """:meth:`logits` for the passes of one evaluation, during which ``model`` does not change: it
        is compared with the reference once, here, not at every batch (a few milliseconds each)."""
        blocks = list(get_module(model, architecture(model).blocks))
        start = self._first_changed(model, blocks)
        if start is None:  # a hook outside the blocks: only the model's own forward runs it faithfully
            return _own_logits
        if start == 0:
            self._renew_reference(model, blocks)
            start = len(blocks)
        return functools.partial(self._logits_from, blocks, start)

    def _logits_from(self, blocks, start: int, model, input_ids, attention_mask) -> torch.Tensor:
        arch = architecture(model)
        final_norm = get_module(model, arch.final_norm)
        key = (tuple(input_ids.shape), input_ids.device.type, _bytes_of(input_ids), _bytes_of(attention_mask))
        kept = self._kept.get(key)
        if kept is not None:
            start = min(start, len(kept.entering) - 1)
            hidden = kept.entering[start]
            for block, (args, kwargs) in zip(blocks[start:], kept.calls[start:]):
                hidden = output_hidden(block(hidden, *args, **kwargs))
            self.blocks_run += len(blocks) - start
        else:
            entering, calls = _record(model, blocks, final_norm, input_ids, attention_mask)
            self.blocks_run += len(blocks)
            hidden = entering[-1]
            self._keep(key, _Kept(entering[: start + 1], calls))
        return get_module(model, arch.lm_head)(final_norm(hidden))

    def _first_changed(self, model, blocks: list[torch.nn.Module]) -> int | None:
        """The first block that differs from the reference (0: something below the blocks does;
        ``len(blocks)``: none does), or None when a module outside the blocks has a hook."""
        inside = {id(m) for block in blocks for m in block.modules()}
        if any(_hooked(m) for m in model.modules() if id(m) not in inside):
            return None
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return None
        current = _parameters(model, blocks)
        reference = self._reference
        if reference is None or self._model_id != id(model) or len(reference) != len(current):
            return 0
        if not _same(current[0], reference[0]):
            return 0
        for i, block in enumerate(blocks):
            if not _same(current[i + 1], reference[i + 1]) or any(_hooked(m) for m in block.modules()):
                return i
        return len(blocks)

    def _renew_reference(self, model, blocks: list[torch.nn.Module]) -> None:
        self._reference = [[p.detach().clone() for p in group] for group in _parameters(model, blocks)]
        self._model_id = id(model)
        self._kept.clear()
        self._bytes = 0

    def _keep(self, key: tuple, kept: _Kept) -> None:
        size = sum(t.numel() * t.element_size() for t in kept.entering)
        if self._bytes + size <= self.max_bytes:
            self._kept[key] = kept
            self._bytes += size


def _own_logits(model, input_ids, attention_mask) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _parameters(model, blocks: list[torch.nn.Module]) -> list[list[torch.Tensor]]:
    """The model's parameters outside the blocks (embeddings, final norm, unembedding), then each
    block's."""
    inside = {id(p) for block in blocks for p in block.parameters()}
    return [[p for p in model.parameters() if id(p) not in inside], *[list(b.parameters()) for b in blocks]]


def _same(current: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    return len(current) == len(reference) and all(
        c.shape == r.shape and c.device == r.device and c.dtype == r.dtype and torch.equal(c, r)
        for c, r in zip(current, reference))


def _bytes_of(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().numpy().tobytes()


def _record(model, blocks, final_norm, input_ids, attention_mask) -> tuple[list[torch.Tensor], list]:
    """One pass up to the final norm: the hidden states entering each block and the final norm,
    and each block's other arguments."""
    entering: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        entering.append((args[0] if args else kwargs["hidden_states"]).detach())

    # registered before freeze_below's own hooks, so they run first (freeze_below stops at the final norm)
    handles = [m.register_forward_pre_hook(keep, with_kwargs=True) for m in [*blocks, final_norm]]
    try:
        upper = freeze_below(model, input_ids, attention_mask, 0)
    finally:
        for handle in handles:
            handle.remove()
    return entering, upper.calls
