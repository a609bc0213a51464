"""The scoring and regularizer speed-ups of the embedded batch, each against the computation it replaced,
measured in one run on the default model:

    python benchmarks/bench_scoring.py              # 1 thread (what each local-executor worker gets)
    python benchmarks/bench_scoring.py --threads 2

- skill choices: :func:`kelib.embedded.report.choice_correct` (choices read from shared prompt rows)
  against every prompt + choice as a padded row of its own (the code before), on every held-out
  skill example;
- RECT's mask: selection (``kthvalue``) against the stable sort of every relative change, on the
  default model's edited-matrix shape;
- GRACE's lookup: one matrix product with the nearest entries recomputed exactly, against exact
  differences to every entry, for a 1,000-entry codebook and one evaluation batch of tokens;
- held-out perplexity: windows batched by length, 8 to a batch, against batches of 32 in text order
  (every checkpoint of every run scores the 196 held-out paragraphs);
- a checkpoint's abilities (unedited recall, skills, perplexity) after an edit of layer 3 (ROME's,
  GRACE's) and of layer 1 (the lowest of MEMIT's), with the passes starting at the edited block
  (:class:`kelib.unchanged_blocks.UnchangedBlocks`, states recorded on the unedited model first)
  against whole passes;
- key statistics: the corpus pass stopped after the last layer read, against the full forward with
  the unembedding (once per model and corpus, at the start of a batch);
- KN's attribution (integrated gradients over the four layers' neurons, the default hyperparameters)
  for a few tune-split cases: the scaled rows run from the attributed layer's block up, against whole
  passes of every row (the code before).

Each pair's results are checked equal before they are timed (best of ``--repeat``); KN's attributions
to float rounding (the rows are batched differently) and its selected neurons exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editing_speed import machine  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def choices_padded_rows(model, tok, examples, batch_size: int = 64) -> list[bool]:
    """The computation choice_correct replaced: every prompt + choice as a padded row of its own,
    batched, log-softmax over every position."""
    from kelib.tokens import pad_batch

    flat = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
    scores = torch.empty(len(flat))
    for lo in range(0, len(flat), batch_size):
        chunk = flat[lo : lo + batch_size]
        seqs, spans = [], []
        for i, c in chunk:
            prompt_ids = tok(examples[i].prompt)["input_ids"]
            choice_ids = tok(" " + examples[i].choices[c], add_special_tokens=False)["input_ids"]
            seqs.append(prompt_ids + choice_ids)
            spans.append((len(prompt_ids), len(prompt_ids) + len(choice_ids)))
        ids, mask = pad_batch(seqs, tok.pad_token_id)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (start, end) in enumerate(spans):
            scores[lo + row] = logprobs[row, start - 1 : end - 1].gather(-1, ids[row, start:end][:, None]).sum()
    correct, k = [], 0
    for ex in examples:
        correct.append(int(scores[k : k + len(ex.choices)].argmax()) == ex.label)
        k += len(ex.choices)
    return correct


def rect_by_sort(delta, weight, k):
    import math

    from kelib.diagnostics import relative_change

    rel = relative_change(delta, weight).flatten()
    order = torch.argsort(rel, descending=True, stable=True)[: math.ceil(k * rel.numel())]
    mask = torch.zeros(rel.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(delta)


def grace_exact(codebook, queries):
    dists = torch.cdist(queries, codebook["keys"], compute_mode="donot_use_mm_for_euclid_dist")
    nearest_dist, nearest = dists.min(1)
    inside = nearest_dist <= codebook["epsilons"][nearest]
    return torch.where(inside, nearest, -1), inside


@torch.no_grad()
def nll_in_text_order(model, tok, texts, seq_len: int = 128, batch_size: int = 32):
    """The computation paragraph_nll replaced: windows batched in text order, full log-softmax."""
    from kelib.tokens import pad_batch

    windows, owner = [], []
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        for lo in range(0, max(len(ids) - 1, 0), seq_len):
            if len(ids[lo : lo + seq_len]) >= 2:
                windows.append(ids[lo : lo + seq_len])
                owner.append(i)
    total, count = [0.0] * len(texts), [0] * len(texts)
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo : lo + batch_size]
        ids, mask = pad_batch(chunk, tok.pad_token_id)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        nll = -logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        for row, window in enumerate(chunk):
            total[owner[lo + row]] += float(nll[row].sum())
            count[owner[lo + row]] += len(window) - 1
    keep = [i for i in range(len(texts)) if count[i]]
    return [total[i] / count[i] for i in keep], [count[i] for i in keep]


def abilities_passes(model, tok, facts, skills, texts, memory=None) -> tuple:
    """What the embedded abilities evaluator computes at a checkpoint (its scores, uncached)."""
    from kelib.embedded.report import choice_correct, paragraph_nll
    from kelib.metrics import score_targets

    forward = memory.for_model(model) if memory is not None else None
    recall = [s.exact for s in score_targets(model, tok, [f.prompt() for f in facts], [f.obj for f in facts],
                                             forward=forward)]
    return recall, [choice_correct(model, tok, items, forward=forward) for items in skills.values()], \
        paragraph_nll(model, tok, texts, forward=forward)


def stats_pass(model, tok, layers, spec, full_forward: bool):
    """One pass of the key statistics' corpus, returning K Kᵀ per layer (no cache)."""
    from kelib.models import capture, forward_through
    from kelib.stats import _windows

    sums = {layer: 0 for layer in layers}
    for ids, mask in _windows(tok, spec, model):
        with torch.no_grad(), capture(model, layers) as rec:
            if full_forward:
                model(input_ids=ids, attention_mask=mask)
            else:
                forward_through(model, ids, mask, max(layers))
        for layer in layers:
            keys = rec[layer]["key"][mask.bool()]
            sums[layer] = sums[layer] + keys.T @ keys
    return sums


def attributions_whole_passes(model, tok, prompts, target, layers, steps, batch_size):
    """The computation KN's attribution replaced: every scaled row through the whole model, with the
    unembedding at every position (kelib.editors.kn before the rows started at the attributed block)."""
    from kelib.models import device_of, edited_module, keys_and_values
    from kelib.tokens import encode, pad_batch, with_target

    encoded = [encode(tok, p) for p in prompts]
    target_ids = [full[start] for full, start in (with_target(tok, p, target) for p in prompts)]
    last = [len(e) - 1 for e in encoded]
    ids, mask = pad_batch(encoded, tok.pad_token_id, device_of(model))
    found = keys_and_values(model, ids, mask, last, layers)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    rows = torch.arange(len(prompts)).repeat_interleave(steps)
    result = {}
    for layer in layers:
        w_bar = found[layer][0]
        scaled = (w_bar[:, None, :] * alphas[None, :, None]).flatten(0, 1)
        grads = []
        for chunk in torch.arange(len(rows)).split(batch_size):
            picked = rows[chunk]
            neurons = scaled[chunk].detach().clone().requires_grad_(True)
            at = (torch.arange(len(chunk)), torch.tensor([last[r] for r in picked.tolist()]))

            def replace(_module, args, neurons=neurons, at=at):
                return (args[0].index_put(at, neurons), *args[1:])

            handle = edited_module(model, layer).register_forward_pre_hook(replace)
            try:
                with torch.enable_grad():
                    logits = model(input_ids=ids[picked], attention_mask=mask[picked]).logits[at].float()
                    probs = torch.softmax(logits, -1)[torch.arange(len(chunk)), [target_ids[r] for r in picked.tolist()]]
                    grads.append(torch.autograd.grad(probs.sum(), neurons)[0])
            finally:
                handle.remove()
        result[layer] = w_bar * torch.cat(grads).view(len(prompts), steps, -1).mean(1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kelib.editors.grace import lookup
    from kelib.embedded.report import choice_correct, heldout_skills
    from kelib.models import get_weight, load_model
    from kelib.regularizers.rect import rect_mask

    model, tok = load_model("kelib-default")
    print(f"kelib-default on cpu: {machine('cpu')}; {args.threads} thread(s), best of {args.repeat}")
    rows = []

    examples = [ex for skill in heldout_skills("default").values() for ex in skill]
    assert choice_correct(model, tok, examples) == choices_padded_rows(model, tok, examples)
    rows.append((f"skill choices ({len(examples)} examples)", best(lambda: choices_padded_rows(model, tok, examples), args.repeat),
                 best(lambda: choice_correct(model, tok, examples), args.repeat)))

    generator = torch.Generator().manual_seed(0)
    weight = get_weight(model, 1).float()
    delta = 1e-3 * torch.randn(weight.shape, generator=generator)
    assert torch.equal(rect_mask(delta, weight, 0.2), rect_by_sort(delta, weight, 0.2))
    rows.append((f"RECT mask ({tuple(weight.shape)}, k 0.2)", best(lambda: rect_by_sort(delta, weight, 0.2), args.repeat),
                 best(lambda: rect_mask(delta, weight, 0.2), args.repeat)))

    d_in = weight.shape[1]
    keys = 10 * torch.randn(1000, d_in, generator=generator)
    codebook = {"keys": keys, "values": torch.zeros(1000, weight.shape[0]), "labels": ["x"] * 1000,
                "epsilons": torch.full((1000,), float(d_in) ** 0.5 * 12)}
    queries = keys[torch.randint(1000, (64 * 16,), generator=generator)] + 3 * torch.randn(64 * 16, d_in, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(lookup(codebook, queries), grace_exact(codebook, queries)))
    rows.append(("GRACE lookup (1,000 entries, 1,024 tokens)", best(lambda: grace_exact(codebook, queries), args.repeat),
                 best(lambda: lookup(codebook, queries), args.repeat)))

    from kelib.embedded.report import heldout_texts, paragraph_nll

    texts = heldout_texts("default")
    sorted_nll, text_order_nll = paragraph_nll(model, tok, texts), nll_in_text_order(model, tok, texts)
    assert sorted_nll[1] == text_order_nll[1]
    assert max(abs(a - b) for a, b in zip(sorted_nll[0], text_order_nll[0])) < 1e-4
    rows.append((f"held-out NLL ({len(texts)} paragraphs)", best(lambda: nll_in_text_order(model, tok, texts), args.repeat),
                 best(lambda: paragraph_nll(model, tok, texts), args.repeat)))

    from kelib.embedded.store import built_dir, world_of
    from kelib.unchanged_blocks import UnchangedBlocks

    facts, skills = world_of(built_dir("default")).facts_in("unedited")[:300], heldout_skills("default")
    for layer, whose in ((3, "ROME's"), (1, "MEMIT's lowest")):
        memory = UnchangedBlocks()
        abilities_passes(model, tok, facts, skills, texts, memory)  # recorded on the unedited model
        w = get_weight(model, layer)
        original = w.clone()
        with torch.no_grad():
            w.add_(1e-2 * torch.randn(w.shape, generator=generator))
        try:
            assert abilities_passes(model, tok, facts, skills, texts, memory) == \
                abilities_passes(model, tok, facts, skills, texts)
            rows.append((f"abilities, layer {layer} ({whose}) edited",
                         best(lambda: abilities_passes(model, tok, facts, skills, texts), args.repeat),
                         best(lambda: abilities_passes(model, tok, facts, skills, texts, memory), args.repeat)))
        finally:
            with torch.no_grad():
                w.copy_(original)

    from kelib.stats import StatsSpec

    spec, layers = StatsSpec(n_tokens=None, n_texts=200), [1, 2]
    stopped, full = stats_pass(model, tok, layers, spec, False), stats_pass(model, tok, layers, spec, True)
    assert all(torch.equal(stopped[layer], full[layer]) for layer in layers)
    rows.append((f"key statistics pass (200 texts, layers {layers})",
                 best(lambda: stats_pass(model, tok, layers, spec, True), args.repeat),
                 best(lambda: stats_pass(model, tok, layers, spec, False), args.repeat)))

    from kelib.editors import load_hparams
    from kelib.editors.kn import attribution_prompts, neuron_attributions, refine

    kn = load_hparams("KN", "kelib-default")
    kn_cases = list(world_of(built_dir("default")).cases["tune"])[:4]
    asked = [(attribution_prompts(model, tok, case, kn), case.target_true) for case in kn_cases]

    def attribute(how):
        return [how(model, tok, prompts, target, kn.layers, kn.steps, kn.batch_size) for prompts, target in asked]

    for now, before in zip(attribute(neuron_attributions), attribute(attributions_whole_passes)):
        assert all(torch.allclose(now[layer], before[layer], rtol=1e-4, atol=1e-7) for layer in kn.layers)
        chosen = [refine(found, kn.adaptive_threshold, kn.p, kn.max_neurons) for found in (now, before)]
        assert all(torch.equal(chosen[0][layer], chosen[1][layer]) for layer in kn.layers)
    rows.append((f"KN attribution ({len(kn_cases)} cases, layers {kn.layers})",
                 best(lambda: attribute(attributions_whole_passes), args.repeat),
                 best(lambda: attribute(neuron_attributions), args.repeat)))

    print(f"{'':46s} {'before s':>10s} {'now s':>10s} {'ratio':>7s}")
    for what, before, now in rows:
        print(f"{what:46s} {before:10.4f} {now:10.4f} {before / now:6.1f}x")


if __name__ == "__main__":
    main()
