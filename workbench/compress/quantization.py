"""Weight quantization and mixed precision, module by module, with torchao as the backend.

Each linear layer gets one scheme, chosen by the first glob rule its name matches (e.g.
`model.layers.*.mlp.*` -> int8_weight_only, `*.self_attn.*` -> fp16), else the step's
default scheme; `keep` leaves a layer as it is. `lm_head` is kept unless a rule names it:
the output projection is where quantization error costs perplexity most. Embeddings and
norms are never touched. A rule that names an `lm_head` tied to the embedding table (the
embedded SmolLM2's 49,152 x 576 matrix) first gives it an untied copy, so the embedding
lookup keeps its float32 rows while the output projection — the largest read of every
decode step — shrinks.

Schemes:
- `fp16`, `bf16`: the layer's weights are stored in that dtype; its input is cast on the
  way in and its output cast back, so it mixes with float32 neighbours;
- `int8_weight_only`: torchao's symmetric per-channel int8, multiplied by PyTorch's packed
  int8 kernel where the device has one (`int8_linear.py`: fast in eager mode), else kept
  as torchao's tensor subclass;
- `int4_weight_only` (grouped, `group_size`): on a CPU, torchao's quantization
  (`Int4OpaqueTensor.from_hp`, tinygemm qparams) kept as plain tensors in an `Int4Linear`
  (`int4_linear.py`) that calls PyTorch's own `aten._weight_int4pack_mm_for_cpu` with bf16
  activations, because that kernel is ~30x slower with float32 ones (4.3 ms against
  0.15 ms for a 576 -> 1536 product here). On CUDA, torchao's Int4WeightOnlyConfig;
- `int8_dynamic` (int8 activations too): torchao's tensor subclass.
Where a scheme has no kernel on the model's device the step says so before any work.

int4 layers are rounded by a `method`, for the step or per rule: `rtn` (above), `hqq` (torchao's
half-quadratic qparams, data-free) or `gptq` (gptq.py: fitted on calibration text, so the
embedded model keeps its perplexity with lm_head in int4 too). With a budget (`budget_bits` or
`budget_bytes`) the step measures how much each layer moves the model's output when quantized
alone and spends the budget where it buys the most (sensitivity.py); the report holds the
measurements, the choice, and the choice as rules to paste into a config.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from workbench.compress import sensitivity
from workbench.compress.calibration import Calibration, resolve
from workbench.compress.gptq import GPTQSettings, cached_gptq_quantize
from workbench.compress.int4_linear import Int4Linear
from workbench.compress.int8_linear import Int8Linear, kernel_available
from workbench.metrics import input_device, token_windows
from workbench.models.anatomy import tensor_bytes
from workbench.models.memory import CheckpointPages
from workbench.paths import cache_root
from workbench.step_options import QuantizeOptions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class QuantizeReport:
    step: str
    schemes: dict[str, int]
    """scheme -> number of linear layers"""
    linear_bytes_before: int
    linear_bytes_after: int
    changed_bytes_before: int
    """bytes of just the layers given a scheme other than keep, before and after"""
    changed_bytes_after: int
    modules: dict[str, str] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    """int4 layer -> how it was rounded (rtn, hqq, gptq)"""
    calibration: dict | None = None
    """the calibration data GPTQ or the sensitivity read (Calibration.record), with windows and tokens"""
    sensitivity: dict | None = None
    """budget mode: each layer's KL per scheme and bytes, the budget, the choice and its greedy
    curve, and `rules`: the choice as quantize rules, to fix it in a config without measuring again"""


def layer_bytes(module: nn.Linear) -> int:
    """A linear layer's weight storage, its quantization parameters included."""
    extra = [getattr(module, n) for n in getattr(module, "qparams", ())]  # Int8Linear, Int4Linear
    return tensor_bytes(module.weight) + sum(tensor_bytes(t) for t in extra if isinstance(t, torch.Tensor))


def linear_bytes(model: nn.Module) -> int:
    return sum(layer_bytes(m) for m in model.modules() if isinstance(m, nn.Linear))


def _rule(name: str, opts: QuantizeOptions):
    return next((r for r in opts.rules if fnmatch.fnmatchcase(name, r.pattern)), None)


def plan_schemes(model: nn.Module, opts: QuantizeOptions) -> dict[str, str]:
    """layer -> scheme. With a budget, only the layers a rule names are planned here (the rest
    are chosen by sensitivity)."""
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        rule = _rule(name, opts)
        if rule is not None:
            plan[name] = rule.scheme
        elif opts.budget is not None:
            continue
        elif name == "lm_head" or name.endswith(".lm_head"):
            plan[name] = "keep"
        else:
            plan[name] = opts.scheme
    return plan


def plan_methods(plan: dict[str, str], opts: QuantizeOptions) -> dict[str, str]:
    """int4 layer -> its rounding method: its rule's, else the step's."""
    methods = {}
    for name, scheme in plan.items():
        if scheme == "int4_weight_only":
            rule = _rule(name, opts)
            methods[name] = (rule.method if rule is not None else None) or opts.method
    return methods


def _torchao_config(scheme: str, group_size: int):
    """torchao's config for the schemes it applies itself (int4 on a CPU is `Int4Linear`)."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return Int4WeightOnlyConfig(group_size=group_size)


def _quantize_modules(model: nn.Module, names: set[str], scheme: str, group_size: int, device_type: str) -> None:
    """Apply one torchao scheme to these layers (int4 on a CPU: `Int4Linear`)."""
    from torchao.quantization import quantize_

    if scheme == "int4_weight_only" and device_type == "cpu":
        for name in names:
            model.set_submodule(name, Int4Linear.from_linear(cast(nn.Linear, model.get_submodule(name)), group_size))
        return
    quantize_(model, _torchao_config(scheme, group_size), filter_fn=lambda m, fqn: fqn in names)


def check_supported(scheme: str, group_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize a small layer on the model's device: the honest test that a kernel exists."""
    if scheme in ("keep", "fp16", "bf16"):
        return
    if scheme == "int8_weight_only" and kernel_available(device.type):
        return
    probe = nn.Sequential(nn.Linear(group_size * 2, 32)).to(device=device, dtype=dtype)
    try:
        _quantize_modules(probe, {"0"}, scheme, group_size, device.type)
        probe(torch.randn(2, group_size * 2, device=device, dtype=dtype))
    except Exception as exc:  # noqa: BLE001 - torchao raises many kinds; all mean "not here"
        raise ValueError(
            f"{scheme} is not available for {dtype} on {device.type} with this torchao "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); choose another scheme"
        ) from None


def check_methods(methods: set[str], device: torch.device) -> None:
    if methods - {"rtn"} and device.type != "cpu":
        named = ", ".join(sorted(methods - {"rtn"}))
        raise ValueError(
            f"int4 method {named} writes the CPU int4 kernel's layout (Int4Linear); the model is on "
            f"{device.type}: use method rtn there"
        )


def preflight(options: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Check, before a model is loaded, that every scheme the options name runs here."""
    opts = QuantizeOptions.model_validate(options)
    for scheme in opts.schemes:
        check_supported(scheme, opts.group_size, device, dtype)
    check_methods(opts.methods, device)


def untie_from_embedding(model: PreTrainedModel, name: str, *, copy: bool = True) -> bool:
    """Untie layer `name` from the input embedding it shares a weight with.

    Every scheme replaces or recasts the layer's weight; on a tied weight `fp16`/`bf16`
    would recast the embedding table with it (one Parameter, two modules), so those get a
    copy first (`copy`). A scheme that builds a new layer from the weight needs none: a float32
    copy of the 49,152 x 576 table would only raise the load peak by 113 MB. Returns whether
    the layer was tied. The config says the model is untied from now on, so nothing ties
    the two back together (transformers' `tie_weights`)."""
    module = cast(nn.Linear, model.get_submodule(name))  # a layer of the plan
    embedding = cast(torch.Tensor, model.get_input_embeddings().weight)
    if module.weight is not embedding and module.weight.data_ptr() != embedding.data_ptr():
        return False
    if copy:
        module.weight = nn.Parameter(embedding.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


class CastIOLinear(nn.Linear):
    """A linear layer stored in another dtype than its neighbours: the input is cast to the
    layer's dtype on the way in and the output back to the caller's on the way out.

    A class rather than forward hooks: a compiled decode step guards every hook dict of every
    module on every call; when the embedded model's 210 int4 layers were cast by hooks, those
    guards took 18% of a compiled token (55.8 tok/s with hooks, 68.1 with this class, one run)."""

    io_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.io_dtype)).to(x.dtype)


def _cast_io(module: nn.Linear, dtype: torch.dtype) -> None:
    """Store the layer in `dtype`; its caller keeps seeing its own dtype in and out. The
    module keeps its name and state-dict keys (only its class changes), so saving and
    exporting read it as the plain linear layer it was."""
    if type(module) is not nn.Linear:
        raise TypeError(f"cannot cast the input and output of a {type(module).__name__}; only plain nn.Linear layers")
    module.to(dtype)
    module.__class__ = CastIOLinear
    cast(CastIOLinear, module).io_dtype = dtype


def quantized_copy(linear: nn.Linear, scheme: str, group_size: int, method: str, device_type: str) -> nn.Module:
    """A new layer: `linear` in `scheme`, the original untouched (sensitivity tries each in turn).
    int4 is rounded data-free here (gptq measures as rtn: its Hessians come later, in order)."""
    if scheme in _FLOAT:
        layer = copy.deepcopy(linear)
        _cast_io(layer, _FLOAT[scheme])
        return layer
    if scheme == "int8_weight_only" and kernel_available(device_type):
        return Int8Linear.from_linear(linear)
    if scheme == "int4_weight_only" and device_type == "cpu":
        return Int4Linear.from_linear(linear, group_size, "hqq" if method == "hqq" else "rtn")
    holder = nn.Sequential(copy.deepcopy(linear))
    _quantize_modules(holder, {"0"}, scheme, group_size, device_type)
    return holder[0]


def calibration_windows(
    session, calibration: Calibration, opts: QuantizeOptions, count: int
) -> tuple[list[torch.Tensor], dict]:
    """The first `count` windows of `calibration_tokens` tokens of the calibration data, and its record."""
    windows = token_windows(session.tokenizer, calibration.texts, window=opts.calibration_tokens, max_windows=count)
    record = {**calibration.record(), "windows": len(windows), "tokens": sum(len(w) for w in windows)}
    device = input_device(session.model)
    return [w.to(device) for w in windows], record


def choose_by_sensitivity(
    session, calibration: Calibration, opts: QuantizeOptions, fixed: dict[str, str]
) -> tuple[dict[str, str], dict]:
    """Each linear layer no rule fixed gets one of `opts.precisions`, within the budget; returns
    that plan and the record of how it was chosen (QuantizeReport.sensitivity)."""
    model = session.model
    device_type = input_device(model).type
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in fixed]
    if not names:
        raise ValueError("a budget chooses schemes for the layers no rule names, and the rules name every layer")
    for scheme in opts.precisions:
        check_supported(scheme, opts.group_size, input_device(model), model.get_input_embeddings().weight.dtype)
    if "int4_weight_only" in opts.precisions:
        _check_groups(model, names, opts.group_size)
    windows, record = calibration_windows(session, calibration, opts, opts.sensitivity_windows)
    weights = {n: cast(nn.Linear, model.get_submodule(n)).weight.numel() for n in names}

    def variants(name: str):
        linear = cast(nn.Linear, model.get_submodule(name))
        for scheme in opts.precisions:
            if scheme != "keep":
                layer = quantized_copy(linear, scheme, opts.group_size, opts.method, device_type)
                yield scheme, layer, layer_bytes(cast(nn.Linear, layer))

    measured = sensitivity.measure(
        model, names, variants, lambda n: layer_bytes(cast(nn.Linear, model.get_submodule(n))), windows
    )
    budget = opts.budget_bytes or int((opts.budget_bits or 0.0) * sum(weights.values()) / 8)
    choice = sensitivity.choose(measured, list(opts.precisions), weights, budget)
    return choice.schemes, {
        "budget_bits": opts.budget_bits,
        "budget_bytes": choice.budget_bytes,
        "chosen_bytes": choice.chosen_bytes,
        "bits_per_weight": choice.bits_per_weight,
        "weights": choice.weights,
        "precisions": list(opts.precisions),
        "int4_measured_with": "hqq" if opts.method == "hqq" else "rtn",
        "calibration": record,
        "windows": measured.windows,
        "tokens": measured.tokens,
        "kl": measured.kl,
        "bytes": measured.bytes,
        "curve": choice.curve,
        "rules": [{"pattern": n, "scheme": s} for n, s in choice.schemes.items()],
    }


def _check_groups(model: nn.Module, names: list[str], group_size: int) -> None:
    bad = [n for n in names if cast(nn.Linear, model.get_submodule(n)).in_features % group_size]
    if bad:
        raise ValueError(f"int4 group_size {group_size} does not divide the input size of {bad[0]}; use 32 or 64")


def quantize(session, **options) -> QuantizeReport:
    opts = QuantizeOptions.model_validate(options)
    model = session.model
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    plan = plan_schemes(model, opts)
    for scheme in set(plan.values()):
        check_supported(scheme, opts.group_size, device, dtype)
    # before any layer changes: the default mix holds the model's own replies, as loaded
    calibration = resolve(session, opts.calibration) if opts.reads_calibration else None
    chosen = None
    if opts.budget is not None:
        assert calibration is not None  # a budget reads calibration
        choice, chosen = choose_by_sensitivity(session, calibration, opts, plan)
        plan = {n: plan.get(n) or choice[n] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    methods = plan_methods(plan, opts)
    check_methods(set(methods.values()), device)
    _check_groups(model, list(methods), opts.group_size)
    before = linear_bytes(model)
    changed = [n for n, scheme in plan.items() if scheme != "keep"]
    for name in changed:
        untie_from_embedding(model, name, copy=plan[name] in _FLOAT)
    changed_before = sum(layer_bytes(model.get_submodule(n)) for n in changed)
    pages = CheckpointPages(model)
    for scheme in sorted(set(plan.values()) - {"keep"}):
        names = {n for n, s in plan.items() if s == scheme}
        if scheme in _FLOAT:
            for name in names:
                original = cast(nn.Linear, model.get_submodule(name)).weight.data
                _cast_io(model.get_submodule(name), _FLOAT[scheme])
                pages.drop(original)
        elif scheme == "int8_weight_only" and kernel_available(device.type):
            for name in names:
                layer = cast(nn.Linear, model.get_submodule(name))
                model.set_submodule(name, Int8Linear.from_linear(layer))
                pages.drop(layer.weight)
        elif scheme == "int4_weight_only" and device.type == "cpu":
            for name in names:
                if methods[name] != "gptq":
                    layer = cast(nn.Linear, model.get_submodule(name))
                    model.set_submodule(name, Int4Linear.from_linear(layer, opts.group_size, methods[name]))
                    pages.drop(layer.weight)
        else:
            _quantize_modules(model, names, scheme, opts.group_size, device.type)
    record = chosen["calibration"] if chosen else None
    fitted = [n for n, m in methods.items() if m == "gptq"]
    if fitted:
        assert calibration is not None  # gptq reads calibration
        # last, so its calibration passes see every other layer as it will be
        windows, record = calibration_windows(session, calibration, opts, opts.calibration_windows)
        settings = GPTQSettings(opts.group_size, opts.damp, opts.act_order, opts.refine)
        originals = [cast(nn.Linear, model.get_submodule(n)).weight for n in fitted]
        record["gptq_from_cache"] = cached_gptq_quantize(model, fitted, windows, settings, cache_root() / "gptq")
        for weight in originals:  # GPTQ's passes paged every one of them in (405 MB for the embedded model)
            pages.drop(weight)
    counts: dict[str, int] = {}
    for scheme in plan.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    return QuantizeReport(
        step="quantize",
        schemes=counts,
        linear_bytes_before=before,
        linear_bytes_after=linear_bytes(model),
        changed_bytes_before=changed_before,
        changed_bytes_after=sum(layer_bytes(model.get_submodule(n)) for n in changed),
        modules=plan,
        methods=methods,
        calibration=record,
        sensitivity=chosen,
    )
