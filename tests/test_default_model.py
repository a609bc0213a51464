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


# Known shortfalls of the current default model (strict: a fix makes these tests fail until the mark is
# removed). The specificity bar was met only while C0 held the keys of every trained prompt, the probed
# neighbours' included (issue #13). With C0 from the stats split alone, on these 100 eval cases
# (benchmarks/bench_editors.py --n 100 prints the same run), ROME scores 0.99 / 0.90 / 0.76 and MEMIT
# 1.00 / 0.83 / 0.83 (efficacy / paraphrase / specificity); with the leaky C0 and the same settings,
# ROME 0.98 / 0.81 / 0.92 and MEMIT 1.00 / 0.73 / 0.95. The bar stays; the figures are recorded.
_LEAK = "specificity on eval cases once their neighbours' keys left C0 (issue #13): ROME 0.76, MEMIT 0.83"
SHORTFALL: dict[tuple[str, str], str] = {("ROME", "neighborhood_success"): _LEAK,
                                         ("MEMIT", "neighborhood_success"): _LEAK}
N_CASES = 100  # the first 100 eval cases (benchmarks/bench_editors.py --n 100 prints the same run)
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
