"""Checks on the full embedded default model (``make test-slow``: builds it once, ~12 min on 2 cores).

Its training targets are printed by ``benchmarks/bench_embedded.py``; here are the editing checks
the editors issue asks for: single ROME and MEMIT edits land on it.
"""

import pytest

from kelib.editors import load_hparams
from kelib.runner import RunSpec, run_edits
from kelib.stats import statistics_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    from kelib.embedded import world_cases
    from kelib.models import load_model

    model, tok = load_model("kelib-default")
    return model, tok, world_cases("default")


# Known shortfalls of the current default model (strict: a fix makes these tests fail until the
# mark is removed). None since C0 mixes in the keys at the lookup position (mom2_lookup_share): before,
# a neighbour with the same template shared ~30% of the edit key (u·k_nb / u·k) and ROME's
# specificity was 0.70. On these 100 cases ROME scores 0.98 / 0.74 / 0.90 and MEMIT 1.00 / 0.70 / 0.95.
SHORTFALL: dict[tuple[str, str], str] = {}
N_CASES = 100  # the first 100 world cases (benchmarks/bench_editors.py --n 100 prints the same run)
TARGETS = {"efficacy_success": 0.95, "paraphrase_success": 0.70, "neighborhood_success": 0.90}


@pytest.fixture(scope="module")
def single_edit_scores(default):
    model, tok, cases = default
    scores = {}
    for editor in ("ROME", "MEMIT"):
        hp = load_hparams(editor, "kelib-default")
        stats = statistics_for(model, tok, hp, progress=False)
        table = run_edits(model, tok, cases, RunSpec(editor, "single", n_edits=N_CASES), hp, stats, progress=False)
        scores[editor] = table[table.scope == "edits"].set_index("metric").value
    return scores


@pytest.mark.parametrize(
    "editor,metric",
    [
        pytest.param(e, m, marks=pytest.mark.xfail(reason=SHORTFALL[(e, m)], strict=True) if (e, m) in SHORTFALL else ())
        for e in ("ROME", "MEMIT")
        for m in TARGETS
    ],
)
def test_single_edits_land_on_the_default_model(single_edit_scores, editor, metric):
    assert single_edit_scores[editor][metric] >= TARGETS[metric]
