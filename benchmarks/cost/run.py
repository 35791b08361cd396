"""Cost of llqr: state memory, compile time, per-step overhead over Adam, refit scaling.

Per task (Flax linen models on MNIST-1D, batch 128 unless said otherwise):

- **memory**: llqr's state (the preconditioner and its counters) in bytes, as
  a multiple of the params' bytes, for every structure (``jax.eval_shape``,
  nothing runs);
- **compile**: seconds to lower and compile one jitted training step of
  ``chain(llqr, adam)`` and of ``adam`` alone;
- **overhead**: amortised time per step of ``chain(llqr, adam)`` over
  ``adam`` at llqr's defaults, measured side by side in one run: blocks of
  ``2 · refit_every`` steps (so every block holds the same number of refits),
  dispatched without waiting inside a block, alternating adam and llqr; the
  ratio is the median over repeats of the per-block ratios. Each step of a
  separate pass also waits for its result, which splits llqr's time into
  ordinary steps and refit steps.

And for the MNIST-1D MLP, how the **refit** step's extra cost (refit step time
minus ordinary step time) grows with the batch size and the hidden width.

Timings are medians on a shared machine: compare ratios, not absolute times.
``--quick`` runs the MLP only, with fewer repeats and no scaling sweep beyond
the default point (a few seconds plus one compilation); ``--candidates`` also
measures the overhead of cheaper llqr settings on the MLP. Writes
``cost.json`` and ``cost.png`` to ``--out`` (default ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import datasets, plotting
from benchmarks import provenance as provenance_lib
from benchmarks.cli import add_out
from benchmarks.common import train_step
from benchmarks.models import CNN, MLP, CharTransformer, ResNet1D

LOSS = "softmax_cross_entropy"
DEFAULT_REFIT_EVERY = inspect.signature(llqr_optax.scale_by_llqr).parameters[
    "refit_every"].default
STRUCTURES = ("scalar", "diagonal", "kronecker", "ekfac", "dense")
#: Other settings measured with ``--candidates`` (llqr keyword arguments): the
#: defaults before they were made cheaper (before/after), and cheaper still.
CANDIDATES = {
    "before: refit_every=50,num_chunks=8": dict(refit_every=50, num_chunks=8),
    "refit_every=400": dict(refit_every=400),
    "inner_steps=5": dict(inner_steps=5),
}


def _mlp(width: int) -> MLP:
  """MLP 40-w-w-10 (relu), the demo's layer names."""
  return MLP((width, width), head_name=None)


def tasks(quick, realistic=False):
  """``name -> (model, batch, data)``: data ``None`` is MNIST-1D; otherwise a
  ``(seed, n) -> (xs, ys)`` batch generator of ``benchmarks/tasks.py``."""
  out = {"mnist1d_mlp_40-100-100-10": (_mlp(100), 128, None)}
  if not quick:
    out["mnist1d_mlp_40-512-512-10"] = (_mlp(512), 128, None)
    out["mnist1d_cnn_conv32x2"] = (CNN(), 128, None)
  if realistic:
    # Models whose Adam step takes >= 5 ms on a 2-core CPU.
    from benchmarks import tasks as tasks_lib
    lm = tasks_lib.get_task("char_transformer")
    out["mnist1d_mlp_40-1024-1024-10_b512"] = (_mlp(1024), 512, None)
    out["mnist1d_resnet_c32"] = (ResNet1D(channels=32, blocks=2), 128, None)
    out["char_transformer_d64"] = (
        CharTransformer(lm.info["vocab"], lm.info["context"], 64, 4, 2),
        32, lm.batches)
  return out


def nbytes(tree):
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


class Runner:
  """Compiled steps, their params and state, and a ring of batches.

  ``static=True`` compiles llqr's two steps (``refit=True`` and ``False``)
  and picks one per step with ``llqr_optax.refit_due``; otherwise one step
  holds the refit in a ``lax.cond``.
  """

  def __init__(self, model, tx, uses_llqr, params, batches, refit_every=None,
               static=False):
    self.tx, self.uses_llqr, self.refit_every = tx, uses_llqr, refit_every
    self.static = static
    self.params, self.state = params, tx.init(params)
    self.batches = batches
    self.t = 0
    x, y = batches[0]
    tic = time.perf_counter()
    flags = (False, True) if static else (None,)
    step = train_step(model, tx, uses_llqr)
    self.steps = {f: jax.jit(functools.partial(step, refit=f)).lower(
        self.params, self.state, x, y).compile() for f in flags}
    self.compile_seconds = time.perf_counter() - tic

  def run(self, n, sync_each=False):
    """``n`` steps; their wall times (per step if ``sync_each``, else total)."""
    times = []
    tic = time.perf_counter()
    for _ in range(n):
      x, y = self.batches[self.t % len(self.batches)]
      flag = llqr_optax.refit_due(self.t, self.refit_every) if self.static else None
      self.params, self.state, loss = self.steps[flag](self.params, self.state, x, y)
      self.t += 1
      if sync_each:
        loss.block_until_ready()
        toc = time.perf_counter()
        times.append(toc - tic)
        tic = toc
    if not sync_each:
      jax.block_until_ready((self.params, self.state))
      times.append(time.perf_counter() - tic)
    return times

  def refit_flags(self, n):
    """Which of the next ``n`` steps refit (llqr's schedule)."""
    count = int(llqr_optax.find_state(self.state).count)
    return [llqr_optax.refit_due(c, self.refit_every) for c in range(count, count + n)]


def make_batches(data, batch, num, seed=0):
  rng = np.random.default_rng(seed)
  x, y = data["x_train"], data["y_train"]
  out = []
  for _ in range(num):
    idx = rng.choice(x.shape[0], batch, replace=batch > x.shape[0])
    out.append((jnp.asarray(x[idx]), jnp.asarray(y[idx])))
  return out


def measure(model, params, batches, llqr_kw, repeats, log, label, static=False):
  """Compile times, amortised overhead and refit/ordinary step times."""
  refit_every = llqr_kw.get("refit_every", DEFAULT_REFIT_EVERY)
  llqr_tx = optax.chain(llqr_optax.llqr(loss=LOSS, **llqr_kw), optax.adam(1e-3))
  adam = Runner(model, optax.adam(1e-3), False, params, batches)
  llqr = Runner(model, llqr_tx, True, params, batches, refit_every, static=static)
  log(f"  {label}: compiled adam in {adam.compile_seconds:.2f}s, llqr+adam in "
      f"{llqr.compile_seconds:.2f}s")
  # Past the warm-up refits (0, 1, 2, 4, …) so blocks see the steady schedule.
  adam.run(refit_every, sync_each=False)
  llqr.run(refit_every + 1, sync_each=False)
  block = 2 * refit_every
  ratios, t_adam, t_llqr = [], [], []
  for _ in range(repeats):
    a = adam.run(block)[0] / block
    b = llqr.run(block)[0] / block
    t_adam.append(a)
    t_llqr.append(b)
    ratios.append(b / a)
  # Per-step pass: waits for every step; splits refit and ordinary steps.
  flags = llqr.refit_flags(block)
  per_llqr = llqr.run(block, sync_each=True)
  per_adam = adam.run(block, sync_each=True)
  refit_times = [t for t, f in zip(per_llqr, flags) if f]
  plain_times = [t for t, f in zip(per_llqr, flags) if not f]
  med = lambda v: float(np.median(v)) * 1e3
  out = dict(
      llqr_kwargs=llqr_kw, static_refit=static,
      ratio_mean=float(np.median(ratios)), ratio_min=float(np.min(ratios)),
      ratio_max=float(np.max(ratios)),
      ms_per_step_adam=med(t_adam), ms_per_step_llqr=med(t_llqr),
      ms_ordinary_step_llqr=med(plain_times), ms_step_adam_synced=med(per_adam),
      ms_refit_step=med(refit_times) if refit_times else float("nan"),
      ratio_ordinary_step=med(plain_times) / med(per_adam),
      refit_extra_ms=(med(refit_times) - med(plain_times)) if refit_times else float("nan"),
      compile_seconds={"adam": adam.compile_seconds, "llqr+adam": llqr.compile_seconds},
      repeats=repeats, block_steps=block)
  out["refit_extra_in_adam_steps"] = out["refit_extra_ms"] / out["ms_step_adam_synced"]
  log(f"  {label}: llqr+adam / adam = {out['ratio_mean']:.2f} amortised "
      f"(range {out['ratio_min']:.2f}–{out['ratio_max']:.2f}); ordinary step "
      f"{out['ratio_ordinary_step']:.2f}×; a refit step costs "
      f"{out['refit_extra_ms']:.1f} ms more ({out['refit_extra_in_adam_steps']:.0f} "
      "adam steps)")
  return out


def memory_report(params):
  p_bytes = nbytes(params)
  out = {}
  for s in STRUCTURES:
    try:
      state = jax.eval_shape(llqr_optax.llqr(loss=LOSS, structure=s).init, params)
      out[s] = nbytes(state.preconditioner) / p_bytes
    except ValueError as e:  # dense above dense_max
      out[s] = None
      out[f"{s}_error"] = str(e).split(";")[0]
  state = jax.eval_shape(llqr_optax.llqr(loss=LOSS).init, params)
  out["default (auto)"] = nbytes(state) / p_bytes
  out["params_bytes"] = p_bytes
  return out


def plot(report, path):
  fig, axes = plotting.pyplot().subplots(2, 2, figsize=(12, 8))
  ax = axes[0, 0]
  names = [t["task"] for t in report["tasks"]]
  width = 0.8 / len(STRUCTURES)
  for i, s in enumerate(STRUCTURES):
    vals = [t["memory"][s] or 0.0 for t in report["tasks"]]
    ax.bar(np.arange(len(names)) + i * width, vals, width, label=s)
  ax.set_xticks(np.arange(len(names)) + 0.4, [n.replace("mnist1d_", "") for n in names],
                fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("llqr state / params (bytes)")
  ax.set_title("state memory per structure (0: not allowed)")
  ax.legend(fontsize=8)

  ax = axes[0, 1]
  labels, ratios, ordinary = [], [], []
  for t in report["tasks"]:
    rows = [("", t["overhead"]), (" (2 steps)", t["overhead_static_refit"])]
    rows += [(f" {k}", o) for k, o in t.get("configs", {}).items()]
    for tag, o in rows:
      if o is None:
        continue
      labels.append(t["task"].replace("mnist1d_", "") + tag)
      ratios.append(o["ratio_mean"])
      ordinary.append(o["ratio_ordinary_step"])
  for name, c in report.get("candidates", {}).items():
    labels.append(name)
    ratios.append(c["ratio_mean"])
    ordinary.append(c["ratio_ordinary_step"])
  x = np.arange(len(labels))
  ax.bar(x - 0.2, ratios, 0.4, label="amortised")
  ax.bar(x + 0.2, ordinary, 0.4, label="ordinary step")
  ax.axhline(1.15, color="k", ls="--", lw=1, label="1.15")
  ax.set_xticks(x, labels, rotation=20, fontsize=7, ha="right")
  ax.set_yscale("log")
  ax.set_ylabel("time per step / adam")
  ax.set_title("llqr+adam over adam (defaults unless named)")
  ax.legend(fontsize=8)

  for ax, key, xlabel in ((axes[1, 0], "batch", "batch size"),
                          (axes[1, 1], "width", "hidden width")):
    pts = [p for p in report["refit_scaling"] if p["axis"] == key]
    if not pts:
      ax.set_axis_off()
      continue
    xs = [p[key] for p in pts]
    ax.plot(xs, [p["refit_extra_ms"] for p in pts], "o-", label="refit extra (ms)")
    ax.plot(xs, [p["ms_step_adam_synced"] for p in pts], "s--", label="adam step (ms)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms")
    ax.set_title(f"refit cost vs {xlabel} (MLP)")
    ax.legend(fontsize=8)
  for ax in axes.flat:
    ax.grid(True, which="both", alpha=0.3)
  plotting.save(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="MLP only, 2 repeats, no scaling sweep (for tests)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved blocks per runner (default 7; 2 with --quick)")
  parser.add_argument("--batches", type=int, nargs="+", default=None,
                      help="batch sizes of the refit sweep (default 32 … 1024)")
  parser.add_argument("--widths", type=int, nargs="+", default=None,
                      help="hidden widths of the refit sweep (default 25 … 800)")
  parser.add_argument("--candidates", action="store_true",
                      help="also measure cheaper llqr settings on the MLP")
  parser.add_argument("--realistic", action="store_true",
                      help="also models whose Adam step takes >= 5 ms on this "
                           "CPU: MLP 40-1024-1024-10 at batch 512, the 1-D "
                           "ResNet at 32 channels, the char Transformer at d 64")
  parser.add_argument("--configs", nargs="*", default=[],
                      help="llqr settings (keyword arguments as Python source) "
                           "also measured on every task in the fast loop")
  parser.add_argument("--tasks", nargs="*", default=None,
                      help="measure only the tasks whose names contain one of "
                           "these strings (default: every task of the mode)")
  parser.add_argument("--one-step", choices=("yes", "no"), default="yes",
                      help="also measure the one-step lax.cond loop (default yes)")
  parser.add_argument("--no-sweep", action="store_true",
                      help="skip the refit-cost sweep over batch size and width")
  add_out(parser)
  args = parser.parse_args(argv)
  repeats = args.repeats or (2 if args.quick else 7)
  batches_sweep = args.batches or ([128] if args.quick else [32, 64, 128, 256, 512, 1024])
  widths_sweep = args.widths or ([100] if args.quick else [25, 50, 100, 200, 400, 800])

  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
  data = datasets.mnist1d()
  log(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); "
      f"{'quick' if args.quick else 'full'} mode, {repeats} repeats")

  report = dict(tasks=[], refit_scaling=[], candidates={})
  default_mlp = None
  for name, (model, batch, source) in tasks(args.quick, args.realistic).items():
    if args.tasks and not any(t in name for t in args.tasks):
      continue
    log(f"task {name}")
    if source is None:
      batches = make_batches(data, batch, 8)
    else:
      xs, ys = source(0, 8)
      batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(xs, ys)]
    params = model.init(jax.random.PRNGKey(0), batches[0][0])
    memory = memory_report(params)
    log("  memory (state/params): " + ", ".join(
        f"{k} {v:.2f}" for k, v in memory.items() if isinstance(v, float) and k != "params_bytes"))
    overhead = (measure(model, params, batches, {}, repeats, log, "defaults")
                if args.one_step == "yes" else None)
    static = measure(model, params, batches, {}, repeats, log,
                     "defaults, two compiled steps (refit=True/False)", static=True)
    configs = {}
    for cname in args.configs:
      kw = eval(f"dict({cname})", {"llqr_optax": llqr_optax})  # noqa: S307
      configs[cname] = measure(model, params, batches, kw, repeats, log,
                               f"{cname}, two compiled steps", static=True)
    report["tasks"].append(dict(
        task=name, batch=batch, params=int(sum(x.size for x in jax.tree.leaves(params))),
        memory=memory, compile_seconds=(overhead or static)["compile_seconds"],
        overhead=overhead,
        overhead_static_refit=static, configs=configs))
    if default_mlp is None and name == "mnist1d_mlp_40-100-100-10":
      default_mlp = overhead or static
      if args.candidates:
        for cname, kw in CANDIDATES.items():
          report["candidates"][cname] = measure(model, params, batches, kw, repeats,
                                                log, cname)

  log("refit cost vs batch size and width (MLP 40-w-w-10)")
  sweep = () if args.no_sweep else (("batch", batches_sweep), ("width", widths_sweep))
  for axis, values in sweep:
    for v in values:
      batch, width = (v, 100) if axis == "batch" else (128, v)
      if batch == 128 and width == 100 and default_mlp is not None:
        res = default_mlp  # the MLP task's default point, already measured
      else:
        model = _mlp(width)
        batches = make_batches(data, batch, 4)
        params = model.init(jax.random.PRNGKey(0), batches[0][0])
        res = measure(model, params, batches, {}, max(1, repeats // 3), log,
                      f"batch {batch}, width {width}")
      report["refit_scaling"].append(dict(
          axis=axis, batch=batch, width=width, refit_extra_ms=res["refit_extra_ms"],
          ms_step_adam_synced=res["ms_step_adam_synced"],
          refit_extra_in_adam_steps=res["refit_extra_in_adam_steps"],
          ratio_mean=res["ratio_mean"]))

  wall = time.perf_counter() - t0
  report["meta"] = dict(
      command=" ".join(["python", "-m", "benchmarks.cost",
                        *(argv if argv is not None else sys.argv[1:])]),
      git=provenance_lib.git("describe", "--always", "--dirty"),
      jax=jax.__version__, optax=optax.__version__, backend=jax.default_backend(),
      devices=str(jax.devices()), cpu_count=os.cpu_count(),
      python=platform.python_version(), quick=args.quick, repeats=repeats,
      wall_seconds=wall, adam_lr=1e-3,
      timing="amortised: median over repeats of (llqr block time / adam block "
             "time), blocks of 2*refit_every steps dispatched without waiting; "
             "per-step: each step waits for its result")
  args.out.mkdir(parents=True, exist_ok=True)
  png, js = args.out / "cost.png", args.out / "cost.json"
  js.write_text(json.dumps(report, indent=1, default=float) + "\n")
  plot(report, png)
  print()
  print(f"{'task':32s} {'llqr/adam':>9s} {'ordinary':>8s} {'refit ms':>8s} "
        f"{'static: llqr/adam':>17s} {'refit ms':>8s} "
        f"{'compile llqr/adam s':>20s}  state/params: " + " ".join(STRUCTURES))
  nan = dict(ratio_mean=math.nan, ratio_ordinary_step=math.nan, refit_extra_ms=math.nan)
  for t in report["tasks"]:
    st = t["overhead_static_refit"]
    o = t["overhead"] or nan
    mem = " ".join(f"{t['memory'][s]:.2f}" if t["memory"][s] is not None else "-"
                   for s in STRUCTURES)
    print(f"{t['task']:32s} {o['ratio_mean']:9.2f} {o['ratio_ordinary_step']:8.2f} "
          f"{o['refit_extra_ms']:8.1f} {st['ratio_mean']:17.2f} {st['refit_extra_ms']:8.1f} "
          f"{t['compile_seconds']['llqr+adam']:10.2f}/"
          f"{t['compile_seconds']['adam']:.2f}  {mem}")
    for cname, c in t.get("configs", {}).items():
      print(f"{'  ' + cname:32s} {'':9s} {c['ratio_ordinary_step']:8.2f} {'':8s} "
            f"{c['ratio_mean']:17.2f} {c['refit_extra_ms']:8.1f}")
  for cname, c in report["candidates"].items():
    print(f"{'MLP ' + cname:32s} {c['ratio_mean']:9.2f} {c['ratio_ordinary_step']:8.2f} "
          f"{c['refit_extra_ms']:8.1f}")
  print(f"\nwrote {png} and {js}; total {wall:.1f}s", flush=True)
  return report


if __name__ == "__main__":
  main()
