"""The scoring queries cover the last user turn's question under the chat templates of the
families people serve, in chat and completion requests and raw prompts: rendered conversations
of a document and a question, tokenized by a real tokenizer, once with each template's markers
as special tokens (the family's own tokenizer) and once split into pieces (a template served
with another family's tokenizer: the case that once scored the template's tail alone)."""

import pytest
from transformers import AutoTokenizer

from uniprefill.config import UniPrefillConfig
from uniprefill.requests import paragraph_breaks, scoring_queries

DOCUMENT = "\n\n".join(
    f"Section {i}. The parser reads token {i} and writes it to the table at offset {7 * i}."
    for i in range(40)
)
QUESTION = "Which offset does the parser write token 17 to?"
SYSTEM = "You are a helpful assistant."

# (opening up to the user's text, what follows the user's text), as each template renders a
# system prompt, one user turn and the generation prompt.
TEMPLATES = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2.5": (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen3-no-thinking": (
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    "gemma3": ("<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "mistral": ("<s>[INST] ", " [/INST]"),
    "phi3": (f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n", "<|end|>\n<|assistant|>\n"),
    "phi4": (
        f"<|im_start|>system<|im_sep|>{SYSTEM}<|im_end|><|im_start|>user<|im_sep|>",
        "<|im_end|><|im_start|>assistant<|im_sep|>",
    ),
    "deepseek": (f"<｜begin▁of▁sentence｜>{SYSTEM}<｜User｜>", "<｜Assistant｜><think>\n"),
    "completion": ("", ""),
    "completion-answer-line": ("", "\n"),
}
MARKERS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<think>", "</think>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<s>", "[INST]",
    "[/INST]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_sep|>",
    "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
]  # fmt: skip
CONFIG = UniPrefillConfig(queries="question", last_q=16, max_queries=256)


@pytest.fixture(scope="module", params=["split", "special"])
def tokenizer_dir(request, prepared, tmp_path_factory):
    """The tiny models' tokenizer (ChatML's two markers special), or the same with every
    template's markers added as special tokens."""
    source = prepared("tiny-llama")
    if request.param == "split":
        return str(source)
    tok = AutoTokenizer.from_pretrained(source)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    target = tmp_path_factory.mktemp("special-tokenizer")
    tok.save_pretrained(target)
    return str(target)


@pytest.mark.parametrize("template", TEMPLATES)
def test_queries_are_the_question_and_what_the_template_adds_after_it(tokenizer_dir, template):
    opening, closing = TEMPLATES[template]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(f"{opening}{DOCUMENT}\n\n{QUESTION}{closing}", add_special_tokens=False).input_ids
    queries = scoring_queries(CONFIG, ids, paragraph_breaks(tokenizer_dir, None, False))
    scored = tok.decode(ids[-queries:])
    assert scored.strip().startswith(QUESTION), (template, scored)  # the whole question...
    assert "Section 39" not in scored  # ... and nothing of the document
    assert queries >= CONFIG.last_q


@pytest.mark.parametrize("template", ["llama3", "gemma3", "mistral"])
def test_a_one_paragraph_message_is_scored_by_its_last_tokens_and_the_tail(tokenizer_dir, template):
    """No blank line in the user's turn: its last last_q tokens, not the template's alone."""
    opening, closing = TEMPLATES[template]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    message = DOCUMENT.replace("\n\n", " ") + " " + QUESTION
    ids = tok(f"{opening}{message}{closing}", add_special_tokens=False).input_ids
    queries = scoring_queries(CONFIG, ids, paragraph_breaks(tokenizer_dir, None, False))
    tail = len(tok(closing, add_special_tokens=False).input_ids)
    assert queries - CONFIG.last_q in range(tail - 1, tail + 2)  # BPE may merge at the seam
    assert QUESTION.split()[-1] in tok.decode(ids[-queries:])
