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
