"""The GPU check of issue #21: the tour and the condition-number notebook on a GPT-2 XL-shaped model on cuda.

    python benchmarks/gpu_check.py --out $OUT                         # on a cuda machine (what gpu_check.sh runs)
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/x  # the script itself, on a CPU, in minutes

The model has GPT-2 XL's shape (48 layers, width 1,600, 1.56B parameters, float32) and random weights,
with the micro embedded model's tokenizer; it is saved as ``notebooks/gpt2-xl`` (linked from
``./gpt2-xl``), so ``model_name: gpt2-xl`` loads it from disk and finds GPT-2 XL's hyperparameters. The
machine is offline, so the key statistics the hyperparameters ask for (Wikipedia, 44M tokens) are seeded
under their cache key from 20,000 tokens of the bundled WikiText-2, computed on the device (the timing
of that accumulation is printed). The two notebooks then run through ``kelib.reproduce`` (the preflight
first) from a throwaway params variant: the tour (causal tracing on 2 facts, one ROME edit) and
condition_number (3 sequential edits, ROME, ROME + PRUNE and MEND, whose untrained network must be
reported before the first run; the spectra cell reads the final weights onto W_0's device).

What it exercises from issue #21: token ids on the model's device (tracing), the spectra cell's devices,
statistics accumulated on the device, the up-front MEND report, the preflight's memory plan against
``torch.cuda.mem_get_info``, and a failure message quoting the line that raised, if one fails. The
edits mean nothing on random weights; only that everything runs on cuda does. Writes under ``--out``:
the executed notebooks (``gpu/00_tour.ipynb``, ``gpu/condition_number.ipynb``) and ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

SEED_TOKENS = 20_000


def build_model_dir(device: str, small: bool) -> Path:
    """A random GPT-2 XL-shaped model with the micro tokenizer, saved as notebooks/gpt2-xl."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kelib.embedded import ensure_model
    from kelib.models import load_model

    _, tok = load_model(str(ensure_model("micro", progress=False)))
    n_layer, width = (18, 64) if small else (48, 1600)
    config = GPT2Config(n_layer=n_layer, n_embd=width, n_head=max(1, width // 64), n_positions=1024,
                        vocab_size=50257, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    target = REPO / "notebooks" / "gpt2-xl"
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    link = REPO / "gpt2-xl"  # the preflight and this script read it from the repository root
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    del model
    return target


def seed_statistics(device: str, editors: list[str]) -> dict:
    """C0 of each editor's layers from WikiText-2 on ``device``, stored under the key of the corpus its
    hyperparameters name (offline: Wikipedia cannot be streamed)."""
    from kelib.editors import load_hparams
    from kelib.models import load_model
    from kelib.stats import second_moments, stats_path, stats_spec_for

    model, tok = load_model("gpt2-xl", device=device)
    timings = {}
    for editor in editors:
        hparams = load_hparams(editor, "gpt2-xl")
        wanted = stats_spec_for(hparams)
        seed = dataclasses.replace(wanted, corpus="wikitext2", n_tokens=SEED_TOKENS)
        start = time.perf_counter()
        second_moments(model, tok, hparams.layers, seed, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings[editor] = round(time.perf_counter() - start, 2)
        for layer in hparams.layers:
            source, target = stats_path(model, layer, seed), stats_path(model, layer, wanted)
            if source != target:
                shutil.copyfile(source, target)
        print(f"C0 of {editor}'s layers {hparams.layers}: {SEED_TOKENS} WikiText-2 tokens on {device} in "
              f"{timings[editor]} s, stored as {wanted.corpus}", flush=True)
    del model
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="18 layers of width 64: the script on a CPU")
    parser.add_argument("--out", required=True, help="executed notebooks and gpu_check.json go here")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    report: dict = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)

    start = time.perf_counter()
    build_model_dir(args.device, args.small)
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    report["stats_seconds"] = seed_statistics(args.device, ["ROME"])

    from kelib.reproduce import reproduce

    variant = Path(os.environ.get("TMPDIR", "/tmp")) / "kelib-gpu-check" / "gpu"
    shutil.rmtree(variant.parent, ignore_errors=True)
    variant.mkdir(parents=True)
    common = {"model_name": "gpt2-xl", "dataset": "counterfact_edit", "device": args.device}
    (variant / "00_tour.yaml").write_text(json.dumps({**common, "editor": "ROME", "trace_facts": 2}) + "\n")
    (variant / "condition_number.yaml").write_text(json.dumps({
        **common, "dtype": "float32", "ability_tasks": [], "n_edits": 3, "checkpoints": [1],
        "runs": [{"editor": "ROME", "batch_size": 1}, {"editor": "ROME", "batch_size": 1, "regularizer": "PRUNE"},
                 {"editor": "MEND", "batch_size": 1}],
    }) + "\n")
    results = reproduce(variant, force=True, out_root=variant.parent / "figures", runs_root=out,
                        progress_bar=False)
    report["notebooks"] = {r.name: {"status": r.status, "seconds": round(r.seconds, 1), "error": r.error}
                           for r in results}
    for r in results:
        numbers = r.out_dir / "numbers.json"
        if numbers.exists():
            report["notebooks"][r.name]["numbers"] = json.loads(numbers.read_text())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "notebooks"}, default=str))
    for name, r in report["notebooks"].items():
        print(f"{name}: {r['status']} in {r['seconds']} s" + (f": {r['error']}" if r["error"] else ""))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
