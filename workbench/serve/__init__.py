"""OpenAI-compatible server; `python -m workbench.serve`."""

from workbench.serve.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
