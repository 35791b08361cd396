r"""Intermediate-layer metrics: extra stage costs on the layers' outputs.

An intermediate metric ``{i: β_i or W_i}`` adds :math:`\tfrac12\,\delta
x_i^\top W_i\, \delta x_i` to the LQR cost of the step
(:func:`~llqr_optax.exact.lqr_problem`), which adds
:math:`\sum_i J_i^\top W_i J_i` to the curvature
(:func:`intermediate_curvature`).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from llqr_optax.exact import layers as layers_lib

Array = jax.Array
PyTree = Any
Intermediate = Optional[Mapping[int, Union[float, Array]]]

def check_intermediate(intermediate: Intermediate,
                       sizes: Sequence[int]) -> Dict[int, Union[float, Array]]:
  """Validates an intermediate-layer metric against the state sizes.

  Args:
    intermediate: ``None`` or ``{i: beta_i}`` (a scalar ``β_i ≥ 0``: ``β_i I``
      on the flattened state ``x_i``) or ``{i: W_i}`` (a dense PSD matrix of
      shape ``(n_i, n_i)``), for ``i`` in ``1..N-1``.
    sizes: ``[n_0, ..., n_N]``, the flattened batch-state sizes.

  Returns:
    The metric as a plain ``dict``.
  """
  if intermediate is None:
    return {}
  if not isinstance(intermediate, Mapping):
    raise ValueError(
        f"intermediate={intermediate!r} is not a mapping; pass e.g. "
        "{1: 0.1} to add 0.1·I on the input state of layer 1.")
  num_layers = len(sizes) - 1
  out = {}
  for i, metric in intermediate.items():
    if (isinstance(i, bool) or not isinstance(i, numbers.Integral)
        or not 1 <= i <= num_layers - 1):
      valid = (f"1..{num_layers - 1}" if num_layers > 1
               else "none: a single-layer model has no intermediate state")
      raise ValueError(
          f"intermediate key {i!r} is not a valid layer index: the metric acts "
          f"on x_i, the input of layer i, for i in {valid} (x_0 is the input "
          f"batch and x_{num_layers} the outputs, whose metric is the "
          "geometry's). Use one of those keys.")
    shape = jnp.shape(metric)
    if shape == ():
      if isinstance(metric, (int, float)) and not metric >= 0:
        raise ValueError(
            f"intermediate[{i}]={metric!r} is negative or NaN; the metric "
            "weight beta_i must be >= 0 (e.g. 0.1).")
    elif tuple(shape) != (sizes[i], sizes[i]):
      raise ValueError(
          f"intermediate[{i}] has shape {tuple(shape)} but the flattened state "
          f"x_{i} has size {sizes[i]}; pass a scalar beta or a "
          f"({sizes[i]}, {sizes[i]}) matrix.")
    out[int(i)] = metric
  return out


def _apply_metric(metric, dx: Array) -> Array:
  if jnp.ndim(metric) == 0:
    return metric * dx
  return (metric @ dx.reshape(-1)).reshape(dx.shape)


def intermediate_curvature(model, params_list: Sequence[PyTree], inputs: Array,
                           intermediate: Intermediate) -> Callable[[PyTree], PyTree]:
  r"""The intermediate metric's curvature, matrix-free, on ``params_list``.

  .. math::

     C_{\text{int}}\, v = \sum_i J_i^\top W_i J_i\, v,

  with ``J_i`` the Jacobian of the flattened state ``x_i`` in all parameters and
  ``W_i = β_i I`` or the given matrix. Adding it to a dense or CG solve
  (``extra_curvature=``) gives the step the Riccati recursion computes with
  ``intermediate=``.

  Args:
    model: a :class:`~llqr_optax.exact.Sequential`.
    params_list: one params pytree per layer.
    inputs: the input batch ``x_0``.
    intermediate: ``{i: beta_i or W_i}`` as in :func:`lqr_problem`.

  Returns:
    A linear function on pytrees shaped like ``params_list``.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax.exact import Sequential
    >>> model = Sequential((lambda w, x: x * w, lambda w, x: x * w))
    >>> cvp = intermediate_curvature(model, [2.0, 3.0], jnp.ones(1), {1: 0.5})
    >>> [float(c) for c in cvp([1.0, 1.0])]  # x_1 = w_0 x_0: 0.5 · 1 · 1
    [0.5, 0.0]

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026).
  """
  model = layers_lib.as_sequential(model)
  model.check_params(params_list)
  params_list = list(params_list)
  shapes = jax.eval_shape(model.activations, params_list, inputs)
  metric = check_intermediate(intermediate, [0] + [s.size for s in shapes[1:]])
  keys = sorted(metric)

  def states(ps):
    acts = model.activations(ps, inputs)
    return [acts[i] for i in keys]

  _, jvp = jax.linearize(states, params_list)
  transpose = jax.linear_transpose(jvp, params_list)

  def product(v):
    dxs = jvp(list(v))
    return transpose([_apply_metric(metric[i], dx) for i, dx in zip(keys, dxs)])[0]
  return product
