"""compile_step: two compiled steps on llqr's schedule, counted on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llqr_optax
from helpers import mlp

X = jax.random.normal(jax.random.key(0), (32, 5))
Y = jnp.sin(X @ jnp.arange(1.0, 6.0))[:, None]
TX = optax.chain(llqr_optax.llqr(loss="squared_error", refit_every=4), optax.adam(1e-2))


def init():
  """Two tanh layers 5-8-1 without biases, for ``helpers.mlp``."""
  return {"l0": {"w": 0.1 * jax.random.normal(jax.random.key(1), (5, 8))},
          "l1": {"w": 0.1 * jax.random.normal(jax.random.key(2), (8, 1))}}


traces = []


def train_step(params, opt_state, x, y, refit=None):
  traces.append(refit)
  apply_fn = lambda p: mlp(p, x)
  grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
  updates, opt_state = TX.update(grads, opt_state, params, apply_fn=apply_fn,
                                 targets=y, refit=refit)
  return optax.apply_updates(params, updates), opt_state


def test_compile_step_equals_the_one_step_schedule_and_compiles_twice():
  traces.clear()
  step = llqr_optax.compile_step(train_step, refit_every=4)
  one = jax.jit(train_step)
  p1 = p2 = init()
  s1 = s2 = TX.init(p1)
  for _ in range(11):
    p1, s1 = step(p1, s1, X, Y)
    p2, s2 = one(p2, s2, X, Y)
  # Two programs, rounded differently: U's entries are of order 1, and a
  # small one may differ by a few float32 ulps of 1.
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=5e-6)
  # refits at 0, 1, 2, 4, 8: both schedules; two compilations plus the cond one
  assert int(llqr_optax.find_state(s1).refits) == 5 == int(llqr_optax.find_state(s2).refits)
  assert sorted(traces, key=str) == [False, None, True]
  assert step.count == 11


def test_compile_step_reads_the_count_of_a_restored_state():
  step = llqr_optax.compile_step(train_step, refit_every=4)
  params, state = init(), TX.init(init())
  for _ in range(6):
    params, state = step(params, state, X, Y)
  restored = jax.tree.map(jnp.copy, state)  # e.g. from a checkpoint: a new object
  fresh = llqr_optax.compile_step(train_step, refit_every=4)
  _, after = fresh(params, restored, X, Y)
  assert fresh.count == 7
  # step 6 is not a refit step: resuming does not repeat the warm-up refits
  assert int(llqr_optax.find_state(after).refits) == int(llqr_optax.find_state(state).refits)


def test_the_ordinary_step_only_applies_u_and_checks_it():
  """Between refits (refit=False) llqr's compiled update holds no model pass
  (no dot), no conditional or loop, no host transfer, and at most one
  reduction per leaf (the finite check of U(g)): one multiply per parameter
  for a diagonal U, plus that check."""
  params = {"w": jnp.zeros((40, 100)), "b": jnp.zeros(100), "v": jnp.zeros((100, 10))}
  x, y = jnp.ones((32, 40)), jnp.zeros(32, jnp.int32)
  apply_fn = lambda p: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
  tx = llqr_optax.scale_by_llqr(loss="softmax_cross_entropy", structure="diagonal")
  step = jax.jit(lambda g, s: tx.update(g, s, params, apply_fn=apply_fn, targets=y,
                                        refit=False))
  hlo = step.lower(params, tx.init(params)).compile().as_text()
  for op in ("conditional", "while", " dot(", "custom-call", "outfeed", "infeed",
             "send(", "recv("):
    assert op not in hlo, op
  assert 1 <= hlo.count(" reduce(") <= len(jax.tree.leaves(params))


def test_compile_step_refits_the_step_after_the_gradient_grows():
  """``refit_growth`` in a real loop: the targets jump ×10 at step 12, where
  no refit is due (warm-up refits at 0, 1, 2, 4, 8, then every 100), so the
  gradient grows about ×10 past 4× its value at the last refit. That step
  records the request (``refit=False`` cannot refit) and the next one,
  step 13, refits."""
  tx = optax.chain(llqr_optax.llqr(loss="squared_error", refit_every=100,
                                   refit_growth=4.0), optax.sgd(1e-2))

  def growth_step(params, opt_state, x, y, refit):
    apply_fn = lambda p: mlp(p, x)
    grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params, apply_fn=apply_fn,
                                   targets=y, refit=refit)
    return optax.apply_updates(params, updates), opt_state

  step = llqr_optax.compile_step(growth_step, refit_every=100, refit_growth=4.0)
  params = init()
  state = tx.init(params)
  refits, requested = [], []
  for t in range(16):
    params, state = step(params, state, X, Y if t < 12 else 10 * Y)
    inner = llqr_optax.find_state(state)
    refits.append(int(inner.refits))
    requested.append(bool(inner.refit_requested))
  assert refits[:12] == [1, 2, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5], refits
  assert requested[12] and refits[12] == 5  # step 12 grew: asks, cannot refit
  assert refits[13] == 6 and not requested[13]  # step 13 refits
  assert refits[15] == 6  # and the gradient stays large: no further request
