"""Where SmolLM2-135M stores CounterFact facts: the causal traces that chose its ROME/MEMIT layers.

    python benchmarks/trace_smollm2.py                 # 30 known facts, 4 noise samples (about 15 min, one core)
    python benchmarks/trace_smollm2.py --facts 5 --out trace.csv

On the facts the model answers top-1 (kelib.known), the subject's token embeddings get Gaussian noise
(3 x the embeddings' std, as ROME) and then:

- ``block``: one residual-stream state (after a block) at the subject's last token or at the prompt's
  last token is restored to its clean value (``kelib.tracing`` restores every position; these two are
  the ones ROME's figures contrast, at a fifteenth of the cost);
- ``mlp_window``: the MLP outputs of 10 consecutive layers around layer l (ROME's window, l - 5 .. l + 4,
  cut at the ends) at the subject's last token are restored together; ROME chose its edited layer where
  this effect peaks (layer 17 of GPT-2 XL).

Printed and written (``--out``): the mean effect (restored P(answer) - corrupted P(answer)) per layer,
its peak, and the clean and corrupted probabilities. ``params/hparams/ROME/smollm2-135m.yaml`` records
the numbers of the run that chose the layers.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from kelib.known import TUNE_FACTS, tune_cases  # noqa: E402
from kelib.models import architecture, get_module, load_model, module_name, n_layers, patch_output  # noqa: E402
from kelib.tokens import with_target  # noqa: E402
from kelib.tracing import _subject_range  # noqa: E402

WINDOW = 10


@torch.no_grad()
def trace(model, tok, case, samples: int, seed: int) -> list[dict]:
    full, start = with_target(tok, case.prompt, case.target_true)
    ids = torch.tensor(full[:start])[None]
    answer = full[start]
    first, last = _subject_range(tok, case.prompt, case.subject)
    final = ids.shape[1] - 1
    layers = n_layers(model)
    embed = get_module(model, architecture(model).embed)
    scale = 3 * float(embed.weight.float().std())

    def prob(logits):
        return torch.softmax(logits[:, -1].float(), -1)[:, answer].mean().item()

    clean_states: dict[str, torch.Tensor] = {}
    names = {(kind, layer): module_name(model, layer, part) for layer in range(layers)
             for kind, part in (("block", "block"), ("mlp", "mlp"))}

    def keep(name):
        def fn(h):
            clean_states[name] = h.detach().clone()
            return h
        return fn

    with contextlib.ExitStack() as stack:
        for name in names.values():
            stack.enter_context(patch_output(model, name, keep(name)))
        clean = prob(model(input_ids=ids).logits)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, last - first + 1, embed.weight.shape[1], generator=gen) * scale
    batch = ids.repeat(samples, 1)

    def corrupt(h):
        h = h.clone()
        h[:, first : last + 1] += noise.to(h.dtype)
        return h

    def restore(name, pos):
        def fn(h):
            h = h.clone()
            h[:, pos] = clean_states[name][:, pos]
            return h
        return fn

    rows = []
    with patch_output(model, architecture(model).embed, corrupt):
        corrupted = prob(model(input_ids=batch).logits)
        for layer in range(layers):
            for bucket, pos in (("subject last", last), ("prompt last", final)):
                with patch_output(model, names[("block", layer)], restore(names[("block", layer)], pos)):
                    p = prob(model(input_ids=batch).logits)
                rows.append({"kind": "block", "bucket": bucket, "layer": layer, "restored": p})
            window = range(max(0, layer - WINDOW // 2), min(layers, layer + WINDOW - WINDOW // 2))
            with contextlib.ExitStack() as stack:
                for l in window:
                    name = names[("mlp", l)]
                    stack.enter_context(patch_output(model, name, restore(name, last)))
                p = prob(model(input_ids=batch).logits)
            rows.append({"kind": "mlp_window", "bucket": "subject last", "layer": layer, "restored": p})
    for row in rows:
        row.update(case=case.case_id, clean=clean, corrupted=corrupted, effect=row["restored"] - corrupted)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=30)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default="trace_smollm2.csv")
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m")
    if args.facts > TUNE_FACTS:
        parser.error(f"--facts: at most {TUNE_FACTS}, the known facts of the tune split (the rest are edited)")
    # the tune split only: the layers chosen here must not have seen a fact the notebooks edit
    cases = tune_cases(model, tok)[: args.facts]
    rows = []
    for i, case in enumerate(cases):
        started = time.time()
        rows += trace(model, tok, case, args.samples, seed=i)
        pd.DataFrame(rows).to_csv(args.out, index=False)
        print(f"{i + 1}/{len(cases)} {case.case_id} {time.time() - started:.0f} s", flush=True)
    summarise(pd.DataFrame(rows))


def summarise(frame: pd.DataFrame) -> None:
    n = frame.case.nunique()
    per_fact = frame.drop_duplicates("case")
    print(f"{n} known facts; clean P(answer) {per_fact.clean.mean():.3f}, corrupted {per_fact.corrupted.mean():.3f}")
    table = frame.groupby(["kind", "bucket", "layer"]).effect.mean().unstack("layer")
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.round(3).to_string())
    for (kind, bucket), row in table.iterrows():
        print(f"{kind} at {bucket}: peak {row.max():.3f} at layer {int(row.idxmax())}")


if __name__ == "__main__":
    main()
