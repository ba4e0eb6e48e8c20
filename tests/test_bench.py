import json

from workbench.bench.__main__ import main


def test_decode_bench_runs_both_paths_and_writes_results(tmp_path, capsys):
    main(["decode", "--config", "tiny:llama", "--tokens", "6", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode.json").read_text())
    paths = {r["path"] for r in data["runs"]}
    assert paths == {"engine", "generate"}
    # Equal work on both paths: the same prompts, the same number of new tokens.
    assert all(r["new_tokens"] == 6 for r in data["runs"])
    engine = sorted((r["prompt"], r["prompt_tokens"]) for r in data["runs"] if r["path"] == "engine")
    generate = sorted((r["prompt"], r["prompt_tokens"]) for r in data["runs"] if r["path"] == "generate")
    assert engine == generate
    assert data["summary"]["engine"]["decode_ratio_to_generate"] > 0
    assert "| engine |" in (tmp_path / "decode.md").read_text()
    assert "| generate |" in capsys.readouterr().out


def test_serve_bench_measures_each_concurrency_level(tmp_path, capsys):
    main(["serve", "--config", "tiny:llama", "--concurrency", "1,3", "--requests", "1", "--tokens", "4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serve.json").read_text())
    assert [level["concurrency"] for level in data["levels"]] == [1, 3]
    assert all(level["failed"] == 0 for level in data["levels"])
    assert [level["requests"] for level in data["levels"]] == [1, 3]
    assert all(r["completion_tokens"] == 4 and r["ttft_s"] > 0 for r in data["runs"])
    assert data["levels"][1]["aggregate_tok_s"] > 0
    assert "| 3 | 3 (0) |" in capsys.readouterr().out


def test_serve_bench_reports_failures_of_a_foreign_endpoint(tmp_path):
    from workbench.serve.live import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    main(["serve", "--base-url", url, "--model", "m", "--concurrency", "1", "--requests", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["levels"][0]["failed"] == 1 and "ConnectError" in data["runs"][0]["error"]


def test_pruning_curve_covers_every_ratio_and_criterion(tmp_path, capsys):
    main(["pruning", "--config", "tiny:llama", "--ratios", "0,0.5", "--criteria", "taylor,random", "--seeds", "0,1",
          "--windows", "1", "--calibration-texts", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "pruning.json").read_text())
    assert {(r["ratio"], r["criterion"], r["seed"]) for r in data["rows"]} == {
        (0.0, "taylor", 0), (0.0, "random", 0), (0.0, "random", 1), (0.5, "taylor", 0), (0.5, "random", 0), (0.5, "random", 1)
    }
    heads = {(s["ratio"], s["criterion"]): s["heads"] for s in data["summary"]}
    assert heads[(0.0, "taylor")] == 8 and heads[(0.5, "taylor")] == 4
    assert (tmp_path / "pruning.html").exists()
    assert "| 50% | 4 |" in capsys.readouterr().out
