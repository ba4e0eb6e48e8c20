"""Tiny randomly initialised models of real transformers architectures, built in code.

Tests need an architecture (its attention layout, its config fields, its chat template
conventions), not good answers, and must not download anything. Each `tiny:ARCH` is the
real transformers model class with a few thousand parameters, a byte-level BPE tokenizer
trained in milliseconds on a fixed text, and a chat template in the style of that family
(Qwen3 and GLM carry an `enable_thinking` switch; the llama one does not, so both thinking
paths of the engine are exercised). Same arch, same weights: init is seeded.
Vision-language ones (`tiny:glm4v`, `tiny:qwen2_vl`, `tiny:qwen2_5_vl`, `tiny:smolvlm`)
live in tiny_vlm.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from workbench.errors import ModelSourceError

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A small model on a phone answers questions.",
    "Attention heads, key value caches and quantized weights decide latency and memory.",
    "What is the capital of France? Paris is the capital of France.",
    "Let me think step by step. First, second, third: the answer is 42.",
    "你好，世界。我是一个小模型。你是谁？",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" \n\t",
]

_CHATML_QWEN3 = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)

_CHATML_PLAIN = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_GLM = (
    "[gMASK]<sop>"
    "{%- for message in messages %}{{- '<|' + message['role'] + '|>\n' + message['content'] }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '\n<think></think>\n' }}{%- endif %}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class _Family:
    model_type: str
    special_tokens: tuple[str, ...]
    eos_tokens: tuple[str, ...]
    pad_token: str
    chat_template: str


FAMILIES = {
    "llama": _Family(
        "llama", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), ("<|im_end|>",), "<|endoftext|>", _CHATML_PLAIN
    ),
    "qwen3": _Family(
        "qwen3",
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        ("<|im_end|>", "<|endoftext|>"),
        "<|endoftext|>",
        _CHATML_QWEN3,
    ),
    "glm4": _Family(
        "glm4",
        ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        ("<|endoftext|>", "<|user|>", "<|observation|>"),
        "<|endoftext|>",
        _GLM,
    ),
}

# Reasoning tags are ordinary added tokens (not special), as in Qwen3 and GLM: decoding
# with skip_special_tokens keeps them, so the engine's parser sees them in the text.
_THINK_TOKENS = ["<think>", "</think>"]


def byte_level_tokenizer(
    special_tokens, eos_token: str, pad_token: str, added_tokens, chat_template: str
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the built-in corpus: every tiny model's tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token)
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    family = FAMILIES[arch]
    return byte_level_tokenizer(
        family.special_tokens, family.eos_tokens[0], family.pad_token, _THINK_TOKENS, family.chat_template
    )


def build_tiny(arch: str, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random `arch` model and its tokenizer: 2 layers, 4 query heads over 2 KV heads."""
    if arch not in FAMILIES:
        known = ", ".join(f"tiny:{a}" for a in FAMILIES)
        raise ModelSourceError(f"unknown tiny model 'tiny:{arch}' (known: {known})")
    from transformers import AutoConfig

    tokenizer = build_tokenizer(arch)
    family = FAMILIES[arch]
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in family.eos_tokens]
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
    )
    # Random init is seeded so that `tiny:glm4` is the same model in every test and run.
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
