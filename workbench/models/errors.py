"""Errors a user causes by naming a model the workbench cannot load."""


class ModelSourceError(ValueError):
    """The model source cannot be resolved or loaded; the message says why and what to do."""
