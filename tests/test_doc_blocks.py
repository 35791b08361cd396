"""Every Python block of the README and of the docs pages runs on its own.

The blocks are read from ``README.md`` and every Markdown page under
``docs/`` (fenced with three backticks and ``python``; the API reference is
generated from the docstrings, whose examples ``--doctest-modules`` runs, and
the notebooks run in ``tests/test_notebooks.py``). Each is written to a file
of its own and run with ``runpy.run_path(..., run_name="__main__")`` in a
fresh namespace, as if copied into an empty file, so a block that uses a name
it does not define itself fails with ``NameError``. A block that appears twice
(the README's quickstart is also on the Getting started page) runs once.

To save the imports (seconds each), the blocks share one Python process per
device setup: blocks preceded by the line ``<!-- test: 8 devices -->`` run in
a process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on the
CPU, the others in a plain process; the two processes run side by side. No
block changes JAX's global configuration, which is what sharing a process
would leak (:func:`test_no_block_changes_global_config` checks).

This file is also the runner: ``python tests/test_doc_blocks.py FILE...``
runs the given block files and prints one JSON line per block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- test: 8 devices -->"
_RESULT = "DOC-BLOCK-RESULT "


def pages():
  """The README and the docs' Markdown pages (not the build's copies)."""
  docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
  return [ROOT / "README.md", *docs]


def page_blocks(text: str):
  """``[(line, code, needs_8_devices)]`` for every Python block of a page."""
  lines = text.split("\n")
  blocks, i = [], 0
  while i < len(lines):
    if lines[i].strip() == "```python":
      start = i + 1
      j = start
      while lines[j].strip() != "```":
        j += 1
      prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
      blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", prev.strip() == MARK))
      i = j
    i += 1
  return blocks


def all_blocks():
  """``[(where, code, needs_8_devices)]``, ``where`` as ``docs/speed.md:44``."""
  return [(f"{page.relative_to(ROOT)}:{line}", code, eight)
          for page in pages() for line, code, eight in page_blocks(page.read_text())]


def _run_files(paths):
  """The runner (in the subprocess): each file in a fresh namespace."""
  import contextlib
  import io
  import runpy
  import traceback
  import time
  for path in paths:
    out = io.StringIO()
    tic = time.perf_counter()
    try:
      with contextlib.redirect_stdout(out):
        runpy.run_path(path, run_name="__main__")
      result = dict(path=path, ok=True)
    except BaseException:  # noqa: BLE001 -- report everything, go on
      result = dict(path=path, ok=False, error=traceback.format_exc())
    result["seconds"] = round(time.perf_counter() - tic, 1)
    result["stdout"] = out.getvalue()[-2000:]
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
  _run_files(sys.argv[1:])
  sys.exit(0)

import pytest  # noqa: E402

BLOCKS = all_blocks()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Runs every distinct block once, by group; ``{(code, eight): result}``."""
  folder = tmp_path_factory.mktemp("blocks")
  groups = {False: {}, True: {}}
  for where, code, eight in BLOCKS:
    if code not in groups[eight]:
      name = re.sub(r"[^A-Za-z0-9]+", "_", where)
      path = folder / f"block{len(groups[False]) + len(groups[True]):02d}_{name}.py"
      path.write_text(code)
      groups[eight][code] = str(path)
  procs = {}
  for eight, members in groups.items():  # the two groups run side by side
    if not members:
      continue
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if eight:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=8").strip()
      env["JAX_PLATFORMS"] = "cpu"
    procs[eight] = subprocess.Popen(
        [sys.executable, __file__, *members.values()], cwd=folder, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out = {}
  for eight, proc in procs.items():
    try:
      stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      proc.kill()
      stdout, stderr = proc.communicate()
    by_path = {}
    for row in stdout.splitlines():
      if row.startswith(_RESULT):
        r = json.loads(row[len(_RESULT):])
        by_path[r["path"]] = r
    for code, p in groups[eight].items():
      out[code, eight] = by_path.get(p, dict(ok=False, error=f"no result (runner rc "
                                             f"{proc.returncode}):\n{stderr[-4000:]}"))
  return out


@pytest.mark.parametrize("k", range(len(BLOCKS)), ids=[where for where, _, _ in BLOCKS])
def test_block_runs_on_its_own(results, k):
  where, code, eight = BLOCKS[k]
  r = results[code, eight]
  assert r["ok"], f"the block at {where}{' (8 devices)' if eight else ''} failed:\n{r['error']}"


def test_the_pages_have_their_blocks():
  where = [w.split(":")[0] for w, _, _ in BLOCKS]
  assert where.count("README.md") == 1  # the quickstart
  for page, least in [("docs/getting_started.md", 4), ("docs/recipes.md", 5),
                      ("docs/devices.md", 5), ("docs/speed.md", 1), ("docs/exact.md", 2)]:
    assert where.count(page) >= least, (page, where.count(page))
  # sharded batch, shard_map, many hosts, FSDP
  assert sum(eight for _, _, eight in BLOCKS) == 4
  # Every marker sits right before a Python block.
  for page in pages():
    text = page.read_text()
    assert all(m.group(1) == "```python"
               for m in re.finditer(re.escape(MARK) + r"\n(.*)", text)), page


def test_no_block_changes_global_config():
  for where, code, _ in BLOCKS:
    assert "jax.config" not in code and "enable_x64" not in code, where


def test_block_parser():
  text = "a\n```python\nx = 1\n```\n\n" + MARK + "\n```python\ny = 2\n```\n"
  assert page_blocks(text) == [(3, "x = 1\n", False), (8, "y = 2\n", True)]
