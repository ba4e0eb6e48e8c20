"""Compression steps applied in config order, each a plain function returning a report.

`STEPS` maps a step name, as written in a config's `compression:` list, to the options
model it takes (from workbench.step_options, where a config is checked against it when it
is read, so an unknown step or a bad option fails before any work) and the function that
applies it to a Session.
"""

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from workbench.compress.kvcache import kv_cache
from workbench.compress.pruning import prune_heads
from workbench.compress.quantization import quantize
from workbench.compress.recovery import recover
from workbench.step_options import STEP_OPTIONS

_RUN: dict[str, Callable[..., Any]] = {
    "prune_heads": prune_heads,
    "recover": recover,
    "quantize": quantize,
    "kv_cache": kv_cache,
}
STEPS: dict[str, tuple[type[BaseModel], Callable[..., Any]]] = {
    name: (STEP_OPTIONS[name], _RUN[name]) for name in STEP_OPTIONS
}
