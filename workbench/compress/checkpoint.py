"""Quantized checkpoints: a compressed model saved as it is held, read back without a float32 copy.

A quantized session used to be saved as its float32 checkpoint plus a recipe that quantized it
again at every load: 538 MB on disk for the embedded model, a load that paid the whole float32
model and the quantization's temporaries (the load peak), and minutes for a GPTQ-rounded model.
Here the file holds what the layers hold (`Int8Linear`'s int8 weight and scales, `Int4Linear`'s
packed weight and scales-and-zeros, a cast layer's fp16/bf16 weight, the float32 tensors left),
in the pruned shapes, with adapters already merged. `quantization.json` says which layer is which
kind and with what shapes, so loading builds the model on the meta device (accelerate's
`init_empty_weights`: no float32 weight is ever allocated), puts each quantized layer together
from the file's tensors and assigns the rest. safetensors maps the file, so the weights are the
file's pages: the load peak is the steady state, and a saved int4 model loads in about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
import yaml
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from workbench.compress.int4_linear import Int4Linear
from workbench.compress.int8_linear import Int8Linear, kernel_available
from workbench.compress.quantization import CastIOLinear, _cast_io
from workbench.errors import ModelSourceError
from workbench.models.anatomy import restore_pruned_shapes
from workbench.models.loader import QUANTIZED_MANIFEST
from workbench.models.memory import aligned, malloc_trim
from workbench.step_options import QuantizeOptions

FORMAT = "workbench-quantized"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
_FLOAT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOAT_DTYPES = {v: k for k, v in _FLOAT_NAMES.items()}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _layer_record(module: nn.Module) -> dict | None:
    """What loading needs to rebuild a layer the file cannot describe by its tensors alone."""
    if isinstance(module, Int4Linear):
        return {
            "kind": "int4",
            "shape": [module.out_features, module.in_features],
            "group_size": module.group_size,
            "tensors": {
                "weight": [list(module.weight.shape), _dtype_name(module.weight)],
                "scales_and_zeros": [list(module.scales_and_zeros.shape), _dtype_name(module.scales_and_zeros)],
            },
        }
    if isinstance(module, Int8Linear):
        return {
            "kind": "int8",
            "shape": [module.out_features, module.in_features],
            "tensors": {
                "weight": [list(module.weight.shape), _dtype_name(module.weight)],
                "scales": [list(module.scales.shape), _dtype_name(module.scales)],
            },
        }
    if isinstance(module, CastIOLinear):
        return {"kind": _FLOAT_NAMES[module.io_dtype], "shape": [module.out_features, module.in_features]}
    return None


def unstorable(model: nn.Module) -> list[str]:
    """Layers whose weight is a tensor subclass (torchao's int8_dynamic, CUDA int4, int8 where
    PyTorch has no packed kernel): their state is not plain tensors a safetensors file can hold."""
    return [
        name
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
        if type(t) not in (torch.Tensor, nn.Parameter) or type(t.data) is not torch.Tensor
    ]


def is_quantized(model: nn.Module) -> bool:
    """Whether the model holds layers only this format (or no format) can save: a quantized
    checkpoint read back has no quantize step in its reports, and must save the same way."""
    return any(_layer_record(m) is not None for m in model.modules()) or bool(unstorable(model))


def storable_schemes(steps, device: str) -> bool:
    """Whether every scheme of these quantize steps gives plain-tensor layers on `device`, so the
    quantized model can be saved as such (compress decides before quantizing what to save)."""
    plain = {"keep", "fp16", "bf16"}
    if kernel_available(torch.device(device).type):
        plain.add("int8_weight_only")
    if torch.device(device).type == "cpu":
        plain.add("int4_weight_only")
    return all(QuantizeOptions.model_validate(step.model_extra or {}).schemes <= plain for step in steps)


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each storage once (safetensors refuses shared tensors) and the keys
    left out as aliases of the one kept: a tied lm_head is the embedding table, once."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, t in model.state_dict().items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if where in seen:
            aliases[key] = seen[where]
            continue
        seen[where] = key
        state[key] = t.detach().to("cpu").contiguous()
    return state, aliases


def save(session, directory: str | Path, reapply: list | None = None) -> Path:
    """Write `session`'s model as it is held (see the module docstring); `reapply` lists the
    steps that live outside the weights (kv_cache), recorded for `workbench.load(directory)`.
    Left out, it is the session's own kv_cache steps: a policy is no weight, and the folder
    should answer as the session did."""
    if reapply is None:
        reapply = [step for step in session.config.compression if step.step == "kv_cache"]
    from_steps = [s for s in reapply if s.step in ("quantize", "prune_heads", "recover")]
    if from_steps:
        raise ValueError(
            f"a quantized checkpoint holds its weights as compressed; {from_steps[0].step} cannot be re-applied"
        )
    model = session.model
    subclassed = unstorable(model)
    if subclassed:
        raise ValueError(
            f"{subclassed[0]} is a tensor subclass (a torchao scheme without a plain-tensor layer here: "
            "int8_dynamic, or int4/int8 off the CPU kernels), which a safetensors checkpoint cannot hold; "
            "save before the quantize step with reapply=[...], or keep the config and rebuild with workbench.load(config)"
        )
    layers = {name: record for name, m in model.named_modules() if (record := _layer_record(m)) is not None}
    state, aliases = _state(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / WEIGHTS, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    session.tokenizer.save_pretrained(directory)
    made_by = session.config.to_data()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": layers,
        "aliases": aliases,
        "tensors": len(state),
        "made_by": made_by,
    }
    (directory / QUANTIZED_MANIFEST).write_text(json.dumps(manifest, indent=2))
    (directory / "compression.json").write_text(json.dumps(session.reports, indent=2))
    config = session.config.to_data()
    config["model"]["source"] = "."  # this folder, wherever it is moved
    config["model"]["adapter"] = None  # merged into the saved weights
    config["compression"] = [step.model_dump(mode="json") for step in reapply]
    (directory / "workbench.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def read_manifest(path: Path) -> dict:
    """The manifest, checked: present, readable, of this format and a version this code reads."""
    required = ["config.json", WEIGHTS, QUANTIZED_MANIFEST]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise ModelSourceError(f"{path}: quantized checkpoint is missing {', '.join(missing)}")
    try:
        manifest = json.loads((path / QUANTIZED_MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path / QUANTIZED_MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelSourceError(f"{path / QUANTIZED_MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelSourceError(
            f"{path}: quantized checkpoint format version {version!r}; this workbench reads versions 1 to "
            f"{FORMAT_VERSION} (written by a newer workbench? update it, or save the model again with this one)"
        )
    return manifest


def _tensor(f, path: Path, key: str, shape: list[int] | tuple[int, ...], dtype: str | torch.dtype) -> torch.Tensor:
    """One tensor of the file, memory-mapped, after its shape and dtype are checked against what
    the manifest and the model's config say it must be: a tampered file fails here, by name."""
    if key not in f.keys():
        raise ModelSourceError(f"{path / WEIGHTS} has no tensor {key}")
    t: torch.Tensor = f.get_tensor(key)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    if tuple(t.shape) != tuple(shape) or t.dtype != want:
        raise ModelSourceError(
            f"{path / WEIGHTS}: {key} is {_dtype_name(t)} {list(t.shape)}, the checkpoint's config and "
            f"manifest say {str(want).removeprefix('torch.')} {list(shape)}"
        )
    return t


def _check_shape(path: Path, name: str, record: dict, meta: nn.Linear) -> None:
    if list(record["shape"]) != [meta.out_features, meta.in_features]:
        raise ModelSourceError(
            f"{path / QUANTIZED_MANIFEST}: {name} is {record['shape']} there, "
            f"[{meta.out_features}, {meta.in_features}] in config.json"
        )


def _bias(f, path: Path, name: str, meta: nn.Linear) -> torch.Tensor | None:
    if meta.bias is None:
        return None
    return _tensor(f, path, f"{name}.bias", meta.bias.shape, meta.bias.dtype)


def _build_layer(f, path: Path, name: str, record: dict, meta: nn.Linear) -> nn.Module:
    _check_shape(path, name, record, meta)
    kind = record.get("kind")
    if kind == "int8":
        out, inp = record["shape"]
        # the kernels' operands start where the tensor before them in the file ended: aligned here
        weight = aligned(_tensor(f, path, f"{name}.weight", (out, inp), torch.int8))
        scales = aligned(_tensor(f, path, f"{name}.scales", (out,), torch.bfloat16))
        return Int8Linear(weight, scales, _bias(f, path, name, meta))
    if kind == "int4":
        expected = record["tensors"]
        packed = aligned(_tensor(f, path, f"{name}.weight", *expected["weight"]))
        sz = aligned(_tensor(f, path, f"{name}.scales_and_zeros", *expected["scales_and_zeros"]))
        group_size = int(record["group_size"])
        out, inp = record["shape"]
        rows = out + (-out % 16)
        if packed.dtype != torch.uint8 or sz.shape[0] * group_size != inp or sz.shape[1] != rows:
            raise ModelSourceError(
                f"{path / WEIGHTS}: {name} does not hold an int4 layer of [{out}, {inp}] in groups of {group_size}"
            )
        return Int4Linear(packed, sz, group_size, (out, inp), _bias(f, path, name, meta))
    if kind in _FLOAT_DTYPES:
        layer = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
        layer.weight = nn.Parameter(
            _tensor(f, path, f"{name}.weight", meta.weight.shape, _FLOAT_DTYPES[kind]), requires_grad=False
        )
        if meta.bias is not None:
            layer.bias = nn.Parameter(
                _tensor(f, path, f"{name}.bias", meta.bias.shape, _FLOAT_DTYPES[kind]), requires_grad=False
            )
        _cast_io(layer, _FLOAT_DTYPES[kind])
        return layer
    raise ModelSourceError(f"{path / QUANTIZED_MANIFEST}: {name} has an unknown layer kind {kind!r}")


def read(path: Path, device: str, dtype: torch.dtype):
    """(model, tokenizer) of a quantized checkpoint written by `save`, with no float32 weight
    materialised: the model is built on the meta device, then every tensor is the file's own
    memory-mapped one. The float tensors keep the dtype they were saved in (`dtype` is the
    compute dtype the session was made with)."""
    manifest = read_manifest(path)
    layers: dict[str, dict] = manifest.get("layers") or {}
    if device != "cpu" and any(r.get("kind") == "int4" for r in layers.values()):
        raise ModelSourceError(
            f"{path}: its int4 layers are in the CPU kernel's packed layout; load it with device: cpu"
        )
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restore_pruned_shapes(model)
    with safe_open(path / WEIGHTS, framework="pt", device="cpu") as f:
        meta_version = (f.metadata() or {}).get("format_version")
        if meta_version != str(manifest["format_version"]):
            raise ModelSourceError(
                f"{path}: {WEIGHTS} says format version {meta_version!r}, "
                f"{QUANTIZED_MANIFEST} {manifest['format_version']!r}: the two files are from different saves"
            )
        used: set[str] = set()
        for name, record in layers.items():
            try:
                meta = cast(nn.Linear, model.get_submodule(name))
            except AttributeError:
                raise ModelSourceError(f"{path / QUANTIZED_MANIFEST}: the model has no layer {name}") from None
            layer = _build_layer(f, path, name, record, meta)
            model.set_submodule(name, layer)
            used |= {f"{name}.{k}" for k, _ in layer.state_dict().items()}
        expected = model.state_dict()
        rest = {}
        for key in f.keys():
            if key in used:
                continue
            if key not in expected:
                raise ModelSourceError(f"{path / WEIGHTS} holds {key}, which the model has no place for")
            rest[key] = _tensor(f, path, key, expected[key].shape, expected[key].dtype)
    for alias, kept in (manifest.get("aliases") or {}).items():
        if kept not in rest:
            raise ModelSourceError(f"{path / QUANTIZED_MANIFEST}: {alias} is an alias of {kept}, which is not stored")
        rest[alias] = rest[kept]
    model.load_state_dict(rest, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelSourceError(
            f"{path / WEIGHTS} is missing {len(left)} tensors the model needs: {', '.join(left[:5])}"
        )
    if manifest.get("aliases"):
        model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if device != "cpu":
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # building the model left ~40 MB of freed heap resident (Session.memory's "unaccounted")
    malloc_trim()
    return model, tokenizer
