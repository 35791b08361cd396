"""The optax contract of ``llqr``: jit, wrappers, dtypes, NaNs, errors, state.

One tiny MLP (6-8-5, biases, batch 16). Compiling a step that contains a refit
is the expensive part, so one jitted training run is shared by several tests
(module-scoped fixture) and configuration errors are checked at trace time.
"""

import collections
import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
import llqr_optax
from helpers import all_finite, assert_trees_close, assert_trees_equal, mlp
from llqr_optax import structures

LOSS = "softmax_cross_entropy"
BATCH, D_IN, HIDDEN, D_OUT = 16, 6, 8, 5
REFIT_EVERY = 6
REFIT_STEPS = {0, 1, 2, 4, 6, 12}  # 0, powers of two below 6, then multiples of 6
NUM_STEPS = 13
# Compiling a step that contains a refit is this module's main cost; XLA's
# backend optimisations do not change what is tested (tracing, dtypes, state),
# and turning them off cuts compilation by a third or more on CPU.
jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0})
KW = dict(loss=LOSS, structure="diagonal", refit_every=REFIT_EVERY, num_chunks=4,
          inner_steps=3)


def init_params(key, dtype=jnp.float32):
  k0, k1, k2 = jax.random.split(key, 3)
  params = helpers.mlp_params((D_IN, HIDDEN, D_OUT), (k0, k1), (k2, None))
  return jax.tree.map(lambda p: p.astype(dtype), params)


def batch(i):
  return helpers.classification_batch(jax.random.key(1000 + i), BATCH, D_IN, D_OUT)


def loss_fn(p, x, y):
  return helpers.cross_entropy(mlp(p, x).astype(jnp.float32), y)


grad_fn = jit(jax.grad(loss_fn))


def make_tx(**kw):
  return optax.chain(llqr_optax.llqr(**{**KW, **kw}), optax.adam(1e-2))


TRACES = collections.Counter()


def make_step(tx, name, *, pass_full_params=False, **extra):
  """A jitted ``tx.update`` + ``apply_updates``, counting its traces."""
  @jit
  def step(params, state, grads, x, y):
    TRACES[name] += 1
    more = {"full_params": params} if pass_full_params else {}
    updates, state = tx.update(grads, state, params,
                               apply_fn=lambda p: mlp(p, x), targets=y,
                               **extra, **more)
    return optax.apply_updates(params, updates), state, updates
  return step


def llqr_of(state):
  return llqr_optax.find_state(state)


# --- one shared jitted run ----------------------------------------------------

MAIN_TX = make_tx()
MAIN_STEP = make_step(MAIN_TX, "main", unexpected_extra="ignored")


@pytest.fixture(scope="module")
def run():
  """NUM_STEPS jitted steps on fresh batches: params, states, grads, updates."""
  params = init_params(jax.random.key(0))
  state = MAIN_TX.init(params)
  out = {"params": [params], "states": [state], "grads": [], "updates": [],
         "batches": []}
  for t in range(NUM_STEPS):
    x, y = batch(t)
    g = grad_fn(params, x, y)
    params, state, updates = MAIN_STEP(params, state, g, x, y)
    for k, v in (("params", params), ("states", state), ("grads", g),
                 ("updates", updates), ("batches", (x, y))):
      out[k].append(v)
  out["traces"], out["cache_size"] = TRACES["main"], MAIN_STEP._cache_size()
  return out


def test_refits_at_0_1_2_4_then_every_refit_every(run):
  refits = [int(llqr_of(s).refits) for s in run["states"][1:]]
  expected = np.cumsum([t in REFIT_STEPS for t in range(NUM_STEPS)]).tolist()
  assert refits == expected
  assert [int(llqr_of(s).count) for s in run["states"]] == list(range(NUM_STEPS + 1))
  assert int(llqr_of(run["states"][-1]).skipped_refits) == 0
  # The preconditioner changes exactly on refit steps.
  for t in range(NUM_STEPS):
    before = llqr_of(run["states"][t]).preconditioner
    after = llqr_of(run["states"][t + 1]).preconditioner
    same = all(bool(jnp.array_equal(a, b))
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert same == (t not in REFIT_STEPS), t


def test_no_recompilation_after_first_step(run):
  assert NUM_STEPS >= REFIT_EVERY + 2
  assert run["traces"] == 1
  assert run["cache_size"] == 1
  assert all_finite(run["params"][-1])


def test_refit_due_is_the_schedule():
  assert [t for t in range(NUM_STEPS) if llqr_optax.refit_due(t, REFIT_EVERY)] \
      == sorted(REFIT_STEPS)
  assert [t for t in range(700) if llqr_optax.refit_due(t)] == [
      0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400, 600]
  with pytest.raises(ValueError, match="refit_every=0"):
    llqr_optax.refit_due(3, 0)


def test_refit_due_reads_the_state(run):
  """refit_due(opt_state) is the schedule at llqr's own count: no loop counter."""
  due = [llqr_optax.refit_due(s, REFIT_EVERY) for s in run["states"][:-1]]
  assert due == [t in REFIT_STEPS for t in range(NUM_STEPS)]
  # A resumed run (a state at step 5) continues the schedule, not the warm-up.
  assert not llqr_optax.refit_due(run["states"][5], REFIT_EVERY)
  assert llqr_optax.refit_due(llqr_of(run["states"][6]), REFIT_EVERY)  # an LLQRState
  assert llqr_optax.refit_due(llqr_of(run["states"][6]).count, REFIT_EVERY)  # its count
  assert llqr_optax.refit_due(jnp.int32(200)) and not llqr_optax.refit_due(np.int64(201))
  with pytest.raises(ValueError, match="refit_due runs on the host"):
    jax.jit(lambda s: llqr_optax.refit_due(s))(run["states"][0])
  with pytest.raises(ValueError, match="state holds no LLQRState"):
    llqr_optax.refit_due(optax.adam(1e-3).init(run["params"][0]))


def test_diagnostics_is_a_dict_of_floats(run):
  d = llqr_optax.diagnostics(run["states"][-1])
  assert tuple(d) == llqr_optax.DIAGNOSTICS
  assert all(type(v) is float for v in d.values())
  inner = llqr_of(run["states"][-1])
  assert d["refits"] == int(inner.refits) == len(REFIT_STEPS)
  assert d["count"] == NUM_STEPS and d["damping"] == 1.0
  assert d["objective"] == pytest.approx(float(inner.objective))
  assert set(llqr_optax.diagnostics(inner, prefix="llqr/")) == {
      "llqr/" + k for k in llqr_optax.DIAGNOSTICS}


def test_static_refit_steps_match_the_scheduled_run(run):
  """Two compiled steps (refit=True / False, picked by refit_due) = the cond."""
  steps = {flag: make_step(MAIN_TX, f"static_{flag}", refit=flag) for flag in (False, True)}
  params, state = run["params"][0], run["states"][0]
  for t in range(NUM_STEPS):
    x, y = run["batches"][t]
    params, state, updates = steps[llqr_optax.refit_due(state, REFIT_EVERY)](
        params, state, run["grads"][t], x, y)
    assert_trees_close(updates, run["updates"][t])
    assert_trees_close(llqr_of(state), llqr_of(run["states"][t + 1]))
  assert TRACES["static_False"] == TRACES["static_True"] == 1


def test_static_refit_on_a_nan_gradient_is_skipped(run):
  state = run["states"][3]
  x, y = run["batches"][3]
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), run["grads"][3])
  params, after, updates = make_step(MAIN_TX, "static_nan", refit=True)(
      run["params"][3], state, bad, x, y)
  assert_trees_equal(llqr_of(after).preconditioner, llqr_of(state).preconditioner)
  assert int(llqr_of(after).skipped_refits) == int(llqr_of(state).skipped_refits) + 1
  assert int(llqr_of(after).skipped_updates) == int(llqr_of(state).skipped_updates) + 1
  assert all_finite(params)
  # Without a refit due, only the update is skipped.
  params, after, updates = make_step(MAIN_TX, "static_nan_no_refit", refit=False)(
      run["params"][3], state, bad, x, y)
  assert int(llqr_of(after).skipped_refits) == int(llqr_of(state).skipped_refits)
  assert int(llqr_of(after).skipped_updates) == int(llqr_of(state).skipped_updates) + 1
  assert all_finite(params)


@pytest.mark.parametrize("refit", [1, "yes", jnp.asarray(True)])
def test_refit_must_be_a_python_bool(refit):
  params = init_params(jax.random.key(0))
  x, y = batch(0)
  with pytest.raises(ValueError, match="refit=.*Python bool"):
    MAIN_TX.update(grad_fn(params, x, y), MAIN_TX.init(params), params,
                   apply_fn=lambda p: mlp(p, x), targets=y, refit=refit)


def test_unexpected_extra_kwarg_is_ignored():
  params = init_params(jax.random.key(0))
  state = MAIN_TX.init(params)
  x, y = batch(0)
  g = grad_fn(params, x, y)

  def update(**extra):
    return lambda s: MAIN_TX.update(g, s, params, apply_fn=lambda p: mlp(p, x),
                                    targets=y, **extra)
  with_extra = jax.make_jaxpr(update(batch_stats={"m": jnp.ones(3)}, rng=1))(state)
  without = jax.make_jaxpr(update())(state)
  assert str(with_extra) == str(without)


def test_precondition_matches_llqr_output_on_non_refit_step(run):
  t = 3
  assert t not in REFIT_STEPS
  before, after = run["states"][t], run["states"][t + 1]
  g = run["grads"][t]
  u = llqr_optax.precondition(before, g)
  # Same map from the chain's state and from the LLQRState inside it.
  assert_trees_equal(u, llqr_optax.precondition(llqr_of(before), g))
  # The preconditioner is no longer the identity after the refits of steps 0-2.
  assert not all(bool(jnp.allclose(a, b)) for a, b in
                 zip(jax.tree.leaves(u), jax.tree.leaves(g)))
  # The chain's output at step t is adam applied to llqr's output U(g).
  want, _ = optax.adam(1e-2).update(u, before[1], run["params"][t])
  assert_trees_close(run["updates"][t], want, rtol=1e-5, atol=1e-7)
  # The llqr stage did not refit at step t: same preconditioner.
  assert_trees_equal(llqr_of(after).preconditioner, llqr_of(before).preconditioner)
  # precondition changes no state.
  snapshot = jax.tree.map(np.array, before)
  llqr_optax.precondition(before, g)
  assert_trees_equal(before, snapshot)


def test_nan_gradient_is_skipped(run):
  t = 4  # a refit step: the refit must not run on a NaN gradient either
  assert t in REFIT_STEPS
  params, state = run["params"][t], run["states"][t]
  x, y = run["batches"][t]
  g = jax.tree.map(lambda v: v, run["grads"][t])
  g["l0"]["w"] = g["l0"]["w"].at[1, 2].set(jnp.nan)
  traces = TRACES["main"]
  new_params, new_state, updates = MAIN_STEP(params, state, g, x, y)
  assert TRACES["main"] == traces  # same compiled step
  assert all_finite(new_params) and all_finite(updates)
  old, new = llqr_of(state), llqr_of(new_state)
  assert int(new.skipped_updates) == int(old.skipped_updates) + 1 == 1
  assert int(new.refits) == int(old.refits)
  assert int(new.count) == int(old.count) + 1
  assert_trees_equal(new.preconditioner, old.preconditioner)


def test_nan_model_output_skips_the_refit(run):
  t = 2  # a refit step
  assert t in REFIT_STEPS
  params, state = run["params"][t], run["states"][t]
  x, y = run["batches"][t]
  g = run["grads"][t]  # a finite gradient, but the refit batch gives NaN
  x_nan = x.at[3, 0].set(jnp.nan)
  new_params, new_state, updates = MAIN_STEP(params, state, g, x_nan, y)
  old, new = llqr_of(state), llqr_of(new_state)
  assert int(new.skipped_refits) == int(old.skipped_refits) + 1 == 1
  assert int(new.refits) == int(old.refits)
  assert int(new.skipped_updates) == 0
  assert_trees_equal(new.preconditioner, old.preconditioner)
  assert float(new.damping) == float(old.damping)
  assert all_finite(new_params) and all_finite(updates)
  # The output is the last good preconditioner applied to the gradient.
  want, _ = optax.adam(1e-2).update(llqr_optax.precondition(state, g), state[1], params)
  assert_trees_close(updates, want)


def test_state_is_a_pytree_of_arrays_and_checkpoints(run):
  state = run["states"][5]
  leaves = jax.tree.leaves(state)
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)
  inner = llqr_of(state)
  for leaf in jax.tree.leaves(inner.preconditioner):
    assert leaf.dtype == jnp.float32
  # Round trip through host memory and pickle, then continue identically.
  restored = jax.tree.map(jnp.asarray, pickle.loads(pickle.dumps(jax.device_get(state))))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  x, y = run["batches"][5]
  traces = TRACES["main"]
  a = MAIN_STEP(run["params"][5], restored, run["grads"][5], x, y)
  assert TRACES["main"] == traces  # a restored state does not recompile
  assert_trees_equal(a[1], run["states"][6])
  assert_trees_equal(a[0], run["params"][6])


def test_untyped_structure_states_are_rebuilt(run):
  """Structure states stored as mappings of their fields (as nnx.Optimizer's
  nnx.State or a restore without a target tree do) are rebuilt by update."""
  state = run["states"][6]
  inner = llqr_of(state)
  untyped = jax.tree.map(lambda s: dict(s._asdict()), inner.preconditioner,
                         is_leaf=structures.is_state)
  assert not any(structures.is_state(s) for s in jax.tree.leaves(
      untyped, is_leaf=structures.is_state))
  x, y = run["batches"][6]
  params, after, updates = MAIN_STEP(run["params"][6],
                                     (inner._replace(preconditioner=untyped),) + state[1:],
                                     run["grads"][6], x, y)
  assert_trees_equal(updates, run["updates"][6])
  assert_trees_equal(after, run["states"][7])  # typed again
  assert structures.restore_types(untyped, run["params"][6]) is not None
  # Fields of another structure are rebuilt as that structure, then rejected.
  kron = llqr_optax.llqr(**{**KW, "structure": "kronecker"}).init(run["params"][0])
  as_dicts = jax.tree.map(lambda s: dict(s._asdict()), kron.preconditioner,
                          is_leaf=structures.is_state)
  with pytest.raises(ValueError, match=r"is KroneckerState.*but this configuration "
                     r"makes DiagonalState"):
    _trace_update(MAIN_TX, run["params"][0],
                  state=(kron._replace(preconditioner=as_dicts),) + run["states"][0][1:])


def test_inject_hyperparams_needs_no_static_args():
  """llqr's integer defaults stay static; damping follows its schedule."""
  params = init_params(jax.random.key(0))
  schedule = optax.linear_schedule(1.0, 0.5, transition_steps=4)
  tx = optax.inject_hyperparams(llqr_optax.llqr)(loss=LOSS, damping=schedule)
  state = tx.init(params)
  assert set(state.hyperparams) == {"damping", "ema"}
  x, y = batch(0)
  g = grad_fn(params, x, y)
  step = jit(lambda s: tx.update(g, s, params, apply_fn=lambda p: mlp(p, x), targets=y))
  for t in range(3):
    _, state = step(state)
    assert float(llqr_of(state).damping) == pytest.approx(float(schedule(t)))
  assert int(llqr_of(state).refits) == 3
  # An integer passed by the user is a hyperparameter to optax: it says so.
  factory = optax.inject_hyperparams(llqr_optax.llqr)
  with pytest.raises(ValueError, match=r"static_args=\('num_chunks',\)"):
    _trace_update(factory(loss=LOSS, num_chunks=2), params)
  # The advertised defaults are llqr's own.
  sig = __import__("inspect").signature(llqr_optax.llqr)
  assert repr(sig.parameters["num_chunks"].default) == "4"


def _least_squares_run(residuals, params, steps, **kw):
  tx = llqr_optax.llqr(loss="squared_error", learning_rate=1.0, **kw)
  targets = jnp.zeros(2)

  @jit
  def step(params, state):
    g = jax.grad(lambda p: 0.5 * jnp.mean(residuals(p) ** 2))(params)
    u, state = tx.update(g, state, params, apply_fn=residuals, targets=targets)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, llqr_optax.diagnostics(state)


def test_fewer_rows_than_num_chunks_take_one_sample_per_row():
  """optax's least-squares targets have 2 rows; num_chunks=4 adapts to 2."""
  from llqr_optax import fitting
  parabola = lambda p: p - jnp.array([1.0, -2.0])  # |p - c|², two rows
  problem, _, _ = fitting.build_problem(parabola, jnp.zeros(2), jnp.zeros(2),
                                        loss="squared_error", num_chunks=4)
  assert problem.grads.shape == (2, 2)  # one sample per row
  assert fitting.chunks_for(4, 2) == 2 and fitting.chunks_for(4, 3) == 3
  # At llqr's defaults (num_chunks=4): it converges.
  params, d = _least_squares_run(parabola, jnp.zeros(2), 60)
  np.testing.assert_allclose(params, [1.0, -2.0], atol=1e-4)
  assert d["refits"] >= 1 and d["skipped_refits"] == d["skipped_updates"] == 0
  # Rosenbrock (the recipe in docs/recipes.md): a dense U refitted at every step.
  rosenbrock = lambda p: jnp.stack([1.0 - p[0], 10.0 * (p[1] - p[0] ** 2)])
  params, d = _least_squares_run(rosenbrock, jnp.array([-1.2, 1.0]), 200,
                                 structure="dense", refit_every=1, ema=0.0)
  np.testing.assert_allclose(params, [1.0, 1.0], atol=1e-4)
  assert d["refits"] == 200 and d["skipped_refits"] == 0


# --- optax wrappers -----------------------------------------------------------


def test_lax_cond_over_the_state(run):
  tx = MAIN_TX

  @jit
  def maybe_update(pred, params, state, grads, x, y):
    return jax.lax.cond(
        pred,
        lambda s: tx.update(grads, s, params, apply_fn=lambda p: mlp(p, x),
                            targets=y)[1],
        lambda s: s, state)

  t = 4
  args = (run["params"][t], run["states"][t], run["grads"][t]) + run["batches"][t]
  assert_trees_equal(maybe_update(False, *args), run["states"][t])
  updated = maybe_update(True, *args)
  assert int(llqr_of(updated).refits) == int(llqr_of(run["states"][t]).refits) + 1
  assert_trees_close(updated, run["states"][t + 1], rtol=1e-4, atol=1e-6)


def test_bf16_params_keep_dtype_and_state_is_f32():
  params = init_params(jax.random.key(0), jnp.bfloat16)
  tx = make_tx()
  step = make_step(tx, "bf16")
  state = tx.init(params)
  for t in range(3):
    x, y = batch(t)
    g = grad_fn(params, x.astype(jnp.bfloat16), y)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(g))
    params, state, updates = step(params, state, g, x.astype(jnp.bfloat16), y)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(params))
  inner = llqr_of(state)
  assert int(inner.refits) == 3 and int(inner.skipped_refits) == 0
  for leaf in jax.tree.leaves(inner.preconditioner):
    assert leaf.dtype == jnp.float32
  assert inner.damping.dtype == jnp.float32
  assert all_finite(params)
  # The preconditioner moved away from the identity.
  assert any(not bool(jnp.allclose(d, 1.0)) for d in jax.tree.leaves(inner.preconditioner))
  assert TRACES["bf16"] == 1


MASK = {"l0": {"w": True, "b": False}, "l1": {"w": True, "b": False}}


def masked(tree):
  """``tree`` as llqr sees it under ``MASK``: biases are ``optax.MaskedNode``."""
  return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), MASK, tree)


def test_masked_needs_full_params():
  params = init_params(jax.random.key(0))
  tx = optax.masked(llqr_optax.llqr(**KW), MASK)
  state = tx.init(params)
  x, y = batch(0)
  g = grad_fn(params, x, y)
  with pytest.raises(ValueError, match="full_params"):
    tx.update(g, state, params, apply_fn=lambda p: mlp(p, x), targets=y)


def test_masked_preconditions_only_the_mask():
  params = init_params(jax.random.key(0))
  tx = optax.masked(llqr_optax.llqr(**KW), MASK)
  step = make_step(tx, "masked", pass_full_params=True)
  state = tx.init(params)
  inner = llqr_of(state)
  # Only the masked-in leaves have a preconditioner.
  assert len(jax.tree.leaves(inner.preconditioner)) == 2
  for t in range(3):
    x, y = batch(t)
    g = grad_fn(params, x, y)
    new_params, state, updates = step(params, state, g, x, y)
    inner = llqr_of(state)
    assert int(inner.refits) == t + 1 and int(inner.skipped_refits) == 0
    # Biases pass through; weights get U(g) with the freshly refitted U.
    want = llqr_optax.precondition(state, masked(g))
    for layer in ("l0", "l1"):
      np.testing.assert_array_equal(updates[layer]["b"], g[layer]["b"])
      np.testing.assert_allclose(updates[layer]["w"], want[layer]["w"],
                                 rtol=1e-6, atol=1e-7)
    assert not bool(jnp.allclose(updates["l0"]["w"], g["l0"]["w"]))
    params = new_params
  assert TRACES["masked"] == 1


def test_multi_transform():
  params = init_params(jax.random.key(0))
  labels = {"l0": {"w": "llqr", "b": "sgd"}, "l1": {"w": "llqr", "b": "sgd"}}
  tx = optax.multi_transform({"llqr": llqr_optax.llqr(**KW), "sgd": optax.sgd(0.1)},
                             labels)
  state = tx.init(params)
  x, y = batch(0)
  g = grad_fn(params, x, y)
  with pytest.raises(ValueError, match="full_params"):
    tx.update(g, state, params, apply_fn=lambda p: mlp(p, x), targets=y)

  @jit
  def step(params, state, g, x, y):
    return tx.update(g, state, params, apply_fn=lambda p: mlp(p, x), targets=y,
                     full_params=params)

  for t in range(2):
    x, y = batch(t)
    g = grad_fn(params, x, y)
    updates, state = step(params, state, g, x, y)
    inner = llqr_of(state)
    assert int(inner.refits) == t + 1 and int(inner.skipped_refits) == 0
    want = llqr_optax.precondition(state, masked(g))
    for layer in ("l0", "l1"):
      np.testing.assert_allclose(updates[layer]["b"], -0.1 * g[layer]["b"], rtol=1e-6)
      np.testing.assert_allclose(updates[layer]["w"], want[layer]["w"],
                                 rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, updates)
  assert all_finite(params)


def test_multi_steps():
  params = init_params(jax.random.key(0))
  tx = optax.MultiSteps(make_tx(), every_k_schedule=2)

  @jit
  def step(params, state, g, x, y):
    updates, state = tx.update(g, state, params, apply_fn=lambda p: mlp(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  for t in range(4):
    x, y = batch(t)
    g = grad_fn(params, x, y)
    params, state, updates = step(params, state, g, x, y)
    emitted = any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
    assert emitted == (t % 2 == 1), t
  inner = llqr_of(state.inner_opt_state)
  assert int(inner.count) == 2 and int(inner.refits) == 2
  assert all_finite(params)


def test_inject_hyperparams_damping_reaches_the_refit():
  params = init_params(jax.random.key(0))
  factory = optax.inject_hyperparams(llqr_optax.llqr, static_args=("num_chunks",))
  tx = factory(**{**KW, "damping": 1e-3})
  state = tx.init(params)
  assert set(state.hyperparams) >= {"damping"}
  x, y = batch(0)
  g = grad_fn(params, x, y)

  @jit
  def update(state):
    return tx.update(g, state, params, apply_fn=lambda p: mlp(p, x), targets=y)

  u_lo, s_lo = update(state)
  high = state._replace(hyperparams={**state.hyperparams, "damping": jnp.float32(10.0)})
  u_hi, s_hi = update(high)
  assert float(llqr_of(s_lo).damping) == pytest.approx(1e-3)
  assert float(llqr_of(s_hi).damping) == pytest.approx(10.0)
  # A larger damping gives a different (smaller) fitted preconditioner ...
  assert not bool(jnp.allclose(u_lo["l0"]["w"], u_hi["l0"]["w"]))
  # ... the one llqr fits with damping=10 from the same state.
  plain = llqr_optax.llqr(**{**KW, "damping": 10.0})
  u_ref, s_ref = jit(lambda s: plain.update(
      g, s, params, apply_fn=lambda p: mlp(p, x), targets=y))(plain.init(params))
  assert_trees_close(u_hi, u_ref, rtol=1e-4, atol=1e-6)
  assert_trees_close(llqr_of(s_hi).preconditioner, s_ref.preconditioner,
                     rtol=1e-4, atol=1e-6)


# --- configuration errors -----------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(damping=float("nan")), "damping"),
    (dict(damping=-1e-3), "damping"),
    (dict(refit_every=0), "refit_every"),
    (dict(structure="shampoo"), "structure"),
    (dict(geometry="hessian-free"), "geometry"),
    (dict(loss="hinge"), "hinge"),
    (dict(inner_solver="adam"), "inner_solver"),
    (dict(ema=1.5), "ema"),
])
def test_bad_configuration_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    llqr_optax.llqr(**{**KW, **kw})


@pytest.mark.parametrize("leaf, match", [
    (jnp.zeros(3, jnp.int32), "int32"),
    (jnp.zeros(3, jnp.complex64), "complex"),
])
def test_non_float_params_raise(leaf, match):
  params = {**init_params(jax.random.key(0)), "extra": leaf}
  with pytest.raises(ValueError, match=match):
    make_tx().init(params)


def test_structure_pytree_not_matching_params_raises():
  params = init_params(jax.random.key(0))
  bad = {"l0": {"w": "ekfac", "b": "diagonal"}, "l1": "kronecker"}
  with pytest.raises(ValueError, match="does not match params"):
    make_tx(structure=bad).init(params)
  good = {"l0": {"w": "ekfac", "b": "diagonal"}, "l1": {"w": "kronecker", "b": "scalar"}}
  inner = llqr_of(make_tx(structure=good).init(params))
  assert isinstance(inner.preconditioner["l1"]["b"], structures.ScalarState)


def _trace_update(tx, params, state=None, **kw):
  state = tx.init(params) if state is None else state
  x, y = batch(0)
  g = jax.tree.map(jnp.zeros_like, params)
  kw = {"apply_fn": lambda p: mlp(p, x), "targets": y, **kw}
  return jax.eval_shape(lambda s: tx.update(g, s, params, **kw), state)


def test_update_errors():
  params = init_params(jax.random.key(0))
  tx = make_tx()
  state = tx.init(params)
  g = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match="apply_fn"):
    tx.update(g, state, params, targets=batch(0)[1])
  with pytest.raises(ValueError, match="apply_fn"):
    tx.update(g, state, params, apply_fn=None, targets=batch(0)[1])
  # More chunks than rows is not an error: one sample per row.
  _trace_update(make_tx(num_chunks=BATCH + 1), params)
  with pytest.raises(ValueError, match="targets"):
    _trace_update(tx, params, targets=jnp.zeros((BATCH, 2), jnp.int32))
  with pytest.raises(ValueError, match="targets"):
    _trace_update(tx, params, targets=jnp.zeros((BATCH + 1,), jnp.int32))
  # The correct call traces fine.
  out = _trace_update(tx, params)
  assert jax.tree.structure(out[1]) == jax.tree.structure(state)
