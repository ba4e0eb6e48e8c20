"""The LoRA adapter folder the workbench writes and reads: save, check, load and merge.

A folder holds peft's `adapter_config.json`, the LoRA weights in fp16 safetensors, a
`recovery.json` record of the model and the pruned shape it was trained on (so it refuses
any other), optionally the chat template it was trained with, and optionally the base weights
it was trained on top of that slicing the original cannot give back: a recovery LoRA is trained
after o_proj compensation, whose refit depends on the calibration text (the `mix` holds the
model's own generations, which a CPU with other kernels may word differently, and takes minutes
to generate); carrying the refitted o_proj makes loading the adapter give the model it was
trained on, on any machine, with no calibration read. Recovery after pruning and
the thinking adapter both write this format; `model.adapter` in a config merges one at load.
The merge leaves a plain transformers model, so nothing downstream knows an adapter was used.

peft is imported inside the functions that use it: it costs a second of start-up that a
session without an adapter should not pay.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workbench.errors import ModelSourceError
from workbench.models.anatomy import pruned_shape
from workbench.paths import ADAPTER_RECORD, resolve_path

LORA_WEIGHTS = "adapter_model.safetensors"
BASE_WEIGHTS = "base_weights.safetensors"
TEMPLATE_FILE = "chat_template.jinja"


def check_adapter(folder: Path, model, removed: dict | None = None) -> dict:
    """The adapter's record, after checking it was trained on a model of this shape and, given the
    prune's `removed` groups, after removing those: the shape (KV heads per layer) can match while
    the groups differ, and other heads' q/k/v would then meet a LoRA and o_proj fitted to the ones
    removed, silently."""
    record = json.loads((folder / ADAPTER_RECORD).read_text())
    shape = pruned_shape(model)
    if record.get("kv_heads_per_layer") != shape:
        raise ValueError(
            f"adapter {folder} was trained on a model with KV heads per layer {record.get('kv_heads_per_layer')}, "
            f"but this model has {shape}: it fits only the exact pruned model it was made for "
            f"(prune_heads {record.get('prune', {}).get('options')}); prune the same way or train a new adapter"
        )
    config = model.config
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "model_type"):
        if key in record.get("model", {}) and record["model"][key] != getattr(config, key, None):
            raise ValueError(
                f"adapter {folder} was trained on a model with {key}={record['model'][key]}, "
                f"this one has {getattr(config, key, None)}"
            )
    theirs = {int(k): sorted(v) for k, v in (record.get("prune") or {}).get("removed", {}).items() if v}
    ours = {int(k): sorted(v) for k, v in (removed or {}).items() if v}
    if theirs and ours and theirs != ours:
        raise ValueError(
            f"adapter {folder} was trained after removing KV groups {theirs}; this prune removes {ours}: "
            "it fits only those groups (list them with remove:)"
        )
    return record


def load_adapter(model, folder: Path, removed: dict | None = None) -> dict:
    """Put back the base weights the adapter was trained on top of (when it carries any), apply
    its LoRA and merge it: the model stays a plain transformers model. Returns its record
    (checked as check_adapter checks it)."""
    from peft import LoraConfig, get_peft_model

    record = check_adapter(folder, model, removed)
    load_base(model, folder)
    lora = LoraConfig.from_pretrained(str(folder))
    # The record names the model (a source such as embedded:...), which is never the folder the
    # weights were read from; peft would warn that it "was renamed" at every load. recovery.json
    # is what checks that the adapter fits this model.
    lora.base_model_name_or_path = None
    peft_model = get_peft_model(model, lora)
    load_lora(peft_model, folder, model.dtype)
    merged = peft_model.merge_and_unload()
    assert merged is model  # merged in place: the session's engine keeps its model
    return record


def load_lora(peft_model, folder: Path, dtype: torch.dtype) -> None:
    """The folder's LoRA weights into a peft wrapper of the same rank and targets."""
    from peft import set_peft_model_state_dict

    weights = {k: v.to(dtype) for k, v in load_file(folder / LORA_WEIGHTS).items()}
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter {folder} holds weights this model has no place for: {unexpected[:3]}")


def load_base(model, folder: Path) -> None:
    """The base weights the adapter was trained on top of, when it carries any."""
    if (folder / BASE_WEIGHTS).is_file():
        _load_base(model, folder)


def _load_base(model, folder: Path) -> None:
    base = load_file(folder / BASE_WEIGHTS)
    params = dict(model.named_parameters())
    for name, weight in base.items():
        if name not in params or params[name].shape != weight.shape:
            found = tuple(params[name].shape) if name in params else "no such weight"
            raise ValueError(
                f"adapter {folder} carries base weight {name} {tuple(weight.shape)} for this model, which has {found}"
            )
    with torch.no_grad():
        for name, weight in base.items():
            params[name].copy_(weight.to(params[name].dtype))


def _half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in tensors.items()}


def save_adapter(peft_model, model, folder: Path, record: dict, base: dict[str, torch.Tensor] | None = None) -> None:
    """`base`: weights (by the plain model's parameter names) the LoRA was trained on top of,
    which loading puts back before merging; written in fp16, as the LoRA is."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    if base:
        save_file(_half(base), folder / BASE_WEIGHTS)
        record = {**record, "base_weights": sorted(base)}
    save_file(_half(get_peft_model_state_dict(peft_model)), folder / LORA_WEIGHTS)
    peft_model.peft_config["default"].save_pretrained(str(folder))
    config = model.config
    record = {
        **record,
        "kv_heads_per_layer": pruned_shape(model),
        "model": {
            k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        },
    }
    (folder / ADAPTER_RECORD).write_text(json.dumps(record, indent=2))


def merge_adapter(model, tokenizer, adapter: str) -> None:
    """Merge a LoRA folder into `model` (it stays a plain transformers model) and take its
    chat template, which is what carries a thinking adapter's `enable_thinking` switch."""
    folder = resolve_path(adapter)
    try:
        load_adapter(model, folder)
    except ValueError as exc:
        raise ModelSourceError(f"model.adapter: {exc}") from None
    template = folder / TEMPLATE_FILE
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
