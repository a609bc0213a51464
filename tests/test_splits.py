"""The embedded world's splits (tune, stats, eval, unedited) are disjoint, and each consumer reads its own.

The disjointness checks recompute every split's subjects, prompt strings and facts here rather than
trusting :func:`kelib.embedded.world.shared_across_splits`; building a world is cheap (no training).
"""

import dataclasses
import itertools
import json

import pytest

from kelib.embedded import build, store
from kelib.embedded.recipe import load_recipe
from kelib.embedded.world import CASE_SPLITS, SPLITS, World, build_world, shared_across_splits, world_for


def owned(world: World, split: str) -> dict[str, set]:
    """Everything a split owns: subjects, prompt strings (every template of every fact, each case's
    prompt, paraphrases and neighbourhood prompts) and facts."""
    facts = [f for f in world.facts if f.split == split]
    cases = world.cases.get(split, ())
    prompts = {t.replace("{}", f.subject, 1) for f in facts for t in world.relations[f.relation_id].templates}
    for c in cases:
        prompts |= {c.prompt, *c.paraphrase_prompts, *c.neighborhood_prompts}
    return {
        "subjects": {f.subject for f in facts} | {c.subject for c in cases},
        "prompts": prompts,
        "facts": {(f.subject, f.relation_id, f.obj) for f in facts},
    }


@pytest.fixture(scope="module", params=["micro", "default"])
def recipe_world(request):
    recipe = load_recipe(request.param)
    return request.param, recipe, world_for(recipe)


def test_no_subject_prompt_or_fact_is_shared_across_splits(recipe_world):
    _, _, world = recipe_world
    mine = {split: owned(world, split) for split in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        for kind in ("subjects", "prompts", "facts"):
            assert mine[a][kind] and mine[b][kind]
            assert not mine[a][kind] & mine[b][kind], (a, b, kind, sorted(mine[a][kind] & mine[b][kind])[:5])
    assert all(not found for found in shared_across_splits(world).values())


def test_split_sizes_follow_the_recipe(recipe_world):
    name, recipe, world = recipe_world
    assert len(world.cases["eval"]) == recipe.n_cases
    assert len(world.cases["tune"]) == recipe.n_tune_cases
    assert len(world.facts_in("stats")) == recipe.n_stats_facts
    assert len(world.facts_in("unedited")) == recipe.n_unedited_facts
    for split in CASE_SPLITS:
        cases = world.cases[split]
        edited, neighbours = world.facts_in(split, "edited"), world.facts_in(split, "neighbour")
        assert len(world.facts_in(split)) == 2 * len(cases)
        # each case rewrites its edited fact, and its neighbourhood prompt is its neighbour fact
        assert [(c.subject, c.prompt, c.target_true) for c in cases] == [(f.subject, f.prompt(), f.obj) for f in edited]
        assert [(c.neighborhood_prompts[0], c.neighborhood_answers[0]) for c in cases] == [
            (f.prompt(), f.obj) for f in neighbours]
        assert [c.paraphrase_prompts[0] for c in cases] == [f.paraphrase for f in edited]
    if name == "default":
        assert len(world.cases["eval"]) >= 1000  # 1,000 sequential edits never reuse a case
        assert len({c.case_id for c in world.cases["eval"]}) == len(world.cases["eval"])


def test_splits_are_fixed_by_seed_and_growing_them_keeps_the_eval_cases():
    first = build_world.__wrapped__(60, seed=0, n_tune=10, n_stats=20, n_unedited=20)
    again = build_world.__wrapped__(60, seed=0, n_tune=10, n_stats=20, n_unedited=20)
    assert first.to_dict() == again.to_dict()
    other_seed = build_world.__wrapped__(60, seed=1, n_tune=10, n_stats=20, n_unedited=20)
    assert {c.case_id for c in other_seed.cases["eval"]} != {c.case_id for c in first.cases["eval"]}
    grown = build_world.__wrapped__(60, seed=0, n_tune=30, n_stats=50, n_unedited=41)
    assert grown.cases["eval"] == first.cases["eval"]
    assert grown.facts_in("eval") == first.facts_in("eval")
    assert grown.cases["tune"][:10] == first.cases["tune"]
    assert len(grown.facts_in("unedited")) == 41  # an odd count takes one fact of a case's two


def test_the_overlap_check_finds_a_shared_subject_prompt_and_fact():
    world = build_world(30, n_tune=5, n_stats=10, n_unedited=10)
    assert all(not found for found in shared_across_splits(world).values())
    leaked = dataclasses.replace(world.facts_in("eval")[0], split="stats", role="fact")
    bad = dataclasses.replace(world, facts=world.facts + (leaked,))
    shared = shared_across_splits(bad)
    assert shared["subjects"] == {leaked.subject: ["stats", "eval"]}
    assert shared["facts"] == {leaked.triple: ["stats", "eval"]}
    templates = world.relations[leaked.relation_id].templates
    assert set(shared["prompts"]) == {t.replace("{}", leaked.subject, 1) for t in templates}


def test_world_round_trips_through_its_stored_form():
    world = build_world(30, n_tune=5, n_stats=10, n_unedited=10)
    assert World.from_dict(world.to_dict()) == world


def test_fact_check_asks_about_unedited_facts_only_when_held_out():
    import random
    import re

    from kelib.embedded.skills import skill_sets

    world = world_for(load_recipe("micro"))  # big enough that every category has two objects
    train, heldout = skill_sets(world, ("fact_check",), 25)

    def question_about(fact):  # the fact's yes/no question with any object
        question = world.relations[fact.relation_id].question.replace("{}", fact.subject)
        return re.compile(".+".join(re.escape(f"Question: {part}") if i == 0 else re.escape(part)
                                    for i, part in enumerate(question.split("{o}"))) + re.escape(" Answer:"))

    unedited = [question_about(f) for f in world.facts_in("unedited")]
    asked = [next(i for i, q in enumerate(unedited) if q.fullmatch(ex.prompt)) for ex in heldout["fact_check"]]
    assert len(set(asked)) == 25  # 25 distinct unedited facts
    rng = random.Random(0)
    drawn = [train["fact_check"](rng).prompt for _ in range(300)]
    others = [question_about(f) for f in world.facts if f.split != "unedited"]
    assert all(any(q.fullmatch(p) for q in others) for p in drawn[:20])
    assert not [p for p in drawn if any(q.fullmatch(p) for q in unedited)]


def test_the_world_enters_the_cache_key(monkeypatch):
    recipe = load_recipe("micro")
    before = build.model_dir("micro", recipe)
    world = world_for(recipe)
    # the same recipe, but a world whose first stats and unedited facts trade places
    stats, unedited = world.facts_in("stats")[0], world.facts_in("unedited")[0]
    swapped = tuple(
        dataclasses.replace(f, split="unedited") if f is stats else
        dataclasses.replace(f, split="stats") if f is unedited else f
        for f in world.facts
    )
    monkeypatch.setattr(store, "world_for", lambda r: dataclasses.replace(world, facts=swapped))
    assert build.model_dir("micro", recipe) != before
    monkeypatch.setattr(store, "world_for", lambda r: world)
    assert build.model_dir("micro", recipe) == before


# --- consumers of a built model's splits (the micro model) ---------------------------------------


@pytest.fixture(scope="module")
def stored(micro_dir):
    return store.world_of(micro_dir)


def test_a_built_model_stores_its_splits_and_edits_eval_cases(micro_dir, stored):
    from kelib.embedded import split_facts, tune_cases, world_cases

    assert (micro_dir / "world.json").exists()
    assert stored.to_dict() == world_for(store.recipe_of(micro_dir)).to_dict()
    assert world_cases("micro") == list(stored.cases["eval"])
    assert tune_cases("micro") == list(stored.cases["tune"])
    assert split_facts("micro", "unedited") == list(stored.facts_in("unedited"))
    report = json.loads((micro_dir / "report.json").read_text())
    assert report["splits"] == stored.sizes()
    assert report["provenance"]["world_sha256"] == store.provenance(store.recipe_of(micro_dir))["world_sha256"]


def test_lookup_statistics_read_stats_prompts_only(micro, stored):
    from kelib import stats

    model, _, _ = micro
    prompts = list(stats._embedded_prompts(model))
    mine = {split: owned(stored, split)["prompts"] for split in SPLITS}
    assert prompts and set(prompts) <= mine["stats"]
    # every template but the held-out one, of every stats fact
    assert len(prompts) == sum(len(stored.relations[f.relation_id].templates) - 1 for f in stored.facts_in("stats"))
    for split in ("eval", "tune", "unedited"):
        assert not set(prompts) & mine[split]
    # ... so none of the eval cases' prompts, paraphrases or neighbourhood prompts either
    probes = {p for c in stored.cases["eval"] for p in (c.prompt, *c.paraphrase_prompts, *c.neighborhood_prompts)}
    assert not set(prompts) & probes


def test_text_statistics_hold_no_fact_statement_outside_stats(micro, stored):
    from kelib import stats
    from kelib.embedded.world import training_statements

    model, _, _ = micro
    texts = set(stats._embedded_world_texts(model))
    statements = {split: {s for f in stored.facts_in(split) for s in training_statements(f, stored.relations[f.relation_id])}
                  for split in SPLITS}
    assert statements["stats"] <= texts
    for split in ("eval", "tune", "unedited"):
        assert not texts & statements[split]


def test_mend_trains_on_tune_facts_only(micro_dir, stored):
    from kelib.editors.mend_train import world_training_cases

    cases = world_training_cases(micro_dir, 300, 2, seed=0)
    used = {p for c in cases for p in (c.prompt, *c.paraphrase_prompts, *c.neighborhood_prompts)}
    mine = {split: owned(stored, split) for split in SPLITS}
    assert {c.subject for c in cases} == mine["tune"]["subjects"]  # every tune fact, nothing else
    assert used <= mine["tune"]["prompts"]
    for split in ("eval", "stats", "unedited"):
        assert not used & mine[split]["prompts"]


def test_recall_unedited_reads_unedited_facts_only(micro, stored, monkeypatch):
    from kelib.embedded import abilities_evaluator, report

    model, tok, _ = micro
    seen = []
    scorer = report.score_targets

    def recording(model, tok, prompts, targets, *args, **kwargs):
        seen.append((list(prompts), list(targets)))
        return scorer(model, tok, prompts, targets, *args, **kwargs)

    monkeypatch.setattr(report, "score_targets", recording)
    # computed, not read back from the evaluation cache an earlier session (KELIB_TEST_CACHE) left
    monkeypatch.setattr(report, "_cached_path", lambda *args: None)
    result = abilities_evaluator("micro", n_facts=30, n_skill=5, n_text=2)(model, tok)
    unedited = stored.facts_in("unedited")[:30]
    assert seen[0] == ([f.prompt() for f in unedited], [f.obj for f in unedited])
    recalled = [s.exact for s in scorer(model, tok, *seen[0])]
    assert result["recall_unedited"] == pytest.approx(sum(recalled) / 30)
    others = set().union(*(owned(stored, s)["prompts"] for s in ("eval", "tune", "stats")))
    assert not set(seen[0][0]) & others


def test_hyperparameter_tuning_reads_tune_cases_only(micro_dir, stored, monkeypatch):
    import sys

    from kelib.embedded import build
    from kelib.paths import REPO_DIR

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import tune_embedded

    cases = tune_embedded.tuning_cases("kelib-micro")
    assert cases == list(stored.cases["tune"])
    eval_ids = {c.case_id for c in stored.cases["eval"]}
    assert not {c.case_id for c in cases} & eval_ids
    # a world whose tune split held an eval case would be refused, not tuned on
    monkeypatch.setattr(build, "tune_cases", lambda name: [*stored.cases["tune"][:3], stored.cases["eval"][0]])
    with pytest.raises(RuntimeError, match="are eval cases"):
        tune_embedded.tuning_cases("kelib-micro", 10)


def test_tuning_keeps_the_file_within_a_tie_and_moves_past_it():
    import sys

    from kelib.paths import REPO_DIR

    sys.path.insert(0, str(REPO_DIR / "benchmarks"))
    import tune_embedded

    def row(override, eff, par, spec):
        scores = {"efficacy_success": eff, "paraphrase_success": par, "neighborhood_success": spec}
        return override, {**scores, "score": tune_embedded.harmonic_mean(list(scores.values()))}, 0.1

    assert tune_embedded.harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(0.6)
    assert tune_embedded.harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    file_row = row({}, 0.98, 0.90, 0.71)
    assert tune_embedded.choose([file_row, row({"eps": 2.0}, 0.98, 0.90, 0.715)]) == {}  # +0.003: a tie
    assert tune_embedded.choose([file_row, row({"eps": 2.0}, 0.98, 0.90, 0.80)]) == {"eps": 2.0}
    assert tune_embedded.choose([file_row, row({"eps": 0.5}, 0.50, 0.90, 0.99)]) == {}
