"""`python -m workbench.ui` and `app.py` bind where Gradio's environment says (as a Hugging
Face Space sets it), flags win, and a bad port is named before any model loads."""

import runpy
import sys
import threading
from pathlib import Path

import pytest

from workbench.ui import __main__ as ui_main


def test_defaults_stay_on_this_machine_without_the_environment():
    args = ui_main.parse_args([], environ={})
    assert (args.host, args.port, args.share, args.config) == ("127.0.0.1", 7860, False, None)


def test_gradios_environment_sets_the_defaults():
    args = ui_main.parse_args([], environ={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080"})
    assert (args.host, args.port) == ("0.0.0.0", 8080)


def test_flags_win_over_the_environment():
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080"}
    args = ui_main.parse_args(["--host", "127.0.0.1", "--port", "9000"], environ=env)
    assert (args.host, args.port) == ("127.0.0.1", 9000)


@pytest.mark.parametrize("port", ["http", "0", "70000"])
def test_a_bad_port_in_the_environment_is_named(port, capsys):
    with pytest.raises(SystemExit):
        ui_main.parse_args([], environ={"GRADIO_SERVER_PORT": port})
    assert f"GRADIO_SERVER_PORT is {port!r}" in capsys.readouterr().err


class _FakeApp:
    launched: dict = {}
    model_work_ran_on: str | None = None

    def __init__(self, runner):
        self.runner = runner

    def queue(self):
        return self

    def launch(self, **kwargs):
        """As Gradio's does with prevent_thread_lock: return at once, serve from other threads;
        one handler's model work, then the page closing."""
        _FakeApp.launched = kwargs

        def handler():
            _FakeApp.model_work_ran_on = self.runner.call(lambda: threading.current_thread().name)
            self.runner.shutdown()

        threading.Thread(target=handler).start()

    def close(self):
        pass


@pytest.fixture
def no_model(monkeypatch):
    """main() without loading a model or binding a port: what launch() is asked for."""
    monkeypatch.setattr(ui_main.workbench, "load", lambda config: object())
    monkeypatch.setattr(ui_main, "build_app", lambda session, label=None, runner=None: _FakeApp(runner))
    _FakeApp.launched = {}
    _FakeApp.model_work_ran_on = None
    return _FakeApp


def test_main_launches_where_the_environment_says(no_model, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    ui_main.main([])
    assert no_model.launched == {
        "server_name": "0.0.0.0",
        "server_port": 7861,
        "share": False,
        "prevent_thread_lock": True,
    }


def test_the_pages_model_work_runs_on_the_thread_that_loaded_the_model(no_model):
    ui_main.main([])
    assert no_model.model_work_ran_on == threading.main_thread().name


def test_app_py_is_the_same_entry_point(no_model, monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "app.py"), run_name="__main__")
    assert no_model.launched == {
        "server_name": "0.0.0.0",
        "server_port": 7860,
        "share": False,
        "prevent_thread_lock": True,
    }
