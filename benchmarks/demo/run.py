"""Adam and SGD-momentum, each alone and wrapped by llqr, on MNIST-1D (Flax linen MLP).

Run with ``make demo`` (or ``.venv/bin/python -m benchmarks.demo`` from the
repository's root). For each
seed (``--seeds``, default 0 1 2) the four optimizers start from the same
initial parameters and see the same batches, interleaved step by step so they
share the machine's load. One seed decides little here (on seed 0 Adam may
end at 0.14 and llqr+Adam at 0.001, on seed 1 the other way round), so the
table gives the median over seeds and the range [min–max], with every seed's
final loss. It writes ``demo.png`` (median training loss vs step, min–max band)
and ``demo.json`` (the table, every seed's numbers, and llqr's diagnostics at
each refit) to ``--out`` (default ``benchmarks/out``).

Timings are medians of per-step wall times (each step waits for its result),
without the first step, which compiles; "mean" is the amortised time over the
same steps, which includes llqr's periodic refits. The steps compile once and
serve every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import datasets, plotting
from benchmarks.cli import add_out, check_steps
from benchmarks.common import (BATCH, batch_indices, demo_mlp, make_eval, make_step,
                               smooth)
from benchmarks.formatting import spread


def optimizers(adam_lr, sgd_lr):
  """The contenders, in table order: each llqr variant wraps its plain peer
  with the same learning rate and llqr's defaults."""
  llqr = lambda: llqr_optax.llqr(loss="softmax_cross_entropy")
  return {
      "adam": optax.adam(adam_lr),
      "sgd_momentum": optax.sgd(sgd_lr, momentum=0.9),
      "llqr+adam": optax.chain(llqr(), optax.adam(adam_lr)),
      "llqr+sgd_momentum": optax.chain(llqr(), optax.sgd(sgd_lr, momentum=0.9)),
  }


def plot(curves, path, title):
  """Median over seeds of the smoothed loss, with the min–max band.

  Args:
    curves: ``{optimizer: [losses of seed 0, losses of seed 1, ...]}``.
    path: the PNG to write.
    title: the plot's title.
  """
  fig, ax = plotting.pyplot().subplots(figsize=(7, 4.2))
  for name, per_seed in curves.items():
    smoothed = np.stack([smooth(losses) for losses in per_seed])
    steps = np.arange(1, smoothed.shape[1] + 1)
    plotting.median_band(ax, steps, np.median(smoothed, axis=0), smoothed.min(axis=0),
                         smoothed.max(axis=0), label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (batch, smoothed)")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  plotting.save(fig, path, dpi=120)


def format_table(rows, seeds):
  """One line per optimizer: medians over seeds [min–max], and each seed's loss."""
  head = (["optimizer", "train loss: median [min–max]"]
          + [f"seed {s}" for s in seeds]
          + ["test acc", "x adam med", "x adam mean", "refits/skips"])
  body = []
  for r in rows:
    body.append(
        [r["optimizer"], spread(r["final_train_loss"])]
        + [f"{x:.4f}" for x in r["final_train_loss"]]
        + [spread(r["test_accuracy"], 1, 100, "%"),
           spread(r["ratio_vs_adam_median"], 2), spread(r["ratio_vs_adam_mean"], 2),
           r.get("refits_skips", "-")])
  widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(head), sep] + [line(b) for b in body])


def run_seed(seed, steps, names, step_fns, txs, model, data, evaluate, log_every,
             t_start):
  """Trains every optimizer on one seed; returns its per-optimizer results."""
  x_train, y_train, x_test, y_test = data
  params0 = model.init(jax.random.PRNGKey(seed), x_train[:1])
  idx = batch_indices(x_train.shape[0], steps, seed)
  runs = {n: dict(params=params0, state=txs[n].init(params0), losses=[], times=[],
                  refits=[]) for n in names}
  for t in range(steps):
    xb, yb = x_train[idx[t]], y_train[idx[t]]
    jax.block_until_ready((xb, yb))
    for name, run in runs.items():
      tic = time.perf_counter()
      run["params"], run["state"], loss = step_fns[name](run["params"], run["state"],
                                                         xb, yb)
      loss = float(loss)  # waits for the step
      run["times"].append(time.perf_counter() - tic)
      run["losses"].append(loss)
      if name.startswith("llqr") and llqr_optax.refit_due(t):
        # The refit of step t has happened: log what it left.
        run["refits"].append(llqr_optax.diagnostics(run["state"]))
    if (t + 1) % log_every == 0 or t + 1 == steps:
      cells = "  ".join(f"{n} {np.mean(r['losses'][-log_every:]):.4f}"
                        for n, r in runs.items())
      print(f"seed {seed} step {t + 1:5d}/{steps}  batch loss  {cells}  "
            f"[{time.perf_counter() - t_start:5.1f}s]", flush=True)

  out = {}
  for name, run in runs.items():
    train_loss, _ = evaluate(run["params"], x_train, y_train)
    _, test_acc = evaluate(run["params"], x_test, y_test)
    times = np.asarray(run["times"][1:]) * 1e3  # without the first step
    res = dict(final_train_loss=float(train_loss), test_accuracy=float(test_acc),
               ms_per_step_median=float(np.median(times)),
               ms_per_step_mean=float(np.mean(times)),
               first_step_ms=float(run["times"][0] * 1e3),
               finite=bool(np.all(np.isfinite(run["losses"]))),
               losses=run["losses"])
    if name.startswith("llqr"):
      res.update(diagnostics=llqr_optax.diagnostics(run["state"]),
                 at_refits=run["refits"])
    out[name] = res
  for res in out.values():
    res["ratio_vs_adam_median"] = res["ms_per_step_median"] / out["adam"]["ms_per_step_median"]
    res["ratio_vs_adam_mean"] = res["ms_per_step_mean"] / out["adam"]["ms_per_step_mean"]
  return out


def summarize(names, per_seed):
  """Per optimizer: lists over seeds, and refit/skip totals for llqr."""
  keys = ("final_train_loss", "test_accuracy", "ms_per_step_median",
          "ms_per_step_mean", "ratio_vs_adam_median", "ratio_vs_adam_mean")
  rows = []
  for name in names:
    seeds = [res[name] for res in per_seed]
    row = dict(optimizer=name, **{k: [r[k] for r in seeds] for k in keys},
               finite=all(r["finite"] for r in seeds))
    row["median_train_loss"] = statistics.median(row["final_train_loss"])
    if name.startswith("llqr"):
      d = [r["diagnostics"] for r in seeds]
      total = lambda k: int(sum(x[k] for x in d))
      row.update(refits=[int(x["refits"]) for x in d],
                 skipped_refits=total("skipped_refits"),
                 skipped_updates=total("skipped_updates"),
                 objective=[x["objective"] for x in d],
                 reduction_ratio=[x["reduction_ratio"] for x in d])
      row["refits_skips"] = (f"{row['refits'][0]} refits/seed, "
                             f"{row['skipped_refits']} skipped refits, "
                             f"{row['skipped_updates']} skipped updates")
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500,
                      help="training steps per optimizer and seed (default 1500)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="seeds of the initialisation and the batch order "
                           "(default 0 1 2)")
  add_out(parser, "folder for demo.png and demo.json")
  parser.add_argument("--adam-lr", type=float, default=1e-2,
                      help="learning rate of adam and llqr+adam (default 1e-2, "
                           "the best plain-Adam rate of 1e-3, 3e-3, 1e-2, 3e-2 "
                           "at 1000 steps)")
  parser.add_argument("--sgd-lr", type=float, default=0.05,
                      help="learning rate of the SGD-momentum pair (default 0.05)")
  parser.add_argument("--log-every", type=int, default=500,
                      help="print a progress line every N steps")
  args = parser.parse_args(argv)
  check_steps(parser, args.steps)
  if len(set(args.seeds)) != len(args.seeds):
    parser.error(f"--seeds {args.seeds} repeats a seed.")

  t_start = time.perf_counter()
  raw = datasets.mnist1d()
  data = tuple(jnp.asarray(raw[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
  print(f"MNIST-1D: {data[0].shape[0]} train, {data[2].shape[0]} test; MLP "
        f"40-100-100-10; batch {BATCH}; {args.steps} steps; seeds "
        f"{' '.join(map(str, args.seeds))}; adam lr {args.adam_lr}, sgd lr "
        f"{args.sgd_lr}; jax {jax.__version__} on {jax.default_backend()}", flush=True)

  model = demo_mlp()
  evaluate = make_eval(model)
  txs = optimizers(args.adam_lr, args.sgd_lr)
  names = list(txs)
  step_fns = {n: make_step(model, tx, n.startswith("llqr")) for n, tx in txs.items()}
  per_seed = [run_seed(seed, args.steps, names, step_fns, txs, model, data,
                       evaluate, args.log_every, t_start) for seed in args.seeds]
  rows = summarize(names, per_seed)

  print()
  print(f"Final full-train-set loss over seeds {' '.join(map(str, args.seeds))}: "
        "median [min–max], then each seed; test accuracy and time per step over "
        "Adam's (median and amortised mean), median [min–max] over seeds.")
  print(format_table(rows, args.seeds))
  print()
  print("llqr's diagnostics after every refit, all seeds: median [min–max]")
  for row in rows:
    if row["optimizer"].startswith("llqr"):
      logs = [d for res in per_seed for d in res[row["optimizer"]]["at_refits"]]
      row["at_refits"] = {k: [d[k] for d in logs]
                          for k in ("objective", "reduction_ratio")}
      print(f"{row['optimizer']}: {len(logs)} refits; objective "
            f"{spread(row['at_refits']['objective'], 3)}, reduction ratio "
            f"{spread(row['at_refits']['reduction_ratio'], 2)}")

  args.out.mkdir(parents=True, exist_ok=True)
  png, js = args.out / "demo.png", args.out / "demo.json"
  plot({n: [res[n]["losses"] for res in per_seed] for n in names}, png,
       f"MNIST-1D MLP, batch {BATCH}, median and range over seeds "
       f"{', '.join(map(str, args.seeds))}")
  wall = time.perf_counter() - t_start
  meta = dict(task="mnist1d_mlp_40-100-100-10", batch_size=BATCH,
              adam_lr=args.adam_lr, sgd_lr=args.sgd_lr,
              steps=args.steps, seeds=list(args.seeds), wall_seconds=wall,
              jax=jax.__version__, optax=optax.__version__,
              backend=jax.default_backend(), devices=str(jax.devices()),
              cpu_count=os.cpu_count(), python=platform.python_version(),
              timing="per-step wall time after block; median and mean exclude "
                     "the first (compiling) step; ratios over adam per seed")
  per_seed_out = [{n: {k: v for k, v in res[n].items() if k != "losses"}
                   for n in names} for res in per_seed]
  js.write_text(json.dumps(dict(meta=meta, rows=rows, per_seed=per_seed_out),
                           indent=2) + "\n")
  print(f"\nwrote {png} and {js}; total {wall:.1f}s", flush=True)
  return rows


if __name__ == "__main__":
  main()
