import json

from workbench.compress.__main__ import main


def test_compress_command_measures_before_and_after_and_saves_a_loadable_model(tmp_path, capsys):
    config = tmp_path / "prune.yaml"
    config.write_text(
        "model:\n  source: tiny:qwen3\ncompression:\n  - step: prune_heads\n    criterion: taylor\n"
        "    per_layer: 1\n    calibration_texts: 2\n    calibration_tokens: 64\n"
    )
    out = tmp_path / "out"
    main([str(config), "--out", str(out), "--windows", "2", "--decode-tokens", "4"])
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["heads_per_layer"] == [4, 4] and report["after"]["heads_per_layer"] == [2, 2]
    assert report["after"]["kv_bytes_per_token"] * 2 == report["before"]["kv_bytes_per_token"]
    assert report["after"]["params"] < report["before"]["params"]
    assert report["before"]["perplexity"] > 1 and report["after"]["perplexity"] > 1
    assert (out / "report.html").read_text().count("plotly") > 0
    assert "| KV-cache bytes per token |" in (out / "report.md").read_text()

    import workbench

    reloaded = workbench.load(str(out / "model"), quiet=True)
    assert reloaded.model.config.attention_heads_per_layer == [2, 2]
    assert "Compressed model saved" in capsys.readouterr().out


def test_quantize_config_reports_bytes_and_is_not_saved(tmp_path, capsys):
    config = tmp_path / "q.yaml"
    config.write_text("model:\n  source: tiny:llama\ncompression:\n  - step: quantize\n    scheme: int8_weight_only\n")
    main([str(config), "--out", str(tmp_path / "out"), "--windows", "1", "--decode-tokens", "3"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["after"]["weight_bytes"] < report["before"]["weight_bytes"]
    assert any("Int8Tensor" in k for k in report["after"]["bytes_by_dtype"])
    assert not (tmp_path / "out" / "model").exists()
    assert "not saved" in capsys.readouterr().out
