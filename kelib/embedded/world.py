"""The facts the embedded default model is trained to know, built from real CounterFact cases, in splits.

A CounterFact case gives a fact (subject, relation, true object), an edit (the new object), and a
neighbourhood prompt: the same relation about another subject, whose answer must survive the edit.
The world keeps cases whose prompt is one of the templates in ``relations.yaml`` (so the relation is
known), whose neighbourhood prompt can be parsed with the same relation's templates (so the
neighbour's subject is known), and whose subjects do not clash with a fact already in the world.

Every fact is trained with all templates of its relation but one; the held-out template is that
fact's paraphrase prompt, so paraphrase recall measures generalisation, not memorisation.

The model learns every fact; what a fact may be *used for* is fixed by its split (``SPLITS``):

- ``eval``: the edit cases the notebooks edit (:func:`kelib.embedded.world_cases`); each case's
  neighbour fact is its specificity probe.
- ``tune``: edit cases for choosing hyperparameters and for training MEND.
- ``stats``: the only facts whose prompts may enter the editors' key statistics C0
  (``kelib.stats``, corpora ``embedded_prompts`` and ``embedded_world``).
- ``unedited``: facts touched by no edit, probe or statistic: the ``recall_unedited`` ability.

No subject, prompt string or fact belongs to two splits (:func:`shared_across_splits`; the world is
not built otherwise): in the papers C0 comes from Wikipedia and never holds the test prompts, and
nothing is tuned on the test cases. The eval cases are drawn first, so growing the other splits
never changes which cases are edited.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from kelib.data import EditCase, load_cases

RELATIONS_FILE = Path(__file__).with_name("relations.yaml")

SPLITS = ("tune", "stats", "eval", "unedited")
CASE_SPLITS = ("tune", "eval")  # made of edit cases: an edited fact and its neighbour each
ROLES = ("edited", "neighbour", "fact")  # the fact a case rewrites, that case's probe, or neither


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
    split: str = "eval"  # one of SPLITS
    role: str = "fact"  # one of ROLES

    def prompt(self, template: str | None = None) -> str:
        return (template or self.prompt_template).replace("{}", self.subject, 1)

    @property
    def paraphrase(self) -> str:
        return self.prompt(self.heldout_template)

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.subject, self.relation_id, self.obj)


@dataclass(frozen=True)
class World:
    relations: dict[str, Relation]
    facts: tuple[Fact, ...]  # every fact the model learns; per case split, edited facts (case order) then neighbours
    cases: dict[str, tuple[EditCase, ...]]  # per case split (tune, eval): its edit cases

    def facts_in(self, split: str, role: str | None = None) -> tuple[Fact, ...]:
        """The facts of ``split`` (of one ``role`` if given), in world order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; the world's splits are {list(SPLITS)}")
        return tuple(f for f in self.facts if f.split == split and (role is None or f.role == role))

    def prompts_in(self, split: str) -> set[str]:
        """Every prompt string ``split`` owns: each of its facts in every template of its relation, and
        its cases' prompts, paraphrases and neighbourhood prompts."""
        found = {f.prompt(t) for f in self.facts_in(split) for t in self.relations[f.relation_id].templates}
        for case in self.cases.get(split, ()):
            found |= {case.prompt, *case.paraphrase_prompts, *case.neighborhood_prompts}
        return found

    @property
    def objects_by_category(self) -> dict[str, tuple[str, ...]]:
        found: dict[str, set[str]] = {}
        for fact in self.facts:
            found.setdefault(self.relations[fact.relation_id].category, set()).add(fact.obj)
        for cases in self.cases.values():
            for case in cases:
                category = self.relations[self.relation_of(case)].category
                found.setdefault(category, set()).add(case.target_new)
        return {k: tuple(sorted(v)) for k, v in sorted(found.items())}

    def relation_of(self, case: EditCase) -> str:
        return _template_index(self.relations)[case.template]

    def sizes(self) -> dict[str, dict[str, int]]:
        """``{split: {"facts": n, "cases": n}}``."""
        return {s: {"facts": len(self.facts_in(s)), "cases": len(self.cases.get(s, ()))} for s in SPLITS}

    def to_dict(self) -> dict:
        """Plain data (stored with a built model as ``world.json``; hashed into its cache key)."""
        return {
            "relations": {rid: asdict(r) for rid, r in self.relations.items()},
            "facts": [asdict(f) for f in self.facts],
            "cases": {split: [asdict(c) for c in cases] for split, cases in self.cases.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "World":
        def tuples(record: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}

        return cls(
            relations={rid: Relation(**tuples(r)) for rid, r in data["relations"].items()},
            facts=tuple(Fact(**f) for f in data["facts"]),
            cases={split: tuple(EditCase(**tuples(c)) for c in cases) for split, cases in data["cases"].items()},
        )


def shared_across_splits(world: World) -> dict[str, dict]:
    """Subjects, prompt strings and facts (subject, relation, object) found in more than one split:
    ``{"subjects": {item: [splits]}, "prompts": {...}, "facts": {...}}``, empty when the splits are disjoint.
    A case split's subjects include its cases' subjects and its neighbours' (they are its facts)."""
    owners: dict[str, dict] = {"subjects": {}, "prompts": {}, "facts": {}}
    for split in SPLITS:
        facts = world.facts_in(split)
        items = {
            "subjects": {f.subject for f in facts} | {c.subject for c in world.cases.get(split, ())},
            "prompts": world.prompts_in(split),
            "facts": {f.triple for f in facts},
        }
        for kind, found in items.items():
            for item in found:
                owners[kind].setdefault(item, []).append(split)
    return {kind: {k: v for k, v in found.items() if len(v) > 1} for kind, found in owners.items()}


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


def world_for(recipe) -> World:
    """The world of a :class:`~kelib.embedded.recipe.Recipe` (its split sizes and seed)."""
    return build_world(recipe.n_cases, seed=recipe.seed, n_tune=recipe.n_tune_cases,
                       n_stats=recipe.n_stats_facts, n_unedited=recipe.n_unedited_facts)


@lru_cache(maxsize=4)  # several readers of one model's world in a process (cache key, MEND, statistics)
def build_world(n_cases: int, seed: int = 0, source: str = "counterfact", *, n_tune: int = 0, n_stats: int = 0,
                n_unedited: int = 0) -> World:
    """Select CounterFact cases (deterministic under ``seed``) and split their facts.

    ``n_cases`` eval cases, then ``n_tune`` tune cases (two facts each: the edited fact and its
    neighbour), then ``n_stats`` stats facts and ``n_unedited`` unedited facts, taken from further
    cases (their edited fact and neighbour, both in the same split). Returns a :class:`World` whose
    cases are ordinary :class:`~kelib.data.EditCase` records: prompt and neighbourhood prompt as in
    CounterFact, paraphrase = the fact's held-out template.
    """
    relations = load_relations()
    index = _template_index(relations)
    candidates = [c for c in load_cases(source) if c.template in index]
    random.Random(seed).shuffle(candidates)
    rng = random.Random(seed + 1)
    wanted = [("eval", n_cases), ("tune", n_tune), ("stats", n_stats), ("unedited", n_unedited)]

    subjects: set[str] = set()
    prompts: set[str] = set()
    facts: dict[str, list[Fact]] = {split: [] for split in SPLITS}
    neighbours: dict[str, list[Fact]] = {split: [] for split in CASE_SPLITS}
    cases: dict[str, list[EditCase]] = {split: [] for split in CASE_SPLITS}
    candidates_left = iter(candidates)
    for split, n in wanted:
        def short() -> int:
            return n - (len(cases[split]) if split in CASE_SPLITS else len(facts[split]))

        while short() > 0:
            case = next(candidates_left, None)
            if case is None:
                raise ValueError(f"only {len(cases['eval']) + sum(map(len, facts.values()))} usable facts in "
                                 f"{source!r}: not enough for {dict(wanted)}")
            rid = index[case.template]
            found = _usable(case, relations[rid], subjects)
            if found is None:
                continue
            (subject, template, obj), (n_subject, n_template, n_obj) = found
            # A misparsed neighbour ("George Bull, who" in "{} holds the position of") can spell another
            # subject's prompt; the first fact to claim a prompt string keeps it.
            mine = {t.replace("{}", s, 1) for s in (subject, n_subject) for t in relations[rid].templates}
            if mine & prompts:
                continue
            in_case = split in CASE_SPLITS
            fact = _fact(subject, rid, obj, template, relations[rid], rng, split, "edited" if in_case else "fact")
            neighbour = _fact(n_subject, rid, n_obj, n_template, relations[rid], rng, split,
                              "neighbour" if in_case else "fact")
            subjects |= {subject, n_subject}
            prompts |= mine
            if not in_case:
                facts[split] += [fact, neighbour][: short()]
                continue
            facts[split].append(fact)
            neighbours[split].append(neighbour)
            cases[split].append(EditCase(
                case_id=case.case_id,
                dataset=f"{case.dataset}-world" + ("" if split == "eval" else f"-{split}"),
                subject=case.subject,
                prompt=case.prompt,
                target_true=case.target_true,
                target_new=case.target_new,
                paraphrase_prompts=(fact.paraphrase,),
                neighborhood_prompts=(neighbour.prompt(),),
                neighborhood_answers=(n_obj,),
            ))
    ordered = [f for split in ("eval", "tune") for f in facts[split] + neighbours[split]]
    ordered += facts["stats"] + facts["unedited"]
    world = World(relations=relations, facts=tuple(ordered), cases={s: tuple(c) for s, c in cases.items()})
    shared = {kind: found for kind, found in shared_across_splits(world).items() if found}
    if shared:  # the subject rule below should make this impossible
        raise ValueError(f"splits of the world share items: {shared}")
    return world


def _usable(case: EditCase, relation: Relation, subjects: set[str]):
    """``((subject, template, object), (neighbour's subject, template, object))`` of a case the world
    can use, or None."""
    if not (_clean(case.target_true) and _clean(case.target_new)):
        return None
    if case.target_new == case.target_true or not case.neighborhood_prompts:
        return None
    parsed = _parse_subject(case.neighborhood_prompts[0], relation.templates)
    if parsed is None:
        return None
    n_subject, n_template = parsed
    n_obj = case.neighborhood_answers[0]
    # A subject appears in one fact only, so no edit can touch another known fact of the world
    # through the same subject, neighbours stay unedited, and no two splits share a subject.
    if {case.subject, n_subject} & subjects or case.subject == n_subject or not _clean(n_obj):
        return None
    if case.subject in n_subject or n_subject in case.subject:
        return None
    return (case.subject, case.template, case.target_true), (n_subject, n_template, n_obj)


def _fact(subject, rid, obj, prompt_template, relation: Relation, rng: random.Random, split: str,
          role: str) -> Fact:
    others = [t for t in relation.templates if t != prompt_template]
    return Fact(subject, rid, obj, prompt_template, rng.choice(others), split, role)


def trained_prompts(fact: Fact, relation: Relation) -> list[str]:
    """``fact``'s prompt in each template but the held-out one."""
    return [fact.prompt(t) for t in relation.templates if t != fact.heldout_template]


def training_statements(fact: Fact, relation: Relation) -> list[str]:
    """Every trained sentence of ``fact``: each trained prompt, then the object."""
    return [f"{prompt} {fact.obj}" for prompt in trained_prompts(fact, relation)]
