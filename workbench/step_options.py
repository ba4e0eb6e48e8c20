"""The options of each compression step, checked when a config is read.

They live on the ground floor, apart from the steps that use them, because a config names
its steps and their options before any model or compression code loads: reading
`configs/pruned-25.yaml` checks every key of every step without importing torch's
training stack. `compress/` maps each name in `STEP_OPTIONS` to the function that runs it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from workbench.data import check_calibration
from workbench.paths import ADAPTER_RECORD, resolve_path

CALIBRATION_DOC = (
    "Calibration text: `reference`, `mix` (the default; workbench.compress.calibration), or a path: "
    "a .txt, a .jsonl of texts or chats, or a folder of them. Checked when the config is read."
)
"""What a step's `calibration` option takes (the same for every step that reads calibration text)."""


def _checked_calibration(value: str | None) -> str | None:
    try:
        return check_calibration(value)
    except (OSError, ValueError) as exc:
        raise ValueError(str(exc)) from None


CalibrationSpec = Annotated[str | None, AfterValidator(_checked_calibration)]
"""The `calibration:` option of every step that reads calibration text, checked when read."""


# --- prune_heads ---------------------------------------------------------------------------

Criterion = Literal["taylor", "kl", "attention_entropy", "weight_norm", "random"]
CRITERIA: tuple[str, ...] = ("taylor", "kl", "attention_entropy", "weight_norm", "random")
COMPENSATE_RIDGES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""The ridge values `compensate_ridge: auto` chooses among, per layer."""


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
    compensate_ridge: float | Literal["auto"] = "auto"
    """Ridge term of that fit, relative to the mean diagonal of X^T X; `auto` picks it per layer
    from COMPENSATE_RIDGES by the o_proj output error on held-out calibration texts."""
    calibration: CalibrationSpec = None
    """Calibration text (see CALIBRATION_DOC); None: `mix`."""

    @field_validator("compensate_ridge")
    @classmethod
    def _ridge_range(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not 0.0 < value <= 10.0:
            raise ValueError(f"compensate_ridge {value}: give `auto` or a number in (0, 10]")
        return value

    @property
    def reads_calibration(self) -> bool:
        return self.compensate or (self.remove is None and self.criterion in ("taylor", "kl", "attention_entropy"))

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
_LORA_ONLY = ("rank", "alpha", "dropout", "targets", "resume")
_TRAINING = (
    "train",
    "steps",
    "batch",
    "seq_len",
    "lr",
    "warmup",
    "temperature",
    "calibration_share",
    "sample_share",
    "prompts",
    "reply_tokens",
    "openings",
    "samples_per_opening",
    "sample_tokens",
    "eval_every",
    "eval_windows",
    "eval_texts",
    "keep",
    "bf16",
    "save_adapter",
    "cache_dir",
    "calibration",
    *_LORA_ONLY,
)


HeldOutText = Literal["reference", "prose"]
HELD_OUT_TEXTS: tuple[HeldOutText, ...] = ("reference", "prose")
"""workbench.data.HELD_OUT's names (tests/test_recovery.py checks they agree)."""


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
    """Share of training windows drawn from calibration text."""
    sample_share: float = Field(0.0, ge=0.0, le=1.0)
    """Share drawn from the teacher's sampled continuations of `openings`; the rest (1 minus both
    shares) are the teacher's replies to `prompts`."""
    prompts: str | None = None
    """Prompts file for the teacher's replies; default data/recovery/prompts.txt."""
    reply_tokens: int = Field(128, ge=1, le=4096)
    openings: str | None = None
    """Openings file the teacher continues by sampling; default data/recovery/openings.txt."""
    samples_per_opening: int = Field(4, ge=1, le=256)
    sample_tokens: int = Field(256, ge=1, le=4096)
    eval_every: int = Field(100, ge=1)
    eval_windows: int = Field(4, ge=1)
    """512-token windows of each held-out text, taken from its end: quality.perplexity and the
    benches score the first windows, so the state is not chosen on the windows it is judged on."""
    eval_texts: list[HeldOutText] = Field(default_factory=lambda: list(HELD_OUT_TEXTS), min_length=1)
    """Held-out texts (workbench.data.HELD_OUT) the state is chosen on."""
    keep: Literal["perplexity", "kl", "last"] = "perplexity"
    """Which state to end with: the lowest held-out perplexity (the geometric mean over
    `eval_texts`), the lowest held-out KL to the teacher (their mean), or the last step's."""
    bf16: bool | None = None
    """Train under bf16 autocast (the teacher's logits too; held-out scoring stays fp32). None: on
    CUDA only. On a CPU with AVX512-BF16 or AMX it is ~1.6x faster a step (the 2-core EPYC: 4.7 s
    against 7.7 s for a full-model step of 4 x 256 tokens); without them it is slower than fp32."""
    seed: int = 0
    threads: int | None = Field(None, ge=1, le=1024)
    """torch CPU threads while recovering (restored afterwards); None leaves torch's setting."""
    cache_dir: str | None = None
    """Where teacher replies are cached; default the workbench cache folder."""
    save_adapter: str | None = None
    """Write the trained LoRA here (lora only)."""
    resume: str | None = None
    """Go on training a folder written by save_adapter: its base weights and LoRA are the start
    (same rank, alpha and targets), not the compensated model and a zero LoRA. A second stage on
    other text costs its own steps, not the first stage's again."""
    calibration: CalibrationSpec = None
    """Calibration text (see CALIBRATION_DOC); None: `mix`."""

    @property
    def reads_calibration(self) -> bool:
        return self.adapter is None and self.calibration_share > 0

    def _check_resume(self) -> None:
        assert self.resume is not None
        folder = resolve_path(self.resume)
        lora_file = folder / "adapter_config.json"
        if not (folder / ADAPTER_RECORD).is_file() or not lora_file.is_file():
            raise ValueError(
                f"resume {self.resume!r}: no {ADAPTER_RECORD} and adapter_config.json there "
                "(not a folder written by save_adapter)"
            )
        lora = json.loads(lora_file.read_text())
        theirs = {
            "rank": lora.get("r"),
            "alpha": lora.get("lora_alpha"),
            "targets": sorted(lora.get("target_modules") or []),
        }
        ours = {"rank": self.rank, "alpha": self.alpha or 2 * self.rank, "targets": sorted(self.targets)}
        differ = [k for k in ours if ours[k] != theirs[k]]
        if differ:
            raise ValueError(
                f"resume {self.resume!r} is a LoRA of {', '.join(f'{k} {theirs[k]}' for k in differ)}; "
                f"this step asks for {', '.join(f'{k} {ours[k]}' for k in differ)}: give the same to go on training it"
            )

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
        if self.calibration_share + self.sample_share > 1.0:
            raise ValueError(
                f"calibration_share ({self.calibration_share}) + sample_share ({self.sample_share}) is more than 1: "
                "they are shares of the training windows (the rest are teacher chats)"
            )
        if len(set(self.eval_texts)) != len(self.eval_texts):
            raise ValueError(f"eval_texts {self.eval_texts} names a text twice")
        if self.openings is not None and not resolve_path(self.openings).is_file():
            raise ValueError(f"openings file {self.openings!r} does not exist")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"targets: {unknown} are not linear layers of a decoder block (known: {', '.join(LORA_TARGETS)})"
            )
        if self.prompts is not None and not resolve_path(self.prompts).is_file():
            raise ValueError(f"prompts file {self.prompts!r} does not exist")
        if self.save_adapter is not None and resolve_path(self.save_adapter).is_file():
            raise ValueError(f"save_adapter {self.save_adapter!r} is a file; give a folder")
        if self.resume is not None:
            self._check_resume()
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.train == "lora" else 5e-5)


# --- quantize ------------------------------------------------------------------------------

Scheme = Literal["fp16", "bf16", "int8_weight_only", "int8_dynamic", "int4_weight_only", "keep"]


Method = Literal["rtn", "hqq", "gptq"]
METHODS: tuple[str, ...] = ("rtn", "hqq", "gptq")
_GPTQ_ONLY = ("calibration_windows", "damp", "act_order", "refine")
_BUDGET_ONLY = ("precisions", "sensitivity_windows")
_PRECISIONS: tuple[Scheme, ...] = ("int4_weight_only", "int8_weight_only", "keep")
_SCHEME_BITS = {"int4_weight_only": 4.0, "int8_weight_only": 8.0, "int8_dynamic": 8.0, "fp16": 16.0, "bf16": 16.0}
"""Fewest bits per weight each scheme can store (int4 adds its group's scale and zero; `keep` is
at least 16): what a budget below every precision's floor is refused by, before any model loads."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str
    """fnmatch glob over module names, e.g. `model.layers.*.mlp.*`"""
    scheme: Scheme
    method: Method | None = None
    """int4 only: how this rule's layers are rounded; default the step's `method`."""

    @model_validator(mode="after")
    def _method_is_int4(self) -> Self:
        if self.method is not None and self.scheme != "int4_weight_only":
            raise ValueError(f"method {self.method} rounds int4 weights; this rule's scheme is {self.scheme}")
        return self


class QuantizeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: Scheme = "int8_weight_only"
    rules: list[Rule] = []
    group_size: int = Field(32, ge=16)
    """int4 only: weights share a scale and zero point per this many input features. 32,
    because 64 cost the embedded model 32% perplexity (19.5 against 14.8) and 32 about 0.4%."""
    method: Method = "rtn"
    """int4 only: how weights are rounded. `rtn`: to the nearest of 16 levels per group (torchao's
    tinygemm qparams); `hqq`: qparams fitted to each group's weights (torchao's HQQ, data-free);
    `gptq`: each rounding error moved onto the weights not yet rounded, to keep the layer's
    outputs on calibration text (workbench/compress/gptq.py). See docs/compression.md."""
    calibration_windows: int = Field(16, ge=1, le=4096)
    """gptq: windows of calibration text its Hessians are summed over"""
    calibration_tokens: int = Field(512, ge=16, le=8192)
    """gptq and a budget's sensitivity: tokens per calibration window"""
    damp: float = Field(0.01, gt=0.0, le=1.0)
    """gptq: added to the Hessian's diagonal as a share of its mean, for a stable inverse"""
    act_order: bool = True
    """gptq: round the columns with the largest inputs first (groups keep their qparams)"""
    refine: int = Field(2, ge=0, le=8)
    """gptq: rounds of refitting each group's scale and zero to the rounded values (least squares
    on the layer's outputs) and rounding again with them; 0 is plain GPTQ"""
    budget_bits: float | None = Field(None, gt=0.0, le=32.0)
    """Sensitivity mode: mean bits per weight over the layers no rule names (their weights and
    quantization parameters); each such layer, lm_head included, gets one of `precisions`,
    chosen by how much the model's output moves when that layer alone is quantized."""
    budget_bytes: int | None = Field(None, gt=0)
    """Or: bytes of those layers' weights and quantization parameters."""
    precisions: list[Scheme] = Field(default_factory=lambda: list(_PRECISIONS))
    """Sensitivity mode: the schemes each layer may get."""
    sensitivity_windows: int = Field(2, ge=1, le=64)
    """Sensitivity mode: calibration windows each layer's KL is measured on (one forward each)."""
    calibration: CalibrationSpec = None
    """Calibration text of the calibrated methods (see CALIBRATION_DOC); None: `mix`."""

    @property
    def reads_calibration(self) -> bool:
        """Whether the step fits anything on calibration text (the pipeline then resolves it
        before the first step, from the model as loaded). Round-to-nearest does not; GPTQ and a
        budget's sensitivity do."""
        return self.budget is not None or "gptq" in self.methods

    @property
    def budget(self) -> float | int | None:
        return self.budget_bits if self.budget_bits is not None else self.budget_bytes

    @property
    def schemes(self) -> set[str]:
        """Every scheme the step may apply (with a budget: any of `precisions`)."""
        chosen = set(self.precisions) if self.budget is not None else {self.scheme}
        return chosen | {r.scheme for r in self.rules}

    @property
    def methods(self) -> set[str]:
        """The int4 rounding methods the step may use."""
        if "int4_weight_only" not in self.schemes:
            return set()
        default = {self.method} if self.budget is not None or self.scheme == "int4_weight_only" else set()
        named = {r.method or self.method for r in self.rules if r.scheme == "int4_weight_only"}
        return default | named

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        given = self.model_fields_set
        if self.budget_bits is not None and self.budget_bytes is not None:
            raise ValueError("give one budget: budget_bits (mean bits per weight) or budget_bytes, not both")
        if self.budget is None:
            clash = sorted(given & set(_BUDGET_ONLY))
            if clash:
                raise ValueError(f"{', '.join(clash)} only apply with a budget (budget_bits or budget_bytes)")
        else:
            if "scheme" in given:
                raise ValueError(
                    "a budget chooses each layer's scheme among `precisions`; drop `scheme` (rules still fix the layers they name)"
                )
            if len(set(self.precisions)) < 2:
                raise ValueError(f"precisions {self.precisions}: a budget needs at least two schemes to choose between")
            floor = min(
                _SCHEME_BITS.get(s, 16.0) + (32 / self.group_size if s == "int4_weight_only" else 0)
                for s in self.precisions
            )
            if self.budget_bits is not None and self.budget_bits < floor:
                raise ValueError(
                    f"budget_bits {self.budget_bits} is below what the cheapest of {self.precisions} stores "
                    f"({floor:g} bits per weight): unreachable; raise it or add a cheaper precision"
                )
        if self.method != "rtn" and "method" in given and "int4_weight_only" not in self.schemes:
            raise ValueError(
                f"method {self.method} rounds int4 weights, and this step quantizes none to int4_weight_only"
            )
        if "gptq" not in self.methods:
            clash = sorted(given & set(_GPTQ_ONLY))
            if clash:
                raise ValueError(f"{', '.join(clash)} only apply to method: gptq")
        if not self.reads_calibration and "calibration_tokens" in given:
            raise ValueError("calibration_tokens only applies to method: gptq or a budget")
        return self


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
