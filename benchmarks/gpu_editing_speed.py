"""Editing speed on one GPU (issue #14): a GPT-2 XL-shaped model built from its config.

    python benchmarks/gpu_editing_speed.py                  # ROME per edit (new and old path); 1,000 sequential MEMIT edits
    python benchmarks/gpu_editing_speed.py --quick          # a smoke run: 2 ROME edits, 20 MEMIT edits
    python benchmarks/gpu_editing_speed.py --device cpu --quick --layers 18 --width 64   # the script itself, on a CPU
    python benchmarks/gpu_editing_speed.py --out result.json

The model has GPT-2 XL's shape (48 layers, width 1,600, 25 heads, vocabulary 50,257; 1.56B parameters,
float32) and random weights: the edits mean nothing, only the time does. ROME and MEMIT run with
GPT-2 XL's published hyperparameters (ROME at layer 17, MEMIT over layers 13-17), C0 from 100,000
tokens of the bundled WikiText-2. Prompts and cases are the micro embedded model's (its tokenizer's ids
are a subset of the vocabulary); the micro model is built on first use (about a minute) unless
``KELIB_CACHE`` points at a folder that holds it.

Printed: the machine, ROME seconds per edit (the editor call alone and through the runner with the
edit's metrics) on the new path and on the path before issue #14, and 1,000 sequential single MEMIT
edits with checkpoints at 100 / 500 / 1,000 (weight diagnostics and edit metrics at each), wall time
and its shares. Anchors: about 2 s per ROME edit on an A6000 (ROME paper, App. E.5); the issue's goal
for the MEMIT run is 15 minutes on one H100 / H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import editing_speed  # noqa: E402

OVERRIDES = {"mom2_dataset": "wikitext2", "mom2_n_tokens": 100_000}


def gpt2_xl_shaped(tok, device: str, n_layer: int = 48, width: int = 1600):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=width, n_head=width // 64, n_positions=1024, vocab_size=50257,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 ROME edits, 20 MEMIT edits, C0 from "
                        "20,000 tokens")
    parser.add_argument("--memit-edits", type=int, default=1000)
    parser.add_argument("--rome-edits", type=int, default=5)
    parser.add_argument("--no-old", action="store_true", help="skip the old path's ROME timing")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--layers", type=int, default=48, help="a smaller shape checks the script on a CPU (>= 18)")
    parser.add_argument("--width", type=int, default=1600)
    args = parser.parse_args()
    n_rome, n_memit = (2, 20) if args.quick else (args.rome_edits, args.memit_edits)
    overrides = {**OVERRIDES, "mom2_n_tokens": 20_000} if args.quick else OVERRIDES

    from kelib.embedded import ensure_model, world_cases
    from kelib.models import load_model

    start = time.perf_counter()
    _, tok = load_model(str(ensure_model("micro", progress=False)))
    cases = world_cases("micro")
    cases = (cases * (n_memit // len(cases) + 1))[: max(n_memit, n_rome * 2 + 10)]  # edits may repeat a case
    model = gpt2_xl_shaped(tok, args.device, args.layers, args.width)
    print(f"GPT-2 XL-shaped random model ({args.layers} layers, width {args.width}), {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"on {args.device}: {editing_speed.machine(args.device)} (set up in {time.perf_counter() - start:.0f} s)",
          flush=True)
    figures = {"machine": editing_speed.machine(args.device)}

    start = time.perf_counter()
    editing_speed._prepared(model, tok, "gpt2-xl", "ROME", overrides)
    editing_speed._prepared(model, tok, "gpt2-xl", "MEMIT", overrides)
    print(f"C0 for ROME's and MEMIT's layers: {time.perf_counter() - start:.0f} s", flush=True)

    if args.no_old:
        figures["rome_per_edit"] = editing_speed.per_edit(model, tok, cases, "gpt2-xl", ["ROME"], sizes=(1,),
                                                          n_single=n_rome, device=args.device, overrides=overrides)
    else:
        figures["rome_new_vs_old"] = editing_speed.new_vs_old(model, tok, cases, "gpt2-xl", ["ROME"], sizes=(1,),
                                                              n_single=n_rome, repeats=1, device=args.device,
                                                              overrides=overrides)
    checkpoints = [c for c in (100, 500, 1000) if c < n_memit] + [n_memit]
    figures["memit_sequential"] = editing_speed.long_runs(model, tok, cases, "gpt2-xl", n=n_memit,
                                                          checkpoints=checkpoints, runs=(("MEMIT", None),),
                                                          device=args.device, overrides=overrides)
    if args.out:
        Path(args.out).write_text(json.dumps(_plain(figures), indent=1))


def _plain(value):
    """JSON-ready: the figures' dicts are keyed by tuples such as ``(editor, size)``."""
    if isinstance(value, dict):
        return {" ".join(map(str, k)) if isinstance(k, tuple) else str(k): _plain(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    main()
