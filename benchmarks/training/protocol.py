"""The training harness's protocol: the rate grid on the first seed, its
extension at an edge, the selection, the other seeds, and the summary.

:func:`run_task` runs it on one task; :class:`Clock` prints the progress.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks import tasks as tasks_lib
from benchmarks.formatting import duration, fixed
from benchmarks.training.names import expand_alternatives
from benchmarks.training.optimizers import Optimizers
from benchmarks.training.runs import Run, add_ratios, run_group, summarise_run


def lr_grid(task: tasks_lib.Task, family: str, mults: Sequence[float],
            lrs: Optional[Sequence[float]], tuned: bool = True) -> List[float]:
  """The rates an optimizer is tried at (only the base rate if not tuned)."""
  if lrs:
    return [float(v) for v in lrs]
  return [float(f"{task.base_lrs[family] * m:.6g}") for m in (mults if tuned else [1.0])]


def _key_steps(result: Dict[str, Any]) -> Tuple[float, float]:
  """Steps to target first (∞ if never), then the final loss: the selection
  for a study whose metric is steps to target."""
  hit = result["steps_to_target"]
  return (math.inf if hit is None else float(hit), _key_loss(result))


def _key_loss(result: Dict[str, Any]) -> float:
  v = result["final_train_loss"]
  return v if v is not None and math.isfinite(v) else math.inf


def summarise(task: tasks_lib.Task, names: List[str], results: List[Dict[str, Any]],
              seeds: Sequence[int], best: Dict[str, Tuple[str, float]],
              edges: Optional[Dict[str, Dict[str, bool]]] = None) -> List[Dict[str, Any]]:
  """Per optimizer: the grid, the best rate (and variant) and its metrics over
  seeds."""
  rows = []
  stat = lambda v: None if not v else dict(median=float(np.median(v)),
                                           min=float(np.min(v)), max=float(np.max(v)))
  for name in names:
    variant, lr = best[name]
    variants = expand_alternatives(name)
    grid = [r for r in results if r["optimizer"] in variants and r["phase"] == "grid"]
    sel = [r for r in results if r["optimizer"] == variant and r["lr"] == lr
           and r["seed"] in seeds and (r["phase"] == "seed" or r["seed"] == seeds[0])]
    sel.sort(key=lambda r: r["seed"])
    vals = lambda key: [r[key] for r in sel if r[key] is not None]
    hits = [r["steps_to_target"] for r in sel]
    label = lambda r: (f"{r['lr']:g}" if len(variants) == 1
                       else f"{r['optimizer']}@{r['lr']:g}")
    rows.append(dict(
        task=task.name, optimizer=name, variant=variant, best_lr=lr,
        grid={label(r): r["final_train_loss"] for r in grid},
        **(edges or {}).get(name, {}),
        seeds=[r["seed"] for r in sel],
        final_train_loss=stat(vals("final_train_loss")),
        final_val_loss=stat(vals("final_val_loss")),
        final_val_acc=stat(vals("final_val_acc")),
        steps_to_target=hits, reached_target=sum(h is not None for h in hits),
        steps_to_target_median=(float(np.median(hits)) if hits and all(
            h is not None for h in hits) else None),
        seconds_to_target=[r["seconds_to_target"] for r in sel],
        seconds_to_target_median=(float(np.median(vals("seconds_to_target")))
                                  if hits and all(h is not None for h in hits) else None),
        ms_per_step_median=stat(vals("ms_per_step_median")),
        ms_per_step_mean=stat(vals("ms_per_step_mean")),
        ratio_vs_adam_median=stat(vals("ratio_vs_adam_median")),
        ratio_vs_adam_mean=stat(vals("ratio_vs_adam_mean")),
        compile_seconds=max([r["first_step_seconds"] for r in results
                             if r["optimizer"] in variants
                             and r["first_step_seconds"] is not None] or [None]),
        nan_count=sum(r["nan_count"] for r in sel),
        errors=[r["error"] for r in sel if r["error"]]))
  return rows


def run_task(task: tasks_lib.Task, names: List[str], opts: Optimizers,
             seeds: Sequence[int], mults: Sequence[float],
             lrs: Optional[Sequence[float]], block: int, clock: "Clock",
             untuned: Sequence[str] = (), max_extend: int = 3,
             select: str = "loss"):
  """The grid on the first seed, then the best rates on the others.

  Each name may list alternatives (:func:`expand_alternatives`), tuned with
  the rate. When the best rate of a variant lies at an edge of the rates
  tried, the grid is extended by a factor 3 beyond it, up to ``max_extend``
  times, until it does not (``lr_at_edge`` says if it still does).
  ``select="loss"`` picks the lowest final training loss, ``"steps"`` the
  fewest steps to the target (then the lowest loss).
  """
  key = _key_steps if select == "steps" else _key_loss
  steps = task.steps
  results: List[Dict[str, Any]] = []
  variants = {n: expand_alternatives(n) for n in names}
  grids = {v: lr_grid(task, opts.family(v), mults, lrs, n not in untuned)
           for n in names for v in variants[n]}

  def group(seed, phase, pairs):
    runs = [Run(task.name, n, lr, seed, phase, opts.runner(task, n, lr))
            for n, lr in pairs]
    tag = f"[{task.name} seed {seed} {phase}: {len(runs)} runs]"
    clock.begin(tag, len(runs) * steps)
    run_group(task, runs, seed, steps, block,
              lambda t: clock.tick(len(runs), t, steps))
    out = [summarise_run(task, r, steps) for r in runs]
    add_ratios(out)
    for r in out:
      clock.report(r)
    results.extend(out)
    return out

  grid_results = group(seeds[0], "grid", [(v, lr) for v in grids for lr in grids[v]])
  tunable = [v for n in names if n not in untuned and not lrs for v in variants[n]]
  for _ in range(max_extend):
    more = []
    for v in tunable:
      mine = [r for r in grid_results if r["optimizer"] == v]
      tried = sorted({r["lr"] for r in mine})
      best_lr = min(mine, key=key)["lr"]
      if not math.isfinite(_key_loss(min(mine, key=key))) or len(tried) < 2:
        continue
      if best_lr == tried[0]:
        more.append((v, float(f"{best_lr / 3:.6g}")))
      elif best_lr == tried[-1]:
        more.append((v, float(f"{best_lr * 3:.6g}")))
    if not more:
      break
    print(f"  {task.name}: best rate at the grid's edge, extending: "
          + ", ".join(f"{v}@{lr:g}" for v, lr in more), flush=True)
    for v, lr in more:
      grids[v] = sorted(grids[v] + [lr])
    grid_results += group(seeds[0], "grid", more)
  best, edges = {}, {}
  for n in names:
    mine = [r for r in grid_results if r["optimizer"] in variants[n]]
    top = min(mine, key=key)
    best[n] = (top["optimizer"], top["lr"])
    tried = sorted({r["lr"] for r in mine if r["optimizer"] == top["optimizer"]})
    edges[n] = dict(lr_at_edge=bool(len(tried) > 1 and top["lr"] in (tried[0], tried[-1])),
                    variant_at_edge=bool(len(variants[n]) > 2 and top["optimizer"]
                                         in (variants[n][0], variants[n][-1])))
    print(f"  {task.name} {n}: best {top['optimizer']} at rate {top['lr']:g} of "
          + ", ".join(f"{r['optimizer'] if len(variants[n]) > 1 else ''}@{r['lr']:g} "
                      f"({fixed(r['final_train_loss'])})" for r in mine),
          flush=True)
  for seed in seeds[1:]:
    group(seed, "seed", [best[n] for n in names])
  return results, summarise(task, names, results, list(seeds), best, edges), grids


class Clock:
  """Progress lines: elapsed time and an ETA from the run-steps still to do."""

  def __init__(self, total_work: float):
    self.t0 = time.perf_counter()
    self.total = total_work
    self.done = 0.0
    self.group_start = self.t0
    self.tag = ""
    self.last = 0.0

  def begin(self, tag: str, work: float):
    self.tag, self.group_start = tag, time.perf_counter()
    self.group_done_before = self.done
    print(f"{tag} start  [{self.elapsed()}]", flush=True)

  def elapsed(self) -> str:
    return duration(time.perf_counter() - self.t0)

  def eta(self) -> str:
    spent = time.perf_counter() - self.t0
    return duration(spent / self.done * (self.total - self.done)) if self.done else "?"

  def tick(self, nruns: int, t: int, steps: int):
    self.done = self.group_done_before + nruns * t
    now = time.perf_counter()
    if t == steps or now - self.last > 30:
      self.last = now
      print(f"{self.tag} step {t}/{steps}  [elapsed {self.elapsed()}, "
            f"ETA {self.eta()}]", flush=True)

  def report(self, r: Dict[str, Any]):
    print(f"  {r['optimizer']:>24s} lr {r['lr']:<8g} seed {r['seed']}: train "
          f"{fixed(r['final_train_loss'])}  val {fixed(r['final_val_loss'])} / "
          f"{fixed(None if r['final_val_acc'] is None else 100 * r['final_val_acc'], 1)}%"
          f"  target@{r['steps_to_target']}  "
          f"{fixed(r['ms_per_step_median'], 2)} / {fixed(r['ms_per_step_mean'], 2)} ms"
          f"  x adam {fixed(r['ratio_vs_adam_median'], 2)} / "
          f"{fixed(r['ratio_vs_adam_mean'], 2)}  compile+1st "
          f"{fixed(r['first_step_seconds'], 1)}s  nan {r['nan_count']}"
          + (f"  ERROR {r['error']}" if r["error"] else "")
          + f"  [elapsed {self.elapsed()}, ETA {self.eta()}]", flush=True)

