"""A run killed at a checkpoint and resumed gives exactly the table of the uninterrupted run.

The interrupted run is killed with SIGKILL in a subprocess right after a checkpoint, and resumed in a
second fresh subprocess, so nothing held in memory can mask what the run folder did not save. On the
CPU every kernel kelib uses here is deterministic for a fixed thread count, so the tables must be
equal to the bit, not to a tolerance.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from resume_variants import VARIANTS, run_variant

WORKER = Path(__file__).with_name("resume_worker.py")


def _worker(variant: str, out_dir: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(WORKER), variant, str(out_dir)]
    if kill_at is not None:
        args += ["--kill-at", str(kill_at)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the parent's kernels exactly
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_run_killed_at_a_checkpoint_resumes_to_the_same_table(variant, micro_dir, untouched, tmp_path):
    kill_at = VARIANTS[variant][-1]
    killed = _worker(variant, tmp_path / "run", kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]  # died by SIGKILL, not by an error
    assert (tmp_path / "run" / "state.pt").exists()
    partial = pd.read_csv(tmp_path / "run" / "results.csv")
    assert partial.checkpoint.max() == kill_at  # killed right after that checkpoint, nothing later

    resumed = _worker(variant, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "run" / "state.pt").exists()  # a finished run keeps no resume state

    reference = run_variant(variant, tmp_path / "reference")
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    expected = pd.read_csv(tmp_path / "reference" / "results.csv")
    assert table.checkpoint.max() == VARIANTS[variant][3] and len(table) == len(reference)
    assert (table.checkpoint > kill_at).any()  # rows computed after the resume are compared too
    pd.testing.assert_frame_equal(table, expected, check_exact=True)


def test_resumed_runs_keep_the_templates_of_the_unedited_model(micro_dir, untouched, tmp_path):
    """The templates are sampled once, at the first edit, and saved: a resumed run does not draw new
    ones from the edited weights."""
    killed = _worker("MEMIT", tmp_path / "run", kill_at=VARIANTS["MEMIT"][-1])
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    saved = dict(state["templates"])
    assert saved and all(isinstance(t, list) and t for t in saved.values())
    assert _worker("MEMIT", tmp_path / "run").returncode == 0
    import json

    assert json.loads((tmp_path / "run" / "templates.json").read_text()) == saved


def test_a_run_folder_with_other_inputs_is_refused_with_what_changed(micro, micro_stats, untouched, tmp_path):
    from kelib.editors import load_hparams
    from kelib.runner import RunSpec, run_edits
    from kelib.runstore import RunMismatch

    model, tok, cases = micro
    hp = load_hparams("MEMIT", "kelib-micro")
    spec = RunSpec("MEMIT", "sequential", n_edits=2, batch_size=2)
    run_edits(model, tok, cases, spec, hp, micro_stats, out_dir=tmp_path, progress=False)

    with pytest.raises(RunMismatch, match=r"hparams\.v_lr: 0\.5 -> 0\.25"):
        run_edits(model, tok, cases, spec, dataclasses.replace(hp, v_lr=0.25), micro_stats, out_dir=tmp_path,
                  progress=False)
    with pytest.raises(RunMismatch, match=r"cases: "):
        run_edits(model, tok, cases[2:], spec, hp, micro_stats, out_dir=tmp_path, progress=False)
    with pytest.raises(RunMismatch, match=r"evaluators\.count: \(absent\)"):
        run_edits(model, tok, cases, spec, hp, micro_stats, out_dir=tmp_path, progress=False,
                  evaluators={"count": lambda m, t: {"n": 1.0}})
    weight = model.transformer.h[hp.layers[0]].mlp.c_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    try:
        with pytest.raises(RunMismatch, match=r"weights: "):
            run_edits(model, tok, cases, spec, hp, micro_stats, out_dir=tmp_path, progress=False)
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_editor_code_is_part_of_a_runs_identity(tmp_path):
    from kelib.runstore import code_identity

    found = code_identity("kelib.editors.alphaedit")
    # AlphaEdit's numbers depend on MEMIT's solve and the target optimisation it imports
    assert {"kelib.editors.alphaedit", "kelib.editors.memit", "kelib.editors.target"} <= set(found)
    assert all(len(h) == 16 for h in found.values())


def test_a_run_folder_of_an_older_format_is_refused(micro, micro_stats, untouched, tmp_path):
    from kelib.editors import load_hparams
    from kelib.io import read_json, write_json
    from kelib.runner import RunSpec, run_edits
    from kelib.runstore import RunMismatch

    model, tok, cases = micro
    hp = load_hparams("ROME", "kelib-micro")
    spec = RunSpec("ROME", "sequential", n_edits=1)
    run_edits(model, tok, cases, spec, hp, micro_stats, out_dir=tmp_path, progress=False)
    info = read_json(tmp_path / "run.json")
    info["identity"]["format"] = 1
    info["fingerprint"] = "old"
    write_json(tmp_path / "run.json", info)
    with pytest.raises(RunMismatch, match="older kelib"):
        run_edits(model, tok, cases, spec, hp, micro_stats, out_dir=tmp_path, progress=False)
