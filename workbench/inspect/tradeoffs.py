"""What compression costs in quality for what it saves in size: the curves notebook 04 draws.

Both curves come from the compression pipeline's own steps, applied to a freshly loaded
model per point so points are independent: the pruning curve is `workbench.bench.pruning`
(perplexity against the share of KV groups removed, per criterion, random over seeds), the
quantization curve applies each `quantize` configuration and measures weight bytes beside
perplexity on the same held-out windows.

Perplexity is measured on both held-out texts (`workbench.data.HELD_OUT`), the same windows of
each for every point: `perplexity` is the reference text's (the calibration text's source),
`perplexity_prose` the out-of-domain prose's (`workbench.bench.pruning.PERPLEXITY_KEYS`).
"""

from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

import workbench
from workbench.bench.pruning import PERPLEXITY_KEYS, held_out_perplexity, run_curve, summarise
from workbench.compress.quantization import linear_bytes, quantize
from workbench.models.anatomy import kv_bytes_per_token, tensor_bytes

QUANTIZATION_CONFIGS: dict[str, dict | None] = {
    "float32 (as loaded)": None,
    "fp16": {"scheme": "fp16"},
    "int8 weight-only": {"scheme": "int8_weight_only"},
    "int8 dynamic": {"scheme": "int8_dynamic"},
    "mixed (MLP int8, attention fp16)": {
        "scheme": "keep",
        "rules": [
            {"pattern": "model.layers.*.mlp.*", "scheme": "int8_weight_only"},
            {"pattern": "model.layers.*.self_attn.*", "scheme": "fp16"},
        ],
    },
}


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer, once each (tied embeddings count once), looking
    inside torchao's quantized tensors."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def pruning_tradeoffs(
    source: str | None = None,
    *,
    ratios=(0.0, 0.1, 0.2, 0.3),
    criteria=("taylor", "weight_norm", "random"),
    seeds=(0, 1, 2),
    windows: int = 2,
    calibration_texts: int = 4,
) -> pd.DataFrame:
    """Perplexity on each held-out text (`windows` x 512 tokens of each) per (share of KV groups
    removed, criterion): columns `perplexity` (reference text) and `perplexity_prose`; random is
    the median over seeds."""
    rows = run_curve(source, list(ratios), list(criteria), list(seeds), windows, calibration_texts=calibration_texts)
    keys = list(PERPLEXITY_KEYS.values())
    frame = pd.DataFrame(summarise(rows)).rename(columns={f"{key}_median": key for key in keys})
    return frame[["ratio", "criterion", "heads", *keys, "runs"]]


def quantization_tradeoffs(
    source: str | None = None, configs: dict[str, dict | None] | None = None, *, windows: int = 2
) -> pd.DataFrame:
    """Weight bytes, linear-layer bytes and perplexity on each held-out text (`windows` x 512
    tokens of each: `perplexity`, `perplexity_prose`) for each quantize configuration."""
    configs = QUANTIZATION_CONFIGS if configs is None else configs
    rows = []
    for name, options in tqdm(configs.items(), desc="quantization schemes"):
        session = workbench.load(source, quiet=True)
        if options is not None:
            quantize(session, **options)
        rows.append(
            {
                "config": name,
                "weight_bytes": weight_bytes(session.model),
                "linear_bytes": linear_bytes(session.model),
                "kv_bytes_per_token": kv_bytes_per_token(session.model),
                **held_out_perplexity(session, windows),
            }
        )
    frame = pd.DataFrame(rows)
    frame["weight_MB"] = frame["weight_bytes"] / 1e6
    frame["size_vs_float32"] = frame["weight_bytes"] / frame["weight_bytes"].iloc[0]
    return frame
