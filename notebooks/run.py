"""Runs the notebooks with nbclient, writing executed copies to notebooks/out/.

``make notebooks`` runs every notebook here top to bottom in the project's
virtual environment and saves each, with its outputs (tables, figures), as
``notebooks/out/NAME.ipynb`` (git-ignored); the notebooks themselves stay
without outputs. ``python notebooks/run.py quickstart`` runs one;
``python notebooks/run.py --clear`` strips the outputs of the notebooks here in
place (before committing a notebook edited in Jupyter);
``python notebooks/run.py second_order --figures notebooks/figures`` also
writes each figure a notebook draws, as ``NAME_CELL.png`` (the README's
picture of ρ over training comes from there).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
from jupyter_client.manager import KernelManager

HERE = Path(__file__).resolve().parent


def execute(path: Path, *, timeout: int = 600) -> nbformat.NotebookNode:
  """Executes a notebook in a fresh ``python3`` kernel of this interpreter.

  The kernel is the ``ipykernel`` of the running Python (nothing is registered
  globally), started in the notebook's folder; IPython's and Jupyter's
  runtime files and the kernel's IPC sockets go to a temporary folder. Raises
  ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
  """
  nb = nbformat.read(path, as_version=4)
  with tempfile.TemporaryDirectory() as tmp:
    env = {"IPYTHONDIR": os.path.join(tmp, "ipython"),
           "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "runtime")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      # IPC sockets in the temporary folder: no TCP ports, nothing left behind.
      km = KernelManager(kernel_name="python3", transport="ipc",
                         ip=os.path.join(tmp, "kernel"))
      nbclient.NotebookClient(nb, km=km, timeout=timeout,
                              resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  return nb


def clear(path: Path) -> bool:
  """Strips outputs and execution counts in place; True if anything changed."""
  nb = nbformat.read(path, as_version=4)
  changed = False
  for cell in nb.cells:
    if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
      cell.outputs, cell.execution_count = [], None
      changed = True
    if cell.metadata.pop("execution", None) is not None:
      changed = True
  if changed:
    nbformat.write(nb, path)
  return changed


def save_figures(nb: nbformat.NotebookNode, name: str, folder: Path) -> list:
  """Writes each PNG output of the executed ``nb`` to ``folder`` as
  ``{name}_{cell}.png`` (``cell``: the code cell's index); the paths."""
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for index, cell in enumerate(nb.cells):
    for output in cell.get("outputs", []):
      png = output.get("data", {}).get("image/png")
      if png:
        paths.append(folder / f"{name}_{index}.png")
        paths[-1].write_bytes(base64.b64decode(png))
  return paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
  parser.add_argument("--out", type=Path, default=HERE / "out",
                      help="folder for the executed copies (default notebooks/out)")
  parser.add_argument("--figures", type=Path, default=None,
                      help="also write each figure drawn to this folder, as NAME_CELL.png")
  parser.add_argument("--clear", action="store_true",
                      help="strip the outputs of the notebooks in place instead")
  args = parser.parse_args(argv)
  paths = ([HERE / (n if n.endswith(".ipynb") else n + ".ipynb") for n in args.names]
           or sorted(HERE.glob("*.ipynb")))
  if args.clear:
    for path in paths:
      print(f"{path.name}: {'cleared' if clear(path) else 'no outputs'}")
    return 0
  args.out.mkdir(parents=True, exist_ok=True)
  total = time.perf_counter()
  for path in paths:
    start = time.perf_counter()
    nb = execute(path)
    nbformat.write(nb, args.out / path.name)
    if args.figures is not None:
      for figure in save_figures(nb, path.stem, args.figures):
        print(f"  figure -> {figure}")
    print(f"{path.name}: {time.perf_counter() - start:.1f} s -> {args.out / path.name}",
          flush=True)
  print(f"all notebooks: {time.perf_counter() - total:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
