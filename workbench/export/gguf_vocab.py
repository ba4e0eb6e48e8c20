"""The tokenizer, special tokens and chat template of a transformers tokenizer, as GGUF keys.

llama.cpp re-implements the tokenizer from what the file carries: the token list with a
type per token, the BPE merges, and a named pre-tokenizer (`tokenizer.ggml.pre`: the regex
that splits text before BPE). The token types follow llama.cpp's convert_hf_to_gguf
(`get_vocab_base`): special added tokens are CONTROL, other added tokens USER_DEFINED,
ids the tokenizer does not use UNUSED. The pre-tokenizer is chosen from the HF tokenizer's
own pre-tokenizer, so llama.cpp splits text the way the engine does (the embedded model's
converted tokenizer is plain byte-level GPT-2 splitting, hence `gpt-2`); a pre-tokenizer
this module does not recognise is refused rather than guessed, since a wrong one changes
how prompts tokenize without any error.
"""

from __future__ import annotations

import json

import gguf

from workbench.errors import ExportError

_QWEN2_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"


def _byte_level(step: dict, *, regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and bool(step.get("use_regex", True)) == regex
        and not step.get("add_prefix_space")
    )


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (see module doc)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _byte_level(steps[1], regex=True)
    ):
        return "smollm"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == _QWEN2_REGEX
        and _byte_level(steps[1], regex=False)
    ):
        return "qwen2"
    raise ExportError(
        "the tokenizer's pre-tokenizer is not one llama.cpp's gpt-2, smollm or qwen2 splitting reproduces "
        f"({json.dumps(pre)[:200]}); exporting it would tokenize prompts differently in llama.cpp"
    )


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, eos_token_id: int | None) -> None:
    """Write the tokenizer keys: model gpt2 (byte-level BPE), tokens, types, merges, ids, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs its BPE vocabulary and merges"
        )
    data = json.loads(backend.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {data.get('model', {}).get('type')}"
        )
    pre = pre_tokenizer_name(data)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    for kind, value in ids.items():
        if value is not None:
            getattr(writer, f"add_{kind}_token_id")(int(value))
    # Whether encoding plain text adds a BOS token, as the HF tokenizer does it.
    plain, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and plain[:1] == [tokenizer.bos_token_id] != bare[:1])
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
