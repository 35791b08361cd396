"""Per-leaf structured preconditioners: each ``apply`` against an explicit matrix.

Every structure is a linear map on one leaf. Here each map is rebuilt as an
explicit dense matrix from its state, by the formula of the structure, without
calling the structure's ``apply``, and compared with ``apply`` on random leaves.
Vectors use the column-major ``vec`` of the leaf seen as a ``(fan_in,
fan_out)`` matrix, where ``vec(L G R) = (Rᵀ ⊗ L) vec(G)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llqr_optax import structures
from llqr_optax.structures import (DenseState, DiagonalState,
                                   EigenKroneckerState, KroneckerState,
                                   ScalarState)


def test_the_module_and_its_fixtures_run_in_float32(module_float):
  """Unmarked modules run in float32 (tests/conftest.py), whatever ran before."""
  assert module_float == jnp.zeros(()).dtype == jnp.float32


def normal(seed, shape):
  """Test inputs from NumPy: no JAX compilation for random numbers."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def vec(g2):
  """Column-major vec of a matrix."""
  return g2.T.reshape(-1)


def unvec(v, m, n):
  return v.reshape(n, m).T


def orthogonal(seed, n):
  return jnp.asarray(np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0],
                     jnp.float32)


def check_apply_against(state, shape, dense_on_vec, seed):
  """``apply(state, G)`` equals ``unvec(U vec(G2))`` for random leaves ``G``."""
  m, n = structures.matrix_shape(shape)
  cls = structures.structure_of(state)
  dense_on_vec = np.asarray(dense_on_vec, np.float64)
  for k in range(3):
    g = normal(100 * seed + k, shape)
    got = cls.apply(state, g)
    assert got.shape == g.shape
    g2 = np.asarray(g, np.float64).reshape(m, n)
    want = unvec(dense_on_vec @ vec(g2), m, n).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


SHAPES = [(5, 3), (2, 2, 3, 4)]  # a dense kernel and a conv kernel (h, w, cin, cout)


def test_matrix_shape():
  assert structures.matrix_shape((5, 3)) == (5, 3)
  assert structures.matrix_shape((2, 2, 3, 4)) == (12, 4)
  assert structures.matrix_shape((7,)) == (7, 1)
  assert structures.matrix_shape(()) == (1, 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_scalar_apply(shape):
  m, n = structures.matrix_shape(shape)
  state = ScalarState(jnp.float32(-1.7))
  check_apply_against(state, shape, -1.7 * np.eye(m * n), 0)


@pytest.mark.parametrize("shape", SHAPES + [(6,)])
def test_diagonal_apply(shape):
  m, n = structures.matrix_shape(shape)
  d = normal(1, shape)
  check_apply_against(DiagonalState(d), shape,
                      np.diag(vec(d.reshape(m, n))), 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_kronecker_apply(shape):
  m, n = structures.matrix_shape(shape)
  left, right = normal(3, (m, m)), normal(31, (n, n))
  check_apply_against(KroneckerState(left, right), shape,
                      np.kron(right.T, left), 4)


@pytest.mark.parametrize("shape", SHAPES)
def test_ekfac_apply(shape):
  m, n = structures.matrix_shape(shape)
  q_a, q_g = orthogonal(5, m), orthogonal(51, n)
  scale = normal(52, (m, n))
  state = EigenKroneckerState(scale, q_a, q_g, jnp.eye(m), jnp.eye(n))
  # U = Q_A [(Q_Aᵀ G Q_G) ⊙ S] Q_Gᵀ, i.e. (Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ.
  q = np.kron(q_g, q_a)
  check_apply_against(state, shape, q @ np.diag(vec(scale)) @ q.T,
                      6)


@pytest.mark.parametrize("shape", SHAPES + [(6,)])
def test_dense_apply(shape):
  size = int(np.prod(shape))
  mat = normal(7, (size, size))
  state = DenseState(mat)
  # Dense acts on the row-major flattening of the leaf itself.
  for k in range(3):
    g = normal(80 + k, shape)
    got = structures.Dense.apply(state, g)
    np.testing.assert_allclose(got, (mat @ g.reshape(-1)).reshape(shape),
                               rtol=2e-5, atol=2e-5)


def test_kronecker_side_above_max_dim_is_diagonal():
  shape = (6, 3)  # fan_in 6 > max_dim 4 > fan_out 3
  state = structures.Kronecker.init(shape, max_dim=4)
  assert state.left.shape == (6,) and state.right.shape == (3, 3)
  left, right = normal(9, (6,)), normal(91, (3, 3))
  check_apply_against(KroneckerState(left, right), shape,
                      np.kron(right.T, np.diag(left)), 10)
  # Both sides above max_dim: a rank-one (outer product) diagonal.
  both = structures.Kronecker.init((6, 5), max_dim=4)
  assert both.left.shape == (6,) and both.right.shape == (5,)
  r = normal(92, (5,))
  check_apply_against(KroneckerState(left, r), (6, 5),
                      np.kron(np.diag(r), np.diag(left)), 11)


def test_ekfac_side_above_max_dim_is_identity_basis():
  shape = (2, 3, 2)  # viewed as (6, 2); fan_in 6 > max_dim 4
  state = structures.EigenKronecker.init(shape, max_dim=4)
  assert state.basis_in.shape == (6,) and state.cov_in.shape == (6,)
  assert state.basis_out.shape == (2, 2)
  scale = normal(12, (6, 2))
  q_g = orthogonal(121, 2)
  # A vector basis stands for the identity, whatever its values.
  state = state._replace(scale=scale, basis_out=q_g,
                         basis_in=normal(122, (6,)))
  q = np.kron(q_g, np.eye(6))
  check_apply_against(state, shape, q @ np.diag(vec(scale)) @ q.T,
                      13)


def test_vector_leaf_falls_back_to_diagonal():
  params = {"b": jnp.zeros(70), "w": jnp.zeros((3, 70))}
  for name in ("kronecker", "ekfac", "auto"):
    states = structures.init(params, name)
    assert isinstance(states["b"], DiagonalState), name
    assert states["b"].diag.shape == (70,)
  auto = structures.init(params, "auto")["w"]
  assert structures.structure_of(auto).name == structures.AUTO_MATRIX
  assert isinstance(structures.init(params, "kronecker")["w"], KroneckerState)
  assert isinstance(structures.init(params, "ekfac")["w"], EigenKroneckerState)


def test_auto_is_dense_on_tiny_leaves():
  """Leaves of at most AUTO_DENSE_MAX elements get a dense U under "auto"."""
  n = structures.AUTO_DENSE_MAX
  params = {"tiny": jnp.zeros(n), "small": jnp.zeros((2, n // 2)),
            "vector": jnp.zeros(n + 1), "matrix": jnp.zeros((2, n))}
  names = structures.leaf_names("auto", params)
  assert names == {"tiny": "dense", "small": "dense", "vector": "diagonal",
                   "matrix": structures.AUTO_MATRIX}
  # dense_max below the threshold wins: never a dense U it forbids
  assert structures.leaf_names("auto", params, dense_max=4)["tiny"] == "diagonal"


@pytest.mark.parametrize("name", list(structures.STRUCTURES))
def test_init_is_identity_and_scale_is_linear(name):
  params = {"b": jnp.zeros(4), "conv": jnp.zeros((2, 2, 3, 4)),
            "w": jnp.zeros((6, 4))}
  states = structures.init(params, name, max_dim=5)
  g = {k: normal(14 + i, p.shape) for i, (k, p) in enumerate(params.items())}
  out = structures.apply(states, g)
  for k in g:
    np.testing.assert_allclose(out[k], g[k], rtol=1e-6, atol=1e-6)
  # s·U scales the map (not only the first block's values).
  perturbed = jax.tree.map(
      lambda x: x + 0.3 * normal(x.size, x.shape), states)
  scaled = structures.map_states(lambda cls, s: cls.scale(s, -2.5), perturbed)
  base = structures.apply(perturbed, g)
  got = structures.apply(scaled, g)
  for k in g:
    np.testing.assert_allclose(got[k], -2.5 * base[k], rtol=1e-5, atol=1e-5)


# --- leaf_names ---------------------------------------------------------------

PARAMS = {"conv": jnp.zeros((3, 3, 2, 4)), "dense": {"b": jnp.zeros(5),
                                                     "w": jnp.zeros((4, 5))}}


def test_leaf_names_from_a_string():
  auto = structures.AUTO_MATRIX  # what "auto" picks for matrices and kernels
  assert auto in structures.STRUCTURES
  assert structures.leaf_names("auto", PARAMS) == {  # b is tiny: dense
      "conv": auto, "dense": {"b": "dense", "w": auto}}
  assert structures.leaf_names("kronecker", PARAMS) == {
      "conv": "kronecker", "dense": {"b": "diagonal", "w": "kronecker"}}
  assert structures.leaf_names("ekfac", PARAMS) == {
      "conv": "ekfac", "dense": {"b": "diagonal", "w": "ekfac"}}
  assert structures.leaf_names("scalar", PARAMS) == {
      "conv": "scalar", "dense": {"b": "scalar", "w": "scalar"}}
  assert structures.leaf_names("dense", PARAMS)["dense"]["b"] == "dense"


def test_leaf_names_from_a_pytree():
  spec = {"conv": "diagonal", "dense": {"b": "scalar", "w": "ekfac"}}
  assert structures.leaf_names(spec, PARAMS) == spec
  states = structures.init(PARAMS, spec)
  assert isinstance(states["conv"], DiagonalState)
  assert isinstance(states["dense"]["b"], ScalarState)
  assert isinstance(states["dense"]["w"], EigenKroneckerState)
  # A matrix name on a vector still falls back to diagonal.
  spec2 = {"conv": "auto", "dense": {"b": "kronecker", "w": "dense"}}
  assert structures.leaf_names(spec2, PARAMS) == {
      "conv": structures.AUTO_MATRIX, "dense": {"b": "diagonal", "w": "dense"}}


def test_leaf_names_from_a_callable():
  seen = []

  def pick(path, shape):
    seen.append((jax.tree_util.keystr(path), shape))
    return "dense" if len(shape) == 1 else ("ekfac" if len(shape) == 4 else "scalar")

  assert structures.leaf_names(pick, PARAMS) == {
      "conv": "ekfac", "dense": {"b": "dense", "w": "scalar"}}
  assert sorted(seen) == [("['conv']", (3, 3, 2, 4)), ("['dense']['b']", (5,)),
                          ("['dense']['w']", (4, 5))]


def test_leaf_names_mismatching_pytree_raises():
  with pytest.raises(ValueError, match="does not match params"):
    structures.leaf_names({"conv": "diagonal", "dense": "diagonal"}, PARAMS)
  with pytest.raises(ValueError, match="does not match params"):
    structures.init(PARAMS, {"conv": "diagonal",
                             "dense": {"b": "scalar", "w": "ekfac", "x": "dense"}})


@pytest.mark.parametrize("spec", [
    "shampoo", {"conv": "diagonal", "dense": {"b": "scalar", "w": "kfac"}},
    lambda path, shape: "nope"])
def test_leaf_names_unknown_name_raises(spec):
  with pytest.raises(ValueError, match="unknown"):
    structures.leaf_names(spec, PARAMS)


def test_dense_above_dense_max_raises():
  assert structures.leaf_names("dense", {"w": jnp.zeros((4, 5))}, dense_max=20)
  with pytest.raises(ValueError, match="dense_max"):
    structures.leaf_names("dense", {"w": jnp.zeros((4, 5))}, dense_max=19)
  with pytest.raises(ValueError, match="dense_max"):
    structures.init({"w": jnp.zeros((70, 70))}, "dense")  # 4900 > 4096


# --- ekfac statistics ---------------------------------------------------------


def _assert_eigenbasis(q, cov):
  q, cov = np.asarray(q, np.float64), np.asarray(cov, np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-5)
  rotated = q.T @ cov @ q
  off = rotated - np.diag(np.diag(rotated))
  assert np.abs(off).max() < 1e-5 * np.abs(cov).max()
  np.testing.assert_allclose(np.sort(np.diag(rotated)), np.linalg.eigvalsh(cov),
                             atol=1e-5 * np.abs(cov).max())


def _row_col_cov(g2):
  """Trace-normalised ``Σ_c G_c G_cᵀ`` and ``Σ_c G_cᵀ G_c``."""
  g2 = np.asarray(g2, np.float64)
  rows = sum(g @ g.T for g in g2)
  cols = sum(g.T @ g for g in g2)
  return rows / np.trace(rows), cols / np.trace(cols)


@pytest.mark.parametrize("shape", [(5, 3), (2, 2, 3, 4)])
def test_ekfac_statistics_give_eigenbases(shape):
  m, n = structures.matrix_shape(shape)
  # Anisotropic samples so the covariances have distinct eigenvalues.
  mix_a = normal(20, (m, m))
  g1 = jnp.einsum("ij,cjk->cik", mix_a,
                  normal(201, (6, m, n))).reshape((6,) + shape)
  g2 = normal(202, (6,) + shape) * jnp.linspace(0.5, 2.0, n)
  state = structures.EigenKronecker.init(shape, max_dim=64)

  first = structures.EigenKronecker.update_statistics(state, g1, 0.0)
  rows1, cols1 = _row_col_cov(g1.reshape(6, m, n))
  np.testing.assert_allclose(first.cov_in, rows1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(first.cov_out, cols1, rtol=1e-4, atol=1e-6)
  _assert_eigenbasis(first.basis_in, rows1)
  _assert_eigenbasis(first.basis_out, cols1)

  # An EMA of the normalised covariances, then its eigenbasis.
  second = structures.EigenKronecker.update_statistics(first, g2, 0.75)
  rows2, cols2 = _row_col_cov(g2.reshape(6, m, n))
  rows, cols = 0.75 * rows1 + 0.25 * rows2, 0.75 * cols1 + 0.25 * cols2
  np.testing.assert_allclose(second.cov_in, rows, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(second.cov_out, cols, rtol=1e-4, atol=1e-6)
  _assert_eigenbasis(second.basis_in, rows)
  _assert_eigenbasis(second.basis_out, cols)
  # The fitted scale is not a statistic.
  np.testing.assert_array_equal(second.scale, state.scale)


def test_ekfac_statistics_keep_identity_above_max_dim():
  state = structures.EigenKronecker.init((6, 3), max_dim=4)
  g = normal(21, (5, 6, 3))
  new = structures.EigenKronecker.update_statistics(state, g, 0.0)
  np.testing.assert_array_equal(new.basis_in, state.basis_in)  # vector: identity
  assert new.basis_out.shape == (3, 3)
  _assert_eigenbasis(new.basis_out, _row_col_cov(g)[1])


# --- dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(structures.STRUCTURES) + ["auto"])
def test_state_is_float32_for_bf16_params(name):
  params = {"b": jnp.zeros(4, jnp.bfloat16), "w": jnp.zeros((3, 4), jnp.bfloat16),
            "conv": jnp.zeros((2, 2, 1, 3), jnp.bfloat16)}
  states = structures.init(params, name)
  for leaf in jax.tree.leaves(states):
    assert leaf.dtype == jnp.float32, (name, leaf)
  g = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bfloat16), params)
  out = structures.apply(states, g)
  for k in params:
    assert out[k].dtype == jnp.bfloat16



@pytest.mark.parametrize("name", ["kronecker", "ekfac", "dense"])
def test_matrix_products_ask_for_full_precision(name):
  # GPUs/TPUs multiply float32 matrices in TF32/bf16 passes unless asked not
  # to; that lost ~3 digits and spoilt Kronecker/ekfac fits on an H200.
  shape = (6, 4)
  grads = jax.random.normal(jax.random.key(0), (3,) + shape)
  state = structures.init({"w": jnp.zeros(shape)}, name)["w"]
  cls = structures.structure_of(state)
  fns = [lambda s: cls.apply(s, grads[0])]
  if name == "ekfac":  # its statistics: covariances of the samples
    fns.append(lambda s: cls.update_statistics(s, grads, 0.5))
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  for fn in fns:
    dots = [e for e in jax.make_jaxpr(fn)(state).jaxpr.eqns
            if e.primitive.name == "dot_general"]
    assert dots, "no matrix product traced"
    assert all(e.params["precision"] == highest for e in dots), \
        [e.params["precision"] for e in dots]


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("name", list(structures.STRUCTURES))
def test_non_finite_input_gives_non_finite_output(name, bad):
  # llqr zeroes an update when U(g) is not finite, without checking g: every
  # structure must carry NaN/Inf through, even where U is zero (0 · Inf = NaN).
  shape = (5, 3)
  g = jnp.ones(shape).at[2, 1].set(bad)
  state = structures.init({"w": jnp.zeros(shape)}, name)["w"]
  cls = structures.structure_of(state)
  for s in (state, cls.scale(state, jnp.float32(0.0))):
    assert not bool(jnp.all(jnp.isfinite(cls.apply(s, g))))
