"""Long-context questions over real text that ships with Python: standard-library source and the
language reference (`pydoc_data.topics`), not a generated haystack. Deterministic per
(task, tokens, seed) on one Python version (the study records it).

Tasks, each with an answer a program checks and the evidence spans a correct answer needs:
- fact (retrieval): one assignment (code) or sentence (reference prose) placed at a depth;
- hop (multi-hop): a name placed at one depth, the number stored under that name at another;
- default (read from the code): the default value of one parameter of one function;
- methods (aggregation over a section): every method name of one class.
A study keeps only questions the model gets wrong closed-book and right with the context.
"""

from __future__ import annotations

import pydoc_data.topics
import random
import re
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CHARS_PER_TOKEN = {"code": 3.2, "docs": 4.2}  # this tokenizer's ratios, to size a first draft
WORDS = (
    "amber basalt cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon marble "
    "nickel orchid pepper quartz raven saffron tundra umber violet willow xenon yarrow zephyr "
    "copper falcon glacier heron lantern meadow"
).split()
NUMBER = " Answer with the number only."
DEF_RE = re.compile(r"^[ \t]*def (\w+)\((.*)\)(?: -> [^:]+)?:[ \t]*$", re.M)
DEFAULT_RE = re.compile(r"(\w+)=(-?\d+(?:\.\d+)?|None|True|False|'[^'\\]{1,24}'|\"[^\"\\]{1,24}\")")
CLASS_RE = re.compile(r"^class (\w+)\b.*:[ \t]*$", re.M)
METHOD_RE = re.compile(r"^    def (\w+)\(", re.M)


@dataclass(frozen=True)
class Sample:
    task: str
    corpus: str
    messages: list[dict]  # the prompt with its context
    closed_book: list[dict]  # the question alone
    question: str  # the question's text (the tail of the last user message)
    answers: list[str]  # a correct reply contains every one
    context: str
    evidence: list[tuple[int, int]]  # character spans of `context` whose tokens the answer needs
    depth: float  # where the (first) evidence lies, as a share of the context

    def correct(self, reply: str) -> bool:
        return all(re.search(rf"(?<![\w.]){re.escape(a)}(?![\w.])", reply) for a in self.answers)


@cache
def _stdlib_sources() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(f.name, f.read_text(errors="replace")) for f in sorted(root.glob("*.py"))]


def _code(rng: random.Random, chars: int) -> str:
    sources = _stdlib_sources()
    order = rng.sample(range(len(sources)), len(sources))
    parts, size = [], 0
    for i in order:
        name, text = sources[i]
        parts.append(f"# ---- file: {name} ----\n{text}")
        size += len(parts[-1])
        if size >= chars:
            break
    return _cut_lines("\n".join(parts), chars)


def _docs(rng: random.Random, chars: int) -> str:
    topics = sorted(pydoc_data.topics.topics.items())
    rng.shuffle(topics)
    text = "\n\n".join(f"[{name}]\n{body.strip()}" for name, body in topics)
    return _cut_lines(text, chars)


def _cut_lines(text: str, chars: int) -> str:
    cut = text.rfind("\n", 0, chars)
    return text[: cut if cut > 0 else chars]


def _insert(text: str, depth: float, line: str) -> str:
    at = text.rfind("\n", 0, int(depth * len(text))) + 1
    return f"{text[:at]}{line}\n{text[at:]}"


def _name(rng: random.Random) -> str:
    return "_".join(rng.sample(WORDS, 2))


def _fact(rng, context, corpus, depth):
    key, value = _name(rng), str(rng.randint(10000, 99999))
    if corpus == "code":
        line, question = (
            f"{key}_code = {value}",
            f"What integer is assigned to `{key}_code`?{NUMBER}",
        )
    else:
        line = f"The access code of the {key.replace('_', ' ')} archive is {value}."
        question = f"What is the access code of the {key.replace('_', ' ')} archive?{NUMBER}"
    context = _insert(context, depth, line)
    return context, question, [value], [_span(context, line, value)]


def _hop(rng, context, corpus, depth):
    first, second, value = _name(rng), _name(rng), str(rng.randint(10000, 99999))
    if corpus == "code":
        link, stored = f'{first}_ref = "{second}"', f'RECORDS["{second}"] = {value}'
        question = (
            f"`{first}_ref` names a key of RECORDS. What integer does RECORDS store under that "
            f"key?{NUMBER}"
        )
    else:
        link = f"The {first.replace('_', ' ')} ledger is filed under the label {second}."
        stored = f"The label {second} holds the number {value}."
        question = (
            f"Under which label is the {first.replace('_', ' ')} ledger filed, and what number "
            f"does that label hold?{NUMBER}"
        )
    later = min(0.95, depth + 0.3 + 0.2 * rng.random()) if depth < 0.5 else depth
    earlier = depth if depth < 0.5 else max(0.02, depth - 0.3 - 0.2 * rng.random())
    context = _insert(context, later, stored)
    context = _insert(context, earlier, link)
    return context, question, [value], [_span(context, link, second), _span(context, stored, value)]


def _span(context: str, line: str, part: str) -> tuple[int, int]:
    """Where `part` lies inside the placed `line` of `context`."""
    at = context.index(line) + line.index(part)
    return at, at + len(part)


def _default(rng, context, corpus, depth):
    names = [m.group(1) for m in DEF_RE.finditer(context)]
    candidates = []
    for m in DEF_RE.finditer(context):
        if names.count(m.group(1)) != 1 or m.group(1).startswith("__"):
            continue
        for d in DEFAULT_RE.finditer(m.group(2)):
            candidates.append((m, d))
    if not candidates:
        return None
    func, param = min(candidates, key=lambda c: abs(c[0].start() - depth * len(context)))
    literal = param.group(2)
    question = (
        f"What is the default value of the parameter `{param.group(1)}` of the function "
        f"`{func.group(1)}`? Answer with the value only."
    )
    at = func.start(2) + param.start()
    return context, question, [literal.strip("'\"")], [(at, at + len(param.group(0)))]


def _methods(rng, context, corpus, depth):
    classes = [m.group(1) for m in CLASS_RE.finditer(context)]
    candidates = []
    for m in CLASS_RE.finditer(context):
        end = re.compile(r"^\S", re.M).search(context, m.end() + 1)
        if end is None or classes.count(m.group(1)) != 1:
            continue
        body = context[m.end() : end.start()]
        methods = [d.group(1) for d in METHOD_RE.finditer(body)]
        if 2 <= len(methods) <= 4 and len(set(methods)) == len(methods):
            spans = [(m.end() + d.start(1), m.end() + d.end(1)) for d in METHOD_RE.finditer(body)]
            candidates.append((m, methods, spans))
    if not candidates:
        return None
    cls, methods, spans = min(candidates, key=lambda c: abs(c[0].start() - depth * len(context)))
    question = f"List the names of all methods defined in the class `{cls.group(1)}`."
    return context, question, methods, spans


TASKS = {"fact": _fact, "hop": _hop, "default": _default, "methods": _methods}
CODE_ONLY = {"default", "methods"}


def make_sample(task: str, seed: int, chars: int) -> Sample | None:
    """A sample whose context has about `chars` characters, or None if the drawn text has no
    place for this task (e.g. no class with 2-4 methods)."""
    rng = random.Random(f"{task}/{seed}")
    corpus = "code" if task in CODE_ONLY or seed % 2 == 0 else "docs"
    depth = 0.05 + 0.9 * rng.random()
    context = (_code if corpus == "code" else _docs)(random.Random(f"text/{seed}"), chars)
    made = TASKS[task](rng, context, corpus, depth)
    if made is None:
        return None
    context, question, answers, evidence = made
    body = f"```python\n{context}\n```" if corpus == "code" else context
    content = f"Read the text below and answer the question after it.\n\n{body}\n\n{question}"
    return Sample(
        task=task,
        corpus=corpus,
        messages=[{"role": "user", "content": content}],
        closed_book=[{"role": "user", "content": question}],
        question=question,
        answers=answers,
        context=context,
        evidence=evidence,
        depth=evidence[0][0] / len(context),
    )


def sample_of_length(tokenizer, task: str, seed: int, tokens: int) -> Sample | None:
    """make_sample, resized until its chat-formatted prompt is just under `tokens` tokens."""
    corpus = "code" if task in CODE_ONLY or seed % 2 == 0 else "docs"
    chars = int(tokens * CHARS_PER_TOKEN[corpus])
    for _ in range(4):
        sample = make_sample(task, seed, chars)
        if sample is None:
            return None
        n = len(prompt_ids(tokenizer, sample.messages))
        if 0.97 * tokens <= n <= tokens:
            return sample
        chars = int(chars * 0.985 * tokens / n)
    return sample if n <= tokens else None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def locate(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Prompt ids and the token indices of the evidence."""
    text = tokenizer.apply_chat_template(
        sample.messages, tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    at = text.index(sample.context)
    spans = [(at + s, at + e) for s, e in sample.evidence]
    offsets = enc["offset_mapping"]
    evidence = [i for i, (lo, hi) in enumerate(offsets) if any(lo < e and s < hi for s, e in spans)]
    return enc["input_ids"], evidence
