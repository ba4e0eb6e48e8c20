"""Compression steps applied in config order, each a plain function returning a report.

`STEPS` maps a step name, as written in a config's `compression:` list, to the options
model it takes and the function that applies it to a Session. Configs are checked against
both when they are read, so an unknown step or a bad option fails before any work.
"""

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from workbench.compress.kvcache import KVCacheOptions, kv_cache
from workbench.compress.pruning import PruneOptions, prune_heads
from workbench.compress.quantization import QuantizeOptions, quantize
from workbench.compress.recovery import RecoverOptions, recover

STEPS: dict[str, tuple[type[BaseModel], Callable[..., Any]]] = {
    "prune_heads": (PruneOptions, prune_heads),
    "recover": (RecoverOptions, recover),
    "quantize": (QuantizeOptions, quantize),
    "kv_cache": (KVCacheOptions, kv_cache),
}
