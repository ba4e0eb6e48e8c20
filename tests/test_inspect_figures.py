"""The plotly layer draws what the library returns (no static export: that needs a browser)."""

import pandas as pd
import pytest

import workbench
from workbench.inspect import figures
from workbench.inspect.attention import (
    ablation_scan,
    capture_attention,
    head_importance,
    head_stats,
)
from workbench.inspect.kvcache import memory_curve
from workbench.inspect.thinking import thinking_timeline


def test_every_figure_draws_from_library_data():
    session = workbench.load("tiny:llama", quiet=True)
    capture = capture_attention(session, "The quick brown fox jumps over the lazy dog.")
    stats = head_stats(capture)
    assert figures.attention_heatmap(capture, 1, 3).data[0].z.shape == (len(capture.tokens),) * 2
    assert len(figures.head_stats_overview(stats).data) == 3
    assert figures.head_map(stats, "entropy").data[0].z.shape == (2, 4)
    scan = ablation_scan(session, "The quick brown fox", unit="group")
    assert len(figures.ablation_vs_importance(scan, head_importance(session, "weight_norm")).data[0].x) == 4

    curve = memory_curve(session, [16, 32], policies=[{"policy": "dynamic"}, {"policy": "offloaded"}], chunk=16)
    names = [trace.name for trace in figures.kv_memory_curve(curve).data]
    assert "dynamic" in names and "predicted from config (dynamic)" in names
    if session.engine.device.type != "cuda":
        assert any(name.startswith("offloaded: skipped") for name in names)

    timeline = thinking_timeline(session, "hi", think_budget=3, max_tokens=3, ignore_eos=True)
    bars = figures.thinking_timeline(timeline).data
    assert {bar.name: len(bar.x) for bar in bars} == {"reasoning": 3, "answer": 3}

    pruning = pd.DataFrame(
        {
            "ratio": [0, 0.2, 0, 0.2],
            "criterion": ["taylor", "taylor", "random", "random"],
            "perplexity": [15.0, 30.0, 15.0, 80.0],
            "perplexity_prose": [25.0, 60.0, 25.0, 200.0],
        }
    )
    quantization = pd.DataFrame(
        {
            "config": ["fp32", "int8"],
            "weight_MB": [538.0, 220.0],
            "perplexity": [15.0, 15.1],
            "perplexity_prose": [25.0, 25.3],
        }
    )
    traces = figures.compression_tradeoffs(pruning, quantization).data
    # a row of panels per held-out text: the reference text's, then the prose text's
    assert [t.name for t in traces] == ["random", "taylor", "fp32", "int8"] * 2
    assert list(traces[1].y) == [15.0, 30.0] and list(traces[5].y) == [25.0, 60.0]
    assert [t.showlegend for t in traces] == [True] * 4 + [False] * 4
    assert list(traces[7].y) == [25.3]
    # a frame from before the prose text was measured draws the reference row alone
    assert len(figures.compression_tradeoffs(pruning.drop(columns="perplexity_prose"), quantization).data) == 4


def test_tradeoff_frames_hold_perplexity_on_both_held_out_texts():
    from workbench.data import held_out_texts
    from workbench.inspect.tradeoffs import pruning_tradeoffs, quantization_tradeoffs
    from workbench.metrics import perplexity

    session = workbench.load("tiny:llama", quiet=True)
    expected = {
        key: perplexity(session.model, session.tokenizer, held_out_texts(name), max_windows=1)
        for name, key in (("reference", "perplexity"), ("prose", "perplexity_prose"))
    }
    assert expected["perplexity_prose"] > 1 and expected["perplexity_prose"] != expected["perplexity"]

    configs = {"float32": None, "int8 weight-only": {"scheme": "int8_weight_only"}}
    quantization = quantization_tradeoffs("tiny:llama", configs, windows=1)
    assert (quantization.perplexity_prose > 1).all()
    for key, value in expected.items():
        assert quantization[key].iloc[0] == pytest.approx(value)  # float32: the model as loaded

    pruning = pruning_tradeoffs(
        "tiny:llama", ratios=(0.0, 0.5), criteria=("taylor",), seeds=(0,), windows=1, calibration_texts=2
    )
    assert list(pruning.columns) == ["ratio", "criterion", "heads", "perplexity", "perplexity_prose", "runs"]
    for key, value in expected.items():
        assert pruning[pruning.ratio == 0][key].iloc[0] == pytest.approx(value)
    assert (pruning.perplexity_prose > 1).all()
