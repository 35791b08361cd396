"""The tree-level functions of the structures: one state per parameter leaf.

:data:`STRUCTURES` registers the structure classes; a tree of their states is
made by :func:`init`, applied by :func:`apply` and walked by
:func:`map_states`. Each class owns its rules (identity, fallbacks, size caps,
memory, see :class:`~llqr_optax.structures.base.Structure`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple, Union

import jax
import jax.numpy as jnp

from llqr_optax import sharding
from llqr_optax.structures import base
from llqr_optax.structures.dense import Dense
from llqr_optax.structures.diagonal import Diagonal
from llqr_optax.structures.ekfac import EigenKronecker
from llqr_optax.structures.kronecker import Kronecker
from llqr_optax.structures.scalar import Scalar

PyTree = Any

#: The structures by name. Adding one is a module with its class and a line
#: here.
STRUCTURES: Dict[str, type] = {cls.name: cls for cls in (
    Scalar,
    Diagonal,
    Kronecker,
    EigenKronecker,
    Dense,
)}
_BY_STATE = {cls.State: cls for cls in STRUCTURES.values()}
# Each state type has its own set of field names: they identify it.
_BY_FIELDS = {frozenset(cls.State._fields): cls.State for cls in STRUCTURES.values()}
assert len(_BY_FIELDS) == len(STRUCTURES)

#: What ``structure="auto"`` picks for a leaf with at least two axes.
AUTO_MATRIX = "diagonal"
#: ``structure="auto"`` gives leaves of at most this many elements a dense
#: ``U`` (at most 256 floats): coupled coordinates of tiny leaves, e.g. the two
#: of the Rosenbrock valley, are not served by a diagonal.
AUTO_DENSE_MAX = 16

StructureSpec = Union[str, PyTree, Callable[[Tuple[Any, ...], Tuple[int, ...]], str]]


def is_state(x) -> bool:
  """Whether ``x`` is one leaf's structure state (e.g. ``DiagonalState``).

  For ``is_leaf=`` in tree maps over a tree of states.

  Example:
    >>> import jax.numpy as jnp
    >>> states = init({"w": jnp.zeros((3, 2))}, "kronecker")
    >>> is_state(states["w"]), is_state(states)
    (True, False)
  """
  return type(x) in _BY_STATE


def structure_of(state) -> type:
  """The structure class of one leaf's state.

  Each structure has its own state type, so a state says how to apply itself.

  Args:
    state: one leaf's state, e.g. ``init(params)["w"]``.

  Returns:
    The :class:`Structure` subclass, e.g. :class:`Diagonal`.

  Example:
    >>> import jax.numpy as jnp
    >>> structure_of(init({"w": jnp.zeros((3, 2))}, "kronecker")["w"]).name
    'kronecker'
  """
  return _BY_STATE[type(state)]


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _key_name(key) -> Any:
  """A path entry's name, whatever the container: dict, attribute or index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def restore_types(states: PyTree, params: PyTree) -> PyTree | None:
  """Rebuilds the per-leaf structure states of a tree that lost their types.

  Containers that store pytrees as nested mappings — ``flax.nnx.Optimizer``
  (its ``nnx.State``), a checkpoint restored without a target tree — turn
  each leaf's ``NamedTuple`` (e.g. ``DiagonalState(diag=...)``) into a
  mapping ``{"diag": ...}``. The arrays are all there, and the field names
  say which state each leaf held (every state type has its own fields), so
  the typed tree can be rebuilt, with the containers of ``params``.

  Args:
    states: per-leaf structure states, typed or as mappings of their fields.
    params: the params the states were made for (arrays or shapes).

  Returns:
    A pytree with the structure of ``params`` and one typed state per leaf,
    or ``None`` if ``states`` does not hold exactly one state's fields under
    every leaf of ``params`` (states of other params).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> untyped = {"w": {"left": jnp.eye(3), "right": jnp.eye(2)},
    ...            "b": {"diag": jnp.ones(2)}}
    >>> typed = restore_types(untyped, params)
    >>> type(typed["w"]).__name__, type(typed["b"]).__name__
    ('KroneckerState', 'DiagonalState')
    >>> restore_types({"w": {"diag": jnp.ones((3, 2))}}, params) is None
    True
  """
  names = lambda path: tuple(_key_name(k) for k in path)
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
  slots = {names(path): i for i, (path, _) in enumerate(p_paths)}
  fields = [dict() for _ in p_paths]
  for path, x in jax.tree_util.tree_flatten_with_path(states)[0]:
    key = names(path)
    i = slots.get(key[:-1])
    if i is None or not key or key[-1] in fields[i]:
      return None
    fields[i][key[-1]] = x
  typed = []
  for f in fields:
    state_type = _BY_FIELDS.get(frozenset(f))
    if state_type is None:
      return None
    typed.append(state_type(**f))
  return jax.tree.unflatten(p_def, typed)


def _resolve(name: Any, path, shape, *, max_dim: int, dense_max: int,
             per_leaf: bool = False) -> str:
  """The structure of one leaf: ``"auto"``'s pick, then the class's own rules
  (fallbacks and size caps, :meth:`Structure.resolve`)."""
  where = f"for the leaf {_path_str(path)} of shape {tuple(shape)}"
  if not isinstance(name, str) or (name != "auto" and name not in STRUCTURES):
    raise ValueError(
        f"structure={name!r} {where} is unknown; choose one of "
        f"{['auto'] + list(STRUCTURES)}.")
  if name == "auto":
    if math.prod(shape) <= min(AUTO_DENSE_MAX, dense_max):
      name = "dense"
    else:
      name = "diagonal" if len(shape) <= 1 else AUTO_MATRIX
  return STRUCTURES[name].resolve(tuple(shape), where=where, max_dim=max_dim,
                                  dense_max=dense_max, named=per_leaf)


def leaf_names(structure: StructureSpec, params: PyTree, *, max_dim: int = 1024,
               dense_max: int = 4096) -> PyTree:
  """The structure name chosen for every leaf of ``params``.

  Args:
    structure: one name for every leaf (``"auto"`` picks ``dense`` for leaves
      of at most :data:`AUTO_DENSE_MAX` elements, ``diagonal`` for other
      vectors and :data:`AUTO_MATRIX` for matrices and conv kernels); a pytree
      of names with the structure of ``params``; or a callable
      ``(path, shape) -> name``.
    params: the parameter pytree.
    max_dim: sides above this size use a diagonal factor (Kronecker) or the
      identity basis (ekfac). A leaf given ``"kronecker"`` or ``"ekfac"`` by
      a pytree of names or a callable whose two sides both exceed it raises
      ``ValueError``; one name for every leaf falls back silently.
    dense_max: the largest leaf size allowed with ``"dense"``.

  Returns:
    A pytree of names shaped like ``params``.

  Raises:
    ValueError: on an unknown name, a pytree that does not match ``params``,
      ``"dense"`` on a leaf larger than ``dense_max``, or ``"kronecker"`` or
      ``"ekfac"`` named for a leaf (pytree or callable) whose two sides both
      exceed ``max_dim``.

  Example:
    >>> import jax.numpy as jnp
    >>> leaf_names("auto", {"w": jnp.zeros((30, 20)), "b": jnp.zeros(20),
    ...                     "scale": jnp.zeros(4)})
    {'b': 'diagonal', 'scale': 'dense', 'w': 'diagonal'}
    >>> leaf_names("kronecker", {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    {'b': 'diagonal', 'w': 'kronecker'}
    >>> leaf_names(lambda path, shape: "scalar" if len(shape) == 1 else "ekfac",
    ...            {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    {'b': 'scalar', 'w': 'ekfac'}
  """
  kw = dict(max_dim=max_dim, dense_max=dense_max)
  if isinstance(structure, str):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _resolve(structure, p, jnp.shape(x), **kw), params)
  if callable(structure):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _resolve(structure(p, jnp.shape(x)), p, jnp.shape(x),
                              per_leaf=True, **kw),
        params)
  p_def = jax.tree.structure(params)
  s_def = jax.tree.structure(structure)
  if p_def != s_def:
    raise ValueError(
        "structure, given as a pytree of names, does not match params: "
        f"params has {p_def.num_leaves} leaves ({p_def}), structure has "
        f"{s_def.num_leaves} ({s_def}). Give one name per params leaf, or a "
        "callable (path, shape) -> name.")
  return jax.tree_util.tree_map_with_path(
      lambda p, x, n: _resolve(n, p, jnp.shape(x), per_leaf=True, **kw),
      params, structure)


def init(params: PyTree, structure: StructureSpec = "auto", *,
         max_dim: int = 1024, dense_max: int = 4096) -> PyTree:
  r"""Identity preconditioners: a tree of per-leaf states shaped like ``params``.

  Every structure starts at the identity map,

  .. math::

     U_l^{(0)} = I \quad\text{for every leaf } l
     \qquad (s = 1,\; D = \mathbf 1,\; L = I,\; R = I,\; S = \mathbf 1,\; M = I),

  and the first refit rescales it by its best scalar.

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    structure: a name, a pytree of names or a callable ``(path, shape) ->
      name``, as in :func:`leaf_names`.
    max_dim: sides above this size get a diagonal factor (Kronecker) or the
      identity basis (ekfac).
    dense_max: the largest leaf size allowed with ``"dense"``.

  Returns:
    A pytree with one structure state (a ``NamedTuple`` of float32 arrays)
    per leaf of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> states = init({"w": jnp.zeros((3, 2))}, "diagonal")
    >>> states["w"].diag.shape
    (3, 2)
    >>> [x.shape for x in init({"w": jnp.zeros((3, 2))}, "kronecker")["w"]]
    [(3, 3), (2, 2)]
  """
  names = leaf_names(structure, params, max_dim=max_dim, dense_max=dense_max)
  return jax.tree.map(
      lambda x, n: STRUCTURES[n].init(tuple(jnp.shape(x)), max_dim=max_dim),
      params, names)


def apply(states: PyTree, tree: PyTree) -> PyTree:
  r"""``U(tree)``: each leaf's preconditioner applied to that leaf.

  .. math::

     U(v) = \operatorname{blockdiag}_l(U_l)\, v
     = \big(U_l(v_l)\big)_{l \in \text{leaves}},

  the block-diagonal (per-leaf) preconditioner of LLQR. The computation is in
  float32 and the result has the dtype of ``tree``.

  Args:
    states: per-leaf structure states, as from :func:`init`.
    tree: a pytree with the structure and shapes of the params.

  Returns:
    ``U(tree)``, shaped and typed like ``tree``.

  Example:
    >>> import jax.numpy as jnp
    >>> s = init({"w": jnp.zeros((3, 2))}, "scalar")
    >>> apply(s, {"w": jnp.ones((3, 2))})["w"].sum()
    Array(6., dtype=float32)
  """
  return jax.tree.map(
      lambda g, s: sharding.sharded_like(
          structure_of(s).apply(s, g.astype(jnp.float32)).astype(g.dtype), g),
      tree, states)


def identity_like(states: PyTree) -> PyTree:
  """The identity map of every leaf's structure, with the shapes of ``states``.

  What :func:`init` made for these states, read off their shapes (so without
  ``max_dim``: a side held as a vector fell back to a diagonal factor).

  Example:
    >>> import jax.numpy as jnp
    >>> s = init({"w": jnp.zeros((3, 2))}, "kronecker", max_dim=2)
    >>> [x.shape for x in identity_like(s)["w"]]
    [(3,), (2, 2)]
  """
  return map_states(lambda cls, s: cls.identity_like(s), states)


def floor(states: PyTree, value: Any) -> PyTree:
  """Every leaf's fitted scales bounded below by ``value`` (see
  :meth:`Structure.floor`; matrix factors are left as they are).

  Example:
    >>> import jax.numpy as jnp
    >>> s = init({"w": jnp.zeros(3)}, "diagonal")
    >>> s["w"] = s["w"]._replace(diag=jnp.array([-1.0, 0.0, 2.0]))
    >>> floor(s, 1e-8)["w"].diag.tolist()
    [9.99999993922529e-09, 9.99999993922529e-09, 2.0]
  """
  return map_states(lambda cls, s: cls.floor(s, value), states)


def map_states(fn: Callable[[type, Any], Any], states: PyTree) -> PyTree:
  """Maps ``fn(structure_class, state)`` over every leaf's state.

  Args:
    fn: called as ``fn(cls, state)`` with each leaf's structure class and
      state; may return anything (a new state, a number, ...).
    states: per-leaf structure states, as from :func:`init`.

  Returns:
    The pytree of ``fn``'s results, one per leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> states = init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, "kronecker")
    >>> map_states(lambda cls, s: cls.memory(s), states)  # floats held
    {'b': 2, 'w': 13}
  """
  return jax.tree.map(lambda s: fn(structure_of(s), s), states, is_leaf=is_state)
