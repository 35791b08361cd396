"""``RESULTS.md``'s sections of the training benchmark (``training_<tag>.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.formatting import fmt, fmt_g, link, script_state, table


def stat(d: Optional[Dict[str, float]], digits: int = 3, scale: float = 1.0,
         suffix: str = "") -> str:
  """``median [min–max]`` of a summary statistic."""
  if not d:
    return "–"
  med, lo, hi = (scale * d[k] for k in ("median", "min", "max"))
  if lo == hi:
    return f"{med:.{digits}f}{suffix}"
  return f"{med:.{digits}f}{suffix} [{lo:.{digits}f}–{hi:.{digits}f}]"


def _grid_cell(grid: Dict[str, Optional[float]], best: float,
               variant: Optional[str] = None) -> str:
  """``lr: loss`` per grid point (``variant@lr`` where the row tuned options
  too), the best in bold."""
  cells = []
  for key, loss in grid.items():
    name, _, lr = key.rpartition("@")
    mark = "**" if float(lr) == best and (not name or name == variant) else ""
    cells.append(f"{mark}{key}: {fmt(loss, 3) if loss is not None else 'diverged'}{mark}")
  return ", ".join(cells)


def training_section(name: str, t: Dict[str, Any], md: Path,
                     plots: List[Path]) -> List[str]:
  """Tables per task, the protocol and the command of one ``training_*.json``."""
  meta = t["meta"]
  out = [f"## Training benchmark (`{name}.json`)", "",
         f"Command: `{meta['command']}` (git `{meta['git']}`; `{meta['script']}` "
         f"{script_state(meta.get('script_git_status'))} in it; wall time "
         f"{fmt(meta['wall_seconds'] / 60, 1)} min, per task "
         + ", ".join(f"{x['name']} {fmt(x['seconds'] / 60, 1)} min" for x in t["tasks"])
         + f"; load average {fmt(meta['load_average_start'][0], 1)} at the start, "
         f"{fmt(meta['load_average_end'][0], 1)} at the end; jax {meta['jax']}, "
         f"optax {meta['optax']}, flax {meta.get('flax')}, python {meta['python']}).",
         "",
         f"Protocol: every optimizer is tuned on seed {meta['seeds'][0]} over its "
         "family's base rate times "
         + (f"{', '.join(fmt_g(m) for m in meta['lr_mults'])}" if not meta.get("lrs")
            else f"(absolute rates {', '.join(fmt_g(v) for v in meta['lrs'])})")
         + " by the final training loss (on a fixed training subset), and the best "
         f"rate is run on seeds {', '.join(str(x) for x in meta['seeds'])}. For a "
         "seed, all optimizers start from the same parameters and see the same "
         "batches; their runs are interleaved in blocks of steps so they share the "
         f"machine's load. Timing: {meta['timing']}. The target is reached when the "
         f"EMA (β = {meta['smoothing_beta']}) of the batch training loss first "
         "falls to it; seconds to target sum the step times up to then "
         "(compilation out). Cells show the median over seeds [min–max].", ""]
  if meta.get("skipped"):
    out += ["Skipped here: " + "; ".join(f"`{k}` ({v})" for k, v in
                                          meta["skipped"].items()), ""]
  for task in t["tasks"]:
    rows = [r for r in t["summary"] if r["task"] == task["name"]]
    info = task.get("info", {})
    facts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.items()
                      if k not in ("dataset", "corpus_sha256"))
    out += [f"### {task['name']}", "",
            f"{task['description']}; {task['num_params']} parameters; "
            f"{info.get('dataset', '')}" + (f" ({facts})" if facts else "")
            + f". {task['steps']} steps, batch {task['batch_size']}, target training "
            f"loss {fmt_g(task['target_loss'])}; base rates "
            + ", ".join(f"{k} {fmt_g(v)}" for k, v in task["base_lrs"].items())
            + ".", ""]
    body = []
    for r in rows:
      n = len(r["seeds"])
      body.append([
          f"`{r['optimizer']}`", fmt_g(r["best_lr"]),
          stat(r["final_train_loss"], 3), stat(r["final_val_loss"], 3),
          stat(r["final_val_acc"], 1, 100.0, "%"),
          f"{r['reached_target']}/{n}"
          + (f": {fmt(r['steps_to_target_median'], 0)}"
             if r["steps_to_target_median"] is not None else ""),
          fmt(r["seconds_to_target_median"], 1),
          stat(r["ms_per_step_median"], 2), stat(r["ms_per_step_mean"], 2),
          stat(r["ratio_vs_adam_median"], 2), stat(r["ratio_vs_adam_mean"], 2),
          fmt(r["compile_seconds"], 1), r["nan_count"]])
    out += [table(["optimizer", "best lr", "final train loss", "val loss",
                   "val acc", "reached target: median steps",
                   "median s to target", "ms/step median", "ms/step mean",
                   "× Adam (median)", "× Adam (mean)", "compile + 1st step s",
                   "NaN losses"], body), ""]
    out += ["Learning-rate grid (final training loss on seed "
            f"{meta['seeds'][0]}; best in bold):", ""]
    out += [table(["optimizer", "grid"],
                  [[f"`{r['optimizer']}`", _grid_cell(r["grid"], r["best_lr"],
                                                      r.get("variant"))]
                   for r in rows]), ""]
    errors = [(r["optimizer"], e) for r in rows for e in r.get("errors", [])]
    if errors:
      out += ["Errors: " + "; ".join(f"`{o}`: {e}" for o, e in errors), ""]
    for p in plots:
      if p.name.endswith(f"_{task['name']}.png"):
        out += [link(md, p, f"{task['name']}: training loss against steps and "
                            "seconds"), ""]
  return out
