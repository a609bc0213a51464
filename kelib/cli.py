"""Command line: ``kelib reproduce``, ``kelib check``, ``kelib list``, ``kelib check-notebooks``,
``kelib build-model``, ``kelib train-mend``, ``kelib stats``, ``kelib collect``.

Also ``python -m kelib ...``. Exit status: 0 on success, 1 when a notebook failed (or a check found
problems), 2 when the batch could not start (bad params file, unknown notebook name).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kelib", description="kelib: batch reproduction of the knowledge-editing notebooks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser(
        "reproduce",
        help="run every notebook of a params variant through papermill",
        description="Run every notebook with a YAML in the params folder; executed notebooks go to "
        "runs/<variant>/, figures, tables and numbers to figures/<variant>/<notebook>/. Notebooks whose "
        "inputs are unchanged are skipped.",
    )
    rep.add_argument("--params", default="params/default", metavar="DIR",
                     help="params variant folder (default: params/default; e.g. params/smoke)")
    rep.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks")
    rep.add_argument("--force", action="store_true", help="run even when the inputs are unchanged")
    rep.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="per-cell timeout (default: none)")
    rep.add_argument("--notebooks", metavar="DIR", help="notebook sources (default: notebooks/)")
    rep.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    rep.add_argument("--device-map", metavar="MAP",
                     help="every notebook's device_map (e.g. auto: spread the model over the GPUs)")
    rep.add_argument("--stats-corpus", metavar="CORPUS",
                     help="every notebook's statistics corpus: wikitext2 (bundled, offline), wikipedia, "
                          "or a folder of .txt files")
    rep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter of every notebook that has it, over the params files "
                          "(VALUE read as YAML; repeatable), e.g. --set hparams=gpt2-xl")
    rep.add_argument("--no-preflight", action="store_true",
                     help="skip the preflight (kelib check) that runs before the first notebook")
    rep.add_argument("--notebooks-at-once", type=int, default=1, metavar="N",
                     help="notebooks executed side by side, each in its own process (default 1; make reproduce "
                          "uses 2 on the embedded default: one notebook's last run or plots no longer leave "
                          "a core idle)")
    _executor_arguments(rep, "every notebook's executor")

    pre = sub.add_parser(
        "check",
        help="preflight: hyperparameters, layers, MEND, statistics and a memory plan, from the config only",
        description="Check, in seconds and without loading weights, that every editor the variant's notebooks "
        "run has hyperparameters naming layers the model has, that MEND is trained where it is needed and "
        "the key-statistics corpus is cached or reachable; print the memory plan against the device's memory. "
        "Exit status 1 when a check fails or the plan does not fit.",
    )
    pre.add_argument("model", nargs="?", help="hub id, local path or embedded model (default: each notebook's "
                     "model_name)")
    pre.add_argument("--params", default="params/default", metavar="DIR",
                     help="params variant folder (default: params/default)")
    pre.add_argument("--device", help="device to plan for (default: the notebooks' device parameter)")
    pre.add_argument("--dtype", help="model dtype to plan for: float32, bfloat16, float16 (default: the notebooks')")
    pre.add_argument("--only", nargs="+", metavar="NAME", help="check only these notebooks")
    pre.add_argument("--notebooks", metavar="DIR", help="notebook sources (default: notebooks/)")

    lst = sub.add_parser("list", help="notebooks with their parameters, and the params variants")
    lst.add_argument("--notebooks", metavar="DIR", help="notebook sources (default: notebooks/)")
    lst.add_argument("--params-root", metavar="DIR", help="params folder (default: params/)")

    chk = sub.add_parser(
        "check-notebooks",
        help="every .py notebook has an identical, output-free .ipynb (what the tests check)",
    )
    chk.add_argument("--notebooks", metavar="DIR", help="notebook sources (default: notebooks/)")

    build = sub.add_parser("build-model", help="build (or find cached) an embedded model")
    build.add_argument("name", nargs="?", default="default",
                       help="a recipe in params/embedded.yaml (default: default)")
    build.add_argument("--device", default="cpu", help="train on this device, e.g. cuda (default: cpu)")

    mend = sub.add_parser(
        "train-mend",
        help="train (or find cached) MEND's hypernetwork for a model",
        description="Train MEND's hypernetwork with the model's params/hparams/MEND file and cache it "
        "where the MEND editor looks; prints the file. Real models need this once before editing; "
        "embedded models train on first use.",
    )
    mend.add_argument("model", help="hub id, local path or embedded model (kelib-default, kelib-micro)")
    mend.add_argument("--device", default="cpu", help="train on this device, e.g. cuda (default: cpu)")
    mend.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    mend.add_argument("--device-map", metavar="MAP", help="from_pretrained's device_map, e.g. auto")
    mend.add_argument("--hparams", metavar="SET",
                      help="hyperparameter set for a model given by a path (params/hparams/MEND/SET.yaml)")
    mend.add_argument("--data", metavar="NAME",
                      help="training edits instead of the hparams file's training_data, e.g. zsre_train, "
                           "counterfact_train; editing then needs the same override")
    mend.add_argument("--force", action="store_true", help="train again even when a cached one exists")

    stats = sub.add_parser(
        "stats",
        help="compute (or find) the key statistics C0 of a model's edited layers, once, for every run",
        description="Compute the key second moments C = E[k kᵀ] an editor uses on a model, in the cache and "
        "under the lock every run uses (one pass over the corpus serves all layers); prints each layer's "
        "file. On a cluster: --executor slurm computes them in one job, before the grid's jobs need them.",
    )
    stats.add_argument("model", help="hub id, local path or embedded model (kelib-default, kelib-micro)")
    stats.add_argument("--layers", nargs="+", type=int, metavar="L",
                       help="layers (default: the editor's layers for this model)")
    stats.add_argument("--editor", default="MEMIT",
                       help="whose hyperparameters name the corpus and sample size (default: MEMIT)")
    stats.add_argument("--hparams", metavar="SET", help="hyperparameter set for a model given by a path")
    stats.add_argument("--stats-corpus", metavar="CORPUS", help="corpus instead of the hparams' (as in reproduce)")
    stats.add_argument("--device", default="cpu", help="compute on this device, e.g. cuda (default: cpu)")
    stats.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    stats.add_argument("--device-map", metavar="MAP", help="from_pretrained's device_map, e.g. auto")
    _executor_arguments(stats, "where to compute: here (inline, the default) or in a Slurm job")

    collect = sub.add_parser(
        "collect",
        help="the state of the Slurm jobs a grid submitted (executor slurm); --wait until they end",
        description="List the jobs recorded under <cache>/jobs/<log folder>/submitted/ with their state and "
        "log. With --wait, wait for them (a progress bar), then show failures with their logs' last lines. "
        "Then run the notebook (or kelib reproduce ... --force) again: it reads the finished runs from the cache.",
    )
    collect.add_argument("--log-folder", default="slurm", metavar="NAME",
                         help="the executor's log_folder (default: slurm)")
    collect.add_argument("--wait", action="store_true", help="wait until no job is queued or running")
    collect.add_argument("--poll", type=float, default=30.0, metavar="SECONDS",
                         help="seconds between checks while waiting (default: 30)")
    return parser


def _executor_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--executor", choices=["inline", "local", "slurm"], help=what)
    parser.add_argument("--executor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the slurm executor (kelib.cluster.SlurmOptions; VALUE read as YAML; "
                             "repeatable), e.g. --executor-option partition=gpu --executor-option time_min=600")


def _executor_value(args) -> str | dict | None:
    """The ``executor`` parameter the command line asks for (None: the params files' own)."""
    import yaml

    if not args.executor and not args.executor_option:
        return None
    options = {}
    for item in args.executor_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--executor-option needs KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value) if value else ""
    if options and args.executor != "slurm":
        raise ValueError("--executor-option is for --executor slurm")
    return {"name": "slurm", **options} if options else args.executor


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "list":
        return _list(args)
    if args.command == "check":
        return _preflight(args)
    if args.command == "check-notebooks":
        return _check(args)
    if args.command == "build-model":
        from kelib.embedded import ensure_model

        print(ensure_model(args.name, device=args.device))
        return 0
    if args.command == "train-mend":
        return _train_mend(args)
    if args.command == "stats":
        return _stats(args)
    if args.command == "collect":
        return _collect(args)
    raise AssertionError(args.command)


def _stats(args) -> int:
    from kelib.config import ConfigError
    from kelib.data import DataError
    from kelib.editors import EditError
    from kelib.experiments import key_statistics
    from kelib.models import ModelError

    call = dict(model_name=args.model, layers=args.layers, editor=args.editor, hparams=args.hparams,
                stats_corpus=args.stats_corpus, device=args.device, dtype=args.dtype, device_map=args.device_map)
    try:
        executor = _executor_value(args)
        if isinstance(executor, dict) or executor == "slurm":
            from kelib.cluster import parse_options, run_jobs
            from kelib.io import stable_hash

            options = parse_options({k: v for k, v in executor.items() if k != "name"}
                                    if isinstance(executor, dict) else {})
            key = f"stats-{args.model.replace('/', '_')}-{stable_hash(call)}"
            outcome = run_jobs(_stats_in_job, [(call,)], [key], [f"key statistics of {args.model}"], options)[key]
            if isinstance(outcome, str):  # pending: wait: false
                print(outcome)
                return 0
            files = outcome
        else:
            files = key_statistics(**call)
    except (ConfigError, DataError, EditError, ModelError, ValueError) as err:
        print(f"kelib stats: {err}", file=sys.stderr)
        return 2
    for layer, path in files.items():
        print(f"layer {layer}: {path}")
    return 0


def _stats_in_job(call: dict) -> dict[int, str]:
    """``kelib stats`` in a cluster job: the statistics, computed where the job runs, into the shared cache."""
    from kelib.experiments import key_statistics

    return key_statistics(**call, progress=False)


def _collect(args) -> int:
    import time

    from tqdm.auto import tqdm

    from kelib.cluster import recorded_jobs

    jobs = recorded_jobs(args.log_folder)
    if not jobs:
        print(f"no job recorded under the cache's jobs/{args.log_folder}/submitted/")
        return 0
    if args.wait:
        bar = tqdm(total=len(jobs), desc="jobs", unit="job")
        while True:
            ended = sum(not job["active"] for job in jobs)
            bar.n = ended
            bar.refresh()
            if ended == len(jobs):
                break
            time.sleep(args.poll)
            jobs = recorded_jobs(args.log_folder)
        bar.close()
    failed = 0
    for job in jobs:
        print(f"{job['setting']}: job {job['job_id']} ({job['cluster']}, submitted {job['submitted']}): "
              f"{job['state']}  log: {job['log']}")
        failed += not job["active"] and not job["state"].startswith(("done", "not run"))
    active = sum(job["active"] for job in jobs)
    print(f"{len(jobs)} job(s): {len(jobs) - active - failed} done, {active} queued or running, {failed} not done "
          "(see their logs). Run the notebook (or kelib reproduce ... --force) again to read the finished runs.")
    return 1 if failed else 0


def _train_mend(args) -> int:
    from kelib.config import ConfigError
    from kelib.data import DataError
    from kelib.editors import EditError, load_hparams
    from kelib.editors.mend import mend_path
    from kelib.editors.mend_train import train_and_save
    from kelib.models import ModelError, load_model

    try:
        hparams = load_hparams("MEND", args.model, {"training_data": args.data} if args.data else None,
                               hparams_set=args.hparams)
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
        path = mend_path(model, hparams)
        if args.force or not path.exists():
            path = train_and_save(model, tok, hparams)
    except (ConfigError, DataError, EditError, ModelError) as err:
        print(f"kelib train-mend: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _preflight(args) -> int:
    from kelib.preflight import check_variant
    from kelib.reproduce import ReproduceError

    try:
        report = check_variant(args.params, args.model, device=args.device, dtype=args.dtype, only=args.only,
                               notebooks_dir=args.notebooks)
    except ReproduceError as err:
        print(f"kelib check: {err}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def _reproduce(args) -> int:
    import yaml

    from kelib.reproduce import ReproduceError, reproduce

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"kelib reproduce: --set needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.safe_load(value) if value else ""
    if args.notebooks_at_once < 1:
        print(f"kelib reproduce: --notebooks-at-once must be at least 1, got {args.notebooks_at_once}", file=sys.stderr)
        return 2
    if args.device_map is not None:
        overrides["device_map"] = args.device_map
    if args.stats_corpus is not None:
        overrides["stats_corpus"] = args.stats_corpus
    try:
        executor = _executor_value(args)
    except ValueError as err:
        print(f"kelib reproduce: {err}", file=sys.stderr)
        return 2
    if executor is not None:
        overrides["executor"] = executor
    try:
        results = reproduce(
            args.params,
            only=args.only,
            overrides=overrides,
            force=args.force,
            timeout_per_cell=args.timeout,
            notebooks_dir=args.notebooks,
            progress_bar=False if args.no_progress else None,
            preflight=not args.no_preflight,
            notebooks_at_once=args.notebooks_at_once,
        )
    except ReproduceError as err:
        print(f"kelib reproduce: {err}", file=sys.stderr)
        return 2
    return 0 if all(r.ok for r in results) else 1


def _list(args) -> int:
    from kelib import reproduce as rp

    notebooks_dir = Path(args.notebooks) if args.notebooks else rp.NOTEBOOKS_DIR
    params_root = Path(args.params_root) if args.params_root else rp.PARAMS_DIR
    variants = rp.list_variants(params_root)
    names = rp.list_notebooks(notebooks_dir)
    print(f"notebooks ({notebooks_dir}):")
    if not names:
        print("  (none)")
    for name in names:
        path = rp.notebook_path(name, notebooks_dir)
        runs_in = [v for v in variants if (params_root / v / f"{name}.yaml").exists()]
        print(f"  {name}  [{path.name}; params in: {', '.join(runs_in) or 'none'}]")
        try:
            params = rp.notebook_parameters(path)
        except Exception as err:  # noqa: BLE001 (list the rest)
            print(f"    cannot inspect: {type(err).__name__}: {err}")
            continue
        if not params:
            print("    (no parameters cell)")
        for p in params.values():
            kind = p["inferred_type_name"] if p["inferred_type_name"] not in (None, "None") else "?"
            line = f"    {p['name']}: {kind} = {p['default']}"
            print(f"{line:<48}  {p['help']}" if p.get("help") else line)
    print(f"variants ({params_root}):")
    if not variants:
        print("  (none)")
    for v in variants:
        have = rp.sort_names(p.stem for p in (params_root / v).glob("*.yaml"))
        print(f"  {v}: {', '.join(have)}")
    return 0


def _check(args) -> int:
    from kelib import reproduce as rp

    notebooks_dir = Path(args.notebooks) if args.notebooks else rp.NOTEBOOKS_DIR
    problems = rp.check_pairing(notebooks_dir)
    for p in problems:
        print(p)
    if not problems:
        n = len(rp.list_notebooks(notebooks_dir))
        print(f"{n} notebook(s) in {notebooks_dir}: pairs in sync, no outputs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
