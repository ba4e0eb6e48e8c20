"""A real server on a free loopback port: `LiveServer` in a thread of this process (tests),
`ServerProcess` as `python -m workbench.serve` in its own process (the serve bench: the
server as users run it, generating on its main thread, see GenerationQueue.run)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time

import uvicorn

from workbench.serve import ServerSettings, create_app


def free_port() -> int:
    """A loopback port nothing listens on now (the system picks it): where these servers, the
    chat page a browser drives (workbench.ui.browser) and the bench's llama.cpp server start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (a server shuts down gracefully), then SIGKILL if it is still running after `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LiveServer:
    def __init__(self, session, **settings):
        settings.setdefault("model_name", "autoglm-phone-9b")
        self.app = create_app(session, ServerSettings(**settings))
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


class ServerProcess:
    """`python -m workbench.serve --config CONFIG [--compile]` on a free port, until exit.
    Its log goes to a file (a pipe nobody drains would block the server once full)."""

    def __init__(
        self, config: str | None, *, compile: bool = False, model_name: str = "workbench", timeout_s: float = 600
    ):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_name = model_name
        self._argv = [sys.executable, "-m", "workbench.serve", "--port", str(self.port), "--model-name", model_name]
        self._argv += ["--config", config] if config else []
        self._argv += ["--compile"] if compile else []
        self._timeout_s = timeout_s
        self._log = tempfile.NamedTemporaryFile("w+", prefix="workbench-serve-", suffix=".log")  # noqa: SIM115

    def log(self) -> str:
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()

    def __enter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(self._argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._timeout_s
        while "Uvicorn running" not in self.log():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log()[-2000:]  # before __exit__, which deletes the log file
                self.__exit__()
                raise RuntimeError(
                    f"`{' '.join(self._argv[1:])}` did not start (exit code {self._proc.returncode}):\n{tail}"
                )
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self._proc, timeout_s=30)
        self._log.close()
