"""Compression steps (pruning, quantization, KV-cache policy) applied in config order.

`STEPS` maps a step name, as written in a config's `compression:` list, to the function
that applies it to a Session. It is empty until the pipeline lands; configs are checked
against it so an unknown step fails at load time, before any work.
"""

from collections.abc import Callable
from typing import Any

STEPS: dict[str, Callable[..., Any]] = {}
