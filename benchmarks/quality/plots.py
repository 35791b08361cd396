"""The quality study's plots: ρ per method and geometry, ρ against refit compute."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from benchmarks import plotting
from benchmarks.quality.baselines import method_order


def plot(out, folder: Path) -> List[Path]:
  """Writes ``quality_rho.png`` and, with a compute study, ``quality_compute.png``
  to ``folder``; returns their paths."""
  plt = plotting.pyplot()

  rows, meta = out["rows"], out["meta"]
  models = [m["name"] for m in out["models"]]
  dampings = meta["dampings"]
  methods = method_order(rows)
  geoms = meta["geometries"]
  paths = []

  fig, axes = plt.subplots(len(models) * len(dampings), 1, squeeze=False,
                           figsize=(max(8, 0.75 * len(methods) * max(1, len(geoms)) / 3), 3.6 * len(models) * len(dampings)))
  width = 0.8 / max(1, len(geoms))
  colors = plt.get_cmap("tab10")
  for i, (model, damping) in enumerate([(m, d) for m in models for d in dampings]):
    ax = axes[i, 0]
    for j, geometry in enumerate(geoms):
      vals = []
      for method in methods:
        r = [r for r in rows if r["model"] == model and r["damping"] == damping
             and r["geometry"] == geometry and r["method"] == method]
        vals.append(r[0]["rho"] if r and r[0]["rho"] is not None else np.nan)
      ax.bar(np.arange(len(methods)) + (j - (len(geoms) - 1) / 2) * width, vals,
             width, label=geometry, color=colors(j))
    ax.set_xticks(np.arange(len(methods)))
    ax.set_xticklabels([m.replace("llqr_", "llqr ") for m in methods],
                       rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ρ (fresh batch)")
    ax.set_title(f"{model}, λ = {damping:g}")
    ax.grid(True, axis="y", alpha=0.3)
    if i == 0:
      ax.legend(ncol=min(7, len(geoms)), fontsize=8, loc="upper right")
  paths.append(plotting.save(fig, folder / "quality_rho.png"))

  comp = out["compute"]
  if comp:
    pairs = [(m, d) for m in models for d in dampings
             if any(r["model"] == m and r["damping"] == d for r in comp)]
    fig, axes = plt.subplots(1, len(pairs), squeeze=False,
                             figsize=(5.2 * len(pairs), 4.2))
    geometry = meta["compute_geometry"]
    for i, (model, damping) in enumerate(pairs):
      ax = axes[0, i]
      sel = [r for r in comp if r["model"] == model and r["damping"] == damping]
      for k, structure in enumerate(meta["compute_structures"]):
        for solver, style in (("cg", "-o"), ("pcg", "-^"), ("sgd", "--s")):
          pts = sorted((r["curvature_products"], r["rho"]) for r in sel
                       if r["structure"] == structure and r["solver"] == solver)
          if pts:
            ax.plot(*zip(*pts), style, color=colors(k), label=f"{structure} {solver}")
      for m, ls, col in (("kfac_ideal_layer", ":", "0.4"), ("kfac", "-.", "k"),
                         ("stale_exact", "--", "tab:purple")):
        r = [r for r in rows if r["model"] == model and r["damping"] == damping
             and r["geometry"] == geometry and r["method"] == m and r["rho"] is not None]
        if r:
          ax.axhline(r[0]["rho"], color=col, ls=ls, lw=1.2, label=m)
      ax.set_xscale("log")
      ax.set_ylim(0, 1.05)
      ax.set_xlabel(f"curvature products over {meta['refits']} refits")
      ax.set_ylabel("ρ (fresh batch)")
      ax.set_title(f"{model}, {geometry}, λ = {damping:g}")
      ax.grid(True, which="both", alpha=0.3)
      if i == 0:
        ax.legend(fontsize=7)
    paths.append(plotting.save(fig, folder / "quality_compute.png"))
  return paths

