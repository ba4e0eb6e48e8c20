import json

import pytest

from workbench.bench.__main__ import main


def test_decode_bench_times_every_target_on_equal_work_and_writes_results(tmp_path, capsys):
    targets = "engine:tiny:llama,generate:tiny:llama,llamacpp:Q8_0"
    main(["decode", "--targets", targets, "--tokens", "6", "--repeats", "1", "--batch", "1,2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode.json").read_text())
    # Equal work on every path: the same prompt ids, the same number of new tokens.
    assert all(r["new_tokens"] == 6 for r in data["runs"])
    by_target = {}
    for r in data["runs"]:
        by_target.setdefault((r["target"], r["batch"]), []).append((r["prompt"], r["prompt_tokens"]))
    from workbench.bench.decode_targets import llamacpp_available

    expected = [("engine:tiny:llama", 1), ("engine:tiny:llama", 2), ("generate:tiny:llama", 1)]
    assert sorted(by_target) == sorted(expected + ([("llamacpp:Q8_0", 1)] if llamacpp_available() else []))
    assert (
        by_target[("engine:tiny:llama", 1)]
        == by_target[("generate:tiny:llama", 1)]
        == by_target[("engine:tiny:llama", 2)]
    )
    rows = {(r["target"], r["batch"]): r for r in data["summary"]}
    assert rows[("generate:tiny:llama", 1)]["ratio_to_generate"] == 1.0
    assert rows[("engine:tiny:llama", 1)]["ratio_to_generate"] > 0
    assert all(
        r["peak_mb"] > 50 and abs(r["bits_per_weight"] - 32) < 0.5 for k, r in rows.items() if k[0] != "llamacpp:Q8_0"
    )
    if llamacpp_available():  # an optional extra: its row is timed when installed, skipped with the reason when not
        assert data["targets"]["llamacpp:Q8_0"]["dtype"] == "Q8_0"
        assert rows[("engine:tiny:llama", 1)]["llamacpp_peer"] == "Q8_0"  # the only llama.cpp row is everyone's peer
    else:
        assert "llama-cpp-python is not installed" in data["skipped"]["llamacpp:Q8_0"]
    out = capsys.readouterr().out
    assert "| engine:tiny:llama | 2 |" in out and "| generate:tiny:llama | 1 |" in out
    assert "plotly" in (tmp_path / "decode.html").read_text()


def test_decode_profile_says_where_a_reply_spends_its_time(tmp_path):
    main(
        [
            "decode",
            "--targets",
            "engine:tiny:llama,generate:tiny:llama",
            "--tokens",
            "6",
            "--repeats",
            "1",
            "--profile",
            "--out",
            str(tmp_path),
        ]
    )
    targets = json.loads((tmp_path / "decode.json").read_text())["targets"]
    for name in ("engine:tiny:llama", "generate:tiny:llama"):
        found = targets[name]["profile"]
        assert 0 < found["ops_ms_per_token"] <= found["wall_ms_per_token"] * 1.05
        ops = found["ops"]
        assert 0 < len(ops) <= 12 and abs(sum(o["share"] for o in ops) - 1) < 0.5
        assert [o["self_ms_per_token"] for o in ops] == sorted((o["self_ms_per_token"] for o in ops), reverse=True)
        assert any(o["op"] in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm") for o in ops)
    table = (tmp_path / "profile.md").read_text()
    assert "### engine:tiny:llama" in table and "| op | ms per token | share of ops | calls per token |" in table


def test_decode_bench_refuses_a_malformed_target(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="bad target 'gguf:Q8_0'"):
        main(["decode", "--targets", "gguf:Q8_0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="llama.cpp types are F32, F16, Q4_1, Q8_0"):
        main(["decode", "--targets", "llamacpp:Q5_K", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no-such.gguf does not exist"):
        main(["decode", "--targets", f"llamacpp:{tmp_path}/no-such.gguf", "--out", str(tmp_path)])


def test_serve_bench_measures_each_concurrency_level(tmp_path, capsys):
    main(
        [
            "serve",
            "--config",
            "tiny:llama",
            "--concurrency",
            "1,3",
            "--requests",
            "1",
            "--tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "serve.json").read_text())
    assert [level["concurrency"] for level in data["levels"]] == [1, 3]
    assert all(level["failed"] == 0 for level in data["levels"])
    assert [level["requests"] for level in data["levels"]] == [1, 3]
    assert all(r["completion_tokens"] == 4 and r["ttft_s"] > 0 for r in data["runs"])
    assert data["levels"][1]["aggregate_tok_s"] > 0
    assert "| 3 | 3 (0) |" in capsys.readouterr().out


def test_serve_bench_puts_the_compiled_server_beside_the_eager_one(tmp_path, capsys):
    main(
        [
            "serve",
            "--config",
            "tiny:llama",
            "--paths",
            "eager,compiled",
            "--concurrency",
            "1,2",
            "--requests",
            "1",
            "--tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "serve.json").read_text())
    assert [(level["path"], level["concurrency"]) for level in data["levels"]] == [
        ("eager", 1),
        ("compiled", 1),
        ("eager", 2),
        ("compiled", 2),
    ]  # interleaved level by level
    assert all(level["failed"] == 0 for level in data["levels"])
    assert all(r["completion_tokens"] == 4 for r in data["runs"])
    assert data["meta"]["paths"] == ["eager", "compiled"] and data["meta"]["compiled_first_request_s"] >= 0
    out = capsys.readouterr().out
    assert "| compiled | 1 | 1 (0) |" in out and "the compiled server's first request took" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--paths", "jit"], "--paths takes eager, compiled or both"),
        (["--paths", "eager,eager"], "--paths takes eager, compiled or both"),
        (
            ["--paths", "compiled", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
            "--paths is for this workbench's own server",
        ),
    ],
)
def test_serve_bench_refuses_bad_paths(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["serve", "--config", "tiny:llama", *argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_serve_bench_reports_failures_of_a_foreign_endpoint(tmp_path):
    from workbench.serve.live import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    main(["serve", "--base-url", url, "--model", "m", "--concurrency", "1", "--requests", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["levels"][0]["failed"] == 1 and "ConnectError" in data["runs"][0]["error"]


def test_pruning_curve_covers_every_ratio_and_criterion(tmp_path, capsys):
    main(
        [
            "pruning",
            "--config",
            "tiny:llama",
            "--ratios",
            "0,0.5",
            "--criteria",
            "taylor,random",
            "--seeds",
            "0,1",
            "--windows",
            "1",
            "--calibration-texts",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "pruning.json").read_text())
    assert {(r["ratio"], r["criterion"], r["seed"]) for r in data["rows"]} == {
        (0.0, "taylor", 0),
        (0.0, "random", 0),
        (0.0, "random", 1),
        (0.5, "taylor", 0),
        (0.5, "random", 0),
        (0.5, "random", 1),
    }
    heads = {(s["ratio"], s["criterion"]): s["heads"] for s in data["summary"]}
    assert heads[(0.0, "taylor")] == 8 and heads[(0.5, "taylor")] == 4
    html = (tmp_path / "pruning.html").read_text()
    assert "perplexity, held-out reference text" in html and "perplexity, held-out prose text" in html
    out = capsys.readouterr().out
    assert "| 50% | 4 |" in out
    assert "held-out reference text (data/evaluation.txt)" in out and "held-out prose text (data/prose.txt)" in out


def test_pruning_curve_measures_perplexity_on_both_held_out_texts(tmp_path):
    import workbench
    from workbench.bench.pruning import run_curve, summarise
    from workbench.data import held_out_texts
    from workbench.metrics import perplexity

    rows = run_curve("tiny:llama", [0.0, 0.5], ["taylor"], [0], 1, calibration_texts=2)
    assert all(r["perplexity"] > 1 and r["perplexity_prose"] > 1 for r in rows)
    base = next(r for r in rows if r["ratio"] == 0.0)
    session = workbench.load("tiny:llama", quiet=True)
    for name, key in (("reference", "perplexity"), ("prose", "perplexity_prose")):
        # the same first window of each text the bench measured, on the same (seeded) tiny model
        assert base[key] == pytest.approx(
            perplexity(session.model, session.tokenizer, held_out_texts(name), max_windows=1)
        )
    assert base["perplexity_prose"] != base["perplexity"]
    pruned = next(s for s in summarise(rows) if s["ratio"] == 0.5)
    assert pruned["perplexity_prose_median"] == next(r for r in rows if r["ratio"] == 0.5)["perplexity_prose"]


def test_a_worker_that_dies_is_reported_not_waited_for():
    # A native crash (a llama.cpp build for another CPU dies of SIGILL) must not hang the bench.
    import multiprocessing
    import os

    from workbench.bench.decode import _receive

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=os._exit, args=(3,), daemon=True)
    process.start()
    child.close()
    assert _receive(parent, process, "x") == ("error", "the worker process died (exit code 3)", "")


def test_a_target_that_cannot_load_is_skipped_with_the_reason(tmp_path):
    main(
        [
            "decode",
            "--targets",
            "engine:tiny:llama,engine:tiny:nonesuch",
            "--tokens",
            "3",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "decode.json").read_text())
    assert [r["target"] for r in data["summary"]] == ["engine:tiny:llama"]
    assert "nonesuch" in data["skipped"]["engine:tiny:nonesuch"]


CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 sha_ni
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 sha_ni
"""


def test_cpu_identity_keeps_the_model_and_the_kernel_relevant_flags():
    from workbench.bench.cpu import cpu_identity

    identity = cpu_identity(CPUINFO)
    assert identity["model"] == "AMD EPYC 9B14"
    assert identity["flags"] == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]
    assert cpu_identity("model name\t: Old Xeon\nflags\t: sse2 avx avx2 fma\n")["flags"] == ["avx2", "fma"]


def test_decode_results_record_their_cpu_and_merge_only_with_the_same_cpu(tmp_path, capsys):
    import pytest

    from workbench.bench.cpu import cpu_identity

    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        main(["decode", "--targets", "engine:tiny:llama", "--tokens", "3", "--repeats", "1", "--out", str(out)])
    data = json.loads((first / "decode.json").read_text())
    assert data["meta"]["cpu"] == cpu_identity()
    main(["decode", "--merge", f"{first},{second}", "--out", str(tmp_path / "m")])
    merged = json.loads((tmp_path / "m" / "decode.json").read_text())
    assert [r["target"] for r in merged["summary"]] == ["a · engine:tiny:llama", "b · engine:tiny:llama"]
    assert "runs on one CPU" in capsys.readouterr().out

    other = json.loads((second / "decode.json").read_text())
    other["meta"]["cpu"] = {**other["meta"]["cpu"], "flags": ["avx2"]}
    (second / "decode.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="figures from two machines are not merged"):
        main(["decode", "--merge", f"{first},{second}", "--out", str(tmp_path / "m2")])
    del other["meta"]["cpu"]
    (second / "decode.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="does not record its CPU"):
        main(["decode", "--merge", f"{first},{second}", "--out", str(tmp_path / "m3")])
    with pytest.raises(SystemExit, match="holds no decode.json"):
        main(["decode", "--merge", f"{first},{tmp_path / 'nowhere'}", "--out", str(tmp_path / "m4")])
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists() and not (tmp_path / "m4").exists()


def test_pruning_curve_with_recovery_stages_measures_each_stage_on_the_same_removal(tmp_path, capsys):
    main(
        [
            "pruning",
            "--config",
            "tiny:llama",
            "--ratios",
            "0,0.5",
            "--criteria",
            "taylor",
            "--windows",
            "1",
            "--calibration-texts",
            "2",
            "--recovery",
            "none,compensate,recover",
            "--facts",
            "--recover-options",
            '{"steps": 4, "warmup": 1, "batch": 1, "seq_len": 32, "eval_every": 2, "eval_windows": 1, '
            '"reply_tokens": 4, "calibration_share": 1.0}',
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "pruning.json").read_text())
    assert {(r["ratio"], r["recovery"]) for r in data["rows"]} == {
        (0.0, "none"),
        (0.0, "compensate"),
        (0.0, "recover"),
        (0.5, "none"),
        (0.5, "compensate"),
        (0.5, "recover"),
    }
    pruned = {r["recovery"]: r for r in data["rows"] if r["ratio"] == 0.5}
    assert pruned["compensate"]["perplexity"] != pruned["none"]["perplexity"]
    assert pruned["compensate"]["perplexity_prose"] != pruned["none"]["perplexity_prose"]
    assert all(r["perplexity_prose"] > 1 for r in data["rows"])
    assert all(0 <= r["facts"] <= 32 for r in data["rows"])
    out = capsys.readouterr().out
    assert "taylor (compensate)" in out and "facts: correct of 32" in out
    html = (tmp_path / "pruning.html").read_text()
    assert "facts correct of 32" in html and "taylor (recover)" in html  # the last panel, one line per stage


def test_pruning_grid_is_saved_per_point_and_resumes_without_measuring_again(tmp_path, monkeypatch, capsys):
    import workbench
    from workbench.bench import pruning as pruning_bench

    saved = []
    real = pruning_bench.write_results
    monkeypatch.setattr(
        pruning_bench, "write_results", lambda out, rows, *a: (saved.append(len(rows)), real(out, rows, *a))
    )
    args = [
        "pruning",
        "--config",
        "tiny:llama",
        "--ratios",
        "0,0.5",
        "--criteria",
        "taylor",
        "--windows",
        "1",
        "--calibration-texts",
        "2",
        "--out",
        str(tmp_path),
    ]
    main(args)
    first = json.loads((tmp_path / "pruning.json").read_text())
    assert saved[:2] == [1, 2]  # after each point, before the run ends

    # A point measured before the prose text was is measured again, and only that point.
    legacy = json.loads((tmp_path / "pruning.json").read_text())
    for row in legacy["rows"]:
        if row["ratio"] == 0.5:
            del row["perplexity_prose"]
    (tmp_path / "pruning.json").write_text(json.dumps(legacy))
    real_load, loads = workbench.load, []
    monkeypatch.setattr(workbench, "load", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    main(args + ["--resume"])
    assert len(loads) == 1
    again = json.loads((tmp_path / "pruning.json").read_text())["rows"]
    assert [r.keys() for r in again] == [r.keys() for r in first["rows"]]
    assert [r["perplexity_prose"] for r in again] == pytest.approx([r["perplexity_prose"] for r in first["rows"]])
    (tmp_path / "pruning.json").write_text(json.dumps(first))

    def no_load(*a, **k):
        raise AssertionError("a resumed point was measured again")

    monkeypatch.setattr(workbench, "load", no_load)
    main(args + ["--resume"])
    assert json.loads((tmp_path / "pruning.json").read_text())["rows"] == first["rows"]
    with pytest.raises(SystemExit, match="windows: 1 there, 2 now"):
        main([a if a != "1" else "2" for a in args] + ["--resume"])
    assert json.loads((tmp_path / "pruning.json").read_text())["rows"] == first["rows"]  # the refused run lost nothing


def test_pruning_bench_names_a_bad_recover_option_before_loading():
    with pytest.raises(Exception, match="stepz"):
        main(
            [
                "pruning",
                "--config",
                "tiny:llama",
                "--ratios",
                "0.5",
                "--recovery",
                "recover",
                "--recover-options",
                '{"stepz": 3}',
            ]
        )


def test_decode_ratio_to_llamacpp_pairs_a_pruned_config_with_the_pruned_gguf():
    from workbench.bench.decode import Run, summarise

    def info(bits, heads):
        return {"weight_bytes": 2**20, "bits_per_weight": bits, "warmup_s": 0.1, "attention_heads": heads}

    targets = {
        "engine:int8.yaml": info(12.2, 270),
        "engine:pruned-int8.yaml": info(12.0, 204),
        "llamacpp:Q8_0": info(8.6, 270),
        "llamacpp:pruned-q8_0.gguf": info(8.6, 204),
        "llamacpp:F16": info(16.1, 270),
    }
    speed = {
        "engine:int8.yaml": 40.0,
        "engine:pruned-int8.yaml": 45.0,
        "llamacpp:Q8_0": 100.0,
        "llamacpp:pruned-q8_0.gguf": 90.0,
        "llamacpp:F16": 80.0,
    }
    runs = [Run(t, 1, 0, 10, 8, 0.1, tps, 2**26) for t, tps in speed.items()]
    rows = {r["target"]: r for r in summarise(runs, targets)}
    # Equal bits would tie Q8_0 and the pruned file; the model's shape decides.
    assert rows["engine:int8.yaml"]["llamacpp_peer"] == "Q8_0" and rows["engine:int8.yaml"]["ratio_to_llamacpp"] == 0.4
    assert rows["engine:pruned-int8.yaml"]["llamacpp_peer"] == "pruned-q8_0.gguf"
    assert rows["engine:pruned-int8.yaml"]["ratio_to_llamacpp"] == 0.5


def test_structured_bench_counts_valid_replies_per_mode_and_writes_results(tmp_path, monkeypatch, capsys):
    """On a random tiny model, free replies are gibberish and constrained ones follow the
    (bounded) schemas: the bench must tell them apart."""
    from workbench.bench import structured

    bounded = {
        "type": "object",
        "properties": {"label": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["label", "n"],
        "additionalProperties": False,
    }
    tool = {**structured.WEATHER_TOOL, "function": {**structured.WEATHER_TOOL["function"], "parameters": bounded}}
    monkeypatch.setattr(
        structured,
        "TASKS",
        (structured.Task("label", "Pick one.", bounded), structured.Task("tool call", "Call.", bounded, tool=True)),
    )
    monkeypatch.setattr(structured, "WEATHER_TOOL", tool)
    main(["structured", "--config", "tiny:llama", "--samples", "2", "--max-tokens", "150", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "structured.json").read_text())
    rows = {(r["task"], r["mode"]): r for r in data["rows"]}
    assert rows[("label", "constrained")]["valid"] == 2 and rows[("tool call", "constrained")]["valid"] == 2
    assert rows[("label", "free")]["valid"] == 0 and rows[("tool call", "free")]["valid"] == 0
    assert all(r["samples"] == 2 for r in rows.values())
    assert "| label | constrained | 2/2 |" in (tmp_path / "structured.md").read_text()
    assert (tmp_path / "structured.html").exists() and data["meta"]["cpu"]


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ('{"label": "a", "n": 3}', True),
        ('```json\n{"label": "b", "n": 0}\n```', True),
        ('{"label": "c", "n": 3}', False),
        ("label a", False),
    ],
)
def test_structured_bench_reads_json_as_lenient_clients_do(text, valid):
    from workbench.bench import structured

    schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label", "n"]}
    assert structured.is_valid(structured.Task("t", "", schema), text, ()) is valid
