"""A tiny Llama-style model and character-level tokenizer built in code, for the offline default and tests.

Written to a normal Hugging Face folder, so everything downstream takes the same path as a real model.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from qmor.files import atomic_dir

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list(string.printable)  # digits, letters, punctuation and whitespace: enough for every built-in task
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2 + hidden // 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=7,
                       tie_word_embeddings=False,
                       # std-preserving init: at the usual 0.02 a frozen random head caps logits near +-1.3, so
                       # nothing could be learnt to a peaked distribution
                       initializer_range=hidden**-0.5)


def make_tiny(path: str | Path, seed: int = 0, **dims) -> Path:
    """Write a random tiny Llama and its tokenizer to `path` (fixed seed: the same bytes every time)."""
    return write_random(path, lambda vocab: tiny_config(vocab, **dims), seed)


def write_random(path: str | Path, config_for, seed: int = 0) -> Path:
    """Write a random causal LM built from `config_for(vocab_size)` and the character tokenizer to `path`, unless a
    model is there already."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(len(tok)))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path
