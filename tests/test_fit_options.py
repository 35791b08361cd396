"""The fitting options of the gains study, against dense float64 references.

- a :class:`~llqr_optax.fitting.Problem` whose ``U`` acts on other inputs
  than the gradients (``inputs``, used by ``precondition_base``);
- Hutchinson's ``tr(C)/P`` (``curvature_scale``) and ``relative_damping``;
- each structure's ``pcg_preconditioner`` against the dense Hessian of ``J``
  in its block, and the preconditioned inner CG (``inner_solver="pcg"``);
- ``precondition_base``: ``U`` around another optimizer's update.
"""

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

import llqr_optax
from helpers import STRUCTURES, dense_map, perturbed
from llqr_optax import fitting, structures
from llqr_optax.fitting import objective as obj

pytestmark = pytest.mark.x64  # float64 throughout (tests/conftest.py)


def random_states(params, name, key, scale=0.3):
  """Generic (non-identity) states of structure ``name`` for ``params``."""
  return perturbed(structures.init(params, name), key, scale)


PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
P = 15


def spd(key, n, cond=30.0):
  q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  return (q * jnp.geomspace(1.0, cond, n)) @ q.T


def flat_problem(a, grads, inputs=None, params=PARAMS):
  """A Problem with the dense matrix ``a`` on flattened params."""
  _, unravel = ravel_pytree(params)
  matvec = lambda v: unravel(a @ ravel_pytree(v)[0])
  tree = lambda m: jax.vmap(unravel)(m)
  return fitting.Problem(tree(grads), matvec,
                         inputs=None if inputs is None else tree(inputs))


@pytest.mark.parametrize("name", STRUCTURES)
def test_objective_with_inputs_is_the_dense_quadratic(name):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  a = spd(k1, P)
  g = jax.random.normal(k2, (5, P))
  x = jax.random.normal(k3, (5, P))
  states = random_states(PARAMS, name, k4)
  u = dense_map(states, PARAMS)
  ux = x @ u.T
  want = np.mean(-np.sum(g * ux, 1) + 0.5 * np.sum(ux * (ux @ a), 1))
  got = fitting.lqr_objective(flat_problem(a, g, x), states)
  np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 inside U


def test_dense_fit_with_inputs_maps_each_input_to_the_exact_step():
  """Over an unconstrained U, argmin J sends x_c to A⁻¹ g_c (P samples)."""
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  params = {"w": jnp.zeros(6)}
  a = spd(k1, 6, cond=5.0)
  g = jax.random.normal(k2, (6, 6))
  x = g @ spd(k3, 6, cond=3.0)  # another optimizer's directions
  problem = fitting.Problem({"w": g}, lambda v: {"w": a @ v["w"]}, inputs={"w": x})
  states = fitting.fit(problem, structures.init(params, "dense"), steps=40,
                       solver="pcg")
  ux = jax.vmap(lambda v: structures.apply(states, {"w": v})["w"])(x)
  np.testing.assert_allclose(ux, np.linalg.solve(a, g.T).T, atol=2e-4)


def test_curvature_scale_is_exact_for_a_diagonal_curvature():
  c = jnp.arange(1.0, P + 1.0)
  _, unravel = ravel_pytree(PARAMS)
  curvature = lambda v: unravel(c * ravel_pytree(v)[0])
  got = fitting.curvature_scale(curvature, PARAMS, jax.random.key(0))
  np.testing.assert_allclose(got, np.mean(c), rtol=1e-6)


def test_curvature_scale_is_unbiased():
  a = spd(jax.random.key(2), P)
  _, unravel = ravel_pytree(PARAMS)
  curvature = lambda v: unravel(a @ ravel_pytree(v)[0])
  keys = jax.random.split(jax.random.key(3), 400)
  est = jax.vmap(lambda k: fitting.curvature_scale(curvature, PARAMS, k))(keys)
  np.testing.assert_allclose(np.mean(est), np.trace(a) / P, rtol=0.03)


@pytest.mark.parametrize("name", STRUCTURES)
def test_pcg_preconditioner_inverts_the_block_hessian_for_identity_curvature(name):
  """With A = I, ∂²J/∂θ_k² depends on the samples only; the structure's
  preconditioner is its inverse (tiny regularisation)."""
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k1, (40, P))
  problem = flat_problem(jnp.eye(P), x)
  states = random_states(PARAMS, name, k2)
  if name == "ekfac":  # orthonormal bases, as refits make them
    orth = lambda b: jnp.linalg.qr(b)[0] if b.ndim == 2 else b
    states = structures.map_states(
        lambda cls, s: s._replace(basis_in=orth(s.basis_in), basis_out=orth(s.basis_out))
        if cls.name == "ekfac" else s, states)
  treedef = jax.tree.structure(states, is_leaf=structures.is_state)
  for k in range(obj.num_blocks(states)):
    block = obj.split_block(states, k)
    v = jax.tree.map(lambda b: jax.random.normal(k3, b.shape, b.dtype), block)
    hv = obj.block_hvp(problem, states, k, v)
    parts = [structures.structure_of(s).pcg_preconditioner(s, k, xs, 1e-10)
             if k < len(structures.structure_of(s).blocks) else (lambda b: b)
             for s, xs in zip(treedef.flatten_up_to(states),
                              treedef.flatten_up_to(problem.samples))]
    back = [f(b) for f, b in zip(parts, treedef.flatten_up_to(hv))]
    want = treedef.flatten_up_to(v)
    for got_leaf, want_leaf in zip(back, want):
      for g_arr, w_arr in zip(got_leaf, want_leaf):
        np.testing.assert_allclose(g_arr, w_arr, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["diagonal", "kronecker", "dense"])
def test_pcg_beats_cg_on_spread_samples_and_converges_to_the_same_minimum(name):
  """Gradient samples with a spread of 10⁴ in scale: the preconditioned inner
  CG lowers J further in 3 steps, and both reach the same minimum."""
  k1, k2 = jax.random.split(jax.random.key(5))
  a = spd(k1, P, cond=4.0)
  x = jax.random.normal(k2, (40, P)) * jnp.geomspace(1e-2, 1e2, P)
  params = {"w": jnp.zeros((5, 3))}  # one leaf: the dense U is unconstrained
  problem = flat_problem(a, x, params=params)
  start = structures.init(params, name)
  j = lambda steps, solver: float(fitting.lqr_objective(
      problem, fitting.fit(problem, start, steps=steps, solver=solver)))
  assert j(3, "pcg") < j(3, "cg") - 1e-3 * abs(j(3, "cg"))
  s = x.T @ x / x.shape[0]
  if name == "dense":  # unconstrained: J* = -½ E[xᵀA⁻¹x]
    best = -0.5 * np.trace(np.linalg.solve(a, s))
  elif name == "diagonal":  # J(d) = -dᵀdiag(S) + ½ dᵀ(A ⊙ S)d, per leaf block
    d = np.linalg.solve(a * s, np.diag(s))
    best = -0.5 * d @ np.diag(s)
  else:  # bilinear: alternating sweeps only decrease J
    assert j(30, "pcg") <= j(3, "pcg")
    return
  np.testing.assert_allclose(j(60, "pcg"), best, rtol=1e-4)


def _linear_problem(n=64, d=6, seed=0):
  """Least squares on orthogonal inputs: C = xᵀx/(n·k) is diagonal."""
  key = jax.random.key(seed)
  q, _ = jnp.linalg.qr(jax.random.normal(key, (n, d)))
  x = q * jnp.sqrt(n) * jnp.arange(1.0, d + 1.0)
  y = jax.random.normal(jax.random.key(seed + 1), (n, 1))
  return x, y


def test_relative_damping_uses_the_mean_eigenvalue():
  """With a diagonal C, Hutchinson's estimate is exact: the state holds
  tr(C)/P, and a converged dense U is (C + damping·tr(C)/P · I)⁻¹."""
  x, y = _linear_problem()
  params = {"w": jnp.zeros((6, 1))}
  apply_fn = lambda p: x @ p["w"]
  c = np.asarray(x.T @ x / x.shape[0])  # squared_error: mean over n·1 events
  tx = llqr_optax.scale_by_llqr(loss="squared_error", structure="dense",
                                damping=0.5, relative_damping=True,
                                num_chunks=32, inner_steps=60, ema=0.0)
  state = tx.init(params)
  grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
  _, state = jax.jit(functools.partial(tx.update, apply_fn=apply_fn, targets=y))(
      grads, state, params)
  kappa = np.trace(c) / 6
  np.testing.assert_allclose(state.curvature_scale, kappa, rtol=1e-5)
  want = np.linalg.inv(c + 0.5 * kappa * np.eye(6))
  np.testing.assert_allclose(state.preconditioner["w"].matrix, want,
                             rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_precondition_base_scalar_is_the_best_step_along_the_base_direction():
  """Base SGD (d = −η g) and a scalar U: the output is s·d with s the
  quadratic model's best scale along d over the samples, computed densely."""
  x, y = _linear_problem(seed=3)
  params = {"w": jnp.zeros((6, 1))}
  apply_fn = lambda p: x @ p["w"]
  c = np.asarray(x.T @ x / x.shape[0])
  lam = 0.1
  tx = llqr_optax.precondition_base(optax.sgd(0.3), loss="squared_error",
                                    damping=lam, num_chunks=4, ema=0.0,
                                    normalize=False)
  state = tx.init(params)
  loss = lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2)
  grads = jax.grad(loss)(params)
  updates, state = jax.jit(functools.partial(tx.update, apply_fn=apply_fn, targets=y))(
      grads, state, params)
  size = x.shape[0] // 4
  gc = np.stack([np.asarray(jax.grad(lambda p: 0.5 * jnp.mean(
      (x[i * size:(i + 1) * size] @ p["w"] - y[i * size:(i + 1) * size]) ** 2))(params)["w"]).ravel()
      for i in range(4)])
  dirs = 0.3 * gc  # the base's descent direction for each sample
  a = c + lam * np.eye(6)
  s = np.sum(gc * dirs) / np.sum(dirs * (dirs @ a))
  np.testing.assert_allclose(updates["w"], -s * 0.3 * np.asarray(grads["w"]), rtol=1e-4)
  assert int(llqr_optax.find_state(state).refits) == 1


def test_precondition_base_keeps_the_base_state_on_a_skipped_update():
  x, y = _linear_problem(seed=5)
  params = {"w": jnp.zeros((6, 1))}
  apply_fn = lambda p: x @ p["w"]
  tx = llqr_optax.precondition_base(optax.adam(0.1), loss="squared_error")
  state = tx.init(params)
  bad = {"w": jnp.full((6, 1), jnp.nan)}
  updates, new = tx.update(bad, state, params, apply_fn=apply_fn, targets=y)
  assert np.all(np.asarray(updates["w"]) == 0)
  assert int(new.llqr.skipped_updates) == 1
  for o, n in zip(jax.tree.leaves(state.base), jax.tree.leaves(new.base)):
    np.testing.assert_array_equal(o, n)
  with pytest.raises(ValueError, match="PreconditionBaseState"):
    tx.update(bad, state.llqr, params, apply_fn=apply_fn, targets=y)


def test_refit_growth_refits_when_the_gradient_grows():
  """Off the schedule: a gradient 10× the last refit's triggers a refit in the
  same step (refit=None) or a request that refit_due reads (two steps)."""
  x, y = _linear_problem(seed=7)
  params = {"w": jnp.zeros((6, 1))}
  apply_fn = lambda p: x @ p["w"]
  tx = llqr_optax.scale_by_llqr(loss="squared_error", refit_every=1000,
                                refit_growth=4.0)
  grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
  big = jax.tree.map(lambda g: 10.0 * g, grads)
  one = jax.jit(functools.partial(tx.update, apply_fn=apply_fn, targets=y),
                static_argnames="refit")
  state = tx.init(params)
  for g in (grads, grads, grads):  # refits at steps 0, 1, 2 (warm-up)
    _, state = one(g, state, params)
  _, state = one(grads, state, params)  # step 3: not due
  assert int(state.refits) == 3
  _, grown = one(big, state, params)  # grew 10×: refit now
  assert int(grown.refits) == 4 and not bool(grown.refit_requested)
  np.testing.assert_allclose(grown.refit_grad_norm,
                             10 * np.sqrt(np.sum(np.square(grads["w"]))), rtol=1e-5)
  # Two compiled steps: the ordinary step records the request, the next refits.
  _, asked = one(big, state, params, refit=False)
  assert int(asked.refits) == 3 and bool(asked.refit_requested)
  assert llqr_optax.refit_due(asked, refit_every=1000)
  _, done = one(big, asked, params, refit=True)
  assert int(done.refits) == 4 and not bool(done.refit_requested)
  assert not llqr_optax.refit_due(done, refit_every=1000)


def test_refit_on_a_separate_batch():
  """refit_apply_fn/refit_targets: the refit sees only that batch (here a
  quarter of the training batch); the update still preconditions the
  training gradient."""
  x, y = _linear_problem(n=64, seed=9)
  params = {"w": 0.1 * jnp.ones((6, 1))}
  loss = lambda p, xb, yb: 0.5 * jnp.mean((xb @ p["w"] - yb) ** 2)
  tx = llqr_optax.scale_by_llqr(loss="squared_error", structure="diagonal")
  grads = jax.grad(loss)(params, x, y)
  sub_x, sub_y = x[:16], y[:16]
  out, state = tx.update(grads, tx.init(params), params,
                         apply_fn=lambda p: x @ p["w"], targets=y,
                         refit_apply_fn=lambda p: sub_x @ p["w"], refit_targets=sub_y)
  _, ref = tx.update(jax.grad(loss)(params, sub_x, sub_y), tx.init(params), params,
                     apply_fn=lambda p: sub_x @ p["w"], targets=sub_y)
  np.testing.assert_allclose(state.preconditioner["w"].diag,
                             ref.preconditioner["w"].diag, rtol=1e-6)
  np.testing.assert_allclose(out["w"], state.preconditioner["w"].diag * grads["w"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="refit_apply_fn=3"):
    tx.update(grads, tx.init(params), params, apply_fn=lambda p: x @ p["w"],
              targets=y, refit_apply_fn=3)
