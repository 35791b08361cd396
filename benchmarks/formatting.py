"""Text the benchmark scripts and ``RESULTS.md`` share: numbers, spreads,
Markdown tables and links, shell commands.

Pure Python (no JAX): ``results/render.py`` renders the JSON files with it, and the
scripts print their tables with it.
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence


def fmt(x: Any, digits: int = 3) -> str:
  """A float with ``digits`` decimals (``nan`` as such), ``–`` for ``None``,
  anything else as ``str``."""
  if x is None:
    return "–"
  if isinstance(x, float):
    if math.isnan(x):
      return "nan"
    return f"{x:.{digits}f}"
  return str(x)


def fmt_g(x: Any, digits: int = 4) -> str:
  """``digits`` significant digits, ``–`` for ``None``."""
  return "–" if x is None else f"{x:.{digits}g}"


def fixed(v: Optional[float], digits: int = 4) -> str:
  """A number with ``digits`` decimals (ints too), ``–`` for ``None``."""
  return "–" if v is None else f"{v:.{digits}f}"


def duration(seconds: float) -> str:
  """``1m05s``, or ``42s`` under a minute."""
  s = int(round(seconds))
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def spread(values: Sequence[float], digits: int = 4, scale: float = 1.0,
           suffix: str = "") -> str:
  """``median [min–max]`` of numbers (each times ``scale``), as text."""
  v = sorted(scale * x for x in values)
  mid = len(v) // 2
  median = v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])
  f = lambda x: f"{fmt(float(x), digits)}{suffix}"
  return f"{f(median)} [{f(v[0])}–{f(v[-1])}]"


def script_state(status: Optional[str]) -> str:
  """A script's ``git status --porcelain`` in words."""
  if status is None:
    return "(state not recorded)"
  if status == "clean":
    return "committed and unmodified"
  if status.startswith("??"):
    return "untracked"
  return "modified"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table."""
  out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(out)


def link(md: Path, png: Path, alt: str) -> str:
  """A Markdown image of ``png``, relative to the Markdown file ``md``."""
  rel = os.path.relpath(png, md.parent).replace(os.sep, "/")
  return f"![{alt}]({rel})"


def shell_quote(s: str) -> str:
  """Like ``shlex.quote``, but double quotes around single-quoted Python."""
  if s and all(c.isalnum() or c in "-_.=/:,+@%" for c in s):
    return s
  if not any(c in s for c in '"$`\\!'):
    return f'"{s}"'
  return shlex.quote(s)


def shell_join(args: Sequence[str]) -> str:
  """A command line from its words, quoted by :func:`shell_quote`."""
  return " ".join(shell_quote(a) for a in args)
