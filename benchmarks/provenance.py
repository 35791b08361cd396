"""Where a benchmark's numbers come from: the commit, the script, the machine."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict

from benchmarks.cli import ROOT as _ROOT


def git(*args: str) -> str:
  """``git <args>`` in the repository; ``"unknown"`` outside a checkout."""
  try:
    return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
    return "unknown"


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def of_script(script: str | Path, *parts: str | Path) -> Dict[str, Any]:
  """The commit, the state in it of ``script`` and of the modules it is split
  into (``parts``), their hash, and the CPU model.

  ``script_sha256`` hashes the files' bytes one after the other (``script``'s
  alone without ``parts``); ``script_git_status`` is ``git status
  --porcelain`` of them all (``"clean"`` if empty); ``script_parts`` lists the
  parts, relative to the repository, when there are any.
  """
  paths = [Path(p).resolve() for p in (script, *parts)]
  digest = hashlib.sha256()
  for path in paths:
    digest.update(path.read_bytes())
  out = dict(git=git("describe", "--always", "--dirty"),
             script_git_status=git("status", "--porcelain", "--", *map(str, paths))
             or "clean",
             script_sha256=digest.hexdigest(),
             cpu_model=cpu_model())
  if parts:
    out["script_parts"] = [_relative(p) for p in paths[1:]]
  return out


def _relative(path: Path) -> str:
  try:
    return path.relative_to(_ROOT).as_posix()
  except ValueError:
    return str(path)
