"""The presets' tokenizer: byte-level BPE trained offline on text every Python has.

Byte-level, so any text round-trips (no unknown token), and trained with the ``tokenizers``
library on The Zen of Python (the stdlib's ``this`` module), so it is made the same on every
machine with no download. Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``, as the presets' configs
say; then the 256 bytes; then the merges. It has a chat template, and pads on the left, as a
decoder-only model's batches must.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

SPECIAL = ("<pad>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def corpus() -> str:
    """The Zen of Python, decoded from the stdlib's ``this`` (whose import prints it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(c, c) for c in this.s)


def build(vocab_size: int) -> Any:
    """A transformers fast tokenizer with at most ``vocab_size`` ids (at least 259: specials and bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL) + 256:
        raise ValueError(f"a byte-level tokenizer needs {len(SPECIAL) + 256} ids; the vocabulary has {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus().splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast
