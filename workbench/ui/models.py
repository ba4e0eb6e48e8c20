"""The two models the page holds: the original and (optionally) a compressed copy.

Compare needs both at once; nothing else does. So the compressed copy is replaced, not
accumulated: the old one is dropped (references, gc, the CUDA cache) before the next is
loaded, and a config is checked completely before anything is dropped, so a typo costs
nothing. The original is loaded lazily when the app started from a compressed config.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import workbench
from workbench.config import ConfigError, WorkbenchConfig, parse_config
from workbench.models.anatomy import kv_bytes_per_token, weight_bytes_by_dtype
from workbench.models.loader import resolve_device, resolve_dtype
from workbench.session import Session, preflight

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_files(directory: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.name for p in directory.glob("*.yaml")) if directory.is_dir() else []


def parse_yaml(text: str, origin: str) -> WorkbenchConfig:
    """A config from the editor's text; ConfigError says what is wrong and where."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    return parse_config(data, origin=origin)


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"


def weight_bytes(session: Session) -> int:
    return sum(weight_bytes_by_dtype(session.model).values())


def kv_cache_bytes(session: Session, tokens: int) -> tuple[int, str]:
    """(bytes, policy) of the KV cache holding `tokens` tokens under the session's policy.
    A sliding window holds at most its window; a quantized cache is given at full
    precision, an upper bound (its packing is quanto's business)."""
    report = next((r for r in reversed(session.reports) if r.get("step") == "kv_cache"), None)
    policy = report["policy"] if report else "dynamic"
    if report and report.get("bound_tokens"):
        tokens = min(tokens, report["bound_tokens"])
    return tokens * kv_bytes_per_token(session.model), policy


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _identity(config: WorkbenchConfig) -> tuple:
    """What makes two configs load the same original weights (a merged adapter changes them)."""
    device = resolve_device(config.model.device)
    return config.model.source, config.model.adapter, device, resolve_dtype(config.model.dtype, device)


@dataclass
class Loaded:
    session: Session
    label: str
    """what was loaded: a config file name, 'edited steps', or the source"""


class ModelSlots:
    def __init__(self, session: Session, label: str | None = None):
        label = label or session.loaded.source
        self._lock = threading.Lock()
        self.base: WorkbenchConfig = session.config.model_copy(update={"compression": []})
        self.original: Loaded | None
        self.compressed: Loaded | None
        if session.reports:
            self.original, self.compressed = None, Loaded(session, label)
        else:
            self.original, self.compressed = Loaded(session, session.loaded.source), None

    def get_original(self) -> Session:
        if self.original is None:
            self.original = Loaded(workbench.load(self.base, quiet=True), self.base.model.source)
        return self.original.session

    def chat_session(self, which: str) -> tuple[Session, str]:
        """The session that answers the chat, and its name for the stats line."""
        if which == "compressed" and self.compressed is not None:
            return self.compressed.session, f"compressed ({self.compressed.label})"
        return self.get_original(), "original"

    def apply(self, config: WorkbenchConfig, label: str) -> None:
        """Make `config` the compressed model (or, with no compression steps, go back to
        the original alone). Raises ConfigError/ValueError with the reason; on any failure
        the chat falls back to the original."""
        preflight(config)  # fails before anything is dropped
        with self._lock:
            self.compressed = None
            if _identity(config) != _identity(self.base):
                # Another model altogether: the old original goes too.
                self.original = None
                self.base = config.model_copy(update={"compression": []})
            free_memory()
            if config.compression:
                self.compressed = Loaded(workbench.load(config, quiet=True), label)

    def describe(self) -> str:
        lines = []
        for name, slot in (("original", self.original), ("compressed", self.compressed)):
            if slot is None:
                what = "not loaded (loads when needed)" if name == "original" else "none: pick a config and apply it"
                lines.append(f"- **{name}**: {what}")
                continue
            s = slot.session
            steps = ", ".join(r.get("step", "?") for r in s.reports) or "no compression"
            lines.append(
                f"- **{name}**: `{slot.label}` · {steps} · weights {megabytes(weight_bytes(s))}"
                f" · KV {kv_bytes_per_token(s.model) / 1024:,.1f} KiB/token ({kv_cache_bytes(s, 0)[1]})"
                f" · {s.loaded.device} {str(s.loaded.dtype).removeprefix('torch.')}"
            )
            lines.append(f"  - {s.media.describe()}")
        return "\n".join(lines)
