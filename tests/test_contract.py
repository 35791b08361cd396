"""optax's contract for every structure and several geometries, on a tiny MLP.

optax runs one shared set of checks on each of its contributed optimizers
(``optax/contrib/_common_test.py``): ``init`` and ``update`` under ``jit``, a
state whose tree, shapes and dtypes stay those of ``init`` across updates,
updates shaped and typed like the params, the optimizer inside optax's
wrappers. The same kind of checks run here for every ``structure`` (the five
names and ``"auto"``) and several geometries; test_transform.py goes further
for ``structure="diagonal"``. In two tiers, to stay cheap (compiling a refit
costs seconds, tracing one a fraction of a second):

- traced only (``jax.eval_shape``: nothing is compiled): ``init`` under
  ``jit`` gives the eager ``init``'s tree, shapes and dtypes; ``update``'s
  output has the params' tree, shapes and dtypes, and its state ``init``'s.
  For every structure × :data:`GEOMETRIES` with float32 params and the refit
  inside the step's ``lax.cond``; for every structure with bfloat16 params
  and a static ``refit=True``; and under ``optax.inject_hyperparams``;
- compiled, once per structure, each with one geometry (:data:`COMPILED`, so
  that every geometry of the grid is compiled too): a few jitted steps of
  ``optax.chain(llqr, adam)`` with refits and one without, traced once, every
  state shaped like ``init``'s, finite, and the refits counted and effective.

The model: 5-4-3, biases, batch 8. Its kernel ``l0.w`` has 20 elements, above
``AUTO_DENSE_MAX``, so ``"auto"`` gives it a diagonal and the other leaves a
dense ``U``.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import helpers
import llqr_optax
from helpers import ALL_STRUCTURES, assert_same_shapes_and_dtypes, mlp

LOSS = "softmax_cross_entropy"
SIZES, BATCH = (5, 4, 3), 8
REFIT_EVERY, STEPS = 2, 4  # refits at steps 0, 1, 2; none at 3
GEOMETRIES = ("ggn", "fisher", "empirical_fisher", "newton", "mc_fisher")
#: The geometry of each structure's compiled run.
COMPILED = {"scalar": "newton", "diagonal": "mc_fisher", "kronecker": "empirical_fisher",
            "ekfac": "fisher", "dense": "ggn", "auto": "ggn"}


# Compilation is the compiled tier's cost; XLA's optimisations change nothing
# checked here.
@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  with helpers.most_optimizations_disabled():
    yield


def make_llqr(structure, geometry, factory=llqr_optax.llqr):
  return factory(loss=LOSS, structure=structure, geometry=geometry,
                 refit_every=REFIT_EVERY, num_chunks=2, inner_steps=1)


def init_params(dtype=jnp.float32):
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  params = helpers.mlp_params(SIZES, (k0, k1), (k2, None))
  return jax.tree.map(lambda p: p.astype(dtype), params)


def batch(t):
  return helpers.classification_batch(jax.random.key(100 + t), BATCH, SIZES[0], SIZES[-1])


def traced_update(tx, params, state, **kw):
  """``(updates, new state)`` of ``tx.update`` from ``state``, abstract (traced)."""
  x, y = batch(0)
  grads = jax.tree.map(jnp.ones_like, params)
  return jax.eval_shape(lambda s: tx.update(grads, s, params, apply_fn=lambda p: mlp(p, x),
                                            targets=y, **kw), state)


def test_the_grid_covers_every_structure_and_compiles_every_geometry():
  assert set(ALL_STRUCTURES) == set(llqr_optax.structures.STRUCTURES) | {"auto"}
  assert set(COMPILED) == set(ALL_STRUCTURES)
  assert set(COMPILED.values()) == set(GEOMETRIES)
  leaves = llqr_optax.structures.leaf_names("auto", init_params())
  assert leaves["l0"]["w"] != "dense" and leaves["l1"]["w"] == "dense"


# --- traced -----------------------------------------------------------------


def check_traced(structure, geometry, dtype, refit):
  """``init`` under ``jit`` and one ``update`` (from ``init``'s state) keep
  the trees, shapes and dtypes; the preconditioner is float32."""
  tx = make_llqr(structure, geometry)
  params = init_params(dtype)
  state = tx.init(params)
  assert_same_shapes_and_dtypes(jax.eval_shape(tx.init, params), state)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
      llqr_optax.find_state(state).preconditioner))
  updates, new_state = traced_update(tx, params, state, refit=refit)
  assert_same_shapes_and_dtypes(updates, params)
  assert_same_shapes_and_dtypes(new_state, state)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_traced_scheduled_step(structure, geometry):
  """float32 params, the refit in the step's ``lax.cond`` (``refit=None``)."""
  check_traced(structure, geometry, jnp.float32, refit=None)


@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_traced_static_refit_with_bf16_params(structure):
  """bfloat16 params (their updates stay bfloat16), a static ``refit=True``."""
  check_traced(structure, "ggn", jnp.bfloat16, refit=True)


@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_traced_under_inject_hyperparams(structure):
  tx = make_llqr(structure, "ggn", optax.inject_hyperparams(
      llqr_optax.llqr, static_args=("refit_every", "num_chunks", "inner_steps")))
  params = init_params()
  state = tx.init(params)
  assert set(state.hyperparams) == {"damping", "ema"}
  updates, new_state = traced_update(tx, params, state)
  assert_same_shapes_and_dtypes(updates, params)
  assert_same_shapes_and_dtypes(new_state, state)


# --- compiled ---------------------------------------------------------------


@pytest.mark.parametrize("structure", ALL_STRUCTURES)
def test_compiled_steps_in_a_chain(structure):
  geometry = COMPILED[structure]
  tx = optax.chain(make_llqr(structure, geometry), optax.adam(1e-2))
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    grads = jax.grad(lambda p: helpers.cross_entropy(mlp(p, x), y))(params)
    updates, state = tx.update(grads, state, params, apply_fn=lambda p: mlp(p, x),
                               targets=y)
    return optax.apply_updates(params, updates), state, updates

  params = init_params()
  first = tx.init(params)
  assert_same_shapes_and_dtypes(jax.jit(tx.init)(params), first)
  state = first
  for t in range(STEPS):
    new_params, state, updates = step(params, state, *batch(t))
    assert_same_shapes_and_dtypes(updates, params)
    assert_same_shapes_and_dtypes(state, first)
    assert bool(helpers.all_finite((new_params, state))), t
    assert not bool(jnp.all(updates["l0"]["w"] == 0)), t  # an update was made
    params = new_params
  assert len(traces) == 1 and step._cache_size() == 1  # no retrace, one executable
  inner = llqr_optax.find_state(state)
  assert int(inner.count) == STEPS
  assert int(inner.refits) == sum(llqr_optax.refit_due(t, REFIT_EVERY)
                                  for t in range(STEPS)) == 3
  assert int(inner.skipped_refits) == int(inner.skipped_updates) == 0
  # The refits fitted something: U is no longer init's identity.
  before = jax.tree.leaves(llqr_optax.find_state(first).preconditioner)
  after = jax.tree.leaves(inner.preconditioner)
  assert any(not bool(jnp.allclose(a, b)) for a, b in zip(after, before))
