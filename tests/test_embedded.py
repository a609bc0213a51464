"""The embedded models: the micro model knows its facts and skills; builds are cached and atomic."""

import dataclasses
import json

import pytest
import torch

from kelib.embedded import build
from kelib.embedded.recipe import Recipe, load_recipe
from kelib.metrics import recall


def test_micro_model_knows_its_facts_and_skills(micro_dir, micro):
    report = json.loads((micro_dir / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["recall_prompt"] >= 0.90
    # Every split is learned, and the overall recall is the fact-weighted mean of the splits'.
    sizes = report["splits"]
    assert sum(s["facts"] for s in sizes.values()) == report["n_facts"]
    assert report["n_cases"] == sizes["eval"]["cases"] == load_recipe("micro").n_cases
    for split in sizes:
        assert metrics[f"recall_prompt_{split}"] >= 0.85, split
    weighted = sum(metrics[f"recall_prompt_{s}"] * sizes[s]["facts"] for s in sizes) / report["n_facts"]
    assert weighted == pytest.approx(metrics["recall_prompt"])
    assert metrics["skill_sentiment"] >= 0.85
    assert metrics["skill_topic"] >= 0.85  # four choices: chance is 0.25
    # The saved weights and tokenizer, loaded through the model layer, give the same recall.
    model, tok, cases = micro
    facts = build.world_of(micro_dir).facts
    reloaded = recall(model, tok, [f.prompt() for f in facts], [f.obj for f in facts])
    assert reloaded == pytest.approx(metrics["recall_prompt"], abs=1e-9)
    # Objects are single tokens, so an edit changes one token's odds.
    assert all(len(tok(" " + c.target_new, add_special_tokens=False)["input_ids"]) == 1 for c in cases)
    # Held-out skill examples are stored for the evaluation layer, disjoint from nothing it trained on.
    lines = (micro_dir / "skills" / "sentiment.jsonl").read_text().splitlines()
    assert len(lines) == load_recipe("micro").n_eval
    assert set(json.loads(lines[0])) == {"prompt", "choices", "label"}


def test_second_use_reuses_the_cache(micro_dir, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(build, "_build", no_build)
    assert build.ensure_model("micro") == micro_dir


def test_a_changed_recipe_gets_a_new_cache_key():
    recipe = load_recipe("micro")
    assert build.model_dir("micro", recipe) != build.model_dir("micro", dataclasses.replace(recipe, seed=1))
    assert build.model_dir("micro", recipe) == build.model_dir("micro", load_recipe("micro"))


def test_an_interrupted_build_leaves_nothing_behind(monkeypatch):
    recipe = dataclasses.replace(load_recipe("micro"), seed=12345)

    def interrupted(name, recipe, out, progress, **kwargs):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_build", interrupted)
    target = build.model_dir("micro", recipe)
    with pytest.raises(KeyboardInterrupt):
        build.ensure_model("micro", recipe)
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]


def test_training_is_deterministic_under_a_seed():
    from kelib.embedded.train import train

    tiny = Recipe(n_cases=20, n_tune_cases=4, n_stats_facts=6, n_unedited_facts=6, skills=("sentiment",), n_eval=10,
                  skill_examples_per_epoch=20, skill_weights={}, n_layer=1, n_embd=32, n_head=2, vocab_size=400,
                  epochs=1, warmup_steps=2)
    first, _, _, _ = train(tiny, progress=False)
    second, _, _, _ = train(tiny, progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_recipe_and_skill_are_clear_errors():
    from kelib.config import ConfigError
    from kelib.embedded.skills import skill_sets
    from kelib.embedded.world import build_world

    with pytest.raises(ConfigError, match="unknown embedded model 'huge'"):
        load_recipe("huge")
    with pytest.raises(ValueError, match="unknown skill"):
        skill_sets(build_world(5), ("juggling",), 5)


def test_skills_and_perplexity_run_as_lm_eval_tasks(micro):
    from kelib.embedded import embedded_task_dir
    from kelib.evaluation import evaluate_abilities

    model, tok, _ = micro
    root = embedded_task_dir("micro")
    table = evaluate_abilities(model, tok, "embedded", limit=60, task_dirs=[root], progress=False)
    values = table.set_index(["task", "metric"]).value
    assert set(table.task) == {"embedded_sentiment", "embedded_topic", "embedded_perplexity"}
    assert values[("embedded_sentiment", "acc")] >= 0.85
    assert values[("embedded_topic", "acc")] >= 0.85
    assert 1 < values[("embedded_perplexity", "word_perplexity")] < 1e5
    assert (table.set_index("task").n == 60).all()
    assert embedded_task_dir("micro") == root  # written once


def test_embedded_modules_import_each_other_without_a_circle():
    """Every ``kelib.embedded`` module's imports of its siblings, deferred ones included, form no cycle."""
    from import_graph import import_cycles, sibling_imports

    graph = sibling_imports("kelib.embedded")
    assert "report" in graph["build"] or "scoring" in graph["build"]  # the build scores what it trained
    circles = import_cycles(graph)
    assert not circles, {m: sorted(graph[m]) for m in circles}
