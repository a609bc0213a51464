"""Evaluation throughput: examples per second of each kelib task on one model.

    python benchmarks/bench_evaluation.py                       # kelib-default, 50 docs, every group
    python benchmarks/bench_evaluation.py --model gpt2-xl --device cuda --tasks d4s --limit 100

``--model`` is anything ``kelib.models.load_model`` accepts (a local path, a hub name when online, or
an embedded name). If it cannot be loaded, the benchmark says why and falls back to a random GPT-2 of
the default model's shape built from a config, so the numbers still show lm-eval's overhead per task
(the scores of a random model mean nothing). Timings are wall-clock per task, including lm-eval's
set-up (building the requests), with kelib's result cache off.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from kelib.evaluation import evaluate_abilities, list_groups, resolve_tasks  # noqa: E402


def random_model(device: str):
    """A random GPT-2 with the embedded default's shape and a BPE tokenizer trained on task text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kelib.embedded.tokenizer import train_bpe
    from kelib.evaluation import TASKS_DIR
    from kelib.tasks import common

    texts = [
        " ".join(str(v) for v in record.values())
        for path in sorted(TASKS_DIR.glob("*/data/*.jsonl.gz"))
        for record in common.read_records(path)[:50]
    ]
    tokenizer = train_bpe(texts, vocab_size=4096)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=8, n_positions=128, vocab_size=len(tokenizer))
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = GPT2LMHeadModel(config).eval().requires_grad_(False).to(device)
    return model, tokenizer


def load(name: str, device: str, dtype: str, build: bool):
    from kelib.models import EMBEDDED_MODELS, load_model

    try:
        if name in EMBEDDED_MODELS and not build:  # loading would train it first (minutes): only if asked
            from kelib.embedded import model_dir

            if not (model_dir(name.removeprefix("kelib-")) / "report.json").exists():
                raise FileNotFoundError(f"the embedded model {name} is not built yet (pass --build to build it)")
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        return model, tokenizer, name
    except Exception as err:  # any failure: a missing build, no network, an unknown name
        print(f"NOTE: could not load model {name!r} ({type(err).__name__}: {str(err).splitlines()[0]})")
        print("NOTE: falling back to a RANDOM GPT-2 (4 layers, 256 wide, 128 positions) built from a config;")
        print("      throughput is representative of a model that size, its scores are meaningless.\n")
        model, tokenizer = random_model(device)
        return model, tokenizer, "random GPT-2 (fallback)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="kelib-default", help="local path, hub name or embedded name")
    parser.add_argument("--limit", type=int, default=50, help="docs per task (default 50)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks or groups (default: every group)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--build", action="store_true", help="build an embedded model that is not built yet")
    args = parser.parse_args(argv)
    # kelib warns once per task when prompts exceed the context; in a throughput table that is noise
    logging.getLogger("kelib.evaluation").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    tasks = resolve_tasks(args.tasks or list(list_groups()))
    model, tokenizer, label = load(args.model, args.device, args.dtype, args.build)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {label} ({n_params / 1e6:.1f}M parameters, {next(model.parameters()).dtype}) on {args.device}, "
          f"{torch.get_num_threads()} CPU threads, batch size {args.batch_size}, limit {args.limit}\n")

    header = f"{'task':<20} {'docs':>5} {'seconds':>8} {'docs/s':>8}  main metric"
    print(header)
    print("-" * len(header))
    total_docs, total_seconds = 0, 0.0
    for name in tasks:
        start = time.perf_counter()
        frame = evaluate_abilities(
            model, tokenizer, [name], limit=args.limit, batch_size=args.batch_size, cache=False, progress=False
        )
        seconds = time.perf_counter() - start
        docs = int(frame.n.max())
        first = frame.iloc[0]
        total_docs += docs
        total_seconds += seconds
        print(f"{name:<20} {docs:>5} {seconds:>8.2f} {docs / seconds:>8.1f}  {first.metric} = {first.value:.3f}")
    print("-" * len(header))
    print(f"{'all':<20} {total_docs:>5} {total_seconds:>8.2f} {total_docs / total_seconds:>8.1f}")


if __name__ == "__main__":
    main()
