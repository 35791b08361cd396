"""A geometry is one class and a registry line.

A toy geometry defined here (``Q = diag(1 + z²) / n``, a metric no built-in
geometry has) is registered, then used by name through the exact Riccati
reference and through ``llqr(...)`` (refined to the exact step by
``cg_steps``), each checked against a dense float64 reference built here
from the Jacobian: ``−(JᵀQJ + λI)⁻¹ g``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import llqr_optax
from llqr_optax import exact
from llqr_optax import geometry as G

pytestmark = pytest.mark.x64

NAME = "toy_weighted"
DAMPING = 0.5


class ToyWeighted(G.Geometry):
  """``Q v = (1 + z²) ⊙ v / n``: positive definite, output-dependent."""
  name = NAME

  def metric(self, loss, outputs, targets, key):
    del targets, key
    weights = (1.0 + outputs ** 2) / loss.num_events(outputs)
    return lambda v: weights * v


@pytest.fixture
def toy():
  G.register(ToyWeighted)
  yield NAME
  del G.KINDS[NAME]


def _problem():
  kx, ky, k1, k2 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (8, 3))
  y = jax.random.normal(ky, (8, 2))
  params = {"w1": 0.5 * jax.random.normal(k1, (3, 4)),
            "w2": 0.5 * jax.random.normal(k2, (4, 2))}
  apply_fn = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]
  return x, y, params, apply_fn


def _dense_reference(params, apply_fn, y):
  """``−(JᵀQJ + λI)⁻¹ g`` in float64 numpy, ``Q`` written out here."""
  flat, unravel = ravel_pytree(params)
  f = lambda v: apply_fn(unravel(v)).reshape(-1)
  z = np.asarray(f(flat), np.float64)
  jac = np.asarray(jax.jacobian(f)(flat), np.float64)
  n = z.size  # squared_error: every element is an event
  q = np.diag((1.0 + z ** 2) / n)
  g = jac.T @ ((z - np.asarray(y, np.float64).reshape(-1)) / n)
  step = -np.linalg.solve(jac.T @ q @ jac + DAMPING * np.eye(flat.size), g)
  return unravel(jnp.asarray(step))


def test_a_registered_geometry_is_a_geometry_by_name(toy):
  geometry = llqr_optax.Geometry(toy)
  assert isinstance(geometry, ToyWeighted) and geometry.name == toy
  assert not (geometry.needs_key or geometry.needs_targets or geometry.second_order)
  assert toy not in llqr_optax.GEOMETRIES  # the built-ins only
  with pytest.raises(ValueError, match="is unknown"):
    llqr_optax.Geometry("toy_unregistered")


def test_the_exact_reference_uses_the_registered_geometry(toy):
  x, y, params, apply_fn = _problem()
  model = exact.Sequential((lambda w, h: jnp.tanh(h @ w), lambda w, h: h @ w))
  steps = exact.exact_step(model, [params["w1"], params["w2"]], x, y,
                           loss="squared_error", geometry=toy, damping=DAMPING)
  want = _dense_reference(params, apply_fn, y)
  np.testing.assert_allclose(steps[0], want["w1"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(steps[1], want["w2"], rtol=1e-9, atol=1e-12)
  ggn = exact.exact_step(model, [params["w1"], params["w2"]], x, y,
                         loss="squared_error", geometry="ggn", damping=DAMPING)
  assert not np.allclose(ggn[0], want["w1"], rtol=1e-3)  # the toy's own metric


def test_llqr_uses_the_registered_geometry(toy):
  _, y, params, apply_fn = _problem()
  tx = llqr_optax.llqr(loss="squared_error", geometry=toy, damping=DAMPING,
                       structure="dense", cg_steps=40)
  grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
  updates, state = jax.jit(lambda s: tx.update(
      grads, s, params, apply_fn=apply_fn, targets=y))(tx.init(params))
  assert int(state.refits) == 1 and bool(jnp.isfinite(state.objective))
  want = _dense_reference(params, apply_fn, y)  # the step is −U(g)
  for name in params:
    np.testing.assert_allclose(-updates[name], want[name], rtol=1e-4, atol=1e-6)


def test_a_geometry_says_what_it_needs(toy):
  class NeedsDistribution(ToyWeighted):
    name = "toy_needs_distribution"
    needs_distribution = True
  G.register(NeedsDistribution)
  try:
    with pytest.raises(ValueError, match="needs the predictive distribution"):
      llqr_optax.llqr(loss=lambda z, t: jnp.mean((z - t) ** 2),
                      geometry="toy_needs_distribution")
  finally:
    del G.KINDS["toy_needs_distribution"]
  with pytest.raises(ValueError, match="subclass of Geometry"):
    G.register(object)
