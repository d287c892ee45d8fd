"""A byte-level, character-per-token tokenizer with Llama-3 special tokens.

Why byte-level with no merges: any text encodes (no unknown tokens) and every
character is one token (two for non-ASCII bytes), which is what lets a tiny model
learn character tasks such as reversing or sorting a word. Why Llama-3 specials and
chat template: the embedded model must look like a real Llama-3 Instruct checkpoint
so the same training/inference code path serves it and hub models alike.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD]

# Llama-3 Instruct style; bos comes from the template, not the post-processor.
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

MODEL_MAX_LENGTH = 2048


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer: 256 byte symbols (ids 0-255), then the 6 specials (256-261)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    # Specials get ids 256-261 in SPECIAL_TOKENS order and are never split into bytes.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # No post-processor: tokenizer("abc") carries no specials; the chat template adds bos.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOT,  # as in Llama-3 Instruct: generation of a turn ends at <|eot_id|>
        pad_token=PAD,  # distinct from eos so eos labels are never masked as padding
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": [END_OF_TEXT, START_HEADER, END_HEADER]})
    tok.chat_template = CHAT_TEMPLATE
    return tok
