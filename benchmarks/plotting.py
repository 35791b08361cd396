"""Plot helpers of the benchmark scripts and ``results/render.py`` (matplotlib, Agg).

Every figure is drawn off screen and written to a file: :func:`pyplot` gives
matplotlib's ``pyplot`` on the Agg backend, :func:`median_band` draws a
median over seeds with its min–max band, :func:`save` writes and closes a
figure as a 256-colour palette PNG (:func:`to_palette`: a third of the bytes
of matplotlib's RGBA, the same pixels to the eye), so the plots kept in
``benchmarks/results/`` fit its budget. matplotlib and Pillow are imported on
first use only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

#: Colours of a written plot: matplotlib's lines, bands and text fit in them.
PALETTE_COLOURS = 256


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


def to_palette(png: bytes) -> bytes:
  """``png`` as an optimized PNG of :data:`PALETTE_COLOURS` colours (median
  cut, no dithering), same size in pixels; its transparency is dropped onto
  white (matplotlib's figures are opaque)."""
  from PIL import Image  # matplotlib's own dependency
  image = Image.open(io.BytesIO(png))
  kept = {"dpi": image.info["dpi"]} if "dpi" in image.info else {}
  if image.mode in ("RGBA", "LA", "P"):
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image)
  image = image.convert("RGB").quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT,
                                        dither=Image.Dither.NONE)
  out = io.BytesIO()
  image.save(out, "PNG", optimize=True, **kept)
  return out.getvalue()


def save(fig, path: Path, dpi: int = 110) -> Path:
  """Lays out ``fig``, writes it to ``path`` (creating its folder; a ``.png``
  as a palette PNG, :func:`to_palette`) and closes it."""
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  if Path(path).suffix.lower() == ".png":
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    Path(path).write_bytes(to_palette(buffer.getvalue()))
  else:
    fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path
