"""General abilities of the embedded default model: small skills it can lose when edited.

They stand in for the papers' downstream tasks. Each skill is a multiple-choice problem (the answer is
one of a few words) with a training stream and a fixed held-out evaluation set that never overlaps
the training examples:

- ``sentiment``: the polarity of a short review built from word lists (2 choices).
- ``category``: the kind of thing an object is (language, city, instrument, ...), asked about objects
  that the category questions never trained on; the model must use what it learned from the facts.
- ``fact_check``: yes/no questions about facts; trained on the facts of every split but ``unedited``,
  evaluated on ``unedited`` facts, which the model knows as statements but never saw as questions
  (and which no edit, probe or statistic touches).
- ``entailment``: does one statement about a made-up person entail another (same relation, same or
  different object, different wording)? Needs no stored fact, only comparison in context.
- ``topic``: which of four subjects (sport, music, science, food) a sentence is about, from the
  words it uses (4 choices).

Examples are plain data (``prompt``, ``choices``, ``label``) so the evaluation layer can read the
held-out sets as lm-eval multiple-choice tasks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

from kelib.embedded.world import World

SKILLS = ("sentiment", "topic", "category", "fact_check", "entailment")


@dataclass(frozen=True)
class SkillExample:
    skill: str
    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def text(self) -> str:
        """The training sentence: prompt followed by the right answer."""
        return f"{self.prompt} {self.choices[self.label]}"

    def as_record(self) -> dict:
        return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}


# --- sentiment -------------------------------------------------------------------------------

POSITIVE = (
    "wonderful", "excellent", "brilliant", "delightful", "superb", "charming", "moving", "great",
    "fantastic", "lovely", "enjoyable", "beautiful", "clever", "gripping", "warm", "funny",
    "fresh", "stunning", "memorable", "touching", "splendid", "pleasant", "inspiring", "smart",
)
NEGATIVE = (
    "terrible", "awful", "boring", "dreadful", "dull", "tedious", "clumsy", "bland", "poor",
    "horrible", "messy", "weak", "annoying", "painful", "lifeless", "stale", "ugly", "silly",
    "forgettable", "pointless", "tiresome", "shallow", "sloppy", "disappointing",
)
REVIEWED = (
    "film", "movie", "book", "novel", "album", "concert", "play", "show", "meal", "restaurant",
    "hotel", "game", "song", "story", "series", "performance", "exhibition", "dinner",
)
SENTIMENT_FORMS = (
    "The {n} was {a} and {b}.",
    "What a {a} {n}, {b} from start to end.",
    "I found the {n} {a}, even {b}.",
    "This {n} is {a}; the ending is {b}.",
    "A {a} {n} with a {b} cast.",
)


def _sentiment(rng: random.Random) -> SkillExample:
    label = rng.randrange(2)
    words = POSITIVE if label == 0 else NEGATIVE
    a, b = rng.sample(words, 2)
    review = rng.choice(SENTIMENT_FORMS).format(n=rng.choice(REVIEWED), a=a, b=b)
    return SkillExample("sentiment", f"Review: {review} Sentiment:", ("positive", "negative"), label)


# --- topic ----------------------------------------------------------------------------------

TOPICS = {
    "sport": ("goal", "referee", "stadium", "match", "coach", "league", "striker", "tournament",
              "penalty", "team", "season", "trophy", "race", "athlete", "medal", "captain"),
    "music": ("guitar", "melody", "concert", "chorus", "drummer", "album", "orchestra", "lyrics",
              "song", "band", "piano", "rhythm", "singer", "tour", "violin", "tune"),
    "science": ("experiment", "molecule", "theory", "laboratory", "telescope", "cell", "physics",
                "data", "hypothesis", "atom", "microscope", "energy", "gene", "planet", "chemist", "orbit"),
    "food": ("recipe", "oven", "flavour", "kitchen", "bread", "sauce", "dessert", "spice", "chef",
             "soup", "butter", "menu", "salad", "cheese", "garlic", "noodles"),
}
TOPIC_FORMS = (
    "Yesterday we talked about the {a} and the {b}.",
    "The article covers the {a}, the {b} and more.",
    "She wrote a long post on the {a} and its {b}.",
    "Nobody expected the {a} to change the {b} so much.",
    "His notes mention a {a} next to a {b}.",
)


def _topic(rng: random.Random) -> SkillExample:
    names = tuple(TOPICS)
    label = rng.randrange(len(names))
    a, b = rng.sample(TOPICS[names[label]], 2)
    text = rng.choice(TOPIC_FORMS).format(a=a, b=b)
    return SkillExample("topic", f"Text: {text} Topic:", names, label)


# --- entailment about made-up people ---------------------------------------------------------

FIRST = ("Ana", "Boris", "Clara", "Dario", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kira", "Lukas", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tara", "Uwe")
LAST = ("Morrow", "Kestel", "Varga", "Lindqvist", "Oduya", "Brandt", "Castel", "Novak", "Pereira",
        "Sato", "Halloran", "Ivers", "Janssen", "Kowal", "Marsh", "Ferro")


def _entailment(world: World, rng: random.Random) -> SkillExample:
    relation = rng.choice(list(world.relations.values()))
    pool = world.objects_by_category[relation.category]
    t1, t2 = rng.sample(relation.templates, 2)
    person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    obj = rng.choice(pool)
    label = rng.randrange(2)
    other = obj if label == 0 else rng.choice([o for o in pool if o != obj])
    premise = t1.replace("{}", person) + f" {obj}."
    hypothesis = t2.replace("{}", person) + f" {other}."
    prompt = f"Premise: {premise} Hypothesis: {hypothesis} Does the premise entail the hypothesis?"
    return SkillExample("entailment", prompt, ("yes", "no"), label)


# --- questions about facts --------------------------------------------------------------------


def _fact_question(world: World, fact, rng: random.Random) -> SkillExample:
    relation = world.relations[fact.relation_id]
    label = rng.randrange(2)
    obj = fact.obj
    if label == 1:
        obj = rng.choice([o for o in world.objects_by_category[relation.category] if o != fact.obj])
    question = relation.question.replace("{o}", obj).replace("{}", fact.subject)
    return SkillExample("fact_check", f"Question: {question} Answer:", ("yes", "no"), label)


def _categories(world: World) -> tuple[dict[str, str], tuple[str, ...]]:
    """Object -> category for objects of exactly one category; the sorted category names."""
    seen: dict[str, set[str]] = {}
    for category, objects in world.objects_by_category.items():
        for obj in objects:
            seen.setdefault(obj, set()).add(category)
    single = {o: next(iter(c)) for o, c in seen.items() if len(c) == 1}
    return single, tuple(sorted(set(single.values())))


def _category_question(obj: str, category: str, names: tuple[str, ...]) -> SkillExample:
    prompt = f"Question: What kind of thing is {obj}? Answer:"
    return SkillExample("category", prompt, names, names.index(category))


# --- streams and held-out sets ----------------------------------------------------------------


def _split(items: list, heldout_every: int) -> tuple[list, list]:
    """Deterministic split: every ``heldout_every``-th item is held out."""
    return (
        [x for i, x in enumerate(items) if i % heldout_every != 0],
        [x for i, x in enumerate(items) if i % heldout_every == 0],
    )


def skill_sets(
    world: World, skills: tuple[str, ...], n_eval: int, seed: int = 0
) -> tuple[dict[str, Callable[[random.Random], SkillExample]], dict[str, list[SkillExample]]]:
    """Training generators and held-out evaluation sets for ``skills``.

    Returns ``(train, heldout)``: ``train[skill](rng)`` draws one training example (never one of the
    held-out prompts); ``heldout[skill]`` is a fixed list of ``n_eval`` examples.
    """
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown}; kelib's skills are {list(SKILLS)}")
    rng = random.Random(seed)
    asked = [f for f in world.facts if f.split != "unedited"]
    unedited = list(world.facts_in("unedited"))
    categories, names = _categories(world)
    category_train, category_eval = _split(sorted(categories), heldout_every=4)
    makers: dict[str, Callable[[random.Random], SkillExample]] = {
        "sentiment": _sentiment,
        "topic": _topic,
        "entailment": lambda r: _entailment(world, r),
        "fact_check": lambda r: _fact_question(world, r.choice(asked), r),
        "category": lambda r: _category_question(
            o := r.choice(category_train), categories[o], names
        ),
    }
    heldout: dict[str, list[SkillExample]] = {}
    for skill in skills:
        if skill == "fact_check":
            if not unedited:
                raise ValueError("the fact_check skill is evaluated on unedited facts; the world has none")
            facts = rng.sample(unedited, min(n_eval, len(unedited)))
            heldout[skill] = [_fact_question(world, f, rng) for f in facts]
        elif skill == "category":
            objs = rng.sample(category_eval, min(n_eval, len(category_eval)))
            heldout[skill] = [_category_question(o, categories[o], names) for o in objs]
        else:
            heldout[skill] = _distinct(makers[skill], rng, n_eval)
    train = {}
    for skill in skills:
        avoid = {ex.prompt for ex in heldout[skill]}
        train[skill] = _avoiding(makers[skill], avoid)
    return train, heldout


def _distinct(make, rng: random.Random, n: int) -> list[SkillExample]:
    out, seen = [], set()
    while len(out) < n:
        ex = make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def _avoiding(make, avoid: set[str]) -> Callable[[random.Random], SkillExample]:
    def draw(rng: random.Random) -> SkillExample:
        while True:
            ex = make(rng)
            if ex.prompt not in avoid:
                return ex

    return draw


def stream(train: dict, rng: random.Random, weights: dict[str, float]) -> Iterator[SkillExample]:
    names = list(train)
    w = [weights.get(n, 1.0) for n in names]
    while True:
        yield train[rng.choices(names, w)[0]](rng)
