"""The LQR objective, its gradient, the inner solvers and the refit.

Every reference here is built independently of the library's fitting code: the
damped Gauss-Newton matrix ``A = JᵀHJ + λI`` is materialised with
``jax.jacfwd``/``jax.hessian`` on the flattened model, gradient samples are
``jax.grad`` of each chunk's loss, and ``U`` is materialised column by column.
The module runs in float64 (``pytest.mark.x64``, see tests/conftest.py);
the library keeps its samples, products and states in float32, so agreement is
to float32 precision, except where a float64 problem is built by hand.
"""

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

import helpers
from helpers import STRUCTURES, dense_ggn, dense_map, mlp, perturbed
from helpers import cross_entropy as ce
from llqr_optax import fitting, structures
from llqr_optax.fitting import objective as objective_lib

pytestmark = pytest.mark.x64  # float64 throughout (tests/conftest.py)
CE, SE = "softmax_cross_entropy", "squared_error"


def init_mlp(key, sizes):
  """``helpers.mlp`` params: per layer a key split in two, for ``w`` and ``b``."""
  keys = [jax.random.split(k) for k in jax.random.split(key, len(sizes) - 1)]
  return helpers.mlp_params(sizes, [k[0] for k in keys], [k[1] for k in keys])


dense_ggn_jit = jax.jit(dense_ggn, static_argnums=(0, 2))


# --- a tiny MLP 6-8-5 and its problem ------------------------------------------

LAM = 0.1
CHUNKS = 4


@pytest.fixture(scope="module")
def tiny():
  """The model, independent references, and the library's results per structure.

  The library side is one jitted computation per structure (shared by the
  tests below) to keep compilation, the expensive part, small.
  """
  kp, kx, ky = jax.random.split(jax.random.key(0), 3)
  params = init_mlp(kp, (6, 8, 5))
  x = jax.random.normal(kx, (24, 6))
  y = jax.random.randint(ky, (24,), 0, 5)
  apply_fn = lambda p: mlp(p, x)
  size = 24 // CHUNKS
  chunk_grad = jax.jit(jax.vmap(
      lambda xc, yc: ravel_pytree(jax.grad(lambda p: ce(mlp(p, xc), yc))(params))[0]))
  chunk_grads = chunk_grad(x.reshape(CHUNKS, size, 6), y.reshape(CHUNKS, size))
  n = ravel_pytree(params)[0].size
  a = dense_ggn_jit(apply_fn, params, functools.partial(ce, y=y)) + LAM * jnp.eye(n)
  flat = lambda t: ravel_pytree(t)[0]
  flat_samples = lambda t: jax.vmap(flat)(t)

  def problem():
    return fitting.build_problem(apply_fn, params, y, loss=CE, damping=LAM,
                                 num_chunks=CHUNKS)

  @jax.jit
  def basics(vs):
    prob, outputs, loss = problem()
    _, unravel = ravel_pytree(params)
    products = jax.vmap(lambda v: flat(prob.matvec(unravel(v))))(vs)
    return flat_samples(prob.grads), loss, ce(outputs, y), products

  @jax.jit
  def library(states):
    """J, its samples, and per block: value, gradient, Hessian product, both
    from the library and from autodiff of ``lqr_objective``."""
    prob = problem()[0]
    value, u, au = fitting.evaluate(prob, states)
    out = {"J": fitting.lqr_objective(prob, states), "evaluate": value,
           "u": flat_samples(u), "au": flat_samples(au),
           "U": dense_map(states, params), "blocks": []}
    for k in range(objective_lib.num_blocks(states)):
      block = objective_lib.split_block(states, k)
      j = lambda b: fitting.lqr_objective(prob, objective_lib.merge_block(states, k, b))
      v, grad = fitting.block_value_and_grad(prob, states, k, block)
      moved = perturbed(block, jax.random.key(7), 1.0)
      direction = jax.tree.map(lambda m, b: m - b, moved, block)
      # J is quadratic in the block, so ∇J(b + d) − ∇J(b) is ∇²J d exactly.
      want_grad = flat(jax.grad(j)(block))
      out["blocks"].append(dict(
          value=v, want_value=j(block), grad=flat(grad), want_grad=want_grad,
          hvp=flat(objective_lib.block_hvp(prob, states, k, direction)),
          want_hvp=flat(jax.grad(j)(moved)) - want_grad))
    return out

  cache = {}

  def results(name):
    if name not in cache:
      # max_dim=6: l0.w (6, 8) and l1.w (8, 5) each have one side above it.
      states = perturbed(structures.init(params, name, max_dim=6), jax.random.key(1))
      cache[name] = library(states)
    return cache[name]

  return dict(params=params, chunk_grads=chunk_grads, A=a, basics=basics,
              results=results)


def test_problem_samples_and_curvature(tiny):
  vs = jax.random.normal(jax.random.key(2), (3, tiny["A"].shape[0]))
  grads, loss, want_loss, products = tiny["basics"](vs)
  np.testing.assert_allclose(grads, tiny["chunk_grads"], rtol=1e-5, atol=1e-7)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  np.testing.assert_allclose(products, vs @ tiny["A"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [12, 14])
def test_chunk_cotangents_hold_each_chunks_loss_gradient(rows):
  """Sample ``c``'s output cotangent is the gradient of chunk ``c``'s loss in
  its rows and zero elsewhere, whether the chunks tile the batch (12 rows: the
  reshaped form) or leave rows over (14: sliced; rows 12 and 13 enter the
  curvature only)."""
  from llqr_optax.fitting import problem as problem_lib
  z = jax.random.normal(jax.random.key(0), (rows, 5))
  t = jax.random.randint(jax.random.key(1), (rows,), 0, 5)
  loss = lambda z, t: optax.softmax_cross_entropy_with_integer_labels(z, t).mean()
  got = problem_lib._chunk_cotangents(loss, z, t, 4, 3)
  assert got.shape == (4, rows, 5)
  for c in range(4):
    want = np.zeros((rows, 5))
    rows_c = slice(3 * c, 3 * c + 3)
    want[rows_c] = jax.grad(loss)(z[rows_c], t[rows_c])
    np.testing.assert_allclose(got[c], want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", STRUCTURES)
def test_lqr_objective_matches_dense_formula(tiny, name):
  r = tiny["results"](name)
  u = r["U"]
  assert not np.allclose(u, np.eye(len(u)), atol=1e-2)  # a generic map
  g, a = tiny["chunk_grads"], tiny["A"]
  ug = g @ u.T  # rows: U g_c
  want = jnp.mean(-jnp.sum(g * ug, 1) + 0.5 * jnp.einsum("ci,ij,cj->c", ug, a, ug))
  assert float(r["J"]) == pytest.approx(float(want), rel=1e-5)
  assert float(r["evaluate"]) == pytest.approx(float(want), rel=1e-5)
  np.testing.assert_allclose(r["u"], ug, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r["au"], ug @ a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", STRUCTURES)
def test_block_value_and_grad_is_the_autodiff_gradient(tiny, name):
  blocks = tiny["results"](name)["blocks"]
  assert len(blocks) == (2 if name == "kronecker" else 1)
  for b in blocks:
    assert float(b["value"]) == pytest.approx(float(b["want_value"]), rel=1e-6)
    assert float(jnp.linalg.norm(b["want_grad"])) > 1e-3
    np.testing.assert_allclose(b["grad"], b["want_grad"], rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b["want_grad"]).max()))
    # J is quadratic in the block: the Hessian product matches autodiff too
    # (for Kronecker's second block, next to diagonal biases that have none).
    np.testing.assert_allclose(b["hvp"], b["want_hvp"], rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b["want_hvp"]).max()))


# --- dense U on a single-leaf model converges to (C + λI)⁻¹ ---------------------

DENSE_LAM = 0.1


def _layer0(p, x):
  return jnp.tanh(x @ p[:9].reshape(3, 3) + p[9:12])


def _layer1(p, h):
  return h @ p[:9].reshape(3, 3) + p[9:12]


def flat_model(flat, x):
  """Two 3-3 layers packed into one flat leaf of 24 values."""
  return _layer1(flat[12:], _layer0(flat[:12], x))


def test_dense_structure_converges_to_the_damped_inverse():
  kp, kx, ky = jax.random.split(jax.random.key(0), 3)
  params = jax.random.normal(kp, (24,))
  x = jax.random.normal(kx, (64, 3))
  y = jax.random.normal(ky, (64, 3))
  apply_fn = lambda p: flat_model(p, x)
  se = lambda z: 0.5 * jnp.mean((z - y) ** 2)
  problem, _, _ = fitting.build_problem(apply_fn, params, y, loss=SE,
                                        damping=DENSE_LAM, num_chunks=32)
  assert problem.grads.shape == (32, 24)
  # The samples span the parameter space, so the minimiser is A⁻¹ itself.
  assert np.linalg.matrix_rank(np.asarray(problem.grads)) == 24
  a = dense_ggn_jit(apply_fn, params, se) + DENSE_LAM * jnp.eye(24)
  v = jax.random.normal(jax.random.key(3), (24,))
  np.testing.assert_allclose(problem.matvec(v), a @ v, rtol=1e-5, atol=1e-6)

  # The library's samples are float32 (exact in float64); in float64 the same
  # objective with the materialised A converges to A⁻¹ to high accuracy.
  problem64 = fitting.Problem(problem.grads.astype(jnp.float64), lambda v: a @ v)
  states = jax.tree.map(lambda s: s.astype(jnp.float64),
                        structures.init(params, "dense"))
  assert isinstance(states, structures.DenseState)
  a_inv = jnp.linalg.inv(a)
  run = jax.jit(lambda s: fitting.cg_block(problem64, s, 0, 600))
  errors, values = [], []
  for _ in range(5):
    states = run(states)
    errors.append(float(jnp.linalg.norm(states.matrix - a_inv) / jnp.linalg.norm(a_inv)))
    values.append(float(fitting.lqr_objective(problem64, states)))
  assert errors[-1] < 1e-6, errors
  assert all(v1 <= v0 + 1e-12 for v0, v1 in zip(values, values[1:])), values
  assert values[-1] == pytest.approx(
      float(-0.5 * jnp.mean(jnp.einsum("ci,ij,cj->c", problem64.grads, a_inv,
                                       problem64.grads))), rel=1e-9)

  # U g is the exact damped step, with the sign flipped.
  g = jax.jit(jax.grad(lambda p: se(apply_fn(p))))(params)
  step_solve = -jnp.linalg.solve(a, g)
  np.testing.assert_allclose(-(states.matrix @ g), step_solve, rtol=1e-6, atol=1e-12)
  u_g = structures.apply(states, g)  # applies in float32 arithmetic on g
  np.testing.assert_allclose(-u_g, step_solve, rtol=1e-5, atol=1e-8)
  try:
    from llqr_optax import exact
  except ImportError:  # pragma: no cover - the reference lives in another module
    return
  dense = jax.jit(lambda p: exact.dense_step(apply_fn, p, y, loss=SE,
                                                 damping=DENSE_LAM))(params)
  np.testing.assert_allclose(-(states.matrix @ g), dense, rtol=1e-6, atol=1e-12)
  model = exact.Sequential((_layer0, _layer1))
  riccati = jax.jit(lambda p: exact.exact_step(model, [p[:12], p[12:]], x, y, loss=SE,
                                                   damping=DENSE_LAM))(params)
  np.testing.assert_allclose(-(states.matrix @ g), jnp.concatenate(riccati),
                             rtol=1e-6, atol=1e-12)


# --- refits on an MLP 8-16-16-4: J goes down, ρ on a fresh batch goes up --------

RHO_LAM = 1e-3
RHO_CHUNKS = 32
RHO_BATCH = 64
RHO_REFITS = 4
FITTED = ["diagonal", "kronecker", "ekfac"]


@pytest.fixture(scope="module")
def teacher_task():
  params = init_mlp(jax.random.key(10), (8, 16, 16, 4))
  teacher = init_mlp(jax.random.key(11), (8, 16, 16, 4))

  def batch(i):
    x = jax.random.normal(jax.random.key(100 + i), (RHO_BATCH, 8))
    return x, jnp.argmax(mlp(teacher, x), -1)

  @functools.partial(jax.jit, static_argnames="solver")
  def refit_step(states, x, y, first, ema, solver="cg"):
    """One library refit on a batch; J before it, and the model's change."""
    problem, _, _ = fitting.build_problem(lambda p: mlp(p, x), params, y, loss=CE,
                                          damping=RHO_LAM, num_chunks=RHO_CHUNKS)
    result = fitting.refit(problem, states, steps=10, solver=solver, ema=ema,
                           first=first)
    before = fitting.lqr_objective(problem, states)
    g_bar = jax.tree.map(lambda g: g.mean(0), problem.grads)
    u_bar = structures.apply(result.states, g_bar)
    gu = objective_lib.tree_vdot(g_bar, u_bar)
    uau = objective_lib.tree_vdot(u_bar, problem.matvec(u_bar))
    after = fitting.lqr_objective(problem, result.states)  # fresh products
    return result, before, -0.5 * gu ** 2 / uau, after

  # The fresh batch: its gradient g and damped curvature A, materialised.
  xf, yf = batch(999)

  @jax.jit
  def fresh():
    g = ravel_pytree(jax.grad(lambda p: ce(mlp(p, xf), yf))(params))[0]
    a = dense_ggn(lambda p: mlp(p, xf), params, lambda z: ce(z, yf))
    return g, a + RHO_LAM * jnp.eye(len(g))

  g, a = fresh()
  best = float(g @ jnp.linalg.solve(a, g))
  _, unravel = ravel_pytree(params)

  def rho(states):
    u = ravel_pytree(structures.apply(states, unravel(g)))[0]
    return float((g @ u) ** 2 / (u @ a @ u)) / best

  runs = {}
  for name in FITTED:
    states = [structures.init(params, name)]
    for t in range(RHO_REFITS):
      result = refit_step(states[-1], *batch(t), t == 0, 0.9, solver="cg")[0]
      states.append(result.states)
    runs[name] = states
  return dict(params=params, batch=batch, refit_step=refit_step, rho=rho, runs=runs)


@pytest.mark.parametrize("solver", ["cg", "pcg", "sgd"])
@pytest.mark.parametrize("name", FITTED)
def test_refit_lowers_the_objective(teacher_task, name, solver):
  """J falls; the refit's J and model change, which single-block structures
  take from the fit's own products (no evaluation after it), match fresh
  products of the returned states."""
  warm = teacher_task["runs"][name][1]  # after one refit on batch 0
  x, y = teacher_task["batch"](1)
  for ema in (0.0, 0.9):
    result, before, predicted, fresh = teacher_task["refit_step"](
        warm, x, y, False, ema, solver=solver)
    after = float(result.objective)  # J of result.states on the same problem
    assert after < float(before), (ema, after, float(before))
    assert after == pytest.approx(float(fresh), rel=1e-4)
    assert float(result.predicted) == pytest.approx(float(predicted), rel=1e-4)
    assert float(result.predicted) < 0
    for leaf in jax.tree.leaves(result.states):
      assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("name", FITTED)
def test_fitted_preconditioner_beats_identity_on_a_fresh_batch(teacher_task, name):
  rho, states = teacher_task["rho"], teacher_task["runs"][name]
  identity = rho(structures.init(teacher_task["params"], "scalar"))
  start = rho(states[0])  # every structure starts at the identity
  first, last = rho(states[1]), rho(states[-1])
  assert start == pytest.approx(identity, rel=1e-5)
  assert 0 < identity < 1 and last <= 1 + 1e-6
  assert last > identity + 0.03, (identity, first, last)
  # Warm starts and the EMA across refits generalise better than one refit.
  assert last > first, (first, last)
