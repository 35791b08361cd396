"""Safe fits: llqr before a base optimizer never trains worse than the base.

The sweep of issue 21: the MNIST-1D deep autoencoder of
:func:`benchmarks.tasks.mnist1d_autoencoder` (squared error, batch 128, 800
steps, seed 0), trained by the base alone and by

    chain(llqr(loss="squared_error", structure="kronecker", damping=D,
               num_chunks=16, refit_every=10, inner_steps=5, ema=0.5,
               normalize=True), base(lr))

at every rate of the grid and every damping ``D``. A row reports the final
training loss (on the whole training set, as ``Task.evaluate(params,
"train")``), its ratio over the base's at the same rate, and llqr's counters
at the end (refits, refits whose fitted ``U`` the acceptance check rejected,
skipped refits and updates). Before the fix of issue 21 the Kronecker rows
ended at 9.6-78 where Adam reached 0.025-0.084.

Each configuration compiles once (the whole run is one ``lax.scan``, the rate
a traced argument, llqr's refit in its ``lax.cond``), then runs at every
rate. Writes ``safe_sweep[_TAG].json`` and ``.png`` (loss curves) to
``--out``::

  .venv/bin/python -m benchmarks.training.safe_sweep                  # the issue's sweep
  .venv/bin/python -m benchmarks.training.safe_sweep --base sgd_momentum --lrs 0.01 0.03
  .venv/bin/python -m benchmarks.training.safe_sweep --task mnist1d_resnet --structure auto \\
      --dampings 1.0 --llqr "" --lrs 0.01 --steps 500          # the defaults
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import tasks as tasks_lib
from benchmarks.cli import add_out
from benchmarks.plotting import pyplot, save

#: The issue's llqr configuration (the damping is swept apart).
ISSUE_LLQR = ("structure='kronecker', num_chunks=16, refit_every=10, "
              "inner_steps=5, ema=0.5, normalize=True")
#: The counters of the llqr state reported per run (those the state has).
COUNTERS = ("refits", "rejected_refits", "guard_trips", "skipped_refits",
            "skipped_updates")
BASES = {"adam": optax.adam,
         "sgd_momentum": lambda lr: optax.sgd(lr, momentum=0.9)}


def make_run(task: tasks_lib.Task, base: str, llqr_kwargs):
  """``run(params, lr, xs, ys) -> (params, losses, counters)``, jitted: the
  whole training run as one scan (``llqr_kwargs=None``: the base alone)."""

  def optimizer(lr):
    if llqr_kwargs is None:
      return BASES[base](lr)
    return optax.chain(llqr_optax.llqr(loss=task.loss, **llqr_kwargs), BASES[base](lr))

  @jax.jit
  def run(params, lr, xs, ys):
    tx = optimizer(lr)

    def body(carry, batch):
      params, state = carry
      x, y = batch
      apply_fn = lambda p: task.apply(p, x)
      loss, grads = jax.value_and_grad(lambda p: task.loss_fn(p, x, y))(params)
      extra = {} if llqr_kwargs is None else dict(apply_fn=apply_fn, targets=y)
      updates, state = tx.update(grads, state, params, **extra)
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
    counters = {}
    if llqr_kwargs is not None:
      found = llqr_optax.find_state(state)
      counters = {n: getattr(found, n) for n in COUNTERS if hasattr(found, n)}
    return params, losses, counters

  return run


def parse_llqr(text: str) -> Dict[str, Any]:
  """llqr keyword arguments written as Python source (``""``: none)."""
  return eval(f"dict({text})", {})  # noqa: S307 - a command-line option


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="mnist1d_autoencoder", choices=tasks_lib.TASK_NAMES)
  parser.add_argument("--base", default="adam", choices=list(BASES))
  parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
  parser.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.01])
  parser.add_argument("--llqr", default=ISSUE_LLQR,
                      help="llqr's other keyword arguments, as Python source")
  parser.add_argument("--steps", type=int, default=800)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tag", default="", help="suffix of the output files")
  add_out(parser)
  args = parser.parse_args(argv)

  task = tasks_lib.get_task(args.task, batch=args.batch)
  xs, ys = (jnp.asarray(a) for a in task.batches(args.seed, args.steps))
  params0 = task.init(jax.random.PRNGKey(args.seed))
  initial = task.evaluate(params0, "train")[0]
  configs = [("base", None)] + [
      (f"llqr[damping={d:g}]", {**parse_llqr(args.llqr), "damping": d})
      for d in args.dampings]
  rows, curves = [], {}
  print(f"{task.name}: {task.num_params} params, batch {args.batch}, "
        f"{args.steps} steps, base {args.base}; initial train loss {initial:.4f}",
        flush=True)
  for name, kwargs in configs:
    run = make_run(task, args.base, kwargs)
    for lr in args.lrs:
      tic = time.perf_counter()
      params, losses, counters = run(params0, jnp.float32(lr), xs, ys)
      final = task.evaluate(params, "train")[0]
      losses = np.asarray(losses)
      row = dict(config=name, llqr=kwargs, lr=lr, final_train_loss=final,
                 last_batch_losses=float(np.mean(losses[-50:])),
                 max_batch_loss=float(np.nanmax(losses)),
                 seconds=time.perf_counter() - tic,
                 **{k: int(v) for k, v in counters.items()})
      rows.append(row)
      curves[f"{name}@{lr:g}"] = losses.tolist()
      print(f"  {name:>22} lr {lr:<7g} final {final:9.4f}  "
            + " ".join(f"{k} {v}" for k, v in row.items() if k in COUNTERS)
            + f"  ({row['seconds']:.0f} s)", flush=True)
  base = {r["lr"]: r["final_train_loss"] for r in rows if r["config"] == "base"}
  for r in rows:
    r["ratio_over_base"] = r["final_train_loss"] / base[r["lr"]]
  print_table(rows, args.base)
  write(args, task, rows, curves, initial)


def print_table(rows, base_name: str) -> None:
  """Final training loss per rate, and each llqr row's ratio over the base's."""
  names = list(dict.fromkeys(r["config"] for r in rows))
  print(f"\nfinal training loss (ratio over {base_name} at the same rate)")
  print("| lr | " + " | ".join(n.replace("base", base_name) for n in names) + " |")
  print("|---" * (len(names) + 1) + "|")
  for lr in dict.fromkeys(r["lr"] for r in rows):
    cells = []
    for n in names:
      r = next(r for r in rows if r["config"] == n and r["lr"] == lr)
      cell = f"{r['final_train_loss']:.4f}"
      if n != "base":
        cell += f" ({r['ratio_over_base']:.2f}x, {r.get('rejected_refits', '-')}"
        cell += f"/{r['refits']} rejected)"
      cells.append(cell)
    print(f"| {lr:g} | " + " | ".join(cells) + " |")
  worst = max((r["ratio_over_base"] for r in rows if r["config"] != "base"), default=1.0)
  print(f"worst ratio over {base_name}: {worst:.2f}x")


def write(args, task, rows, curves, initial) -> None:
  stem = "safe_sweep" + (f"_{args.tag}" if args.tag else "")
  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(task=task.name, base=args.base, steps=args.steps, batch=args.batch,
              seed=args.seed, llqr=args.llqr, initial_train_loss=initial,
              jax=jax.__version__, optax=optax.__version__)
  (args.out / f"{stem}.json").write_text(json.dumps(
      dict(meta=meta, rows=rows, curves=curves), indent=1))
  plt = pyplot()
  lrs = list(dict.fromkeys(r["lr"] for r in rows))
  fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.2), squeeze=False)
  for ax, lr in zip(axes[0], lrs):
    for key, losses in curves.items():
      if key.endswith(f"@{lr:g}"):
        ax.plot(losses, lw=0.8, label=key.split("@")[0].replace("base", args.base))
    ax.set_yscale("log")
    ax.set_title(f"lr {lr:g}")
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("batch loss")
  axes[0][-1].legend(fontsize=7)
  save(fig, args.out / f"{stem}.png")
  print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
  main()
