"""Filler text and needles for the synthetic long-context tasks (nanokv/eval/tasks.py) and the
calibration text and probes (nanokv/calibrate/).

Two haystacks, because they test different things. RULER's "noise" repeats five trivial
sentences: a needle stands out by form. "prose" is varied generated sentences about people,
places and things, so a model cannot find the needle just by spotting the one odd sentence.
Both are deterministic given a random.Random.
"""

import random
import uuid

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana", "Ines", "Jonas", "Kira", "Luis",
          "Maya", "Nikolai", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera", "Wen", "Yusuf"]
_PLACES = ["the harbour", "the old library", "a mountain village", "the market square", "the train station",
           "a quiet garden", "the riverbank", "the museum", "a small bakery", "the lighthouse", "the orchard"]
_THINGS = ["a wooden chair", "an old map", "a basket of apples", "a brass lamp", "a red bicycle", "a paper kite",
           "a chess set", "a violin", "a clay pot", "a woollen scarf", "a pocket watch", "a sailing boat"]
_VERBS = ["repaired", "painted", "carried", "sold", "found", "borrowed", "described", "photographed", "cleaned"]
_WHEN = ["on Monday", "in the morning", "after lunch", "late at night", "during the storm", "last spring",
         "before sunrise", "at the weekend", "in early autumn"]
_TEMPLATES = [
    "{name} {verb} {thing} at {place} {when}.",
    "{when}, {name} walked to {place} and {verb} {thing}.",
    "People at {place} still talk about how {name} {verb} {thing} {when}.",
    "It was {when} that {name} first saw {thing} near {place}.",
    "{name} never forgot {place}, where {thing} was {verb} {when}.",
]


def noise_sentences(rng: random.Random, n: int) -> list[str]:
    base = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
    return [base[i % len(base)] for i in range(n)]


def prose_sentences(rng: random.Random, n: int) -> list[str]:
    sentences = [rng.choice(_TEMPLATES).format(name=rng.choice(_NAMES), verb=rng.choice(_VERBS),
                                               thing=rng.choice(_THINGS), place=rng.choice(_PLACES),
                                               when=rng.choice(_WHEN)) for _ in range(n)]
    return [s[0].upper() + s[1:] for s in sentences]


HAYSTACKS = {"noise": noise_sentences, "prose": prose_sentences}

# the needles: a key word, a value of one kind, and where the needle sits in the filler
ADJECTIVES = ["abundant", "bitter", "careful", "dusty", "eager", "fragile", "gentle", "hollow", "icy", "jolly",
              "keen", "lively", "mellow", "noisy", "odd", "proud", "quiet", "rapid", "silent", "tidy", "vivid",
              "wary", "young", "zealous", "brave", "calm", "dark", "early", "faint", "grand"]
NOUNS = ["retina", "shoreline", "lantern", "meadow", "anchor", "violin", "harbor", "pepper", "compass", "glacier",
         "quartz", "saddle", "thimble", "umbrella", "walnut", "yacht", "zephyr", "beacon", "canyon", "falcon",
         "garnet", "hammock", "island", "jasmine", "kettle", "ledger", "marble", "nutmeg", "orchid", "pebble"]
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def key_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def value_of(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "word":
        return key_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128)))

# the retrieval-reasoning needle (HeadKV-R2's probe, nanokv/calibrate/headkv.py): two people, a
# pastime each and their ages; names kept apart from the prose filler's, so the needle's are its own
PEOPLE = ["John", "Mary", "Peter", "Lucy", "David", "Sarah", "Thomas", "Anna", "Mark", "Emma", "Paul", "Julia"]
PASTIMES = ["to take a walk in the park and have a cup of espresso in the evening",
            "to play basketball at the local gym and enjoy a smoothie afterward",
            "to read detective novels on the balcony while it rains",
            "to bake cinnamon rolls for the neighbours on Sunday mornings",
            "to swim in the lake before breakfast and then write letters",
            "to grow tomatoes in the allotment and cook them into soup",
            "to cycle along the coast road and photograph the sunset",
            "to play the piano for an hour after dinner"]
