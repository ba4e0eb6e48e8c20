"""Perplexity (and `facts` accuracy) against the share of attention heads pruned, for each
importance criterion, and for each recovery stage: none, o_proj compensation, compensation +
distillation (`recover`). The question it answers: does the criterion still matter after
recovery?

Perplexity is measured on both held-out texts (`workbench.data.HELD_OUT`), the same windows of
each at every point: the reference text, from the source the pruning criteria are calibrated on,
and out-of-domain prose, where pruning costs far more (pruned-25: +6.2% on the reference text,
+56.7% on prose). A row keeps the reference text's as `perplexity` and adds the others beside it
(`perplexity_prose`, `PERPLEXITY_KEYS`).

Every point prunes a freshly loaded model, so points are independent; the compensated and
recovered variants of a point reuse its removed groups (`prune_heads(remove=...)`), so the
stages differ only in what was done after the same removal. `random` runs once per seed and
is summarised by its median, the control the other criteria must beat.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tqdm.auto import tqdm

import workbench
from workbench.bench.tasks import _facts, is_correct
from workbench.compress.pruning import prune_heads
from workbench.compress.recovery import recover, teacher_copy
from workbench.data import HELD_OUT, SHORT_ANSWER_PROMPT, held_out_texts
from workbench.metrics import perplexity

STAGES = ("none", "compensate", "recover")

PERPLEXITY_KEYS = {name: "perplexity" if name == "reference" else f"perplexity_{name}" for name in HELD_OUT}
"""Each held-out text (a key of HELD_OUT) -> the key of its perplexity in a row: `perplexity`
stays the reference text's, as in results written before prose was measured; a summary row holds
each as `<key>_median`."""


def held_out_perplexity(session, windows: int) -> dict[str, float]:
    """Perplexity on the first `windows` x 512-token windows of each held-out text, keyed as a row
    holds it (`PERPLEXITY_KEYS`)."""
    return {
        key: perplexity(session.model, session.tokenizer, held_out_texts(name), max_windows=windows)
        for name, key in PERPLEXITY_KEYS.items()
    }


def facts_correct(session, limit: int | None = None) -> int:
    """Greedy `facts` answers in process (the bench quality task's questions, system prompt
    and checker, without a server)."""
    correct = 0
    for item in list(_facts())[:limit]:
        messages = [{"role": "system", "content": SHORT_ANSWER_PROMPT}, {"role": "user", "content": item.question}]
        correct += is_correct(item, session.chat(messages, temperature=0, max_tokens=16).text)
    return correct


def _measure(session, windows: int, facts: bool) -> dict:
    row: dict = held_out_perplexity(session, windows)
    if facts:
        row["facts"] = facts_correct(session)
    return row


def run_curve(
    source: str | None,
    ratios: list[float],
    criteria: list[str],
    seeds: list[int],
    windows: int,
    calibration_texts: int = 16,
    stages: list[str] | None = None,
    recover_options: dict | None = None,
    facts: bool = False,
    done: list[dict] | None = None,
    on_point=None,
) -> list[dict]:
    """`windows`: 512-token windows of each held-out text per perplexity. `done`: rows of an earlier
    run with the same options; a point whose stages are all there, each with every held-out text's
    perplexity, is taken from them instead of being measured again (a row from before the prose
    text was measured is not). `on_point(rows)` is called after every point,
    so a long grid (a recover point is a training run) can be saved as it goes."""
    stages = stages or ["none"]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown recovery stage(s) {unknown} (known: {', '.join(STAGES)})")
    plan = [(r, c, s) for r in ratios for c in criteria for s in (seeds if c == "random" else seeds[:1])]
    previous: dict[tuple, dict] = {}
    for r in done or []:
        previous.setdefault((r["ratio"], r["criterion"], r["seed"]), {})[r.get("recovery", "none")] = r
    rows = []
    base = None
    for ratio, criterion, seed in tqdm(plan, desc="pruning curve"):
        old = previous.get((ratio, criterion, seed), {})
        if all(stage in old and all(k in old[stage] for k in PERPLEXITY_KEYS.values()) for stage in stages):
            rows += [old[stage] for stage in stages]
            continue
        if on_point is not None and rows:
            on_point(rows)
        if ratio == 0 and base is not None:
            rows += [{**b, "criterion": criterion, "seed": seed} for b in base]
            continue
        session = workbench.load(source, quiet=True)
        key = {"ratio": ratio, "criterion": criterion, "seed": seed}
        if ratio == 0:
            config = session.model.config
            row = {
                **key,
                "recovery": "none",
                "heads": config.num_attention_heads * config.num_hidden_layers,
                **_measure(session, windows, facts),
            }
            base = [{**row, "recovery": stage} for stage in stages]  # nothing removed: every stage is the model itself
            rows += [{**b, "criterion": criterion, "seed": seed} for b in base]
            continue
        teacher = teacher_copy(session.model) if "recover" in stages else None
        # The reference text, as every figure of this bench so far (and no minutes of generating
        # the `mix` for each fresh model); `python -m workbench.compress --calibration` chooses.
        report = prune_heads(
            session,
            criterion=criterion,
            ratio=ratio,
            seed=seed,
            calibration="reference",
            calibration_texts=calibration_texts,
        )
        heads = sum(report.heads_after)
        if "none" in stages:
            rows.append({**key, "recovery": "none", "heads": heads, **_measure(session, windows, facts)})
        if "compensate" in stages or "recover" in stages:
            session = workbench.load(source, quiet=True)
            prune_heads(
                session,
                remove=report.removed,
                compensate=True,
                calibration="reference",
                calibration_texts=calibration_texts,
            )
            if "compensate" in stages:
                rows.append({**key, "recovery": "compensate", "heads": heads, **_measure(session, windows, facts)})
            if "recover" in stages:
                recover(session, teacher=teacher, **(recover_options or {}))
                rows.append({**key, "recovery": "recover", "heads": heads, **_measure(session, windows, facts)})
    if on_point is not None:
        on_point(rows)
    return rows


RESUME_KEYS = ("source", "windows", "calibration_texts", "facts", "recover_options")


def resumable_rows(path: Path, meta: dict) -> list[dict]:
    """The rows of an earlier run in `path` that were measured exactly as `meta` asks; an earlier
    run with other options is refused by name rather than mixed into this one."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    differ = [k for k in RESUME_KEYS if old.get("meta", {}).get(k) != meta.get(k)]
    if differ:
        raise ValueError(
            f"--resume: {path} was measured with other options ("
            + ", ".join(f"{k}: {old.get('meta', {}).get(k)!r} there, {meta.get(k)!r} now" for k in differ)
            + "); choose another --out or drop --resume"
        )
    return old["rows"]


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for ratio in sorted({r["ratio"] for r in rows}):
        for criterion in sorted({r["criterion"] for r in rows}):
            for stage in [s for s in STAGES if any(r.get("recovery", "none") == s for r in rows)]:
                points = [
                    r
                    for r in rows
                    if r["ratio"] == ratio and r["criterion"] == criterion and r.get("recovery", "none") == stage
                ]
                if points:
                    summary = {
                        "ratio": ratio,
                        "criterion": criterion,
                        "recovery": stage,
                        "heads": points[0]["heads"],
                        **{
                            f"{key}_median": statistics.median(p[key] for p in points)
                            for key in PERPLEXITY_KEYS.values()
                            if all(key in p for p in points)
                        },
                        "runs": len(points),
                    }
                    if all("facts" in p for p in points):
                        summary["facts_median"] = statistics.median(p["facts"] for p in points)
                    out.append(summary)
    return out


def _label(criterion: str, stage: str, stages: list[str]) -> str:
    return criterion if stages == ["none"] else f"{criterion} ({stage})"


def _measured_texts(summary: list[dict]) -> list[str]:
    """The held-out texts whose perplexity the summary holds, in HELD_OUT's order."""
    return [name for name, key in PERPLEXITY_KEYS.items() if any(f"{key}_median" in s for s in summary)]


def to_markdown(summary: list[dict], meta: dict) -> str:
    """One table per held-out text (perplexity), then one of `facts` when it was asked."""
    criteria = sorted({s["criterion"] for s in summary})
    stages = [s for s in STAGES if any(x.get("recovery", "none") == s for x in summary)]
    columns = [(c, st) for c in criteria for st in stages]
    ratios = sorted({s["ratio"] for s in summary})
    cells = {(s["ratio"], s["criterion"], s.get("recovery", "none")): s for s in summary}
    heads = {s["ratio"]: s["heads"] for s in summary}
    lines = [
        f"Pruning curve: {meta['source']}, perplexity on {meta['windows']} x 512 tokens of each held-out text "
        f"(random: median of seeds {meta['seeds']})",
    ]

    def table(title: str, field: str, fmt: str) -> None:
        lines.extend(
            [
                "",
                title,
                "",
                "| KV groups removed | heads left | " + " | ".join(_label(c, st, stages) for c, st in columns) + " |",
                "|---|---|" + "---|" * len(columns),
            ]
        )
        for ratio in ratios:
            values = [cells.get((ratio, c, st), {}).get(field) for c, st in columns]
            row = " | ".join("—" if v is None else format(v, fmt) for v in values)
            lines.append(f"| {ratio:.0%} | {heads[ratio]} | {row} |")

    for name in _measured_texts(summary):
        table(f"Perplexity, held-out {name} text (data/{HELD_OUT[name]}):", f"{PERPLEXITY_KEYS[name]}_median", ".2f")
    if any("facts_median" in s for s in summary):
        table("facts: correct of 32, greedy:", "facts_median", "g")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], summary: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    (out / "pruning.md").write_text(to_markdown(summary, meta))
    figure(summary, meta).write_html(out / "pruning.html", include_plotlyjs="cdn")


def figure(summary: list[dict], meta: dict):
    """Perplexity (log scale) against the share pruned, one panel per held-out text, one line per
    criterion and stage; with `facts`, a last panel of correct answers, since perplexity alone
    hides a model that has stopped answering."""
    from plotly.subplots import make_subplots

    stages = [s for s in STAGES if any(x.get("recovery", "none") == s for x in summary)]
    texts = _measured_texts(summary)
    facts = any("facts_median" in s for s in summary)
    panels = [(f"{PERPLEXITY_KEYS[t]}_median", f"perplexity, held-out {t} text") for t in texts]
    panels += [("facts_median", "facts correct of 32")] if facts else []
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[title for _, title in panels])
    dash = {"none": "solid", "compensate": "dash", "recover": "dot"}
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, criterion in enumerate(sorted({s["criterion"] for s in summary})):
        colour = palette[i % len(palette)]
        for stage in stages:
            points = [s for s in summary if s["criterion"] == criterion and s.get("recovery", "none") == stage]
            x = [p["ratio"] * 100 for p in points]
            name = _label(criterion, stage, stages)
            line = {"dash": dash[stage], "color": colour}
            for col, (field, _) in enumerate(panels, start=1):
                fig.add_scatter(
                    x=x,
                    y=[p.get(field) for p in points],
                    mode="lines+markers",
                    name=name,
                    line=line,
                    legendgroup=name,
                    showlegend=col == 1,
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="% of KV groups removed")
    for col in range(1, len(texts) + 1):
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_layout(
        title=f"Pruning {meta['source']}: criterion x recovery stage (random: median of seeds {meta['seeds']})",
        width=200 + 450 * len(panels),
        height=500,
    )
    return fig
