"""workbench: compress, inspect, chat with and measure small on-device chat models.

s = workbench.load("configs/default.yaml")   # or "embedded:smollm2-135m-instruct", a dir, a hub id
reply = s.chat("你是谁?", enable_thinking=True)
reply.text, reply.reasoning, reply.stats
"""

import logging

# torchao (imported by transformers once installed) warns on every import that its CUDA-only
# extensions do not load, and torch's pytree warns about torchao's enums; neither affects
# anything the workbench runs, and both would bury the lines a person needs.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from workbench.lean_imports import import_transformers_models

import_transformers_models()  # before any module below imports transformers' model classes

from workbench.config import ConfigError, WorkbenchConfig, load_config
from workbench.engine import ChatRequest, ContextLengthError, Engine, RequestError
from workbench.models import ModelSourceError
from workbench.session import ChatResult, Session, load

__all__ = [
    "ChatRequest",
    "ChatResult",
    "ConfigError",
    "ContextLengthError",
    "Engine",
    "ModelSourceError",
    "RequestError",
    "Session",
    "WorkbenchConfig",
    "load",
    "load_config",
]
