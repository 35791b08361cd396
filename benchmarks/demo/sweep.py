"""Sweeps llqr settings on the demo's task: how the defaults were chosen.

Each configuration trains the demo's MLP on MNIST-1D (same init and batches per
seed) with ``chain(llqr(**config), adam(lr))`` or plain Adam, and reports the
final full-train-set loss and test accuracy per seed, with the median over
seeds. Writes ``sweep.json`` to ``--out``.

Example::

  .venv/bin/python -m benchmarks.demo.sweep --steps 1000 --seeds 0 1 \\
      --config adam --config "damping=0.1" --config "structure='kronecker'"

A config is ``adam`` (plain Adam at ``--lr``), ``adam:RATE``, or keyword
arguments of ``llqr`` as Python source (``""`` for the defaults); ``lr=...``
inside an llqr config sets the Adam rate for that line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from benchmarks import datasets
from benchmarks.cli import add_out
from benchmarks.common import batch_indices, demo_mlp, make_eval, make_step


def parse_config(text: str, lr: float):
  if text == "adam" or text.startswith("adam:"):
    return optax.adam(float(text[5:]) if text != "adam" else lr), False
  kwargs = eval(f"dict({text})", {"llqr_optax": llqr_optax})  # noqa: S307
  lr = kwargs.pop("lr", lr)
  tx = optax.chain(llqr_optax.llqr(loss="softmax_cross_entropy", **kwargs),
                   optax.adam(lr))
  return tx, True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append", required=True)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--lr", type=float, default=1e-2, help="Adam's rate")
  add_out(parser)
  args = parser.parse_args(argv)

  data = datasets.mnist1d()
  x, y = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  xt, yt = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
  model = demo_mlp()
  evaluate = make_eval(model)
  rows = []
  for config in args.config:
    losses, accs = [], []
    for seed in args.seeds:
      tic = time.perf_counter()
      tx, uses_llqr = parse_config(config, args.lr)
      step = make_step(model, tx, uses_llqr)
      params = model.init(jax.random.PRNGKey(seed), x[:1])
      state = tx.init(params)
      for idx in batch_indices(x.shape[0], args.steps, seed):
        params, state, _ = step(params, state, x[idx], y[idx])
      loss, _ = evaluate(params, x, y)
      _, acc = evaluate(params, xt, yt)
      losses.append(float(loss))
      accs.append(float(acc))
      print(f"{config:50s} seed {seed}: train loss {losses[-1]:.4g}  test acc "
            f"{100 * accs[-1]:.1f}%  [{time.perf_counter() - tic:.0f}s]", flush=True)
    rows.append(dict(config=config, seeds=args.seeds, train_loss=losses,
                     test_accuracy=accs, median_train_loss=float(np.median(losses)),
                     median_test_accuracy=float(np.median(accs))))
  print(f"\n{'config':50s}  median train loss  median test acc")
  for r in rows:
    print(f"{r['config']:50s}  {r['median_train_loss']:17.4g}  "
          f"{100 * r['median_test_accuracy']:14.1f}%")
  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(steps=args.steps, seeds=args.seeds, adam_lr=args.lr, batch=128,
              jax=jax.__version__, optax=optax.__version__)
  (args.out / "sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
  return rows


if __name__ == "__main__":
  main()
