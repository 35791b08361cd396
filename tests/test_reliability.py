"""Reliability: long runs stay finite, and NaN/Inf anywhere never gets in.

One tiny MLP (8-16-16-4, tanh, batch 32) trained with ``chain(llqr(...),
inject_hyperparams(adam))`` at llqr's defaults except ``refit_every=10`` (more
refits per step run). One compiled step serves every test: the learning rate
lives in Adam's state, and three poisons enter as traced arguments:

- the inputs ``x`` (a NaN or Inf in one example: the forward pass, hence the
  gradient and the refit's samples, are not finite);
- ``c_model``: ``apply_fn`` ends with an identity whose ``jvp`` multiplies the
  tangent by ``c_model`` (``jax.custom_jvp``): the forward pass, the loss and
  the user's gradient (taken through the clean model) are finite, but every
  ``jvp``/``vjp`` through ``apply_fn`` — the refit's gradient samples and its
  curvature products — is NaN or Inf;
- ``c_loss``: llqr's loss is the cross-entropy of an identity whose *second*
  derivative is ``(c_loss − 1)``: the loss and its gradient are exact, only the
  output-space Hessian (the GGN's ``Q``, so every curvature product) is not
  finite.

With every poison at its clean value (finite inputs, ``c = 1``) the step is the
plain ``chain(llqr, adam)`` step. A poisoned refit must be skipped and counted
in ``skipped_refits``, keep the last good preconditioner bit for bit, never
let a non-finite value into params or state, and training must carry on.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llqr_optax
from helpers import all_finite, cross_entropy, mlp, mlp_params

BATCH, D_IN, HIDDEN, D_OUT = 32, 8, 16, 4
REFIT_EVERY = 10
LONG_STEPS = 300
DEFAULT_LR, AGGRESSIVE_LR = 1e-2, 0.5


# --- poisons ----------------------------------------------------------------


@jax.custom_jvp
def poisoned_tangent(z, c):
  """``z``, whose tangent is multiplied by ``c``."""
  del c
  return z


@poisoned_tangent.defjvp
def _poisoned_tangent_jvp(primals, tangents):
  z, c = primals
  return z, tangents[0] * c


@jax.custom_jvp
def ones_with_derivative(z, c):
  """Ones shaped like ``z``, with derivative ``(c − 1)`` (0 when ``c = 1``)."""
  del c
  return jnp.ones_like(z)


@ones_with_derivative.defjvp
def _ones_jvp(primals, tangents):
  z, c = primals
  return jnp.ones_like(z), tangents[0] * (c - 1.0)


@jax.custom_jvp
def poisoned_curvature(z, c):
  """``z`` with a first derivative of 1 and a second of ``(c − 1)``."""
  del c
  return z


@poisoned_curvature.defjvp
def _poisoned_curvature_jvp(primals, tangents):
  z, c = primals
  return z, tangents[0] * ones_with_derivative(z, c)


def llqr_loss(z, targets):
  """Cross-entropy whose output Hessian is poisoned by ``targets[1]``."""
  y, c = targets
  return cross_entropy(poisoned_curvature(z, c[:, None]), y)


# --- model, data and the compiled step -----------------------------------------


def init_params():
  return mlp_params((D_IN, HIDDEN, HIDDEN, D_OUT), jax.random.split(jax.random.key(0), 3))


def make_data(steps):
  """A fixed teacher: labels of a random linear map of the inputs."""
  kx, kt = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (steps, BATCH, D_IN))
  teacher = jax.random.normal(kt, (D_IN, D_OUT))
  return x, jnp.argmax(jnp.einsum("sbi,io->sbo", x, teacher), -1)


TX = optax.chain(
    llqr_optax.llqr(loss=llqr_loss, refit_every=REFIT_EVERY),
    optax.inject_hyperparams(optax.adam)(learning_rate=DEFAULT_LR))


@jax.jit
def step(params, state, x, y, c_model, c_loss):
  apply_fn = lambda p: poisoned_tangent(mlp(p, x), c_model)
  loss, grads = jax.value_and_grad(lambda p: cross_entropy(mlp(p, x), y))(params)
  updates, state = TX.update(grads, state, params, apply_fn=apply_fn,
                             targets=(y, jnp.full(y.shape, c_loss)))
  params = optax.apply_updates(params, updates)
  return params, state, loss, all_finite((params, state))


CLEAN = (jnp.float32(1.0), jnp.float32(1.0))


def with_lr(state, lr):
  adam = state[1]
  return (state[0], adam._replace(
      hyperparams={**adam.hyperparams, "learning_rate": jnp.float32(lr)}))


def train(params, state, xs, ys, start, stop):
  finite, losses = [], []
  for t in range(start, stop):
    params, state, loss, ok = step(params, state, xs[t], ys[t], *CLEAN)
    finite.append(bool(ok))
    losses.append(float(loss))
  return params, state, finite, losses


@pytest.fixture(scope="module")
def data():
  return make_data(LONG_STEPS)


@pytest.fixture(scope="module")
def long_runs(data):
  xs, ys = data
  out = {}
  for lr in (DEFAULT_LR, AGGRESSIVE_LR):
    params = init_params()
    state = with_lr(TX.init(params), lr)
    out[lr] = train(params, state, xs, ys, 0, LONG_STEPS)
  return out


@pytest.mark.parametrize("lr", [DEFAULT_LR, AGGRESSIVE_LR])
def test_long_run_never_produces_nan_or_inf(long_runs, lr):
  params, state, finite, losses = long_runs[lr]
  assert all(finite), f"first non-finite step: {finite.index(False)}"
  assert np.all(np.isfinite(losses))
  inner = llqr_optax.find_state(state)
  # Refits at 0, 1, 2, 4, 8 and every 10 steps: 5 + 29 below step 300.
  assert int(inner.refits) + int(inner.skipped_refits) == 34
  assert int(inner.skipped_updates) == 0
  if lr == DEFAULT_LR:  # it learns the teacher
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


# --- injection ------------------------------------------------------------------

NAN, INF = jnp.float32(jnp.nan), jnp.float32(jnp.inf)

# (case, poisoned x, c_model, c_loss, is the user's gradient finite?)
INJECTIONS = {
    "nan in the forward pass": ("nan", 1.0, 1.0, False),
    "inf in the forward pass": ("inf", 1.0, 1.0, False),
    "nan in jvp/vjp only": (None, NAN, 1.0, True),
    "inf in jvp/vjp only": (None, INF, 1.0, True),
    "nan in curvature products only": (None, 1.0, NAN, True),
    "inf in curvature products only": (None, 1.0, INF, True),
}
INJECT_AT = 40  # a refit step (a multiple of REFIT_EVERY)
AFTER = 25


@pytest.fixture(scope="module")
def warm(data):
  """The default-rate run up to the injection step."""
  xs, ys = data
  params = init_params()
  state = with_lr(TX.init(params), DEFAULT_LR)
  params, state, finite, _ = train(params, state, xs, ys, 0, INJECT_AT)
  assert all(finite)
  return params, state


@pytest.mark.parametrize("case", list(INJECTIONS))
def test_injected_nan_or_inf_skips_the_refit_and_training_carries_on(warm, data, case):
  xs, ys = data
  poison_x, c_model, c_loss, grads_finite = INJECTIONS[case]
  params, state = warm
  before = llqr_optax.find_state(state)
  x = xs[INJECT_AT]
  if poison_x:
    x = x.at[5, 2].set(jnp.nan if poison_x == "nan" else jnp.inf)

  new_params, new_state, loss, finite = step(params, state, x, ys[INJECT_AT],
                                             jnp.float32(c_model), jnp.float32(c_loss))
  after = llqr_optax.find_state(new_state)
  # The refit that was due is skipped and counted; nothing else changes.
  assert int(after.skipped_refits) == int(before.skipped_refits) + 1
  assert int(after.refits) == int(before.refits)
  assert int(after.skipped_updates) == int(before.skipped_updates) + (not grads_finite)
  assert int(after.count) == int(before.count) + 1
  # The last good preconditioner (and the fit's diagnostics) are kept bitwise.
  for name in ("preconditioner", "damping", "objective", "output_scale",
               "reduction_ratio"):
    for a, b in zip(jax.tree.leaves(getattr(after, name)),
                    jax.tree.leaves(getattr(before, name))):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
  assert bool(finite), "a non-finite value got into params or state"
  if grads_finite:  # the step itself used the last good preconditioner
    assert bool(jnp.isfinite(loss))
    assert not all(bool(jnp.all(a == b)) for a, b in
                   zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))

  # Training carries on: the next refits happen, nothing more is skipped.
  params, state, finite, losses = train(new_params, new_state, xs, ys,
                                        INJECT_AT + 1, INJECT_AT + 1 + AFTER)
  final = llqr_optax.find_state(state)
  assert all(finite) and np.all(np.isfinite(losses))
  assert int(final.refits) == int(after.refits) + 2  # steps 50 and 60
  assert int(final.skipped_refits) == int(after.skipped_refits)
  assert int(final.skipped_updates) == int(after.skipped_updates)


def test_corrupted_state_never_reaches_params_and_heals_at_the_next_refit(warm, data):
  """A preconditioner with a NaN (only a state from outside can hold one)."""
  xs, ys = data
  params, state, _, ok = step(*warm, xs[INJECT_AT], ys[INJECT_AT], *CLEAN)
  assert bool(ok)
  inner = llqr_optax.find_state(state)
  leaf = inner.preconditioner["l1"]["w"]
  bad = inner._replace(preconditioner={
      **inner.preconditioner,
      "l1": {**inner.preconditioner["l1"], "w": leaf._replace(diag=leaf.diag.at[0, 0].set(jnp.nan))}})
  state = (bad,) + tuple(state[1:])
  start = INJECT_AT + 1  # count 41: the next refit is at 50
  finite = []
  for t in range(start, start + 20):
    params, state, _, ok = step(params, state, xs[t], ys[t], *CLEAN)
    finite.append(bool(all_finite(params)))
    if t == start:
      # U(g) is not finite: the update is zeroed and counted, params stay finite.
      assert int(llqr_optax.find_state(state).skipped_updates) == 1
  after = llqr_optax.find_state(state)
  assert all(finite)
  # Counts 41..49 skipped; the refit at 50 restarts from the identity, as on a
  # first refit, and the one at 60 goes on from it.
  assert int(after.skipped_updates) == 9
  assert int(after.refits) == int(inner.refits) + 2
  assert int(after.skipped_refits) == 0
  assert bool(all_finite(after.preconditioner))


def test_clean_poisons_are_the_plain_loss():
  """With ``c = 1`` the poisoned pieces are exactly the plain ones."""
  z = jax.random.normal(jax.random.key(3), (BATCH, D_OUT))
  y = jnp.arange(BATCH) % D_OUT
  c = jnp.ones(BATCH)
  v = jax.random.normal(jax.random.key(4), z.shape)

  @jax.jit
  def pieces(c):
    hvp = lambda f: jax.jvp(jax.grad(f), (z,), (v,))[1]
    poisoned = lambda z: llqr_loss(z, (y, c))
    return (poisoned(z), jax.grad(poisoned)(z), hvp(poisoned),
            cross_entropy(z, y), jax.grad(cross_entropy)(z, y),
            hvp(lambda z: cross_entropy(z, y)))

  value, grad, hess, value0, grad0, hess0 = pieces(c)
  np.testing.assert_allclose(value, value0)
  np.testing.assert_allclose(grad, grad0, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(hess, hess0, rtol=1e-6, atol=1e-7)
  value, grad, hess, *_ = pieces(c * jnp.nan)
  np.testing.assert_allclose(value, value0)  # the loss and its gradient are exact,
  np.testing.assert_allclose(grad, grad0, rtol=1e-6, atol=1e-8)
  assert not np.any(np.isfinite(hess))  # only the curvature is poisoned


# --- the cost benchmark cannot rot ------------------------------------------------


def test_cost_benchmark_quick_mode_runs(tmp_path):
  from benchmarks.cost import run as cost

  cost.main(["--quick", "--out", str(tmp_path)])
  report = json.loads((tmp_path / "cost.json").read_text())
  assert (tmp_path / "cost.png").stat().st_size > 0
  for task in report["tasks"]:
    assert task["memory"]["diagonal"] == pytest.approx(1.0)
    assert task["overhead"]["ratio_mean"] > 0
    assert task["overhead_static_refit"]["static_refit"] is True
    assert task["overhead_static_refit"]["ratio_mean"] > 0
    assert task["compile_seconds"]["llqr+adam"] > 0
  assert report["refit_scaling"]
  assert report["meta"]["command"].startswith("python -m benchmarks.cost --quick")

  from benchmarks.results import render as results
  md = results.main(["--in", str(tmp_path), "--md", str(tmp_path / "R.md")])
  text = md.read_text()
  assert "## Cost of llqr over Adam (`cost.json`" in text
  assert report["tasks"][0]["task"] in text and "two steps" in text
