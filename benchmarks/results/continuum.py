"""RESULTS.md's section on the continuum from llqr's step to the exact step:
the table and the plot of ``benchmarks/training/continuum.py``'s runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from benchmarks.plotting import pyplot, save

#: The CG steps of the continuum.
KS = (1, 2, 5, 20)
#: The damping of both families.
DAMPING = 0.1
TASKS = ("mnist1d_mlp", "mnist1d_autoencoder", "mnist1d_resnet", "char_transformer")
#: Where the kept runs, table and plot are (``--report --out`` this folder).
KEPT = Path(__file__).resolve().parent / "continuum"


def exact_row(k: int) -> str:
  return f"exact_ggn[damping={DAMPING:g},iters={k}]+adam"


def llqr_row(k: int) -> str:
  return (f"llqr[damping={DAMPING:g}]+adam" if k == 0
          else f"llqr[damping={DAMPING:g},cg_steps={k}]+adam")


ROWS = ("adam", *(exact_row(k) for k in KS), *(llqr_row(k) for k in (0, *KS)))


def _median(values) -> Optional[float]:
  finite = [v for v in values if v is not None]
  return float(np.median(finite)) if len(finite) == len(values) and finite else None


def summarise(path: Path) -> Dict[str, Dict]:
  """``{row: {lr, lr_at_edge, seeds, reached, steps, steps_range,
  time_per_step}}`` of one task's training JSON: steps to the target, the
  median over the seeds (``None`` where a seed missed it), and the time per
  step over Adam's (``nan`` where not measured)."""
  data = json.loads(path.read_text())
  out = {}
  for s in data["summary"]:
    steps = s["steps_to_target"]
    reached = [v for v in steps if v is not None]
    out[s["optimizer"]] = dict(
        lr=s["best_lr"], lr_at_edge=s["lr_at_edge"], seeds=len(steps),
        reached=len(reached), steps=_median(steps),
        steps_range=(min(reached), max(reached)) if reached else None,
        time_per_step=(s.get("ratio_vs_adam_mean") or {}).get("median") or float("nan"))
  return out


def _cell(row: Optional[Dict], adam: Dict) -> str:
  if row is None:
    return "–"
  if row["steps"] is None:
    return f"{row['reached']}/{row['seeds']} reach it"
  lo, hi = row["steps_range"]
  ratio = row["steps"] / adam["steps"]
  return f"{row['steps']:.0f} [{lo}–{hi}], {ratio:.2f}× · {time_ratio(row, adam):.1f}×"


def time_ratio(row: Dict, adam: Dict) -> float:
  """Time to the target over Adam's: the steps' ratio times the time per
  step's (measured side by side, interleaved, so both share the machine)."""
  return row["steps"] / adam["steps"] * row["time_per_step"]


def table(task: str, rows: Dict[str, Dict]) -> List[str]:
  adam = rows["adam"]
  lines = [f"**{task}** (Adam: {adam['steps']:.0f} steps [{adam['steps_range'][0]}–"
           f"{adam['steps_range'][1]}])", "",
           "| CG steps `k` | from 0, no `U` (`exact_ggn[iters=k]`) | from `U g`, "
           "preconditioned by `U` (`llqr[cg_steps=k]`) |",
           "| --- | --- | --- |"]
  for k in (0, *KS):
    exact = rows.get(exact_row(k)) if k else None
    lines.append(f"| {k} | {_cell(exact, adam) if k else '(Adam)'} | "
                 f"{_cell(rows.get(llqr_row(k)), adam)} |")
  return lines


def best_in_time(rows: Dict[str, Dict]) -> str:
  timed = {name: time_ratio(r, rows["adam"]) for name, r in rows.items()
           if r["steps"] is not None}
  return min(timed, key=timed.get)


def report(out: Path) -> None:
  """Writes ``continuum.md`` and ``continuum.png`` into ``out`` from its
  ``training_continuum_<task>.json``."""
  found = {t: out / f"training_continuum_{t}.json" for t in TASKS}
  found = {t: summarise(p) for t, p in found.items() if p.exists()}
  if not found:
    raise SystemExit(f"no training_continuum_<task>.json in {out}: run without --report first")
  lines = ["<!-- written by python -m benchmarks.training.continuum --report -->",
           "### The continuum from llqr's step to the exact damped step", "",
           f"Steps to the target loss (median over seeds [range]), the ratio to Adam's, "
           f"and the time to the target over Adam's (the steps' ratio times the time "
           f"per step's, measured side by side); damping {DAMPING:g}, Adam after "
           "every row, each row at its rate tuned on seed 0.", ""]
  for task, rows in found.items():
    lines += table(task, rows) + ["", f"Fastest to the target in time: `{best_in_time(rows)}`.", ""]
  (out / "continuum.md").write_text("\n".join(lines))
  plot(found, out / "continuum.png")
  print("\n".join(lines))
  print(f"wrote {out / 'continuum.md'} and {out / 'continuum.png'}")


def plot(found: Dict[str, Dict[str, Dict]], path: Path) -> None:
  plt = pyplot()
  fig, axes = plt.subplots(2, len(found), figsize=(3.4 * len(found), 5.6), squeeze=False)
  for j, (task, rows) in enumerate(found.items()):
    adam = rows["adam"]
    for family, name_of, ks, style in (
        ("CG from 0, no U", exact_row, KS, "o-"),
        ("CG from U g, preconditioned by U", llqr_row, (0, *KS), "s-")):
      got = [(k, rows.get(name_of(k))) for k in ks]
      got = [(k, r) for k, r in got if r and r["steps"] is not None]
      x = [k + 0.5 for k, _ in got]  # log axis: k = 0 at 0.5
      axes[0][j].plot(x, [r["steps"] / adam["steps"] for _, r in got], style, label=family)
      axes[1][j].plot(x, [time_ratio(r, adam) for _, r in got], style, label=family)
    for i in range(2):
      axes[i][j].axhline(1.0, color="gray", lw=0.8, ls="--")
      axes[i][j].set_xscale("log")
      axes[i][j].set_xticks([k + 0.5 for k in (0, *KS)], [str(k) for k in (0, *KS)])
    axes[0][j].set_title(task, fontsize=9)
    axes[1][j].set_xlabel("CG steps k")
  axes[0][0].set_ylabel("steps to target / Adam's")
  axes[1][0].set_ylabel("time to target / Adam's")
  axes[0][0].legend(fontsize=7)
  save(fig, path, dpi=90)  # four tasks side by side: kept under the 2 MB budget


def section(kept: Path = KEPT) -> List[str]:
  """The kept ``continuum.md`` as a RESULTS.md section (nothing if absent),
  its plot linked where it is kept, relative to ``benchmarks/`` (the
  folder of the committed RESULTS.md)."""
  path = kept / "continuum.md"
  if not path.exists():
    return []
  lines = path.read_text().splitlines()[1:]  # less the "written by" comment
  lines[0] = "## The continuum from llqr's step to the exact damped step"
  rel = (kept / "continuum.png").resolve().relative_to(KEPT.parents[2] / "benchmarks")
  return [lines[0], "", "Command: `python -m benchmarks.training.continuum`, then "
          "`--report --out benchmarks/results/continuum`.", *lines[1:],
          f"![continuum]({rel.as_posix()})", ""]
