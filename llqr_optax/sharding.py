r"""Shardings of llqr's state that follow the params' (FSDP layouts).

Each structure splits the fields of its state that grow with the leaf along
the side the leaf is split on
(:meth:`~llqr_optax.structures.Structure.state_specs`): a diagonal like the
leaf, a Kronecker factor or an ekfac basis by rows like the leaf's rows (or
columns), so a device holds ``1/D`` of the preconditioner when the params
are split over ``D`` devices. With the leaf seen as its ``(m, n)`` matrix
split by rows over ``D`` devices,

.. math::

   \underbrace{L}_{m \times m} \to \tfrac{m}{D} \times m, \qquad
   \underbrace{R}_{n \times n} \text{ replicated}, \qquad
   \underbrace{D}_{m \times n} \to \tfrac{m}{D} \times n .

:func:`state_shardings` gives these shardings for a whole optimizer state
(for ``jax.jit(..., out_shardings=...)`` or ``jax.device_put``), and
``tx.init`` applies them by itself to params it can read a sharding from.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec

from llqr_optax import structures
from llqr_optax._validation import _unwrapped
from llqr_optax.state import LLQRState

PyTree = Any


def _sharding_of(x) -> Optional[jax.sharding.Sharding]:
  """The sharding ``x`` carries: a sharding itself, an array's, a
  ``ShapeDtypeStruct``'s, or under a trace the type's (explicit meshes)."""
  if isinstance(x, jax.sharding.Sharding):
    return x
  if isinstance(x, jax.core.Tracer):
    typeof = getattr(jax, "typeof", None)
    return getattr(typeof(x), "sharding", None) if typeof is not None else None
  return getattr(x, "sharding", None)


def _padded(spec: PartitionSpec, ndim: int) -> PartitionSpec:
  entries = tuple(spec)
  return PartitionSpec(*(entries + (None,) * (ndim - len(entries))))


def _leaf_state(state, sharding, ndim: int, fallback: NamedSharding):
  """One leaf's state of ``NamedSharding``s on the leaf's mesh."""
  if not isinstance(sharding, NamedSharding):
    sharding = fallback
  specs = structures.structure_of(state).state_specs(
      state, _padded(sharding.spec, ndim))
  return type(state)(*(sharding.update(spec=s) for s in specs))


def _llqr(state: LLQRState, params: PyTree, fallback: NamedSharding) -> LLQRState:
  bare = _unwrapped(params)
  p_def = jax.tree.structure(bare)
  leaf_states = p_def.flatten_up_to(state.preconditioner)
  precond = [_leaf_state(s, _sharding_of(p), len(jax.numpy.shape(p)), fallback)
             for s, p in zip(leaf_states, jax.tree.leaves(bare))]
  replicated = jax.tree.map(lambda _: fallback, state)
  return replicated._replace(preconditioner=jax.tree.unflatten(p_def, precond))


def state_shardings(opt_state: PyTree, params: PyTree) -> PyTree:
  r"""Shardings for an optimizer state holding llqr, from the params'.

  For a layout that splits the params (FSDP: the rows of large kernels over a
  ``model`` axis, small leaves replicated), every per-leaf structure state is
  split along the side its leaf is split on (see :mod:`llqr_optax.sharding`),
  llqr's scalars are replicated, and every subtree of ``opt_state`` with the
  params' structure and shapes (Adam's moments) gets the params' shardings;
  the remaining leaves are replicated. ``tx.init(params)`` on sharded arrays
  already returns a state sharded this way; this function is for the state's
  shapes, to initialise and keep it sharded under ``jit``.

  Args:
    opt_state: an optimizer state that holds an
      :class:`~llqr_optax.LLQRState` (``optax.chain``,
      ``inject_hyperparams``, …), or its shapes, e.g.
      ``jax.eval_shape(tx.init, params)``.
    params: the params as sharded arrays or as ``jax.ShapeDtypeStruct``\ s
      with a ``sharding`` (their shapes say how a structure sees a leaf).

  Returns:
    A pytree like ``opt_state`` of ``NamedSharding``\ s.

  Raises:
    ValueError: if ``params`` holds bare shardings (no shapes), or no leaf
      carries a ``NamedSharding``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llqr_optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    >>> split = {"w": NamedSharding(mesh, P("model")), "b": NamedSharding(mesh, P())}
    >>> abstract = jax.tree.map(  # shapes and shardings, nothing allocated
    ...     lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, split)
    >>> tx = optax.chain(llqr_optax.llqr(loss="squared_error", structure="kronecker"),
    ...                  optax.adam(1e-3))
    >>> out = llqr_optax.state_shardings(jax.eval_shape(tx.init, abstract), abstract)
    >>> w = llqr_optax.find_state(out).preconditioner["w"]
    >>> w.left.spec, w.right.spec, out[1][0].mu["w"].spec
    (P('model', None), P(None, None), P('model',))
    >>> state = jax.jit(tx.init, out_shardings=out)(params)  # made sharded
  """
  leaves = jax.tree.leaves(params)
  bare = [p for p in leaves if isinstance(p, jax.sharding.Sharding)]
  if bare:
    raise ValueError(
        f"params holds shardings without shapes (e.g. {bare[0]!r}); pass the "
        "params, or jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, "
        "p.dtype, sharding=s), params, shardings).")
  named = [s for s in map(_sharding_of, leaves) if isinstance(s, NamedSharding)]
  if not named:
    first = _sharding_of(leaves[0]) if leaves else None
    raise ValueError(
        f"params carry no NamedSharding (the first leaf's sharding: {first!r}); "
        "pass the params as arrays placed with jax.device_put(params, "
        "NamedSharding(mesh, spec)), or as jax.ShapeDtypeStruct(shape, dtype, "
        "sharding=NamedSharding(...)).")
  fallback = named[0].update(spec=PartitionSpec())
  p_def = jax.tree.structure(params)
  p_shapes = [jax.numpy.shape(p) for p in jax.tree.leaves(params)]
  p_shardings = jax.tree.map(
      lambda p: s if isinstance(s := _sharding_of(p), NamedSharding) else fallback,
      params)

  def params_like(x) -> bool:
    if isinstance(x, LLQRState) or jax.tree.structure(x) != p_def:
      return False
    return [jax.numpy.shape(v) for v in jax.tree.leaves(x)] == p_shapes

  def leaf(x):
    if isinstance(x, LLQRState):
      return _llqr(x, params, fallback)
    if params_like(x):
      return p_shardings
    return jax.tree.map(lambda _: fallback, x)
  return jax.tree.map(leaf, opt_state,
                      is_leaf=lambda x: isinstance(x, LLQRState) or params_like(x))


def shard_like_params(state: LLQRState, params: PyTree) -> LLQRState:
  """llqr's fresh state placed like ``params`` (what ``init`` returns).

  Concrete params with a ``NamedSharding``: ``jax.device_put``. Under a trace
  on a mesh with explicit axes (``jax.sharding.AxisType.Explicit``), where
  the params' types carry their shardings, inside ``jax.set_mesh``:
  ``jax.sharding.reshard``. Otherwise (one device; auto axes under ``jit``,
  whose shardings a trace cannot see; no mesh in context) the state as it
  is: pass :func:`state_shardings` as ``out_shardings``.
  """
  leaves = jax.tree.leaves(_unwrapped(params))
  found = [_sharding_of(p) for p in leaves]
  if not any(isinstance(s, NamedSharding) and any(e is not None for e in s.spec)
             for s in found):
    return state
  shardings = _llqr(state, params, next(s for s in found if isinstance(s, NamedSharding))
                    .update(spec=PartitionSpec()))
  if any(isinstance(p, jax.core.Tracer) for p in leaves):
    # init reads only the params' shapes, so jit drops them as inputs: the
    # program's devices come from the mesh in context (jax.set_mesh) alone.
    reshard = getattr(jax.sharding, "reshard", None)
    context = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    if reshard is None or context is None or context.empty:
      return state
    return jax.tree.map(reshard, state, shardings)
  return jax.device_put(state, shardings)
