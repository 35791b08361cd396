"""The training harness's plots: loss against steps and against seconds."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from benchmarks import plotting


def plot(task: Dict[str, Any], rows: List[Dict[str, Any]],
         runs: List[Dict[str, Any]], path: Path) -> Path:
  """Smoothed training loss vs step and vs seconds: median over seeds,
  band min–max, each optimizer at its best rate."""
  fig, axes = plotting.pyplot().subplots(1, 2, figsize=(13, 4.6))
  for i, row in enumerate(rows):
    sel = [r for r in runs if r["optimizer"] == row.get("variant", row["optimizer"])
           and r["lr"] == row["best_lr"] and r["seed"] in row["seeds"]
           and (r["phase"] == "seed" or r["seed"] == row["seeds"][0])]
    if not sel:
      continue
    nan = lambda v: np.nan if v is None else v
    y = np.array([[nan(v) for v in r["curve"]["smoothed"]] for r in sel])
    sec = np.array([[nan(v) for v in r["curve"]["seconds"]] for r in sel])
    step = np.asarray(sel[0]["curve"]["step"])
    if np.all(np.isnan(y)):
      continue
    with np.errstate(all="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore")  # all-NaN columns: a run that stopped
      med, lo, hi = np.nanmedian(y, 0), np.nanmin(y, 0), np.nanmax(y, 0)
      xs = np.nanmedian(sec, 0)
    style = dict(color=f"C{i % 10}", ls="-" if i < 10 else "--")
    label = f"{row['optimizer']} ({row['best_lr']:g})"
    for ax, x in ((axes[0], step), (axes[1], xs)):
      plotting.median_band(ax, x, med, lo, hi, label=label, **style)
  for ax, xl in ((axes[0], "step"), (axes[1], "seconds (summed step times, median over seeds)")):
    ax.axhline(task["target_loss"], color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("training loss (batch, EMA 0.98)")
    ax.grid(True, which="both", alpha=0.3)
  axes[1].set_xscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{task['name']}: {task['description']}\nmedian over seeds "
               f"{rows[0]['seeds'] if rows else []}, band min–max; dotted: target "
               f"{task['target_loss']:g}", fontsize=9)
  return plotting.save(fig, path)
