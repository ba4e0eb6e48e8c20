"""A loaded model plus everything needed to talk to it: what notebooks and front ends hold."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import cast

import torch
import yaml

from workbench.compress import checkpoint
from workbench.compress.pipeline import apply
from workbench.compress.quantization import preflight as quantize_preflight
from workbench.config import (
    ConfigError,
    GenerationConfig,
    MediaConfig,
    ModelConfig,
    WorkbenchConfig,
    load_config,
    parse_config,
)
from workbench.engine import ChatRequest, Engine
from workbench.engine.events import ChatResult, ReplyBuilder
from workbench.engine.media import Media
from workbench.modalities.adapter import VisionAdapter, shipped_adapter_dir
from workbench.modalities.native import NativeVision
from workbench.modalities.speech import SpeechRecognizer
from workbench.models import LoadedModel, load_model
from workbench.models.anatomy import weight_bytes, weight_bytes_by_dtype
from workbench.models.loader import resolve_device, resolve_dtype
from workbench.models.memory import MemoryReport, measure, megabytes, process_status

SAVED_CONFIG = "workbench.yaml"


def generation_defaults(loaded: LoadedModel, generation: GenerationConfig) -> GenerationConfig:
    """The config's `generation` section over the model's own sampling defaults (its generation
    config), over the workbench's: what a config file sets wins, what it leaves out comes from
    the model first, as vLLM applies a model's generation_config.json. A request's own fields
    win over all three."""
    chosen = generation.model_dump(include=generation.model_fields_set)
    return GenerationConfig(**(loaded.sampling_defaults | chosen))


class Session:
    """`.model` and `.tokenizer` are the plain transformers objects; `.engine` streams replies."""

    def __init__(self, loaded: LoadedModel, config: WorkbenchConfig):
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.media = media_for(loaded, config.media)
        self.engine = Engine(
            self.model,
            self.tokenizer,
            context_limit=config.model.context_limit,
            defaults=generation_defaults(loaded, config.generation),
            media=self.media,
        )
        if self.media.native is not None:
            self.engine.limit_batch(
                1, reason="a vision-language model keeps its multimodal rotary positions per model, not per row"
            )
        self.reports: list[dict] = []
        """What each compression step applied to this session changed."""
        self.load_peak = process_status().get("VmHWM", 0)
        """The process's peak resident bytes once the model was loaded (and, through `load`,
        compressed): what a phone must have free to get this far, not just to keep running."""

    def memory(self) -> MemoryReport:
        """This process's resident memory split into runtime, weights by dtype (every resident
        copy: anonymous tensors, mapped checkpoint pages, stale pages of replaced layers), live KV
        caches and the freed heap the last forwards left, beside the load peak. Parameter counts
        cannot show a float32 original that stayed resident behind an int8 model; this can."""
        return measure(
            [self.model, self.media.adapter], runtime_anon=self.loaded.runtime_anon, load_peak=self.load_peak
        )

    def summary(self, seconds: float | None = None) -> str:
        """The load line: the weights as the model holds them now (after compression, by dtype),
        and what the process holds; a quantized model no longer reads as its float32 original."""
        info = self.loaded
        by_dtype = weight_bytes_by_dtype(self.model)
        dtypes = ", ".join(f"{k} {megabytes(v)}" for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1]))
        status = process_status()
        return (
            f"Model loaded in {info.load_seconds if seconds is None else seconds:.1f}s"
            f" | weights {sum(by_dtype.values()) / 1e9:.2f} GB ({dtypes})"
            f" | resident {status.get('VmRSS', 0) / 1e9:.2f} GB, load peak {self.load_peak / 1e9:.2f} GB"
            f" | device {info.device} | compute {str(info.dtype).removeprefix('torch.')} | {info.source}"
        )

    def save(self, directory: str | Path, *, reapply: list | None = None) -> Path:
        """A checkpoint of the model as it is now (pruned shapes included) that
        `workbench.load(directory)` reads back, plus the compression reports. `reapply` lists
        compression steps (quantize, kv_cache) not yet applied that loading the folder applies.
        A quantized model is saved as it is held, int8/int4 tensors and their scales
        (workbench/compress/checkpoint.py), so loading it quantizes nothing again."""
        if checkpoint.is_quantized(self.model) or any(report.get("step") == "quantize" for report in self.reports):
            return checkpoint.save(self, directory, reapply=reapply)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / "compression.json").write_text(json.dumps(self.reports, indent=2))
        config = self.config.to_data()
        config["model"]["source"] = "."  # this folder, wherever it is moved
        config["compression"] = [step.model_dump(mode="json") for step in reapply or []]
        (directory / SAVED_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        return directory

    def export(
        self,
        path: str | Path,
        *,
        to: str = "gguf",
        type: str | None = None,
        pad: bool = False,
        overwrite: bool = False,
        check: bool = False,
    ):
        """The model as it is now, for a deployment runtime: `to="gguf"` one file for llama.cpp
        (`type` f16, q8_0 or q4_0), `to="hf"` a stock transformers checkpoint. See
        workbench/export and docs/export.md; returns an ExportResult."""
        from workbench.export import export

        return export(self, path, to=to, type=type, pad=pad, overwrite=overwrite, check=check)

    def chat(self, prompt: str | list[dict], **params) -> ChatResult:
        """One reply, collected. `prompt` is a user message or a list of OpenAI-style messages;
        `params` are ChatRequest fields (enable_thinking, max_tokens, temperature, stop, ...)."""
        if isinstance(prompt, str):
            request = ChatRequest.from_prompt(prompt, **params)
        else:
            request = ChatRequest(messages=prompt, **params)
        reply = ReplyBuilder()
        for event in self.engine.stream(request):
            reply.add(event)
        return reply.result()

    def __repr__(self) -> str:
        return f"Session({self.loaded.source}, {self.loaded.device}, weights {weight_bytes(self.model) / 1e9:.2f} GB)"


def media_for(loaded: LoadedModel, config: MediaConfig) -> Media:
    """The session's image and speech inputs, from its `media:` config section."""
    adapter = native = None
    no_vision = ""
    processor = getattr(loaded, "processor", None)
    if processor is not None:
        native = NativeVision(processor, dtype=loaded.dtype, device=loaded.device)
    elif config.vision_adapter == "none":
        no_vision = "media.vision_adapter is none in this session's config"
    else:
        path = shipped_adapter_dir() if config.vision_adapter == "auto" else Path(config.vision_adapter).expanduser()
        adapter, no_vision = _adapter_for(loaded, path, explicit=config.vision_adapter != "auto")
    speech = None
    no_speech = ""
    if config.speech == "none":
        no_speech = "media.speech is none in this session's config"
    else:

        def speech():  # faster-whisper loads on the first audio part, not with the session
            return SpeechRecognizer(config.speech)

    return Media(
        adapter=adapter,
        native=native,
        embed_tokens=loaded.model.get_input_embeddings(),
        speech=speech,
        speech_name=None if config.speech == "none" else config.speech,
        limits=config,
        no_vision_reason=no_vision,
        no_speech_reason=no_speech,
    )


def _adapter_for(loaded: LoadedModel, path: Path, *, explicit: bool):
    """(adapter, "") when `path` holds an adapter trained for this model, else (None, why).
    `auto` takes the shipped adapter only for the model it was trained on (the embedded
    default, compressed or not): another model's embedding space would read it as noise."""
    train = "train one for it with `python -m workbench.modalities.train_adapter --model SOURCE --out DIR`"
    config_file = path / "config.json"
    if not config_file.is_file():
        if explicit:
            raise ConfigError(
                f"media.vision_adapter: {path} is not a folder written by workbench.modalities.train_adapter"
            )
        return None, f"no vision adapter is installed at {path}; {train}"
    trained = json.loads(config_file.read_text(encoding="utf-8"))
    trained_for, width = trained.get("lm", "?"), trained.get("lm_hidden_size")
    hidden = cast(torch.Tensor, loaded.model.get_input_embeddings().weight).shape[1]
    if explicit and width != hidden:
        raise ConfigError(
            f"media.vision_adapter: {path} was trained for {trained_for} (embedding width {width}); "
            f"the loaded model's width is {hidden}"
        )
    if not explicit and (width != hidden or trained_for != loaded.source):
        return None, f"the shipped vision adapter was trained for {trained_for}, not {loaded.source}; {train}"
    weight = cast(torch.Tensor, loaded.model.get_input_embeddings().weight)
    return VisionAdapter.load(path, dtype=weight.dtype, device=weight.device), ""


def _config_for(spec_or_path: str | Path | WorkbenchConfig | None, overrides: dict) -> WorkbenchConfig:
    spec = None if spec_or_path is None or isinstance(spec_or_path, WorkbenchConfig) else str(spec_or_path)
    if isinstance(spec_or_path, WorkbenchConfig):
        config = spec_or_path  # built in code, e.g. by the chat UI's compression editor
    elif spec is None:
        config = WorkbenchConfig()
    elif spec.endswith((".yaml", ".yml")):
        config = load_config(spec)
    elif (Path(spec).expanduser() / SAVED_CONFIG).is_file():
        # A folder written by Session.save: its config, with the folder as the source.
        config = load_config(Path(spec).expanduser() / SAVED_CONFIG)
        config.model.source = str(Path(spec).expanduser())
    else:
        config = WorkbenchConfig(model=ModelConfig(source=spec))
    if overrides:
        data = config.to_data()
        data["model"].update(overrides)
        config = parse_config(data, origin=f"load(..., {', '.join(overrides)}=...)")
    return config


def preflight(config: WorkbenchConfig) -> None:
    """Fail before loading anything when a compression step cannot run on this machine."""
    steps = [s for s in config.compression if s.step == "quantize"]
    if steps:
        device = resolve_device(config.model.device)
        dtype = resolve_dtype(config.model.dtype, device)
        for step in steps:
            quantize_preflight(step.model_extra or {}, torch.device(device), dtype)


def load(
    spec_or_path: str | Path | WorkbenchConfig | None = None, *, quiet: bool = False, **model_overrides
) -> Session:
    """A Session from a config file or WorkbenchConfig, a source string (`embedded:…`,
    `tiny:…`, a hub id) or a saved model directory; nothing means the defaults of configs/default.yaml (the embedded
    model). Keyword arguments override the config's `model:` section,
    e.g. `load("tiny:qwen3", device="cpu", context_limit=1024)`."""
    start = time.perf_counter()
    config = _config_for(spec_or_path, model_overrides)
    preflight(config)
    session = Session(load_model(config.model, quiet=True, quantized_reader=checkpoint.read), config)
    if config.compression:
        session.reports = apply(session, config.compression)
    if config.model.compile:
        session.engine.compile_decode()
    session.loaded.weight_bytes = weight_bytes(session.model)  # as compressed, not as read from disk
    session.load_peak = process_status().get("VmHWM", 0)
    if not quiet:
        print(session.summary(time.perf_counter() - start), file=sys.stderr, flush=True)
    return session
