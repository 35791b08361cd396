"""The notebooks run top to bottom, and are committed without outputs.

Each notebook in ``notebooks/`` is executed with nbclient in a fresh kernel of
this very interpreter (``ipykernel`` from the test extra; no kernel is
registered globally). Run times are printed (``pytest -s``), never asserted.

The kernels inherit ``LLQR_QUICK=1`` from ``tests/conftest.py``: each
notebook then runs every cell on a smaller problem (fewer training steps, fit
batches or timed calls; see the ``QUICK`` line of its first cell), so a cell
that fails in the full run fails here too. ``make notebooks`` and the docs
build run them in full.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "exact_lqr.ipynb", "structures.ipynb", "second_order.ipynb"}
CELL_TIMEOUT_S = 600  # a hang guard, not a performance bound
#: Notebooks whose figures ``notebooks/run.py --figures`` must find (the
#: README shows second_order's).
DRAWS = {"second_order.ipynb", "structures.ipynb"}


def _runner():
  """``notebooks/run.py`` as a module."""
  spec = importlib.util.spec_from_file_location("notebooks_run", ROOT / "notebooks" / "run.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_notebooks_are_there():
  assert EXPECTED <= {p.name for p in NOTEBOOKS}, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, (
      f"{path.name}: cells {dirty} hold outputs; strip them with "
      "`.venv/bin/python notebooks/run.py --clear` before committing.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  nb = nbformat.read(path, as_version=4)
  # One more cell: which environment did the kernel run in?
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
  # The kernel talks over IPC sockets in tmp_path: no TCP ports, nothing left.
  km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(path.parent)}})
  start = time.perf_counter()
  try:
    client.execute()  # raises CellExecutionError with the cell and traceback
  finally:  # nbclient leaves a kernel it did not start running (km passed in)
    if km.has_kernel:
      km.shutdown_kernel(now=True)
  print(f"\n{path.name}: {time.perf_counter() - start:.1f} s")
  prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
  assert os.path.realpath(prefix) == os.path.realpath(sys.prefix), (
      f"the kernel ran in {prefix}, not in this environment ({sys.prefix})")
  figures = _runner().save_figures(nb, path.stem, tmp_path / "figures")
  if path.name in DRAWS:
    assert figures, f"{path.name} drew no figure"
  for figure in figures:
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
