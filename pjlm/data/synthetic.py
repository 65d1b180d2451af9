"""A synthetic corpus of short English reviews (restaurants, products, movies, hotels).

Every review comes from the small hand-written grammar below (no dataset is copied). A review first
draws a latent mood -- positive, negative or mixed -- which drives its adjectives, verbs, "but"
clauses, negations and verdict, so the corpus has consistent, learnable structure and a wide spread
of sentiment: under VADER about half the documents score a compound above +0.05 and over 40% below
-0.05 (measured on seeds 0-9, 1000 documents each).

Guarantees:
* Deterministic on every machine and Python version: document ``i`` of ``seed`` is drawn from its
  own ``random.Random``, seeded with an integer derived by SHA-256 from ``(seed, i)``, using only
  ``Random.random()`` (whose sequence Python promises not to change); no global RNG state, no set
  or hash-ordered iteration. So prefixes agree: ``generate(n, seed)[:k] == generate(k, seed)``.
* Every document is 10-80 words, and every word in it (lowercased, punctuation and digits dropped)
  is in ``vocabulary()``.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence, TypeVar

T = TypeVar("T")

MIN_WORDS, MAX_WORDS = 10, 80
POSITIVE, NEGATIVE, MIXED = 1, -1, 0  # a review's latent mood; a clause's polarity is +1 or -1

STRONG_POSITIVE = (
    "great", "excellent", "amazing", "wonderful", "fantastic", "lovely", "perfect", "good", "nice", "awesome",
    "brilliant", "impressive", "pleasant", "superb", "outstanding", "terrific", "gorgeous", "enjoyable",
    "satisfying", "beautiful",
)
STRONG_NEGATIVE = (
    "bad", "terrible", "awful", "horrible", "disappointing", "poor", "annoying", "dull", "unpleasant",
    "useless", "pathetic", "disgusting", "lousy", "frustrating", "messy", "boring", "weak",
)
NEGATABLE_NEGATIVE = ("bad", "boring", "disappointing", "annoying", "terrible", "awful", "unpleasant")
NEGATABLE_POSITIVE = ("good", "great", "nice", "pleasant", "impressive", "enjoyable", "satisfying")
MILD_POSITIVE = ("decent", "fine", "okay", "solid", "fair", "reasonable")
MILD_NEGATIVE = ("mediocre", "forgettable", "underwhelming", "uneven", "tired", "sloppy")
NEUTRAL_ADJECTIVES = (
    "average", "ordinary", "standard", "typical", "simple", "plain", "basic", "normal", "predictable",
    "small", "large", "long", "short", "quick", "usual", "modest",
)
INTENSIFIERS = ("very", "really", "extremely", "quite", "truly", "incredibly", "absolutely", "so")
SOFTENERS = ("somewhat", "a bit", "slightly", "fairly", "rather", "a little")
NEGATIONS = ("not", "never")
POSITIVE_VERBS = ("loved", "enjoyed", "liked", "adored", "appreciated", "was impressed by", "was happy with")
NEGATIVE_VERBS = ("hated", "disliked", "could not stand", "was disappointed by", "was annoyed by")
POSITIVE_ADVERBS = ("perfectly", "wonderfully", "beautifully", "nicely", "carefully", "well")
NEGATIVE_ADVERBS = ("badly", "terribly", "horribly", "poorly", "carelessly", "sloppily")
POSITIVE_CONNECTIVES = ("Luckily", "Thankfully", "Best of all", "Honestly", "On top of that")
NEGATIVE_CONNECTIVES = ("Unfortunately", "Sadly", "Worse", "To make it worse", "On top of that")
NEUTRAL_CONNECTIVES = ("Also", "Overall", "Still", "In the end", "To be fair", "Then again")
ARTICLES, BE_FORMS, DETERMINERS = ("a", "an"), ("was", "were"), ("the", "this")

# Templates. {s}: subject, {be}: was/were, {a} {b}: adjective phrases, {o}: object, {v}: verb, {x}: adverb,
# {p}: participle, {e}: experience noun, {art}: a/an, {r}: the domain's "come back", {n}: a number.
ATTRIBUTE = "{s} {be} {a}"
NEGATED = "{s} {be} {neg} {a}"
NEGATED_AT_ALL = "{s} {be} {neg} {a} at all"
PAIR = "{s} {be} {a} and {b}"
VERB = "I {v} {o}"
EXPERIENCE = "it was {art} {a} {e}"
ADVERB = "everything was {x} {p}"
BUT = "{first}, but {second}"
AND = "{first}, and {second}"
CONNECTED = "{c}, {sentence}"
POSITIVE_CLOSINGS = (
    "I would definitely recommend it", "I would recommend it to anyone", "I will {r} soon",
    "highly recommended", "I give it {n} out of 5 stars", "worth every penny",
)
NEGATIVE_CLOSINGS = (
    "I would not recommend it", "I will never {r}", "avoid it if you can", "what a waste of money",
    "I give it {n} out of 5 stars", "never again",
)
MIXED_CLOSINGS = (
    "it was okay overall", "not bad, not great", "I give it 3 out of 5 stars", "maybe I will {r}, maybe not",
    "it is fine if you keep your expectations low",
)
# Every list and template above; `vocabulary()` reads its words from these and the domains below.
_GRAMMAR = (
    STRONG_POSITIVE, STRONG_NEGATIVE, NEGATABLE_NEGATIVE, NEGATABLE_POSITIVE, MILD_POSITIVE, MILD_NEGATIVE,
    NEUTRAL_ADJECTIVES, INTENSIFIERS, SOFTENERS, NEGATIONS, POSITIVE_VERBS, NEGATIVE_VERBS, POSITIVE_ADVERBS,
    NEGATIVE_ADVERBS, POSITIVE_CONNECTIVES, NEGATIVE_CONNECTIVES, NEUTRAL_CONNECTIVES, ARTICLES, BE_FORMS,
    DETERMINERS, POSITIVE_CLOSINGS, NEGATIVE_CLOSINGS, MIXED_CLOSINGS,
    (ATTRIBUTE, NEGATED, NEGATED_AT_ALL, PAIR, VERB, EXPERIENCE, ADVERB, BUT, AND, CONNECTED),
)


@dataclass(frozen=True)
class Group:
    """Nouns a review can talk about, with the adjectives that fit them."""

    nouns: tuple[tuple[str, bool], ...]  # (noun phrase, is plural), as in "the fries"
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class Domain:
    """What one kind of review talks about. `groups[0]` holds the thing reviewed ("this phone")."""

    groups: tuple[Group, ...]
    participles: tuple[str, ...]  # as in "everything was nicely {cooked}"
    experiences: tuple[str, ...]  # as in "it was a lovely {meal}"
    positive_actions: tuple[str, ...]  # whole clauses; {n} is 2 to 9
    negative_actions: tuple[str, ...]
    facts: tuple[tuple[str, int, int], ...]  # neutral clause, and the range of its {n}
    come_back: str


def _group(singular: str, plural: str, positive: str, negative: str) -> Group:
    """A group from comma-separated lists (`plural` may be empty)."""
    nouns = tuple((w, False) for w in singular.split(",")) + tuple((w, True) for w in plural.split(",") if w)
    return Group(nouns, tuple(positive.split(",")), tuple(negative.split(",")))


RESTAURANT = Domain(
    groups=(
        _group("place,restaurant,cafe,bistro,diner", "", "cozy,charming,relaxed,lively",
               "cramped,noisy,gloomy,crowded"),
        _group("pasta,pizza,soup,salad,steak,burger,dessert,bread,fish,curry,food",
               "fries,noodles,portions", "delicious,tasty,fresh,flavorful,crispy,tender,generous",
               "bland,cold,soggy,greasy,stale,salty,burnt,overcooked"),
        _group("staff,waiter,waitress,service,manager", "", "friendly,attentive,polite,welcoming,helpful",
               "rude,slow,careless,unfriendly,inattentive,pushy"),
        _group("coffee,wine,bill,menu", "drinks,prices", "reasonable,fair,varied",
               "overpriced,limited,outrageous"),
    ),
    participles=("cooked", "prepared", "served", "seasoned", "presented"),
    experiences=("meal", "dinner", "lunch", "evening", "night out"),
    positive_actions=("every dish tasted great", "the waiter made us feel welcome",
                      "we had a lovely time", "there was hardly any wait"),
    negative_actions=("the food arrived cold", "our order was wrong twice",
                      "the waiter ignored us", "the table was dirty"),
    facts=(("I waited {n} minutes for a table", 5, 45), ("we came here for a birthday dinner", 0, 0),
           ("the bill came to {n} dollars for two", 20, 120), ("we ordered {n} dishes to share", 2, 6),
           ("there was hardly anyone else there", 0, 0), ("we sat outside on a Friday night", 0, 0)),
    come_back="come back",
)
PRODUCT = Domain(
    groups=(
        _group("phone,laptop,tablet,camera,speaker,headset,smartwatch,console", "",
               "sturdy,sleek,fast,reliable,light,durable", "flimsy,slow,heavy,faulty,clunky,unreliable"),
        _group("screen,display,sound,microphone", "", "bright,sharp,crisp,clear,loud",
               "dim,blurry,tinny,muffled,grainy"),
        _group("software,app,update,interface", "settings", "intuitive,responsive,smooth,simple",
               "buggy,laggy,confusing,clunky"),
        _group("battery,charger,cable,case,keyboard,packaging", "buttons", "sturdy,solid,handy,neat",
               "flimsy,cheap,faulty,loose"),
    ),
    participles=("made", "designed", "built", "packaged", "assembled"),
    experiences=("purchase", "product", "device", "gadget", "deal"),
    positive_actions=("it worked perfectly out of the box", "the battery lasted all day",
                      "setup took only {n} minutes and was easy", "it does everything I need"),
    negative_actions=("it stopped working after {n} days", "the screen cracked in the first week",
                      "it crashed {n} times a day", "it broke after {n} weeks"),
    facts=(("I bought it {n} weeks ago", 2, 10), ("I paid {n} dollars for it", 20, 900),
           ("I use it every day for work", 0, 0), ("it arrived after {n} days", 2, 9),
           ("I hardly use the other features", 0, 0), ("the battery lasts about {n} hours", 4, 30)),
    come_back="buy it again",
)
MOVIE = Domain(
    groups=(
        _group("movie,film,show,series,documentary,sequel", "",
               "gripping,moving,touching,clever,original,memorable",
               "tedious,pointless,confusing,overlong,bloated"),
        _group("plot,story,ending,script,dialogue,pacing", "jokes", "clever,gripping,tight,witty,surprising",
               "confusing,clumsy,slow,silly,thin"),
        _group("acting,cast,lead actor,villain,director", "characters",
               "convincing,charming,funny,believable", "wooden,flat,shallow,cheesy"),
        _group("soundtrack,cinematography", "visuals,effects,scenes", "stunning,striking,rich,polished",
               "cheap,muddy,lazy,dated"),
    ),
    participles=("acted", "written", "shot", "directed", "edited"),
    experiences=("watch", "film", "story", "ride", "evening"),
    positive_actions=("I laughed the whole time", "the story kept me hooked",
                      "the last {n} minutes were amazing", "the cast did a great job"),
    negative_actions=("I fell asleep halfway through", "the jokes fell flat",
                      "the first {n} minutes were a total mess", "nothing made any sense"),
    facts=(("I watched it with my family last weekend", 0, 0), ("it runs for about {n} minutes", 85, 180),
           ("I have seen it {n} times now", 2, 5), ("I could hardly hear the dialogue", 0, 0),
           ("I saw it in the cinema on a Friday", 0, 0), ("it came out {n} years ago", 2, 30)),
    come_back="watch it again",
)
HOTEL = Domain(
    groups=(
        _group("hotel,resort,inn,hostel,guesthouse", "", "charming,modern,convenient,peaceful",
               "shabby,outdated,gloomy,remote"),
        _group("room,bed,bathroom,shower,balcony", "pillows,towels,walls",
               "spacious,spotless,clean,comfortable,quiet,cozy", "dirty,noisy,cramped,smelly,tiny,damp"),
        _group("staff,reception,manager,cleaner", "", "friendly,helpful,welcoming,attentive",
               "rude,unhelpful,slow,careless"),
        _group("view,pool,breakfast,location,wifi,lobby", "", "stunning,central,varied,fast",
               "crowded,slow,limited,cold"),
    ),
    participles=("cleaned", "decorated", "kept", "maintained", "organized"),
    experiences=("stay", "trip", "weekend", "holiday", "visit"),
    positive_actions=("the staff greeted us warmly", "we slept well every night",
                      "the view from the balcony was stunning", "they upgraded our room for free"),
    negative_actions=("the room smelled of smoke", "the shower was broken for {n} days",
                      "we heard the street noise all night", "nobody answered the phone at reception"),
    facts=(("we stayed {n} nights in May", 2, 9), ("our room was on floor {n}", 2, 14),
           ("check in took {n} minutes", 5, 40), ("we booked it {n} weeks ahead", 2, 12),
           ("we hardly saw the staff", 0, 0), ("it is a {n} minute walk from the station", 3, 20)),
    come_back="stay here again",
)
DOMAINS = (RESTAURANT, PRODUCT, MOVIE, HOTEL)


def _doc_rng(seed: int, index: int) -> random.Random:
    """Document `index`'s generator. Everything below draws from it through `Random.random()` only."""
    digest = hashlib.sha256(f"pjlm.data.synthetic:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _pick(rng: random.Random, options: Sequence[T]) -> T:
    return options[int(rng.random() * len(options))]


def _chance(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _between(rng: random.Random, lo: int, hi: int) -> int:
    return lo + int(rng.random() * (hi - lo + 1))


def _fill(template: str, **slots: str) -> str:
    for key, value in slots.items():
        template = template.replace("{" + key + "}", value)
    return template


class Subject(NamedTuple):
    noun: str  # "fries", "phone"
    text: str  # "the fries", "this phone"
    be: str  # "were", "was"
    group: Group


def _focus(rng: random.Random, domain: Domain) -> Domain:
    """`domain` narrowed to one reviewed item, so that a review talks about one phone, not three."""
    items = domain.groups[0]
    only = Group((_pick(rng, items.nouns),), items.positive, items.negative)
    return replace(domain, groups=(only,) + domain.groups[1:])


def _subject(rng: random.Random, domain: Domain, avoid: str = "") -> Subject:
    """A subject for a clause whose noun is not `avoid` (the other half of a compound sentence)."""
    while True:
        index = 0 if _chance(rng, 0.2) else _between(rng, 1, len(domain.groups) - 1)
        group = domain.groups[index]
        noun, plural = _pick(rng, group.nouns)
        determiner = _pick(rng, DETERMINERS) if index == 0 else DETERMINERS[0]
        if noun != avoid:
            return Subject(noun, f"{determiner} {noun}", BE_FORMS[int(plural)], group)


def _adjective(rng: random.Random, group: Group, polarity: int) -> str:
    """A general adjective of the polarity, or one of the group's own (3 times in 10)."""
    if polarity > 0:
        return _pick(rng, group.positive if _chance(rng, 0.3) else STRONG_POSITIVE)
    return _pick(rng, group.negative if _chance(rng, 0.3) else STRONG_NEGATIVE)


def _intensified(rng: random.Random, adjective: str) -> str:
    return f"{_pick(rng, INTENSIFIERS)} {adjective}" if _chance(rng, 0.4) else adjective


def _article(phrase: str) -> str:
    return ARTICLES[int(phrase[0] in "aeio" or phrase.startswith("un"))]


def _about(rng: random.Random, s: Subject, polarity: int) -> str:
    """A clause about subject `s` of the given polarity (+1 or -1)."""
    form = rng.random()
    if form < 0.45:
        return _fill(ATTRIBUTE, s=s.text, be=s.be, a=_intensified(rng, _adjective(rng, s.group, polarity)))
    if form < 0.6:  # "not bad at all", "not very friendly"
        if polarity > 0:
            at_all, a = _chance(rng, 0.4), _pick(rng, NEGATABLE_NEGATIVE)
        else:
            at_all, a = False, _intensified(rng, _pick(rng, NEGATABLE_POSITIVE + s.group.positive))
        if at_all:  # "not bad at all", never "never bad at all"
            return _fill(NEGATED_AT_ALL, s=s.text, be=s.be, neg=NEGATIONS[0], a=a)
        return _fill(NEGATED, s=s.text, be=s.be, neg=_pick(rng, NEGATIONS), a=a)
    if form < 0.78:  # "good and friendly": the second adjective is always the group's own
        first = _adjective(rng, s.group, polarity)
        own = s.group.positive if polarity > 0 else s.group.negative
        return _fill(PAIR, s=s.text, be=s.be, a=first, b=_pick(rng, tuple(a for a in own if a != first)))
    return _fill(VERB, v=_pick(rng, POSITIVE_VERBS if polarity > 0 else NEGATIVE_VERBS), o=s.text)


def _polar_clause(rng: random.Random, domain: Domain, polarity: int) -> str:
    """One clause of the given polarity (+1 or -1), no capital, no final punctuation."""
    form = rng.random()
    if form < 0.7:
        return _about(rng, _subject(rng, domain), polarity)
    if form < 0.82:
        a = _intensified(rng, _pick(rng, STRONG_POSITIVE if polarity > 0 else STRONG_NEGATIVE))
        return _fill(EXPERIENCE, art=_article(a), a=a, e=_pick(rng, domain.experiences))
    if form < 0.9:
        x = _pick(rng, POSITIVE_ADVERBS if polarity > 0 else NEGATIVE_ADVERBS)
        return _fill(ADVERB, x=x, p=_pick(rng, domain.participles))
    action = _pick(rng, domain.positive_actions if polarity > 0 else domain.negative_actions)
    return _fill(action, n=str(_between(rng, 2, 9)))


def _compound(rng: random.Random, domain: Domain, template: str, first: int, second: int) -> str:
    """Two clauses about different subjects joined by `template` (BUT or AND)."""
    a = _subject(rng, domain)
    b = _subject(rng, domain, avoid=a.noun)
    return _fill(template, first=_about(rng, a, first), second=_about(rng, b, second))


def _soft_clause(rng: random.Random, domain: Domain) -> str:
    """A lukewarm clause for mixed reviews: "the plot was somewhat predictable"."""
    s = _subject(rng, domain)
    adjective = _pick(rng, _pick(rng, (MILD_POSITIVE, MILD_NEGATIVE, NEUTRAL_ADJECTIVES)))
    if _chance(rng, 0.5):
        adjective = f"{_pick(rng, SOFTENERS)} {adjective}"
    return _fill(ATTRIBUTE, s=s.text, be=s.be, a=adjective)


def _fact(rng: random.Random, domain: Domain) -> str:
    template, lo, hi = _pick(rng, domain.facts)
    return _fill(template, n=str(_between(rng, lo, hi)))


def _sentence(clause: str, rng: random.Random, exclaim: float = 0.0) -> str:
    return clause[0].upper() + clause[1:] + ("!" if _chance(rng, exclaim) else ".")


def _body_clause(rng: random.Random, domain: Domain, mood: int) -> str:
    """A clause for a review of the given mood: mixed reviews get "but" and lukewarm clauses."""
    if mood == MIXED:
        if _chance(rng, 0.5):
            polarity = 1 if _chance(rng, 0.5) else -1
            return _compound(rng, domain, BUT, polarity, -polarity)
        return _fact(rng, domain) if _chance(rng, 0.3) else _soft_clause(rng, domain)
    form = rng.random()
    if form < 0.2:  # "the wait was long, but the food was great": the part after "but" wins
        return _compound(rng, domain, BUT, -mood, mood)
    if form < 0.32:
        return _compound(rng, domain, AND, mood, mood)
    clause = _polar_clause(rng, domain, mood)
    if _chance(rng, 0.15):
        connective = _pick(rng, POSITIVE_CONNECTIVES if mood > 0 else NEGATIVE_CONNECTIVES)
        return _fill(CONNECTED, c=connective, sentence=clause)
    return clause


def _closing(rng: random.Random, domain: Domain, mood: int) -> str:
    """A verdict: a recommendation, or a star rating ({n} out of 5) that agrees with the mood."""
    if mood == MIXED:
        return _fill(_pick(rng, MIXED_CLOSINGS), r=domain.come_back)
    stars = _between(rng, 4, 5) if mood == POSITIVE else _between(rng, 1, 2)
    options = POSITIVE_CLOSINGS if mood == POSITIVE else NEGATIVE_CLOSINGS
    return _fill(_pick(rng, options), r=domain.come_back, n=str(stars))


def _mood(rng: random.Random) -> int:
    u = rng.random()
    return POSITIVE if u < 0.42 else (NEGATIVE if u < 0.84 else MIXED)


def _body_sentence(rng: random.Random, domain: Domain, mood: int, first: bool) -> str:
    clause = _body_clause(rng, domain, mood)
    if mood == MIXED and not first and _chance(rng, 0.25):
        clause = _fill(CONNECTED, c=_pick(rng, NEUTRAL_CONNECTIVES), sentence=clause)
    return _sentence(clause, rng, exclaim=0.0 if mood == MIXED else 0.15)


def _word_count(sentences: list[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def _review(rng: random.Random) -> str:
    """One review: an optional fact, 1-3 body sentences (more if under MIN_WORDS), an optional verdict."""
    domain, mood = _focus(rng, _pick(rng, DOMAINS)), _mood(rng)
    opening = [_sentence(_fact(rng, domain), rng)] if _chance(rng, 0.35) else []
    closing = [_sentence(_closing(rng, domain, mood), rng, exclaim=0.2)] if _chance(rng, 0.5) else []
    body: list[str] = []
    for _ in range(_between(rng, 1, 3)):
        body.append(_body_sentence(rng, domain, mood, first=not (opening or body)))
    while _word_count(opening + body + closing) < MIN_WORDS:
        body.append(_body_sentence(rng, domain, mood, first=False))
    while _word_count(opening + body + closing) > MAX_WORDS and len(body) > 1:
        body.pop()
    return " ".join(opening + body + closing)


def generate(n_docs: int, seed: int) -> list[str]:
    """`n_docs` reviews for `seed`; document i depends only on (seed, i), so prefixes agree."""
    return [_review(_doc_rng(seed, i)) for i in range(n_docs)]


def corpus_text(n_docs: int, seed: int) -> str:
    """The documents of `generate(n_docs, seed)`, one per line."""
    return "\n".join(generate(n_docs, seed))


def vocabulary() -> list[str]:
    """Sorted distinct words (lowercase) the grammar can emit; numbers are not words here."""
    strings = [text for group in _GRAMMAR for text in group]
    for d in DOMAINS:
        strings += d.participles + d.experiences + d.positive_actions + d.negative_actions + (d.come_back,)
        strings += [fact for fact, _, _ in d.facts]
        for g in d.groups:
            strings += g.positive + g.negative + tuple(noun for noun, _ in g.nouns)
    unfilled = (re.sub(r"\{[a-z]+\}", " ", text).lower() for text in strings)  # placeholders out
    return sorted({w for text in unfilled for w in re.findall(r"[a-z]+", text)})
