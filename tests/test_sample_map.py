"""``fitting.map_samples``: the loop XLA:CPU runs faster equals ``jax.vmap``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llqr_optax import fitting
from llqr_optax.fitting import problem as problem_lib


@pytest.mark.parametrize("num", [1, 4, problem_lib._LOOP_MAX + 1])
def test_map_samples_equals_vmap(num):
  """A curvature product mapped over ``num`` samples, loop or ``vmap``, in
  float32 (the refit's dtype), on a two-leaf tree."""
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (16, 5))
  params = {"w": jnp.ones((5, 3)) * 0.1, "b": jnp.zeros(3)}
  apply_fn = lambda p: jnp.tanh(x @ p["w"] + p["b"])
  problem, _, _ = fitting.build_problem(apply_fn, params, jnp.zeros((16, 3)),
                                        loss="squared_error", damping=0.5,
                                        num_chunks=4)
  samples = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(1), (num,) + p.shape), params)
  got = jax.jit(lambda s: fitting.map_samples(problem.matvec, s))(samples)
  want = jax.jit(jax.vmap(problem.matvec))(samples)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  # non-vacuous: the products differ from the samples themselves
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(samples)[0])
