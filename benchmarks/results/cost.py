"""``RESULTS.md``'s section of the cost study (``cost*.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from benchmarks.formatting import fmt, fmt_g, link, shell_join, table


def cost_command(c) -> str:
  """``cost/run.py``'s command line: stored in its JSON, or rebuilt from its settings."""
  meta = c["meta"]
  if meta.get("command"):
    return meta["command"]
  args = ["python", "-m", "benchmarks.cost"]
  if meta.get("quick"):
    args.append("--quick")
  if c.get("candidates"):
    args.append("--candidates")
  args += ["--repeats", str(meta.get("repeats"))]
  for axis, flag in (("batch", "--batches"), ("width", "--widths")):
    values = [str(p[axis]) for p in c.get("refit_scaling", []) if p["axis"] == axis]
    if values:
      args += [flag, *values]
  return shell_join(args)


def cost_section(name: str, c, md: Path, plots: List[Path]) -> List[str]:
  """Overhead over Adam per task, state memory, refit scaling, the plot."""
  meta = c["meta"]
  out = [f"## Cost of llqr over Adam (`{name}.json`, {meta.get('backend', '?')})", "",
         f"Command: `{cost_command(c)}` (git `{meta.get('git', 'not recorded')}`); "
         f"devices `{meta.get('devices', '?')}`, jax {meta.get('jax', '?')}, wall time "
         f"{fmt(meta.get('wall_seconds'), 0)} s. Timing: {meta.get('timing', '–')}. "
         "Batch 128 unless the task's name says otherwise (`_b512`); llqr's "
         "defaults unless named. *One step*: the refit in a "
         "`lax.cond` of the compiled step (a plain `jax.jit` loop); *two steps* "
         "(`compile_step`, the README's first loop): "
         "`update(..., refit=True/False)` picked with `refit_due` (no conditional).", ""]
  body = []
  for t in c["tasks"]:
    rows = [("one step", t.get("overhead")), ("two steps", t.get("overhead_static_refit"))]
    rows += [(f"two steps, `{k}`", o) for k, o in t.get("configs", {}).items()]
    for label, o in rows:
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
