"""Plot helpers of the benchmark scripts and ``results.py`` (matplotlib, Agg).

Every figure is drawn off screen and written to a file: :func:`pyplot` gives
matplotlib's ``pyplot`` on the Agg backend, :func:`median_band` draws a
median over seeds with its min–max band, :func:`save` writes and closes a
figure. matplotlib is imported on first use only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def median_band(ax, x, median, low, high, **style: Any):
  """The ``median`` line against ``x`` and, in its colour, the band between
  ``low`` and ``high``; ``style`` goes to ``ax.plot`` (``label``, ``color``,
  ``ls``, …). Returns the line."""
  line, = ax.plot(x, median, **style)
  ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
  return line


def save(fig, path: Path, dpi: int = 110) -> Path:
  """Lays out ``fig``, writes it to ``path`` (creating its folder) and closes it."""
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path
