"""kelib.data: bundled edit sets, schema mapping, provenance of the bundle, every way loading fails."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import urllib.error
import urllib.request

import pytest

from kelib import data, paths
from kelib.data import (
    DataError,
    EditCase,
    MultiHopCase,
    available_datasets,
    load_cases,
    load_json_cases,
    load_knowns,
    load_mquake,
)

ONLINE = ("counterfact_full", "zsre_full", "mquake_cf_3k")


def easyedit_record(**overrides) -> dict:
    record = {
        "case_id": 7,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux speaks",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    return record | overrides


def rome_record(**rewrite) -> dict:
    return {
        "case_id": 3,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "relation_id": "P103",
        }
        | rewrite,
        "paraphrase_prompts": ["Danielle Darrieux speaks", "Danielle Darrieux's language is"],
        "neighborhood_prompts": ["Michel Rocard speaks", "Jean Gabin speaks", "Jacques Chirac speaks"],
        "attribute_prompts": ["Tony Blair speaks"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


def three_records_second_invalid() -> list[dict]:
    second = easyedit_record(case_id=8, subject="Michel Rocard")  # not in the prompt
    return [easyedit_record(), second, easyedit_record(case_id=9)]


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty kelib cache for one test."""
    monkeypatch.setenv("KELIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- bundled sets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count",
    [
        ("counterfact", 21_919),
        ("counterfact_edit", 10_000),
        ("counterfact_train", 10_000),
        ("counterfact_val", 1_919),
        ("zsre", 1_037),
        ("mquake_hard", 429 * 4),
    ],
)
def test_bundled_counts(name, count):
    cases = load_cases(name)
    assert len(cases) == count
    assert len({c.case_id for c in cases}) == count  # ids are unique within a set
    assert all(c.dataset == name for c in cases)


def test_counterfact_is_all_splits_ordered_by_case_id():
    ids = [c.case_id for c in load_cases("counterfact")]
    assert ids == [f"counterfact/{i}" for i in range(21_919)]
    splits = set()
    for name in ("counterfact_edit", "counterfact_train", "counterfact_val"):
        splits |= {c.case_id for c in load_cases(name)}
    assert splits == set(ids)


def test_counterfact_case_0_field_mapping():
    case = load_cases("counterfact", limit=1)[0]
    assert case == EditCase(
        case_id="counterfact/0",
        dataset="counterfact",
        subject="Danielle Darrieux",
        prompt="The mother tongue of Danielle Darrieux is",
        target_true="French",
        target_new="English",
        paraphrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        neighborhood_prompts=("Michel Rocard is a native speaker of",),
        neighborhood_answers=("French",),
    )
    assert case.template == "The mother tongue of {} is"


def test_zsre_field_mapping():
    case = load_cases("zsre", limit=1)[0]
    assert case.case_id == "zsre/0"
    assert case.subject == "IAAF Combined Events Challenge"
    assert case.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (case.target_true, case.target_new) == ("1998", "2006")  # answers[0], alt
    assert case.paraphrase_prompts == ("When was the IAAF Combined Events Challenge launched?",)
    nq = "nq question: what is the name of the last episode of spongebob"
    assert case.neighborhood_prompts == (nq,)
    assert case.neighborhood_answers == ("The String",)


def test_mquake_multi_hop_cases():
    cases = load_mquake()
    assert len(cases) == 429
    assert all(isinstance(c, MultiHopCase) and len(c.edits) == 4 for c in cases)
    first = cases[0]
    assert first.case_id == "mquake/7417"
    assert (first.answer, first.new_answer) == ("English", "Arabic")
    assert "English language" in first.answer_aliases and "Arabic language" in first.new_answer_aliases
    assert len(first.questions) == 3
    hop = first.edits[1]
    assert hop.case_id == "mquake/7417/1"
    assert hop.prompt == "The director of Madonna is" and hop.template == "The director of {} is"
    assert (hop.target_true, hop.target_new) == ("Guy Oseary", "Narendra Modi")
    assert hop.paraphrase_prompts == ("Who is the director of Madonna?",)
    assert hop.neighborhood_prompts == hop.neighborhood_answers == ()
    # the flattened edit cases are exactly the multi-hop cases' edits, in order
    assert load_cases("mquake_hard", limit=6) == list(first.edits + cases[1].edits[:2])


def test_limit_takes_the_first_cases():
    assert [c.case_id for c in load_cases("counterfact", limit=3)] == [
        "counterfact/0", "counterfact/1", "counterfact/2"
    ]
    assert len(load_mquake(limit=5)) == 5
    # records past the limit are never looked at: zsre_train's invalid ones come later
    assert len(load_cases("zsre_train", limit=100)) == 100


def test_zsre_train_has_two_invalid_records(caplog):
    with pytest.raises(DataError, match=r"zsre_mend_train-1k.*record 534.*empty target_new"):
        load_cases("zsre_train")
    with caplog.at_level(logging.WARNING, logger="kelib.data"):
        cases = load_cases("zsre_train", on_invalid="drop")
    assert len(cases) == 998
    ids = {c.case_id for c in cases}
    assert "zsre_train/534" not in ids and "zsre_train/723" not in ids and "zsre_train/535" in ids
    assert "dropped 2 invalid record(s)" in caplog.text
    assert "record 534" in caplog.text and "record 723" in caplog.text


@pytest.mark.parametrize(
    "name, file, valid",
    [
        ("counterfact_edit", "counterfact-edit.json.gz", 10_000),
        ("counterfact_train", "counterfact-train.json.gz", 10_000),
        ("counterfact_val", "counterfact-val.json.gz", 1_919),
        ("zsre", "zsre_mend_eval_portability_gpt4.json.gz", 1_037),
        ("zsre_train", "zsre_mend_train-1k.json.gz", 998),
    ],
)
def test_only_zsre_train_has_invalid_records(name, file, valid):
    raw = json.loads(gzip.decompress((paths.BUNDLED_DIR / "editing" / file).read_bytes()))
    assert len(load_cases(name, on_invalid="drop")) == valid
    assert len(raw) - valid == (2 if name == "zsre_train" else 0)


def test_knowns():
    knowns = load_knowns()
    assert len(knowns) == 1_209
    assert knowns[0]["subject"] == "Vinson Massif" and knowns[0]["attribute"] == "Antarctica"


def test_available_datasets_lists_every_loadable_name():
    names = available_datasets()
    assert set(names) == {
        "counterfact", "counterfact_edit", "counterfact_train", "counterfact_val",
        "zsre", "zsre_train", "mquake_hard", *ONLINE,
    }
    assert all(isinstance(d, str) and d for d in names.values())
    assert all("online" in names[n] for n in ONLINE)


# --- provenance of the bundle -------------------------------------------------------------------


def provenance_entries() -> dict[str, dict]:
    """``{relative path: {"sha256": ..., "records": int}}`` from kelib/bundled/PROVENANCE.md."""
    text = (paths.BUNDLED_DIR / "PROVENANCE.md").read_text()
    entries = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        name = section.split("\n", 1)[0].strip()
        sha = re.search(r"sha256 \(uncompressed\): ([0-9a-f]{64})", section)
        records = re.search(r"- records: ([\d,]+)", section)
        entries[name] = {
            "sha256": sha and sha.group(1),
            "records": records and int(records.group(1).replace(",", "")),
        }
    return entries


def test_every_bundled_file_matches_its_provenance():
    entries = provenance_entries()
    files = sorted(
        str(p.relative_to(paths.BUNDLED_DIR))
        for folder in ("editing", "corpus")
        for p in (paths.BUNDLED_DIR / folder).iterdir()
    )
    assert len(files) == 8
    assert set(files) <= set(entries), f"no provenance for {set(files) - set(entries)}"
    for name in files:
        raw = gzip.decompress((paths.BUNDLED_DIR / name).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == entries[name]["sha256"], name
        count = entries[name]["records"]
        if name.endswith(".json.gz"):
            assert len(json.loads(raw)) == count, name
        else:
            assert raw.count(b"\n") == count, name  # the corpus: lines


def test_counterfact_easyedit_sha_is_the_original():
    # pinned here too, so an edit of PROVENANCE.md and the bundle together cannot pass unnoticed
    raw = gzip.decompress((paths.BUNDLED_DIR / "editing/counterfact-edit.json.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == (
        "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec"
    )


# --- failures name what failed ------------------------------------------------------------------


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError, match="unknown dataset 'counterfakt'") as err:
        load_cases("counterfakt")
    for name in available_datasets():
        assert name in str(err.value)


def test_missing_bundled_file_names_its_path(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(DataError) as err:
        load_cases("zsre")
    missing = tmp_path / "bundled" / "editing" / "zsre_mend_eval_portability_gpt4.json.gz"
    assert str(missing) in str(err.value)


def test_missing_user_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"dataset file not found: {tmp_path / 'nope.json'}")):
        load_json_cases(tmp_path / "nope.json")


def test_edit_case_validation_names_the_case():
    good = dict(
        case_id="x/1", dataset="x", subject="Paris", prompt="Paris is the capital of",
        target_true="France", target_new="Italy",
    )
    assert EditCase(**good).template == "{} is the capital of"
    twice = EditCase(**good | {"prompt": "Paris, not Paris in Texas, is the capital of"})
    assert twice.template == "{}, not Paris in Texas, is the capital of"  # first occurrence only
    with pytest.raises(DataError, match=r"edit case x/1: subject 'Rome' does not occur in prompt"):
        EditCase(**good | {"subject": "Rome"})
    with pytest.raises(DataError, match=r"edit case x/1: subject 'paris' does not occur"):
        EditCase(**good | {"subject": "paris"})  # casing matters: the subject's tokens are located
    with pytest.raises(DataError, match="edit case x/1: empty subject"):
        EditCase(**good | {"subject": ""})
    with pytest.raises(DataError, match="edit case x/1: empty target_new"):
        EditCase(**good | {"target_new": "  "})
    with pytest.raises(DataError, match="edit case x/1: empty target_true"):
        EditCase(**good | {"target_true": ""})
    with pytest.raises(DataError, match="edit case x/1: 2 neighborhood prompts but 1 answers"):
        EditCase(**good | {"neighborhood_prompts": ("a", "b"), "neighborhood_answers": ("c",)})
    with pytest.raises(DataError, match="edit case x/1: texts must be strings"):
        EditCase(**good | {"target_new": None})
    # lists (a record read back from JSON) become tuples, so the case stays hashable
    case = EditCase(**good | {"paraphrase_prompts": ["Paris, capital of"]})
    assert case.paraphrase_prompts == ("Paris, capital of",) and hash(case)


def test_invalid_record_in_user_file_names_file_and_index(tmp_path):
    path = write_json(tmp_path / "mine.json", three_records_second_invalid())
    with pytest.raises(DataError) as err:
        load_json_cases(path)
    message = str(err.value)
    assert str(path) in message and "record 1" in message and "mine/8" in message
    assert "on_invalid='drop'" in message

    path = write_json(tmp_path / "empty_target.json", [easyedit_record(target_new=" ")])
    expected = r"empty_target\.json, record 0: edit case empty_target/7: empty target_new"
    with pytest.raises(DataError, match=expected):
        load_json_cases(path)


def test_on_invalid_drop(tmp_path, caplog):
    path = write_json(tmp_path / "mine.json", three_records_second_invalid())
    with caplog.at_level(logging.WARNING, logger="kelib.data"):
        cases = load_json_cases(path, on_invalid="drop")
    assert [c.case_id for c in cases] == ["mine/7", "mine/9"]
    assert "dropped 1 invalid record(s)" in caplog.text and "record 1 (edit case mine/8" in caplog.text
    with pytest.raises(ValueError, match="on_invalid must be one of"):
        load_json_cases(path, on_invalid="skip")


def test_malformed_user_file(tmp_path):
    partial = {"prompt": "x", "subject": "x", "target_new": "y", "ground_truth": "z"}
    path = write_json(tmp_path / "bad.json", [easyedit_record(), partial])
    expected = r"bad\.json, record 1: malformed easyedit record \(KeyError: 'rephrase_prompt'\)"
    with pytest.raises(DataError, match=expected):
        load_json_cases(path)
    # malformed records are never dropped: the file is wrong, not one case
    with pytest.raises(DataError, match="record 1: malformed"):
        load_json_cases(path, on_invalid="drop")

    path = write_json(tmp_path / "strings.json", [easyedit_record(), "not a record"])
    with pytest.raises(DataError, match=r"strings\.json, record 1: malformed"):
        load_json_cases(path)

    path = write_json(tmp_path / "odd.json", [{"question": "?", "answer": "!"}])
    with pytest.raises(DataError, match=r"odd\.json record 0: cannot tell the schema"):
        load_json_cases(path)

    path = write_json(tmp_path / "dict.json", {"cases": []})
    with pytest.raises(DataError, match=r"dict\.json: expected a JSON list of records, got dict"):
        load_json_cases(path)

    (tmp_path / "broken.json").write_text('[{"prompt": ')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        load_json_cases(tmp_path / "broken.json")

    (tmp_path / "broken.jsonl").write_text(json.dumps(easyedit_record()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_json_cases(tmp_path / "broken.jsonl")

    with pytest.raises(DataError, match="unknown schema 'memit'"):
        load_json_cases(write_json(tmp_path / "ok.json", [easyedit_record()]), schema="memit")


# --- user files in each schema ------------------------------------------------------------------


def test_rome_schema_record(tmp_path):
    path = write_json(tmp_path / "rome.json", [rome_record()])
    (case,) = load_json_cases(path)  # schema detected from requested_rewrite being an object
    assert case.case_id == "rome/3" and case.dataset == "rome"
    assert case.prompt == "The mother tongue of Danielle Darrieux is"
    assert case.template == "The mother tongue of {} is"
    assert case.subject == "Danielle Darrieux"
    assert (case.target_true, case.target_new) == ("French", "English")
    assert case.paraphrase_prompts == ("Danielle Darrieux speaks", "Danielle Darrieux's language is")
    assert len(case.neighborhood_prompts) == 3
    assert case.neighborhood_answers == ("French",) * 3  # ROME: neighbours keep the true object
    assert load_json_cases(path, schema="rome", dataset="cf")[0].case_id == "cf/3"

    path = write_json(tmp_path / "notemplate.json", [rome_record(prompt="The mother tongue is")])
    with pytest.raises(DataError, match=r"notemplate\.json, record 0: .*has no '\{\}'"):
        load_json_cases(path)


def test_zsre_and_mquake_user_files(tmp_path):
    zsre = {
        "subject": "UniFirst", "src": "What is the product made by UniFirst?", "answers": ["uniform"],
        "alt": "drone", "rephrase": "What does UniFirst make?",
        "loc": "nq question: who?", "loc_ans": "me",
    }
    path = tmp_path / "z.jsonl.gz"
    lines = [json.dumps(zsre), json.dumps(zsre | {"answers": []})]  # the second has no true answer
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataError, match=r"record 1: edit case z/1: empty target_true"):
        load_json_cases(path)
    (case,) = load_json_cases(path, on_invalid="drop")
    assert (case.case_id, case.target_true, case.target_new) == ("z/0", "uniform", "drone")

    raw = json.loads(gzip.decompress((paths.BUNDLED_DIR / "editing/MQuAKE-hard.json.gz").read_bytes()))
    path = write_json(tmp_path / "mq.json", raw[:2])
    assert [c.case_id for c in load_mquake(path)] == ["mquake/7417", f"mquake/{raw[1]['case_id']}"]
    flat = load_json_cases(path)
    assert len(flat) == 8 and flat[0].case_id == "mq/7417/0" and flat[0].target_new == "Madonna"
    with pytest.raises(DataError, match="not an MQuAKE dataset"):
        load_mquake("zsre")


# --- online datasets ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ONLINE)
def test_online_dataset_while_offline(name, cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not touch the network while offline")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("KELIB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_cases(name)
    message = str(err.value)
    filename = data.DATASETS[name].url.rsplit("/", 1)[-1]
    assert str(cache / "datasets" / filename) in message
    assert "could not be fetched" in message and "by hand" in message
    assert "counterfact_edit" in message and "zsre" in message  # what works offline
    assert not (cache / "datasets" / filename).exists()


def test_online_dataset_placed_by_hand_is_used_offline(cache, monkeypatch):
    monkeypatch.setenv("KELIB_OFFLINE", "1")
    records = [rome_record(), rome_record() | {"case_id": 4}]
    write_json(paths.cache_dir("datasets") / "counterfact.json", records)
    cases = load_cases("counterfact_full")
    assert [c.case_id for c in cases] == ["counterfact/3", "counterfact/4"]
    assert cases[0].neighborhood_answers == ("French",) * 3 and cases[0].dataset == "counterfact_full"


def test_online_dataset_downloaded_once(cache, monkeypatch):
    for var in ("KELIB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(json.dumps([rome_record()]).encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert load_cases("counterfact_full")[0].case_id == "counterfact/3"
    assert load_cases("counterfact_full")[0].case_id == "counterfact/3"
    assert calls == ["https://rome.baulab.info/data/dsets/counterfact.json"]  # then the cache
    assert sorted(p.name for p in (cache / "datasets").iterdir()) == ["counterfact.json"]


def test_failed_or_truncated_download_leaves_no_cache_file(cache, monkeypatch):
    for var in ("KELIB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    expected = r"download failed \(URLError.*zsre_mem_eval\.json; you can place"
    with pytest.raises(DataError, match=expected):
        load_cases("zsre_full")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b'[{"src": "trunc'))
    with pytest.raises(DataError, match="download failed"):
        load_cases("zsre_full")
    assert list((cache / "datasets").iterdir()) == []
