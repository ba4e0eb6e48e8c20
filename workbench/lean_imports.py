"""Import transformers' model machinery without the two libraries it loads for features the
workbench never reaches before they are used.

`from transformers import PreTrainedModel` (transformers 5.23) imports torchao whenever it is
installed, for one function of the quantizer that loads torchao-quantized hub checkpoints, and
`scipy.optimize`, for the Hungarian matching of object-detection losses. Measured on a 2-core
EPYC: 13 MB and 35 MB of resident memory, about 1 s and 1.2 s of a cold import, in every process
that loads a chat model, an fp32 one included; torchao also logs that its CUDA extensions do not
load. While transformers imports `modeling_utils`, those two modules are stand-ins whose names
import the real module on first call, and they leave `sys.modules` once it is done: the int4 and
int8 layers, which need torchao, import it themselves, and a torchao-quantized hub checkpoint
still loads (its quantizer's first call imports torchao).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

STAND_INS = (
    "scipy.optimize",
    "torchao",
    "torchao.prototype",
    "torchao.prototype.safetensors",
    "torchao.prototype.safetensors.safetensors_support",
)
"""The deferred modules, with the packages above them whose own import is the cost (scipy's
`__init__` is light and loads for real)."""


def _forwarder(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`{module}.{name}`, imported on first call (see workbench.lean_imports)."
    return call


class _StandIn(types.ModuleType):
    """Hands out forwarders for the names imported from it; a package stand-in has a __path__ so
    that its submodule's stand-in can be reached."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _forwarder(self.__name__, name)


def import_transformers_models() -> None:
    """Import `transformers.modeling_utils` with the deferred modules stood in for; a no-op once
    it is imported (by this or by the caller's own code before the workbench)."""
    if "transformers.modeling_utils" in sys.modules:
        return
    placed: dict[str, _StandIn] = {}
    for name in STAND_INS:
        if name in sys.modules or importlib.util.find_spec(name.partition(".")[0]) is None:
            continue
        stand_in = _StandIn(name)
        is_package = any(other.startswith(name + ".") for other in STAND_INS)
        # transformers asks find_spec whether a package is installed, which reads __spec__
        stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
        if is_package:
            stand_in.__path__ = []
        placed[name] = stand_in
    sys.modules.update(placed)
    try:
        importlib.import_module("transformers.modeling_utils")
    finally:
        for name, stand_in in placed.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is stand_in:
                delattr(sys.modules[parent], child)
