"""Measurements written as files: `python -m workbench.bench decode ...`."""
