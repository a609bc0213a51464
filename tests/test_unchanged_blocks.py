"""UnchangedBlocks: forward passes over fixed inputs that start at the first changed block give the
model's own logits bit for bit, and run only the blocks from there."""

import pytest
import torch

from kelib.models import architecture, get_module, get_weight, set_weight
from kelib.tokens import pad_batch
from kelib.unchanged_blocks import UnchangedBlocks


def _batches(tok, device):
    texts = [["the cat sat on the mat", "a dog", "birds fly south in winter"], ["one more line of text here"]]
    return [pad_batch([tok(t)["input_ids"] for t in group], tok.pad_token_id, device) for group in texts]


def _check(model, memory, batches) -> int:
    """Asserts every batch's logits equal the model's own; returns how many blocks the memory ran."""
    before = memory.blocks_run
    with torch.inference_mode():
        for ids, mask in batches:
            assert torch.equal(memory.logits(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits)
    return memory.blocks_run - before


def _nudge(model, layer: int, scale: float = 1.01) -> torch.Tensor:
    w = get_weight(model, layer).clone()
    set_weight(model, layer, w * scale)
    return w


def test_equal_logits_from_the_first_changed_block(tiny_model):
    model, tok = tiny_model
    batches = _batches(tok, next(model.parameters()).device)
    n = len(get_module(model, architecture(model).blocks))  # 3
    memory = UnchangedBlocks()
    assert _check(model, memory, batches) == 2 * n  # first pass: every block, recorded
    assert _check(model, memory, batches) == 0  # nothing changed: the final norm and unembedding only
    top = _nudge(model, n - 1)
    assert _check(model, memory, batches) == 2 * 1  # the top block only
    low = _nudge(model, 1)
    assert _check(model, memory, batches) == 2 * (n - 1)  # from block 1
    set_weight(model, 1, low)
    set_weight(model, n - 1, top)
    assert _check(model, memory, batches) == 0  # back to the reference


def test_a_batch_first_seen_on_an_edited_model_keeps_only_the_states_below_the_edit(tiny_gpt2):
    """States recorded above an edited block passed through the edit: once the block is restored they
    must not be used (a run's restore between two runs of one process)."""
    model, tok = tiny_gpt2
    first, second = _batches(tok, next(model.parameters()).device)
    memory = UnchangedBlocks()
    _check(model, memory, [first])  # the reference: the model as it is
    w = _nudge(model, 1)
    assert _check(model, memory, [second]) == 3  # new batch: recorded whole, kept up to block 1
    set_weight(model, 1, w)
    assert _check(model, memory, [first]) == 0
    assert _check(model, memory, [second]) == 2  # from block 1, not from the final norm


def test_hooks_and_embeddings(tiny_gpt2):
    model, tok = tiny_gpt2
    batches = _batches(tok, next(model.parameters()).device)
    memory = UnchangedBlocks()
    _check(model, memory, batches)
    # a hook inside block 1 (GRACE's codebook sits on an MLP) changes what it outputs: run from there
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda module, args, out: out + 0.5)
    try:
        assert _check(model, memory, batches) == 2 * 2
    finally:
        handle.remove()
    # a hook outside the blocks: the model's own forward, nothing from memory
    handle = model.transformer.wte.register_forward_hook(lambda module, args, out: out * 1.5)
    try:
        assert _check(model, memory, batches) == 0
    finally:
        handle.remove()
    # changed embeddings: every block again, and a new reference
    wpe = model.transformer.wpe.weight
    saved = wpe.detach().clone()
    with torch.no_grad():
        wpe.mul_(1.01)
    try:
        assert _check(model, memory, batches) == 2 * 3
        assert _check(model, memory, batches) == 0
    finally:
        with torch.no_grad():
            wpe.copy_(saved)
    assert _check(model, memory, batches) == 2 * 3


def test_nothing_kept_beyond_the_memory_limit(tiny_gpt2):
    model, tok = tiny_gpt2
    batches = _batches(tok, next(model.parameters()).device)
    memory = UnchangedBlocks(max_bytes=0)
    _check(model, memory, batches)
    assert _check(model, memory, batches) == 2 * 3


@pytest.mark.parametrize("layer", [0, 9])  # the first block, the last
def test_the_abilities_evaluator_scores_as_the_plain_passes_do(micro, untouched, monkeypatch, tmp_path, layer):
    """After an edit, the evaluator (whose passes start at the edited block) gives the scores of the
    plain functions on the model, exactly."""
    from kelib.embedded import abilities_evaluator
    from kelib.embedded.report import choice_correct, heldout_skills, heldout_texts, paragraph_nll

    model, tok, _ = micro
    layer = min(layer, len(model.transformer.h) - 1)
    evaluate = abilities_evaluator("micro", n_facts=20, n_skill=30, n_text=20)
    texts, topics = heldout_texts("micro")[:20], heldout_skills("micro")["topic"][:30]
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))  # nothing read back from the evaluation cache
    evaluate(model, tok)  # records the unedited model's states
    w = _nudge(model, layer, 1.05)
    try:
        scores = evaluate(model, tok)
        nll, tokens = paragraph_nll(model, tok, texts)
        topic = choice_correct(model, tok, topics)
    finally:
        set_weight(model, layer, w)
    assert list(scores.examples["heldout_perplexity"].values) == nll
    assert list(scores.examples["heldout_perplexity"].weights) == tokens
    assert list(scores.examples["skill_topic"].values) == [float(c) for c in topic]
