"""General-ability evaluation through lm-eval, offline: every bundled task runs, prompts match lm-eval's
built-in tasks, a model with a known answer scores exactly, results are cached by weights."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from kelib import evaluation
from kelib.evaluation import EvaluationError, evaluate_abilities, list_groups, list_tasks, weights_fingerprint
from kelib.tasks import common

from conftest import make_tiny_model

ROUGE = {"rouge1", "rouge2", "rougeL", "rouge_avg"}
GSM8K = {"exact_match,strict-match", "exact_match,flexible-extract"}
EXPECTED_METRICS = {
    "rect_gsm8k": GSM8K,
    "rect_rte": {"acc"},
    "rect_nq_open": {"exact_match,remove_whitespace"},
    "rect_boolq": {"acc"},
    "rect_mutual": {"r@1", "r@2", "mrr"},
    "rect_samsum": ROUGE,
    "rect_conll2003": {"f1", "precision", "recall"},
    "rect_sst2": {"acc"},
    "prune_gsm8k": {"acc"},
    "prune_rte": {"acc", "acc_valid", "valid"},
    "prune_nq": {"em"},
    "prune_samsum": ROUGE,
    "d4s_arc_challenge": {"acc", "acc_norm"},
    "d4s_hellaswag": {"acc", "acc_norm"},
    "d4s_mmlu": {"acc"},
    "d4s_truthfulqa_mc": {"mc1", "mc2"},
    "d4s_winogrande": {"acc"},
    "d4s_gsm8k": GSM8K,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads
    contend so badly that generation slows down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Every bundled task runs on a tiny model


def test_groups_and_tasks_are_discovered():
    groups = list_groups()
    assert {"rect", "prune", "d4s"} <= set(groups)
    mine = {name for group in ("rect", "prune", "d4s") for name in groups[group]}
    assert mine == set(EXPECTED_METRICS)
    descriptions = list_tasks()
    assert all(descriptions[name] and descriptions[name] != name for name in mine)


@pytest.fixture(params=["tiny", "micro"])
def task_model(request):
    """A tiny random GPT-2, and the micro embedded model (a trained model with its own tokenizer)."""
    if request.param == "micro":
        model, tok, _ = request.getfixturevalue("micro")
        return model, tok
    return request.getfixturevalue("tiny_gpt2")


def test_every_task_runs_with_expected_metrics(task_model):
    model, tok = task_model
    names = list(list_tasks())  # every YAML under kelib/tasks, including groups added later
    frame = evaluate_abilities(model, tok, names, limit=2, cache=False, progress=False)
    assert list(frame.columns) == ["task", "metric", "value", "stderr", "n"]
    assert set(frame.task) == set(names)
    for name, metrics in EXPECTED_METRICS.items():
        assert set(frame[frame.task == name].metric) == metrics, name
    assert (frame.n == 2).all()
    for row in frame.itertuples():
        # NaN only where nothing can be counted (prune_rte's accuracy over valid answers)
        assert math.isnan(row.value) or 0.0 <= row.value <= 1.0, row
        assert math.isnan(row.stderr), row  # bootstrap_iters=0: no standard errors


def test_runs_from_any_working_directory(tiny_gpt2, tmp_path, monkeypatch):
    model, tok = tiny_gpt2
    monkeypatch.chdir(tmp_path)  # notebooks run with --cwd notebooks/: data paths must not care
    frame = evaluate_abilities(model, tok, ["prune_rte", "d4s_winogrande"], limit=2, cache=False, progress=False)
    assert set(frame.task) == {"prune_rte", "d4s_winogrande"}


def test_stderr_with_bootstrap(tiny_gpt2):
    model, tok = tiny_gpt2
    frame = evaluate_abilities(model, tok, ["rect_sst2"], limit=3, cache=False, bootstrap_iters=10, progress=False)
    assert frame.stderr.notna().all()


# ---------------------------------------------------------------------------------------------
# A model whose answer is known by construction


def constant_model(tok, favoured: str):
    """A tiny GPT-2 whose next-token distribution is the same at every position and puts (almost)
    all its mass on the tokens of ``favoured``: the final layer norm outputs its bias e_0 whatever
    the input, and column 0 of the unembedding holds the logits."""
    model = make_tiny_model("gpt2", len(tok))
    logits = torch.full((len(tok),), -30.0)
    logits[tok(favoured)["input_ids"]] = 0.0
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return model


def write_known_task(root: Path) -> None:
    folder = root / "known"
    folder.mkdir(parents=True)
    docs = [
        {"prompt": "The movie was great. Is it good?", "choices": ["yes", "no"], "label": 0},
        {"prompt": "The movie was awful. Is it bad?", "choices": ["no", "yes"], "label": 1},
        {"prompt": "The movie was awful. Is it good?", "choices": ["yes", "no"], "label": 1},
    ]
    data = folder / "known.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "known_mc.yaml").write_text(
        "task: known_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n  description: three yes/no questions\n"
    )


def test_known_answer_scores_exactly(tiny_tokenizer, tmp_path):
    write_known_task(tmp_path)
    model = constant_model(tiny_tokenizer, " yes")  # always answers "yes": right on 2 of 3
    assert list_groups([tmp_path])["known"] == ["known_mc"]
    frame = evaluate_abilities(model, tiny_tokenizer, ["known"], task_dirs=[tmp_path], cache=False, progress=False)
    values = dict(zip(frame.metric, frame.value))
    assert values["acc"] == pytest.approx(2 / 3)
    assert values["acc_norm"] == pytest.approx(2 / 3)
    assert set(frame.n) == {3}

    model_no = constant_model(tiny_tokenizer, " no")  # always "no": right on 1 of 3
    frame = evaluate_abilities(model_no, tiny_tokenizer, ["known_mc"], task_dirs=[tmp_path], cache=False, progress=False)
    assert dict(zip(frame.metric, frame.value))["acc"] == pytest.approx(1 / 3)


def test_what_does_not_fit_the_context_is_reported_once(tiny_gpt2, tmp_path, caplog):
    """lm-eval would stop on an answer option longer than the context; kelib scores its first
    max_length tokens, and says once per call what it cut (prompts on the left, options)."""
    model, tok = tiny_gpt2
    folder = tmp_path / "long"
    folder.mkdir()
    data = folder / "d.jsonl"
    long_text = "The capital of France is Paris. " * 40
    data.write_text(json.dumps({"prompt": long_text, "choices": ["yes", long_text], "label": 0}) + "\n")
    (folder / "long.yaml").write_text(
        f"task: long_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    with caplog.at_level("WARNING", logger="kelib.evaluation"):
        frame = evaluate_abilities(model, tok, ["long_mc"], task_dirs=[tmp_path], cache=False, progress=False)
    assert frame.value.notna().all()
    messages = [r.getMessage() for r in caplog.records if r.name == "kelib.evaluation"]
    assert any("cut on the left: long_mc (" in m for m in messages)
    assert any("scored on their first 128 tokens: long_mc (1)" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# Caching


@pytest.fixture
def count_runs(monkeypatch):
    import lm_eval

    calls = []
    original = lm_eval.simple_evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs["tasks"])
        return original(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    return calls


def test_cache_skips_unchanged_model_and_reruns_after_an_edit(tiny_gpt2, count_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))  # a cache of its own: other tests use this model too
    model, tok = tiny_gpt2
    first = evaluate_abilities(model, tok, ["rect_sst2", "d4s_mmlu"], limit=2, progress=False)
    assert len(count_runs) == 2
    again = evaluate_abilities(model, tok, ["rect_sst2", "d4s_mmlu"], limit=2, progress=False)
    assert len(count_runs) == 2  # read back, lm-eval not called
    assert again.equals(first)

    evaluate_abilities(model, tok, ["rect_sst2"], limit=3, progress=False)  # another limit: a new entry
    assert len(count_runs) == 3
    evaluate_abilities(model, tok, ["rect_sst2"], limit=2, cache=False, progress=False)
    assert len(count_runs) == 4

    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] += 1e-3  # an "edit"
    evaluate_abilities(model, tok, ["rect_sst2", "d4s_mmlu"], limit=2, progress=False)
    assert len(count_runs) == 6
    assert len(list((tmp_path / "evaluations").rglob("*.json"))) == 5  # 2 + 1 + 2 entries, atomically written


def test_declared_views_enter_the_cache_key_and_undeclared_hooks_skip_it(tiny_gpt2, count_runs, tmp_path, monkeypatch):
    """Edits outside the weights (GRACE's hooks) leave the weights fingerprint as it was: a declared
    view keys the cache, and hooks nobody declared are never cached."""
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path))
    model, tok = tiny_gpt2
    evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
    assert len(count_runs) == 1
    with evaluation.declared_view(model, "codebook-a"):
        evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
        evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
        assert len(count_runs) == 2  # a new key, then read back
    with evaluation.declared_view(model, "codebook-b"):
        evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
    assert len(count_runs) == 3
    assert evaluation.view_keys(model) == []
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda module, args, output: output)
    try:
        assert evaluation.view_keys(model) is None
        evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
        evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
    finally:
        handle.remove()
    assert len(count_runs) == 5
    evaluate_abilities(model, tok, ["rect_sst2"], limit=2, progress=False)
    assert len(count_runs) == 5  # the unhooked model's entry
    assert len(list((tmp_path / "evaluations").rglob("*.json"))) == 3


def test_weights_fingerprint(tiny_gpt2):
    model, _ = tiny_gpt2
    fp = weights_fingerprint(model)
    assert fp == weights_fingerprint(model) == weights_fingerprint(copy.deepcopy(model))
    weight = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        weight[3, 5] += 1e-6
        changed = weights_fingerprint(model)
        weight[3, 5] -= 1e-6
        assert changed != fp
        # a swap keeps the plain sum: the weighted sum must see it
        a, b = weight[0, 0].item(), weight[0, 1].item()
        weight[0, 0], weight[0, 1] = b, a
        assert weights_fingerprint(model) != fp
        weight[0, 0], weight[0, 1] = a, b
    assert weights_fingerprint(model) == fp
    assert weights_fingerprint(model.to(torch.bfloat16)) != fp  # dtype is part of it


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_task_lists_tasks_and_groups(tiny_gpt2):
    model, tok = tiny_gpt2
    with pytest.raises(EvaluationError) as err:
        evaluate_abilities(model, tok, ["rect_sst2", "no_such_task"], progress=False)
    message = str(err.value)
    assert "no_such_task" in message and "rect_gsm8k" in message and "d4s" in message and "prune" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("limit", [1.0, 0.5, 10.0, True])
def test_float_limit_is_rejected(tiny_gpt2, limit):
    model, tok = tiny_gpt2
    with pytest.raises(EvaluationError, match="ONE example"):
        evaluate_abilities(model, tok, ["rect_sst2"], limit=limit, progress=False)


def test_non_positive_limit_is_rejected(tiny_gpt2):
    model, tok = tiny_gpt2
    with pytest.raises(EvaluationError, match="at least 1"):
        evaluate_abilities(model, tok, ["rect_sst2"], limit=0, progress=False)


def test_missing_data_file_is_a_clear_error(tiny_gpt2, tmp_path, count_runs):
    model, tok = tiny_gpt2
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "broken.yaml").write_text(
        "task: broken_task\ncustom_dataset: !function utils.load\n"
        "dataset_kwargs:\n  data_file: gone.jsonl.gz\noutput_type: multiple_choice\n"
    )
    with pytest.raises(EvaluationError, match="gone.jsonl.gz"):
        evaluate_abilities(model, tok, ["broken_task"], task_dirs=[tmp_path], progress=False)
    assert count_runs == []


def test_a_task_that_cannot_fit_the_context_is_a_clear_error(tiny_gpt2, tmp_path):
    model, tok = tiny_gpt2
    folder = tmp_path / "long"
    folder.mkdir()
    data = folder / "d.jsonl"
    data.write_text('{"q": "yes?"}\n')
    (folder / "long.yaml").write_text(
        f"task: long_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 'yes'\n"
        "generation_kwargs:\n  until: []\n  max_gen_toks: 500\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    with pytest.raises(EvaluationError, match="max_length"):
        evaluate_abilities(model, tok, ["long_gen"], task_dirs=[tmp_path], cache=False, progress=False)


# ---------------------------------------------------------------------------------------------
# builtin=True: the mapping onto lm-eval's own tasks (lm-eval itself faked: it would need the hub)


def test_builtin_mapping(tiny_gpt2, monkeypatch):
    import lm_eval
    import lm_eval.tasks

    model, tok = tiny_gpt2
    seen = []

    class FakeManager:
        def __init__(self, **kwargs):
            assert kwargs.get("include_defaults", True)

    def fake_simple_evaluate(*, tasks, num_fewshot, limit, **kwargs):
        seen.append((tuple(tasks), num_fewshot, limit))
        leaf = {"original": 10, "effective": 2}
        return {
            "results": {
                "truthfulqa_mc1": {"alias": "x", "acc,none": 0.25, "acc_stderr,none": "N/A"},
                "truthfulqa_mc2": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1},
                "mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01},
                "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": "N/A"},
            },
            "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_anatomy"],
                               "mmlu_other": ["mmlu_virology", "mmlu_nutrition"]},
            "n-samples": {name: leaf for name in ("truthfulqa_mc1", "truthfulqa_mc2", "mmlu_anatomy",
                                                  "mmlu_virology", "mmlu_nutrition", "gsm8k")},
        }

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    frame = evaluate_abilities(
        model, tok, ["d4s_truthfulqa_mc", "d4s_mmlu", "rect_gsm8k"], limit=2, builtin=True,
        cache=False, progress=False,
    )
    assert seen == [(("truthfulqa_mc1", "truthfulqa_mc2"), None, 2), (("mmlu",), None, 2), (("gsm8k",), 0, 2)]
    rows = {(r.task, r.metric): r for r in frame.itertuples()}
    assert rows["d4s_truthfulqa_mc", "mc1"].value == 0.25 and math.isnan(rows["d4s_truthfulqa_mc", "mc1"].stderr)
    assert rows["d4s_truthfulqa_mc", "mc2"].stderr == 0.1
    assert rows["d4s_mmlu", "acc"].n == 6  # summed over the leaves of the nested group
    assert rows["rect_gsm8k", "exact_match,strict-match"].value == 0.1


# ---------------------------------------------------------------------------------------------
# Prompts, choices and targets are those of lm-eval's built-in tasks


def builtin_yaml(rel: str) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / rel
    if not path.exists():
        pytest.skip(f"lm-eval has no {rel}")
    return path


def make_task(path: Path, docs: list[dict] | None = None):
    """A lm-eval task from a YAML; ``docs`` replace its dataset (a built-in task's hub download)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path, resolve_func=True, recursive=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    if docs is not None:
        config.pop("dataset_path", None)
        config.pop("dataset_name", None)
        config["custom_dataset"] = lambda **kw: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
        config.update(test_split="test", validation_split=None, training_split=None, fewshot_split=None)
    return ConfigurableTask(config=config)


def kelib_records(name: str) -> list[dict]:
    info = evaluation.discover()[name]
    return common.read_records(info.path.parent / "data" / info.config["dataset_kwargs"]["data_file"])


def assert_same_prompts(kelib_name: str, builtin: Path, to_hf, n: int = 25):
    ours = make_task(evaluation.discover()[kelib_name].path)
    records = kelib_records(kelib_name)[:n]
    theirs = make_task(builtin, [to_hf(r) for r in records])
    pairs = list(zip(list(ours.eval_docs)[:n], theirs.eval_docs))
    assert len(pairs) == n
    for mine, ref in pairs:
        assert ours.fewshot_context(doc=mine, num_fewshot=0) == theirs.fewshot_context(doc=ref, num_fewshot=0)
        if theirs.config.doc_to_choice is not None:
            assert ours.doc_to_choice(mine) == theirs.doc_to_choice(ref)
        assert ours.doc_to_target(mine) == theirs.doc_to_target(ref)


def same(record):
    return dict(record)


@pytest.mark.parametrize(
    "kelib_name, rel, to_hf",
    [
        ("rect_rte", "glue/rte/default.yaml", same),
        ("rect_boolq", "super_glue/boolq/default.yaml", same),
        ("rect_sst2", "glue/sst2/default.yaml", same),
        ("rect_mutual", "mutual/mutual.yaml", same),
        ("rect_gsm8k", "gsm8k/gsm8k.yaml", same),
        ("d4s_gsm8k", "gsm8k/gsm8k.yaml", same),
        ("rect_nq_open", "nq_open/nq_open.yaml", lambda r: {**r, "question": r["question"].rstrip("?")}),
        (
            "d4s_arc_challenge",
            "arc/arc_challenge.yaml",
            lambda r: {
                "question": r["question"],
                "choices": {"text": r["choices"], "label": list("ABCDE")[: len(r["choices"])]},
                "answerKey": "ABCDE"[r["gold"]],
            },
        ),
        (
            "d4s_hellaswag",
            "hellaswag/hellaswag.yaml",
            lambda r: {
                **dict(zip(["activity_label", "ctx_a", "ctx_b"], hellaswag_split(r["query"]))),
                "endings": r["endings"],
                "label": str(r["label"]),
            },
        ),
        ("d4s_winogrande", "winogrande/default.yaml", lambda r: winogrande_hf(r)),
    ],
)
def test_prompts_match_lm_eval_builtins(kelib_name, rel, to_hf):
    assert_same_prompts(kelib_name, builtin_yaml(rel), to_hf)


def task_utils(task: str):
    """The ``utils.py`` beside a task's YAML, imported by path as lm-eval imports it."""
    import importlib.util

    path = evaluation.discover()[task].path.parent / "utils.py"
    spec = importlib.util.spec_from_file_location(f"utils_of_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hellaswag_split(query):
    return task_utils("d4s_hellaswag").split_context(query)


def test_hellaswag_context_split():
    label, ctx_a, ctx_b = hellaswag_split("Roof shingle removal: A man is sitting on a roof. he")
    assert (label, ctx_a, ctx_b) == ("Roof shingle removal", "A man is sitting on a roof.", "he")
    assert hellaswag_split("Cooking: Mix the flour. Add Eggs.") == ("Cooking", "Mix the flour. Add Eggs.", "")
    ours = make_task(evaluation.discover()["d4s_hellaswag"].path)
    queries = [doc["query"] for doc in ours.eval_docs]
    lower = [q for q in kelib_records("d4s_hellaswag") if q["query"].endswith(". the woman")]
    assert lower and any(q.endswith(". The woman") for q in queries)  # capitalised as lm-eval does


def winogrande_hf(record):
    """Back to the Hugging Face layout: a sentence with "_" and two options."""
    first, second = record["context_options"]
    prefix = first[: [a == b for a, b in zip(first, second)].index(False)]
    prefix = prefix[: prefix.rfind(" ") + 1]  # options share no leading letters then
    return {
        "sentence": f"{prefix}_ {record['continuation']}",
        "option1": first[len(prefix):],
        "option2": second[len(prefix):],
        "answer": str(record["gold"] + 1),
    }


def test_mmlu_prompts_match_lm_eval_builtins():
    records = kelib_records("d4s_mmlu")
    ours = make_task(evaluation.discover()["d4s_mmlu"].path)
    docs = list(ours.eval_docs)
    for subject in ("abstract_algebra", "high_school_us_history", "world_religions"):
        idx = [i for i, r in enumerate(records) if r["subject"] == subject]
        assert len(idx) == 6
        theirs = make_task(builtin_yaml(f"mmlu/default/mmlu_{subject}.yaml"), [records[i] for i in idx])
        for i, ref in zip(idx, theirs.eval_docs):
            assert ours.fewshot_context(doc=docs[i], num_fewshot=0) == theirs.fewshot_context(doc=ref, num_fewshot=0)
            assert ours.doc_to_choice(docs[i]) == theirs.doc_to_choice(ref)
            assert ours.doc_to_target(docs[i]) == theirs.doc_to_target(ref)


def test_truthfulqa_prompts_match_lm_eval_builtins():
    records = kelib_records("d4s_truthfulqa_mc")[:20]
    ours = make_task(evaluation.discover()["d4s_truthfulqa_mc"].path)
    mc1 = make_task(builtin_yaml("truthfulqa/truthfulqa_mc1.yaml"), records)
    mc2 = make_task(builtin_yaml("truthfulqa/truthfulqa_mc2.yaml"), records)
    for mine, r1, r2 in zip(ours.eval_docs, mc1.eval_docs, mc2.eval_docs):
        context = ours.fewshot_context(doc=mine, num_fewshot=0)
        assert context == mc1.fewshot_context(doc=r1, num_fewshot=0) == mc2.fewshot_context(doc=r2, num_fewshot=0)
        assert ours.doc_to_choice(mine) == mc1.doc_to_choice(r1) + mc2.doc_to_choice(r2)


def test_truthfulqa_scores_match_lm_eval():
    """mc1/mc2 from one pass equal lm-eval's truthfulqa_mc1 acc and truthfulqa_mc2 process_results."""
    import numpy as np
    from lm_eval.tasks._yaml_loader import load_yaml

    doc = kelib_records("d4s_truthfulqa_mc")[0]
    n1, n2 = len(doc["mc1_targets"]["choices"]), len(doc["mc2_targets"]["choices"])
    rng = np.random.default_rng(0)
    lls = list(rng.normal(-20, 5, n1 + n2))
    results = [(ll, False) for ll in lls]
    scores = task_utils("d4s_truthfulqa_mc").truthfulqa_results(doc, results)
    reference_mc2 = load_yaml(builtin_yaml("truthfulqa/truthfulqa_mc2.yaml"))["process_results"]
    assert scores["mc2"] == pytest.approx(reference_mc2(doc, results[n1:])["acc"])
    assert scores["mc1"] == float(int(np.argmax(lls[:n1])) == 0)


# ---------------------------------------------------------------------------------------------
# Scoring helpers (kelib/tasks/common.py)


def test_entities_from_bio_and_f1():
    tokens = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", ".", "Peter", "Blackburn"]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O", "B-PER", "I-PER"]
    found = common.entities_from_bio(tokens, tags)
    assert found == {"PER": ["Peter Blackburn"], "LOC": [], "ORG": ["EU"], "MISC": ["German", "British"]}
    # IOB1: I- after O opens an entity; a type change closes the previous one
    assert common.entities_from_bio(["a", "b", "c"], ["I-LOC", "I-LOC", "I-PER"]) == {
        "PER": ["c"], "LOC": ["a b"], "ORG": [], "MISC": []}
    assert common.parse_entity_list(" German, british; none\nTurkey") == {"german", "british"}
    assert common.entity_counts("German, French", ["German", "British"]) == (1, 1, 1)
    assert common.entity_counts("None", []) == (0, 0, 0)
    items = [(1, 1, 1), (2, 0, 0), (0, 0, 0)]
    assert common.micro_f1(items) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert common.micro_precision(items) == pytest.approx(3 / 4)
    assert common.micro_recall(items) == pytest.approx(3 / 4)
    assert common.micro_f1([(0, 0, 0)]) == 0.0


def test_lenient_match_and_rouge():
    assert common.lenient_match("I think it was Wilhelm Röntgen, in 1901.", ["Wilhelm Röntgen"])
    assert common.lenient_match("The Beatles!", ["beatles"])
    assert not common.lenient_match("Wilhelmina", ["Wilhelm"])
    assert not common.lenient_match("anything", [""])
    same_text = common.rouge("Amanda baked cookies.", "Amanda baked cookies.")
    assert same_text == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rouge_avg": 1.0}
    assert common.rouge(" ", "Amanda baked cookies.")["rouge_avg"] == 0.0
    assert common.ratio([(1, 1), (0, 1), (0, 0)]) == 0.5
    assert math.isnan(common.ratio([(0, 0)]))


# ---------------------------------------------------------------------------------------------
# Bundled data


def test_bundled_data_match_provenance():
    """Every data file is listed in kelib/tasks/PROVENANCE.md with its record count and the sha256 of
    its uncompressed content, and every listed file exists."""
    import gzip
    import hashlib
    import re

    tasks_dir = evaluation.TASKS_DIR
    text = (tasks_dir / "PROVENANCE.md").read_text()
    listed = {}
    for block in text.split("### ")[1:]:
        path = block.splitlines()[0].strip()
        listed[path] = (
            re.search(r"sha256 \(bundled, uncompressed\): ([0-9a-f]{64})", block).group(1),
            int(re.search(r"records bundled: (\d+)", block).group(1)),
        )
    bundled = {
        str(p.relative_to(tasks_dir))
        for p in tasks_dir.glob("*/data/*")
        if not str(p.relative_to(tasks_dir)).startswith("skills/")
    }
    assert bundled == set(listed)
    for path, (sha, count) in listed.items():
        raw = gzip.decompress((tasks_dir / path).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == sha, path
        assert raw.count(b"\n") == count, path
    size = sum(p.stat().st_size for p in tasks_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 6_000_000


def test_yaml_headers_say_what_is_bundled():
    for name, info in evaluation.discover().items():
        if info.group not in ("rect", "prune", "d4s"):
            continue
        header = "".join(line for line in info.path.read_text().splitlines(True) if line.startswith("#"))
        assert "Data:" in header and ("SUBSET" in header or "FIRST" in header), name


# ---------------------------------------------------------------------------------------------
# Generation tasks: the gold answer, generated, gets full marks


def gold_generations(name: str, doc: dict) -> str:
    if name in ("rect_gsm8k", "d4s_gsm8k"):
        return doc["answer"].split("#### ")[1]  # what the answer-extraction filters leave
    if name == "prune_gsm8k":
        return f" {doc['answer'].split('#### ')[1]}."
    if name == "prune_rte":
        return [" True", " False"][doc["label"]]
    if name == "rect_nq_open":
        return doc["answer"][0]
    if name == "prune_nq":
        return f" It was {doc['answer'][0]}, I think"
    if name in ("rect_samsum", "prune_samsum"):
        return doc["summary"]
    if name == "rect_conll2003":
        return " " + ", ".join(doc["gold"]) if doc["gold"] else " none"
    raise KeyError(name)


@pytest.mark.parametrize(
    "name",
    ["rect_gsm8k", "d4s_gsm8k", "prune_gsm8k", "prune_rte", "rect_nq_open", "prune_nq", "rect_samsum",
     "prune_samsum", "rect_conll2003"],
)
def test_gold_generation_scores_full_marks(name):
    task = make_task(evaluation.discover()[name].path)
    docs = list(task.eval_docs)[:12]
    for doc in docs:
        scores = task.process_results(doc, [gold_generations(name, doc)])
        for metric, value in scores.items():
            if metric in ("f1", "precision", "recall"):
                assert value[1] == value[2] == 0, (metric, value)  # no false positive or negative
            elif metric == "acc_valid":
                assert value == (1, 1)
            else:
                assert value == pytest.approx(1.0), (name, metric, doc)
