"""Every Python block of the README runs on its own, as if copied into an empty file.

The blocks are read from ``README.md`` (fenced with three backticks and
``python``). Each is written to a file of its own and run with
``runpy.run_path(..., run_name="__main__")`` in a fresh namespace, so a block
that uses a name it does not define itself fails with ``NameError``. To save
the imports (seconds each), the blocks share one Python process per device
setup: blocks preceded by the line ``<!-- test_readme: 8 devices -->`` run in
a process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on the
CPU, the others in a plain process; the two processes run side by side. No README block changes JAX's global
configuration, which is what sharing a process would leak
(:func:`test_no_block_changes_global_config` checks).

This file is also the runner: ``python tests/test_readme.py FILE...`` runs the
given block files and prints one JSON line per block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- test_readme: 8 devices -->"
_RESULT = "README-BLOCK-RESULT "


def readme_blocks(text: str | None = None):
  """``[(line, code, needs_8_devices)]`` for every Python block of the README."""
  text = README.read_text() if text is None else text
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

BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Runs every block once, by group; ``{block index: result}``."""
  folder = tmp_path_factory.mktemp("readme")
  groups = {False: [], True: []}
  for k, (line, code, eight) in enumerate(BLOCKS):
    path = folder / f"block{k:02d}_line{line}.py"
    path.write_text(code)
    groups[eight].append((k, str(path)))
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
        [sys.executable, __file__, *[p for _, p in members]], cwd=folder, env=env,
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
    for k, p in groups[eight]:
      out[k] = by_path.get(p, dict(ok=False, error=f"no result (runner rc "
                                   f"{proc.returncode}):\n{stderr[-4000:]}"))
  return out


@pytest.mark.parametrize("k", range(len(BLOCKS)),
                         ids=[f"line{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs_on_its_own(results, k):
  line, code, eight = BLOCKS[k]
  r = results[k]
  assert r["ok"], (f"README.md block at line {line}"
                   f"{' (8 devices)' if eight else ''} failed:\n{r['error']}")


def test_the_readme_has_its_blocks():
  assert len(BLOCKS) >= 14
  # sharded batch, many hosts, FSDP, shard_map
  assert sum(eight for _, _, eight in BLOCKS) == 4
  # Every marker sits right before a Python block.
  text = README.read_text()
  assert text.count(MARK) == 4
  assert all(m.group(1) == "```python"
             for m in re.finditer(re.escape(MARK) + r"\n(.*)", text))


def test_no_block_changes_global_config():
  for line, code, _ in BLOCKS:
    assert "jax.config" not in code and "enable_x64" not in code, line


def test_block_parser():
  text = "a\n```python\nx = 1\n```\n\n" + MARK + "\n```python\ny = 2\n```\n"
  assert readme_blocks(text) == [(3, "x = 1\n", False), (8, "y = 2\n", True)]
