"""How often a small model's reply is usable by an app, with and without constrained decoding,
and what the constraint costs in speed.

Each task asks for JSON (or a tool call) and describes the shape in the prompt, as an app
would without structured outputs. The same prompt, seed and sampling then run twice,
interleaved: free, and with the schema enforced (`response_format` json_schema, or
`tool_choice: required` for the tool task). A reply counts as valid when it parses (a fenced
code block is unwrapped first, as lenient client code does) and validates against the schema
with jsonschema. Speed is the engine's decode tok/s of each reply, on the loading thread,
one request at a time.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

import workbench
from workbench.bench.cpu import cpu_identity, describe

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"kind": {"type": "string"}, "name": {"type": "string"}},
                "required": ["kind", "name"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
    "required": ["title", "date", "attendees"],
    "additionalProperties": False,
}
SENTIMENT = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    schema: dict[str, Any]
    tool: bool = False
    """The schema is a tool's arguments; the reply must call it."""


TASKS = (
    Task(
        "person",
        "Make up a person who has pets. Answer with JSON only, shaped like "
        '{"name": "...", "age": 30, "pets": [{"kind": "...", "name": "..."}]}.',
        PERSON,
    ),
    Task(
        "event",
        "Invent a team meeting. Answer with JSON only, shaped like "
        '{"title": "...", "date": "YYYY-MM-DD", "attendees": ["...", "..."]}.',
        EVENT,
    ),
    Task(
        "sentiment",
        'Classify the sentiment of this review: "I loved this phone, the battery lasts for days." '
        'Answer with JSON only, shaped like {"label": "positive" or "negative" or "neutral", "confidence": 0.9}.',
        SENTIMENT,
    ),
    Task(
        "tool call",
        "What is the weather in Paris right now, in celsius?",
        WEATHER_TOOL["function"]["parameters"],
        tool=True,
    ),
)
MODES = ("free", "constrained")


@dataclass
class Row:
    task: str
    mode: str
    valid: int = 0
    samples: int = 0
    tokens: list[int] = field(default_factory=list)
    tok_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    finish: dict[str, int] = field(default_factory=dict)
    example: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "mode": self.mode,
            "valid": self.valid,
            "samples": self.samples,
            "valid_rate": self.valid / self.samples if self.samples else 0.0,
            "median_tokens": statistics.median(self.tokens) if self.tokens else 0,
            "median_decode_tok_s": statistics.median(self.tok_s) if self.tok_s else 0.0,
            "median_ttft_s": statistics.median(self.ttft_s) if self.ttft_s else 0.0,
            "finish_reasons": self.finish,
            "example": self.example,
        }


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parsed_json(text: str) -> Any:
    """The reply's JSON, a fenced block unwrapped first; ValueError when there is none."""
    fenced = _FENCE.search(text)
    return json.loads(fenced.group(1) if fenced else text.strip())


def is_valid(task: Task, text: str, tool_calls: tuple) -> bool:
    try:
        if task.tool:
            if len(tool_calls) != 1 or tool_calls[0].name != "get_weather":
                return False
            value = json.loads(tool_calls[0].arguments)
        else:
            value = parsed_json(text)
        jsonschema.validate(value, task.schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def request_fields(task: Task, mode: str) -> dict[str, Any]:
    if task.tool:
        return {
            "tools": [WEATHER_TOOL],
            "tool_choice": "required" if mode == "constrained" else "auto",
            "parallel_tool_calls": False,  # the task wants one call
        }
    return {"structured": {"json_schema": task.schema}} if mode == "constrained" else {}


def run(session, *, samples: int, max_tokens: int, temperature: float, progress=None) -> list[Row]:
    """Every task, `samples` seeds, free and constrained interleaved seed by seed."""
    rows = {(t.name, m): Row(t.name, m) for t in TASKS for m in MODES}
    for task in TASKS:
        for seed in range(samples):
            for mode in MODES:
                reply = session.chat(
                    task.prompt, temperature=temperature, seed=seed, max_tokens=max_tokens, **request_fields(task, mode)
                )
                row = rows[(task.name, mode)]
                row.samples += 1
                valid = is_valid(task, reply.text, reply.tool_calls)
                row.valid += valid
                row.tokens.append(reply.stats.completion_tokens)
                if reply.stats.decode_tokens_per_s:
                    row.tok_s.append(reply.stats.decode_tokens_per_s)
                row.ttft_s.append(reply.stats.ttft_s)
                row.finish[reply.stats.finish_reason] = row.finish.get(reply.stats.finish_reason, 0) + 1
                if not row.example:
                    calls = [f"{c.name}({c.arguments})" for c in reply.tool_calls]
                    row.example = (reply.text + " ".join(calls))[:200]
                if progress is not None:
                    progress.update(1)
    return list(rows.values())


def to_markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"# Structured outputs: {meta['config']}",
        "",
        f"{meta['samples']} sampled replies per task and mode (temperature {meta['temperature']}, "
        f"max {meta['max_tokens']} tokens), {meta['machine']}, {meta['date']}.",
        "",
        "| task | mode | schema-valid | median tokens | median decode tok/s | median TTFT s | finish reasons |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row.summary()
        finish = ", ".join(f"{k} {v}" for k, v in sorted(s["finish_reasons"].items()))
        lines.append(
            f"| {s['task']} | {s['mode']} | {s['valid']}/{s['samples']} | {s['median_tokens']:g} | "
            f"{s['median_decode_tok_s']:.1f} | {s['median_ttft_s']:.2f} | {finish} |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[Row]):
    from plotly.subplots import make_subplots

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("schema-valid replies (%)", "median decode tok/s"))
    for mode, color in zip(MODES, ("#9e9e9e", "#1f77b4"), strict=True):
        chosen = {r.task: r.summary() for r in rows if r.mode == mode}
        fig.add_bar(
            x=tasks, y=[100 * chosen[t]["valid_rate"] for t in tasks], name=mode, marker_color=color, row=1, col=1
        )
        fig.add_bar(
            x=tasks,
            y=[chosen[t]["median_decode_tok_s"] for t in tasks],
            name=mode,
            marker_color=color,
            showlegend=False,
            row=1,
            col=2,
        )
    fig.update_layout(
        barmode="group", height=380, width=900, title="Free vs constrained decoding, same prompts and seeds"
    )
    return fig


def write(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps({"meta": meta, "rows": [r.summary() for r in rows]}, indent=2))
    (out / "structured.md").write_text(to_markdown(rows, meta))
    fig = figure(rows)
    fig.write_html(out / "structured.html", include_plotlyjs="cdn")
    try:  # kaleido drives a Chromium; without one the HTML is still there
        fig.write_image(out / "structured.png")
    except Exception as exc:  # noqa: BLE001 - kaleido fails in many ways; each means no PNG
        print(f"structured: no PNG ({type(exc).__name__}: {exc}); structured.html has the figure", file=sys.stderr)


def main(args) -> None:
    import os

    import torch
    from tqdm.auto import tqdm

    session = workbench.load(args.config, quiet=True)
    meta = {
        "config": args.config,
        "samples": args.samples,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "machine": f"{describe(cpu_identity())}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "cpu": cpu_identity(),
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }
    with tqdm(total=len(TASKS) * len(MODES) * args.samples, desc="replies") as progress:
        rows = run(
            session, samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature, progress=progress
        )
    out = args.out or Path("runs") / time.strftime("structured-%Y%m%d-%H%M%S")
    write(out, rows, meta)
    print(to_markdown(rows, meta))
    print(f"Results in {out}/structured.json, structured.md, structured.html, structured.png")


__all__ = ["TASKS", "Row", "asdict", "is_valid", "main", "parsed_json", "run", "to_markdown", "write"]
