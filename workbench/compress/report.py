"""Before/after measurements of a compression config, written as JSON, Markdown and plotly HTML.

Both models are measured in the same run, the same way: parameters, weight bytes per
dtype, KV-cache bytes per token, attention heads per layer, perplexity on both shipped
held-out texts (workbench.data.HELD_OUT: the CPython reference text, from the calibration
text's source, and out-of-domain prose), lm-eval tasks on the weights (MMLU's stratified
subset by default, with standard errors), and greedy decode speed through the engine. Then the
compressed model is compared with the original on each held-out text: KL divergence of its
next-token distributions and top-1 agreement (workbench.metrics.divergence).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn

from workbench.compress.int4_linear import Int4Linear
from workbench.data import HELD_OUT, held_out_texts
from workbench.engine import ChatRequest, Done
from workbench.harness import evaluate
from workbench.inspect.divergence import DivergenceMap, divergence_map
from workbench.inspect.figures import divergence_overview
from workbench.metrics import Divergence, divergence, perplexity
from workbench.models.anatomy import attention_layers, kv_bytes_per_token, kv_groups, weight_bytes_by_dtype

BENCH_PROMPT = "Explain in two sentences what a KV cache is."


@dataclass
class Measurement:
    params: int
    weight_bytes: int
    bytes_by_dtype: dict[str, int]
    heads_per_layer: list[int]
    kv_heads_per_layer: list[int]
    kv_bytes_per_token: int
    perplexity: dict[str, float]
    """held-out text name -> perplexity"""
    harness: dict[str, dict]
    """lm-eval task -> its headline score (workbench.harness.Score as a dict)"""
    decode_tokens_per_s: float
    ttft_s: float
    memory_bytes: int
    """CUDA: peak allocated during the measurement; CPU: process resident memory after it"""
    resident: dict = field(default_factory=dict)
    """Session.memory() after the decode, before perplexity: the process's resident memory split
    into runtime, weights by dtype (every resident copy), KV cache and activations, load peak"""


def parameter_count(model: nn.Module) -> int:
    """Weights as the model computes with them: an int4 layer stores two per byte, so its
    packed tensor's numel is half the layer's in x out; counting it would double bits/weight."""
    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear)}
    return sum(packed.get(id(p), p.numel()) for p in model.parameters())


def measure(session, *, windows: int, decode_tokens: int, harness: tuple[str, ...] = ()) -> Measurement:
    model = session.model
    params = parameter_count(model)
    by_dtype = weight_bytes_by_dtype(model)
    attns = attention_layers(model)
    kv_heads = [kv_groups(attn) for attn in attns]
    heads = [kv_groups(attn) * attn.num_key_value_groups for attn in attns]
    device = session.engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    request = ChatRequest.from_prompt(BENCH_PROMPT, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    stats = [e.stats for e in session.engine.stream(request) if isinstance(e, Done)][0]
    resident = session.memory().as_dict()
    ppl = {name: perplexity(model, session.tokenizer, held_out_texts(name), max_windows=windows) for name in HELD_OUT}
    scores = {s.task: s.to_dict() for s in evaluate(session, list(harness))} if harness else {}
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss
    return Measurement(
        params=params,
        weight_bytes=sum(by_dtype.values()),
        bytes_by_dtype=by_dtype,
        heads_per_layer=heads,
        kv_heads_per_layer=kv_heads,
        kv_bytes_per_token=kv_bytes_per_token(model),
        perplexity=ppl,
        harness=scores,
        decode_tokens_per_s=stats.decode_tokens_per_s,
        ttft_s=stats.ttft_s,
        memory_bytes=memory,
        resident=resident,
    )


def divergence_from_original(original, session, *, windows: int) -> dict[str, Divergence]:
    """The compressed session's model against `original` (the model as loaded) on the windows
    of each held-out text the perplexity figures are measured on."""
    return {
        name: divergence(original, session.model, session.tokenizer, held_out_texts(name), max_windows=windows)
        for name in HELD_OUT
    }


MAP_TOKENS = 256
"""tokens of held-out prose the report's divergence map reads"""


def layer_map_from_original(original, session) -> DivergenceMap:
    """Where the compressed session parts from `original` (the model as loaded), layer by layer,
    head by head and module by module, on the start of the out-of-domain held-out prose."""
    return divergence_map(original, session, "\n\n".join(held_out_texts("prose")), max_tokens=MAP_TOKENS)


def layer_map_lines(layer_map: DivergenceMap | None) -> list[str]:
    if layer_map is None:
        return []
    return [
        "",
        "## Where it parts from the original",
        "",
        f"Both models read the first {MAP_TOKENS} tokens of the held-out prose (workbench.inspect.divergence). "
        "Logit-lens KL: each layer's residual stream through that model's own final norm and lm_head; a layer's "
        "added KL is the rise over the layer below. Heads and modules are compared on the same input, so their "
        "errors are their own; the figures are in divergence.html.",
        "",
        layer_map.to_markdown(),
    ]


def _score(score: dict | None) -> str:
    if score is None:
        return "-"
    if score["metric"].startswith("acc"):
        spread = f" ± {100 * score['stderr']:.1f}" if score["stderr"] is not None else ""
        return f"{100 * score['value']:.1f}{spread}"
    return f"{score['value']:.3f}"


def to_markdown(
    config_path: str,
    before: Measurement,
    after: Measurement,
    steps: list[dict],
    drift: dict[str, Divergence],
    layer_map: DivergenceMap | None = None,
) -> str:
    def row(name, b, a, fmt="{:,}"):
        ratio = f"{a / b:.3f}x" if isinstance(b, (int, float)) and b else ""
        return f"| {name} | {fmt.format(b)} | {fmt.format(a)} | {ratio} |"

    lines = [
        f"# Compression report: {config_path}",
        "",
        "| measure | before | after | after / before |",
        "|---|---|---|---|",
        row("parameters", before.params, after.params),
        row("weight bytes", before.weight_bytes, after.weight_bytes),
        row("KV-cache bytes per token", before.kv_bytes_per_token, after.kv_bytes_per_token),
        row("attention heads (all layers)", sum(before.heads_per_layer), sum(after.heads_per_layer)),
        *(
            row(f"perplexity, held-out {name} text", before.perplexity[name], after.perplexity[name], "{:.3f}")
            for name in HELD_OUT
        ),
        *(
            f"| lm-eval {task} ({score['metric']}, % ± stderr, {score['samples']} questions) | {_score(score)} | "
            f"{_score(after.harness.get(task))} | |"
            for task, score in before.harness.items()
        ),
        row("decode tok/s", before.decode_tokens_per_s, after.decode_tokens_per_s, "{:.1f}"),
        row("time to first token, s", before.ttft_s, after.ttft_s, "{:.3f}"),
        row("memory (CUDA peak, or CPU process resident)", before.memory_bytes, after.memory_bytes),
        *resident_rows(before, after, row),
        "",
        "Weight bytes by storage type: before "
        + ", ".join(f"{k} {v:,}" for k, v in before.bytes_by_dtype.items())
        + "; after "
        + ", ".join(f"{k} {v:,}" for k, v in after.bytes_by_dtype.items()),
        "",
        "Steps: " + ", ".join(s["step"] for s in steps),
        *calibration_lines(steps),
        "",
        "## Divergence from the original",
        "",
        "KL(original || compressed) of the next-token distribution, nats per token, over every position "
        "of the held-out windows the perplexities are measured on; top-1 agreement is the share of "
        "positions where both models' most likely next token is the same (llama.cpp's `--kl-divergence` "
        "figures: Mean / Median / 99.0% / Maximum KLD, Same top p).",
        "",
        "| measure | "
        + " | ".join(f"{name} ({d.windows} windows, {d.tokens:,} positions)" for name, d in drift.items())
        + " |",
        "|---|" + "---|" * len(drift),
        "| mean KL | " + " | ".join(f"{d.kl_mean:.4g}" for d in drift.values()) + " |",
        "| median KL | " + " | ".join(f"{d.kl_median:.4g}" for d in drift.values()) + " |",
        "| p99 KL | " + " | ".join(f"{d.kl_p99:.4g}" for d in drift.values()) + " |",
        "| max KL | " + " | ".join(f"{d.kl_max:.4g}" for d in drift.values()) + " |",
        "| top-1 agreement | " + " | ".join(f"{d.top1_agreement:.2%}" for d in drift.values()) + " |",
        *sensitivity_lines(steps),
        *layer_map_lines(layer_map),
    ]
    return "\n".join(lines) + "\n"


def resident_rows(before: Measurement, after: Measurement, row) -> list[str]:
    """The resident split after the decode (Session.memory), one row per part: where a
    compressed model's memory really goes, float32 copies left resident included. Both
    figures are taken in the same process, so `after` carries what `before` left behind."""
    if not before.resident or not after.resident:
        return []
    parts = [
        ("resident: runtime (interpreter, libraries)", "runtime"),
        ("resident: weights, every copy", "weight_total"),
        ("resident: stale checkpoint pages (in weights)", "stale_checkpoint_pages"),
        ("resident: KV cache", "kv_cache"),
        ("resident: activations", "activations"),
        ("resident: unaccounted", "unaccounted"),
    ]
    lines = [row(name, before.resident[key], after.resident[key]) for name, key in parts]
    dtypes = sorted(set(before.resident["weights"]) | set(after.resident["weights"]))
    lines += [
        row(
            f"resident: weights {dtype}",
            before.resident["weights"].get(dtype, 0),
            after.resident["weights"].get(dtype, 0),
        )
        for dtype in dtypes
    ]
    return lines


def calibration_lines(steps: list[dict]) -> list[str]:
    """Which calibration data each step fitted on (Calibration.record), and what a prune's
    compensation check decided: the figures above depend on both."""
    lines = []
    for step in steps:
        record = step.get("calibration")
        if record:
            used = f", the first {record['texts_used']} read" if "texts_used" in record else ""
            lines.append(
                f"- {step['step']} calibrated on `{record['name']}`: {record['texts']} texts{used}, "
                f"{record['chars']:,} characters, sha256 {record['sha256'][:16]}"
            )
        if step.get("groups_from") not in (None, "importance", "given"):
            lines.append(f"- {step['step']}: groups {step['groups_from']} ({step['criterion']})")
        check = step.get("compensation_check")
        if check:
            verdict = "kept" if check["kept"] else "undone: it raised the loss"
            lines.append(
                f"- {step['step']} compensation {verdict} (loss on {check['held_out_texts']} held-out calibration "
                f"texts {check['held_out_loss_uncompensated']:.4f} uncompensated, "
                f"{check['held_out_loss_compensated']:.4f} compensated)"
            )
    return ["", "Calibration:", *lines] if lines else []


def write_plots(path: Path, before: Measurement, after: Measurement) -> None:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("attention heads per layer", "weight bytes by storage type"))
    layers = list(range(len(before.heads_per_layer)))
    fig.add_bar(x=layers, y=before.heads_per_layer, name="heads before", row=1, col=1)
    fig.add_bar(x=layers, y=after.heads_per_layer, name="heads after", row=1, col=1)
    for label, m in (("before", before), ("after", after)):
        fig.add_bar(
            x=list(m.bytes_by_dtype), y=[v / 1e6 for v in m.bytes_by_dtype.values()], name=f"MB {label}", row=1, col=2
        )
    fig.update_layout(barmode="group", height=420, width=1100)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="MB", row=1, col=2)
    fig.write_html(path, include_plotlyjs="cdn")


def _sensitivities(steps: list[dict]) -> list[dict]:
    """The sensitivity records of quantize steps that chose precisions by a budget."""
    return [s["sensitivity"] for s in steps if s.get("step") == "quantize" and s.get("sensitivity")]


def sensitivity_lines(steps: list[dict], top: int = 10) -> list[str]:
    """The budget, what it bought, and the layers that moved the output most when quantized alone."""
    lines: list[str] = []
    for record in _sensitivities(steps):
        chosen = {r["pattern"]: r["scheme"] for r in record["rules"]}
        counts: dict[str, int] = {}
        for scheme in chosen.values():
            counts[scheme] = counts.get(scheme, 0) + 1
        cheapest = min(record["precisions"], key=lambda p: sum(b.get(p, 0) for b in record["bytes"].values()))
        ranked = sorted(record["kl"], key=lambda n: record["kl"][n].get(cheapest, 0.0), reverse=True)[:top]
        lines += [
            "",
            "## Mixed precision by sensitivity",
            "",
            f"Budget {record['budget_bytes']:,} bytes; chosen {record['chosen_bytes']:,} bytes, "
            f"{record['bits_per_weight']:.3f} bits per weight over {len(chosen)} layers: "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + f". Each layer's KL was measured alone on {record['windows']} calibration windows "
            f"({record['tokens']:,} positions, calibration {record['calibration']['name']}).",
            "",
            f"| layer | KL alone in {cheapest} | chosen |",
            "|---|---|---|",
            *(f"| {n} | {record['kl'][n].get(cheapest, 0.0):.3g} | {chosen[n]} |" for n in ranked),
        ]
    return lines


def write_sensitivity_plot(path: Path, steps: list[dict]) -> None:
    """Each layer's KL when quantized alone (log scale, coloured by the scheme it got), and the
    budget curve: summed single-layer KL against bits per weight as the greedy choice spent it."""
    records = _sensitivities(steps)
    if not records:
        return
    from plotly.subplots import make_subplots

    record = records[-1]
    chosen = {r["pattern"]: r["scheme"] for r in record["rules"]}
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("KL of the output, one layer quantized", "budget curve (greedy)")
    )
    for scheme in record["precisions"]:
        if scheme == "keep":
            continue
        names = [n for n in record["kl"] if scheme in record["kl"][n]]
        fig.add_scatter(
            x=names,
            y=[record["kl"][n][scheme] for n in names],
            mode="markers",
            name=f"as {scheme}",
            text=[f"chosen: {chosen[n]}" for n in names],
            row=1,
            col=1,
        )
    curve = record["curve"]
    fig.add_scatter(
        x=[c["bits_per_weight"] for c in curve],
        y=[c["kl_sum"] for c in curve],
        mode="lines+markers",
        name="summed KL",
        row=1,
        col=2,
    )
    fig.update_yaxes(type="log", title_text="KL, nats per token", row=1, col=1)
    fig.update_xaxes(title_text="bits per weight", row=1, col=2)
    fig.update_yaxes(type="log", title_text="summed single-layer KL", row=1, col=2)
    fig.update_layout(height=460, width=1200)
    fig.write_html(path, include_plotlyjs="cdn")


def write_report(
    out: Path,
    config_path: str,
    before: Measurement,
    after: Measurement,
    steps: list[dict],
    drift: dict[str, Divergence],
    layer_map: DivergenceMap | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config": config_path,
        "before": asdict(before),
        "after": asdict(after),
        "divergence": {name: asdict(d) for name, d in drift.items()},
        "divergence_map": layer_map.to_dict() if layer_map is not None else None,
        "steps": steps,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(to_markdown(config_path, before, after, steps, drift, layer_map))
    if layer_map is not None:
        divergence_overview(layer_map, title=f"What {config_path} changed").write_html(
            out / "divergence.html", include_plotlyjs="cdn"
        )
    write_plots(out / "report.html", before, after)
    write_sensitivity_plot(out / "sensitivity.html", steps)
