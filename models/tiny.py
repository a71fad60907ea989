"""A tiny random Llama and a real byte-level BPE tokenizer, built on the fly in well under a second.

For tests that exercise batching, streaming and the HTTP surface without real weights. The tokenizer
is byte-level, so every string round-trips and CJK or emoji text spans several tokens, which is what
the incremental detokenizer must cope with. Both are deterministic: the same call builds the same
vocabulary and the same weights.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models import attention

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512
CONTEXT_LENGTH = 1024
SEED = 0

# ChatML, as SmolLM2 renders it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Once upon a time there was a small server that streamed tokens to its clients.",
    "Continuous batching lets requests join and leave the running batch between steps.",
    "def add(a, b):\n    return a + b\n",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 😀 🚀 🎉 👍 — and accents: café, naïve, über.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, and punctuation: ;:!?()[]{}",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=CONTEXT_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = SEED) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_LENGTH,
        # Larger than a real model's 0.02, so logits are peaked and greedy choices are rarely near-ties.
        initializer_range=0.5,
        eos_token_id=vocab_size - 1,
        tie_word_embeddings=False,
        attn_implementation=attention.NAME,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def build() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
