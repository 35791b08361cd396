"""Writes ``benchmarks/RESULTS.md`` from the benchmark JSON files.

Reads ``quality.json`` (``benchmarks/quality.py``), and ``demo.json``
(``benchmarks/demo.py``), ``sweep.json`` (``benchmarks/sweep.py``) and every
``training_<tag>.json`` (``benchmarks/training.py``) when present, from
``cost*.json`` (``benchmarks/cost.py``; ``cost_gpu.json`` for a run on a GPU) from
``--in`` (default ``benchmarks/out``); copies their plots next to
the Markdown file (``--assets``, default ``benchmarks/results``) and links them.
Every number in the output is read from the JSON: nothing is typed by hand.
The command that produced each JSON is printed with it (stored in the JSON by
``quality.py``; reconstructed from the stored settings for the demo and the
sweep).

  .venv/bin/python benchmarks/results.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]

PLOTS = {"quality": ("quality_rho.png", "quality_compute.png"),
         "demo": ("demo.png",), "sweep": ()}


def fmt(x: Any, digits: int = 3) -> str:
  if x is None:
    return "–"
  if isinstance(x, float):
    if math.isnan(x):
      return "nan"
    return f"{x:.{digits}f}"
  return str(x)


def fmt_g(x: Any, digits: int = 4) -> str:
  return "–" if x is None else f"{x:.{digits}g}"


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(out)


def load(folder: Path, name: str) -> Optional[Dict[str, Any]]:
  path = folder / f"{name}.json"
  if not path.exists():
    return None
  return json.loads(path.read_text())


def copy_plots(src: Path, assets: Path, names: Sequence[str]) -> List[Path]:
  copied = []
  for n in names:
    if (src / n).exists():
      assets.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(src / n, assets / n)
      copied.append(assets / n)
  return copied


def link(md: Path, png: Path, alt: str) -> str:
  rel = os.path.relpath(png, md.parent).replace(os.sep, "/")
  return f"![{alt}]({rel})"


# --------------------------------------------------------------------------
# Commands.


def shell_quote(s: str) -> str:
  """Like ``shlex.quote``, but double quotes around single-quoted Python."""
  if s and all(c.isalnum() or c in "-_.=/:,+@%" for c in s):
    return s
  if not any(c in s for c in '"$`\\!'):
    return f'"{s}"'
  return shlex.quote(s)


def join(args: Sequence[str]) -> str:
  return " ".join(shell_quote(a) for a in args)


def demo_command(meta) -> str:
  args = ["python", "benchmarks/demo.py"]
  for flag, key in (("--steps", "steps"), ("--seed", "seed"),
                    ("--adam-lr", "adam_lr"), ("--sgd-lr", "sgd_lr")):
    if key in meta:
      args += [flag, str(meta[key])]
  if "seeds" in meta:  # the demo over several seeds (--seed was one)
    args[4:4] = ["--seeds"] + [str(x) for x in meta["seeds"]]
  return join(args)


def sweep_command(data) -> str:
  meta = data["meta"]
  args = ["python", "benchmarks/sweep.py"]
  if "steps" in meta:
    args += ["--steps", str(meta["steps"])]
  if "seeds" in meta:
    args += ["--seeds"] + [str(s) for s in meta["seeds"]]
  if "adam_lr" in meta:
    args += ["--lr", str(meta["adam_lr"])]
  for row in data["rows"]:
    args += ["--config", row["config"]]
  return join(args)


# --------------------------------------------------------------------------
# Quality.


def script_state(status: Optional[str]) -> str:
  if status is None:
    return "(state not recorded)"
  if status == "clean":
    return "committed and unmodified"
  if status.startswith("??"):
    return "untracked"
  return "modified"


def by(rows, **keys):
  return [r for r in rows if all(r.get(k) == v for k, v in keys.items())]


def one(rows, **keys):
  found = by(rows, **keys)
  return found[0] if found else None


def quality_section(q, md: Path, plots: List[Path]) -> List[str]:
  meta, rows = q["meta"], q["rows"]
  methods = q["methods"]
  order = [m for m in methods if any(r["method"] == m for r in rows)]
  llqr = [m for m in order if m.startswith("llqr_")]
  out = ["## Approximation quality ρ against the exact step",
         "",
         f"Command: `{meta['command']}` (git `{meta['git']}`; `{meta['script']}` "
         f"{script_state(meta.get('script_git_status'))} in it, sha256 "
         f"`{meta.get('script_sha256', '?')[:12]}`; wall time "
         f"{fmt(meta['wall_seconds'], 0)} s, per model "
         + ", ".join(f"{k} {fmt(v, 0)} s" for k, v in meta["seconds_per_model"].items())
         + (f"; load average {fmt(meta['load_average_start'][0], 1)} at the start, "
            f"{fmt(meta['load_average_end'][0], 1)} at the end"
            if meta.get("load_average_start") else "") + ").",
         "",
         "ρ(U) = (gᵀUg)² / ((Ug)ᵀA(Ug) · gᵀA⁻¹g) on a fresh batch, with A = C + λI "
         "its damped curvature and g its gradient: the fraction of the exact damped "
         "step's quadratic-model decrease that the best-scaled step −α*·Ug "
         "achieves (1: the exact step). The mean over the fresh batches is shown.",
         ""]
  setup = [
      ("dataset", meta["dataset"]),
      ("loss", meta["loss"]),
      ("seed", meta["seed"]),
      ("batch (fit and fresh)", meta["batch"]),
      ("refits on distinct earlier batches", meta["refits"]),
      ("fresh batches ρ is averaged over", meta["fresh_batches"]),
      ("chunks per refit", meta["num_chunks"]),
      ("inner solver steps (table)", f"CG, {meta['inner_steps']}"),
      ("EMA of the fitted structures", meta["ema"]),
      ("dampings λ", ", ".join(fmt_g(d) for d in meta["dampings"])),
      ("Rényi α", meta["renyi_alpha"]),
      ("exact row: library cg_step tolerance", fmt_g(meta["exact_cg_tol"])),
  ]
  out += [table(["setting", "value"], setup), ""]
  out += [table(["model", "parameters", "architecture", "Adam steps", "Adam lr",
                 "batch loss, first step", "batch loss, mean of last 10"],
                [[m["name"], m["num_params"], m["architecture"], m["adam_steps"],
                  fmt_g(m["adam_lr"]), fmt(m["adam_first_loss"]),
                  fmt(m["adam_last10_loss"])] for m in q["models"]]), ""]
  out += ["Methods:", ""]
  out += [f"- `{m}`: {methods[m]}" for m in order]
  out += [""]

  # Headline.
  ok = [r for r in rows if r["status"] == "ok"]
  model_order = [m["name"] for m in q["models"]]
  settings = sorted({(r["model"], r["damping"], r["geometry"]) for r in ok},
                    key=lambda s: (model_order.index(s[0]), -s[1],
                                   meta["geometries"].index(s[2])))
  head_rows, wins_ideal, wins_kfac, wins_block = [], 0, 0, 0
  sizes = {m["name"]: m["num_params"] for m in q["models"]}
  for model, damping, geometry in settings:
    sel = by(ok, model=model, damping=damping, geometry=geometry)
    cands = [r for r in sel if r["method"] in llqr]
    if not cands:
      continue
    best = max(cands, key=lambda r: r["rho"])
    ideal = one(sel, method="kfac_ideal_layer")
    kfac = one(sel, method="kfac")
    stale = one(sel, method="stale_exact")
    block = one(sel, method="blockdiag_layer_fit")
    if block and best["rho"] > block["rho"]:
      wins_block += 1
    if ideal and best["rho"] > ideal["rho"]:
      wins_ideal += 1
    if kfac and best["rho"] > kfac["rho"]:
      wins_kfac += 1
    per_refit = best["curvature_products"] / best["refits"]
    head_rows.append([
        model, fmt_g(damping), geometry, best["method"].replace("llqr_", ""),
        fmt(best["rho"]), fmt(ideal and ideal["rho"]), fmt(kfac and kfac["rho"]),
        fmt(block and block["rho"]), fmt(stale and stale["rho"]),
        fmt(best["rho"] / ideal["rho"], 2) if ideal else "–",
        f"{best['curvature_products']} ({fmt(per_refit, 0)}/refit)",
        sizes[model]])
  out += ["### Headline: llqr's best structure against K-FAC", ""]
  n = len(head_rows)
  out += [f"Of the {n} (model, λ, geometry) settings with a positive definite A, "
          f"llqr's best structure (fitted on earlier batches) has a higher ρ than "
          f"the ideal K-FAC (`kfac_ideal_layer`: the exact per-layer block-diagonal "
          f"inverse of the fresh batch's own A) in {wins_ideal} of {n}; than the "
          f"same block-diagonal inverse taken from the fit batches "
          f"(`blockdiag_layer_fit`) in {wins_block} of {n}; and than K-FAC's "
          f"Kronecker factors estimated on the fit batches (`kfac`) in {wins_kfac} "
          f"of {n}. Refit cost is in curvature products (one per gradient sample), "
          f"summed over the refits; forming A densely costs one product per "
          f"parameter.", ""]
  out += [table(["model", "λ", "geometry", "best llqr", "ρ llqr", "ρ ideal K-FAC",
                 "ρ K-FAC", "ρ block-diag (fit)", "ρ stale exact", "llqr / ideal",
                 "llqr refit products", "products to form A"], head_rows), ""]

  # Full tables.
  out += ["### ρ for every method and geometry", ""]
  for model in [m["name"] for m in q["models"]]:
    for damping in meta["dampings"]:
      geoms = [g for g in meta["geometries"]
               if by(rows, model=model, damping=damping, geometry=g)]
      if not geoms:
        continue
      body = []
      for m in order:
        cells = []
        for g in geoms:
          r = one(rows, model=model, damping=damping, geometry=g, method=m)
          cells.append("–" if r is None else
                       (fmt(r["rho"]) if r["status"] == "ok" else r["status"]))
        body.append([f"`{m}`"] + cells)
      out += [f"**{model}, λ = {fmt_g(damping)}**", "",
              table(["method"] + geoms, body), ""]
  for p in plots:
    if p.name == "quality_rho.png":
      out += [link(md, p, "ρ per method and geometry"), ""]

  # Curvature facts.
  curv = q["curvature"]
  crow = []
  for c in curv:
    eig = c.get("min_eig_curvature_fresh")
    crow.append([c["model"], c["geometry"], fmt_g(c["damping"]), c["status"],
                 "–" if not eig else ", ".join(fmt_g(e, 3) for e in eig),
                 ", ".join(fmt_g(t, 3) for t in c["trace_over_p_fresh"])])
  out += ["### Curvature of the fresh batches", "",
          "`indefinite`: A = C + λI has a non-positive eigenvalue on a fresh batch, "
          "so the exact step is not a minimiser and ρ is not reported.", "",
          table(["model", "geometry", "λ", "A on fresh batches",
                 "smallest eigenvalue of C (Newton)", "tr(C)/P per fresh batch"], crow),
          ""]

  checks = q.get("checks") or []
  if checks:
    out += ["### Check: dense-product fits against `fitting.build_problem`", "",
            "The table's llqr fits use `fitting.refit` on problems whose curvature "
            "product is the dense C of each fit batch (one compilation for every "
            "geometry). Redone through the library's own `fitting.build_problem` "
            "(jvp/vjp products):", "",
            table(["model", "geometry", "λ", "structure", "ρ build_problem",
                   "ρ dense products", "absolute difference"],
                  [[c["model"], c["geometry"], fmt_g(c["damping"]), c["structure"],
                    fmt(c["rho_build_problem"], 4), fmt(c["rho_dense_products"], 4),
                    fmt_g(c["abs_difference"], 2)] for c in checks]), ""]

  comp = q.get("compute") or []
  if comp:
    groups = sorted({(r["model"], r["damping"], r["structure"]) for r in comp},
                    key=str)
    cg_wins, compared = 0, 0
    for model, damping, structure in groups:
      sel = by(comp, model=model, damping=damping, structure=structure)
      sgd = [r for r in sel if r["solver"] == "sgd"]
      if not sgd:
        continue
      top = max(sgd, key=lambda r: r["curvature_products"])
      cg = [r for r in sel if r["solver"] == "cg"
            and r["curvature_products"] <= top["curvature_products"]]
      if cg:
        compared += 1
        cg_wins += max(r["rho"] for r in cg) > top["rho"]
    out += [f"### ρ against refit compute ({meta['compute_geometry']})", "",
            f"Inner steps per block and refit: CG "
            f"{', '.join(str(s) for s in meta['cg_steps'])}; the authors' momentum "
            f"SGD {', '.join(str(s) for s in meta['sgd_steps']) or '(none)'}. "
            f"Curvature products over the {meta['refits']} refits."
            + (f" In {cg_wins} of {compared} (model, λ, structure) groups, CG with "
               f"at most as many products as SGD's largest setting reaches a higher ρ "
               f"than it." if compared else ""), ""]
    for model in [m["name"] for m in q["models"]]:
      for damping in meta["dampings"]:
        sel = by(comp, model=model, damping=damping)
        if not sel:
          continue
        body = [[r["structure"], r["solver"], r["inner_steps"],
                 r["curvature_products"], fmt(r["rho"])] for r in sel]
        out += [f"**{model}, λ = {fmt_g(damping)}**", "",
                table(["structure", "solver", "inner steps", "curvature products",
                       "ρ"], body), ""]
    for p in plots:
      if p.name == "quality_compute.png":
        out += [link(md, p, "ρ against refit compute"), ""]

  trained = q.get("trained") or []
  if trained:
    methods_t = list(dict.fromkeys(r["method"] for r in trained))
    configs = list(dict.fromkeys(r["config"] for r in trained))
    body = []
    for model in dict.fromkeys(r["model"] for r in trained):
      for config in configs:
        for damping in meta["dampings"]:
          sel = by(trained, model=model, config=config, damping=damping)
          if not sel:
            continue
          vals = {r["method"]: r["rho"] for r in sel}
          ident = vals.get("identity")
          ratio = (vals["llqr_trained"] / ident) if ident else None
          body.append([model, f"`{config}`", fmt_g(damping),
                       *[fmt(vals.get(m)) for m in methods_t],
                       fmt(ratio, 2)])
    out += ["### ρ of the preconditioner that training holds", "",
            f"`chain(llqr(**config), adam({fmt_g(meta.get('adam_lr', 0.01))}))` "
            "trained from the same initialisation on the same batches as the Adam "
            "run above; at the parameters it reached, its preconditioner "
            "(`llqr_optax.precondition(state, g)`) is scored on the fresh batches "
            "under the damped GGN, beside the identity, the chain's own Adam "
            "diagonal, K-FAC's factors from the fit batches, the exact "
            "block-diagonal inverse per layer of the fit batches' curvature, and "
            "that of the fresh batch's own (the ideal K-FAC).", "",
            table(["model", "config", "λ", *methods_t, "llqr / identity"], body), ""]
  return out


# --------------------------------------------------------------------------
# Demo and sweep.


def spread(values: Sequence[float], digits: int = 4, scale: float = 1.0,
           suffix: str = "") -> str:
  """``median [min–max]`` of numbers, as text."""
  v = sorted(scale * x for x in values)
  mid = len(v) // 2
  median = v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])
  f = lambda x: f"{fmt(float(x), digits)}{suffix}"
  return f"{f(median)} [{f(v[0])}–{f(v[-1])}]"


def demo_section(d, md: Path, plots: List[Path]) -> List[str]:
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


# --------------------------------------------------------------------------
# Cost (benchmarks/cost.py).


def cost_command(c) -> str:
  """``cost.py``'s command line: stored in its JSON, or rebuilt from its settings."""
  meta = c["meta"]
  if meta.get("command"):
    return meta["command"]
  args = ["python", "benchmarks/cost.py"]
  if meta.get("quick"):
    args.append("--quick")
  if c.get("candidates"):
    args.append("--candidates")
  args += ["--repeats", str(meta.get("repeats"))]
  for axis, flag in (("batch", "--batches"), ("width", "--widths")):
    values = [str(p[axis]) for p in c.get("refit_scaling", []) if p["axis"] == axis]
    if values:
      args += [flag, *values]
  return join(args)


def cost_section(name: str, c, md: Path, plots: List[Path]) -> List[str]:
  meta = c["meta"]
  out = [f"## Cost of llqr over Adam (`{name}.json`, {meta.get('backend', '?')})", "",
         f"Command: `{cost_command(c)}` (git `{meta.get('git', 'not recorded')}`); "
         f"devices `{meta.get('devices', '?')}`, jax {meta.get('jax', '?')}, wall time "
         f"{fmt(meta.get('wall_seconds'), 0)} s. Timing: {meta.get('timing', '–')}. "
         "Batch 128; llqr's defaults unless named. *One step*: the refit in a "
         "`lax.cond` of the compiled step (the default); *two steps*: "
         "`update(..., refit=True/False)` picked with `refit_due` (no conditional).", ""]
  body = []
  for t in c["tasks"]:
    for key, label in (("overhead", "one step"), ("overhead_static_refit", "two steps")):
      o = t.get(key)
      if o is None:
        continue
      body.append([t["task"], f"{t['params']:,}", label, fmt(o["ratio_mean"], 2),
                   f"{fmt(o['ratio_min'], 2)}–{fmt(o['ratio_max'], 2)}",
                   fmt(o["ratio_ordinary_step"], 2), fmt(o["refit_extra_ms"], 1),
                   fmt(o["refit_extra_in_adam_steps"], 0),
                   f"{fmt(o['compile_seconds']['llqr+adam'], 1)} / "
                   f"{fmt(o['compile_seconds']['adam'], 1)}"])
  for cname, o in c.get("candidates", {}).items():
    body.append([f"{c['tasks'][0]['task']}: `{cname}`", f"{c['tasks'][0]['params']:,}",
                 "two steps" if o.get("static_refit") else "one step",
                 fmt(o["ratio_mean"], 2), f"{fmt(o['ratio_min'], 2)}–{fmt(o['ratio_max'], 2)}",
                 fmt(o["ratio_ordinary_step"], 2), fmt(o["refit_extra_ms"], 1),
                 fmt(o["refit_extra_in_adam_steps"], 0),
                 f"{fmt(o['compile_seconds']['llqr+adam'], 1)} / "
                 f"{fmt(o['compile_seconds']['adam'], 1)}"])
  out += [table(["task", "params", "refit in", "llqr+adam / adam (amortised)", "range",
                 "ordinary step / adam", "refit extra (ms)", "refit extra (adam steps)",
                 "compile llqr+adam / adam (s)"], body), ""]
  structures = [k for k in c["tasks"][0]["memory"]
                if k != "params_bytes" and not k.endswith("_error")]
  out += ["State memory, as a multiple of the params' bytes:", "",
          table(["task"] + structures,
                [[t["task"]] + [fmt_g(t["memory"].get(s), 3) if t["memory"].get(s) is not None
                                else "not allowed" for s in structures]
                 for t in c["tasks"]]), ""]
  if c.get("refit_scaling"):
    out += ["Refit cost against batch size and width (MLP 40-w-w-10, one step):", "",
            table(["varied", "batch", "width", "refit extra (ms)", "adam step (ms)",
                   "refit extra (adam steps)", "llqr+adam / adam"],
                  [[p["axis"], p["batch"], p["width"], fmt(p["refit_extra_ms"], 1),
                    fmt(p["ms_step_adam_synced"], 3), fmt(p["refit_extra_in_adam_steps"], 0),
                    fmt(p["ratio_mean"], 2)] for p in c["refit_scaling"]]), ""]
  for p in plots:
    out += [link(md, p, f"cost ({meta.get('backend', '?')})"), ""]
  return out


# --------------------------------------------------------------------------
# Training (benchmarks/training.py).


def _stat(d: Optional[Dict[str, float]], digits: int = 3, scale: float = 1.0,
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
  return float(np.median([h if h is not None else math.inf
                          for h in r["steps_to_target"]]))


def ablation_section(runs: Dict[str, Dict[str, Any]], md: Path, assets: Path) -> List[str]:
  """The gains study: one table per task from ``training_ablation_<task>.json``,
  rows against their base optimizer and against Adam, Muon and the exact step."""
  if not runs:
    return []
  first = next(iter(runs.values()))["meta"]
  out = ["## The gains study: llqr's levers (`training_ablation_*.json`)", "",
         "Command: `python benchmarks/ablation.py` (one `benchmarks/training.py` "
         f"process per task; git `{first.get('git', '?')}`). Protocol as in the "
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
    out += [f"### {task['name']}", "",
            f"{task['description']}; {task['num_params']} parameters; "
            f"{task['steps']} steps, batch {task['batch_size']}, target training "
            f"loss {fmt_g(task['target_loss'])}; wall time "
            f"{t['meta']['wall_seconds'] / 60:.0f} min.", ""]
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
                   _stat(r["final_train_loss"], 4),
                   _stat(r["ratio_vs_adam_mean"], 2)])
    out += [table(["row", "tuned variant", "best lr", "steps to target",
                   "× base steps", "final train loss", "× Adam time (mean)"],
                  body), ""]
    figs.append((task, rows))
  png = ablation_plot(figs, assets / "ablation_steps.png")
  if png:
    out += [link(md, png, "steps to target over the base optimizer's, per row and task"), ""]
  return out


def batch_section(runs: Dict[str, Dict[str, Any]], md: Path, assets: Path) -> List[str]:
  """Steps to target against batch size, from ``training_batch_*.json``."""
  if not runs:
    return []
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points: Dict[str, Dict[str, Dict[int, Dict[str, Any]]]] = {}
  for t in runs.values():
    task = t["tasks"][0]
    for r in t["summary"]:
      points.setdefault(task["name"], {}).setdefault(r["optimizer"], {})[
          task["batch_size"]] = r
  out = ["## The large-batch regime: steps to target against batch size", "",
         "Command: `python benchmarks/ablation.py --batch-sweep` (a "
         "`benchmarks/training.py --batch B` process per task and batch; each "
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
  fig.tight_layout()
  path = assets / "batch_steps.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return out + [link(md, path, "steps to target against batch size"), ""]


def ablation_plot(figs, path: Path) -> Optional[Path]:
  """Median steps to target over the base's, per row (bars) and task."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = []
  for _, rows in figs:
    for r in rows:
      if base_of(r["optimizer"]) and r["optimizer"] not in names:
        names.append(r["optimizer"])
  if not names:
    return None
  fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(names) * len(figs) / 2 + 4), 5))
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
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


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
          _stat(r["final_train_loss"], 3), _stat(r["final_val_loss"], 3),
          _stat(r["final_val_acc"], 1, 100.0, "%"),
          f"{r['reached_target']}/{n}"
          + (f": {fmt(r['steps_to_target_median'], 0)}"
             if r["steps_to_target_median"] is not None else ""),
          fmt(r["seconds_to_target_median"], 1),
          _stat(r["ms_per_step_median"], 2), _stat(r["ms_per_step_mean"], 2),
          _stat(r["ratio_vs_adam_median"], 2), _stat(r["ratio_vs_adam_mean"], 2),
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


def environment_section(found: Dict[str, Dict[str, Any]]) -> List[str]:
  keys = ("platform", "cpu_model", "cpu_count", "python", "jax", "optax", "numpy",
          "backend", "devices", "git", "seed", "seeds")
  names = list(found)
  body = []
  for k in keys:
    vals = [found[n]["meta"].get(k) for n in names]
    if any(v is not None for v in vals):
      body.append([k] + ["–" if v is None else f"`{v}`" for v in vals])
  return ["## Machine, versions, seeds", "",
          table(["", *[f"{n}.json" for n in names]], body), ""]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--in", dest="src", type=Path, nargs="+",
                      default=[_ROOT / "benchmarks" / "out",
                               _ROOT / "benchmarks" / "results" / "data"],
                      help="folders with quality.json, demo.json, sweep.json, "
                           "training_*.json, cost*.json; a name found in an "
                           "earlier folder wins (default: benchmarks/out, the "
                           "scripts' output, then benchmarks/results/data, the "
                           "committed results)")
  parser.add_argument("--md", type=Path, default=_ROOT / "benchmarks" / "RESULTS.md",
                      help="the Markdown file to write")
  parser.add_argument("--assets", type=Path, default=None,
                      help="folder the plots are copied to (default: results/ "
                           "next to --md)")
  args = parser.parse_args(argv)
  assets = args.assets or args.md.parent / "results"

  found, origin = {}, {}
  for src in args.src:
    for pattern in ("quality.json", "demo.json", "sweep.json", "cost*.json",
                    "training_*.json"):
      for path in sorted(src.glob(pattern)):
        if path.stem not in found:
          found[path.stem] = json.loads(path.read_text())
          origin[path.stem] = src
  order = ["quality", "demo", "sweep"]
  found = dict(sorted(found.items(), key=lambda kv: (
      order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
  if not found:
    parser.error(f"no quality.json, demo.json, sweep.json or training_*.json "
                 f"in {args.src}")
  out = ["# Benchmark results", "",
         "Generated by `python benchmarks/results.py` from "
         + ", ".join(f"`{n}.json`" for n in found)
         + ". Do not edit by hand: rerun the commands below, then this script.", ""]
  if "quality" in found:
    out += quality_section(found["quality"], args.md,
                           copy_plots(origin["quality"], assets, PLOTS["quality"]))
  if "demo" in found:
    out += demo_section(found["demo"], args.md,
                        copy_plots(origin["demo"], assets, PLOTS["demo"]))
  if "sweep" in found:
    out += sweep_section(found["sweep"])
  for n in (n for n in found if n.startswith("cost")):
    plots = copy_plots(origin[n], assets, (f"{n}.png",))
    out += cost_section(n, found[n], args.md, plots)
  out += ablation_section({n: d for n, d in found.items()
                           if n.startswith("training_ablation_")}, args.md, assets)
  out += batch_section({n: d for n, d in found.items()
                         if n.startswith("training_batch_")}, args.md, assets)
  for n in (n for n in found if n.startswith("training_")
            and not n.startswith(("training_ablation_", "training_batch_"))):
    out += training_section(n, found[n], args.md,
                            copy_plots(origin[n], assets,
                                       found[n]["meta"].get("plots", ())))
  out += environment_section(found)
  args.md.parent.mkdir(parents=True, exist_ok=True)
  args.md.write_text("\n".join(out).rstrip() + "\n")
  print(f"wrote {args.md} (from {', '.join(found)}; plots in {assets})", flush=True)
  return args.md


if __name__ == "__main__":
  main()
