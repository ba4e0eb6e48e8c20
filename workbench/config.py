"""Typed configuration read from ``configs/*.yaml``.

A config says which model to load and how, what a reply defaults to, and which
compression steps to apply. Every key is checked: a typo must fail loudly with the
file and the key named, not be silently ignored and leave the user measuring the
wrong thing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from workbench.errors import ConfigError as ConfigError  # re-exported: configs raise it, users catch it from here
from workbench.paths import ADAPTER_RECORD, resolve_path
from workbench.sampling_params import SamplingParams
from workbench.step_options import STEP_OPTIONS

DEFAULT_SOURCE = "embedded:smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    source: str = DEFAULT_SOURCE
    """`embedded:NAME`, `tiny:ARCH`, a local directory, or a Hugging Face hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto` is float32 on CPU and bfloat16 on CUDA."""
    device: str = "auto"
    """`auto` (cuda when present, else cpu), `cpu`, `cuda` or `cuda:N`."""
    max_memory: dict[str | int, str] | None = None
    """Per-device memory caps for accelerate's `device_map="auto"`, e.g. {0: "20GiB", cpu: "64GiB"}."""
    context_limit: int = Field(8192, ge=16, le=1_048_576)
    """Prompt plus reply tokens; 8K as on the reference phone model."""
    adapter: str | None = None
    """A LoRA folder merged into the weights right after loading (a `python -m workbench.reasoning`
    or recovery `save_adapter` folder); its chat_template.jinja, when there, replaces the
    tokenizer's. `data/thinking` is the embedded model's thinking adapter (configs/thinking.yaml)."""
    compile: bool = False
    """Decode lone requests through torch.compile over a static KV cache: faster per token
    after a one-time compilation (seconds on a GPU, a minute or more on a small CPU)."""

    @field_validator("adapter")
    @classmethod
    def _adapter_folder(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not (resolve_path(value) / ADAPTER_RECORD).is_file():
            raise ValueError(f"{value!r} is not an adapter folder (no {ADAPTER_RECORD} there)")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, not {value!r}")


class GenerationConfig(_Strict, SamplingParams):
    """What a reply defaults to: every sampling knob (declared, bounded and defaulted in
    workbench/sampling_params.py), and whether the model thinks first."""

    enable_thinking: bool = False
    return_reasoning: bool = True


class MediaConfig(_Strict):
    """What the session sees and hears besides text (see workbench/modalities)."""

    vision_adapter: str = "auto"
    """For a text-only model: `auto` (the shipped ViT-Tiny adapter when it was trained for
    the loaded model, i.e. the embedded default), `none`, or a folder written by
    `python -m workbench.modalities.train_adapter`. Vision-language models use their own
    processor instead."""
    speech: str = "tiny.en"
    """Whisper for `input_audio` parts: `tiny.en` (English), `base` (multilingual), `none`,
    or a folder holding a CTranslate2 Whisper model."""
    speech_language: str | None = None
    """Language code to transcribe in (e.g. `en`, `de`); None detects it."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs. Off: only data: URLs, so nothing reaches the network."""
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=64 * 64)
    """Larger images (or decompression bombs declaring them) are refused before decoding."""
    max_audio_seconds: float = Field(120.0, gt=0)
    """Two minutes is a long voice message, and on a busy 2-core CPU Whisper base takes about as
    long as the audio (see the speech bench), so a longer clip would hold the one recognizer for
    minutes; that belongs in a transcription tool."""


class CompressionStep(BaseModel):
    """One step of the compression pipeline: its name plus that step's own options."""

    model_config = ConfigDict(extra="allow")
    step: str

    @field_validator("step")
    @classmethod
    def _known_step(cls, name: str) -> str:
        if name not in STEP_OPTIONS:
            known = ", ".join(sorted(STEP_OPTIONS)) or "none are available in this version"
            raise ValueError(f"unknown compression step {name!r} (known steps: {known})")
        return name

    @model_validator(mode="after")
    def _valid_options(self) -> CompressionStep:
        options_model = STEP_OPTIONS[self.step]
        try:
            options_model.model_validate(self.model_extra or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {_describe(e)}" if e["loc"] else _describe(e)
                for e in exc.errors()
            )
            raise ValueError(f"{self.step}: {problems}") from None
        return self


class WorkbenchConfig(_Strict):
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    media: MediaConfig = MediaConfig()
    compression: list[CompressionStep] = []

    def to_data(self) -> dict[str, Any]:
        """The config as plain data to edit and parse again: the `generation` section holds only
        the knobs it set, so a knob it leaves out stays the model's own default (session.py)."""
        data = self.model_dump(mode="json")
        data["generation"] = self.generation.model_dump(mode="json", exclude_unset=True)
        return data

    @field_validator("compression")
    @classmethod
    def _prune_before_quantize(cls, steps: list[CompressionStep]) -> list[CompressionStep]:
        names = [s.step for s in steps]
        if "quantize" in names and "prune_heads" in names[names.index("quantize") :]:
            raise ValueError("prune_heads must come before quantize: pruning slices plain weight matrices")
        if "recover" in names:
            at = names.index("recover")
            if names.count("recover") > 1:
                raise ValueError("recover is listed twice; one recovery step heals the pruned model")
            if "prune_heads" not in names[:at]:
                raise ValueError(
                    "recover must come after prune_heads: it heals a pruned model (nothing to recover otherwise)"
                )
            if "quantize" in names[:at]:
                raise ValueError("recover must come before quantize: it trains (or merges into) plain float weights")
        return steps


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _describe(error: ErrorDetails) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return error["msg"].removeprefix("Value error, ")


def parse_config(data: Any, origin: str = "<config>") -> WorkbenchConfig:
    """Validate an already-parsed mapping; `origin` names where it came from in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return WorkbenchConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{origin}: {_location(e['loc'])}: {_describe(e)}" for e in exc.errors()]
        raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> WorkbenchConfig:
    """A relative path that is not there is tried against the repository too, so the shipped
    `configs/NAME.yaml` load by that name from anywhere (a notebook runs in notebooks/)."""
    path = resolve_path(str(path))
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, origin=str(path))
