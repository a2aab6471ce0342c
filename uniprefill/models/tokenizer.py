"""A small byte-level BPE tokenizer, trained locally and deterministically, for the tiny models.

Byte-level BPE can encode any text (unknown words fall back to bytes), so test prompts of any
content work. Normalisation and pre-tokenisation are exactly Qwen2's (NFC, then a regex that also
splits digits one by one): transformers loads any `qwen2` model with its own `Qwen2Tokenizer`
pipeline whatever the files say, and matching it keeps all tiny models tokenizing identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 1024
BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ids 0..5, in this order. UNK is never produced by byte-level BPE, but without one
# Qwen2Tokenizer adds its own "<|endoftext|>" and the tokenizer outgrows the model's vocab_size.
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, IM_START, IM_END]

# Qwen2's pre-tokenisation regex (each digit is its own `\p{N}` piece).
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML-style, so vLLM's chat endpoint can render conversations.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Fixed training text (hashed into the tiny models' recipes, so editing it stales their caches).
CORPUS = """\
The quick brown fox jumps over the lazy dog near the river bank.
A journey of a thousand miles begins with a single step.
In 1969, two astronauts walked on the Moon while millions watched on television.
Please send the report by Friday, 14 March, before 5:30 pm.
The recipe calls for 250 grams of flour, 3 eggs and 120 ml of milk.
Machine learning models learn patterns from large amounts of data.
She opened the window, and the cold morning air filled the small kitchen.
The train to Berlin leaves from platform 7 at 08:45 every weekday.
Water boils at 100 degrees Celsius at sea level.
Our quarterly revenue grew by 12 percent, reaching 4.8 million dollars.
He could not remember where he had parked the red bicycle.
The library is open from Monday to Saturday, except on public holidays.
Scientists discovered a new species of frog in the rainforest last year.
What time does the museum close on Sundays?
The password must contain at least 8 characters, including a number.
Once upon a time, a curious child found a map hidden inside an old book.
The meeting was postponed because the manager was ill.
Mount Everest is 8849 metres tall and lies on the border of Nepal and China.
Fresh bread, strong coffee and a good newspaper make a perfect breakfast.
The server returned error code 404 when the page could not be found.
Birds migrate south in autumn to escape the harsh winter weather.
Add the numbers 17, 23 and 56 to get a total of 96.
Every student must submit the assignment online before midnight.
The city council approved a plan to build 300 new homes near the park.
Light travels at roughly 299792 kilometres per second.
My grandmother grows tomatoes, beans and sunflowers in her garden.
The orchestra played Beethoven's ninth symphony to a full hall.
Do you prefer tea or coffee in the afternoon?
The software update fixes several bugs and improves battery life.
Heavy rain is expected this weekend, with winds up to 60 km per hour.
The detective examined the footprints carefully and smiled.
There are 365 days in a year, and 366 in a leap year.
Children laughed as the puppy chased its own tail around the yard.
The company hired 45 engineers to work on the new product.
Reading a chapter every night is a relaxing way to end the day.
The bridge was built in 1890 and repaired in 2015.
If you have any questions, feel free to contact our support team.
The history of science is full of surprising and happy accidents.
Prices rose by 3.5 percent last month, according to official figures.
They hiked for six hours and finally reached the top of the hill.
"""


def _train():  # -> tokenizers.Tokenizer
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Like Llama/Gemma, a plain encode starts with BOS.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train the tokenizer and save it (HF format, with chat template) into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,  # the model config bounds the length, not the tokenizer
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
