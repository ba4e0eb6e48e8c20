"""llama-cpp-python's own OpenAI server on a GGUF file, in a child process on a free loopback
port: how the quality and compare benches measure an exported model in llama.cpp over the
same HTTP path as every other column (`--configs NAME=PATH.gguf`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

from workbench.serve.live import free_port, stop_process

SERVER_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
SERVER_ARGV = (sys.executable, "-m", "llama_cpp.server")
"""The command that starts the server, before its options (tests put a fake server here)."""


def missing_modules() -> list[str]:
    """The server's imports that are not installed (the [llamacpp] extra brings them all)."""
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def _log_tail(path: str, lines: int = 3, max_bytes: int = 8192) -> list[str]:
    """The last `lines` non-empty lines of the log file at `path` (only its last `max_bytes` read)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
        text = f.read().decode(errors="replace")
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


class LlamaCppServer:
    """The server until the block ends. Its output (a load log of some 200 KB) goes to a temporary
    file, deleted at exit: a pipe nobody drains fills at 64 KiB and blocks the server mid-load."""

    def __init__(
        self,
        path: str | Path,
        *,
        model_name: str,
        n_ctx: int = 4096,
        threads: int = 2,
        start_timeout: float = 120,
        server_argv: Sequence[str] = SERVER_ARGV,
    ):
        self.path, self.model_name = Path(path).expanduser(), model_name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            *server_argv,
            "--model",
            str(self.path),
            "--model_alias",
            model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
        ]
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> str | None:
        """The server's log file while it runs (None before the start and after the exit)."""
        return self._log.name if self._log is not None else None

    def __enter__(self) -> LlamaCppServer:
        if missing := missing_modules():
            raise RuntimeError(
                f"serving a GGUF needs llama-cpp-python's server ({', '.join(missing)} missing): "
                "pip install -e '.[llamacpp]' (scripts/install_llamacpp.sh builds llama-cpp-python)"
            )
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="workbench-llamacpp-", suffix=".log")
        try:
            self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.process is not None and self._log is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                tail = _log_tail(self._log.name)  # before __exit__, which deletes the log file
                raise RuntimeError(f"llama.cpp's server for {self.path} exited: {' | '.join(tail)}")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"llama.cpp's server for {self.path} did not answer within {self.start_timeout:.0f} s"
                )
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=10)
        if self._log is not None:
            self._log.close()  # deletes the file
            self._log = None
