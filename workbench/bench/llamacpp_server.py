"""llama-cpp-python's own OpenAI server on a GGUF file, in a child process on a free loopback
port: how the quality and compare benches measure an exported model in llama.cpp over the
same HTTP path as every other column (`--configs NAME=PATH.gguf`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import httpx

from workbench.serve.live import free_port, stop_process

SERVER_MODULES = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")


def missing_modules() -> list[str]:
    """The server's imports that are not installed (the [llamacpp] extra brings them all)."""
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


class LlamaCppServer:
    def __init__(
        self, path: str | Path, *, model_name: str, n_ctx: int = 4096, threads: int = 2, start_timeout: float = 120
    ):
        self.path, self.model_name = Path(path).expanduser(), model_name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
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

    def __enter__(self) -> LlamaCppServer:
        if missing := missing_modules():
            raise RuntimeError(
                f"serving a GGUF needs llama-cpp-python's server ({', '.join(missing)} missing): "
                "pip install -e '.[llamacpp]' (scripts/install_llamacpp.sh builds llama-cpp-python)"
            )
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                err = ((self.process.stderr.read() if self.process.stderr else "") or "").strip().splitlines()[-3:]
                raise RuntimeError(f"llama.cpp's server for {self.path} exited: {' | '.join(err)}")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(
                    f"llama.cpp's server for {self.path} did not answer within {self.start_timeout:.0f} s"
                )
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop_process(self.process, timeout_s=10)
