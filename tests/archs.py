"""Tiny random models of many transformers architectures, saved as local folders with qmor's character tokenizer.

Each config is the architecture's own config class at toy sizes (hidden 64, 2 layers, 4 heads): enough to exercise
its module layout (fused projections, biases, tied heads, soft-capping, partial rotary) in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from qmor.model.tiny import write_random

HIDDEN, LAYERS, HEADS = 64, 2, 4
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 7}
# 4 heads of 16; everything but the sizes (positions, attention variants, norms) keeps the class defaults
ROTARY = {"num_key_value_heads": 2, "max_position_embeddings": 256}
GEMMA = {**ROTARY, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}

# name -> (config class, sizes): the supported matrix
SUPPORTED = {
    "llama": ("LlamaConfig", {**ROTARY, "intermediate_size": 160}),  # 160: a width that is not a multiple of 64
    "mistral": ("MistralConfig", {**ROTARY, "intermediate_size": 128, "sliding_window": 32}),
    "qwen2": ("Qwen2Config", {**ROTARY, "intermediate_size": 128}),  # q, k, v carry biases
    "qwen3": ("Qwen3Config", {**ROTARY, "intermediate_size": 128, "head_dim": 16}),  # q/k norms
    "gemma2": ("Gemma2Config", {**GEMMA, "intermediate_size": 128}),  # logit soft-capping, tied head
    "gemma3_text": ("Gemma3TextConfig", {**GEMMA, "intermediate_size": 128}),
    "phi3": ("Phi3Config", {**ROTARY, "intermediate_size": 96}),  # fused qkv_proj and gate_up_proj
    "olmo2": ("Olmo2Config", {**ROTARY, "intermediate_size": 128}),
    "granite": ("GraniteConfig", {**ROTARY, "intermediate_size": 128, "embedding_multiplier": 2.0,
                                  "logits_scaling": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25}),
    "gpt_neox": ("GPTNeoXConfig", {"intermediate_size": 128, "max_position_embeddings": 256}),  # fused qkv, biases
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": HIDDEN, "max_position_embeddings": 256}),
    "starcoder2": ("Starcoder2Config", {**ROTARY, "intermediate_size": 128, "sliding_window": 32}),
    # mixtures of experts: 4-bit experts (qmor.model.moe), 4 of them, 2 routed per token
    "mixtral": ("MixtralConfig", {**ROTARY, "intermediate_size": 128, "num_local_experts": 4,
                                  "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {**ROTARY, "intermediate_size": 128, "moe_intermediate_size": 64,
                                     "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16}),
}
# architectures qmor refuses or warns about
GPT2 = ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256})
FALCON = ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2, "max_position_embeddings": 256})
MIXTRAL, QWEN3_MOE = SUPPORTED["mixtral"], SUPPORTED["qwen3_moe"]
# experts stored transposed, with biases: left unquantised, with a warning
GPT_OSS = ("GptOssConfig", {**ROTARY, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                            "head_dim": 16, "sliding_window": 32})


def make_config(spec: tuple[str, dict], vocab_size: int):
    import transformers

    name, sizes = spec
    common = {"vocab_size": vocab_size, **SPECIAL_IDS}
    if name != "GPT2Config":
        common.update(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    # std-preserving init, as in qmor.model.tiny: with 0.02 a random model's logits are nearly flat
    key = "init_std" if name == "OPTConfig" else "initializer_range"
    return getattr(transformers, name)(**common, **sizes, **{key: HIDDEN**-0.5})


def make_model(path: Path, spec: tuple[str, dict], seed: int = 0) -> Path:
    """Write a random model of `spec` (a (config class, sizes) pair) and the character tokenizer to `path`."""
    return write_random(path, lambda vocab: make_config(spec, vocab), seed)
