"""Shared fixtures. The embedded model is converted once per test run into a fresh cache,
so the suite proves the first (converting) load and the cached second load every time."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import settings

# CI runs a fixed set of examples so a red build is reproducible; local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

import workbench


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """The run's own model cache (empty at first): tests that load the embedded model again
    (the chat UI loading a config) point WORKBENCH_CACHE_DIR here instead of converting anew."""
    return tmp_path_factory.mktemp("workbench-cache")


@pytest.fixture(scope="session")
def embedded_loads(embedded_cache):
    """(first_seconds, second_seconds, session) for the embedded model in an empty cache."""
    cache = embedded_cache
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE_DIR", str(cache))
    try:
        start = time.perf_counter()
        first = workbench.load("configs/default.yaml", device="cpu")
        first_s = time.perf_counter() - start
        del first
        start = time.perf_counter()
        second = workbench.load("configs/default.yaml", device="cpu")
        second_s = time.perf_counter() - start
    finally:
        mp.undo()
    return first_s, second_s, second


@pytest.fixture(scope="session")
def embedded(embedded_loads) -> workbench.Session:
    return embedded_loads[2]


@pytest.fixture(scope="session", params=["llama", "qwen3", "glm4"])
def tiny(request) -> workbench.Session:
    return workbench.load(f"tiny:{request.param}", quiet=True)


@pytest.fixture
def count_forwards():
    """Attach to a model; returns a list that grows by one per forward call."""
    handles = []

    def attach(model):
        calls: list[int] = []
        handles.append(model.register_forward_hook(lambda *_: calls.append(1)))
        return calls

    yield attach
    for handle in handles:
        handle.remove()
