"""RULER-style synthetic long-context tasks, generated from a seed to a length in tokens.

Paper: RULER: What's the Real Context Size of Your Long-Context Language Models? (Hsieh et al.,
2024), arXiv 2404.06654; wording and scoring follow its templates. A task builds a Sample from
a random.Random and an amount of filler; `make_sample` searches the amount that brings the
formatted prompt (chat template, question and answer prefix included) to the target length.

- niah_number / niah_word / niah_uuid: one "special magic" value for one key, hidden at a
  given depth in the haystack (noise for numbers, varied prose for words and uuids).
- niah_multikey: the needle among three distractor needles with other keys.
- niah_multivalue: four values for the same key, all wanted.
- niah_multiquery: two keys asked at once.
- vt (variable tracking): a chain VAR X1 = 12345, VAR X2 = VAR X1, ... spread over the text;
  name every variable that holds the value.
- cwe (common words): a numbered word list; name the 10 words that occur most (6 times each,
  the others twice: RULER's 30 and 3 do not fit a 1k prompt).
- fwe (frequent words): coded text drawn from a Zipf law; name the 3 most frequent words.
Scoring (RULER): "all" is the share of expected answers found in the output, "part" is 1 if
any is; every task here is "all".
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from nanokv.haystack import ADJECTIVES, DEPTHS, HAYSTACKS, NOUNS, key_word, value_of


@dataclass
class Sample:
    task: str
    context: str          # instruction and filler: what a method compresses before the question
    question: str         # asked after the context
    answer_prefix: str    # the start of the model's reply, given in the prompt (RULER)
    answers: list[str]
    depth: float | None = None  # where the (first) needle sits in the filler (0 = start, 1 = end)
    metric: str = "all"
    max_tokens: int = 32  # generation budget for the answer


def insert_at(sentences: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """The filler with each needle put between sentences at its depth."""
    out = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda nd: -nd[1]):
        out.insert(round(depth * len(sentences)), needle)
    return out


def niah(kind: str, haystack: str, num_keys: int = 1, num_values: int = 1, num_queries: int = 1):
    """A needle-in-a-haystack task builder; RULER's niah family is this with different counts."""
    def build(rng: random.Random, n: int, depth: float) -> Sample:
        keys = []
        while len(keys) < max(num_keys, num_queries):
            k = key_word(rng)
            if k not in keys:
                keys.append(k)
        values = {k: [value_of(kind, rng) for _ in range(num_values if i < num_queries else 1)]
                  for i, k in enumerate(keys)}
        needles = [f"One of the special magic {kind}s for {k} is: {v}." for k in keys for v in values[k]]
        depths = [depth] + [rng.random() for _ in needles[1:]]
        rng_filler = random.Random(rng.random())
        body = insert_at(HAYSTACKS[haystack](rng_filler, n), needles, depths)
        asked = keys[:num_queries]
        plural = "s" if num_values > 1 or num_queries > 1 else ""
        what = ", ".join(asked)
        intro = (f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
                 f"I will quiz you about the {kind}s afterwards.\n")
        return Sample(task="", context=intro + " ".join(body),
                      question=f"\n\nWhat {'are all the' if plural else 'is the'} special magic {kind}{plural} for "
                               f"{what} mentioned in the provided text?",
                      answer_prefix=f"The special magic {kind}{plural} for {what} mentioned in the provided text "
                                    f"{'are' if plural else 'is'}",
                      answers=[v for k in asked for v in values[k]], depth=depth,
                      max_tokens=24 * len(asked) * num_values if kind == "uuid" else 12 * len(asked) * num_values)
    return build


def variable_tracking(hops: int = 4):
    def build(rng: random.Random, n: int, depth: float) -> Sample:
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10_000, 100_000))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
        depths = sorted(rng.random() for _ in chain)
        body = insert_at(HAYSTACKS["noise"](rng, n), chain, depths)
        intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        return Sample(task="", context=intro + " ".join(body),
                      question=f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above.",
                      answer_prefix=f"Answer: According to the chain(s) of variable assignment in the text above, "
                                    f"{hops + 1} variables are assigned the value {value}, they are:",
                      answers=names, max_tokens=40)
    return build


def common_words(num_common: int = 10, common_freq: int = 6, rare_freq: int = 2):
    """RULER repeats common words 30 times and rare ones 3 (for 4k+ prompts); 6 and 2 here let a
    1k-token prompt hold the list."""
    def build(rng: random.Random, n: int, depth: float) -> Sample:
        vocab = rng.sample([f"{a}{b}" for a in ADJECTIVES for b in NOUNS], num_common + n)
        words = vocab[:num_common] * common_freq + vocab[num_common:] * rare_freq
        rng.shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return Sample(task="", context=f"Below is a numbered list of words. In these words, some appear more often "
                                       f"than others. Memorize the ones that appear most often.\n{listing}",
                      question=f"\n\nQuestion: What are the {num_common} most common words in the above list?",
                      answer_prefix=f"Answer: The top {num_common} words that appear most often in the list are:",
                      answers=vocab[:num_common], max_tokens=80)
    return build


def frequent_words(top: int = 3, alpha: float = 2.0, vocab_size: int = 500):
    def build(rng: random.Random, n: int, depth: float) -> Sample:
        coded = []
        while len(coded) < vocab_size:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(3, 7)))
            if w not in coded:
                coded.append(w)
        weights = [1 / (rank + 1) ** alpha for rank in range(vocab_size)]
        words = rng.choices(coded, weights, k=n)
        counts = {w: words.count(w) for w in coded[:top + 1]}
        ranked = sorted(coded[:top + 1], key=lambda w: -counts[w])
        return Sample(task="", context="Read the following coded text and track the frequency of each coded word. "
                                       "Find the three most frequently appeared coded words. " + " ".join(words),
                      question="\n\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
                               "What are the three most frequently appeared words in the above coded text?",
                      answer_prefix="Answer: According to the coded text above, the three most frequently appeared "
                                    "words are:",
                      answers=ranked[:top], max_tokens=40)
    return build


TASKS: dict[str, Callable] = {
    "niah_number": niah("number", "noise"),
    "niah_word": niah("word", "prose"),
    "niah_uuid": niah("uuid", "prose"),
    "niah_multikey": niah("number", "prose", num_keys=4),
    "niah_multivalue": niah("number", "prose", num_values=4),
    "niah_multiquery": niah("number", "prose", num_keys=2, num_queries=2),
    "vt": variable_tracking(),
    "cwe": common_words(),
    "fwe": frequent_words(),
}


def check_tasks(names: list[str]) -> list[str]:
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return names


def make_sample(task: str, target: int, count_tokens: Callable[[Sample], int], seed: int = 0,
                index: int = 0) -> Sample:
    """Sample `index` of `task` whose prompt is closest to `target` tokens (count_tokens says how
    many a Sample takes). The same arguments give the same sample."""
    build = TASKS[check_tasks([task])[0]]
    depth = DEPTHS[index % len(DEPTHS)]

    def at(n: int) -> Sample:
        sample = build(random.Random(f"{task}/{seed}/{index}/{target}"), n, depth)
        sample.task = task
        return sample

    low, high = 1, 2
    while count_tokens(at(high)) < target:
        low, high = high, high * 2
    while high - low > 1:  # the largest filler amount whose prompt is at most `target`
        mid = (low + high) // 2
        low, high = (mid, high) if count_tokens(at(mid)) <= target else (low, mid)
    best = min((at(low), at(high)), key=lambda s: abs(count_tokens(s) - target))
    return best


def score(prediction: str, answers: list[str], metric: str = "all") -> float:
    """RULER's string match: the share of answers in the prediction ("all"), or whether any is ("part")."""
    found = [a.lower() in prediction.lower() for a in answers]
    return sum(found) / len(found) if metric == "all" else float(any(found))
