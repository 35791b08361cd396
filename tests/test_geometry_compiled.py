"""Geometry products compiled with XLA's full optimisation pipeline.

test_geometry.py turns most XLA optimisations off to compile its many tiny
programs quickly; the regression here needs them on. XLA:CPU once miscompiled
the per-event outer product ``g (g · v)`` of the empirical and Monte-Carlo
Fisher when it was vmapped over several vectors (as the fit does over chunks)
and the batch had more than 32768 elements: the batched products were wrong,
with no error. The single products, a vmap of them and a NumPy reference must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llqr_optax import geometry as G
from llqr_optax import losses as L


@pytest.mark.parametrize("geometry", ["empirical_fisher", "mc_fisher"])
def test_per_event_products_vmapped_under_jit(geometry):
  n, c, m = 512, 10, 8  # m·n·c = 40960 > 32768
  z = jax.random.normal(jax.random.key(0), (n, c), jnp.float32)
  t = jax.random.randint(jax.random.key(1), (n,), 0, c)
  vs = jax.random.normal(jax.random.key(2), (m, n, c), jnp.float32)
  loss = L.softmax_cross_entropy()

  def metric(v):
    return G.output_metric(geometry, loss, z, t, key=jax.random.key(3))(v)

  batched = np.asarray(jax.jit(jax.vmap(metric))(vs), np.float64)
  single = np.stack([np.asarray(jax.jit(metric)(v), np.float64) for v in vs])
  scale = np.max(np.abs(single))
  np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6 * scale)
  if geometry == "empirical_fisher":
    # Q v = n Σ_e g_e (g_e · v_e), g the gradient of the mean loss.
    g = np.asarray(jax.grad(loss.fn)(z, t), np.float64)
    ref = n * g[None] * np.sum(g[None] * np.asarray(vs, np.float64), -1, keepdims=True)
    np.testing.assert_allclose(batched, ref, rtol=0, atol=1e-5 * scale)
