"""Tables and plots of the long-horizon benchmark (:mod:`benchmarks.horizon.run`).

For each row at its tuned rate: the final test accuracy (median over seeds and
range), the final training loss (a diverged run's counts as infinite), the
seeds that diverged (a loss that is not finite, or a test accuracy below
20 %), the steps it takes to reach the base's final
training loss (per seed, against the base on the same seed: same
initialisation, same batches), and its amortised time per step over the
base's. Plots: test accuracy and training loss against steps and against
seconds, medians over seeds with their min-max bands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks import plotting


def score(r: Dict[str, Any]):
  """Higher is better: final validation accuracy, then lower validation loss."""
  if r["diverged"] or not math.isfinite(r["final"]["val_loss"]):
    return (-1.0, -math.inf)
  return (r["final"]["val_acc"], -r["final"]["val_loss"])


def best_rate(runs: List[Dict[str, Any]], name: str) -> Optional[float]:
  """The rate of row ``name``'s best seed-0 run (:func:`score`), ``None``
  before any."""
  tried = [r for r in runs if r["row"] == name and r["seed"] == 0]
  return max(tried, key=score)["lr"] if tried else None


def tuned_runs(runs: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
  """Each row's runs at its tuned rate (the rate of its seed-0 run with the
  best validation score among those with the most seeds)."""
  out: Dict[str, List[Dict[str, Any]]] = {}
  for name in dict.fromkeys(r["row"] for r in runs):
    mine = [r for r in runs if r["row"] == name]
    by_lr: Dict[float, List[Dict[str, Any]]] = {}
    for r in mine:
      by_lr.setdefault(r["lr"], []).append(r)
    most = max(len(v) for v in by_lr.values())
    candidates = [v for v in by_lr.values() if len(v) == most]
    best = max(candidates, key=lambda v: max(score(r) for r in v if r["seed"] == 0)
               if any(r["seed"] == 0 for r in v) else (-2.0,))
    out[name] = sorted(best, key=lambda r: r["seed"])
  return out


def steps_to(curve: Dict[str, List[float]], target: float) -> Optional[int]:
  for step, loss in zip(curve["step"], curve["train_loss"]):
    if loss <= target:
      return step
  return None


def _med(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None, None
  return float(np.median(values)), float(np.min(values)), float(np.max(values))


def summarise(runs: List[Dict[str, Any]], base: str) -> Dict[str, Dict[str, Any]]:
  """Per row: medians and ranges over seeds of the table's columns."""
  rows = tuned_runs(runs)
  base_runs = {r["seed"]: r for r in rows.get(base, [])}
  out = {}
  for name, rs in rows.items():
    reach, time_ratio = [], []
    for r in rs:
      b = base_runs.get(r["seed"])
      if b is None:
        continue
      s = steps_to(r["curve"], b["final"]["train_loss"])
      reach.append(None if s is None else s / b["steps"])
      time_ratio.append(r["ms_per_step"] / b["ms_per_step"])
    out[name] = dict(
        lr=rs[0]["lr"], seeds=[r["seed"] for r in rs],
        grid=sorted({r["lr"] for r in runs if r["row"] == name and r["seed"] == 0}),
        test_acc=_med([100 * r["final"]["test_acc"] for r in rs]),
        val_acc=_med([100 * r["final"]["val_acc"] for r in rs]),
        # a diverged run's loss (NaN) counts as the worst: +inf
        train_loss=_med([r["final"]["train_loss"] if math.isfinite(r["final"]["train_loss"])
                         else math.inf for r in rs]),
        diverged=sum(not math.isfinite(r["final"]["train_loss"]) or r["final"]["test_acc"] < 0.2
                     for r in rs),
        steps_to_base=_med(reach), reached=sum(x is not None for x in reach),
        time_ratio=_med(time_ratio),
        refits=_med([r.get("llqr", {}).get("refits") for r in rs]))
  return out


def _fmt(m, digits=1, pct=False):
  med, lo, hi = m
  if med is None:
    return "n/a"
  f = f"{{:.{digits}f}}"
  return f"{f.format(med)} [{f.format(lo)}–{f.format(hi)}]"


def table(summary: Dict[str, Dict[str, Any]], base: str) -> str:
  lines = ["| row | rate (grid) | test acc. % | val acc. % | final train loss | "
           f"steps to {base}'s final loss (× its steps) | diverged | time / step × {base} |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, s in summary.items():
    grid = ", ".join(f"{x:g}" for x in s["grid"])
    reach = _fmt(s["steps_to_base"], 2)
    if s["reached"] < len(s["seeds"]):
      reach += f" ({s['reached']}/{len(s['seeds'])} seeds reach it)"
    lines.append(f"| `{name}` | {s['lr']:g} ({grid}) | {_fmt(s['test_acc'])} | "
                 f"{_fmt(s['val_acc'])} | {_fmt(s['train_loss'], 4)} | {reach} | "
                 f"{s['diverged']}/{len(s['seeds'])} | {_fmt(s['time_ratio'], 2)} |")
  return "\n".join(lines)


def lever_table(runs: List[Dict[str, Any]], base: str) -> str:
  """Every row on seed 0 at its best rate (the tuning runs): the screen."""
  lines = ["| row | rate (grid) | val acc. % | test acc. % | final train loss | refits |",
           "| --- | --- | --- | --- | --- | --- |"]
  names = list(dict.fromkeys(r["row"] for r in runs))
  for name in names:
    lr = best_rate(runs, name)
    if lr is None:
      continue
    r = next(r for r in runs if r["row"] == name and r["seed"] == 0 and r["lr"] == lr)
    grid = ", ".join(f"{x:g}" for x in sorted({q["lr"] for q in runs
                                               if q["row"] == name and q["seed"] == 0}))
    f = r["final"]
    refits = r.get("llqr", {}).get("refits")
    lines.append(f"| `{name}` | {lr:g} ({grid}) | {100 * f['val_acc']:.1f} | "
                 f"{100 * f['test_acc']:.1f} | {f['train_loss']:.4f} | "
                 f"{'' if refits is None else f'{refits:.0f}'} |")
  return "\n".join(lines)


def plot(task, rows: Dict[str, List[Dict[str, Any]]], path: Path) -> Path:
  plt = plotting.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  for name, rs in rows.items():
    steps = np.asarray(rs[0]["curve"]["step"])
    for col, xkey in enumerate(("step", "seconds")):
      for row_i, (key, scale) in enumerate((("test_acc", 100), ("train_loss", 1))):
        ys = np.asarray([r["curve"][key] for r in rs]) * scale
        xs = (steps if xkey == "step"
              else np.median(np.asarray([r["curve"]["seconds"] for r in rs]), 0))
        plotting.median_band(axes[row_i, col], xs, np.median(ys, 0), ys.min(0), ys.max(0),
                             label=name)
  for col, xlabel in enumerate(("step", "seconds (training, compilation out)")):
    axes[0, col].set_ylabel("test accuracy %")
    axes[1, col].set_ylabel("training loss")
    axes[1, col].set_yscale("log")
    for r in range(2):
      axes[r, col].set_xlabel(xlabel)
    lo = min(np.median([r["curve"]["test_acc"][-1] for r in rs]) for rs in rows.values())
    axes[0, col].set_ylim(100 * lo - 10, None)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"{task.description}\nmedians over seeds, min-max bands", fontsize=9)
  return plotting.save(fig, path)


def report(task, runs: List[Dict[str, Any]], out: Path, base: str,
           min_seeds: int = 3) -> str:
  """Writes ``<task>.md`` (the table of rows run on at least ``min_seeds``
  seeds, then the screen of every row on seed 0), ``<task>_summary.json``
  and ``<task>.png`` to ``out`` (the runs' curves stay in
  ``benchmarks/out/long_horizon``); returns the markdown."""
  out.mkdir(parents=True, exist_ok=True)
  summary = {k: v for k, v in summarise(runs, base).items() if len(v["seeds"]) >= min_seeds}
  (out / f"{task.name}_summary.json").write_text(json.dumps(summary, indent=1))
  rows = {k: v for k, v in tuned_runs(runs).items() if k in summary}
  plot(task, rows, out / f"{task.name}.png")
  text = (f"### {task.description}\n\nMedians over seeds {sorted(next(iter(summary.values()))['seeds']) if summary else []} "
          f"[min–max], each row at its rate tuned on seed 0 (highest final validation "
          f"accuracy; the grid in brackets).\n\n{table(summary, base)}\n\n"
          f"Screen (seed 0, each row at its best rate of the grid):\n\n"
          f"{lever_table(runs, base)}\n\n![{task.name}]({task.name}.png)\n")
  (out / f"{task.name}.md").write_text(text)
  return text
