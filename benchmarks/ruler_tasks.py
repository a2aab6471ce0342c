"""RULER-style synthetic long-context tasks over a haystack of varied prose.

Each task returns the chat messages, the answers a correct reply contains, and the needle
sentences (so a study can tell whether pruning removed them). Deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PROSE = [
    "The harbour town woke slowly. Fishing boats rocked against the pier while gulls argued "
    "over the night's catch, and the smell of tar and salt drifted up the narrow lanes.",
    "In the valley the old mill had not turned for decades, yet the river still carved its "
    "patient path through the stones, indifferent to the families who had come and gone.",
    "A librarian spent her evenings cataloguing maps of coastlines that no longer existed, "
    "drawn by sailors who trusted the stars more than any instrument they could buy.",
    "The orchestra tuned in the half-dark. A long A from the oboe spread through the hall, and "
    "one by one the strings leaned into it until the room hummed like a single body.",
    "Market stalls opened one after another, offering pears, copper pans, bolts of indigo "
    "cloth and jars of honey so dark it looked like varnish in the morning light.",
    "On the mountain pass the weather could change within minutes, and the hikers learned to "
    "read the clouds as carefully as a farmer reads the sky before the harvest.",
    "The chemistry teacher kept a drawer of failed experiments: crystals that grew sideways, "
    "a blue solution that refused to turn red, and a note that simply said 'try again'.",
    "Every spring the railway company repainted the station benches green, and every autumn "
    "the children of the village carved their initials into the fresh paint anyway.",
    "Astronomers at the small observatory argued for a week about a faint smudge on a "
    "photographic plate before agreeing it was a fingerprint left by the night assistant.",
    "The bakery on the corner opened at four. By five the queue reached the post office, and "
    "by six the rye loaves were gone, leaving only the sweet buns nobody really wanted.",
    "A retired engineer built a clock from bicycle parts. It lost eleven minutes a day, which "
    "he said was the exact amount of time a person should spend doing nothing at all.",
    "During the long winter the lake froze so thick that the villagers held a fair on the "
    "ice, with lanterns, roasted chestnuts and a brass band that played slightly out of tune.",
    "The translator worked with three dictionaries open at once, chasing a single word "
    "through centuries of usage until she found the shade of meaning the author intended.",
    "Beekeepers in the hills noticed the hives grew calmer whenever it rained, as if the "
    "colony took the weather as permission to rest from its endless work.",
    "The city council debated for months whether to replace the cobblestones. In the end they "
    "kept them, and the cyclists complained, and the tourists took photographs.",
    "An old sailor claimed he could tell the depth of the water by the colour of the waves, "
    "and although nobody believed him, nobody ever saw him run aground either.",
]

QUESTION_SUFFIX = "Answer briefly."


@dataclass(frozen=True)
class Sample:
    task: str
    messages: list[dict]
    answers: list[str]
    needles: list[str]


# Pools for generated sentences, so a long haystack never repeats a paragraph verbatim.
WHEN = [
    "At dawn",
    "Late that evening",
    "Every other Sunday",
    "In the dry season",
    "Before the storm",
    "After the harvest",
    "On the first day of term",
    "Long after midnight",
    "By the end of May",
    "During the festival",
    "In those quiet years",
    "Just before noon",
]
WHO = [
    "the ferryman",
    "a young cartographer",
    "the village doctor",
    "two retired teachers",
    "the night porter",
    "a travelling violinist",
    "the mayor's sister",
    "a pair of geologists",
    "the lighthouse keeper",
    "an apprentice carpenter",
    "the choir director",
    "a botanist",
]
DID = [
    "repaired",
    "sketched",
    "measured",
    "argued about",
    "carried",
    "photographed",
    "counted",
    "painted",
    "rebuilt",
    "wrote a letter about",
    "quietly studied",
    "sold",
]
WHAT = [
    "the broken weather vane",
    "a crate of lemons",
    "the chapel's bell rope",
    "an unfinished quilt",
    "the old tide tables",
    "a map of the eastern marshes",
    "the station clock",
    "a basket of walnuts",
    "the school's only telescope",
    "a stack of unpaid invoices",
    "the cracked fountain",
    "a box of glass marbles",
]
WHERE = [
    "near the harbour wall",
    "behind the bakery",
    "on the hill above the quarry",
    "in the library's cold reading room",
    "beside the tram depot",
    "under the railway bridge",
    "at the edge of the orchard",
    "in a rented attic",
    "across from the town hall",
    "by the frozen canal",
    "outside the post office",
    "in the greenhouse",
]
WHY = [
    "because nobody else would",
    "to settle an old bet",
    "for the spring fair",
    "as a favour to a neighbour",
    "without telling anyone",
    "while the rain kept falling",
    "as the bells rang",
    "before the inspectors arrived",
    "for reasons never explained",
    "with surprising patience",
    "to pass the time",
    "for a visiting cousin",
]


def _generated_paragraph(rng: random.Random) -> str:
    pools = (WHEN, WHO, DID, WHAT, WHERE, WHY)
    sentences = []
    for _ in range(rng.randint(2, 4)):
        when, who, did, what, where, why = (rng.choice(pool) for pool in pools)
        sentences.append(f"{when}, {who} {did} {what} {where} {why}.")
    return " ".join(sentences)


def _haystack(rng: random.Random, needles: list[str], depth: float, words: int) -> str:
    """Hand-written paragraphs shuffled among generated ones, with the needles at `depth`."""
    paragraphs: list[str] = []
    written = []
    while sum(len(p.split()) for p in paragraphs) < words:
        if not written:
            written = PROSE[:]
            rng.shuffle(written)
        paragraphs.append(written.pop() if rng.random() < 0.3 else _generated_paragraph(rng))
    at = round(depth * len(paragraphs))
    for offset, needle in enumerate(needles):  # consecutive needles spread a little
        paragraphs.insert(min(len(paragraphs), at + 3 * offset), needle)
    return "\n".join(paragraphs)


def prose(seed: str, words: int) -> str:
    """A haystack of about `words` words without needles."""
    return _haystack(random.Random(seed), [], 0.0, words)


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def passkey(rng, words, depth):
    value = _number(rng)
    needle = f"The pass key is {value}. Remember it; {value} is the pass key."
    question = "What is the pass key mentioned in the text?"
    return [value], [needle], question


def multikey(rng, words, depth):
    keys = rng.sample(["amber", "cobalt", "olive", "crimson", "ivory", "teal"], 4)
    values = [_number(rng) for _ in keys]
    pairs = zip(keys, values, strict=True)
    needles = [f"The special magic number for {k} is {v}." for k, v in pairs]
    target = rng.randrange(len(keys))
    question = f"What is the special magic number for {keys[target]}?"
    return [values[target]], needles, question


def multivalue(rng, words, depth):
    key = rng.choice(["harbour", "lantern", "orchard", "meadow"])
    values = [_number(rng) for _ in range(3)]
    needles = [f"One of the special magic numbers for {key} is {v}." for v in values]
    question = f"What are all the special magic numbers for {key}?"
    return values, needles, question


def vartrack(rng, words, depth):
    value = _number(rng)
    names = rng.sample(["QXR", "BLM", "ZUT", "WEK", "PAV", "DOS"], 4)
    needles = [f"VAR {names[0]} = {value}."]
    needles += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]
    question = f"Which variables are assigned the value {value}, directly or through others?"
    return names, needles, question


TASKS = {"passkey": passkey, "multikey": multikey, "multivalue": multivalue, "vartrack": vartrack}


def make_sample(task: str, seed: int, words: int, depth: float) -> Sample:
    rng = random.Random(f"{task}/{seed}/{words}/{depth}")
    answers, needles, question = TASKS[task](rng, words, depth)
    text = _haystack(rng, needles, depth, words)
    content = (
        "Read the text below and answer the question after it.\n\n"
        f"{text}\n\nQuestion: {question} {QUESTION_SUFFIX}"
    )
    return Sample(task, [{"role": "user", "content": content}], answers, needles)
