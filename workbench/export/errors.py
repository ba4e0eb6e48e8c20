"""Errors a user causes by asking for an export the workbench cannot write."""


class ExportError(ValueError):
    """The export cannot be written as asked; the message says why and what to do instead."""
