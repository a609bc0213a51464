"""Train an embedded model from a :class:`~kelib.embedded.recipe.Recipe`, from scratch, on the CPU.

Each epoch is one pass over every trained fact statement (of every split of the world), plus fresh
skill examples and WikiText chunks, shuffled and packed into fixed-length rows. Every document starts
with the end-of-text token, which the tokenizer also puts before every prompt, so the model always
sees a document boundary before a question, in training and evaluation alike.
"""

from __future__ import annotations

import gzip
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kelib.embedded.recipe import Recipe
from kelib.embedded.skills import SkillExample, skill_sets
from kelib.embedded.tokenizer import EOS, train_bpe
from kelib.embedded.world import World, training_statements, world_for
from kelib.paths import bundled


@dataclass
class TrainingData:
    world: World
    train_skills: dict
    heldout_skills: dict[str, list[SkillExample]]
    text_train: list[str]
    text_heldout: list[str]
    statements: list[str]


def wikitext_paragraphs() -> list[str]:
    """Non-empty, non-heading paragraphs of the bundled WikiText-2 raw test split."""
    raw = gzip.open(bundled("corpus", "wiki.test.raw.gz"), "rt", encoding="utf-8").read()
    lines = [line.strip() for line in raw.split("\n")]
    return [line for line in lines if len(line) > 40 and not line.startswith("=")]


def split_paragraphs(recipe: Recipe) -> tuple[list[str], list[str]]:
    """WikiText paragraphs ``(trained on, held out for perplexity)``: every n-th is held out."""
    paragraphs = wikitext_paragraphs()
    every = recipe.heldout_text_every
    return (
        [p for i, p in enumerate(paragraphs) if i % every != 0],
        [p for i, p in enumerate(paragraphs) if i % every == 0],
    )


def prepare_data(recipe: Recipe) -> TrainingData:
    world = world_for(recipe)
    train_skills, heldout = skill_sets(world, recipe.skills, recipe.n_eval, seed=recipe.seed)
    text_train, text_heldout = split_paragraphs(recipe)
    statements = [s for f in world.facts for s in training_statements(f, world.relations[f.relation_id])]
    return TrainingData(world, train_skills, heldout, text_train, text_heldout, statements)


def objects_of(world: World) -> list[str]:
    found = {f.obj for f in world.facts} | {c.target_new for cases in world.cases.values() for c in cases}
    return sorted(found)


def make_tokenizer(recipe: Recipe, data: TrainingData):
    rng = random.Random(recipe.seed)
    skill_text = [data.train_skills[s](rng).text for s in data.train_skills for _ in range(500)]
    corpus = data.statements + skill_text + data.text_train
    whole = objects_of(data.world) if recipe.whole_word_objects else ()
    tok = train_bpe(corpus, recipe.vocab_size, whole_words=whole)
    _add_bos(tok)
    return tok


def _add_bos(tok) -> None:
    """Make the tokenizer put the end-of-text token before every text it encodes."""
    from tokenizers.processors import TemplateProcessing

    eos_id = tok.convert_tokens_to_ids(EOS)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )


def make_model(recipe: Recipe, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=recipe.n_layer,
        n_embd=recipe.n_embd,
        n_head=recipe.n_head,
        n_positions=recipe.n_positions,
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        # Dropout slows memorisation of single facts, and the model never sees new data.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(recipe.seed)
    return GPT2LMHeadModel(config)


class _Encoded:
    """Token ids of the fixed documents (fact statements, WikiText paragraphs), encoded once:
    re-tokenizing them every epoch cost as much as training the micro model."""

    def __init__(self, data: TrainingData, tok):
        self.statements = tok(data.statements, add_special_tokens=True)["input_ids"]
        self.paragraphs = tok(data.text_train, add_special_tokens=True)["input_ids"]


def epoch_rows(
    recipe: Recipe, data: TrainingData, tok, rng: random.Random, encoded: _Encoded | None = None
) -> torch.Tensor:
    """One epoch of training rows ``[n_rows, seq_len]``: documents shuffled and packed."""
    encoded = encoded or _Encoded(data, tok)
    docs = []
    for skill in data.train_skills:
        n = round(recipe.skill_examples_per_epoch * recipe.skill_weights.get(skill, 1.0))
        docs += [data.train_skills[skill](rng).text for _ in range(n)]
    ids = list(encoded.statements) + (tok(docs, add_special_tokens=True)["input_ids"] if docs else [])
    n_tokens = sum(len(x) for x in ids)
    want_text = int(n_tokens * recipe.text_fraction / max(1e-9, 1 - recipe.text_fraction))
    text_ids: list[list[int]] = []
    got = 0
    while got < want_text:
        piece = rng.choice(encoded.paragraphs)
        start = rng.randrange(max(1, len(piece) - recipe.seq_len))
        chunk = piece[:1] + piece[start + 1 : start + recipe.seq_len]
        text_ids.append(chunk)
        got += len(chunk)
    everything = ids + text_ids
    rng.shuffle(everything)
    flat = [t for doc in everything for t in doc]
    n_rows = len(flat) // recipe.seq_len
    return torch.tensor(flat[: n_rows * recipe.seq_len]).view(n_rows, recipe.seq_len)


def train(recipe: Recipe, progress: bool = True, device: str = "cpu"):
    """Train a model from ``recipe`` on ``device``. Returns ``(model, tokenizer, data, seconds)``,
    the model back on the CPU."""
    start = time.time()
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    data = prepare_data(recipe)
    tok = make_tokenizer(recipe, data)
    model = make_model(recipe, len(tok)).to(device)
    encoded = _Encoded(data, tok)
    rows_per_epoch = len(epoch_rows(recipe, data, tok, random.Random(recipe.seed + 99), encoded))
    total_steps = recipe.epochs * math.ceil(rows_per_epoch / recipe.batch_size)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "ln" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, recipe))
    model.train()
    bar = tqdm(total=total_steps, desc="training embedded model", unit="step", disable=not progress)
    step = 0
    for epoch in range(recipe.epochs):
        rows = epoch_rows(recipe, data, tok, rng, encoded)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(recipe.seed + epoch))
        for lo in range(0, len(rows), recipe.batch_size):
            batch = rows[order[lo : lo + recipe.batch_size]].to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=recipe.bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    model.cpu().eval().requires_grad_(False)
    return model, tok, data, time.time() - start


def _lr_factor(step: int, total: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    floor = recipe.min_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
