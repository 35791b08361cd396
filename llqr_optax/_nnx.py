"""Flax nnx's wrapped leaves, unwrapped: llqr works on bare arrays.

``nnx.split(model, nnx.Param)`` and ``nnx.state(model)`` (what
``nnx.Optimizer`` passes to ``tx.init``) hold each array in an ``nnx``
Variable, a pytree node around one array. llqr unwraps them on the way in
and wraps its outputs again on the way out; these helpers are that step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_wrapper(x) -> bool:
  """An array-like pytree node holding one array: a ``flax.nnx.Variable``."""
  return (hasattr(x, "shape") and hasattr(x, "dtype")
          and not isinstance(x, (jax.Array, np.ndarray))
          and len(jax.tree.leaves(x)) == 1)


def unwrapped(tree):
  """``tree`` with every wrapper node (:func:`is_wrapper`) replaced by its array.

  ``nnx.split(model, nnx.Param)`` and ``nnx.state(model)`` (what
  ``nnx.Optimizer`` passes to ``tx.init``) hold each array in an ``nnx``
  Variable. llqr works on the bare arrays: its structure states then sit in
  plain containers, never inside a Variable, and keep their types when
  ``nnx.Optimizer`` stores the state and writes it back. The leaves keep their
  order, so ``jax.tree.unflatten(jax.tree.structure(tree), leaves)`` wraps
  them again.
  """
  return jax.tree.map(lambda x: jax.tree.leaves(x)[0], tree, is_leaf=is_wrapper)


def scalar(x) -> Any:
  """The one array of a scalar field, unwrapped from any pytree node around
  it (``nnx.Optimizer`` keeps each array in an ``nnx`` Variable)."""
  leaves = jax.tree.leaves(x)
  return leaves[0] if len(leaves) == 1 else x


def structure_for(structure, params):
  """``structure`` for the unwrapped params (:func:`unwrapped`).

  A pytree of names made from wrapped params (``jax.tree.map(lambda x:
  "kronecker", params)`` over ``nnx.split``'s params puts each name in an
  ``nnx`` Variable) is given the structure of the unwrapped params; names and
  callables are returned as they are.
  """
  if isinstance(structure, str) or callable(structure):
    return structure
  bare = jax.tree.structure(unwrapped(params))
  if jax.tree.structure(structure) == jax.tree.structure(params) != bare:
    return jax.tree.unflatten(bare, jax.tree.leaves(structure))
  return structure


def param_shapes(params):
  """``params`` (unwrapped) as float32 ``ShapeDtypeStruct``s, one per leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32),
                      unwrapped(params))
