"""Bad inputs: every one raises ``ValueError`` with a message that says what to do.

One parametrized test, one case per row of the "Bad inputs" table (docs/bad_inputs.md).
Configuration errors raise when ``llqr(...)`` is built, params errors at
``tx.init``, and errors about the call (model, targets, gradient, state) when
``tx.update`` is traced, which ``jax.eval_shape`` does without compiling.
Nothing reaches XLA, so this module takes a few seconds.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import helpers
import llqr_optax

BATCH, D_IN, HIDDEN, D_OUT = 16, 6, 8, 5
LOSS = "softmax_cross_entropy"


def params_():
  return helpers.mlp_params((D_IN, HIDDEN, D_OUT), jax.random.split(jax.random.key(0)),
                            scaled=False)


X = jax.random.normal(jax.random.key(1), (BATCH, D_IN))
Y = jax.random.randint(jax.random.key(2), (BATCH,), 0, D_OUT)


def mlp(p, x=X):
  return helpers.mlp(p, x)


def build(**kw):
  return lambda: llqr_optax.llqr(**{"loss": LOSS, **kw})


def init(params=None, **kw):
  return lambda: llqr_optax.llqr(**{"loss": LOSS, **kw}).init(
      params if params is not None else params_())


def update(tx_kw=None, *, grads=None, state=None, params=None, **call):
  """Traces ``tx.update`` (no compilation) with one argument changed."""
  def run():
    p = params_() if params is None else params
    tx = llqr_optax.llqr(**{"loss": LOSS, **(tx_kw or {})})
    s = tx.init(p) if state is None else state
    g = jax.tree.map(jnp.zeros_like, p) if grads is None else grads
    kw = {"apply_fn": mlp, "targets": Y, **call}
    jax.eval_shape(lambda s: tx.update(g, s, p, **kw), s)
  return run


def other_state(**tx_kw):
  p = params_()
  p["l0"]["w"] = jnp.zeros((D_IN, HIDDEN + 1))
  p["l1"]["w"] = jnp.zeros((HIDDEN + 1, D_OUT))
  p["l0"]["b"] = jnp.zeros(HIDDEN + 1)
  return llqr_optax.llqr(loss=LOSS, **tx_kw).init(p)


def per_leaf(name):
  return {"l0": {"w": name, "b": "diagonal"}, "l1": {"w": name, "b": "diagonal"}}


def user_loss(z, t):
  return jnp.mean((z - t) ** 2)


def masked_update():
  p = params_()
  mask = {"l0": {"w": True, "b": False}, "l1": {"w": True, "b": False}}
  tx = optax.masked(llqr_optax.llqr(loss=LOSS), mask)
  s = tx.init(p)
  jax.eval_shape(lambda s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p,
                                     apply_fn=mlp, targets=Y), s)


# (case, what raises, the message users see: a regex of its key part).
CASES = [
    # --- names ----------------------------------------------------------------
    ("unknown loss", build(loss="hinge"),
     "loss='hinge' is not a built-in loss; choose one of"),
    ("loss neither name nor callable", build(loss=3),
     "loss=3 is neither a name nor a callable"),
    ("unknown geometry", build(geometry="hessian-free"),
     "geometry='hessian-free' is unknown; choose one of"),
    ("unknown structure", build(structure="shampoo"),
     "structure='shampoo' is unknown; choose one of"),
    ("unknown inner_solver", build(inner_solver="adam"),
     "inner_solver='adam' is unknown; choose one of"),
    ("unknown structure for one leaf", init(structure=per_leaf("shampoo")),
     r"structure='shampoo' for the leaf \['l0'\]\['w'\] of shape \(6, 8\) is unknown"),
    # --- numbers ----------------------------------------------------------------
    ("zero damping that adapts", build(damping=0.0, adapt_damping=True),
     r"damping=0.0 with adapt_damping=True.*cannot move it from 0"),
    ("negative damping", build(damping=-1e-3),
     r"damping=-0.001 is invalid: it must be finite and >= 0.0"),
    ("negative floor", build(floor=-1.0), r"floor=-1.0 is invalid: it must be finite and >= 0.0"),
    ("floor on Kronecker factors", build(floor=1e-8, structure="kronecker"),
     r"floor=1e-08 bounds the scales of .* structure='kronecker' has none"),
    ("infinite damping", build(damping=float("inf")),
     r"damping=inf is invalid: it must be finite"),
    ("damping not a number", build(damping="1e-3"),
     r"damping='1e-3' is invalid: it must be a number"),
    ("refit_every < 1", build(refit_every=0),
     r"refit_every=0 must be an integer >= 1"),
    ("refit_every not an integer", build(refit_every=2.5),
     r"refit_every=2.5 must be an integer >= 1"),
    ("num_chunks < 1", build(num_chunks=0), r"num_chunks=0 must be an integer >= 1"),
    ("inner_steps < 0", build(inner_steps=-1), r"inner_steps=-1 must be an integer >= 0"),
    ("ema above 1", build(ema=1.5), r"ema=1.5 is invalid: it must be finite and >= 0.0 and <= 1.0"),
    ("ema below 0", build(ema=-0.1), r"ema=-0.1 is invalid"),
    ("refit_growth below 1", build(refit_growth=0.5),
     r"refit_growth=0.5 is invalid: it must be finite and >= 1.0. Try 4.0, or None"),
    ("seed not an integer", build(seed=0.5), r"seed=0.5 must be an integer"),
    ("max_dim < 1", init(max_dim=0), r"max_dim=0 must be an integer >= 1"),
    # --- geometry options and loss --------------------------------------------
    ("renyi alpha = 0", lambda: llqr_optax.Geometry("renyi", alpha=0.0),
     r"alpha=0.0 is not a valid Rényi order: it needs alpha > 0"),
    ("renyi alpha < 0", lambda: llqr_optax.llqr(
        loss=LOSS, geometry=llqr_optax.Geometry("renyi", alpha=-0.5)),
     r"alpha=-0.5 is not a valid Rényi order"),
    ("renyi alpha = 1", lambda: llqr_optax.Geometry("renyi", alpha=1.0),
     r"alpha = 1 is the KL divergence: use geometry='fisher'"),
    ("mc_fisher num_samples < 1", lambda: llqr_optax.Geometry("mc_fisher", num_samples=0),
     r"num_samples=0 must be a positive integer"),
    ("mc_fisher with a user loss", build(loss=user_loss, geometry="mc_fisher"),
     r"geometry='mc_fisher' needs the predictive distribution of the loss, but "
     r"loss='user_loss' has none"),
    ("renyi with a user loss", build(loss=user_loss, geometry="renyi"),
     r"geometry='renyi' needs the predictive distribution"),
    # --- params and structures ----------------------------------------------------
    ("integer params leaf", init({**params_(), "step": jnp.zeros((), jnp.int32)}),
     r"params leaf \['step'\] has dtype int32, not a float"),
    ("complex params leaf", init({**params_(), "z": jnp.zeros(3, jnp.complex64)}),
     r"params leaf \['z'\] has complex dtype complex64; llqr supports real"),
    ("structure pytree not matching params",
     init(structure={"l0": {"w": "kronecker", "b": "diagonal"}, "l1": "diagonal"}),
     r"structure, given as a pytree of names, does not match params"),
    ("kronecker per leaf, both sides > max_dim",
     init(structure=per_leaf("kronecker"), max_dim=4),
     r"structure='kronecker' for the leaf \['l0'\]\['w'\] of shape \(6, 8\): both "
     r"sides of its 6×8 matrix exceed max_dim=4"),
    ("ekfac by callable, both sides > max_dim",
     init(structure=lambda path, shape: "ekfac", max_dim=4),
     r"structure='ekfac' for the leaf \['l0'\]\['w'\].*exceed max_dim=4"),
    ("dense on a leaf above dense_max", init(structure="dense", dense_max=16),
     r"structure='dense' for the leaf \['l0'\]\['w'\] of shape \(6, 8\) needs a 48² "
     r"matrix, above dense_max=16"),
    # --- the update call -----------------------------------------------------------
    ("missing apply_fn", update(apply_fn=None),
     r"apply_fn=None: llqr needs apply_fn\(params\) -> outputs"),
    ("params=None", lambda: llqr_optax.llqr(loss=LOSS).update(
        params_(), llqr_optax.llqr(loss=LOSS).init(params_()), None, apply_fn=mlp,
        targets=Y), r"params=None: llqr needs the current params"),
    ("apply_fn returns a tuple", update(apply_fn=lambda p: (mlp(p), {})),
     r"apply_fn returned a tuple, not one array of model outputs"),
    ("apply_fn returns labels (int)", update(apply_fn=lambda p: jnp.argmax(mlp(p), -1)),
     r"apply_fn returned outputs of dtype int32; they must be floating"),
    ("apply_fn returns the loss (scalar)",
     update(apply_fn=lambda p: optax.softmax_cross_entropy_with_integer_labels(
         mlp(p), Y).mean()),
     r"apply_fn returned a scalar \(shape \(\)\); llqr needs the model's outputs "
     r"for every example, batch first"),
    ("apply_fn returns the loss (scalar), squared error",
     update({"loss": "squared_error"}, apply_fn=lambda p: jnp.mean(mlp(p)),
            targets=jnp.zeros(())),
     r"apply_fn returned a scalar \(shape \(\)\)"),
    ("apply_fn returns per-example losses",
     update(apply_fn=lambda p: optax.softmax_cross_entropy_with_integer_labels(mlp(p), Y)),
     r"apply_fn returned outputs of shape \(16,\), one number per example, but "
     r"loss='softmax_cross_entropy' needs 2 axes, batch first"),
    ("apply_fn takes the inputs too (wrong arity)",
     update(apply_fn=lambda p, x: mlp(p, x)),
     r"calling apply_fn\(params\) raised TypeError: .*it must close over the "
     r"batch's inputs: apply_fn=lambda p: model.apply\(p, x\), not apply_fn=model.apply"),
    ("apply_fn output shape does not fit the loss",
     update(apply_fn=lambda p: mlp(p)[:, :4],
            targets=jax.nn.one_hot(Y, D_OUT)),
     r"targets with shape \(16, 5\) and dtype float32 do not fit outputs of shape "
     r"\(16, 4\) for loss='softmax_cross_entropy': expected one-hot labels of shape "
     r"\(16, 4\)"),
    ("targets of the wrong shape", update(targets=Y[:-1]),
     r"targets with shape \(15,\) and dtype int32 do not fit outputs of shape \(16, 5\)"),
    ("targets of the wrong dtype (bool)", update(targets=Y > 2),
     r"targets with shape \(16,\) and dtype bool do not fit.*expected integer or "
     r"floating labels"),
    ("float targets without a class axis", update(targets=Y.astype(jnp.float32)),
     r"expected one-hot labels of shape \(16, 5\)"),
    ("missing targets", update(targets=None),
     r"geometry='ggn' needs targets; pass targets=\.\.\."),
    ("empty batch", update(apply_fn=lambda p: mlp(p, X[:0]), targets=Y[:0]),
     r"apply_fn returned outputs of shape \(0, 5\): an empty batch"),
    ("gradient tree not matching params", update(grads={"l0": {"w": jnp.zeros((D_IN, HIDDEN))}}),
     r"the gradient does not match params"),
    ("gradient leaf of the wrong shape",
     update(grads=jax.tree.map(lambda x: jnp.zeros(x.shape + (1,)), params_())),
     r"the gradient leaf \['l0'\]\['b'\] has shape \(8, 1\), params has \(8,\)"),
    ("state of other params", update(state=other_state()),
     r"the llqr state's preconditioner for leaf \['l0'\]\['b'\] is DenseState\[\(9, 9\)\], "
     r"but this configuration makes DenseState\[\(8, 8\)\]"),
    ("state of another structure", update({"structure": "kronecker"}, state=llqr_optax.llqr(
        loss=LOSS, structure="diagonal").init(params_())),
     r"preconditioner for leaf \['l0'\]\['w'\] is DiagonalState\[\(6, 8\)\], but this "
     r"configuration makes KroneckerState\[\(6, 6\), \(8, 8\)\]"),
    ("not an llqr state", update(state=optax.adam(1e-3).init(params_())),
     r"state is a tuple, not the LLQRState of tx.init\(params\)"),
    ("axis_name outside shard_map/pmap", update({"axis_name": "data"}),
     r"axis_name='data' is not bound: llqr\(axis_name=\.\.\.\) must run inside "
     r"jax.shard_map or jax.pmap"),
    ("masked params without full_params", masked_update,
     r"Pass the full params as an extra argument"),
]


@pytest.mark.parametrize("case, raise_it, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_value_error(case, raise_it, message):
  with pytest.raises(ValueError, match=message):
    raise_it()


def test_the_table_has_at_least_15_cases():
  assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)
