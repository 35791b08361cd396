"""Command-line options the benchmark scripts share.

The scripts run as modules from the repository's root (``python -m
benchmarks.demo``, ``python -m benchmarks.training --quick``, …) and write to
:data:`OUT` unless ``--out`` says otherwise. Pure Python: light scripts
(``training/ablation.py``, ``results/render.py``) import it without JAX.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

#: The repository's root.
ROOT = Path(__file__).resolve().parents[1]
#: The scripts' default output folder (git-ignored).
OUT = ROOT / "benchmarks" / "out"


def add_out(parser: argparse.ArgumentParser, help: Optional[str] = None) -> None:
  """``--out``: the output folder, :data:`OUT` by default."""
  parser.add_argument("--out", type=Path, default=OUT, help=help)


def check_steps(parser: argparse.ArgumentParser, steps: Optional[int]) -> None:
  """Exits with a usage error unless ``steps`` is ``None`` or at least 2 (the
  first step compiles, so timings need a second)."""
  if steps is not None and steps < 2:
    parser.error("--steps must be at least 2 (the first step compiles).")
