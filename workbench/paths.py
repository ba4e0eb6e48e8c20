"""Where things are: the repository's shipped files and the user's cache.

Shipped configs and data are named relative to the repository (`configs/int8.yaml`,
`data/recovery/pruned-25`), and a notebook runs in notebooks/: `resolve_path` lets those
names work from anywhere inside or outside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

REPO_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_DIR / "data"


def resolve_path(value: str) -> Path:
    """A path as given, or relative to the repository (configs say `data/recovery/...`)."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    repo = REPO_DIR / path
    return repo if repo.exists() else path


def cache_root() -> Path:
    """Where converted checkpoints live: $WORKBENCH_CACHE_DIR, else the user cache dir."""
    override = os.environ.get("WORKBENCH_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("workbench"))


ADAPTER_RECORD = "recovery.json"
"""The file that makes a folder a workbench LoRA adapter (models/adapters.py writes and reads
the rest); named here because a config is checked for it before any model package loads."""
