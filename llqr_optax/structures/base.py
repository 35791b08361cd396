"""The interface every structured preconditioner implements.

A structure is a family of linear maps ``U_θ`` on one parameter leaf, with its
parameters ``θ`` held in a ``NamedTuple`` state of float32 arrays. Every family
here is *linear in each block of its parameters* (bilinear for Kronecker), so
the LQR objective is quadratic in each block and can be minimised by conjugate
gradients; ``blocks`` names the fields fitted together, in alternation.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (jax.scipy.linalg.cho_factor)
from jax.sharding import PartitionSpec

from llqr_optax import sharding

Array = jax.Array


def matrix_shape(shape: Tuple[int, ...]) -> Tuple[int, int]:
  r"""A leaf seen as a ``(fan_in, fan_out)`` matrix.

  Dense kernels ``(in, out)`` stay as they are; conv kernels ``(h, w, c_in,
  c_out)`` become ``(h·w·c_in, c_out)``; vectors become ``(size, 1)``:

  .. math::

     (d_1, \dots, d_k) \mapsto \Big(\prod_{j<k} d_j,\; d_k\Big).

  Args:
    shape: the leaf's shape.

  Returns:
    ``(fan_in, fan_out)``.

  Example:
    >>> matrix_shape((3, 3, 64, 128)), matrix_shape((40, 100)), matrix_shape((7,))
    ((576, 128), (40, 100), (7, 1))
  """
  if len(shape) <= 1:
    return (math.prod(shape), 1)
  return (math.prod(shape[:-1]), shape[-1])


class Structure:
  r"""Base class of the structures: class-level functions, no instances.

  A structure is a family of linear maps ``U_θ`` on one leaf, fitted by
  minimising the LQR objective ``J`` (:mod:`llqr_optax.fitting.objective`),
  which is quadratic in each block of ``θ`` because ``U_θ`` is linear in it.
  Subclasses set ``name``, ``State`` (a NamedTuple of float32 arrays) and
  ``blocks``, and implement :meth:`init` and :meth:`apply`; they may override
  the rules :meth:`resolve` (fallbacks, size caps), :meth:`identity_like`,
  :meth:`memory`, :meth:`update_statistics` and :meth:`pcg_preconditioner`.
  Adding a structure is a module with its class and a line in
  :data:`~llqr_optax.structures.STRUCTURES`.

  Attributes:
    name: the name used in ``structure=...``.
    State: the ``NamedTuple`` type of a leaf's state.
    blocks: groups of state fields fitted together, in alternation.
    floors: whether :meth:`floor` bounds the first block (scales of ``U``).

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax.structures import Diagonal
    >>> state = Diagonal.init((2, 3), max_dim=1024)
    >>> Diagonal.apply(state._replace(diag=2 * state.diag), jnp.ones((2, 3)))
    Array([[2., 2., 2.],
           [2., 2., 2.]], dtype=float32)
    >>> Diagonal.blocks, Diagonal.memory(state)
    ((('diag',),), 6)
  """

  name: ClassVar[str]
  State: ClassVar[type]
  blocks: ClassVar[Tuple[Tuple[str, ...], ...]]
  floors: ClassVar[bool] = False

  @classmethod
  def init(cls, shape: Tuple[int, ...], *, max_dim: int) -> NamedTuple:
    """The identity map on a leaf of ``shape``.

    Args:
      shape: the leaf's shape.
      max_dim: sides above this size use a diagonal factor or basis.

    Returns:
      The structure's state (a ``NamedTuple`` of float32 arrays) for which
      :meth:`apply` is the identity.
    """
    raise NotImplementedError

  @classmethod
  def apply(cls, state: NamedTuple, g: Array) -> Array:
    """``U_θ(g)`` for one leaf ``g`` (float32 in, float32 out).

    Args:
      state: the structure's state ``θ``.
      g: an array shaped like the leaf.

    Returns:
      ``U_θ(g)``, shaped like ``g``.
    """
    raise NotImplementedError

  @classmethod
  def update_statistics(cls, state: NamedTuple, grads: Array,
                        decay: Any) -> NamedTuple:
    """Updates statistics that are not fitted (``grads`` has a chunk axis)."""
    del grads, decay
    return state

  @classmethod
  def scale(cls, state: NamedTuple, s: Array) -> NamedTuple:
    """``s · U``: scales the first fitted block (every ``U`` is linear in it)."""
    return state._replace(**{f: getattr(state, f) * s for f in cls.blocks[0]})

  @classmethod
  def pcg_preconditioner(cls, state: NamedTuple, k: int, samples: Array,
                         eps: float) -> Any:
    """An approximate inverse of ``∂²J/∂θ_k²``, to precondition the inner CG.

    With ``A ≈ a I`` the Hessian of ``J`` in block ``k`` is ``a`` times the
    Gauss-Newton matrix of ``θ_k ↦ U_θ x_c`` summed over the samples, which
    depends on the samples' second moments only; its (regularised) inverse
    makes the inner problem well conditioned whatever the spread of the
    gradient samples. ``samples`` has a leading chunk axis.

    Returns:
      A function on the block's values (a tuple, as in ``blocks[k]``). The
      default is the identity (plain CG).
    """
    del state, k, samples, eps
    return lambda block: block

  @classmethod
  def floor(cls, state: NamedTuple, value: Any) -> NamedTuple:
    """``U`` with its fitted scales bounded below by ``value``.

    For structures whose first block holds scales of ``U``'s action
    (``floors = True``: scalar, diagonal, ekfac's ``S``), each entry becomes
    ``max(entry, value)``, so that ``U`` never reverses or drops a direction
    of the gradient. Other structures (matrix factors) are left as they are.
    """
    if not cls.floors:
      return state
    return state._replace(**{f: jnp.maximum(getattr(state, f), value)
                             for f in cls.blocks[0]})

  @classmethod
  def memory(cls, state: NamedTuple) -> int:
    """Number of float32 values the state holds."""
    return sum(x.size for x in jax.tree.leaves(state))

  @classmethod
  def resolve(cls, shape: Tuple[int, ...], *, where: str, max_dim: int,
              dense_max: int, named: bool) -> str:
    """The structure a leaf of ``shape`` gets when this one is asked for.

    Its own name, a fallback's (e.g. ``"diagonal"`` for vectors), or a
    ``ValueError`` naming the leaf (``where``) when it cannot serve it.

    Args:
      shape: the leaf's shape.
      where: the leaf, for error messages.
      max_dim: the largest side held as a matrix.
      dense_max: the largest leaf size of a dense ``U``.
      named: whether the leaf was given this structure by name (a pytree of
        names or a callable), rather than by one name for every leaf.
    """
    del shape, where, max_dim, dense_max, named
    return cls.name

  @classmethod
  def identity_like(cls, state: NamedTuple) -> NamedTuple:
    """The identity map with the shapes of ``state`` (what :meth:`init` made
    for it)."""
    return cls.init(tuple(jnp.shape(state[0])), max_dim=1)

  @classmethod
  def state_specs(cls, state: NamedTuple, spec: PartitionSpec) -> NamedTuple:
    """The ``PartitionSpec`` of every field of ``state`` for a leaf split as
    ``spec`` (one entry per axis of the leaf): fields that grow with the leaf
    are split along the side the leaf is split on, so a device holds ``1/D``
    of them. The default replicates every field (for tiny states).

    Args:
      state: the leaf's state (arrays or ``jax.ShapeDtypeStruct``).
      spec: the leaf's ``PartitionSpec``, padded to its rank.

    Returns:
      ``cls.State`` holding one ``PartitionSpec`` per field.
    """
    del spec
    return cls.State(*(PartitionSpec() for _ in state))


class TwoSided(Structure):
  """A structure with one factor or basis per side of the leaf's matrix.

  Vectors (biases, norms) fall back to ``"diagonal"``; a side above
  ``max_dim`` holds a vector (a diagonal factor, or the identity basis).

  Attributes:
    sides: the state fields of the two sides, ``(fan_in side, fan_out side)``.
  """
  sides: ClassVar[Tuple[str, str]]

  @classmethod
  def resolve(cls, shape, *, where, max_dim, dense_max, named):
    del dense_max
    if len(shape) <= 1:
      return "diagonal"
    m, n = matrix_shape(shape)
    if named and min(m, n) > max_dim:
      # One side above max_dim falls back to a diagonal factor on that side; a
      # leaf asked for by name whose two sides both do would silently get a
      # structure no better than "diagonal" (ekfac) or weaker (kronecker).
      raise ValueError(
          f"structure={cls.name!r} {where}: both sides of its {m}×{n} matrix "
          f"exceed max_dim={max_dim}, so both factors would fall back to "
          "diagonals. Use 'diagonal' for this leaf, or raise max_dim.")
    return cls.name

  @classmethod
  def identity_like(cls, state):
    a, b = (getattr(state, f) for f in cls.sides)
    square = [x.shape[0] for x in (a, b) if x.ndim == 2]
    # The largest max_dim that turns exactly the vector sides into vectors.
    max_dim = max(square) if square else 0
    return cls.init((a.shape[0], b.shape[0]), max_dim=max_dim)


#: The relative jitter of :func:`regularised_inverse` over a reciprocal's.
GRAM_FACTOR = 10.0


def regularised_inverse(m: Array, eps: float) -> Array:
  r"""``(M + 10ε·mean(diag M)·I)⁻¹`` for a symmetric positive semidefinite
  ``M``; the identity where ``M`` vanishes.

  The Gram matrix of a few samples is ill-conditioned, and its inverse
  amplifies the rounding of its sums (which differs with the order of the
  reduction: sharded over devices or not) by up to its condition number,
  about ``1/jitter``; a reciprocal (:func:`regularised_reciprocal`) does not.
  So the relative jitter is :data:`GRAM_FACTOR` times ``ε`` (``κ ≤ 100`` at
  the inner solver's ``ε = 10⁻³``), the inverse comes from a Cholesky
  factorisation of the symmetrised matrix (backward stable), and it is
  computed in float64 when JAX has it enabled (``jax_enable_x64``):

  .. math::

     (M + \epsilon' \bar m I)^{-1} = L^{-\top} L^{-1}, \quad
     L L^\top = \tfrac12 (M + M^\top) + \epsilon' \bar m I, \quad
     \epsilon' = 10 \epsilon,\ \bar m = \operatorname{mean}\operatorname{diag} M .

  Example:
    >>> import jax.numpy as jnp
    >>> regularised_inverse(jnp.diag(jnp.array([1.0, 3.0])), 1e-3)  # +0.02 I
    Array([[0.98039216, 0.        ],
           [0.        , 0.33112583]], dtype=float32)
  """
  given, dtype = m.dtype, (jnp.float64 if jax.config.jax_enable_x64 else m.dtype)
  m = m.astype(dtype)
  scale = jnp.mean(jnp.diagonal(m))
  scale = jnp.where(scale > 0, scale, 1.0)
  eye = jnp.eye(m.shape[0], dtype=dtype)
  factor = jax.scipy.linalg.cho_factor(
      0.5 * (m + m.T) + GRAM_FACTOR * eps * scale * eye, lower=True)
  return jax.scipy.linalg.cho_solve(factor, eye).astype(given)


def regularised_reciprocal(h: Array, eps: float) -> Array:
  """``1 / (h + ε·mean(h))`` for ``h ≥ 0``; ones where ``h`` vanishes."""
  scale = jnp.mean(h)
  scale = jnp.where(scale > 0, scale, 1.0)
  return 1.0 / (h + eps * scale)


def side_matrix(dim: int, max_dim: int) -> Array:
  """Identity factor for one side: a matrix, or a vector above ``max_dim``."""
  if dim > max_dim:
    return jnp.ones((dim,), jnp.float32)
  return jnp.eye(dim, dtype=jnp.float32)


def gram(spec: str, a: Array, b: Array) -> Array:
  """``jnp.einsum(spec, a, b)`` in full precision, read from replicated copies
  (see :func:`~llqr_optax.sharding.replicated`): the second moments of samples whose rows are
  sharded over an explicit mesh axis."""
  a, b = sharding.replicated(a), sharding.replicated(b)
  return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def matmul(a: Array, b: Array) -> Array:
  """``a @ b`` in full float32 precision.

  GPUs and TPUs multiply float32 matrices in reduced precision by default
  (TF32 or bf16 passes), which loses about three digits: enough to spoil the
  fitted factors and the preconditioned step. The factors are small next to
  the model, so the structures always ask for the highest precision.

  Under an explicit mesh, when both operands are split on the contracted axis
  (``Q_Aᵀ G`` with the basis and the gradient split by rows) each device
  multiplies its blocks and the partial products are summed across devices,
  the result split by rows: a gradient-sized reduction, the factor never
  gathered (JAX asks for the output's sharding there).
  """
  out = sharding.contracted_split(a, b)
  # ``out_sharding`` only where needed: older JAX's matmul has no such argument.
  kw = {} if out is None else {"out_sharding": out}
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST, **kw)


def left_multiply(factor: Array, g2: Array) -> Array:
  """``F @ G`` for a matrix factor, ``diag(f) @ G`` for a vector one."""
  return matmul(factor, g2) if factor.ndim == 2 else factor[:, None] * g2


def right_multiply(g2: Array, factor: Array) -> Array:
  """``G @ F`` for a matrix factor, ``G @ diag(f)`` for a vector one."""
  return matmul(g2, factor) if factor.ndim == 2 else g2 * factor[None, :]
