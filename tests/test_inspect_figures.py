"""The plotly layer draws what the library returns (no static export: that needs a browser)."""

import pandas as pd

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
        }
    )
    quantization = pd.DataFrame({"config": ["fp32", "int8"], "weight_MB": [538.0, 220.0], "perplexity": [15.0, 15.1]})
    assert [t.name for t in figures.compression_tradeoffs(pruning, quantization).data] == [
        "random",
        "taylor",
        "fp32",
        "int8",
    ]
