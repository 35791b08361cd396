"""Where a benchmark's numbers come from: the commit, the script, the machine."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict

_ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
  """``git <args>`` in the repository; ``"unknown"`` outside a checkout."""
  try:
    return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except Exception:  # noqa: BLE001 - not a git checkout, or no git
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


def of_script(script: str | Path) -> Dict[str, Any]:
  """The commit, ``script``'s state in it and its hash, and the CPU model."""
  script = Path(script).resolve()
  return dict(git=git("describe", "--always", "--dirty"),
              script_git_status=git("status", "--porcelain", "--", str(script))
              or "clean",
              script_sha256=hashlib.sha256(script.read_bytes()).hexdigest(),
              cpu_model=cpu_model())
