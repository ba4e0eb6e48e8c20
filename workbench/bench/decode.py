"""Decode speed of the engine under each config, against plain `model.generate` and llama.cpp.

Every target gets the same chat prompts (the same token ids) and produces the same number
of new tokens (greedy, end of turn ignored). Targets run in worker processes of their own
(decode_targets.py) and the parent interleaves them run by run, so that a noisy neighbour
slows every target alike; the table reports medians with min–max spreads, each target's
peak memory, and two ratios: to plain `generate` on fp32 weights, and to the llama.cpp row
of the same model shape (attention heads) whose bits per weight are nearest ("equal bits").
Numbers from one run are comparable with each other, not with another machine's or another
day's.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from workbench.bench.cpu import describe, same_cpu
from workbench.bench.decode_targets import PROMPTS, Target, llamacpp_available, worker


def default_targets(configs_dir: Path = Path("configs")) -> list[str]:
    configs = sorted(str(p) for p in configs_dir.glob("*.yaml"))
    targets = [f"engine:{c}" for c in configs]
    targets += [
        "engine+compile:configs/default.yaml",
        "engine+compile:configs/int8.yaml",
        "generate:configs/default.yaml",
    ]
    if llamacpp_available():
        targets += ["llamacpp:F32", "llamacpp:F16", "llamacpp:Q8_0", "llamacpp:Q4_1"]
    return targets


@dataclass(frozen=True)
class Run:
    target: str
    batch: int
    prompt: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    peak_bytes: int


def run_decode(
    targets: list[str],
    *,
    tokens: int = 64,
    repeats: int = 3,
    batches=(1,),
    progress: bool = True,
    profile: bool = False,
):
    """Returns (runs, info per target, skipped target -> reason). With `profile`, after the timed
    rounds every torch target profiles one more reply; its op table is `info[target]['profile']`."""
    parsed = [Target.parse(t) for t in targets]
    context = multiprocessing.get_context("spawn")
    workers, info, skipped = {}, {}, {}
    try:
        for target in tqdm(parsed, desc="loading targets", disable=not progress):
            parent, child = context.Pipe()
            process = context.Process(target=worker, args=(target, child, min(tokens, 8)), daemon=True)
            process.start()
            child.close()  # so that a worker that dies shows as end-of-file here, not a hang
            message = _receive(parent, process, target.name)
            if message[0] == "ready":
                workers[target.name], info[target.name] = (process, parent), message[1]
            else:
                skipped[target.name] = message[1]
                process.join()
        plan = [
            (name, batch, prompt)
            for _ in range(repeats)
            for prompt in range(len(PROMPTS))
            for batch in batches
            for name in workers
            if batch == 1 or Target.parse(name).path.startswith("engine")
        ]
        runs = []
        for name, batch, prompt in tqdm(plan, desc="decode bench", disable=not progress):
            if name in skipped:
                continue
            process, conn = workers[name]
            conn.send((prompt, tokens, batch))
            message = _receive(conn, process, name)
            if message[0] != "ok":  # the target leaves the table with the reason; the others go on
                skipped[name] = f"failed while timing: {message[1]}"
                continue
            runs.append(Run(target=name, batch=batch, prompt=prompt, **message[1]))
        if profile:
            for name in tqdm(
                [n for n in workers if n not in skipped and not n.startswith("llamacpp")],
                desc="profiling",
                disable=not progress,
            ):
                process, conn = workers[name]
                conn.send(("profile", tokens))
                message = _receive(conn, process, name)
                info[name]["profile"] = message[1] if message[0] == "ok" else f"failed: {message[1]}"
        for name in skipped:
            info.pop(name, None)
        return runs, info, skipped
    finally:
        for process, conn in workers.values():
            if process.is_alive():
                conn.send(None)
            process.join(timeout=30)


def _receive(conn, process, name: str):
    try:
        return conn.recv()
    except EOFError:
        process.join(timeout=10)
        code = process.exitcode
        why = {-4: "illegal instruction: a build for a CPU other than this one", -11: "segmentation fault"}.get(
            code, ""
        )
        return ("error", f"the worker process died (exit code {code}{': ' + why if why else ''})", "")


def summarise(runs: list[Run], info: dict) -> list[dict]:
    rows = []
    for name in info:
        for batch in sorted({r.batch for r in runs if r.target == name}):
            mine = [r for r in runs if r.target == name and r.batch == batch]
            ttft = [r.ttft_s * 1000 for r in mine]
            tps = [r.decode_tokens_per_s for r in mine]
            rows.append(
                {
                    "target": name,
                    "batch": batch,
                    "runs": len(mine),
                    "ttft_ms_median": statistics.median(ttft),
                    "ttft_ms_min": min(ttft),
                    "ttft_ms_max": max(ttft),
                    "decode_tok_s_median": statistics.median(tps),
                    "decode_tok_s_min": min(tps),
                    "decode_tok_s_max": max(tps),
                    "peak_mb": max(r.peak_bytes for r in mine) / 2**20,
                    "weight_mb": info[name]["weight_bytes"] / 2**20,
                    "resident": info[name].get("resident"),
                    "bits_per_weight": info[name]["bits_per_weight"],
                    "warmup_s": info[name]["warmup_s"],
                    "load_s": info[name].get("load_s"),
                    "attention_heads": info[name].get("attention_heads"),
                }
            )
    generate = next((r for r in rows if r["target"].startswith("generate:") and r["batch"] == 1), None)
    llama = [r for r in rows if r["target"].startswith("llamacpp:")]
    for row in rows:
        if generate is not None:
            row["ratio_to_generate"] = row["decode_tok_s_median"] / generate["decode_tok_s_median"]
        if llama and not row["target"].startswith("llamacpp:") and row["bits_per_weight"]:
            # Same model shape first (a pruned config against a pruned GGUF), then nearest bits.
            peer = min(
                llama,
                key=lambda r: (
                    r.get("attention_heads") != row.get("attention_heads"),
                    abs(r["bits_per_weight"] - row["bits_per_weight"]),
                ),
            )
            row["llamacpp_peer"] = peer["target"].removeprefix("llamacpp:")
            row["ratio_to_llamacpp"] = row["decode_tok_s_median"] / peer["decode_tok_s_median"]
    return rows


def to_markdown(rows: list[dict], meta: dict, skipped: dict) -> str:
    load = meta.get("load_average", ["?", "?"])
    if "merged_from" in meta:
        caption = (
            f"Decode results of {len(meta['merged_from'])} runs on one CPU, {meta['machine']} "
            f"({', '.join(meta['merged_from'])}): targets were interleaved within each run only, "
            "so each row's ratios are to its own run's rows"
        )
    else:
        caption = (
            f"Decode bench on {meta['machine']}: {meta['tokens']} new tokens, greedy, "
            f"{meta['repeats']} x {len(PROMPTS)} prompts, targets interleaved (torch {meta['torch']}; "
            f"1-minute load average {load[0]} before, {load[-1]} after)"
        )
    lines = [
        caption,
        "",
        (
            "| target | batch | bits/weight | weights MB | peak MB | time to first token, ms (median, min–max) "
            "| decode tok/s (median, min–max) | vs generate | vs llama.cpp at equal bits | load s | warm-up s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gen = f"{r['ratio_to_generate']:.2f}x" if "ratio_to_generate" in r else "–"
        llama = f"{r['ratio_to_llamacpp']:.2f}x ({r['llamacpp_peer']})" if "ratio_to_llamacpp" in r else "–"
        load = "–" if r.get("load_s") is None else f"{r['load_s']:.1f}"
        lines.append(
            f"| {r['target']} | {r['batch']} | {r['bits_per_weight']:.1f} | {r['weight_mb']:.1f} | {r['peak_mb']:.0f} "
            f"| {r['ttft_ms_median']:.0f} ({r['ttft_ms_min']:.0f}–{r['ttft_ms_max']:.0f}) "
            f"| {r['decode_tok_s_median']:.1f} ({r['decode_tok_s_min']:.1f}–{r['decode_tok_s_max']:.1f}) "
            f"| {gen} | {llama} | {load} | {r['warmup_s']:.1f} |"
        )
    for name, reason in skipped.items():
        lines.append(f"\nSkipped {name}: {reason}")
    lines.append(
        "\nPeak MB: CPU targets, the worker process's peak resident memory (Python and torch included); "
        "CUDA targets, peak allocated GPU memory. Load: the worker's `workbench.load`, which on CPU "
        "prepares a compiled target's decode step (compiled on a machine's first load of that model structure, "
        "read from disk after). Warm-up: the first short reply (on CUDA, compilation included)."
    )
    lines += resident_lines(rows)
    return "\n".join(lines) + "\n"


def resident_lines(rows: list[dict]) -> list[str]:
    """Each engine worker's resident memory after its warm-up reply, split (Session.memory): MB."""
    split = {r["target"]: r["resident"] for r in rows if r.get("resident") and r["batch"] == 1}
    if not split:
        return []
    lines = [
        "",
        "Resident memory of each engine worker after its warm-up reply (MB, `Session.memory()`): "
        "weights count every resident copy, a memory-mapped checkpoint's pages included.",
        "",
        "| target | resident | runtime | weights (by dtype) | KV cache | activations | unaccounted | load peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, m in split.items():
        dtypes = ", ".join(
            f"{k} {v / 2**20:.0f}" for k, v in sorted(m["weights"].items(), key=lambda kv: -kv[1]) if v >= 2**20
        )
        lines.append(
            f"| {target} | {m['rss'] / 2**20:.0f} | {m['runtime'] / 2**20:.0f} | {m['weight_total'] / 2**20:.0f} ({dtypes}) "
            f"| {m['kv_cache'] / 2**20:.0f} | {m['activations'] / 2**20:.0f} | {m['unaccounted'] / 2**20:.0f} "
            f"| {m['load_peak'] / 2**20:.0f} |"
        )
    return lines


def to_html(rows: list[dict], meta: dict) -> str:
    from plotly.subplots import make_subplots

    labels = [f"{r['target']} x{r['batch']}" if r["batch"] > 1 else r["target"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode tokens/s (median, min–max)", "time to first token, ms"))
    fig.add_bar(
        x=[r["decode_tok_s_median"] for r in rows],
        y=labels,
        orientation="h",
        row=1,
        col=1,
        name="tok/s",
        error_x={
            "type": "data",
            "symmetric": False,
            "array": [r["decode_tok_s_max"] - r["decode_tok_s_median"] for r in rows],
            "arrayminus": [r["decode_tok_s_median"] - r["decode_tok_s_min"] for r in rows],
        },
    )
    fig.add_bar(x=[r["ttft_ms_median"] for r in rows], y=labels, orientation="h", row=1, col=2, name="TTFT ms")
    fig.update_layout(
        title=f"Decode bench, {meta['machine']}", showlegend=False, height=120 + 28 * len(rows), margin={"l": 260}
    )
    fig.update_yaxes(autorange="reversed")
    return fig.to_html(include_plotlyjs="cdn", full_html=True)


def write_results(out_dir: Path, runs: list[Run], rows: list[dict], info: dict, skipped: dict, meta: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(
        json.dumps(
            {"meta": meta, "summary": rows, "targets": info, "skipped": skipped, "runs": [asdict(r) for r in runs]},
            indent=2,
        )
    )
    (out_dir / "decode.md").write_text(to_markdown(rows, meta, skipped))
    (out_dir / "decode.html").write_text(to_html(rows, meta))
    profiles = {name: i["profile"] for name, i in info.items() if "profile" in i}
    if profiles:
        (out_dir / "profile.md").write_text(profile_markdown(profiles, meta))
    return out_dir


def profile_markdown(profiles: dict, meta: dict) -> str:
    """One table per target: the ops that take one reply's time (self time, per new token)."""
    lines = [
        f"Where the time goes, one greedy reply of {meta['tokens']} new tokens per target, torch.profiler "
        f"self CPU time ({meta['machine']})"
    ]
    for name, found in profiles.items():
        lines += ["", f"### {name}", ""]
        if isinstance(found, str):
            lines.append(found)
            continue
        lines += [
            f"Wall {found['wall_ms_per_token']:.2f} ms per new token (under the profiler), of which ops "
            f"{found['ops_ms_per_token']:.2f} ms.",
            "",
        ]
        lines += ["| op | ms per token | share of ops | calls per token |", "|---|---|---|---|"]
        lines += [
            f"| `{o['op']}` | {o['self_ms_per_token']:.2f} | {o['share']:.0%} | {o['calls_per_token']:.0f} |"
            for o in found["ops"]
        ]
    return "\n".join(lines) + "\n"


def merge_results(folders: list[Path]) -> tuple[list[dict], dict]:
    """The summary rows of several decode results, in one table: (rows, meta).

    Refused, before anything is written, when a folder has no decode.json, when a result
    does not record its CPU, or when two results ran on different CPUs (or GPUs). Each row
    keeps the ratios of its own run: rows are labelled with their folder's name, and ratios
    are never recomputed across runs that were not interleaved."""
    results = []
    for folder in folders:
        path = Path(folder) / "decode.json"
        if not path.is_file():
            raise ValueError(f"{folder} holds no decode.json: give folders written by `bench decode --out`")
        data = json.loads(path.read_text())
        if "cpu" not in data["meta"]:
            raise ValueError(
                f"{path} does not record its CPU (written before the bench did): rerun that bench to merge it"
            )
        results.append((Path(folder), data))
    first_folder, first = results[0]
    for folder, data in results[1:]:
        if not same_cpu(first["meta"]["cpu"], data["meta"]["cpu"]) or first["meta"].get("gpu") != data["meta"].get(
            "gpu"
        ):
            raise ValueError(
                f"{first_folder} ran on {_where(first['meta'])} but {folder} on {_where(data['meta'])}: "
                "figures from two machines are not merged into one table; compare runs from one CPU"
            )
    rows = [
        {**row, "target": f"{folder.name} · {row['target']}"} for folder, data in results for row in data["summary"]
    ]
    meta = {
        **first["meta"],
        "merged_from": [str(folder) for folder, _ in results],
        "load_average": [v for _, data in results for v in data["meta"].get("load_average", [])],
    }
    return rows, meta


def _where(meta: dict) -> str:
    return describe(meta["cpu"]) + (f" with {meta['gpu']}" if meta.get("gpu") else "")
