"""No divergence where the base trains (issue 21).

Two small problems (a tanh MLP classifier, softmax cross-entropy, and a tanh
autoencoder, squared error), minibatches of 32 from a fixed set of 256
examples, 60 steps. For each base (Adam, SGD with momentum 0.9) a grid of
three rates, all of which the base alone trains with (its final loss on the
whole set below the initial one). Then ``chain(llqr(structure=s, normalize=n,
refit_every=10), base(rate))`` for every structure ``s`` and ``n`` in
``{False, True}``: its final loss stays within 1.5× the base's at the same
rate.

One compiled program per (problem, base, structure, normalize) runs the
three rates one after the other (the rate is an argument of the compiled
program, not a constant in it), with XLA's optimisations off. Compiling is
nearly all of a test's time; a ``vmap`` over the rates would compile once
too, but traces twice the program (and turns llqr's refit conditional into
both branches at every step).

The autoencoder case of the issue (the MNIST-1D deep autoencoder, Kronecker
``U`` at damping 0.1 and 0.01, 16 chunks, refit every 10 steps, 5 PCG steps,
``ema=0.5``, ``normalize=True``, before Adam), whose final loss went to
thousands at rates from 1e-2 before the guard, runs in a small version (the
quick task: 40-16-4-16-40, batch 32) in
:func:`test_the_deep_autoencoder_does_not_diverge`;
``python -m benchmarks.training.safe_sweep`` runs the full one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llqr_optax
from helpers import STRUCTURES, mlp, most_optimizations_disabled

STEPS, BATCH, EXAMPLES = 60, 32, 256
#: Each base's rates (all train the base alone on both problems).
BASES = {"adam": (optax.adam, (1e-2, 3e-2, 1e-1)),
         "sgd_momentum": (lambda lr: optax.sgd(lr, momentum=0.9), (3e-2, 1e-1, 3e-1))}
MAX_RATIO = 1.5


def _xent(out, y):
  return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def _half_mse(out, y):
  return 0.5 * jnp.mean((out - y) ** 2)


@functools.lru_cache(maxsize=None)
def problem(name):
  """``(params, x, y, xs, ys, loss name, loss fn)``: the whole set and the
  minibatches of every step."""
  k = jax.random.split(jax.random.key(0 if name == "classifier" else 1), 6)
  if name == "classifier":
    sizes, loss, fn = (6, 8, 3), "softmax_cross_entropy", _xent
    x = jax.random.normal(k[0], (EXAMPLES, 6))
    logits = x @ jax.random.normal(k[1], (6, 3))
    y = jnp.argmax(logits + 0.5 * jax.random.normal(k[2], logits.shape), -1)
  else:
    sizes, loss, fn = (8, 3, 8), "squared_error", _half_mse
    z = jax.random.normal(k[0], (EXAMPLES, 2))
    x = jnp.tanh(z @ jax.random.normal(k[1], (2, 8)))
    x = x + 0.1 * jax.random.normal(k[2], x.shape)
    y = x
  params = {f"l{i}": {"w": jax.random.normal(k[3 + i], (a, b)) / np.sqrt(a),
                      "b": jnp.zeros(b)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  rows = np.random.default_rng(0).integers(0, EXAMPLES, (STEPS, BATCH))
  return params, x, y, x[rows], y[rows], loss, fn


def final_losses(name, base, llqr_kwargs):
  """The final loss on the whole set at each of the base's rates."""
  params, x, y, xs, ys, loss, fn = problem(name)
  make_base, rates = BASES[base]

  def run(lr):
    tx = make_base(lr)
    if llqr_kwargs is not None:
      tx = optax.chain(llqr_optax.llqr(loss=loss, refit_every=10, **llqr_kwargs), tx)

    def body(carry, batch):
      p, s = carry
      bx, by = batch
      apply_fn = lambda q: mlp(q, bx)
      grads = jax.grad(lambda q: fn(apply_fn(q), by))(p)
      extra = {} if llqr_kwargs is None else dict(apply_fn=apply_fn, targets=by)
      updates, s = tx.update(grads, s, p, **extra)
      return (optax.apply_updates(p, updates), s), None

    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), (xs, ys))
    return fn(mlp(p, x), y)

  with most_optimizations_disabled():
    compiled = jax.jit(run)
    return np.asarray([compiled(jnp.float32(lr)) for lr in rates])


@functools.lru_cache(maxsize=None)
def base_losses(name, base):
  params, x, y, *_, fn = problem(name)
  initial = float(fn(mlp(params, x), y))
  final = final_losses(name, base, None)
  return initial, final


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", ["classifier", "autoencoder"])
def test_the_base_trains_at_every_rate(name, base):
  initial, final = base_losses(name, base)
  assert np.all(final < initial), (initial, final)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", ["classifier", "autoencoder"])
def test_llqr_stays_within_1_5x_of_its_base(name, base, structure, normalize):
  _, base_final = base_losses(name, base)
  final = final_losses(name, base, dict(structure=structure, normalize=normalize))
  ratio = final / base_final
  assert np.all(ratio <= MAX_RATIO), (BASES[base][1], ratio)


@pytest.mark.parametrize("damping", [0.1, 0.01])
def test_the_deep_autoencoder_does_not_diverge(damping):
  """The issue's configuration on the quick MNIST-1D autoencoder, before
  Adam at 3e-2 (a rate where the full task went to thousands), 200 steps."""
  from benchmarks import tasks
  task = tasks.mnist1d_autoencoder(quick=True)
  xs, ys = (jnp.asarray(a) for a in task.batches(0, 200))
  params0 = task.init(jax.random.PRNGKey(0))
  kw = dict(structure="kronecker", damping=damping, num_chunks=16, refit_every=10,
            inner_steps=5, ema=0.5, normalize=True)

  def run(tx, uses_llqr):
    def body(carry, batch):
      p, s = carry
      x, y = batch
      apply_fn = lambda q: task.apply(q, x)
      grads = jax.grad(lambda q: task.loss_fn(q, x, y))(p)
      extra = dict(apply_fn=apply_fn, targets=y) if uses_llqr else {}
      updates, s = tx.update(grads, s, p, **extra)
      return (optax.apply_updates(p, updates), s), None
    (p, s), _ = jax.jit(lambda: jax.lax.scan(body, (params0, tx.init(params0)),
                                             (xs, ys)))()
    return task.evaluate(p, "train")[0], s

  adam, _ = run(optax.adam(3e-2), False)
  ours, state = run(optax.chain(llqr_optax.llqr(loss=task.loss, **kw),
                                optax.adam(3e-2)), True)
  assert ours <= MAX_RATIO * adam, (ours, adam, llqr_optax.diagnostics(state))
