"""``RESULTS.md``'s sections of the demo (``demo.json``) and the settings
sweep (``sweep.json``), with their commands rebuilt from the stored settings."""

from __future__ import annotations

from pathlib import Path
from typing import List

from benchmarks.formatting import fmt, link, shell_join, spread, table


def demo_command(meta) -> str:
  """The demo's command line, from the settings in its JSON."""
  args = ["python", "-m", "benchmarks.demo"]
  for flag, key in (("--steps", "steps"), ("--seed", "seed"),
                    ("--adam-lr", "adam_lr"), ("--sgd-lr", "sgd_lr")):
    if key in meta:
      args += [flag, str(meta[key])]
  if "seeds" in meta:  # the demo over several seeds (--seed was one)
    at = 5  # after `python -m benchmarks.demo --steps N`
    args[at:at] = ["--seeds"] + [str(x) for x in meta["seeds"]]
  return shell_join(args)


def sweep_command(data) -> str:
  """The sweep's command line, from its settings and rows."""
  meta = data["meta"]
  args = ["python", "-m", "benchmarks.demo.sweep"]
  if "steps" in meta:
    args += ["--steps", str(meta["steps"])]
  if "seeds" in meta:
    args += ["--seeds"] + [str(s) for s in meta["seeds"]]
  if "adam_lr" in meta:
    args += ["--lr", str(meta["adam_lr"])]
  for row in data["rows"]:
    args += ["--config", row["config"]]
  return shell_join(args)


def demo_section(d, md: Path, plots: List[Path]) -> List[str]:
  """The demo's table (over seeds, if it ran several), llqr's diagnostics and
  its plot."""
  meta = d["meta"]
  out = ["## Training demo (MNIST-1D)", "",
         f"Command (reconstructed from `demo.json`'s settings): "
         f"`{demo_command(meta)}`; task `{meta.get('task', '?')}`, batch "
         f"{meta.get('batch_size', '?')}, wall time "
         f"{fmt(meta.get('wall_seconds'), 0)} s. Timing: {meta.get('timing', '–')}.", ""]
  if "seeds" in meta:  # several seeds: medians [min–max] and every seed's loss
    seeds = meta["seeds"]
    out += [f"Per optimizer, median [min–max] over seeds {', '.join(map(str, seeds))}; "
            "the final full-train-set loss of every seed.", ""]
    body = [[r["optimizer"], spread(r["final_train_loss"])]
            + [fmt(x, 4) for x in r["final_train_loss"]]
            + [spread(r["test_accuracy"], 1, 100, "%"), spread(r["ms_per_step_median"], 2),
               spread(r["ms_per_step_mean"], 2), spread(r["ratio_vs_adam_median"], 2),
               spread(r["ratio_vs_adam_mean"], 2),
               "–" if "refits" not in r else "/".join(map(str, r["refits"])),
               r.get("skipped_refits", "–"), r.get("skipped_updates", "–")]
            for r in d["rows"]]
    out += [table(["optimizer", "final train loss"] + [f"seed {x}" for x in seeds]
                  + ["test accuracy", "ms/step median", "ms/step mean",
                     "× Adam (median)", "× Adam (mean)", "refits per seed",
                     "skipped refits", "skipped updates"], body), ""]
    diag = [[f"`{r['optimizer']}`", len(r["at_refits"]["objective"]),
             spread(r["at_refits"]["objective"], 3),
             spread(r["at_refits"]["reduction_ratio"], 2)]
            for r in d["rows"] if "at_refits" in r]
    if diag:
      out += ["llqr's diagnostics after every refit, all seeds, median [min–max]:", "",
              table(["optimizer", "refits", "objective", "reduction ratio"], diag), ""]
    for p in plots:
      out += [link(md, p, "training loss per step: median and range over seeds"), ""]
    return out
  body = [[r["optimizer"], fmt(r["final_train_loss"], 4),
           f"{fmt(100 * r['test_accuracy'], 1)}%", fmt(r["ms_per_step_median"], 2),
           fmt(r["ms_per_step_mean"], 2), fmt(r["ratio_vs_adam_median"], 2),
           fmt(r["ratio_vs_adam_mean"], 2), r.get("refits", "–"),
           r.get("skipped_refits", "–"), r.get("skipped_updates", "–")]
          for r in d["rows"]]
  out += [table(["optimizer", "final train loss", "test accuracy", "ms/step median",
                 "ms/step mean", "× Adam (median)", "× Adam (mean)", "refits",
                 "skipped refits", "skipped updates"], body), ""]
  for p in plots:
    out += [link(md, p, "training loss per step"), ""]
  return out


def sweep_section(s) -> List[str]:
  """The sweep's table: every configuration's loss per seed and medians."""
  meta = s["meta"]
  out = ["## Settings sweep (MNIST-1D)", "",
         f"Command (reconstructed from `sweep.json`'s settings): "
         f"`{sweep_command(s)}`; batch {meta.get('batch', '?')}.", ""]
  seeds = meta.get("seeds", [])
  body = []
  for r in s["rows"]:
    body.append([f"`{r['config'] or '(llqr defaults)'}`"]
                + [fmt(v, 4) for v in r["train_loss"]]
                + [fmt(r["median_train_loss"], 4),
                   f"{fmt(100 * r['median_test_accuracy'], 1)}%"])
  out += [table(["config"] + [f"train loss, seed {x}" for x in seeds]
                + ["median train loss", "median test accuracy"], body), ""]
  return out
