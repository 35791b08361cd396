"""What the benchmark scripts share: the demo's model, data order and loss,
training steps and smoothing.

The scripts' shared options are in :mod:`benchmarks.cli`, their models in
:mod:`benchmarks.models`, plots and text in :mod:`benchmarks.plotting` and
:mod:`benchmarks.formatting`.

- :func:`demo_mlp`, :data:`BATCH`, :func:`batch_indices`: the demo's Flax MLP
  on MNIST-1D and its shuffled epochs (``demo/run.py``, ``demo/long_run.py``,
  ``demo/sweep.py``).
- :func:`cross_entropy`: the classifiers' (and the language model's) loss.
- :func:`train_step`: one optimizer step of any model with an
  ``apply(params, x)``, llqr's or a plain optax one; :func:`make_step` and
  :func:`make_eval` its jitted forms for the demo's scripts.
- :func:`refit_every`: llqr's refit period, for loops that pick its two
  compiled steps (``refit_due``).
- :func:`smooth`: the bias-corrected EMA of a loss curve.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.models import MLP

#: The demo's batch size.
BATCH = 128

Params = Any
Step = Callable[..., Tuple[Params, Any, jax.Array]]


def demo_mlp(widths: Sequence[int] = (100, 100)) -> MLP:
  """The demo's MLP: 40 → 100 → 100 → 10, relu, Flax's automatic layer names
  (``Dense_0``, ``Dense_1``, ``Dense_2``)."""
  return MLP(tuple(widths), head_name=None)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels over all leading axes."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(model, tx: optax.GradientTransformation, uses_llqr: bool) -> Step:
  """``step(params, opt_state, x, y, refit=None) -> (params, opt_state, loss)``.

  Not jitted. ``loss`` is :func:`cross_entropy` of ``model.apply(params, x)``
  before the update. An llqr transform's ``update`` also gets ``apply_fn`` and
  ``targets``, and ``refit`` when it is given (a Python bool: llqr's static
  path; jit with ``static_argnames="refit"`` or bind it).
  """

  def step(params, opt_state, x, y, refit: Optional[bool] = None):
    apply_fn = lambda p: model.apply(p, x)
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply_fn(p), y))(params)
    extra = dict(apply_fn=apply_fn, targets=y) if uses_llqr else {}
    if refit is not None:
      extra["refit"] = refit
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def refit_every(llqr_kwargs: Optional[Dict[str, Any]] = None) -> int:
  """The refit period of ``llqr(**llqr_kwargs)``: its ``refit_every``, else
  ``scale_by_llqr``'s default."""
  import inspect

  import llqr_optax  # here: a harness whose llqr does not import still runs
  default = inspect.signature(llqr_optax.scale_by_llqr).parameters["refit_every"].default
  return int((llqr_kwargs or {}).get("refit_every", default))


def make_step(model, tx: optax.GradientTransformation, uses_llqr: bool) -> Step:
  """:func:`train_step`, jitted (llqr's refit in its ``lax.cond``)."""
  return jax.jit(train_step(model, tx, uses_llqr))


def make_eval(model):
  """``evaluate(params, x, y) -> (mean cross-entropy, accuracy)``, jitted."""

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply(params, x)
    return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

  return evaluate


def batch_indices(num_train: int, steps: int, seed: int) -> np.ndarray:
  """Shuffled epochs of full batches, concatenated: ``(steps, BATCH)`` indices."""
  rng = np.random.default_rng(seed)
  per_epoch = num_train // BATCH
  epochs = -(-steps // per_epoch)
  idx = [rng.permutation(num_train)[:per_epoch * BATCH].reshape(per_epoch, BATCH)
         for _ in range(epochs)]
  return np.concatenate(idx)[:steps]


def smooth(values: Sequence[float], beta: float = 0.98) -> np.ndarray:
  """Bias-corrected EMA; non-finite values propagate as NaN from then on."""
  out, avg = np.empty(len(values)), 0.0
  for t, v in enumerate(values, 1):
    avg = beta * avg + (1 - beta) * v
    out[t - 1] = avg / (1 - beta ** t)
  return out
