"""python -m workbench.bench decode|serve ...

decode  the engine under each config vs plain model.generate vs llama.cpp on the same weights:
        time to first token, decode tok/s, peak memory
serve   streaming clients at 1, 4, 8 concurrency against an OpenAI-compatible endpoint
        (this workbench's server by default, `python -m workbench.serve` in its own process; or --base-url for any other)
pruning perplexity against the share of heads pruned, for each importance criterion
quality perplexity (local configs) and answer accuracy per task, over the OpenAI HTTP path
compare the comparison table: columns = configs and endpoints, rows = latency, context,
        quality, price
speech  Whisper models on espeak-ng clips of known sentences: WER, real-time factor, load
        time, language detection
structured  schema-valid replies and decode tok/s of JSON and tool-call tasks, free vs
        constrained decoding, same prompts and seeds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from workbench.bench import decode as decode_bench
from workbench.bench import pruning as pruning_bench
from workbench.bench import serve as serve_bench
from workbench.bench import structured as structured_bench


def _out(path: Path | None, kind: str) -> Path:
    return path or Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")


def _decode(args) -> None:
    from workbench.bench.cpu import cpu_identity, describe

    if args.merge:
        return _merge(args)
    targets = args.targets.split(",") if args.targets else decode_bench.default_targets()
    batches = tuple(int(b) for b in args.batch.split(","))
    load_before = os.getloadavg()[0]
    try:
        runs, info, skipped = decode_bench.run_decode(
            targets, tokens=args.tokens, repeats=args.repeats, batches=batches, profile=args.profile
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    load_after = os.getloadavg()[0]
    devices = sorted({i["device"] for i in info.values()})
    cpu = cpu_identity()
    gpu = torch.cuda.get_device_name() if any(d.startswith("cuda") for d in devices) else None
    meta = {
        "machine": f"{describe(cpu)}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
        + (f", {gpu}" if gpu else ""),
        "cpu": cpu,
        "gpu": gpu,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "batches": list(batches),
        "torch": torch.__version__,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    rows = decode_bench.summarise(runs, info)
    out = _out(args.out, "decode")
    decode_bench.write_results(out, runs, rows, info, skipped, meta)
    print(decode_bench.to_markdown(rows, meta, skipped))
    print(f"Results in {out}/decode.json, decode.md, decode.html" + (", profile.md" if args.profile else ""))


def _merge(args) -> None:
    """One table from several decode results of one CPU (refused across CPUs)."""
    try:
        rows, meta = decode_bench.merge_results([Path(f) for f in args.merge.split(",")])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    out = _out(args.out, "decode-merged")
    decode_bench.write_results(out, [], rows, {}, {}, meta)
    print(decode_bench.to_markdown(rows, meta, {}))
    print(f"Results in {out}/decode.json, decode.md, decode.html")


def _serve(args) -> None:
    levels = tuple(int(c) for c in args.concurrency.split(","))
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or any(p not in ("eager", "compiled") for p in paths) or len(set(paths)) != len(paths):
        raise SystemExit(f"error: --paths takes eager, compiled or both (eager,compiled), not {args.paths!r}")
    if args.base_url and paths != ["eager"]:
        raise SystemExit(
            "error: --paths is for this workbench's own server; an endpoint at --base-url runs whatever it runs"
        )
    with contextlib.ExitStack() as stack:
        if args.base_url:
            if not args.model:
                raise SystemExit("--model is required with --base-url (the model id that endpoint serves)")
            servers = {"endpoint": (args.base_url, args.model)}
            target, warmup = args.base_url, dict[str, float]()
        else:
            from workbench.serve.live import ServerProcess

            servers, warmup = {}, {}
            for path in paths:  # each its own `python -m workbench.serve`, as users run it
                live = stack.enter_context(ServerProcess(args.config, compile=path == "compiled"))
                servers[path] = (live.base_url + "/v1", live.model_name)
            target = f"`python -m workbench.serve --config {args.config or '(the embedded model)'}`"
            if "compiled" in servers:  # the first lone request (compiling, on CUDA) is timed apart, as a user meets it
                warmup["compiled_first_request_s"] = serve_bench.warm_up(*servers["compiled"], tokens=args.tokens)
        rows, runs = serve_bench.run_paths(
            servers, api_key=api_key, levels=levels, requests_per_client=args.requests, tokens=args.tokens
        )
    meta = {
        "target": target,
        "model": next(iter(servers.values()))[1],
        "tokens": args.tokens,
        "requests_per_client": args.requests,
        "levels": list(levels),
        "paths": list(servers),
        **warmup,
    }
    out = _out(args.out, "serve")
    serve_bench.write_results(out, rows, runs, meta)
    print(serve_bench.to_markdown(rows, meta))
    print(f"Results in {out}/serve.json and serve.md")


def _pruning(args) -> None:
    ratios = [float(r) for r in args.ratios.split(",")]
    criteria = args.criteria.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    stages = args.recovery.split(",")
    recover_options = json.loads(args.recover_options) if args.recover_options else {}
    if "recover" in stages:
        from workbench.compress.recovery import RecoverOptions

        RecoverOptions.model_validate(recover_options)  # a bad option fails before the first model loads
    meta = {
        "source": args.config or "embedded:smollm2-135m-instruct",
        "windows": args.windows,
        "seeds": seeds,
        "ratios": ratios,
        "criteria": criteria,
        "recovery": stages,
        "recover_options": recover_options,
        "calibration_texts": args.calibration_texts,
        "facts": args.facts,
    }
    out = _out(args.out, "pruning")
    try:
        done = pruning_bench.resumable_rows(out / "pruning.json", meta) if args.resume else []
    except ValueError as err:
        raise SystemExit(str(err)) from None

    def save(rows):
        pruning_bench.write_results(out, rows, pruning_bench.summarise(rows), meta)

    rows = pruning_bench.run_curve(
        args.config,
        ratios,
        criteria,
        seeds,
        args.windows,
        args.calibration_texts,
        stages=stages,
        recover_options=recover_options,
        facts=args.facts,
        done=done,
        on_point=save,
    )
    summary = pruning_bench.summarise(rows)
    print(pruning_bench.to_markdown(summary, meta))
    print(f"Results in {out}/pruning.json, pruning.md, pruning.html")


def _targets_and_tasks(args):
    """Targets and tasks from the command line, or exit with what to fix."""
    from workbench.bench.targets import TargetError, parse_targets
    from workbench.bench.tasks import resolve_tasks

    try:
        targets = parse_targets(args.configs, args.endpoint, local_price=getattr(args, "local_price", None))
        tasks = resolve_tasks(args.tasks)
    except (TargetError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be at least 1")
    if args.harness_limit is not None and args.harness_limit < 1:
        raise SystemExit("error: --harness-limit must be at least 1")
    if args.windows < 0:
        raise SystemExit("error: --windows must be 0 (skip) or more")
    default = "workbench_mmlu_subset" if args.run is _quality else "none"
    args.harness = _harness_tasks(args.harness or default)
    return targets, tasks


def _harness_tasks(names: str) -> tuple[str, ...]:
    from workbench.harness import parse_tasks

    try:
        return parse_tasks(names)
    except ValueError as exc:
        raise SystemExit(f"error: --harness: {exc}") from None


def _cpu() -> dict:
    from workbench.bench.cpu import cpu_identity

    return cpu_identity()


def _quality(args) -> None:
    from workbench.bench import quality as quality_bench

    targets, tasks = _targets_and_tasks(args)
    modes = [m.strip() for m in args.thinking.split(",") if m.strip()] if args.thinking else []
    if any(m not in ("on", "off") for m in modes) or len(set(modes)) != len(modes):
        raise SystemExit(f"error: --thinking takes on, off or both (on,off), not {args.thinking!r}")
    if args.thinking_tokens < 1:
        raise SystemExit("error: --thinking-tokens must be at least 1")
    thinking = [m == "on" for m in modes] or None
    results = quality_bench.run_quality(
        targets,
        tasks,
        windows=args.windows,
        limit=args.limit,
        max_tokens=args.max_tokens,
        thinking=thinking,
        thinking_tokens=args.thinking_tokens,
        harness=args.harness,
        harness_limit=args.harness_limit,
    )
    meta = {
        "targets": [t.name for t in targets],
        "tasks": [t.name for t in tasks],
        "windows": args.windows,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "thinking": modes,
        "thinking_tokens": args.thinking_tokens,
        "harness": list(args.harness),
        "harness_limit": args.harness_limit,
        "cpu": _cpu(),
    }
    out = _out(args.out, "quality")
    quality_bench.write_results(out, results, targets, tasks, meta)
    print(quality_bench.to_markdown(results, targets, tasks, meta))
    print(f"Results in {out}/quality.json, quality.md, quality.html")


def _compare(args) -> None:
    from workbench.bench import compare as compare_bench

    targets, tasks = _targets_and_tasks(args)
    try:
        levels = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise SystemExit(f"error: --concurrency {args.concurrency!r}: expected client counts like 1,4")
    columns = compare_bench.run_compare(
        targets,
        tasks,
        levels=levels,
        requests=args.requests,
        tokens=args.tokens,
        windows=args.windows,
        limit=args.limit,
        max_tokens=args.max_tokens,
        harness=args.harness,
        harness_limit=args.harness_limit,
    )
    meta = {
        "targets": [t.name for t in targets],
        "tasks": [t.name for t in tasks],
        "harness": list(args.harness),
        "harness_limit": args.harness_limit,
        "levels": list(levels),
        "requests": args.requests,
        "tokens": args.tokens,
        "windows": args.windows,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "machine": compare_bench.machine(),
        "cpu": _cpu(),
    }
    out = _out(args.out, "compare")
    compare_bench.write_results(out, columns, tasks, meta, png=args.png)
    print(compare_bench.to_markdown(columns, tasks, meta))
    print(f"Results in {out}/compare.json, compare.md, compare.html")


def _speech(args) -> None:
    from workbench.bench import speech as speech_bench

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("error: --models names no model (tiny.en, base, or a CTranslate2 Whisper folder)")
    try:
        rows, results, meta = speech_bench.run(
            models,
            args.out,
            clips=args.clips,
            voice=args.voice,
            other_per_language=args.other,
            beam_size=args.beam_size,
            threads=args.threads,
        )
    except (speech_bench.SpeechBenchError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(speech_bench.to_markdown(rows, results, meta).split("\n\n| model | clip |")[0])
    print(f"Results in {args.out}/speech.json, speech.md, speech.html (clips in {args.out}/clips)")


def _structured(args) -> None:
    if args.samples < 1 or args.max_tokens < 1:
        raise SystemExit("error: --samples and --max-tokens must be at least 1")
    structured_bench.main(args)


def _target_options(parser) -> None:
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated config files, model sources or saved folders, each optionally NAME=SPEC "
        "(default: the embedded model, unless only endpoints are given)",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=None,
        metavar="SPEC",
        help="an OpenAI-compatible endpoint: NAME=BASE_URL,model=ID[,key_env=VAR][,price_in=USD]"
        "[,price_out=USD][,context=N] (prices per 1K tokens); repeat for several",
    )
    parser.add_argument(
        "--tasks", default="all", help="comma-separated answer tasks: facts, arithmetic, image_qa, speech, or all"
    )
    parser.add_argument("--limit", type=int, default=None, help="ask only the first N questions of each task")
    parser.add_argument("--max-tokens", type=int, default=16, help="reply budget per question")
    parser.add_argument(
        "--windows",
        type=int,
        default=4,
        help="512-token windows of each held-out text for perplexity and KL to the original (0: skip)",
    )
    parser.add_argument(
        "--harness",
        default=None,
        help="comma-separated lm-eval tasks scored on each local config's weights (python -m workbench.harness "
        "ls tasks; the shipped ones start with workbench_), or none (default: workbench_mmlu_subset for quality, "
        "none for compare; MMLU's 500 questions take minutes per fp32 config on 2 cores, longer for int8/half "
        "precision on a CPU without their native kernels)",
    )
    parser.add_argument(
        "--harness-limit", type=int, default=None, help="score only the first N questions of each lm-eval task"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="bench", required=True)

    decode = sub.add_parser("decode", help="engine per config vs plain model.generate vs llama.cpp")
    decode.add_argument(
        "--targets",
        default=None,
        help="comma-separated PATH:SPEC (engine:CONFIG, engine+compile:CONFIG, generate:CONFIG, llamacpp:F32|F16|Q8_0|Q4_1); "
        "default: the engine on every configs/*.yaml, compiled default and int8, generate, and llama.cpp when installed",
    )
    decode.add_argument(
        "--batch", default="1", help="comma-separated batch sizes for the engine targets (others run at 1)"
    )
    decode.add_argument("--tokens", type=int, default=64, help="new tokens per reply (end of turn ignored)")
    decode.add_argument("--repeats", type=int, default=3, help="rounds over the fixed prompt set")
    decode.add_argument("--out", type=Path, default=None, help="results folder (default runs/decode-TIMESTAMP)")
    decode.add_argument(
        "--profile",
        action="store_true",
        help="after the timed rounds, profile one more reply of every torch target (op table in profile.md)",
    )
    decode.add_argument(
        "--merge",
        default=None,
        metavar="DIR,DIR",
        help="instead of timing, put these result folders' rows in one table (refused if they ran on different CPUs)",
    )
    decode.set_defaults(run=_decode)

    serve = sub.add_parser("serve", help="HTTP latency and throughput at several concurrency levels")
    serve.add_argument(
        "--base-url",
        default=None,
        help="an OpenAI-compatible base URL ending in /v1 (default: start this workbench's server)",
    )
    serve.add_argument("--model", default=None, help="model id to send (required with --base-url)")
    serve.add_argument(
        "--api-key-env", default=None, help="name of the environment variable holding the endpoint's API key"
    )
    serve.add_argument(
        "--config", default=None, help="config or source for this workbench's server (default: the embedded model)"
    )
    serve.add_argument("--concurrency", default="1,4,8", help="comma-separated concurrent client counts")
    serve.add_argument(
        "--paths",
        default="eager",
        help="this workbench's server, each path its own `python -m workbench.serve` process: eager, "
        "compiled (--compile: lone requests decode through the compiled step) or both, "
        "interleaved level by level in one run",
    )
    serve.add_argument("--requests", type=int, default=2, help="requests each client sends back to back")
    serve.add_argument("--tokens", type=int, default=32, help="max tokens per reply")
    serve.add_argument("--out", type=Path, default=None, help="results folder (default runs/serve-TIMESTAMP)")
    serve.set_defaults(run=_serve)

    pruning = sub.add_parser("pruning", help="perplexity vs share of heads pruned, per importance criterion")
    pruning.add_argument("--config", default=None, help="config file or model source (default: the embedded model)")
    pruning.add_argument(
        "--ratios", default="0,0.1,0.2,0.3,0.4,0.5", help="comma-separated shares of KV groups to remove"
    )
    pruning.add_argument("--criteria", default="taylor,attention_entropy,weight_norm,random")
    pruning.add_argument("--seeds", default="0,1,2", help="seeds for random (others use the first)")
    pruning.add_argument("--windows", type=int, default=4, help="512-token windows of held-out text per perplexity")
    pruning.add_argument("--calibration-texts", type=int, default=16, help="calibration documents for taylor / entropy")
    pruning.add_argument(
        "--recovery",
        default="none",
        help="recovery stages per point: none, compensate (o_proj refit), recover (compensate + distillation)",
    )
    pruning.add_argument(
        "--recover-options",
        default=None,
        help="JSON options of the recover step for the recover stage, e.g. '{\"steps\": 300}'",
    )
    pruning.add_argument("--facts", action="store_true", help="also ask the 32 facts questions (greedy) at every point")
    pruning.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default runs/pruning-TIMESTAMP); pruning.json there is rewritten after every point",
    )
    pruning.add_argument(
        "--resume",
        action="store_true",
        help="take the points already in --out/pruning.json (same options) instead of measuring them again",
    )
    pruning.set_defaults(run=_pruning)

    quality = sub.add_parser("quality", help="perplexity and answer accuracy per config or endpoint")
    _target_options(quality)
    quality.add_argument(
        "--thinking",
        default=None,
        metavar="on,off",
        help="ask every task with enable_thinking on and/or off (streamed, one question at a time: "
        "accuracy, reasoning tokens, time to the first answer token per mode)",
    )
    quality.add_argument("--thinking-tokens", type=int, default=256, help="reply budget with thinking on")
    quality.add_argument("--out", type=Path, default=None, help="results folder (default runs/quality-TIMESTAMP)")
    quality.set_defaults(run=_quality)

    compare = sub.add_parser("compare", help="the comparison table: configs and endpoints side by side")
    _target_options(compare)
    compare.add_argument(
        "--local-price",
        default=None,
        metavar="IN,OUT",
        help="US dollars per 1K input,output tokens for the local configs (default: not priced, shown as 0)",
    )
    compare.add_argument("--concurrency", default="1,4", help="comma-separated concurrent client counts for latency")
    compare.add_argument("--requests", type=int, default=2, help="latency requests each client sends back to back")
    compare.add_argument("--tokens", type=int, default=32, help="max tokens per latency request")
    compare.add_argument("--png", action="store_true", help="also write compare.png (needs kaleido and a Chromium)")
    compare.add_argument("--out", type=Path, default=None, help="results folder (default runs/compare-TIMESTAMP)")
    compare.set_defaults(run=_compare)

    speech = sub.add_parser("speech", help="Whisper WER, real-time factor and language detection on espeak-ng clips")
    speech.add_argument(
        "--models", default="tiny.en,base", help="comma-separated: tiny.en, base, or CTranslate2 Whisper folders"
    )
    speech.add_argument("--clips", type=int, default=40, help="English clips (the sentence list in order)")
    speech.add_argument("--voice", default="en-us", help="espeak-ng voice for the English clips (variants are cycled)")
    speech.add_argument(
        "--other",
        type=int,
        default=4,
        help="German, French, Spanish and Italian clips each (up to 5), for language detection",
    )
    speech.add_argument("--beam-size", type=int, default=None, help="decoding beam (default: the recognizer's)")
    speech.add_argument("--threads", type=int, default=2, help="CTranslate2 CPU threads")
    speech.add_argument("--out", type=Path, default=Path("bench-results/speech"), help="results folder")
    speech.set_defaults(run=_speech)

    structured = sub.add_parser("structured", help="schema-valid replies and decode speed, free vs constrained")
    structured.add_argument("--config", default="configs/default.yaml", help="config file or model source")
    structured.add_argument("--samples", type=int, default=10, help="sampled replies per task and mode")
    structured.add_argument("--max-tokens", type=int, default=200, help="reply budget")
    structured.add_argument("--temperature", type=float, default=0.7)
    structured.add_argument("--out", type=Path, default=None, help="results folder (default runs/structured-TIMESTAMP)")
    structured.set_defaults(run=_structured)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
