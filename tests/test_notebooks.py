"""Every notebook runs top to bottom on the embedded model: a failing cell fails the suite.

Notebooks execute in a real Jupyter kernel (nbclient) with WORKBENCH_NOTEBOOK_QUICK=1, which
their first cell reads to run at a smaller size, and with this checkout first on the kernel's
path, so the notebooks test the code beside them. They reuse the embedded model the session
fixture converted, instead of converting it again.
"""

import os
from pathlib import Path

import nbclient
import nbformat
import pytest
from traitlets.config import Config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_attention_heads.ipynb",
        "02_kv_cache_memory.ipynb",
        "03_thinking_traces.ipynb",
        "04_compression_tradeoffs.ipynb",
        "05_what_compression_broke.ipynb",
    ]


@pytest.fixture(scope="module")
def kernel_env(embedded, tmp_path_factory):
    """Environment for the notebook kernels: quick sizes, this checkout, the converted model."""
    converted = Path(embedded.model.config._name_or_path)
    cache_root = converted.parents[1]
    assert (cache_root / "embedded").is_dir(), f"the embedded checkpoint is not where expected: {converted}"
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_NOTEBOOK_QUICK", "1")
    mp.setenv("WORKBENCH_CACHE_DIR", str(cache_root))
    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    mp.setenv("TQDM_DISABLE", "1")
    yield
    mp.undo()


@pytest.mark.embedded
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_env, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].cell_type == "markdown" and "**Question.**" in notebook.cells[0].source
    # The kernel talks over Unix sockets in a private folder, not loopback TCP ports: on a machine
    # where other test runs open servers on free ports, a port picked and released for the kernel
    # can be taken before it binds, and the client then waits on a socket nobody answers.
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(tmp_path / "kernel")
    # A cell that runs past `timeout` fails with its source named, before pytest's own 600 s limit.
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        startup_timeout=120,
        kernel_name="python3",
        config=config,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, when any cell fails
    errors = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"
    ]
    assert not errors
    widgets = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, "each notebook has interactive widgets"
