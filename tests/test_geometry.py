"""Pins llqr_optax.geometry against explicitly materialised matrices, in float64.

Every reference is built independently of the library: the Jacobian with
``jax.jacfwd`` on ravelled parameters, output Hessians with ``jax.hessian`` of
optax's losses, Fisher blocks by hand in NumPy, per-event gradients with
``jax.grad`` of each event's own optax loss, and the divergences written out
here. The library's products must match ``dense_matrix @ v`` to 1e-10.

The one thing taken from the library is the Monte-Carlo Fisher's sampled labels
(``losses.sample_targets`` on ``jax.random.split(key, num_samples)``, the
library's convention); their distribution is pinned separately, by the mean
over many keys approaching the exact Fisher here and in test_losses.py.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import helpers
from helpers import mlp
from llqr_optax import geometry as G
from llqr_optax import losses as L

pytestmark = pytest.mark.x64  # float64 throughout (tests/conftest.py)
TOL = 1e-10
_ERRORS = {}  # (tolerance, check) -> largest relative error seen (shown with -s)


def _assert_rel(got, ref, tol=TOL, tag=None):
  err = helpers.rel_err(got, ref)
  if tag is None:
    tag = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
  _ERRORS[tol, tag] = max(_ERRORS.get((tol, tag), 0.0), err)
  assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"
  return err


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles_and_report():
  # These tests compile a few dozen tiny programs; XLA's optimisation passes
  # dominate their run time and buy nothing here. The flag only changes how programs
  # compiled inside this module are optimised; it is restored afterwards.
  with helpers.most_optimizations_disabled():
    yield
  for tol in sorted({t for t, _ in _ERRORS}):
    errs = {k: e for (t, k), e in _ERRORS.items() if t == tol}
    worst = max(errs, key=errs.get)
    print(f"\n[test_geometry] tolerance {tol:.0e}: {len(errs)} checks, max relative "
          f"error {errs[worst]:.3e} ({worst})")


# --- model and problems --------------------------------------------------------


def _init(rng, d_in, hidden, d_out):
  """Parameters of ``helpers.mlp``, drawn from NumPy's ``rng`` (float64)."""
  w1 = jnp.asarray(rng.standard_normal((d_in, hidden)) / np.sqrt(d_in))
  b1 = jnp.asarray(0.3 * rng.standard_normal(hidden))
  w2 = jnp.asarray(rng.standard_normal((hidden, d_out)) * 1.5 / np.sqrt(hidden))
  b2 = jnp.asarray(0.3 * rng.standard_normal(d_out))
  return {"l0": {"w": w1, "b": b1}, "l1": {"w": w2, "b": b2}}


# Per-event reference losses from optax, on one event (a row of logits for the
# softmax, a single element otherwise).
_EVENT_LOSS = {
    "categorical": optax.softmax_cross_entropy_with_integer_labels,
    "bernoulli": optax.sigmoid_binary_cross_entropy,
    "gaussian": optax.l2_loss,
}
_LOSS_NAME = {
    "categorical": "softmax_cross_entropy",
    "bernoulli": "sigmoid_binary_cross_entropy",
    "gaussian": "squared_error",
}
# (problem, distribution, input shape, output width); inputs are (..., 3).
_SPECS = {
    "softmax_seq": ("categorical", (4, 2, 3), 5),  # logits (batch, seq, classes)
    "sigmoid": ("bernoulli", (5, 3), 3),
    "squared": ("gaussian", (4, 3), 2),
}
PROBLEMS = list(_SPECS)
MC_KEY = jax.random.key(1234)
DIVERGENCES = (("renyi", 0.5), ("renyi", 2.0), ("reverse_kl", 1.0))


@dataclasses.dataclass(frozen=True)
class Problem:
  name: str
  dist: str
  params: dict
  x: jax.Array
  targets: jax.Array

  @property
  def apply_fn(self):
    return lambda p: mlp(p, self.x)

  @property
  def loss(self):
    return _LOSS_NAME[self.dist]

  @property
  def out_shape(self):
    return self.x.shape[:-1] + (self.params["l1"]["b"].shape[0],)

  @property
  def event_size(self):
    return self.out_shape[-1] if self.dist == "categorical" else 1

  @property
  def n(self):
    return int(np.prod(self.out_shape)) // self.event_size

  @property
  def num_params(self):
    return ravel_pytree(self.params)[0].size

  def vec(self, seed):
    """A random params-shaped pytree."""
    flat = np.random.default_rng(seed).standard_normal(self.num_params)
    return ravel_pytree(self.params)[1](jnp.asarray(flat))

  @staticmethod
  def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


@functools.lru_cache(maxsize=None)
def problem(name):
  dist, x_shape, d_out = _SPECS[name]
  rng = np.random.default_rng(sorted(_SPECS).index(name))
  params = _init(rng, x_shape[-1], 5, d_out)
  x = jnp.asarray(rng.standard_normal(x_shape))
  out_shape = x_shape[:-1] + (d_out,)
  if dist == "categorical":
    targets = jnp.asarray(rng.integers(0, d_out, out_shape[:-1]), jnp.int32)
  elif dist == "bernoulli":
    targets = jnp.asarray((rng.random(out_shape) < 0.5).astype(np.float64))
  else:
    targets = jnp.asarray(rng.standard_normal(out_shape))
  return Problem(name, dist, params, x, targets)


@functools.lru_cache(maxsize=None)
def refs(name):
  """Every dense reference of a problem, from one compiled function."""
  pb = problem(name)
  dist, shape, s, n = pb.dist, pb.out_shape, pb.event_size, pb.n
  ev_loss = _EVENT_LOSS[dist]

  def mean_loss(z):
    return ev_loss(z, pb.targets).mean()

  def event_grads(z, t):
    """``∇_{z_e} ℓ_e`` of each event's own optax loss, shape (n, s)."""
    if dist == "categorical":
      f = lambda z_e, t_e: ev_loss(z_e, t_e)
      t = t.reshape(n)
    else:
      f = lambda z_e, t_e: ev_loss(z_e, t_e).sum()  # one element per event
      t = t.reshape(n, 1)
    return jax.vmap(jax.grad(f))(z.reshape(n, s), t)

  @jax.jit
  def compute(params, x, key):
    flat, unravel = ravel_pytree(params)
    z = mlp(params, x)
    zf = z.ravel()
    r = {"outputs": z,
         "J": jax.jacfwd(lambda f: mlp(unravel(f), x).ravel())(flat),
         "H": jax.hessian(lambda q: mean_loss(q.reshape(shape)))(zf),
         "newton": jax.hessian(lambda f: mean_loss(mlp(unravel(f), x)))(flat),
         "ev_grads": event_grads(z, pb.targets)}
    # labels drawn as the library draws them: split(key, num_samples)
    loss = L.get_loss(pb.loss)
    keys = jnp.concatenate([jax.random.split(key, 1), jax.random.split(key, 3)])
    grads = jax.vmap(lambda k: event_grads(z, L.sample_targets(loss, k, z)))(keys)
    r["mc_grads_1"], r["mc_grads_3"] = grads[:1], grads[1:]
    for kind, alpha in DIVERGENCES:
      r[f"{kind}-{alpha}"] = jax.hessian(
          lambda q: helpers.ref_divergence(dist, kind, alpha, z, q.reshape(shape),
                                         xp=jnp))(zf)
    return r

  return jax.tree.map(np.asarray, compute(pb.params, pb.x, MC_KEY))


# --- dense matrices, built independently --------------------------------------


def dense_fisher(name):
  return helpers.dense_fisher(problem(name).dist, refs(name)["outputs"])


def dense_outer_metric(name, grads):
  """``(1/n) Σ_e g_e g_eᵀ`` on each event's diagonal block, as an (m, m) matrix."""
  pb = problem(name)
  s = pb.event_size
  out = np.zeros((pb.n * s,) * 2)
  for e, g in enumerate(grads):
    out[e * s:(e + 1) * s, e * s:(e + 1) * s] = np.outer(g, g)
  return out / pb.n


def empirical_fisher_params(name, grads):
  """``(1/n) Σ_e J_eᵀ ∇ℓ_e ∇ℓ_eᵀ J_e`` summed directly in parameter space."""
  pb = problem(name)
  s, jac = pb.event_size, refs(name)["J"]
  c = np.zeros((jac.shape[1],) * 2)
  for e, g in enumerate(grads):
    u = jac[e * s:(e + 1) * s].T @ g
    c += np.outer(u, u)
  return c / pb.n


def _parse(geometry):
  if isinstance(geometry, G.Geometry):
    return geometry.name, geometry.alpha, geometry.num_samples
  return geometry, 0.5, 1


def dense_output_metric(name, geometry):
  """The output-space metric Q of a geometry, as an (m, m) matrix."""
  g, alpha, num = _parse(geometry)
  r = refs(name)
  if g in ("ggn", "newton"):
    return r["H"]
  if g == "fisher":
    return dense_fisher(name)
  if g == "empirical_fisher":
    return dense_outer_metric(name, r["ev_grads"])
  if g == "mc_fisher":
    return sum(dense_outer_metric(name, gr) for gr in r[f"mc_grads_{num}"]) / num
  return r[f"{g}-{alpha if g == 'renyi' else 1.0}"]


def dense_curvature(name, geometry):
  """The parameter-space curvature C, as a (P, P) matrix."""
  g, _, num = _parse(geometry)
  r = refs(name)
  if g == "newton":
    return r["newton"]
  if g == "empirical_fisher":
    return empirical_fisher_params(name, r["ev_grads"])
  if g == "mc_fisher":
    return sum(empirical_fisher_params(name, gr) for gr in r[f"mc_grads_{num}"]) / num
  return r["J"].T @ dense_output_metric(name, geometry) @ r["J"]


GEOMETRIES = [
    "ggn", "fisher", "empirical_fisher", "mc_fisher", "newton",
    G.Geometry("renyi", alpha=0.5), G.Geometry("renyi", alpha=2.0), "reverse_kl",
    G.Geometry("mc_fisher", num_samples=3),
]


def _gid(g):
  if isinstance(g, G.Geometry):
    return f"{g.name}-a{g.alpha}" if g.name == "renyi" else f"{g.name}-s{g.num_samples}"
  return g


def _key_for(geometry):
  return MC_KEY if _parse(geometry)[0] == "mc_fisher" else None


# --- the library's products ---------------------------------------------------------
#
# Each problem compiles ONE program computing every geometry's product (one
# compile is much cheaper than nine); damping, inputs and the key are traced
# arguments, so the same program serves every test below.


@functools.lru_cache(maxsize=None)
def _bundle(name):
  pb = problem(name)

  @jax.jit
  def products(params, x, t, v, damping, key):
    # apply_fn closes over x, a jit argument
    return {_gid(g): G.curvature_product(
        lambda p: mlp(p, x), params, t, loss=pb.loss, geometry=g,
        damping=damping, key=key if _key_for(g) is not None else None)(v)
            for g in GEOMETRIES}
  return products


@functools.lru_cache(maxsize=None)
def lib_products(name, seed, damping=0.0, key_seed=None):
  """Flat ``(C + λI) v`` for every geometry, ``v = problem.vec(seed)``."""
  pb = problem(name)
  key = MC_KEY if key_seed is None else jax.random.key(key_seed)
  out = _bundle(name)(pb.params, pb.x, pb.targets, pb.vec(seed),
                      jnp.asarray(damping), key)
  for tree in out.values():
    assert jax.tree.structure(tree) == jax.tree.structure(pb.params)
  return {k: pb.flat(tree) for k, tree in out.items()}


GRID = [(name, g) for name in PROBLEMS for g in GEOMETRIES]


@pytest.mark.parametrize("name,geometry", GRID,
                         ids=[f"{n}-{_gid(g)}" for n, g in GRID])
def test_curvature_product_dense(name, geometry):
  pb = problem(name)
  v = pb.flat(pb.vec(1))
  cv = dense_curvature(name, geometry) @ v
  _assert_rel(lib_products(name, 1)[_gid(geometry)], cv)
  _assert_rel(lib_products(name, 1, 0.3)[_gid(geometry)], cv + 0.3 * v)
  assert np.linalg.norm(cv) > 1e-3 * np.linalg.norm(v)  # not trivial


@functools.lru_cache(maxsize=None)
def lib_metrics(name):
  pb = problem(name)
  z = refs(name)["outputs"]
  u = np.random.default_rng(2).standard_normal(z.shape)

  @jax.jit
  def metrics(z, t, u, key):
    return {_gid(g): G.output_metric(
        g, pb.loss, z, t, key=key if _key_for(g) is not None else None)(u)
            for g in GEOMETRIES}
  out = metrics(jnp.asarray(z), pb.targets, jnp.asarray(u), MC_KEY)
  return u, jax.tree.map(np.asarray, out)


METRIC_GRID = [(n, g) for n, g in GRID if n != "squared"]  # Q = I/n there


@pytest.mark.parametrize("name,geometry", METRIC_GRID,
                         ids=[f"{n}-{_gid(g)}" for n, g in METRIC_GRID])
def test_output_metric_dense(name, geometry):
  """The output-space metric Q alone."""
  u, got = lib_metrics(name)
  got = got[_gid(geometry)]
  assert got.shape == u.shape
  _assert_rel(got.ravel(), dense_output_metric(name, geometry) @ u.ravel())


def test_linearization_and_jit_match_eager():
  """Eager (un-jitted) ``linearize``/``matvec`` and its pieces; jit == eager."""
  name = "softmax_seq"
  pb = problem(name)
  r = refs(name)
  c = dense_curvature(name, "ggn")
  lin = G.linearize(pb.apply_fn, pb.params, pb.targets, loss=pb.loss, geometry="ggn")
  _assert_rel(lin.outputs, r["outputs"])
  assert lin.hvp is None
  for seed, lam in ((3, 0.0), (4, 1e-2)):  # several products, one linearisation
    v = pb.vec(seed)
    _assert_rel(pb.flat(lin.matvec(v, lam)), c @ pb.flat(v) + lam * pb.flat(v))
  v = pb.vec(5)
  _assert_rel(np.asarray(lin.jvp(v)).ravel(), r["J"] @ pb.flat(v))
  u = np.random.default_rng(6).standard_normal(r["outputs"].shape)
  _assert_rel(pb.flat(lin.vjp(jnp.asarray(u))), r["J"].T @ u.ravel())
  # eager curvature_product == the jit-compiled one (inputs are jit arguments)
  eager = G.curvature_product(pb.apply_fn, pb.params, pb.targets, loss=pb.loss,
                              geometry="ggn", damping=0.05)(pb.vec(1))
  _assert_rel(lib_products(name, 1, 0.05)["ggn"], eager, 1e-12)
  # new inputs of the same shapes and a new damping: no retrace
  lib_products(name, 1, 0.25)
  _bundle(name)(pb.params, pb.x + 1.0, pb.targets, pb.vec(2), jnp.asarray(0.1), MC_KEY)
  assert _bundle(name)._cache_size() == 1


def test_newton_linearization():
  name = "sigmoid"
  pb = problem(name)
  v = pb.vec(7)
  lin = jax.jit(lambda p, x, t, v: G.linearize(
      lambda q: mlp(q, x), p, t, loss=pb.loss, geometry="newton").matvec(v, 0.2))
  _assert_rel(pb.flat(lin(pb.params, pb.x, pb.targets, v)),
              refs(name)["newton"] @ pb.flat(v) + 0.2 * pb.flat(v))


@pytest.mark.parametrize("name", PROBLEMS)
def test_damping_adds_exactly_lambda_v(name):
  pb = problem(name)
  v = pb.flat(pb.vec(1))
  base = lib_products(name, 1, 0.0)
  for lam in (1e-3, 2.5):
    damped = lib_products(name, 1, lam)
    for g in GEOMETRIES:
      np.testing.assert_allclose(damped[_gid(g)] - base[_gid(g)], lam * v,
                                 rtol=1e-12, atol=1e-15, err_msg=_gid(g))


def test_array_damping_keeps_param_dtype():
  """A float64 array damping (as inject_hyperparams passes) must not promote leaves."""
  pb = problem("squared")
  cast = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
  out = jax.jit(lambda p, x, t, v, lam: G.curvature_product(
      lambda q: mlp(q, x), p, t, loss="squared_error", damping=lam)(v))(
          cast(pb.params), cast(pb.x), cast(pb.targets), cast(pb.vec(17)),
          jnp.asarray(0.1, jnp.float64))
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(out))


# --- known identities -------------------------------------------------------------


@pytest.mark.parametrize("name", PROBLEMS)
def test_fisher_equals_ggn_for_canonical_losses(name):
  pb = problem(name)
  f, h, jac = dense_fisher(name), refs(name)["H"], refs(name)["J"]
  _assert_rel(f, h)  # the references agree with each other ...
  ref = jac.T @ h @ jac @ pb.flat(pb.vec(1))
  _assert_rel(lib_products(name, 1)["fisher"], ref)  # ... and with the library
  _assert_rel(lib_products(name, 1)["ggn"], ref)


def test_fisher_equals_ggn_with_label_smoothing():
  name, eps = "softmax_seq", 0.2
  pb = problem(name)
  r = refs(name)
  shape = r["outputs"].shape
  onehot = jax.nn.one_hot(pb.targets, shape[-1], dtype=jnp.float64)
  v = pb.vec(11)
  loss = L.softmax_cross_entropy(label_smoothing=eps)

  @jax.jit
  def run(params, x, ti, th, v):
    z = mlp(params, x)
    smoothed = optax.smooth_labels(th, eps)
    h = jax.hessian(lambda q: optax.softmax_cross_entropy(
        q.reshape(shape), smoothed).mean())(z.ravel())
    cvp = lambda t, g: G.curvature_product(lambda p: mlp(p, x), params, t,
                                           loss=loss, geometry=g)(v)
    return h, cvp(ti, "ggn"), cvp(th, "ggn"), cvp(ti, "empirical_fisher")

  h, got_int, got_hot, ef = run(pb.params, pb.x, pb.targets, onehot, v)
  h = np.asarray(h)
  _assert_rel(h, dense_fisher(name))
  ref = r["J"].T @ h @ r["J"] @ pb.flat(v)
  _assert_rel(pb.flat(got_int), ref)
  _assert_rel(pb.flat(got_hot), ref)
  # smoothing changes the gradients, which the empirical Fisher sees
  plain = empirical_fisher_params(name, r["ev_grads"]) @ pb.flat(v)
  assert helpers.rel_err(ef, plain) > 1e-3


@pytest.mark.parametrize("name", PROBLEMS)
def test_divergence_hessians_are_multiples_of_fisher(name):
  """Rényi-α Hessian == α·Fisher, reverse-KL Hessian == Fisher."""
  pb = problem(name)
  f, r = dense_fisher(name), refs(name)
  jfj_v = r["J"].T @ f @ r["J"] @ pb.flat(pb.vec(1))
  got = lib_products(name, 1)
  for alpha in (0.5, 2.0):
    _assert_rel(r[f"renyi-{alpha}"], alpha * f)
    _assert_rel(got[f"renyi-a{alpha}"], alpha * jfj_v)
  _assert_rel(r["reverse_kl-1.0"], f)
  _assert_rel(got["reverse_kl"], jfj_v)


def test_divergence_and_fisher_need_no_targets():
  name = "sigmoid"
  pb = problem(name)
  f = jax.jit(lambda p, x, v: [G.curvature_product(
      lambda q: mlp(q, x), p, loss=pb.loss, geometry=g)(v)
      for g in ("fisher", "reverse_kl")])
  fisher, rkl = f(pb.params, pb.x, pb.vec(1))
  _assert_rel(pb.flat(fisher), lib_products(name, 1)["fisher"], 1e-13)
  _assert_rel(pb.flat(rkl), lib_products(name, 1)["reverse_kl"], 1e-13)


# --- Monte-Carlo Fisher -------------------------------------------------------------


def test_mc_fisher_mean_approaches_fisher():
  num_keys = 20000
  keys = jax.random.split(jax.random.key(99), num_keys)
  args = {name: (problem(name).params, problem(name).x, problem(name).vec(14))
          for name in PROBLEMS}

  @jax.jit
  def mean_products(args, keys):
    out = {}
    for name, (params, x, v) in args.items():
      def one(key):
        return G.curvature_product(lambda p: mlp(p, x), params,
                                   loss=problem(name).loss,
                                   geometry="mc_fisher", key=key)(v)
      out[name] = jax.tree.map(lambda a: a.mean(0), jax.vmap(one)(keys))
    return out

  means = mean_products(args, keys)
  for name in PROBLEMS:
    pb, r = problem(name), refs(name)
    exact = r["J"].T @ dense_fisher(name) @ r["J"] @ pb.flat(args[name][2])
    err = _assert_rel(pb.flat(means[name]), exact, 5e-2, tag=f"mc-mean-{name}")
    assert err > 1e-6, name  # a random estimate, not the exact Fisher
    # the key matters
    a = lib_products(name, 1)["mc_fisher"]
    b = lib_products(name, 1, key_seed=5)["mc_fisher"]
    assert helpers.rel_err(a, b) > 1e-6, name


# --- user losses -----------------------------------------------------------------------


def _logcosh(z, t):
  return jnp.mean(jnp.log(jnp.cosh(z - t)))


def test_user_loss_ggn_newton_empirical_fisher():
  name = "softmax_seq"  # outputs (4, 2, 5): a user loss's events are the 4 rows
  pb = problem(name)
  r = refs(name)
  shape = r["outputs"].shape
  t = jnp.asarray(np.random.default_rng(15).standard_normal(shape))
  v = pb.vec(16)

  @jax.jit
  def run(params, x, t, v):
    flat, unravel = ravel_pytree(params)
    z = mlp(params, x)
    h = jax.hessian(lambda q: _logcosh(q.reshape(shape), t))(z.ravel())
    hn = jax.hessian(lambda f: _logcosh(mlp(unravel(f), x), t))(flat)
    # each row's own loss: the mean of log cosh over that row
    g = jax.vmap(jax.grad(lambda ze, te: jnp.mean(jnp.log(jnp.cosh(ze - te)))))(z, t)
    cvp = lambda g, lam: G.curvature_product(lambda p: mlp(p, x), params, t,
                                             loss=_logcosh, geometry=g,
                                             damping=lam)(v)
    return h, hn, g, cvp("ggn", 0.0), cvp("ggn", 0.7), cvp("newton", 0.0), \
        cvp("empirical_fisher", 0.0)

  h, hn, g, ggn, ggn_damped, newton, ef = jax.tree.map(np.asarray,
                                                       run(pb.params, pb.x, t, v))
  fv = pb.flat(v)
  jtv = r["J"].T @ h @ r["J"] @ fv
  _assert_rel(pb.flat(ggn), jtv)
  _assert_rel(pb.flat(ggn_damped), jtv + 0.7 * fv)
  _assert_rel(pb.flat(newton), hn @ fv)
  rows = shape[0]
  per_row = r["J"].reshape(rows, -1, r["J"].shape[1])  # (rows, row size, P)
  c = sum(np.outer(per_row[e].T @ g[e].ravel(), per_row[e].T @ g[e].ravel())
          for e in range(rows)) / rows
  _assert_rel(pb.flat(ef), c @ fv)


@pytest.mark.parametrize("geometry", ["fisher", "mc_fisher", "renyi", "reverse_kl"])
def test_user_loss_needs_distribution(geometry):
  pb = problem("squared")
  with pytest.raises(ValueError, match="needs the predictive distribution"):
    G.curvature_product(pb.apply_fn, pb.params, pb.targets, loss=_logcosh,
                        geometry=geometry, key=jax.random.key(0))


# --- errors -------------------------------------------------------------------------------


def _cvp(**kw):
  pb = problem("softmax_seq")
  args = dict(loss=pb.loss)
  args.update(kw)
  targets = args.pop("targets", pb.targets)
  return G.curvature_product(pb.apply_fn, pb.params, targets, **args)


def test_unknown_names():
  with pytest.raises(ValueError, match="is unknown"):
    _cvp(geometry="gauss_newton")
  with pytest.raises(ValueError, match="is unknown"):
    G.Geometry("natural")
  with pytest.raises(ValueError, match="neither a name nor a Geometry"):
    G.get_geometry(3)
  with pytest.raises(ValueError, match="is not a built-in loss"):
    _cvp(loss="cross_entropy")


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.0, float("nan")])
def test_bad_renyi_alpha(alpha):
  with pytest.raises(ValueError, match="not a valid Rényi order"):
    G.Geometry("renyi", alpha=alpha)
  with pytest.raises(ValueError, match="not a valid Rényi order"):
    _cvp(geometry=G.Geometry("renyi", alpha=alpha))


@pytest.mark.parametrize("num_samples", [0, -1, 1.5])
def test_bad_num_samples(num_samples):
  with pytest.raises(ValueError, match="num_samples"):
    G.Geometry("mc_fisher", num_samples=num_samples)


@pytest.mark.parametrize("damping", [-0.1, -1, float("nan"), np.float32(-0.1),
                                     np.array(-2.0), jnp.asarray(-0.5)],
                         ids=["float", "int", "nan", "np.float32", "np-0d", "jax-0d"])
def test_bad_damping(damping):
  with pytest.raises(ValueError, match="damping=.* is invalid"):
    _cvp(damping=damping)


def test_mc_fisher_needs_key():
  with pytest.raises(ValueError, match="needs a PRNG key"):
    _cvp(geometry="mc_fisher")


@pytest.mark.parametrize("geometry", ["ggn", "newton", "empirical_fisher"])
def test_geometries_need_targets(geometry):
  with pytest.raises(ValueError, match="needs targets"):
    _cvp(geometry=geometry, targets=None)


@pytest.mark.parametrize("name,targets", [
    ("softmax_seq", jnp.zeros((4,), jnp.int32)),       # logits are (4, 2, 5)
    ("softmax_seq", jnp.zeros((4, 2, 4))),             # one-hot of the wrong width
    ("softmax_seq", jnp.zeros((4, 2, 5), jnp.int32)),  # integer "one-hot"
    ("sigmoid", jnp.zeros((5,))),                      # outputs are (5, 3)
    ("squared", jnp.zeros((4, 2, 1))),                 # outputs are (4, 2)
], ids=["int-labels", "one-hot-width", "int-one-hot", "sigmoid", "squared"])
@pytest.mark.parametrize("geometry", ["ggn", "empirical_fisher", "newton"])
def test_wrong_targets_raise(name, targets, geometry):
  pb = problem(name)
  with pytest.raises(ValueError, match="do not fit outputs"):
    G.curvature_product(pb.apply_fn, pb.params, targets, loss=pb.loss,
                        geometry=geometry)
