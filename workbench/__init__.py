"""workbench: compress, inspect, chat with and measure small on-device chat models.

    s = workbench.load("configs/default.yaml")   # or "embedded:smollm2-135m-instruct", a dir, a hub id
    reply = s.chat("你是谁?", enable_thinking=True)
    reply.text, reply.reasoning, reply.stats
"""

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
