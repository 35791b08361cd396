"""Mapping and reducing over the few gradient samples of a refit.

A refit holds ``n_c`` samples (4 by default) of every params-shaped array,
stacked on a leading axis. Two XLA:CPU behaviours make the obvious forms slow
there, so the refit maps and reduces over that axis through these functions:

- one curvature product per sample runs faster than one product batched over
  the samples (batched matrix products, grouped convolutions), so
  :func:`map_samples` loops on CPU. Measured on JAX 0.10.2 (one Kronecker
  refit step, batch 128): the loop is faster on convolutions and attention
  (a batched refit takes 1.02-1.13x the loop's time on the 1-D ResNets, 1.66x
  on the char Transformer), but not on dense-only MLPs, where the batched
  form took 0.48-1.01x the loop's time and compiles faster;
- a sum over a short leading axis of a large array (``(4, 1024, 1024)``) runs
  about 50x slower than the sum of its slices (0.8 ms against 50-80 ms on this
  project's 2-core CPU), and autodiff produces exactly such sums when it
  transposes a ``vmap`` over the samples; :func:`sum_samples` adds the slices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any

#: The most samples mapped by a loop (on CPU) or summed slice by slice.
LOOP_MAX = 8


def _num(tree: PyTree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def map_samples(fn: Callable[[PyTree], PyTree], samples: PyTree) -> PyTree:
  """``jax.vmap(fn)`` over the leading sample axis of ``samples``.

  On CPU a few samples (at most ``LOOP_MAX``) are mapped by a loop
  instead, which XLA:CPU runs faster (see the module's docstring), and whose
  transpose under autodiff adds the samples' contributions instead of
  reducing over a stacked axis. Elsewhere, and for many samples, ``vmap``.

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
