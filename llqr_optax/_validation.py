"""Input checks of the transform: clear ``ValueError``s before anything compiles.

Every check names the argument, the bad value and the fix (the bad-input
table of ``docs/bad_inputs.md`` lists the messages; ``tests/test_bad_inputs.py`` pins them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llqr_optax import _nnx
from llqr_optax import structures
from llqr_optax.state import LLQRState


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def static_int(name: str, value, minimum: int) -> int:
  if not is_concrete(value):
    raise ValueError(
        f"{name} must be a Python int, not a traced value. Under "
        f"optax.inject_hyperparams pass static_args=({name!r},).")
  if isinstance(value, float) and value != int(value):
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
  ivalue = int(value)
  if ivalue < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
  return ivalue


def check_number(name, value, *, low, high=None, open_low=False, fix=""):
  if not is_concrete(value) or jnp.ndim(value) != 0:
    return
  try:
    if isinstance(value, (str, bytes)):
      raise TypeError
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is invalid: it must be a number. {fix}") from None
  bad = (v != v or math.isinf(v) or (v <= low if open_low else v < low)
         or (high is not None and v > high))
  if bad:
    span = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    raise ValueError(f"{name}={value!r} is invalid: it must be finite and {span}. {fix}")


def leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def check_like_params(what, tree, params, fix):
  """``tree`` must have the pytree structure and leaf shapes of ``params``."""
  t_def, p_def = jax.tree.structure(tree), jax.tree.structure(params)
  if t_def != p_def:
    raise ValueError(
        f"{what} does not match params: params has {p_def.num_leaves} leaves "
        f"({p_def}), {what} has {t_def.num_leaves} ({t_def}). {fix}")
  for (path, t), p in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                          jax.tree.leaves(params)):
    if jnp.shape(t) != jnp.shape(p):
      raise ValueError(
          f"{what} leaf {leaf_name(path)} has shape {tuple(jnp.shape(t))}, params "
          f"has {tuple(jnp.shape(p))}. {fix}")
    dtype = t.dtype if hasattr(t, "dtype") else jnp.asarray(t).dtype
    if what == "the gradient" and not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{what} leaf {leaf_name(path)} has dtype {dtype}, not a float. {fix}")


def check_state(state, params, structure, max_dim, dense_max):
  """The preconditioner in ``state`` must be the one this configuration makes.

  A state restored from a checkpoint of another model or another
  ``structure``/``max_dim`` would otherwise fail deep inside the trace. With
  ``max_dim``/``dense_max`` traced (``optax.inject_hyperparams``) the sides
  that fall back are unknown: structures and leaves are checked, and shapes by
  tracing ``U(params)``.

  Per-leaf states that a container turned into mappings of their fields
  (``flax.nnx.Optimizer`` stores its state as ``nnx.State``) are rebuilt
  first (:func:`~llqr_optax.structures.restore_types`), then checked.

  Returns:
    ``state``, with its per-leaf structure states typed.
  """
  fix = ("The state was made for other params or another structure/max_dim/"
         "dense_max: call tx.init(params) again, or restore the checkpoint "
         "into tx.init(params) of the same configuration.")
  if not isinstance(state, LLQRState):
    raise ValueError(f"state is a {type(state).__name__}, not the LLQRState of "
                     f"tx.init(params). {fix}")
  typed = jax.tree.leaves(state.preconditioner, is_leaf=structures.is_state)
  if not all(structures.is_state(s) for s in typed):
    restored = structures.restore_types(state.preconditioner, _nnx.unwrapped(params))
    if restored is not None:
      state = state._replace(preconditioner=restored)
  static = is_concrete(max_dim) and is_concrete(dense_max)
  shapes_of = _nnx.param_shapes(params)
  structure = _nnx.structure_for(structure, params)
  if static:
    expected = jax.eval_shape(lambda p: structures.init(
        p, structure, max_dim=int(max_dim), dense_max=int(dense_max)), shapes_of)
  else:
    names = structures.leaf_names(structure, shapes_of, max_dim=2**62, dense_max=2**62)
    expected = jax.tree.map(lambda n: structures.STRUCTURES[n].State, names)
  got, _ = jax.tree_util.tree_flatten_with_path(state.preconditioner,
                                                is_leaf=structures.is_state)
  want, _ = jax.tree_util.tree_flatten_with_path(
      expected, is_leaf=lambda x: structures.is_state(x) or isinstance(x, type))
  if [p for p, _ in got] != [p for p, _ in want]:
    raise ValueError(
        f"the llqr state's preconditioner has leaves {[leaf_name(p) for p, _ in got]} "
        f"but params has {[leaf_name(p) for p, _ in want]}. {fix}")
  shapes = lambda s: [tuple(jnp.shape(x)) for x in s]
  for (path, g), (_, w) in zip(got, want):
    w_type = w if isinstance(w, type) else type(w)
    if type(g) is not w_type or (static and shapes(g) != shapes(w)):
      made = f"{w_type.__name__}{shapes(w)}" if static else w_type.__name__
      raise ValueError(
          f"the llqr state's preconditioner for leaf {leaf_name(path)} is "
          f"{type(g).__name__}{shapes(g)}, but this configuration makes "
          f"{made}. {fix}")
  if not static:
    try:
      jax.eval_shape(structures.apply, state.preconditioner, shapes_of)
    except (TypeError, ValueError) as e:
      raise ValueError(f"the llqr state's preconditioner does not fit params "
                       f"({e}). {fix}") from None
  return state


def check_axis_name(axis_name):
  try:
    jax.lax.psum(1, axis_name)
  except NameError:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: llqr(axis_name=...) must run "
        "inside jax.shard_map or jax.pmap over that axis. Under jax.jit with "
        "a sharded batch (NamedSharding) leave axis_name=None: the compiled "
        "program already sees the whole batch.") from None


def check_params(params):
  def check(path, x):
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    where = jax.tree_util.keystr(path) or "<root>"
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"params leaf {where} has complex dtype {dtype}; llqr supports real "
          "floating params only. Split it into real and imaginary parts.")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"params leaf {where} has dtype {dtype}, not a float; llqr "
          "preconditions floating params only. Keep integer state outside "
          "params, or exclude it with optax.masked.")
  jax.tree_util.tree_map_with_path(check, params)
