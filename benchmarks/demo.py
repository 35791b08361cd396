"""Adam and SGD-momentum, each alone and wrapped by llqr, on MNIST-1D (Flax linen MLP).

Run with ``make demo`` (or ``.venv/bin/python benchmarks/demo.py``). The four
optimizers start from the same initial parameters and see the same batches,
interleaved step by step so they share the machine's load. It prints a table
and writes ``demo.png`` (training loss vs step) and ``demo.json`` (the table)
to ``--out`` (default ``benchmarks/out``).

Timings are medians of per-step wall times (each step waits for its result),
without the first step, which compiles; "mean" is the amortised time over the
same steps, which includes llqr's periodic refits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `python benchmarks/demo.py` from anywhere
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

import llqr_optax  # noqa: E402
from benchmarks import datasets  # noqa: E402

BATCH = 128


class MLP(nn.Module):
  """40 → 100 → 100 → 10, relu."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(100)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


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


def loss_fn(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(model, tx, uses_llqr):
  """A jitted training step; llqr's gets the model function and targets."""

  @jax.jit
  def step(params, opt_state, x, y):
    apply_fn = lambda p: model.apply(p, x)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p), y))(params)
    extra = dict(apply_fn=apply_fn, targets=y) if uses_llqr else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_eval(model):
  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply(params, x)
    return loss_fn(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)
  return evaluate


def batch_indices(num_train, steps, seed):
  """Shuffled epochs of full batches, concatenated: (steps, BATCH) indices."""
  rng = np.random.default_rng(seed)
  per_epoch = num_train // BATCH
  epochs = -(-steps // per_epoch)
  idx = [rng.permutation(num_train)[:per_epoch * BATCH].reshape(per_epoch, BATCH)
         for _ in range(epochs)]
  return np.concatenate(idx)[:steps]


def smooth(values, beta=0.98):
  """Bias-corrected exponential moving average."""
  out, avg = [], 0.0
  for t, v in enumerate(values, 1):
    avg = beta * avg + (1 - beta) * v
    out.append(avg / (1 - beta ** t))
  return np.asarray(out)


def plot(curves, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, losses in curves.items():
    ax.plot(np.arange(1, len(losses) + 1), smooth(losses), label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (batch, smoothed)")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(rows):
  head = ["optimizer", "train loss", "test acc", "ms/step med", "ms/step mean",
          "x adam med", "x adam mean", "refits/skips"]
  body = [[r["optimizer"], f"{r['final_train_loss']:.4f}",
           f"{100 * r['test_accuracy']:.1f}%", f"{r['ms_per_step_median']:.2f}",
           f"{r['ms_per_step_mean']:.2f}", f"{r['ratio_vs_adam_median']:.2f}",
           f"{r['ratio_vs_adam_mean']:.2f}", r.get("refits_skips", "-")]
          for r in rows]
  widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(head), sep] + [line(b) for b in body])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500,
                      help="training steps per optimizer (default 1500)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the initialisation and the batch order")
  parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "out",
                      help="folder for demo.png and demo.json")
  parser.add_argument("--adam-lr", type=float, default=1e-2,
                      help="learning rate of adam and llqr+adam (default 1e-2, "
                           "the best plain-Adam rate of 1e-3, 3e-3, 1e-2, 3e-2 "
                           "at 1000 steps)")
  parser.add_argument("--sgd-lr", type=float, default=0.05,
                      help="learning rate of the SGD-momentum pair (default 0.05)")
  parser.add_argument("--log-every", type=int, default=100,
                      help="print a progress line every N steps")
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error("--steps must be at least 2 (the first step compiles).")

  t_start = time.perf_counter()
  data = datasets.mnist1d()
  x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
  print(f"MNIST-1D: {x_train.shape[0]} train, {x_test.shape[0]} test; MLP "
        f"40-100-100-10; batch {BATCH}; {args.steps} steps; seed {args.seed}; "
        f"adam lr {args.adam_lr}, sgd lr {args.sgd_lr}; "
        f"jax {jax.__version__} on {jax.default_backend()}", flush=True)

  model = MLP()
  params0 = model.init(jax.random.PRNGKey(args.seed), x_train[:1])
  idx = batch_indices(x_train.shape[0], args.steps, args.seed)
  evaluate = make_eval(model)

  runs = {}
  for name, tx in optimizers(args.adam_lr, args.sgd_lr).items():
    runs[name] = dict(step=make_step(model, tx, name.startswith("llqr")),
                      params=params0, state=tx.init(params0), losses=[], times=[])

  for t in range(args.steps):
    xb, yb = x_train[idx[t]], y_train[idx[t]]
    jax.block_until_ready((xb, yb))
    for run in runs.values():
      tic = time.perf_counter()
      run["params"], run["state"], loss = run["step"](run["params"], run["state"],
                                                      xb, yb)
      loss = float(loss)  # waits for the step
      run["times"].append(time.perf_counter() - tic)
      run["losses"].append(loss)
    if (t + 1) % args.log_every == 0 or t == 0 or t + 1 == args.steps:
      cells = "  ".join(f"{n} {np.mean(r['losses'][-args.log_every:]):.4f}"
                        for n, r in runs.items())
      print(f"step {t + 1:5d}/{args.steps}  batch loss  {cells}  "
            f"[{time.perf_counter() - t_start:5.1f}s]", flush=True)

  rows = []
  for name, run in runs.items():
    train_loss, _ = evaluate(run["params"], x_train, y_train)
    _, test_acc = evaluate(run["params"], x_test, y_test)
    times = np.asarray(run["times"][1:]) * 1e3  # without the compile step
    row = dict(optimizer=name, final_train_loss=float(train_loss),
               test_accuracy=float(test_acc),
               ms_per_step_median=float(np.median(times)),
               ms_per_step_mean=float(np.mean(times)),
               compile_step_ms=float(run["times"][0] * 1e3),
               finite=bool(np.all(np.isfinite(run["losses"]))))
    if name.startswith("llqr"):
      s = llqr_optax.find_state(run["state"])
      row.update(refits=int(s.refits), skipped_refits=int(s.skipped_refits),
                 skipped_updates=int(s.skipped_updates),
                 damping=float(s.damping), objective=float(s.objective),
                 reduction_ratio=float(s.reduction_ratio))
      row["refits_skips"] = (f"{row['refits']} refits, {row['skipped_refits']} "
                             f"skipped refits, {row['skipped_updates']} skipped "
                             "updates")
    rows.append(row)
  adam = rows[0]
  for row in rows:
    row["ratio_vs_adam_median"] = row["ms_per_step_median"] / adam["ms_per_step_median"]
    row["ratio_vs_adam_mean"] = row["ms_per_step_mean"] / adam["ms_per_step_mean"]

  wall = time.perf_counter() - t_start
  print()
  print(format_table(rows))
  for row in rows:
    if row["optimizer"].startswith("llqr"):
      print(f"{row['optimizer']} state: damping {row['damping']:.3g}, objective "
            f"{row['objective']:.4g}, last reduction ratio "
            f"{row['reduction_ratio']:.3g}")

  args.out.mkdir(parents=True, exist_ok=True)
  png, js = args.out / "demo.png", args.out / "demo.json"
  plot({n: r["losses"] for n, r in runs.items()}, png,
       f"MNIST-1D MLP, batch {BATCH}, seed {args.seed}")
  wall = time.perf_counter() - t_start
  meta = dict(task="mnist1d_mlp_40-100-100-10", batch_size=BATCH,
              adam_lr=args.adam_lr, sgd_lr=args.sgd_lr,
              steps=args.steps, seed=args.seed, wall_seconds=wall,
              jax=jax.__version__, optax=optax.__version__,
              backend=jax.default_backend(), devices=str(jax.devices()),
              cpu_count=os.cpu_count(), python=platform.python_version(),
              timing="per-step wall time after block; median and mean exclude "
                     "the first (compiling) step")
  js.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
  print(f"\nwrote {png} and {js}; total {wall:.1f}s", flush=True)
  return rows


if __name__ == "__main__":
  main()
