"""The authors' configuration, ``llqr(**PAPER)``, against a NumPy transcription.

One refit of ``PAPER`` on a tiny relu MLP with softmax cross-entropy, written
out by hand in NumPy from the authors' description: the Fisher
``F = Σ_b J_bᵀ (diag p_b − p_b p_bᵀ) J_b / B`` from the model's dense Jacobian,
one gradient sample (the whole refit batch), 50 momentum-SGD steps
(learning rate 1e-3, momentum 0.9, each parameter array's gradient clipped to
norm 5) on ``J(D) = −gᵀ(D⊙g) + ½ (D⊙g)ᵀ F (D⊙g)`` from ``D = 1``, then
``D ← 0.95 · 1 + 0.05 · D`` and ``max(D, 1e-8)``. The refit runs on a fresh
batch given as ``refit_apply_fn``/``refit_targets``, at step 0 only (no
warm-up refits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import helpers
import llqr_optax

pytestmark = pytest.mark.x64

SIZES = (5, 6, 4)


def _setup():
  keys = jax.random.split(jax.random.PRNGKey(3), 6)
  params = helpers.mlp_params(SIZES, keys[:2], keys[2:4], scaled=False, bias_scale=1.0)
  # Large inputs and a relu MLP: the gradients of J are of order 1-20, so
  # that D moves visibly in 50 steps of 1e-3 and the clipping at norm 5 acts
  # on two of the four arrays.
  x = 3.0 * jax.random.normal(keys[4], (16, SIZES[0]))
  y = jax.random.randint(keys[5], (16,), 0, SIZES[-1])
  return params, x[:8], y[:8], x[8:], y[8:]


def _model(params, x):
  return helpers.mlp(params, x, activation=jax.nn.relu)


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _numpy_refit(params, x, y):
  """The refit of the authors' configuration, by hand; returns flat ``D``."""
  flat, unravel = ravel_pytree(params)
  logits_of = lambda f: _model(unravel(f), x)
  g = np.asarray(jax.grad(lambda f: _ce(logits_of(f), y))(flat))
  jac = np.asarray(jax.jacfwd(logits_of)(flat))              # (B, K, P)
  logits = np.asarray(logits_of(flat))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  b = x.shape[0]
  fisher = sum(jac[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ jac[i]
               for i in range(b)) / b
  # Leaf boundaries of the flat vector, in ravel_pytree's order.
  sizes = [np.size(v) for v in jax.tree.leaves(params)]
  bounds = np.cumsum([0] + sizes)
  d, m = np.ones_like(g), np.zeros_like(g)
  clipped_any = unclipped_any = False
  for _ in range(50):
    grad = g * (fisher @ (d * g)) - g * g
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      norm = np.linalg.norm(grad[lo:hi])
      if norm > 5.0:
        grad[lo:hi] *= 5.0 / norm
        clipped_any = True
      else:
        unclipped_any = True
    m = 0.9 * m + grad
    d = d - 1e-3 * m
  assert clipped_any and unclipped_any  # the clipping acts on some arrays
  return np.maximum(0.95 * 1.0 + 0.05 * d, 1e-8), g


def test_one_refit_matches_the_numpy_transcription():
  params, x, y, x_refit, y_refit = _setup()
  expected, g = _numpy_refit(params, x_refit, y_refit)
  assert np.max(np.abs(expected - 1.0)) > 1e-3  # D moved: the test can fail

  tx = llqr_optax.llqr(loss="softmax_cross_entropy", **llqr_optax.PAPER)
  state = tx.init(params)
  grads = jax.grad(lambda p: _ce(_model(p, x), y))(params)
  update = jax.jit(lambda g_, s: tx.update(
      g_, s, params, apply_fn=lambda p: _model(p, x), targets=y,
      refit_apply_fn=lambda p: _model(p, x_refit), refit_targets=y_refit))
  out, state = update(grads, state)
  diag = ravel_pytree(jax.tree.map(lambda s: s.diag, state.preconditioner,
                                   is_leaf=llqr_optax.structures.is_state))[0]
  np.testing.assert_allclose(np.asarray(diag), expected, rtol=0, atol=1e-6)
  assert int(state.refits) == 1
  # The update is U g with the new D (no normalisation, learning rate 1 is
  # the base's business).
  np.testing.assert_allclose(ravel_pytree(out)[0],
                             expected * np.asarray(ravel_pytree(grads)[0]),
                             rtol=0, atol=1e-6)
  # No warm-up refits: the next refit is at step 1000, not 1, 2, 4, ...
  for _ in range(3):
    _, state = update(grads, state)
  assert int(state.refits) == 1
  assert not llqr_optax.refit_due(state, 1000, warmup=False)
  assert llqr_optax.refit_due(1000, 1000, warmup=False)
  del g


def test_floor_bounds_the_fitted_diagonal():
  """A strong fit (PCG, no averaging) drives entries of ``D`` below 0.5;
  ``floor=0.5`` keeps every entry at 0.5 or above."""
  params, x, y, *_ = _setup()
  grads = jax.grad(lambda p: _ce(_model(p, x), y))(params)

  def fitted(**kw):
    tx = llqr_optax.llqr(loss="softmax_cross_entropy", structure="diagonal",
                         ema=0.0, damping=1e-3, inner_steps=10, **kw)
    _, state = tx.update(grads, tx.init(params), params,
                         apply_fn=lambda p: _model(p, x), targets=y)
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(state.preconditioner)])

  assert fitted().min() < 0.5
  assert fitted(floor=0.5).min() >= 0.5


@pytest.mark.parametrize("kw, message", [
    (dict(damping=0.0, adapt_damping=True), "cannot move it from 0"),
    (dict(floor=-1.0), r"floor=-1.0 is invalid"),
    (dict(floor=1e-8, structure="kronecker"), "has none"),
])
def test_bad_preset_overrides_raise(kw, message):
  with pytest.raises(ValueError, match=message):
    llqr_optax.llqr(loss="softmax_cross_entropy", **{**llqr_optax.PAPER, **kw})
