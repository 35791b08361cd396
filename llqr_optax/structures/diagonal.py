"""Diagonal structure: ``U(G) = D ⊙ G``."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llqr_optax.structures.base import Structure


class DiagonalState(NamedTuple):
  """``diag``: the elementwise scales ``D``, shaped like the leaf."""
  diag: jax.Array


class Diagonal(Structure):
  """A learned elementwise scale: :math:`U(G) = D \\odot G`."""

  name = "diagonal"
  State = DiagonalState
  blocks = (("diag",),)

  @classmethod
  def init(cls, shape, *, max_dim):
    del max_dim
    return DiagonalState(jnp.ones(shape, jnp.float32))

  @classmethod
  def apply(cls, state, g):
    return state.diag * g
