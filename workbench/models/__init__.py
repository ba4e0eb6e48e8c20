"""Model sources behind one `load_model`: embedded, tiny, local directory, hub id."""

from workbench.errors import ModelSourceError
from workbench.models.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "ModelSourceError", "load_model"]
