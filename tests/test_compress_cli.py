import json

import pytest

from workbench.compress.__main__ import main


def test_compress_command_measures_before_and_after_and_saves_a_loadable_model(tmp_path, capsys):
    config = tmp_path / "prune.yaml"
    config.write_text(
        "model:\n  source: tiny:qwen3\ncompression:\n  - step: prune_heads\n    criterion: taylor\n"
        "    per_layer: 1\n    calibration_texts: 2\n    calibration_tokens: 64\n"
    )
    out = tmp_path / "out"
    main(
        [str(config), "--out", str(out), "--windows", "2", "--decode-tokens", "4", "--harness", "workbench_arithmetic"]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["heads_per_layer"] == [4, 4] and report["after"]["heads_per_layer"] == [2, 2]
    assert report["after"]["kv_bytes_per_token"] * 2 == report["before"]["kv_bytes_per_token"]
    assert report["after"]["params"] < report["before"]["params"]
    for text in ("reference", "prose"):
        assert report["before"]["perplexity"][text] > 1 and report["after"]["perplexity"][text] > 1
    for side in ("before", "after"):
        score = report[side]["harness"]["workbench_arithmetic"]
        assert score["samples"] == 20 and score["metric"] == "acc" and score["stderr"] is not None
    assert (out / "report.html").read_text().count("plotly") > 0
    markdown = (out / "report.md").read_text()
    assert "| KV-cache bytes per token |" in markdown
    assert "## Divergence from the original" in markdown and "| p99 KL |" in markdown
    assert "| perplexity, held-out prose text |" in markdown and "| lm-eval workbench_arithmetic (acc" in markdown
    for text in ("reference", "prose"):
        drift = report["divergence"][text]
        assert drift["windows"] == 2 and drift["tokens"] > 0
        assert 0 < drift["kl_mean"] <= drift["kl_p99"] <= drift["kl_max"]  # two heads of four gone per layer
        assert 0 <= drift["top1_agreement"] <= 1
        assert drift["original_perplexity"] == pytest.approx(report["before"]["perplexity"][text], rel=1e-5)
        assert drift["compressed_perplexity"] == pytest.approx(report["after"]["perplexity"][text], rel=1e-5)
    # the map of where it parts: the pruned heads marked, the first layer's lens already apart
    layer_map = report["divergence_map"]
    assert sum(h["status"] == "removed" for h in layer_map["heads"]) == 4
    assert len(layer_map["layers"]) == 2 and layer_map["layers"][0]["logit_lens_kl"] > 0
    assert "## Where it parts from the original" in markdown and "| layer | logit-lens KL |" in markdown
    assert (out / "divergence.html").read_text().count("plotly") > 0

    import workbench

    reloaded = workbench.load(str(out / "model"), quiet=True)
    assert reloaded.model.config.attention_heads_per_layer == [2, 2]
    assert "Compressed model saved" in capsys.readouterr().out


def test_quantized_and_cached_model_reloads_with_the_same_outputs(tmp_path, capsys):
    import torch

    import workbench

    config = tmp_path / "mobile.yaml"
    config.write_text(
        "model:\n  source: tiny:llama\ncompression:\n"
        "  - step: prune_heads\n    criterion: weight_norm\n    per_layer: 1\n"
        "  - step: quantize\n    scheme: int8_weight_only\n"
        "  - step: kv_cache\n    policy: sliding_window\n    window: 64\n"
    )
    main([str(config), "--out", str(tmp_path / "out"), "--windows", "1", "--decode-tokens", "3", "--harness", "none"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["after"]["weight_bytes"] < report["before"]["weight_bytes"]
    assert report["after"]["bytes_by_dtype"]["int8"] > 0  # packed int8 layers (int8_linear.py)
    assert report["before"]["harness"] == {} == report["after"]["harness"]
    drift = report["divergence"]["prose"]
    assert drift["windows"] == 1 and drift["kl_mean"] >= 0
    assert 0 <= drift["top1_agreement"] <= 1
    assert "re-applies kv_cache" in capsys.readouterr().out  # the quantized layers are in the file
    positions = report["divergence_map"]["positions"]
    assert len(positions) > 64 and any(m["relative_mse"] for m in report["divergence_map"]["modules"])

    reloaded = workbench.load(str(tmp_path / "out" / "model"), quiet=True)
    direct = workbench.load(config, quiet=True)
    assert [r["step"] for r in reloaded.reports] == ["kv_cache"]
    assert (tmp_path / "out" / "model" / "quantization.json").is_file()
    assert reloaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    assert reloaded.engine.max_batch == 1  # the sliding-window policy came back too
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(
            reloaded.model(input_ids=ids).logits, direct.model(input_ids=ids).logits, atol=0, rtol=0
        )
    assert reloaded.chat("hi", temperature=0, max_tokens=5).text == direct.chat("hi", temperature=0, max_tokens=5).text


def test_the_calibration_flag_overrides_every_step_that_reads_text_and_is_reported(tmp_path):
    data = tmp_path / "mine.txt"
    data.write_text(("0 1 2 3 4 5 6 7 8 9 " * 20) + "\n\n" + ("10 20 30 40 50 " * 30) + "\n")
    config = tmp_path / "prune.yaml"
    config.write_text(
        "model:\n  source: tiny:qwen3\ncompression:\n  - step: prune_heads\n    criterion: taylor\n"
        "    per_layer: 1\n    calibration_texts: 2\n    calibration_tokens: 64\n    calibration: reference\n"
    )
    out = tmp_path / "out"
    argv = [str(config), "--out", str(out), "--windows", "1", "--decode-tokens", "2", "--harness", "none"]
    main([*argv, "--calibration", str(data)])
    step = json.loads((out / "report.json").read_text())["steps"][0]
    assert step["calibration"]["name"] == str(data) and step["calibration"]["texts"] == 2
    assert f"- prune_heads calibrated on `{data}`: 2 texts" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="--calibration: .*held-out evaluation text"):
        main([*argv, "--calibration", "data/evaluation.txt"])
