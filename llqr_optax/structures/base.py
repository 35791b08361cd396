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

Array = jax.Array


def matrix_shape(shape: Tuple[int, ...]) -> Tuple[int, int]:
  """A leaf seen as a ``(fan_in, fan_out)`` matrix.

  Dense kernels ``(in, out)`` stay as they are; conv kernels ``(h, w, c_in,
  c_out)`` become ``(h·w·c_in, c_out)``; vectors become ``(size, 1)``.
  """
  if len(shape) <= 1:
    return (math.prod(shape), 1)
  return (math.prod(shape[:-1]), shape[-1])


class Structure:
  """Base class of the structures: class-level functions, no instances.

  Subclasses set ``name``, ``State`` (a NamedTuple of float32 arrays) and
  ``blocks``, and implement :meth:`init` and :meth:`apply`.
  """

  name: ClassVar[str]
  State: ClassVar[type]
  blocks: ClassVar[Tuple[Tuple[str, ...], ...]]

  @classmethod
  def init(cls, shape: Tuple[int, ...], *, max_dim: int) -> NamedTuple:
    """The identity map on a leaf of ``shape``."""
    raise NotImplementedError

  @classmethod
  def apply(cls, state: NamedTuple, g: Array) -> Array:
    """``U_θ(g)`` for one leaf ``g`` (float32 in, float32 out)."""
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
  def memory(cls, state: NamedTuple) -> int:
    """Number of float32 values the state holds."""
    return sum(x.size for x in jax.tree.leaves(state))


def side_matrix(dim: int, max_dim: int) -> Array:
  """Identity factor for one side: a matrix, or a vector above ``max_dim``."""
  if dim > max_dim:
    return jnp.ones((dim,), jnp.float32)
  return jnp.eye(dim, dtype=jnp.float32)


def left_multiply(factor: Array, g2: Array) -> Array:
  """``F @ G`` for a matrix factor, ``diag(f) @ G`` for a vector one."""
  return factor @ g2 if factor.ndim == 2 else factor[:, None] * g2


def right_multiply(g2: Array, factor: Array) -> Array:
  """``G @ F`` for a matrix factor, ``G @ diag(f)`` for a vector one."""
  return g2 @ factor if factor.ndim == 2 else g2 * factor[None, :]
