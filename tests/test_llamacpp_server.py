"""LlamaCppServer against fake servers (llama-cpp-python is an optional extra, not installed in tests):
a server that logs more than a pipe buffer holds must still come up, and one that dies at
start is reported with its last log lines."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import time

import pytest

from workbench.bench import llamacpp_server
from workbench.bench.llamacpp_server import LlamaCppServer

LOUD_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    port = int(sys.argv[sys.argv.index("--port") + 1])
    for i in range(4000):  # some 300 KB, as llama.cpp's load log (~215 KB): more than a 64 KiB pipe holds
        sys.stderr.write(f"llama_model_loader: - tensor {i:5d}: blk.weight q8_0 [ 4096, 4096 ] padding padding\\n")
    sys.stderr.flush()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"object": "list", "data": [{"id": "fake"}]}'
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    """
)

DYING_SERVER = textwrap.dedent(
    """
    import sys
    print("llama_model_loader: loaded meta data", file=sys.stderr)
    print("loading the model", file=sys.stderr)
    print("gguf_init: bad magic", file=sys.stderr)
    print("error: failed to load model", file=sys.stderr)
    sys.exit(1)
    """
)


@pytest.fixture
def installed(monkeypatch):
    """As if llama-cpp-python's server were installed: the fake servers need none of it."""
    monkeypatch.setattr(llamacpp_server, "missing_modules", lambda: [])


def _server(tmp_path, script: str, **kw) -> LlamaCppServer:
    fake = tmp_path / "fake_server.py"
    fake.write_text(script)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return LlamaCppServer(gguf, model_name="fake", server_argv=[sys.executable, str(fake)], **kw)


def test_a_server_that_logs_more_than_a_pipe_holds_starts_and_its_log_goes_at_exit(tmp_path, installed):
    server = _server(tmp_path, LOUD_SERVER, start_timeout=20)
    start = time.monotonic()
    with server:
        assert time.monotonic() - start < 10  # a full, undrained pipe blocked the server until the timeout
        log = server.log_path
        assert log is not None and os.path.getsize(log) > 256_000
        process = server.process
        assert process is not None and process.poll() is None
    assert process.poll() is not None  # stopped
    assert server.log_path is None and not os.path.exists(log)


def test_a_server_that_exits_at_start_is_reported_with_its_last_log_lines(tmp_path, installed):
    server = _server(tmp_path, DYING_SERVER, start_timeout=20)
    last_lines = "loading the model | gguf_init: bad magic | error: failed to load model"
    with pytest.raises(RuntimeError, match=re.escape(f"model.gguf exited: {last_lines}")):
        server.__enter__()
    assert server.log_path is None  # the log file is deleted on the failed start too
    assert server.process is not None and server.process.returncode == 1


def test_a_missing_server_is_reported_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp_server, "missing_modules", lambda: ["llama_cpp"])
    server = _server(tmp_path, DYING_SERVER)
    with pytest.raises(RuntimeError, match=r"llama_cpp missing"):
        server.__enter__()
    assert server.process is None and server.log_path is None
