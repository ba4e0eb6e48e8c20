"""Gradio chat front end; `python -m workbench.ui`."""

from workbench.ui.app import build_app

__all__ = ["build_app"]
