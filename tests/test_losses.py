"""Pins llqr_optax.losses against optax and hand-written formulas, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from llqr_optax import losses as L
from llqr_optax.geometry import Geometry

pytestmark = pytest.mark.x64  # float64 throughout (tests/conftest.py)
TOL = 1e-12


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  with helpers.most_optimizations_disabled():  # tiny programs
    yield


# Inputs come from NumPy: eager jax.random would compile per shape (slow).
def _rand(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape))


def _labels(seed, shape, k):
  return jnp.asarray(np.random.default_rng(seed).integers(0, k, shape), jnp.int32)


def _close(a, b, tol=TOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)
  assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"


def test_the_module_and_its_fixtures_run_in_float64(module_float):
  """The ``x64`` mark (tests/conftest.py) reaches module fixtures too."""
  assert module_float == jnp.zeros(()).dtype == jnp.float64


# --- values ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 5), (7,)])
def test_softmax_cross_entropy_matches_optax(shape):
  z = _rand(0, shape, 2.0)
  k = shape[-1]
  t = _labels(1, shape[:-1], k)
  onehot = jnp.asarray(np.eye(k)[np.asarray(t)])
  soft = np.exp(np.asarray(_rand(2, shape)))
  soft = jnp.asarray(soft / soft.sum(-1, keepdims=True))
  loss = L.get_loss("softmax_cross_entropy")

  @jax.jit
  def run(z, t, onehot, soft):
    return (loss(z, t), optax.softmax_cross_entropy_with_integer_labels(z, t).mean(),
            loss(z, onehot), optax.softmax_cross_entropy(z, onehot).mean(),
            loss(z, soft), optax.softmax_cross_entropy(z, soft).mean())

  got_int, ref_int, got_hot, ref_hot, got_soft, ref_soft = run(z, t, onehot, soft)
  _close(got_int, ref_int)
  _close(got_hot, ref_hot)
  _close(got_int, got_hot)  # integer and one-hot labels agree
  _close(got_soft, ref_soft)
  # eager (no jit) gives the same value
  _close(loss(z, t), ref_int)


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 5)])
def test_label_smoothing_matches_optax(shape):
  z = _rand(3, shape, 2.0)
  k = shape[-1]
  t = _labels(4, shape[:-1], k)
  onehot = jnp.asarray(np.eye(k)[np.asarray(t)])
  epsilons = (0.1, 0.5)

  @jax.jit
  def run(z, t, onehot):
    out = []
    for eps in epsilons:
      loss = L.softmax_cross_entropy(label_smoothing=eps)
      ref = optax.softmax_cross_entropy(z, optax.smooth_labels(onehot, eps)).mean()
      out.append((loss(z, t), loss(z, onehot), ref))
    return out, L.softmax_cross_entropy()(z, t)

  results, unsmoothed = run(z, t, onehot)
  for got_int, got_hot, ref in results:
    _close(got_int, ref)
    _close(got_hot, ref)
    # smoothing changes the value (the test could fail)
    assert abs(float(unsmoothed) - float(ref)) > 1e-3


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4)])
def test_sigmoid_binary_cross_entropy_matches_optax(shape):
  z = _rand(5, shape, 3.0)
  rng = np.random.default_rng(6)
  hard = jnp.asarray(rng.random(shape) < 0.4)
  soft = jnp.asarray(rng.random(shape))
  loss = L.get_loss("sigmoid_binary_cross_entropy")

  @jax.jit
  def run(z, hard, soft):
    hf = hard.astype(jnp.float64)
    return (loss(z, hf), optax.sigmoid_binary_cross_entropy(z, hf).mean(),
            loss(z, soft), optax.sigmoid_binary_cross_entropy(z, soft).mean(),
            loss(z, hard), loss(z, hard.astype(jnp.int32)))

  got_hard, ref_hard, got_soft, ref_soft, got_bool, got_int = run(z, hard, soft)
  _close(got_hard, ref_hard)
  _close(got_soft, ref_soft)
  _close(got_bool, ref_hard)  # bool targets
  _close(got_int, ref_hard)  # integer targets


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4)])
def test_squared_error_matches_optax(shape):
  z, t = _rand(8, shape), _rand(9, shape)
  loss = L.get_loss("squared_error")
  got, ref = jax.jit(lambda z, t: (loss(z, t), optax.l2_loss(z, t).mean()))(z, t)
  _close(got, ref)
  _close(got, 0.5 * np.mean((np.asarray(z) - np.asarray(t)) ** 2))


def test_docstring_values():
  _close(L.softmax_cross_entropy()(jnp.zeros((2, 4)), jnp.array([0, 3])),
         np.log(4.0))
  _close(L.sigmoid_binary_cross_entropy()(jnp.zeros(3), jnp.ones(3)),
         np.log(2.0))
  _close(L.squared_error()(jnp.array([1.0, 3.0]), jnp.zeros(2)), 2.5)


def test_losses_jit():
  z = _rand(10, (3, 2, 5))
  t = _labels(11, (3, 2), 5)
  for loss in (L.softmax_cross_entropy(0.2), L.squared_error(),
               L.sigmoid_binary_cross_entropy()):
    tt = t if loss.distribution == "categorical" else jax.nn.sigmoid(z)
    _close(jax.jit(loss.__call__)(z, tt), loss(z, tt))


def test_num_events_and_get_loss():
  z = jnp.zeros((3, 2, 5))
  assert L.get_loss("softmax_cross_entropy").num_events(z) == 6
  assert L.get_loss("sigmoid_binary_cross_entropy").num_events(z) == 30
  assert L.get_loss("squared_error").num_events(z) == 30
  user = L.get_loss(lambda o, t: jnp.mean(o - t))
  assert user.distribution is None
  assert user.num_events(z) == 3
  assert user.num_events(jnp.zeros(7)) == 7
  ce = L.softmax_cross_entropy()
  assert L.get_loss(ce) is ce
  assert L.get_loss("squared_error").distribution == "gaussian"
  assert L.get_loss("sigmoid_binary_cross_entropy").distribution == "bernoulli"
  assert ce.distribution == "categorical"


# --- Fisher, sampling, divergences --------------------------------------------


@pytest.mark.parametrize("name,shape", [
    ("softmax_cross_entropy", (3, 2, 4)),
    ("softmax_cross_entropy", (5, 3)),
    ("sigmoid_binary_cross_entropy", (4, 3)),
    ("squared_error", (2, 3, 2)),
])
def test_fisher_product_dense(name, shape):
  loss = L.get_loss(name)
  z = _rand(12, shape, 2.0)
  v = _rand(13, shape)
  ref = helpers.dense_fisher(loss.distribution, z) @ np.asarray(v).reshape(-1)
  got = jax.jit(lambda z, v: L.fisher_product(loss, z, v))(z, v)
  _close(got.reshape(-1), ref)


def test_fisher_product_user_loss_raises():
  user = L.get_loss(lambda o, t: jnp.mean(o - t))
  with pytest.raises(ValueError, match="needs the predictive distribution"):
    L.fisher_product(user, jnp.zeros((3, 2)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="needs the predictive distribution"):
    L.sample_targets(user, jax.random.key(0), jnp.zeros((3, 2)))


def test_sample_targets_distribution():
  keys = jax.random.split(jax.random.key(14), 20000)
  z = jnp.array([[1.0, -0.5, 0.3], [0.0, 2.0, -1.0]])
  zb = jnp.array([-1.0, 0.0, 2.0])
  ce, bce, se = (L.softmax_cross_entropy(), L.sigmoid_binary_cross_entropy(),
                 L.squared_error())

  @jax.jit
  def run(keys):
    draw = lambda loss, out: jax.vmap(lambda k: L.sample_targets(loss, k, out))(keys)
    return draw(ce, z), draw(bce, zb), draw(se, zb)

  s_ce, s_bce, s_se = run(keys)
  assert s_ce.shape == (20000, 2) and jnp.issubdtype(s_ce.dtype, jnp.integer)
  freq = (np.asarray(s_ce)[..., None] == np.arange(3)).mean(0)
  p = np.exp(np.asarray(z))
  np.testing.assert_allclose(freq, p / p.sum(-1, keepdims=True), atol=0.015)

  assert s_bce.shape == (20000, 3) and s_bce.dtype == zb.dtype
  np.testing.assert_allclose(np.mean(s_bce, 0), 1 / (1 + np.exp(-np.asarray(zb))),
                             atol=0.015)

  assert s_se.shape == (20000, 3) and s_se.dtype == zb.dtype
  np.testing.assert_allclose(np.mean(s_se, 0), zb, atol=0.03)
  np.testing.assert_allclose(np.var(s_se, 0), 1.0, atol=0.05)


DIVERGENCES = (("renyi", 0.5), ("renyi", 2.0), ("renyi", 3.5), ("reverse_kl", 0.5))


@pytest.mark.parametrize("name,shape", [
    ("softmax_cross_entropy", (3, 2, 4)),
    ("sigmoid_binary_cross_entropy", (4, 3)),
    ("squared_error", (2, 3)),
])
def test_divergence_values(name, shape):
  loss = L.get_loss(name)
  zp, zq = _rand(15, shape), _rand(16, shape)
  div = jax.jit(lambda a, b: [Geometry(kind, alpha=alpha).divergence(loss, a, b)
                              for kind, alpha in DIVERGENCES])
  for (kind, alpha), d, d0 in zip(DIVERGENCES, div(zp, zq), div(zp, zp)):
    _close(d, helpers.ref_divergence(loss.distribution, kind, alpha, zp, zq), 1e-11)
    assert abs(float(d0)) < 1e-13, (kind, alpha)


# --- errors --------------------------------------------------------------------


def test_unknown_loss_name():
  with pytest.raises(ValueError, match="is not a built-in loss"):
    L.get_loss("cross_entropy")
  with pytest.raises(ValueError, match="neither a name nor a callable"):
    L.get_loss(3)


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5])
def test_bad_label_smoothing(eps):
  with pytest.raises(ValueError, match="label_smoothing"):
    L.softmax_cross_entropy(label_smoothing=eps)


@pytest.mark.parametrize("name,z_shape,t", [
    ("softmax_cross_entropy", (5, 3), jnp.zeros((4,), jnp.int32)),
    ("softmax_cross_entropy", (5, 3), jnp.zeros((5, 3), jnp.int32)),
    ("softmax_cross_entropy", (5, 3), jnp.zeros((5, 4))),
    ("softmax_cross_entropy", (5, 3), jnp.zeros((5,))),
    ("softmax_cross_entropy", (2, 5, 3), jnp.zeros((5,), jnp.int32)),
    ("softmax_cross_entropy", (5, 3), jnp.zeros((5,), jnp.complex64)),
    ("sigmoid_binary_cross_entropy", (5, 3), jnp.zeros((5,))),
    ("sigmoid_binary_cross_entropy", (5, 3), jnp.zeros((3, 5))),
    ("squared_error", (5, 3), jnp.zeros((5, 3, 1))),
    ("squared_error", (5, 3), jnp.zeros((15,))),
    ("squared_error", (5, 3), jnp.zeros((5, 3), jnp.complex64)),
])
def test_wrong_targets(name, z_shape, t):
  loss = L.get_loss(name)
  with pytest.raises(ValueError, match="do not fit outputs"):
    loss(jnp.zeros(z_shape), t)
