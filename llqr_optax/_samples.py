"""Mapping and reducing over the few gradient samples of a refit.

A refit holds ``n_c`` samples (4 by default) of every params-shaped array,
stacked on a leading axis. Two XLA:CPU behaviours make the obvious forms slow
there, so the refit maps and reduces over that axis through these functions:

- a curvature product batched over the samples turns the model's
  convolutions into grouped convolutions and its attention's batched matrix
  products into products with one more batch axis, which XLA:CPU runs slower
  than one product per sample; dense layers batch well. So
  :func:`map_products` loops over the samples when the product holds a
  convolution or a batched matrix product, and batches them (``vmap``)
  otherwise. Measured on JAX 0.10.2 (one Kronecker refit step before Adam,
  batch 128, medians of 7): with every map batched, a refit step took
  1.02-1.13x the loop's time on the 1-D ResNets and 1.66x on the char
  Transformer; with the products alone batched, 0.74-1.08x on tanh MLPs
  40-w-w-10 (w from 8 to 1024), compiling 5-26% faster;
- a sum over a short leading axis of a large array (``(4, 1024, 1024)``) runs
  about 50x slower than the sum of its slices (0.8 ms against 50-80 ms on this
  project's 2-core CPU), and autodiff produces exactly such sums when it
  transposes a ``vmap`` over the samples: :func:`map_samples` (for maps that
  autodiff transposes, such as ``U x_c``) loops on CPU, and
  :func:`sum_samples` adds the slices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from llqr_optax._conv_layout import holds, is_convolution

PyTree = Any

#: The most samples mapped by a loop (on CPU) or summed slice by slice.
LOOP_MAX = 8


def _num(tree: PyTree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def map_samples(fn: Callable[[PyTree], PyTree], samples: PyTree) -> PyTree:
  """``jax.vmap(fn)`` over the leading sample axis of ``samples``.

  On CPU a few samples (at most ``LOOP_MAX``) are mapped by a loop instead,
  whose transpose under autodiff adds the samples' contributions instead of
  reducing over a stacked axis, which XLA:CPU runs slowly (see the module's
  docstring). Elsewhere, and for many samples, ``vmap``.

  Example:
    >>> import jax.numpy as jnp
    >>> map_samples(lambda v: {"w": 2.0 * v["w"]}, {"w": jnp.ones((3, 2))})["w"].shape
    (3, 2)
  """
  n = _num(samples)
  if jax.default_backend() != "cpu" or n > LOOP_MAX:
    return jax.vmap(fn)(samples)
  outs = [fn(jax.tree.map(lambda x: x[i], samples)) for i in range(n)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _batches_slowly(eqn) -> bool:
  """Whether a jaxpr equation is a convolution or a matrix product with batch
  axes: the ops XLA:CPU runs slower batched over the samples than one sample
  at a time."""
  return is_convolution(eqn) or (eqn.primitive is lax.dot_general_p
                                 and bool(eqn.params["dimension_numbers"][1][0]))


def map_products(fn: Callable[[PyTree], PyTree], samples: PyTree) -> PyTree:
  """``jax.vmap(fn)`` over the leading sample axis, for a curvature product
  ``fn`` (or a ``vjp``) that autodiff does not transpose.

  On CPU, for a few samples (at most :data:`LOOP_MAX`), ``fn`` is first traced
  on one sample: if its program holds a convolution or a matrix product with
  batch axes (attention), the samples are mapped by :func:`map_samples`'
  loop; otherwise that program runs batched over them (see the module's
  docstring). Elsewhere ``jax.vmap``; under ``jax.disable_jit``, as
  :func:`map_samples`.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.ones((3, 2))
    >>> map_products(lambda v: {"w": v["w"] @ w}, {"w": jnp.ones((4, 5, 3))})["w"].shape
    (4, 5, 2)
  """
  n = _num(samples)
  if jax.default_backend() != "cpu" or n > LOOP_MAX or jax.config.jax_disable_jit:
    return map_samples(fn, samples)
  leaves = jax.tree.leaves(samples)
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(
      jax.tree.map(lambda x: x[0], samples))
  if holds(closed.jaxpr, _batches_slowly):
    return map_samples(fn, samples)
  outs = jax.vmap(jcore.jaxpr_as_fun(closed))(*leaves)
  return jax.tree.unflatten(jax.tree.structure(shapes), outs)


def sum_samples(x: jax.Array) -> jax.Array:
  """``jnp.sum(x, axis=0)`` over the sample axis, as a sum of the slices when
  there are at most :data:`LOOP_MAX` of them (fused into one elementwise pass
  on every backend).

  Example:
    >>> import jax.numpy as jnp
    >>> sum_samples(jnp.arange(6.0).reshape(3, 2))
    Array([6., 9.], dtype=float32)
  """
  n = x.shape[0]
  if n > LOOP_MAX or n == 0:
    return jnp.sum(x, axis=0)
  total = x[0]
  for i in range(1, n):
    total = total + x[i]
  return total


def mean_samples(tree: PyTree) -> PyTree:
  """The mean over the sample axis of every leaf (see :func:`sum_samples`).

  Example:
    >>> import jax.numpy as jnp
    >>> mean_samples({"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])})["w"]
    Array([2., 4.], dtype=float32)
  """
  return jax.tree.map(lambda x: sum_samples(x) / x.shape[0], tree)
