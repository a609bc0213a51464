"""Byte-level BPE tokenizers trained offline with the ``tokenizers`` library (GPT-2 style)."""

from __future__ import annotations

from typing import Iterable, Sequence

EOS = "<|endoftext|>"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    whole_words: Sequence[str] = (),
    min_frequency: int = 2,
):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training text (an iterator is fine).
        vocab_size: total vocabulary size, special token included.
        whole_words: strings that must be single tokens when preceded by a space (e.g. the objects of
            facts, so that an edit's target is one token). They are added to the BPE vocabulary as
            merges-free entries after training, so they never split ordinary words.
        min_frequency: BPE merge threshold.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    if whole_words:
        tokenizer.add_tokens([" " + w.strip() for w in whole_words])
    return tokenizer
