"""Long runs: llqr+Adam for thousands of steps on MNIST-1D, at two learning rates.

Trains the demo's Flax linen MLP (40-100-100-10, relu, batch 128) with
``chain(llqr(loss="softmax_cross_entropy"), adam(lr))`` at llqr's defaults,
and plain Adam at the same rate for reference, at the default rate (1e-2, the
demo's) and an aggressive one (1e-1). Every step checks, inside the compiled
step, that params and the whole optimizer state are finite; the run records
the first step where they are not (there should be none), llqr's counters
(refits, skipped refits, skipped updates), its damping, objective ``J`` after
each refit and reduction ratio, and the range of the fitted preconditioner's
entries.

Run ``.venv/bin/python -m benchmarks.demo.long_run`` (10,000 steps) or with
``--steps 2000``. Writes ``long_run.json`` and ``long_run.png`` to ``--out``
(default ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import datasets, plotting
from benchmarks.cli import add_out
from benchmarks.common import (BATCH, batch_indices, cross_entropy, demo_mlp, smooth,
                               train_step)


def all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves))


def make_step(model, tx, uses_llqr):
  """The demo's step, jitted, returning what the run logs besides the loss:
  finiteness of params and state, max |θ|, and llqr's counters and the range
  of its preconditioner's entries."""
  base = train_step(model, tx, uses_llqr)

  @jax.jit
  def step(params, opt_state, x, y):
    params, opt_state, loss = base(params, opt_state, x, y)
    info = dict(loss=loss, finite=all_finite((params, opt_state)),
                param_max=jnp.max(jnp.stack([jnp.max(jnp.abs(p))
                                             for p in jax.tree.leaves(params)])))
    if uses_llqr:
      s = llqr_optax.find_state(opt_state)
      pre = jax.tree.leaves(s.preconditioner)
      info.update(
          refits=s.refits, skipped_refits=s.skipped_refits,
          skipped_updates=s.skipped_updates, damping=s.damping,
          objective=s.objective, reduction_ratio=s.reduction_ratio,
          pre_min=jnp.min(jnp.stack([jnp.min(x) for x in pre])),
          pre_max=jnp.max(jnp.stack([jnp.max(x) for x in pre])),
          pre_negative=sum(jnp.sum(x < 0) for x in pre) / sum(x.size for x in pre))
    return params, opt_state, info

  return step


def run_one(name, tx, uses_llqr, model, params0, data, idx, args, t_start):
  step = make_step(model, tx, uses_llqr)
  evaluate = jax.jit(lambda p, x, y: (cross_entropy(model.apply(p, x), y),
                                      jnp.mean(jnp.argmax(model.apply(p, x), -1) == y)))
  params, state = params0, tx.init(params0)
  x_train, y_train = data["x_train"], data["y_train"]
  losses, evals, refit_log = [], [], []
  first_nonfinite = None
  last_refits = 0
  summary = dict(name=name, llqr=uses_llqr)
  for t in range(args.steps):
    params, state, info = step(params, state, x_train[idx[t]], y_train[idx[t]])
    info = jax.device_get(info)
    losses.append(float(info["loss"]))
    if not info["finite"] and first_nonfinite is None:
      first_nonfinite = t
    if uses_llqr and int(info["refits"]) != last_refits:
      last_refits = int(info["refits"])
      refit_log.append(dict(step=t, objective=float(info["objective"]),
                            reduction_ratio=float(info["reduction_ratio"]),
                            pre_min=float(info["pre_min"]), pre_max=float(info["pre_max"]),
                            pre_negative=float(info["pre_negative"])))
    if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
      train_loss, _ = evaluate(params, x_train, y_train)
      test_loss, test_acc = evaluate(params, data["x_test"], data["y_test"])
      evals.append(dict(step=t + 1, train_loss=float(train_loss),
                        test_loss=float(test_loss), test_acc=float(test_acc),
                        param_max=float(info["param_max"])))
    if (t + 1) % args.log_every == 0 or t + 1 == args.steps:
      cells = f"batch loss {np.mean(losses[-args.log_every:]):.4g}"
      if uses_llqr:
        cells += (f"  refits {int(info['refits'])} skipped {int(info['skipped_refits'])}"
                  f"/{int(info['skipped_updates'])}  λ {float(info['damping']):.3g}"
                  f"  U in [{float(info['pre_min']):.3g}, {float(info['pre_max']):.3g}]")
      print(f"{name:>18s} step {t + 1:6d}/{args.steps}  {cells}  finite "
            f"{first_nonfinite is None}  [{time.perf_counter() - t_start:6.1f}s]",
            flush=True)
  summary.update(
      final_train_loss=evals[-1]["train_loss"], final_test_acc=evals[-1]["test_acc"],
      best_train_loss=min(e["train_loss"] for e in evals),
      first_nonfinite_step=first_nonfinite, always_finite=first_nonfinite is None,
      max_abs_param=max(e["param_max"] for e in evals),
      nan_batch_losses=int(np.sum(~np.isfinite(losses))))
  if uses_llqr:
    summary.update(
        refits=int(info["refits"]), skipped_refits=int(info["skipped_refits"]),
        skipped_updates=int(info["skipped_updates"]), damping=float(info["damping"]),
        refits_with_objective_nonnegative=sum(r["objective"] >= 0 for r in refit_log),
        preconditioner_min=min(r["pre_min"] for r in refit_log),
        preconditioner_max=max(r["pre_max"] for r in refit_log),
        max_fraction_negative=max(r["pre_negative"] for r in refit_log))
  return summary, dict(losses=losses, evals=evals, refits=refit_log)


def plot(curves, path, title):
  fig, axes = plotting.pyplot().subplots(1, 2, figsize=(12, 4.2))
  for name, c in curves.items():
    losses = np.asarray(c["losses"])
    finite = np.where(np.isfinite(losses), losses, np.nan)
    axes[0].plot(np.arange(1, len(losses) + 1), smooth(np.nan_to_num(finite, nan=0.0)),
                 label=name)
    if c["refits"]:
      steps = [r["step"] for r in c["refits"]]
      axes[1].plot(steps, [r["pre_max"] for r in c["refits"]], label=f"{name} max")
      axes[1].plot(steps, [r["pre_min"] for r in c["refits"]], "--", label=f"{name} min")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("training loss (batch, smoothed)")
  axes[0].set_title(title)
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("preconditioner entries after each refit")
  axes[1].set_yscale("symlog", linthresh=1e-3)
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  plotting.save(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10_000,
                      help="training steps per run (default 10000)")
  parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-1],
                      help="Adam learning rates: the default and an aggressive one")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-adam", action="store_true",
                      help="skip the plain-Adam reference runs")
  parser.add_argument("--eval-every", type=int, default=500)
  parser.add_argument("--log-every", type=int, default=1000)
  add_out(parser)
  args = parser.parse_args(argv)

  t_start = time.perf_counter()
  raw = datasets.mnist1d()
  data = {k: jnp.asarray(v) for k, v in raw.items()}
  model = demo_mlp()
  params0 = model.init(jax.random.PRNGKey(args.seed), data["x_train"][:1])
  idx = batch_indices(data["x_train"].shape[0], args.steps, args.seed)
  print(f"MNIST-1D MLP 40-100-100-10, batch {BATCH}, {args.steps} steps, lrs "
        f"{args.lrs}, seed {args.seed}; jax {jax.__version__} on "
        f"{jax.default_backend()}", flush=True)

  summaries, curves = [], {}
  for lr in args.lrs:
    configs = [(f"llqr+adam {lr:g}",
                optax.chain(llqr_optax.llqr(loss="softmax_cross_entropy"),
                            optax.adam(lr)), True)]
    if not args.no_adam:
      configs.append((f"adam {lr:g}", optax.adam(lr), False))
    for name, tx, uses_llqr in configs:
      summary, curve = run_one(name, tx, uses_llqr, model, params0, data, idx,
                               args, t_start)
      summary["lr"] = lr
      summaries.append(summary)
      curves[name] = curve

  print()
  for s in summaries:
    line = (f"{s['name']:>18s}: final train loss {s['final_train_loss']:.4g} "
            f"(best {s['best_train_loss']:.4g}), test acc {100 * s['final_test_acc']:.1f}%, "
            f"always finite {s['always_finite']}, max |θ| {s['max_abs_param']:.3g}")
    if s["llqr"]:
      line += (f"; refits {s['refits']}, skipped refits {s['skipped_refits']}, "
               f"skipped updates {s['skipped_updates']}, J >= 0 after "
               f"{s['refits_with_objective_nonnegative']} refits, U entries in "
               f"[{s['preconditioner_min']:.3g}, {s['preconditioner_max']:.3g}], "
               f"up to {100 * s['max_fraction_negative']:.2f}% negative")
    print(line)

  args.out.mkdir(parents=True, exist_ok=True)
  png, js = args.out / "long_run.png", args.out / "long_run.json"
  plot(curves, png, f"MNIST-1D MLP, batch {BATCH}, {args.steps} steps")
  wall = time.perf_counter() - t_start
  meta = dict(task="mnist1d_mlp_40-100-100-10", batch_size=BATCH, steps=args.steps,
              lrs=args.lrs, seed=args.seed, wall_seconds=wall, jax=jax.__version__,
              optax=optax.__version__, backend=jax.default_backend(),
              cpu_count=os.cpu_count(), python=platform.python_version(),
              llqr="llqr(loss='softmax_cross_entropy') at its defaults")
  thin = {n: dict(losses=c["losses"][::10], evals=c["evals"], refits=c["refits"])
          for n, c in curves.items()}
  js.write_text(json.dumps(dict(meta=meta, runs=summaries, curves=thin), indent=1) + "\n")
  print(f"\nwrote {png} and {js}; total {wall:.1f}s", flush=True)
  return summaries


if __name__ == "__main__":
  main()
