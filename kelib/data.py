"""Edit cases from CounterFact, ZsRE and MQuAKE in one record type, from bundled or cached files.

An :class:`EditCase` is one rewrite (subject, prompt, true -> new object) with the prompts that
measure it: paraphrases (should follow the edit) and neighbourhood prompts with their answers
(should not). Each source schema maps into it:

- CounterFact, EasyEdit schema (bundled, all 21,919 cases): one paraphrase, one neighbour.
- CounterFact, ROME schema (``counterfact_full``, online): two paraphrases, ten neighbours, whose
  answer is the rewrite's true object (as in ROME's evaluation).
- ZsRE (``src, answers, alt, rephrase, loc, loc_ans, subject``): target_true = ``answers[0]``,
  target_new = ``alt``, the neighbour is the NQ question ``loc`` with answer ``loc_ans``.
- MQuAKE: each requested rewrite is one case (paraphrase = its question, no neighbours); the
  multi-hop questions live in :class:`MultiHopCase`.

A record that is not a valid edit case raises :class:`DataError` naming it; nothing is skipped
silently. ``on_invalid="drop"`` drops such records with a logged warning that names each one.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kelib import paths
from kelib.io import atomic_path

log = logging.getLogger(__name__)

ON_INVALID = ("raise", "drop")


class DataError(ValueError):
    """A dataset that cannot be loaded, or a record that is not a valid edit case."""


@dataclass(frozen=True)
class EditCase:
    """One rewrite ``(subject, relation, target_true) -> target_new`` and its test prompts."""

    case_id: str  # "<source>/<id>", e.g. "counterfact/0"
    dataset: str  # the name it was loaded under, e.g. "counterfact_edit"
    subject: str
    prompt: str  # full text, contains the subject; the targets follow it after a space
    target_true: str
    target_new: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()  # other subjects, same relation: must not change
    neighborhood_answers: tuple[str, ...] = ()  # one per neighbourhood prompt

    def __post_init__(self):
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            if isinstance(getattr(self, name), list):  # records round-tripped through JSON
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problem = next((message for bad, message in self._checks() if bad), None)
        if problem:
            raise DataError(f"edit case {self.case_id}: {problem}")

    def _checks(self):
        """(is_bad, message) pairs, lazily: a later check may assume the earlier ones passed."""
        texts = (self.subject, self.prompt, self.target_true, self.target_new,
                 *self.paraphrase_prompts, *self.neighborhood_prompts, *self.neighborhood_answers)
        yield not all(isinstance(t, str) for t in texts), f"texts must be strings, got {texts!r}"
        yield not self.subject.strip(), "empty subject"
        in_prompt = self.subject in self.prompt
        yield not in_prompt, f"subject {self.subject!r} does not occur in prompt {self.prompt!r}"
        yield not self.target_new.strip(), f"empty target_new (prompt {self.prompt!r})"
        yield not self.target_true.strip(), f"empty target_true (prompt {self.prompt!r})"
        n, m = len(self.neighborhood_prompts), len(self.neighborhood_answers)
        yield n != m, f"{n} neighborhood prompts but {m} answers"

    @property
    def template(self) -> str:
        """The prompt with the first occurrence of the subject replaced by ``{}``."""
        return self.prompt.replace(self.subject, "{}", 1)


@dataclass(frozen=True)
class MultiHopCase:
    """An MQuAKE case: edits whose chain changes the answer of multi-hop questions."""

    case_id: str  # "mquake/<case_id>"
    edits: tuple[EditCase, ...]
    questions: tuple[str, ...]  # paraphrases of one multi-hop question
    answer: str  # before the edits
    answer_aliases: tuple[str, ...]
    new_answer: str  # after all edits
    new_answer_aliases: tuple[str, ...]

    def __post_init__(self):
        if not (self.edits and self.questions and self.answer.strip() and self.new_answer.strip()):
            raise DataError(f"multi-hop case {self.case_id}: needs edits, questions and answers")


@dataclass(frozen=True)
class _Source:
    schema: str  # easyedit | rome | zsre | mquake
    prefix: str  # of case ids
    files: tuple[str, ...]  # bundled, relative to kelib/bundled
    url: str | None  # online: downloaded once into the cache
    description: str


_CF = tuple(f"editing/counterfact-{split}.json.gz" for split in ("edit", "train", "val"))
_ROME = "https://rome.baulab.info/data/dsets/"
_MQUAKE = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/main/datasets/"
DATASETS: dict[str, _Source] = {
    "counterfact": _Source("easyedit", "counterfact", _CF, None, "all 21,919 CounterFact cases, "
                           "by case_id (EasyEdit schema: 1 paraphrase, 1 neighbour); bundled"),
    "counterfact_edit": _Source("easyedit", "counterfact", _CF[:1], None,
                                "CounterFact edit split, 10,000 cases; bundled"),
    "counterfact_train": _Source("easyedit", "counterfact", _CF[1:2], None,
                                 "CounterFact train split, 10,000 cases; bundled"),
    "counterfact_val": _Source("easyedit", "counterfact", _CF[2:], None,
                               "CounterFact val split, 1,919 cases; bundled"),
    "zsre": _Source("zsre", "zsre", ("editing/zsre_mend_eval_portability_gpt4.json.gz",), None,
                    "ZsRE, the 1,037 cases RECT edited; bundled"),
    "zsre_train": _Source("zsre", "zsre_train", ("editing/zsre_mend_train-1k.json.gz",), None,
                          "ZsRE train, 1,000 records (2 have an empty new target); bundled"),
    "mquake_hard": _Source("mquake", "mquake", ("editing/MQuAKE-hard.json.gz",), None,
                           "MQuAKE-hard: the 1,716 rewrites of 429 4-hop cases; bundled"),
    "counterfact_full": _Source("rome", "counterfact", (), _ROME + "counterfact.json",
                                "ROME's full CounterFact (2 paraphrases, 10 neighbours); online"),
    "zsre_full": _Source("zsre", "zsre_full", (), _ROME + "zsre_mem_eval.json",
                         "ROME's ZsRE evaluation set (19,086 cases); online"),
    "mquake_cf_3k": _Source("mquake", "mquake", (), _MQUAKE + "MQuAKE-CF-3k.json",
                            "MQuAKE-CF-3k: rewrites of 3,000 multi-hop cases; online"),
}


def available_datasets() -> dict[str, str]:
    """``{name: description}`` of every name :func:`load_cases` accepts."""
    return {name: src.description for name, src in DATASETS.items()}


def load_cases(name: str, limit: int | None = None, on_invalid: str = "raise") -> list[EditCase]:
    """Edit cases of dataset ``name`` (see :func:`available_datasets`), the first ``limit`` of them.

    Bundled names work offline. Online names are downloaded once into ``cache_dir("datasets")``;
    a file placed there by hand is used as is. ``on_invalid="drop"`` drops invalid records (with a
    warning naming them) instead of raising :class:`DataError`.
    """
    src = _source(name)
    records, where = _records_of(name, src)
    return _load(records, src.schema, src.prefix, name, where, limit, on_invalid)


def load_mquake(source: str | Path = "mquake_hard", limit: int | None = None,
                on_invalid: str = "raise") -> list[MultiHopCase]:
    """MQuAKE multi-hop cases from a dataset name (``mquake_hard``, ``mquake_cf_3k``) or a file."""
    if str(source) in DATASETS:
        name = str(source)
        if DATASETS[name].schema != "mquake":
            raise DataError(f"dataset {name!r} is not an MQuAKE dataset")
        records, where = _records_of(name, DATASETS[name])
    else:
        name, where, records = _stem(Path(source)), str(source), _read_records(Path(source))
    return _convert(records, _mquake, "mquake", name, where, limit, on_invalid)


def load_json_cases(path: str | Path, schema: str = "auto", dataset: str | None = None,
                    limit: int | None = None, on_invalid: str = "raise") -> list[EditCase]:
    """Edit cases from a user's JSON list (``.json``, ``.jsonl``, optionally ``.gz``).

    ``schema`` is one of easyedit, rome, zsre, mquake, or "auto" (detected from the first record's
    keys). Case ids are ``"<dataset>/<record's case_id or index>"``; ``dataset`` defaults to the
    file's stem.
    """
    path = Path(path)
    dataset = dataset or _stem(path)
    records = _read_records(path)
    if schema == "auto":
        schema = _detect_schema(records[0], f"{path} record 0") if records else "easyedit"
    if schema not in _CONVERTERS:
        raise DataError(f"unknown schema {schema!r}; choose from auto, {', '.join(_CONVERTERS)}")
    return _load(records, schema, dataset, dataset, str(path), limit, on_invalid)


def load_knowns(limit: int | None = None) -> list[dict[str, Any]]:
    """ROME's 1,209 known facts (``subject, prompt, attribute, template``...) for causal tracing."""
    return _read_records(_bundled("editing/known_1000.json.gz"))[:limit]


# --- schemas: record -> case. KeyError/TypeError: a malformed record; DataError: an invalid case.

def _easyedit(r: dict, index: int, prefix: str, dataset: str) -> EditCase:
    return EditCase(
        case_id=f"{prefix}/{r.get('case_id', index)}", dataset=dataset, subject=r["subject"],
        prompt=r["prompt"], target_true=r["ground_truth"], target_new=r["target_new"],
        paraphrase_prompts=(r["rephrase_prompt"],), neighborhood_prompts=(r["locality_prompt"],),
        neighborhood_answers=(r["locality_ground_truth"],),
    )


def _rewrite(rw: dict, case_id: str, dataset: str, paraphrases=(), neighbours=(), answers=()):
    """An EditCase from a ROME/MQuAKE ``requested_rewrite`` (prompt is a ``{}`` template)."""
    if "{}" not in rw["prompt"]:
        raise DataError(f"edit case {case_id}: prompt template {rw['prompt']!r} has no '{{}}'")
    return EditCase(
        case_id=case_id, dataset=dataset, subject=rw["subject"],
        prompt=rw["prompt"].replace("{}", rw["subject"], 1), target_true=rw["target_true"]["str"],
        target_new=rw["target_new"]["str"], paraphrase_prompts=tuple(paraphrases),
        neighborhood_prompts=tuple(neighbours), neighborhood_answers=tuple(answers),
    )


def _rome(r: dict, index: int, prefix: str, dataset: str) -> EditCase:
    rw = r["requested_rewrite"]
    neighbours = tuple(r["neighborhood_prompts"])
    # ROME scores neighbourhood prompts against the rewrite's own true object.
    return _rewrite(rw, f"{prefix}/{r.get('case_id', index)}", dataset, r["paraphrase_prompts"],
                    neighbours, (rw["target_true"]["str"],) * len(neighbours))


def _zsre(r: dict, index: int, prefix: str, dataset: str) -> EditCase:
    answers = r["answers"]
    return EditCase(
        case_id=f"{prefix}/{r.get('case_id', index)}", dataset=dataset, subject=r["subject"],
        prompt=r["src"], target_true=answers[0] if answers else "", target_new=r["alt"],
        paraphrase_prompts=(r["rephrase"],), neighborhood_prompts=(r["loc"],),
        neighborhood_answers=(r["loc_ans"],),
    )


def _mquake(r: dict, index: int, prefix: str, dataset: str) -> MultiHopCase:
    case_id = f"{prefix}/{r.get('case_id', index)}"
    edits = tuple(
        _rewrite(rw, f"{case_id}/{i}", dataset, (rw["question"],))
        for i, rw in enumerate(r["requested_rewrite"])
    )
    return MultiHopCase(
        case_id=case_id, edits=edits, questions=tuple(r["questions"]), answer=r["answer"],
        answer_aliases=tuple(r.get("answer_alias", ())), new_answer=r["new_answer"],
        new_answer_aliases=tuple(r.get("new_answer_alias", ())),
    )


_CONVERTERS: dict[str, Callable] = dict(easyedit=_easyedit, rome=_rome, zsre=_zsre, mquake=_mquake)


def _detect_schema(record: Any, where: str) -> str:
    keys = set(record) if isinstance(record, dict) else set()
    rewrite = record.get("requested_rewrite") if isinstance(record, dict) else None
    if isinstance(rewrite, (list, dict)):
        return "mquake" if isinstance(rewrite, list) else "rome"
    if {"src", "alt", "answers"} <= keys:
        return "zsre"
    if {"prompt", "subject", "target_new", "ground_truth"} <= keys:
        return "easyedit"
    raise DataError(
        f"{where}: cannot tell the schema from keys {sorted(keys)}; expected requested_rewrite "
        "(ROME/MQuAKE), src+alt+answers (ZsRE) or prompt+subject+target_new+ground_truth (EasyEdit)"
    )


def _convert(records, convert, prefix, dataset, where, limit, on_invalid) -> list:
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
    out, dropped = [], []
    for index, record in enumerate(records):
        if limit is not None and len(out) >= limit:
            break
        try:
            if not isinstance(record, dict):
                raise TypeError(f"expected an object, got {type(record).__name__}")
            out.append(convert(record, index, prefix, dataset))
        except DataError as e:
            if on_invalid == "raise":
                raise DataError(f"{where}, record {index}: {e} (load with on_invalid='drop' to "
                                "drop invalid records)") from None
            dropped.append(f"record {index} ({e})")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise DataError(f"{where}, record {index}: malformed {convert.__name__.strip('_')} "
                            f"record ({type(e).__name__}: {e})") from None
    if dropped:
        log.warning("%s: dropped %d invalid record(s): %s", where, len(dropped), "; ".join(dropped))
    return out


def _load(records, schema, prefix, dataset, where, limit, on_invalid) -> list[EditCase]:
    if schema != "mquake":
        return _convert(records, _CONVERTERS[schema], prefix, dataset, where, limit, on_invalid)
    cases = _convert(records, _mquake, prefix, dataset, where, None, on_invalid)
    return [edit for case in cases for edit in case.edits][:limit]  # each rewrite is a case


# --- files ---

def _source(name: str) -> _Source:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _records_of(name: str, src: _Source) -> tuple[list, str]:
    """The raw records of a dataset and a label of where they came from (for error messages)."""
    if src.url:
        path = _fetch(name, src)
        return _read_records(path), str(path)
    records = [r for f in src.files for r in _read_records(_bundled(f))]
    if len(src.files) > 1:  # several splits of one set: one order, by case id
        records.sort(key=lambda r: int(r["case_id"]))
    return records, f"bundled {name} ({', '.join(src.files)})"


def _bundled(relative: str) -> Path:
    try:
        return paths.bundled(*relative.split("/"))
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def _fetch(name: str, src: _Source) -> Path:
    """The cached copy of an online dataset, downloading it once (atomically) if missing."""
    path = paths.cache_dir("datasets") / src.url.rsplit("/", 1)[-1]
    if path.exists():
        return path
    flags = [f"{v}={os.environ[v]}" for v in ("KELIB_OFFLINE", "HF_HUB_OFFLINE")
             if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    reason = f"{flags[0]} is set" if flags else None
    if not flags:
        try:
            log.info("downloading %s to %s", src.url, path)
            with urllib.request.urlopen(src.url, timeout=60) as response, atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f)
                json.loads(tmp.read_bytes())  # a truncated download must not enter the cache
        except (OSError, http.client.HTTPException, ValueError) as e:
            reason = f"download failed ({type(e).__name__}: {e})"
    if reason:
        offline = [n for n, s in DATASETS.items() if not s.url]
        raise DataError(
            f"dataset {name!r} could not be fetched from {src.url}: {reason}. It would be cached "
            f"at {path}; you can place the file there by hand. Bundled datasets that work "
            f"offline: {', '.join(offline)}"
        )
    return path


def _read_records(path: Path) -> list:
    """A JSON list (or JSON lines) of records from ``path``, gzipped or not."""
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [_parse(line, f"{path}, line {n}") for n, line in lines]
    data = _parse(text, str(path))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None


def _stem(path: Path) -> str:
    """``cases`` for ``cases.json``, ``cases.jsonl.gz``, ..."""
    return path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
