"""A tiny random Llama with a SentencePiece tokenizer and a ChatML template: the smallest model llama.cpp's converter
takes (it refuses the built-in tiny model's character-level WordLevel tokenizer, which GGUF has no type for)."""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "the quick brown fox jumps over a lazy dog once upon time def add return what is and user assistant".split()


def make_spm_llama(path: str | Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmor.files import atomic_dir
    from qmor.model.tiny import tiny_config

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)] + [string.printable]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   character_coverage=1.0, pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    with atomic_dir(path) as tmp:
        (tmp / "tokenizer.model").write_bytes(buf.getvalue())
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}))
        tok = AutoTokenizer.from_pretrained(str(tmp))
        tok.chat_template = CHATML
        config = tiny_config(len(tok), hidden=64, layers=2)
        config.eos_token_id, config.pad_token_id = tok.eos_token_id, None
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path
