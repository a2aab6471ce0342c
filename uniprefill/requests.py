"""Per-request UniPrefill controls, carried in vLLM's request extra args, and what the
scheduler decides from them for each prompt.

HTTP: `"vllm_xargs": {"uniprefill_p": 0.9}`, `{"uniprefill_preset": "fast"}` or
`{"uniprefill_enabled": false}`; offline: `SamplingParams(extra_args={"uniprefill_p": 0.9})`.
A request's preset sets only its p: the preset's other settings apply to the whole engine and
must be the engine's (`UniPrefillConfig.preset_mismatch`, checked in the API server).

`parse_request_controls` is strict (the API server turns its ValueError into HTTP 400): every
value it accepts runs. `request_p`, `scoring_queries` and `prompt_plan` are the scheduler's, the
one place that decides whether a prompt is pruned; the workers execute the plan it sends with
each step (uniprefill.step_plan). No vLLM import here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from uniprefill.config import PRESETS, UniPrefillConfig
from uniprefill.ops.select.common import prunable_mask
from uniprefill.ops.select.rule import MIN_P, p_error
from uniprefill.step_plan import PromptPlan

ENABLED_KEY = "uniprefill_enabled"
P_KEY = "uniprefill_p"
PRESET_KEY = "uniprefill_preset"
KEYS = (ENABLED_KEY, P_KEY, PRESET_KEY)
_TRUE, _FALSE = (True, 1, "true", "1"), (False, 0, "false", "0")


class RequestFieldError(ValueError):
    """A bad UniPrefill request field; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def parse_request_controls(extra_args: Mapping[str, Any] | None) -> float | None:
    """The p a request asks for (1.0 turns pruning off), or None for the server's setting.

    Raises RequestFieldError (a ValueError) naming the offending field.
    """
    args = extra_args or {}
    unknown = sorted(k for k in args if k.startswith("uniprefill") and k not in KEYS)
    if unknown:
        raise RequestFieldError(
            unknown[0],
            f"unknown UniPrefill request field(s) {_shown(unknown)}; valid: {', '.join(KEYS)}",
        )
    p = None
    if ENABLED_KEY in args:
        value = args[ENABLED_KEY]
        norm = value.lower() if isinstance(value, str) else value
        if norm not in _TRUE + _FALSE or isinstance(value, float):
            raise RequestFieldError(
                ENABLED_KEY, f"{ENABLED_KEY} must be true or false, got {_shown(value)}"
            )
        if norm in _FALSE:
            p = 1.0
    if P_KEY in args:
        value = args[P_KEY]
        try:  # a JSON number, or a string holding one ("0.9")
            number = value if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = value
        if p_error(number):
            raise RequestFieldError(
                P_KEY, f"{P_KEY} must be a number in (0, 1], at least {MIN_P:.3g} (float32), "
                f"got {_shown(value)}"
            )  # fmt: skip
        if p is None:  # an explicit "off" wins over a p
            p = number
    if PRESET_KEY in args:
        name = args[PRESET_KEY]
        if not isinstance(name, str) or name not in PRESETS:
            raise RequestFieldError(
                PRESET_KEY, f"{PRESET_KEY} must be one of {list(PRESETS)}, got {_shown(name)}"
            )
        if p is None:  # an explicit p or "off" wins over the preset's
            p = preset_p(name)
    return p


def _shown(value: Any, limit: int = 80) -> str:
    """A client's value for an error message, cut short: a request may send megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@cache
def preset_p(name: str) -> float:
    """The p preset `name` sets (its own, else the default's); looked up once per name."""
    return UniPrefillConfig.from_dict({"preset": name}).p


def request_p(config: UniPrefillConfig, sampling_params: Any) -> float:
    """The top-p mass a request is pruned with; 1.0 means it is not pruned.

    Requests asking for prompt logprobs are never pruned: those need every prompt position.
    """
    if not config.enabled or not config.drop_layers:
        return 1.0
    if sampling_params is None or getattr(sampling_params, "prompt_logprobs", None) is not None:
        return 1.0
    try:
        asked = parse_request_controls(getattr(sampling_params, "extra_args", None))
    except ValueError:  # the API server rejects these; a direct engine caller gets no pruning
        return 1.0
    return config.p if asked is None else asked


def will_prune(config: UniPrefillConfig, p: float, prompt_len: int, queries: int) -> bool:
    """Whether a fresh prompt of `prompt_len` tokens, asking for `p` and scored by `queries`
    tokens, is scored at drop layers."""
    return bool(config.drop_layers) and prunable_mask(
        prompt_len, p=p, rule=config.rule, queries=queries
    )


def prompt_plan(
    config: UniPrefillConfig, *, p: float, prompt_len: int, queries: int, cached: int
) -> PromptPlan | None:
    """How the scheduler has a fresh prompt pruned, or None: it is computed as stock vLLM
    computes it, over its prefix-cache hit.

    p: what the request asks for (request_p); queries: its scoring queries (scoring_queries);
    cached: its prompt tokens in the prefix cache, or that a recently pruned prompt it repeats
    covers. A prompt mostly cached (at least `cached_share` of it, or an uncached rest shorter
    than `min_prompt_len`) is read from the cache instead of pruned.
    """
    if not will_prune(config, p, prompt_len, queries):
        return None
    if cached >= config.cached_share * prompt_len or prompt_len - cached < config.min_prompt_len:
        return None
    return PromptPlan(p=p, queries=queries)


# Chat-template markup that closes the user's turn and opens the assistant's, at a prompt's
# end: special-token text (<|eot_id|>, <|im_end|>, <end_of_turn>, <|end|>, [/INST], </s>,
# <｜Assistant｜>, <think></think>), a role name right after such markup, and whitespace.
# Matched on the tokens' text, so it is found whether the tokenizer has these as special
# tokens or splits them into pieces (a template served with another family's tokenizer).
_MARKUP = r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|</?[a-z_]{1,20}>|\[/?INST\]"
_ROLE = r"(?:assistant|model|Assistant|ASSISTANT|bot)"
TEMPLATE_TAIL = re.compile(rf"(?:{_MARKUP}|(?<=[>\]]){_ROLE}|\s)+\Z")
MAX_TAIL_TOKENS = 64  # the most tokens of a prompt's end read as template markup


@dataclass(frozen=True)
class ParagraphBreaks:
    """A tokenizer's view of a prompt's end: which tokens make a blank line (one token holding
    "\n\n", or a token starting with a newline right after one ending with a newline, for
    tokenizers that split newlines apart), and each token's text, from which the chat
    template's closing markup is read (`tail`)."""

    inside: frozenset[int] = frozenset()
    ends: frozenset[int] = frozenset()
    starts: frozenset[int] = frozenset()
    texts: tuple[str, ...] = ()  # by token id

    def __bool__(self) -> bool:
        return bool(self.inside or self.starts)

    def at(self, ids: Sequence[int], i: int) -> bool:
        """Whether a blank line ends with token i."""
        return ids[i] in self.inside or (
            i > 0 and ids[i] in self.starts and ids[i - 1] in self.ends
        )

    def tail(self, ids: Sequence[int]) -> int:
        """How many of the prompt's last tokens are chat-template markup (TEMPLATE_TAIL) and
        whitespace after the user's text: tokens wholly inside the markup at the end."""
        last = [
            self.texts[i] if 0 <= i < len(self.texts) else "\ufffd" for i in ids[-MAX_TAIL_TOKENS:]
        ]
        text = "".join(last)
        match = TEMPLATE_TAIL.search(text)
        if match is None:
            return 0
        count, position = 0, len(text)
        for piece in reversed(last):
            position -= len(piece)
            if position < match.start():
                break
            count += 1
        return count


NO_BREAKS = ParagraphBreaks()


def scoring_queries(
    config: UniPrefillConfig, prompt_ids: Sequence[int] | None, breaks: ParagraphBreaks
) -> int:
    """How many of a prompt's last tokens score it (config.queries), from its ids alone.

    "question": the user's question and what follows it. The chat template's markup at the end
    (its close of the user's turn and open of the assistant's: `ParagraphBreaks.tail`) is set
    aside; the question is the text after the last blank line before it, or, with none within
    reach (a raw completion prompt, a one-paragraph message), the last last_q tokens before it.
    The queries are those tokens and the markup after them, at least last_q and at most
    max_queries in all. Without a tokenizer view (prompt embeddings): last_q.
    """
    if config.queries != "question" or not prompt_ids or not breaks:
        return config.last_q
    n = len(prompt_ids)
    end = n - breaks.tail(prompt_ids)  # the user's text ends before token `end`
    for i in range(end - 1, max(n - config.max_queries - 1, 0) - 1, -1):
        if breaks.at(prompt_ids, i):
            return max(config.last_q, n - 1 - i)
    return min(config.max_queries, max(config.last_q, n - end + config.last_q))


def question_breaks(config: UniPrefillConfig, model_config: Any) -> ParagraphBreaks:
    """The blank-line tokens `scoring_queries` looks for (none unless queries="question"),
    from the tokenizer a vLLM model config names."""
    if config.queries != "question":
        return NO_BREAKS
    return paragraph_breaks(
        model_config.tokenizer, model_config.tokenizer_revision, model_config.trust_remote_code
    )


@cache
def paragraph_breaks(
    tokenizer: str, revision: str | None, trust_remote_code: bool
) -> ParagraphBreaks:
    """The model's tokenizer's blank-line tokens and token texts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        tokenizer, revision=revision, trust_remote_code=trust_remote_code
    )
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return ParagraphBreaks(
        inside=frozenset(i for i, text in enumerate(texts) if "\n\n" in text),
        ends=frozenset(i for i, text in enumerate(texts) if text.endswith("\n")),
        starts=frozenset(i for i, text in enumerate(texts) if text.startswith("\n")),
        texts=tuple(texts),
    )
