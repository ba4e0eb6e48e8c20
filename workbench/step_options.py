"""The options of each compression step, checked when a config is read.

They live on the ground floor, apart from the steps that use them, because a config names
its steps and their options before any model or compression code loads: reading
`configs/pruned-25.yaml` checks every key of every step without importing torch's
training stack. `compress/` maps each name in `STEP_OPTIONS` to the function that runs it.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workbench.paths import ADAPTER_RECORD, resolve_path

# --- prune_heads ---------------------------------------------------------------------------

Criterion = Literal["taylor", "attention_entropy", "weight_norm", "random"]
CRITERIA: tuple[str, ...] = ("taylor", "attention_entropy", "weight_norm", "random")


class PruneOptions(BaseModel):
    """Options of the `prune_heads` step, checked when the config is read."""

    model_config = ConfigDict(extra="forbid")
    criterion: Criterion = "taylor"
    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    """Fraction of all KV groups (with their query heads) to remove, ranked across layers."""
    per_layer: int | None = Field(None, ge=0)
    """Or: this many KV groups removed from every layer."""
    remove: dict[int, list[int]] | None = None
    """Or: exactly these KV groups, {layer: [group, ...]} in the unpruned numbering (no
    importance is measured; e.g. the groups a shipped recovery adapter was trained on)."""
    min_groups_per_layer: int = Field(1, ge=1)
    seed: int = 0
    calibration_texts: int = Field(16, ge=1)
    calibration_tokens: int = Field(256, ge=16)
    compensate: bool = False
    """Refit each pruned layer's o_proj by least squares so its output matches the unpruned
    layer's on the calibration text (seconds; see compensation.py)."""
    compensate_ridge: float = Field(1e-3, gt=0.0, le=10.0)
    """Ridge term of that fit, relative to the mean diagonal of X^T X."""

    @model_validator(mode="after")
    def _one_budget(self) -> Self:
        if sum(b is not None for b in (self.ratio, self.per_layer, self.remove)) != 1:
            raise ValueError(
                "give exactly one budget: `ratio` (global fraction), `per_layer` (groups per layer) "
                "or `remove` (the groups themselves)"
            )
        for layer, groups in (self.remove or {}).items():
            if layer < 0 or any(g < 0 for g in groups) or len(set(groups)) != len(groups):
                raise ValueError(f"remove: layer {layer} lists {groups}; layers and groups are distinct indices >= 0")
        return self


# --- recover -------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LORA_ONLY = ("rank", "alpha", "dropout", "targets")
_TRAINING = (
    "train",
    "steps",
    "batch",
    "seq_len",
    "lr",
    "warmup",
    "temperature",
    "calibration_share",
    "prompts",
    "reply_tokens",
    "eval_every",
    "eval_windows",
    "keep",
    "save_adapter",
    "cache_dir",
    *_LORA_ONLY,
)


class RecoverOptions(BaseModel):
    """Options of the `recover` step, checked when the config is read."""

    model_config = ConfigDict(extra="forbid")
    adapter: str | None = None
    """Load this trained LoRA folder instead of training."""
    train: Literal["lora", "attention"] = "lora"
    steps: int = Field(1000, ge=1, le=1_000_000)
    batch: int = Field(4, ge=1, le=1024)
    seq_len: int = Field(256, ge=16, le=8192)
    lr: float | None = Field(None, gt=0.0, lt=1.0)
    """Peak learning rate; default 5e-4 for lora, 5e-5 for attention."""
    warmup: int = Field(50, ge=0)
    temperature: float = Field(1.0, gt=0.0, le=20.0)
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0.0)
    """LoRA scaling numerator; default 2 x rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    calibration_share: float = Field(0.5, ge=0.0, le=1.0)
    """Share of training windows drawn from calibration text; the rest are teacher chats."""
    prompts: str | None = None
    """Prompts file for the teacher's replies; default data/recovery/prompts.txt."""
    reply_tokens: int = Field(128, ge=1, le=4096)
    eval_every: int = Field(100, ge=1)
    eval_windows: int = Field(4, ge=1)
    keep: Literal["perplexity", "kl", "last"] = "perplexity"
    """Which state to end with: the lowest held-out perplexity, the lowest held-out KL to the
    teacher, or simply the last step's."""
    seed: int = 0
    threads: int | None = Field(None, ge=1, le=1024)
    """torch CPU threads while recovering (restored afterwards); None leaves torch's setting."""
    cache_dir: str | None = None
    """Where teacher replies are cached; default the workbench cache folder."""
    save_adapter: str | None = None
    """Write the trained LoRA here (lora only)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        given = self.model_fields_set
        if self.adapter is not None:
            clash = sorted(given & set(_TRAINING))
            if clash:
                raise ValueError(
                    f"adapter loads a trained adapter, so the training options {', '.join(clash)} do nothing; "
                    "drop them, or drop adapter to train"
                )
            folder = resolve_path(self.adapter)
            if not (folder / ADAPTER_RECORD).is_file():
                raise ValueError(
                    f"adapter {self.adapter!r}: no {ADAPTER_RECORD} there (not a folder written by save_adapter)"
                )
            return self
        if self.train == "attention":
            clash = sorted(given & set(_LORA_ONLY))
            if clash:
                raise ValueError(f"{', '.join(clash)} only apply to train: lora")
            if self.save_adapter is not None:
                raise ValueError(
                    "save_adapter saves a LoRA; train: attention changes the weights themselves "
                    "(save the model with --out instead)"
                )
        if self.warmup >= self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than steps ({self.steps})")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"targets: {unknown} are not linear layers of a decoder block (known: {', '.join(LORA_TARGETS)})"
            )
        if self.prompts is not None and not resolve_path(self.prompts).is_file():
            raise ValueError(f"prompts file {self.prompts!r} does not exist")
        if self.save_adapter is not None and resolve_path(self.save_adapter).is_file():
            raise ValueError(f"save_adapter {self.save_adapter!r} is a file; give a folder")
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.train == "lora" else 5e-5)


# --- quantize ------------------------------------------------------------------------------

Scheme = Literal["fp16", "bf16", "int8_weight_only", "int8_dynamic", "int4_weight_only", "keep"]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str
    """fnmatch glob over module names, e.g. `model.layers.*.mlp.*`"""
    scheme: Scheme


class QuantizeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: Scheme = "int8_weight_only"
    rules: list[Rule] = []
    group_size: int = Field(32, ge=16)
    """int4 only: weights share a scale and zero point per this many input features. 32,
    because 64 cost the embedded model 32% perplexity (19.5 against 14.8) and 32 about 0.4%."""


# --- kv_cache ------------------------------------------------------------------------------


class KVCacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal["dynamic", "sliding_window", "quantized", "offloaded"] = "dynamic"
    window: int | None = Field(None, ge=16)
    """sliding_window only: tokens kept"""
    nbits: Literal[2, 4] = 4
    """quantized only"""
    residual_length: int = Field(128, ge=0)
    """quantized only: newest tokens kept in full precision"""

    @model_validator(mode="after")
    def _window_iff_sliding(self) -> Self:
        if self.policy == "sliding_window" and self.window is None:
            raise ValueError("sliding_window needs `window`: how many recent tokens the cache keeps")
        if self.policy != "sliding_window" and self.window is not None:
            raise ValueError(f"`window` applies to the sliding_window policy, not {self.policy}")
        return self


STEP_OPTIONS: dict[str, type[BaseModel]] = {
    "prune_heads": PruneOptions,
    "recover": RecoverOptions,
    "quantize": QuantizeOptions,
    "kv_cache": KVCacheOptions,
}
"""Every compression step a config may list, by name, with the options model it takes."""
