"""``step_quality`` (ρ), ``cg_solve`` and ``scale_by_exact_step`` against dense references.

In float64 on a tiny tanh MLP with softmax cross-entropy: the curvature
``C`` is materialised with ``jax.jacfwd`` (``Σ_b J_bᵀ (diag p_b − p_b p_bᵀ)
J_b / B``), the exact step and ρ computed with ``jnp.linalg.solve``; and on a
linear least-squares problem, where ρ of a diagonal preconditioner has a
closed form.
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
from llqr_optax import exact

pytestmark = pytest.mark.x64

CE = "softmax_cross_entropy"
LAMBDA = 1e-2


@pytest.fixture(scope="module")
def problem():
  keys = jax.random.split(jax.random.PRNGKey(7), 6)
  params = helpers.mlp_params((4, 5, 3), keys[:2], keys[2:4])
  x = jax.random.normal(keys[4], (10, 4))
  y = jax.random.randint(keys[5], (10,), 0, 3)
  apply_fn = lambda p: helpers.mlp(p, x)
  flat, unravel = ravel_pytree(params)
  logits_of = lambda f: helpers.mlp(unravel(f), x)
  jac = jax.jacfwd(logits_of)(flat)                           # (B, K, P)
  p = jax.nn.softmax(logits_of(flat))
  q = jax.vmap(lambda pi: jnp.diag(pi) - jnp.outer(pi, pi))(p) / x.shape[0]
  c = jnp.einsum("bkp,bkl,blq->pq", jac, q, jac)
  g = jax.grad(lambda f: optax.softmax_cross_entropy_with_integer_labels(
      logits_of(f), y).mean())(flat)
  a = c + LAMBDA * jnp.eye(flat.size)
  return dict(params=params, apply_fn=apply_fn, y=y, unravel=unravel, a=a, g=g,
              sizes=[np.size(v) for v in jax.tree.leaves(params)])


def _rho_dense(a, g, d):
  return (g @ d) ** 2 / ((d @ a @ d) * (g @ jnp.linalg.solve(a, g)))


def _quality(problem, d, **kw):
  return llqr_optax.step_quality(problem["unravel"](d), problem["apply_fn"],
                                 problem["params"], problem["y"], loss=CE,
                                 damping=LAMBDA, tol=1e-12, max_steps=200, **kw)


def test_solve_matches_the_dense_step(problem):
  out = exact.cg_solve(problem["apply_fn"], problem["params"], problem["y"], loss=CE,
                    damping=LAMBDA, tol=1e-12, max_steps=200)
  dense = -jnp.linalg.solve(problem["a"], problem["g"])
  np.testing.assert_allclose(ravel_pytree(out.step)[0], dense, rtol=1e-8, atol=1e-10)
  assert out.residual <= 1e-12 and 0 < int(out.iterations) <= 200


def test_per_leaf_solve_matches_the_dense_block_diagonal_step(problem):
  a, g = problem["a"], problem["g"]
  bounds = np.cumsum([0] + problem["sizes"])
  blocks = jnp.zeros_like(a)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    blocks = blocks.at[lo:hi, lo:hi].set(a[lo:hi, lo:hi])
  assert float(jnp.abs(a - blocks).max()) > 1e-3  # the coupling is there to drop
  out = exact.cg_solve(problem["apply_fn"], problem["params"], problem["y"], loss=CE,
                    damping=LAMBDA, tol=1e-12, max_steps=200, per_leaf=True)
  np.testing.assert_allclose(ravel_pytree(out.step)[0], -jnp.linalg.solve(blocks, g),
                             rtol=1e-8, atol=1e-10)


def test_rho_of_the_exact_step_is_one(problem):
  dense = -jnp.linalg.solve(problem["a"], problem["g"])
  q = _quality(problem, dense)
  np.testing.assert_allclose([q.rho, q.cosine, q.scale], [1.0, 1.0, 1.0], atol=1e-8)


@pytest.mark.parametrize("which", ["gradient", "random", "block"])
def test_rho_matches_the_dense_reference(problem, which):
  g, a = problem["g"], problem["a"]
  d = {"gradient": -g,
       "random": jax.random.normal(jax.random.PRNGKey(1), g.shape),
       "block": -g / jnp.diag(a)}[which]
  q = _quality(problem, d)
  np.testing.assert_allclose(q.rho, _rho_dense(a, g, d), rtol=1e-6)
  np.testing.assert_allclose(q.scale, -(g @ d) / (d @ a @ d), rtol=1e-6)
  np.testing.assert_allclose(q.exact_decrease, -0.5 * g @ jnp.linalg.solve(a, g), rtol=1e-8)
  assert 0 < float(q.rho) < 1


def test_rho_is_invariant_to_the_directions_scale(problem):
  d = jax.random.normal(jax.random.PRNGKey(2), problem["g"].shape)
  q1, q2, q3 = (_quality(problem, c * d) for c in (1.0, 7.5, -0.01))
  np.testing.assert_allclose([q2.rho, q3.rho], [q1.rho, q1.rho], rtol=1e-10)
  np.testing.assert_allclose(q2.scale * 7.5, q1.scale, rtol=1e-10)
  np.testing.assert_allclose(q3.cosine, -q1.cosine, rtol=1e-10)


def test_rho_of_a_diagonal_preconditioner_on_a_quadratic_has_its_closed_form():
  """Least squares ``½ mean((Xw − y)²)`` at ``w = 0``: ``C = XᵀX / n``,
  ``g = −Xᵀy / n``; ``d = −P g`` with ``P = diag(p)`` gives
  ``ρ = (gᵀPg)² / (gᵀPAPg · gᵀA⁻¹g)``, computed here in NumPy."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 3)) * [1.0, 4.0, 0.3], rng.normal(size=12)
  p = np.array([1.0, 0.1, 5.0])
  n = x.size // 3  # squared_error is ½ mean over the n outputs
  a = x.T @ x / n + LAMBDA * np.eye(3)
  g = -x.T @ y / n
  expected = (g @ (p * g)) ** 2 / ((p * g) @ a @ (p * g) * (g @ np.linalg.solve(a, g)))
  q = llqr_optax.step_quality({"w": -p * g}, lambda w: jnp.asarray(x) @ w["w"],
                              {"w": jnp.zeros(3)}, jnp.asarray(y), loss="squared_error",
                              damping=LAMBDA, tol=1e-12)
  np.testing.assert_allclose(q.rho, expected, rtol=1e-10)
  assert expected < 0.99  # a poor preconditioner: the test can tell


def test_cg_stops_at_max_steps_with_its_residual(problem):
  out = exact.cg_solve(problem["apply_fn"], problem["params"], problem["y"], loss=CE,
                    damping=LAMBDA, tol=1e-14, max_steps=3)
  assert int(out.iterations) == 3 and float(out.residual) > 1e-6


def test_exact_step_transform_gives_the_damped_step(problem):
  tx = llqr_optax.scale_by_exact_step(loss=CE, damping=LAMBDA, cg_steps=40)
  grads = problem["unravel"](problem["g"])
  update = jax.jit(lambda g, s: tx.update(g, s, problem["params"],
                                          apply_fn=problem["apply_fn"], targets=problem["y"]))
  u, state = update(grads, tx.init(problem["params"]))
  np.testing.assert_allclose(ravel_pytree(u)[0], jnp.linalg.solve(problem["a"], problem["g"]),
                             rtol=1e-6, atol=1e-9)
  assert int(state.count) == 1 and float(state.residual) < 1e-6


def test_exact_step_transform_warm_start_and_guard(problem):
  """Warm-started, two CG steps a call reach the solution over calls (the
  same problem each time); a NaN gradient gives a zero update, counted, and
  keeps the last solution."""
  tx = llqr_optax.scale_by_exact_step(loss=CE, damping=LAMBDA, cg_steps=2, warm_start=True)
  grads = problem["unravel"](problem["g"])
  update = jax.jit(lambda g, s: tx.update(g, s, problem["params"],
                                          apply_fn=problem["apply_fn"], targets=problem["y"]))
  state = tx.init(problem["params"])
  residuals = []
  for _ in range(6):
    u, state = update(grads, state)
    residuals.append(float(state.residual))
  assert all(b < a for a, b in zip(residuals, residuals[1:]))
  assert residuals[-1] < 0.35 * residuals[0]
  bad = jax.tree.map(lambda v: v * jnp.nan, grads)
  u_bad, state_bad = update(bad, state)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(u_bad))
  assert int(state_bad.skipped_updates) == 1
  np.testing.assert_array_equal(ravel_pytree(state_bad.solution)[0],
                                ravel_pytree(state.solution)[0])


def test_exact_step_transform_needs_the_model():
  tx = llqr_optax.scale_by_exact_step(loss=CE)
  with pytest.raises(ValueError, match="needs params and apply_fn"):
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="damping=0"):
    llqr_optax.scale_by_exact_step(loss=CE, damping=0.0)


def test_rho_meter_logs_step_quality_and_compiles_once(problem):
  """The meter's floats are ``step_quality``'s; a second batch of the same
  shape reuses the compiled program."""
  traces = []
  apply = lambda p, x: (traces.append(1), helpers.mlp(p, x))[1]
  meter = llqr_optax.rho_meter(apply, loss=CE, damping=LAMBDA, tol=1e-10, max_steps=100)
  d = -problem["g"] / jnp.diag(problem["a"])
  keys = jax.random.split(jax.random.PRNGKey(7), 6)
  x = jax.random.normal(keys[4], (10, 4))
  logs = meter(problem["unravel"](d), problem["params"], x, problem["y"])
  assert set(logs) == {"rho", "rho_scale", "rho_cosine", "rho_cg_residual",
                       "rho_cg_iterations"}
  assert all(isinstance(v, float) for v in logs.values())
  np.testing.assert_allclose(logs["rho"], _rho_dense(problem["a"], problem["g"], d), rtol=1e-6)
  count = len(traces)
  meter(problem["unravel"](d), problem["params"], x + 1.0, problem["y"])
  assert len(traces) == count


def test_llqr_cg_steps_run_from_u_g_to_the_exact_step(problem):
  """``llqr(cg_steps=k)``: the quadratic model's value at the output falls
  with ``k`` (preconditioned CG from ``U g``), and many steps give the exact
  damped step."""
  a, g = problem["a"], problem["g"]
  grads = problem["unravel"](g)

  def output(k):
    tx = llqr_optax.llqr(loss=CE, structure="diagonal", floor=1e-3, damping=LAMBDA,
                         cg_steps=k)
    u, _ = jax.jit(lambda gr, s: tx.update(
        gr, s, problem["params"], apply_fn=problem["apply_fn"],
        targets=problem["y"]))(grads, tx.init(problem["params"]))
    return ravel_pytree(u)[0]

  model = lambda x: -(g @ x) + 0.5 * x @ a @ x  # at the step −x
  values = [float(model(output(k))) for k in (0, 1, 3, 10)]
  assert all(b <= a_ + 1e-12 for a_, b in zip(values, values[1:])), values
  assert values[-1] < values[0]
  np.testing.assert_allclose(output(150), jnp.linalg.solve(a, g), rtol=1e-4, atol=1e-6)
