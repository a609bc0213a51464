"""The facts the embedded default model is trained to know, built from real CounterFact cases.

A CounterFact case gives a fact (subject, relation, true object), an edit (the new object), and a
neighbourhood prompt: the same relation about another subject, whose answer must survive the edit.
The world keeps cases whose prompt is one of the templates in ``relations.yaml`` (so the relation is
known), whose neighbourhood prompt can be parsed with the same relation's templates (so the
neighbour's subject is known), and whose subjects do not clash with a fact already in the world.

Every fact is trained with all templates of its relation but one; the held-out template is that
fact's paraphrase prompt, so paraphrase recall measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from kelib.data import EditCase, load_cases

RELATIONS_FILE = Path(__file__).with_name("relations.yaml")


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    category: str
    templates: tuple[str, ...]
    question: str


@dataclass(frozen=True)
class Fact:
    """One true fact and how the model sees it."""

    subject: str
    relation_id: str
    obj: str
    prompt_template: str  # the template of the CounterFact prompt (trained)
    heldout_template: str  # never trained for this subject: its paraphrase prompt

    def prompt(self, template: str | None = None) -> str:
        return (template or self.prompt_template).replace("{}", self.subject, 1)

    @property
    def paraphrase(self) -> str:
        return self.prompt(self.heldout_template)


@dataclass(frozen=True)
class World:
    relations: dict[str, Relation]
    facts: tuple[Fact, ...]  # main facts first (one per edit case, same order), then neighbours
    cases: tuple[EditCase, ...]  # edit cases whose prompts, paraphrases and neighbours the model knows

    @property
    def objects_by_category(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, set[str]] = {}
        for fact in self.facts:
            found.setdefault(self.relations[fact.relation_id].category, set()).add(fact.obj)
        for case in self.cases:
            category = self.relations[self.relation_of(case)].category
            found.setdefault(category, set()).add(case.target_new)
        return {k: tuple(sorted(v)) for k, v in sorted(found.items())}

    def relation_of(self, case: EditCase) -> str:
        return _template_index(self.relations)[case.template]


@lru_cache(maxsize=1)
def load_relations() -> dict[str, Relation]:
    raw = yaml.safe_load(RELATIONS_FILE.read_text())
    return {
        rid: Relation(rid, r["name"], r["category"], tuple(r["templates"]), r["question"])
        for rid, r in raw.items()
    }


def _template_index(relations: dict[str, Relation]) -> dict[str, str]:
    index: dict[str, str] = {}
    for rid, relation in relations.items():
        for template in relation.templates:
            if template in index:
                raise ValueError(f"template {template!r} is listed under {index[template]} and {rid}")
            index[template] = rid
    return index


def _parse_subject(prompt: str, templates: tuple[str, ...]) -> tuple[str, str] | None:
    """(subject, template) when ``prompt`` is one of ``templates`` filled with some subject."""
    for template in sorted(templates, key=len, reverse=True):
        head, tail = template.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail):
            subject = prompt[len(head) : len(prompt) - len(tail)]
            if subject and subject.strip() == subject:
                return subject, template
    return None


def _clean(obj: str) -> bool:
    return 0 < len(obj) <= 24 and obj.strip() == obj and len(obj.split()) <= 2


def build_world(n_cases: int, seed: int = 0, source: str = "counterfact") -> World:
    """Select ``n_cases`` CounterFact cases (deterministic under ``seed``) and their facts.

    Returns a :class:`World` whose ``cases`` are ordinary :class:`~kelib.data.EditCase` records:
    prompt and neighbourhood prompt as in CounterFact, paraphrase = the fact's held-out template.
    """
    relations = load_relations()
    index = _template_index(relations)
    candidates = [c for c in load_cases(source) if c.template in index]
    random.Random(seed).shuffle(candidates)
    rng = random.Random(seed + 1)

    known: dict[tuple[str, str], str] = {}  # (subject, relation) -> object
    subjects: set[str] = set()
    main: list[Fact] = []
    neighbours: list[Fact] = []
    cases: list[EditCase] = []
    for case in candidates:
        if len(cases) == n_cases:
            break
        rid = index[case.template]
        relation = relations[rid]
        if not (_clean(case.target_true) and _clean(case.target_new)):
            continue
        if case.target_new == case.target_true or not case.neighborhood_prompts:
            continue
        parsed = _parse_subject(case.neighborhood_prompts[0], relation.templates)
        if parsed is None:
            continue
        n_subject, n_template = parsed
        n_obj = case.neighborhood_answers[0]
        # A subject appears in one fact only, so no edit can touch another known fact of the world
        # through the same subject, and neighbours stay unedited.
        if {case.subject, n_subject} & subjects or case.subject == n_subject or not _clean(n_obj):
            continue
        if case.subject in n_subject or n_subject in case.subject:
            continue
        fact = _fact(case.subject, rid, case.target_true, case.template, relation, rng)
        neighbour = _fact(n_subject, rid, n_obj, n_template, relation, rng)
        for f in (fact, neighbour):
            known[(f.subject, rid)] = f.obj
            subjects.add(f.subject)
        main.append(fact)
        neighbours.append(neighbour)
        cases.append(
            EditCase(
                case_id=case.case_id,
                dataset=f"{case.dataset}-world",
                subject=case.subject,
                prompt=case.prompt,
                target_true=case.target_true,
                target_new=case.target_new,
                paraphrase_prompts=(fact.paraphrase,),
                neighborhood_prompts=(neighbour.prompt(),),
                neighborhood_answers=(n_obj,),
            )
        )
    if len(cases) < n_cases:
        raise ValueError(f"only {len(cases)} usable cases in {source!r}, asked for {n_cases}")
    return World(relations=relations, facts=tuple(main + neighbours), cases=tuple(cases))


def _fact(subject, rid, obj, prompt_template, relation: Relation, rng: random.Random) -> Fact:
    others = [t for t in relation.templates if t != prompt_template]
    return Fact(subject, rid, obj, prompt_template, rng.choice(others))


def trained_prompts(fact: Fact, relation: Relation) -> list[str]:
    """``fact``'s prompt in each template but the held-out one."""
    return [fact.prompt(t) for t in relation.templates if t != fact.heldout_template]


def training_statements(fact: Fact, relation: Relation) -> list[str]:
    """Every trained sentence of ``fact``: each trained prompt, then the object."""
    return [f"{prompt} {fact.obj}" for prompt in trained_prompts(fact, relation)]
