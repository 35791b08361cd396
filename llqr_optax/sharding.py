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

Below them, the plumbing the rest of the library uses under a trace: arrays
typed with an explicit mesh axis read as replicated copies
(:func:`replicated`) or put back in a reference's sharding
(:func:`sharded_like`), the output sharding of a matrix product split on its
contracted axis (:func:`contracted_split`), the mesh axes of a leaf's
matrix sides (:func:`side_axes`, :func:`factor_spec`), and values marked as
varying over a mapped axis (:func:`per_device`).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# Modules, not names: structures.base imports this module, so names are read
# at call time.
from llqr_optax import _nnx
from llqr_optax import state as state_lib
from llqr_optax import structures

PyTree = Any
Array = jax.Array


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


def _llqr(state: state_lib.LLQRState, params: PyTree, fallback: NamedSharding) -> state_lib.LLQRState:
  bare = _nnx.unwrapped(params)
  p_def = jax.tree.structure(bare)
  leaf_states = p_def.flatten_up_to(state.preconditioner)
  precond = [_leaf_state(s, _sharding_of(p), len(jax.numpy.shape(p)), fallback)
             for s, p in zip(leaf_states, jax.tree.leaves(bare))]
  whole = jax.tree.map(lambda _: fallback, state)
  return whole._replace(preconditioner=jax.tree.unflatten(p_def, precond))


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
    if isinstance(x, state_lib.LLQRState) or jax.tree.structure(x) != p_def:
      return False
    return [jax.numpy.shape(v) for v in jax.tree.leaves(x)] == p_shapes

  def leaf(x):
    if isinstance(x, state_lib.LLQRState):
      return _llqr(x, params, fallback)
    if params_like(x):
      return p_shardings
    return jax.tree.map(lambda _: fallback, x)
  return jax.tree.map(leaf, opt_state,
                      is_leaf=lambda x: isinstance(x, state_lib.LLQRState) or params_like(x))


def shard_like_params(state: state_lib.LLQRState, params: PyTree) -> state_lib.LLQRState:
  """llqr's fresh state placed like ``params`` (what ``init`` returns).

  Concrete params with a ``NamedSharding``: ``jax.device_put``. Under a trace
  on a mesh with explicit axes (``jax.sharding.AxisType.Explicit``), where
  the params' types carry their shardings, inside ``jax.set_mesh``:
  ``jax.sharding.reshard``. Otherwise (one device; auto axes under ``jit``,
  whose shardings a trace cannot see; no mesh in context) the state as it
  is: pass :func:`state_shardings` as ``out_shardings``.
  """
  leaves = jax.tree.leaves(_nnx.unwrapped(params))
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


# --- under a trace: explicit mesh axes and mapped axes ------------------------


def replicated(tree: Any) -> Any:
  """Gathers arrays whose type carries an explicit sharding (``AxisType.Explicit``).

  Under ``jit`` with arrays sharded over an explicit mesh axis (the default of
  ``jax.make_mesh`` in recent JAX), a slice of the sharded axis, or a
  contraction over it, has no unambiguous output sharding. Such arrays (a
  batch's outputs and targets; the samples behind a structure's Gram
  matrices, once a refit) are read as a replicated copy; gradients flow back
  into the sharded originals unchanged. Elsewhere this is the identity.
  """
  typeof = getattr(jax, "typeof", None)
  reshard = getattr(jax.sharding, "reshard", None)
  if typeof is None or reshard is None:
    return tree

  def leaf(x):
    sharding = getattr(typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or all(s is None for s in spec):
      return x
    return reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))
  return jax.tree.map(leaf, tree)


def sharded_like(x: Array, ref: Array) -> Array:
  """``x`` with the sharding type of ``ref`` under an explicit mesh.

  A state sharded over an explicit mesh axis (``AxisType.Explicit``) types
  ``U(g)`` as sharded; the output must keep the sharding of ``g`` (the params')
  to meet the params again, and a statistic computed replicated goes back to
  its state's sharding. Elsewhere this is the identity. Going from replicated
  to split is a local slice; the other way round would gather.
  """
  typeof = getattr(jax, "typeof", None)
  reshard = getattr(jax.sharding, "reshard", None)
  if typeof is None or reshard is None:
    return x
  want = getattr(typeof(ref), "sharding", None)
  have = getattr(typeof(x), "sharding", None)
  spec_w, spec_h = getattr(want, "spec", None), getattr(have, "spec", None)
  if spec_w is None or spec_h is None or tuple(spec_w) == tuple(spec_h):
    return x
  return reshard(x, want)


def spec_of(x: Array):
  """``(sharding, spec padded to x's rank)`` of an explicit-typed array, or
  ``(None, None)``."""
  typeof = getattr(jax, "typeof", None)
  sharding = getattr(typeof(x), "sharding", None) if typeof is not None else None
  spec = getattr(sharding, "spec", None)
  if spec is None:
    return None, None
  return sharding, tuple(spec) + (None,) * (jnp.ndim(x) - len(tuple(spec)))


def contracted_split(a: Array, b: Array):
  """The output sharding of ``a @ b`` (rank 1 or 2) when both are split on the
  contracted axis under an explicit mesh: rows split like ``a``'s, or else
  over the contracted axis; ``None`` otherwise (JAX's own rule)."""
  sa, pa = spec_of(a)
  _, pb = spec_of(b)
  if pa is None or pb is None or jnp.ndim(a) == 0 or jnp.ndim(b) == 0:
    return None
  axis = pa[-1]
  if axis is None or axis != pb[0 if jnp.ndim(b) == 1 else -2]:
    return None
  rows = [(pa[0] if pa[0] is not None else axis)] if jnp.ndim(a) == 2 else []
  cols = [pb[-1] if pb[-1] not in rows else None] if jnp.ndim(b) == 2 else []
  if not rows and cols and cols[0] is None:
    cols = [axis]
  return sa.update(spec=PartitionSpec(*(rows + cols)))


def side_axes(spec: PartitionSpec, ndim: int) -> Tuple[Any, Any]:
  """The mesh axes splitting the rows and the columns of a leaf's matrix.

  The leaf of rank ``ndim`` split as ``spec`` is seen as its ``(fan_in,
  fan_out)`` matrix (:func:`~llqr_optax.structures.matrix_shape`). Its rows are split in contiguous
  blocks when the leaf is split on its first axis only among the fan-in
  axes (a kernel's rows, a conv kernel's height): then the fan-in side is
  split like them. A split of a later fan-in axis interleaves the rows, so
  that side is not split. The columns are split like the last axis.

  Args:
    spec: the leaf's ``PartitionSpec``.
    ndim: the leaf's rank.

  Returns:
    ``(rows, columns)``: a mesh axis name (or tuple of names) or ``None``.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> side_axes(P("model"), 2), side_axes(P(None, None, "x", "y"), 4)
    (('model', None), (None, 'y'))
  """
  entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
  if ndim <= 1:
    return (entries[0] if entries else None), None
  rows = entries[0] if all(e is None for e in entries[1:-1]) else None
  return rows, entries[-1]


def factor_spec(axis: Any, factor: Any) -> PartitionSpec:
  """A factor's rows split over ``axis`` (a vector factor: its entries)."""
  return PartitionSpec(axis) if len(jnp.shape(factor)) == 1 else PartitionSpec(axis, None)


def explicitly_sharded(tree) -> bool:
  """Whether some array's type carries a split over an explicit mesh axis."""
  typeof = getattr(jax, "typeof", None)
  if typeof is None:
    return False
  specs = [getattr(getattr(typeof(x), "sharding", None), "spec", None)
           for x in jax.tree.leaves(tree)]
  return any(spec and any(e is not None for e in spec) for spec in specs)


def mapped_axes(axis_name) -> tuple:
  """``axis_name`` as a tuple of mapped axis names (one name, or several)."""
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def per_device(tree: PyTree, axis_name) -> PyTree:
  """Marks values replicated over ``axis_name`` as varying across it.

  Inside ``shard_map`` with its varying-axes check (``check_vma=True``, the
  default), autodiff with respect to a value replicated over the axis sums the
  cotangents over it (a ``psum`` is the transpose of a broadcast), so ``vjp``
  would return the *sum* of the devices' products and the ``pmean`` that
  follows would not divide it. Linearising at per-device (varying) params
  keeps every product local; the explicit ``pmean`` then averages. Without
  the check (``check_vma=False``, ``pmap``) products are local anyway.
  """
  pcast = getattr(jax.lax, "pcast", None)
  typeof = getattr(jax, "typeof", None)
  if pcast is None or typeof is None:  # older JAX: no varying-axes types
    return tree
  axes = mapped_axes(axis_name)

  def leaf(x):
    vma = getattr(typeof(x), "vma", frozenset())
    missing = tuple(a for a in axes if a not in vma)
    return pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(leaf, tree)
