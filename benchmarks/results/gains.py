"""``RESULTS.md``'s sections of the gains study (``training_ablation_*.json``)
and of the large-batch regime (``training_batch_*.json``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks import plotting
from benchmarks.formatting import fmt, fmt_g, link, table
from benchmarks.results.training import stat


def base_of(name: str) -> Optional[str]:
  """The base optimizer a row wraps (``llqr_kron[...]+adam`` → ``adam``)."""
  head, plus, base = name.rpartition("+")
  return base if plus and not base.endswith("]") else None


def steps_cell(r: Dict[str, Any]) -> str:
  """``median [min–max] (k/n)`` of the steps to target; misses count as ∞."""
  hits = r["steps_to_target"]
  got = [h for h in hits if h is not None]
  if not got:
    return f"– (0/{len(hits)})"
  med = np.median([h if h is not None else math.inf for h in hits])
  body = (f"{fmt(float(med), 0)}" if math.isfinite(med) else "∞") + (
      f" [{min(got)}–{max(got) if len(got) == len(hits) else '∞'}]"
      if len(hits) > 1 else "")
  return body + ("" if len(got) == len(hits) else f" ({len(got)}/{len(hits)})")


def median_steps(r: Dict[str, Any]) -> float:
  """The median steps to target over seeds, a miss counting as ∞."""
  return float(np.median([h if h is not None else math.inf
                          for h in r["steps_to_target"]]))


def ablation_section(runs: Dict[str, Dict[str, Any]], md: Path, assets: Path) -> List[str]:
  """The gains study: one table per task from ``training_ablation_<task>.json``,
  rows against their base optimizer and against Adam, Muon and the exact step."""
  if not runs:
    return []
  first = next(iter(runs.values()))["meta"]
  out = ["## The gains study: llqr's levers (`training_ablation_*.json`)", "",
         "Command: `python -m benchmarks.training.ablation` (one `benchmarks/training/run.py` "
         "process per task; each task's rows and commit below). Protocol as in the "
         "training benchmark: each row's rate, and the options written `a|b`, "
         f"tuned on seed {first['seeds'][0]} "
         + ("for the fewest steps to the target, then the lowest final loss"
            if first.get("select") == "steps" else "by the final training loss")
         + " (the rate "
         "grid extended by ×3 beyond an edge until the best is inside it), the "
         f"best run on seeds {first['seeds']}. Steps to target: median over the "
         "seeds [min–max] of the first step at which the EMA (β = 0.98) of the "
         "batch loss reaches the task's target; a seed that never reaches it "
         "counts as ∞. *× base*: the row's median steps over its base "
         "optimizer's (Adam, SGD-momentum or Muon, each at its own best rate); "
         "*× Adam time*: amortised ms/step over Adam's in the same interleaved "
         "runs (median over seeds). `lr edge`: the best rate is still at the "
         "edge after extension.", ""]
  figs = []
  for name, t in runs.items():
    task = t["tasks"][0]
    rows = t["summary"]
    by_name = {r["optimizer"]: r for r in rows}
    out += [f"### {name.removeprefix('training_ablation_')}", "",
            f"{task['description']}; {task['num_params']} parameters; "
            f"{task['steps']} steps, batch {task['batch_size']}, target training "
            f"loss {fmt_g(task['target_loss'])}; wall time "
            f"{t['meta']['wall_seconds'] / 60:.0f} min; git "
            f"`{t['meta'].get('git', '?')}`. A bare `llqr` row is llqr's "
            "default at that commit.", ""]
    body = []
    for r in rows:
      base = base_of(r["optimizer"])
      ref = by_name.get(base) if base else None
      ratio = (median_steps(r) / median_steps(ref)
               if ref and math.isfinite(median_steps(ref)) else None)
      variant = r.get("variant", r["optimizer"])
      chosen = "" if variant == r["optimizer"] else f"`{variant}`"
      body.append([f"`{r['optimizer']}`", chosen or "–", fmt_g(r["best_lr"])
                   + (" (lr edge)" if r.get("lr_at_edge") else ""),
                   steps_cell(r),
                   "–" if ratio is None else ("∞" if not math.isfinite(ratio)
                                              else f"{ratio:.2f}"),
                   stat(r["final_train_loss"], 4),
                   stat(r["ratio_vs_adam_mean"], 2)])
    out += [table(["row", "tuned variant", "best lr", "steps to target",
                   "× base steps", "final train loss", "× Adam time (mean)"],
                  body), ""]
    figs.append((dict(task, name=name.removeprefix("training_ablation_")), rows))
  png = ablation_plot(figs, assets / "ablation_steps.png")
  if png:
    out += [link(md, png, "steps to target over the base optimizer's, per row and task"), ""]
  return out


def batch_section(runs: Dict[str, Dict[str, Any]], md: Path, assets: Path) -> List[str]:
  """Steps to target against batch size, from ``training_batch_*.json``."""
  if not runs:
    return []
  plt = plotting.pyplot()
  points: Dict[str, Dict[str, Dict[int, Dict[str, Any]]]] = {}
  for t in runs.values():
    task = t["tasks"][0]
    for r in t["summary"]:
      points.setdefault(task["name"], {}).setdefault(r["optimizer"], {})[
          task["batch_size"]] = r
  steps = sorted({t["tasks"][0]["steps"] for t in runs.values()})
  extra = f" --extra --steps {steps[0]}" if len(steps) == 1 else ""
  out = ["## The large-batch regime: steps to target against batch size", "",
         f"Command: `python -m benchmarks.training.ablation --batch-sweep{extra}` "
         f"({'/'.join(map(str, steps))} steps per run; a "
         "`benchmarks/training/run.py --batch B` process per task and batch; each "
         "row's rate tuned at each batch size on seed 0, median over seeds "
         f"{next(iter(runs.values()))['meta']['seeds']}; same target loss and "
         "number of steps at every batch size). Cells: median steps to target "
         "[min–max]; ∞ where a seed never reached it.", ""]
  fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.4), squeeze=False)
  for ax, (task, rows) in zip(axes[0], points.items()):
    batches = sorted({b for r in rows.values() for b in r})
    body = []
    for name, per in rows.items():
      body.append([f"`{name}`"] + [steps_cell(per[b]) if b in per else "–"
                                   for b in batches])
      ys = [median_steps(per[b]) if b in per else np.nan for b in batches]
      ax.plot(batches, [y if np.isfinite(y) else np.nan for y in ys], "-o",
              label=name)
    out += [f"### {task}", "", table(["row", *[f"batch {b}" for b in batches]], body), ""]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median steps to target")
    ax.set_title(task)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  path = plotting.save(fig, assets / "batch_steps.png")
  return out + [link(md, path, "steps to target against batch size"), ""]


def ablation_plot(figs, path: Path) -> Optional[Path]:
  """Median steps to target over the base's, per row (bars) and task."""
  names = []
  for _, rows in figs:
    for r in rows:
      if base_of(r["optimizer"]) and r["optimizer"] not in names:
        names.append(r["optimizer"])
  if not names:
    return None
  fig, ax = plotting.pyplot().subplots(figsize=(max(8, 0.55 * len(names) * len(figs) / 2 + 4), 5))
  width = 0.8 / len(figs)
  for j, (task, rows) in enumerate(figs):
    by_name = {r["optimizer"]: r for r in rows}
    vals = []
    for n in names:
      r, ref = by_name.get(n), by_name.get(base_of(n) or "")
      v = (median_steps(r) / median_steps(ref)) if r and ref else np.nan
      vals.append(min(v, 3.0) if np.isfinite(v) else (3.0 if r and ref else np.nan))
    ax.bar(np.arange(len(names)) + (j - (len(figs) - 1) / 2) * width, vals, width,
           label=task["name"])
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(0.8, color="k", lw=0.8, ls=":")
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
  ax.set_ylabel("median steps to target / base's (capped at 3; ∞ = 3)")
  ax.set_title("llqr's levers: steps to target relative to the base optimizer "
               "(dotted: the 0.8 bar)")
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  return plotting.save(fig, path)
