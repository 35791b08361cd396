"""The exact layerwise-LQR reference: Riccati == dense == CG, in float64."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

import helpers
from helpers import rel_err
from llqr_optax import exact
from llqr_optax import losses
from llqr_optax.geometry import Geometry

pytestmark = pytest.mark.x64  # float64 throughout (tests/conftest.py)
CE = "softmax_cross_entropy"
SE = "squared_error"


# --- models: (Sequential, params_list, inputs, targets) ---------------------


def _dense(p, x):
  return x @ p["w"] + p["b"]


def _tanh_dense(p, x):
  return jnp.tanh(_dense(p, x))


def _relu(p, x):
  del p
  return jax.nn.relu(x)


# Test data comes from numpy's generator: jax.random would compile a kernel
# per shape, which costs more than the tests themselves.


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape))


def _init_dense(rng, fan_in, fan_out):
  return {"w": _normal(rng, fan_in, fan_out) / np.sqrt(fan_in),
          "b": 0.1 * _normal(rng, fan_out)}


def _targets(rng, loss, batch, out):
  if loss == CE:
    return jnp.asarray(rng.integers(0, out, (batch,)))
  return _normal(rng, batch, out)


def tanh_mlp(loss=CE, seed=0, batch=4, sizes=(5, 6, 6, 3)):
  rng = np.random.default_rng(seed)
  model = exact.Sequential((_tanh_dense, _tanh_dense, _dense))
  params = [_init_dense(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]
  x = _normal(rng, batch, sizes[0])
  return model, params, x, _targets(rng, loss, batch, sizes[-1])


def relu_mlp(loss=CE, seed=1, batch=5, sizes=(4, 7, 5, 3)):
  """Three biased dense layers, with the ReLUs as parameter-free layers."""
  rng = np.random.default_rng(seed)
  model = exact.Sequential((_dense, _relu, _dense, _relu, _dense))
  dense = [_init_dense(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]
  params = [dense[0], None, dense[1], {}, dense[2]]
  x = _normal(rng, batch, sizes[0])
  return model, params, x, _targets(rng, loss, batch, sizes[-1])


def _conv(p, x):
  y = jax.lax.conv_general_dilated(x, p["w"], (1,), "SAME",
                                   dimension_numbers=("NWC", "WIO", "NWC"))
  return jnp.tanh(y + p["b"])


def _flatten(p, x):
  del p
  return x.reshape(x.shape[0], -1)


def conv_net(loss=CE, seed=2, batch=4, length=6, channels=(2, 3, 3), out=3):
  """Two 1-D convolutions on (batch, length, channels), flatten, dense."""
  rng = np.random.default_rng(seed)
  conv = [{"w": _normal(rng, 3, a, b) / np.sqrt(3 * a), "b": 0.1 * _normal(rng, b)}
          for a, b in zip(channels[:-1], channels[1:])]
  model = exact.Sequential((_conv, _conv, _flatten, _dense))
  params = conv + [None, _init_dense(rng, length * channels[-1], out)]
  x = _normal(rng, batch, length, channels[0])
  return model, params, x, _targets(rng, loss, batch, out)


MODELS = {"tanh_mlp": tanh_mlp, "relu_mlp": relu_mlp, "conv_net": conv_net}

# (geometry, damping, intermediate); intermediate keys are chain indices.
CASES = {
    "ggn": ("ggn", 1e-2, None),
    "fisher": ("fisher", 1e-2, None),
    "newton": ("newton", 3.0, None),
    "renyi_0.5": (Geometry("renyi", alpha=0.5), 1e-2, None),
    "intermediate": ("ggn", 1e-2, {1: 0.3, 2: 0.05}),
}


def _unflat(tree, vec):
  """A flat numpy vector back to the structure of ``tree`` (ravel order)."""
  leaves, treedef = jax.tree.flatten(tree)
  splits = np.cumsum([np.size(leaf) for leaf in leaves])[:-1]
  parts = np.split(np.asarray(vec), splits)
  return jax.tree.unflatten(
      treedef, [p.reshape(np.shape(leaf)) for p, leaf in zip(parts, leaves)])


def dense_reference(apply_fn, params, y, *, loss, geometry="ggn", damping,
                    extra=None):
  """``(step, min_eig)``: the dense damped step ``-(C + λI)⁻¹g`` and the
  smallest eigenvalue of ``C + λI``, with ``C`` from ``exact.dense_curvature``
  (compiled in one piece) and the solve in numpy. ``extra(params)`` gives an
  optional ``extra_curvature``."""
  @jax.jit
  def curvature_and_gradient(params):
    c = exact.dense_curvature(apply_fn, params, y, loss=loss, geometry=geometry,
                              extra_curvature=extra and extra(params))
    g = jax.grad(lambda p: losses.get_loss(loss)(apply_fn(p), y))(params)
    return c, ravel_pytree(g)[0]
  c, g = (np.asarray(v) for v in curvature_and_gradient(params))
  c = c + damping * np.eye(g.size)
  return _unflat(params, -np.linalg.solve(c, g)), np.linalg.eigvalsh(c)[0]


def riccati_vs_dense(model, params, x, y, *, loss, geometry, damping,
                     intermediate=None):
  """``(riccati step, dense step, min eigenvalue of C + λI)``."""
  step = exact.exact_step(model, params, x, y, loss=loss, geometry=geometry,
                          damping=damping, intermediate=intermediate)
  extra = None
  if intermediate:
    extra = lambda p: exact.intermediate_curvature(model, p, x, intermediate)
  ref, min_eig = dense_reference(lambda p: model.apply(p, x), params, y,
                                 loss=loss, geometry=geometry, damping=damping,
                                 extra=extra)
  return step, ref, min_eig


# --- Riccati == dense --------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_riccati_matches_dense(model_name, case):
  model, params, x, y = MODELS[model_name]()
  geometry, damping, intermediate = CASES[case]
  step, ref, min_eig = riccati_vs_dense(
      model, params, x, y, loss=CE, geometry=geometry, damping=damping,
      intermediate=intermediate)
  # Newton's Hessian is indefinite: the damping keeps C + λI (so every S_i)
  # positive definite and well conditioned.
  assert min_eig > (0.2 if case == "newton" else 0.0)
  assert jax.tree.structure(step) == jax.tree.structure(params)
  assert rel_err(step, ref) <= 1e-8
  if case in ("newton", "intermediate"):
    # The stage costs matter: the step is not the plain GGN step.
    ggn = exact.exact_step(model, params, x, y, loss=CE, damping=damping)
    assert rel_err(step, ggn) > 1e-3


@pytest.mark.parametrize("geometry", ["ggn", "newton"])
def test_riccati_matches_dense_squared_error(geometry):
  model, params, x, y = tanh_mlp(loss=SE)
  step, ref, min_eig = riccati_vs_dense(
      model, params, x, y, loss=SE, geometry=geometry,
      damping=3.0 if geometry == "newton" else 1e-2)
  assert min_eig > (0.2 if geometry == "newton" else 0.0)
  assert rel_err(step, ref) <= 1e-8


def test_riccati_intermediate_matrix_metric():
  model, params, x, y = relu_mlp()
  n = x.shape[0] * params[0]["w"].shape[1]
  root = _normal(np.random.default_rng(7), n, n)
  intermediate = {1: root @ root.T / n, 3: 0.2}
  step, ref, _ = riccati_vs_dense(model, params, x, y, loss=CE, geometry="ggn",
                                  damping=1e-2, intermediate=intermediate)
  assert rel_err(step, ref) <= 1e-8
  plain = exact.exact_step(model, params, x, y, loss=CE, damping=1e-2)
  assert rel_err(plain, ref) > 1e-3  # the metric changes the step


def test_riccati_without_damping_when_nonsingular():
  # 16 output values, 6 parameters: the GGN of a linear model is invertible.
  rng = np.random.default_rng(3)
  x, y = _normal(rng, 8, 3), _normal(rng, 8, 2)
  model = exact.Sequential((lambda w, x: x @ w,))
  params = [_normal(rng, 3, 2)]
  step = exact.exact_step(model, params, x, y, loss=SE, damping=0.0,
                          allow_singular=True)
  ref, min_eig = dense_reference(lambda p: model.apply(p, x), params, y,
                                 loss=SE, damping=0.0)
  assert min_eig > 1e-2
  assert rel_err(step, ref) <= 1e-10
  # One Gauss-Newton step solves linear least squares: the minimiser.
  lstsq = np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0]
  assert rel_err(params[0] + step[0], lstsq) <= 1e-10


def test_riccati_under_jit():
  model, params, x, y = tanh_mlp(batch=2, sizes=(3, 4, 4, 2))
  step = jax.jit(lambda p, lam: exact.exact_step(
      model, p, x, y, loss=CE, geometry="newton", damping=lam))(params, 3.0)
  ref, min_eig = dense_reference(lambda p: model.apply(p, x), params, y,
                                 loss=CE, geometry="newton", damping=3.0)
  assert min_eig > 0.2
  assert rel_err(step, ref) <= 1e-8


def test_lqr_problem_shapes():
  model, params, x, y = conv_net()
  problem = exact.lqr_problem(model, params, x, y, loss=CE, geometry="newton",
                              damping=0.5)
  sizes = [0] + [a.size for a in model.activations(params, x)[1:]]
  counts = [sum(a.size for a in jax.tree.leaves(p)) for p in params]
  for i in range(len(model)):
    assert problem.A[i].shape == (sizes[i + 1], sizes[i])
    assert problem.B[i].shape == (sizes[i + 1], counts[i])
    assert problem.Q[i].shape == (sizes[i], sizes[i])
    assert problem.M[i].shape == (counts[i], sizes[i])
    assert problem.R[i].shape == (counts[i], counts[i])
  assert counts[2] == 0  # flatten: no control
  assert problem.Q_N.shape == (sizes[-1], sizes[-1])
  assert problem.a.shape == (sizes[-1],)
  # Newton's stage terms are there: a linear layer's Hamiltonian still couples
  # its weights and its input.
  assert float(jnp.abs(problem.M[3]).max()) > 0


# --- flax ---------------------------------------------------------------------


def test_flax_sequential_matches_dense():
  # The shapes of relu_mlp, whose compiled Riccati recursion is reused.
  net = nn.Sequential([nn.Dense(7), nn.tanh, nn.Dense(5), nn.relu, nn.Dense(3)])
  rng = np.random.default_rng(0)
  x, y = _normal(rng, 5, 4), jnp.asarray(rng.integers(0, 3, (5,)))
  shapes = jax.eval_shape(net.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda s: _normal(rng, *s.shape), shapes)
  model, params = exact.from_flax_sequential(net, variables)
  assert [p is None for p in params] == [False, True, False, True, False]
  assert rel_err(model.apply(params, x), net.apply(variables, x)) <= 1e-12
  step = exact.exact_step(model, params, x, y, loss=CE, geometry="ggn",
                          damping=1e-2)
  ref, _ = dense_reference(lambda p: net.apply({"params": p}, x),
                           variables["params"], y, loss=CE, damping=1e-2)
  ref_list = [ref.get(f"layers_{i}") for i in range(5)]
  assert rel_err(step, ref_list) <= 1e-8


# --- the dense reference against autodiff's own matrices -----------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _reference_step(kind, model, params, x, y, loss, damping):
  """The damped step from autodiff's own matrices, flat."""
  matrix = _reference_matrix(kind, model, params, x, y, loss)
  flat, unravel = ravel_pytree(params)
  g = jax.grad(lambda th: losses.get_loss(loss)(model.apply(unravel(th), x), y))(flat)
  return -jnp.linalg.solve(matrix + damping * jnp.eye(flat.size), g)


def _reference_matrix(kind, model, params, x, y, loss):
  flat, unravel = ravel_pytree(params)
  fn = lambda th: model.apply(unravel(th), x)
  out = fn(flat)
  loss_fn = losses.get_loss(loss)
  if kind == "newton":
    return jax.hessian(lambda th: loss_fn(fn(th), y))(flat)
  if kind == "ggn":
    return helpers.dense_ggn(lambda p: model.apply(p, x), params,
                             lambda z: loss_fn(z, y))
  # The categorical Fisher (diag p - ppᵀ)/n, block diagonal over examples, and
  # the Rényi-α metric, α times it.
  jac = jax.jacfwd(fn)(flat).reshape(out.size, flat.size)
  fisher = helpers.dense_fisher("categorical", out, xp=jnp)
  scale = 0.5 if kind == "renyi_0.5" else 1.0
  return scale * jac.T @ fisher @ jac


@pytest.mark.parametrize("kind,geometry,loss", [
    ("ggn", "ggn", CE),
    ("ggn", "ggn", SE),
    ("newton", "newton", CE),
    ("newton", "newton", SE),
    ("fisher", "fisher", CE),
    ("renyi_0.5", Geometry("renyi", alpha=0.5), CE),
])
def test_dense_step_matches_autodiff_matrices(kind, geometry, loss):
  model, params, x, y = tanh_mlp(loss=loss)
  damping = 3.0 if kind == "newton" else 0.7  # C + λI well conditioned
  expected = _reference_step(kind, model, params, x, y, loss, damping)
  apply_fn = lambda p: model.apply(p, x)

  step = jax.jit(lambda p: exact.dense_step(
      apply_fn, p, y, loss=loss, geometry=geometry, damping=damping))(params)
  assert rel_err(step, _unflat(params, expected)) <= 1e-10


def test_intermediate_curvature_matches_jacobians():
  model, params, x, y = tanh_mlp()
  intermediate = {1: 0.3, 2: 0.05}
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def expected(flat):
    total = 0.0
    for i, beta in intermediate.items():
      jac = jax.jacfwd(lambda th: model.activations(unravel(th), x)[i])(flat)
      jac = jac.reshape(-1, flat.size)
      total = total + beta * jac.T @ jac
    return total
  zero_loss = lambda out, t: 0.0 * jnp.sum(out)

  @jax.jit
  def curvature(params):
    extra = exact.intermediate_curvature(model, params, x, intermediate)
    return exact.dense_curvature(lambda p: model.apply(p, x), params, y,
                                 loss=zero_loss, extra_curvature=extra)
  assert rel_err(curvature(params), expected(flat)) <= 1e-10


# --- CG -------------------------------------------------------------------------


def _mlp(widths, batch, seed):
  rng = np.random.default_rng(seed)
  layers = [_tanh_dense] * (len(widths) - 2) + [_dense]
  params = [_init_dense(rng, a, b) for a, b in zip(widths[:-1], widths[1:])]
  x = _normal(rng, batch, widths[0])
  y = jnp.asarray(rng.integers(0, widths[-1], (batch,)))
  model = exact.Sequential(tuple(layers))
  return (lambda p: model.apply(p, x)), params, y


def test_cg_with_extra_curvature_matches_riccati():
  model, params, x, y = tanh_mlp()
  intermediate = {1: 0.3, 2: 0.05}
  @jax.jit
  def cg(params):
    extra = exact.intermediate_curvature(model, params, x, intermediate)
    return exact.cg_step(lambda p: model.apply(p, x), params, y, loss=CE,
                         damping=1e-2, extra_curvature=extra)
  step = cg(params)
  ref = exact.exact_step(model, params, x, y, loss=CE, damping=1e-2,
                         intermediate=intermediate)
  assert rel_err(step, ref) <= 1e-6


def test_cg_matches_output_space_solve_large_model():
  """~22k parameters: too large for a dense P×P solve, so push the solve
  through to the (batch·classes)-dimensional output space instead:
  (JᵀQJ + λI)⁻¹Jᵀa = Jᵀ(QJJᵀ + λI)⁻¹a."""
  apply_fn, params, y = _mlp((32, 128, 128, 10), batch=16, seed=1)
  flat, unravel = ravel_pytree(params)
  assert flat.size > 20000
  damping = 1e-2

  @jax.jit
  def reference(flat):
    fn = lambda th: apply_fn(unravel(th))
    out = fn(flat)
    jac = jax.jacrev(fn)(flat).reshape(out.size, flat.size)
    loss_fn = losses.get_loss(CE)
    q = jax.hessian(lambda z: loss_fn(z, y))(out).reshape(out.size, out.size)
    a = jax.grad(lambda z: loss_fn(z, y))(out).reshape(-1)
    inner = jnp.linalg.solve(q @ jac @ jac.T + damping * jnp.eye(out.size), a)
    return -jac.T @ inner
  expected = reference(flat)
  step = jax.jit(lambda p: exact.cg_step(apply_fn, p, y, loss=CE,
                                         damping=damping))(params)
  assert rel_err(step, unravel(expected)) <= 1e-6


# --- errors ---------------------------------------------------------------------


def test_error_negative_damping():
  model, params, x, y = tanh_mlp()
  apply_fn = lambda p: model.apply(p, x)
  with pytest.raises(ValueError, match=r"damping=-0\.1 is invalid"):
    exact.lqr_problem(model, params, x, y, loss=CE, damping=-0.1)
  with pytest.raises(ValueError, match=r"damping=-0\.1 is invalid"):
    exact.exact_step(model, params, x, y, loss=CE, damping=-0.1)
  with pytest.raises(ValueError, match=r"damping=-0\.1 is invalid"):
    exact.dense_step(apply_fn, params, y, loss=CE, damping=-0.1)
  with pytest.raises(ValueError, match=r"damping=-0\.1 is invalid"):
    exact.cg_step(apply_fn, params, y, loss=CE, damping=-0.1)


def test_error_zero_damping_needs_allow_singular():
  model, params, x, y = tanh_mlp()
  apply_fn = lambda p: model.apply(p, x)
  msg = r"damping=0\.0 is invalid for {}.*allow_singular=True"
  with pytest.raises(ValueError, match=msg.format("riccati_step")):
    exact.exact_step(model, params, x, y, loss=CE, damping=0.0)
  problem = exact.lqr_problem(model, params, x, y, loss=CE)  # builds fine
  with pytest.raises(ValueError, match=msg.format("riccati_step")):
    exact.riccati_step(problem)
  with pytest.raises(ValueError, match=msg.format("dense_step")):
    exact.dense_step(apply_fn, params, y, loss=CE, damping=0.0)
  with pytest.raises(ValueError, match=msg.format("dense_step")):
    exact.dense_step(apply_fn, params, y, loss=CE, damping=np.float64(0.0))
  with pytest.raises(ValueError, match=msg.format("cg_step")):
    exact.cg_step(apply_fn, params, y, loss=CE, damping=0.0)


def test_error_layer_and_params_count():
  model, params, x, y = tanh_mlp()
  with pytest.raises(ValueError, match="params_list has 2 entries but the "
                     "model has 3 layers"):
    exact.exact_step(model, params[:2], x, y, loss=CE, damping=1.0)
  with pytest.raises(ValueError, match="params_list has 4 entries"):
    model.apply(params + [None], x)
  with pytest.raises(ValueError, match="is not a list"):
    model.apply({"w": 1.0}, x)


@pytest.mark.parametrize("bad_key", [0, 3, -1, "1"])
def test_error_intermediate_key(bad_key):
  model, params, x, y = tanh_mlp()
  with pytest.raises(ValueError, match=rf"intermediate key {bad_key!r} is not "
                     r"a valid layer index.*for i in 1\.\.2"):
    exact.exact_step(model, params, x, y, loss=CE, damping=1.0,
                     intermediate={bad_key: 0.1})
  with pytest.raises(ValueError, match="intermediate key"):
    exact.intermediate_curvature(model, params, x, {bad_key: 0.1})


def test_error_intermediate_value():
  model, params, x, y = tanh_mlp()
  with pytest.raises(ValueError, match=r"intermediate\[1\] has shape \(3, 3\) "
                     r"but the flattened state x_1 has size 24"):
    exact.exact_step(model, params, x, y, loss=CE, damping=1.0,
                     intermediate={1: jnp.eye(3)})
  with pytest.raises(ValueError, match=r"intermediate\[2\]=-0\.5 is negative"):
    exact.exact_step(model, params, x, y, loss=CE, damping=1.0,
                     intermediate={2: -0.5})
  with pytest.raises(ValueError, match="is not a mapping"):
    exact.exact_step(model, params, x, y, loss=CE, damping=1.0,
                     intermediate=[0.1])


def test_error_model_and_flax_arguments():
  with pytest.raises(ValueError, match=r"layers\[1\]=3 is not callable"):
    exact.Sequential((jnp.tanh, 3))
  with pytest.raises(ValueError, match="is not a Sequential"):
    exact.exact_step(object(), [], None, None, loss=CE, damping=1.0)
  with pytest.raises(ValueError, match="is not a flax.linen.Sequential"):
    exact.from_flax_sequential(nn.Dense(3), {"params": {}})
  net = nn.Sequential([nn.Dense(3), nn.relu])
  variables = {"params": {"layers_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
  with pytest.raises(ValueError, match="has no 'params' collection"):
    exact.from_flax_sequential(net, variables["params"])
  with pytest.raises(ValueError, match=r"entries \['layers_7'\] that match no "
                     "layer"):
    exact.from_flax_sequential(net, {"params": {"layers_7": {}}})
