r"""A network as an ordered chain of layers, the form the LQR reference needs.

The exact layerwise-LQR step sees a network as a chain

.. math::

   x_{i+1} = f_i(\theta_i, x_i), \qquad i = 0, \dots, N - 1,

with ``x_0`` the input batch and ``x_N`` the outputs the loss reads. A
:class:`Sequential` holds the layer functions ``f_i(params_i, x) -> x'``; the
parameters live outside it, as a list with one pytree per layer (``None`` or
``{}`` for a layer without parameters), in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Sequence, Tuple

import jax

Array = jax.Array
PyTree = Any
Layer = Callable[[PyTree, Array], Array]


@dataclasses.dataclass(frozen=True)
class Sequential:
  r"""An ordered chain of layer functions ``f_i(params_i, x) -> x'``.

  The network, as the layerwise LQR reference sees it:

  .. math::

     x_{i+1} = f_i(\theta_i, x_i), \qquad i = 0, \dots, N - 1,

  ``x_0`` the input batch and ``x_N`` the outputs. Construct it with the
  layer functions; the parameters stay outside, one entry per layer.

  Attributes:
    layers: the layer functions, in order. Each takes its own parameters (any
      pytree, ``None`` for none) and the batch state, and returns the next
      batch state.

  Example:
    >>> import jax.numpy as jnp
    >>> dense = lambda p, x: x @ p["w"] + p["b"]
    >>> relu = lambda p, x: jnp.maximum(x, 0.0)
    >>> model = Sequential((dense, relu, dense))
    >>> params = [{"w": jnp.ones((3, 2)), "b": -jnp.ones(2)}, None,
    ...           {"w": jnp.ones((2, 1)), "b": jnp.zeros(1)}]
    >>> model.apply(params, jnp.ones((4, 3))).tolist()
    [[4.0], [4.0], [4.0], [4.0]]
    >>> [x.shape for x in model.activations(params, jnp.ones((4, 3)))]
    [(4, 3), (4, 2), (4, 2), (4, 1)]
  """

  layers: Tuple[Layer, ...]

  def __post_init__(self):
    layers = tuple(self.layers)
    for i, layer in enumerate(layers):
      if not callable(layer):
        raise ValueError(
            f"layers[{i}]={layer!r} is not callable; every layer must be a "
            "function f(params, x) -> x' (use params=None for a layer without "
            "parameters).")
    if not layers:
      raise ValueError("layers=() is empty; pass at least one layer function.")
    object.__setattr__(self, "layers", layers)

  def __len__(self) -> int:
    return len(self.layers)

  def check_params(self, params_list: Sequence[PyTree]) -> None:
    """Raises ``ValueError`` unless there is one params entry per layer."""
    if not isinstance(params_list, (list, tuple)):
      raise ValueError(
          f"params_list of type {type(params_list).__name__} is not a list; "
          f"pass a list with one params pytree per layer ({len(self)} "
          "entries, None for a layer without parameters).")
    if len(params_list) != len(self):
      raise ValueError(
          f"params_list has {len(params_list)} entries but the model has "
          f"{len(self)} layers; pass one params pytree per layer, in order "
          "(None for a layer without parameters).")

  def activations(self, params_list: Sequence[PyTree], x: Array) -> List[Array]:
    """All batch states ``[x_0, x_1, ..., x_N]``, input first, output last."""
    self.check_params(params_list)
    xs = [x]
    for layer, params in zip(self.layers, params_list):
      xs.append(layer(params, xs[-1]))
    return xs

  def apply(self, params_list: Sequence[PyTree], x: Array) -> Array:
    """The outputs ``x_N`` of the chain on the input batch ``x``."""
    return self.activations(params_list, x)[-1]


def as_sequential(model) -> Sequential:
  r"""A :class:`Sequential`, or a sequence of layer functions made into one.

  .. math::

     (f_0, \dots, f_{N-1}) \;\mapsto\;
     x \mapsto f_{N-1}(\theta_{N-1}, \cdots f_0(\theta_0, x)).

  Args:
    model: a :class:`Sequential` (returned as is), or a list or tuple of layer
      functions ``f_i(params_i, x) -> x'``.

  Returns:
    A :class:`Sequential`.

  Raises:
    ValueError: for anything else.

  Example:
    >>> import jax.numpy as jnp
    >>> len(as_sequential([lambda p, x: x @ p, lambda p, x: jnp.tanh(x)]))
    2
  """
  if isinstance(model, Sequential):
    return model
  if isinstance(model, (list, tuple)):
    return Sequential(tuple(model))
  raise ValueError(
      f"model={model!r} is not a Sequential; pass llqr_optax.exact.Sequential"
      "((f_0, f_1, ...)) or a flax.linen.Sequential through "
      "from_flax_sequential(module, variables).")




def _module_layer(module, collections):
  def layer(params, x):
    variables = dict(collections)
    if params is not None:
      variables["params"] = params
    return module.apply(variables, x)
  return layer


def _plain_layer(fn):
  def layer(params, x):
    del params
    return fn(x)
  return layer


def from_flax_sequential(module, variables) -> Tuple[Sequential, List[PyTree]]:
  r"""Splits a ``flax.linen.Sequential`` into layer functions and params.

  .. math::

     \texttt{module.apply}(\text{variables}, x)
       = f_{N-1}(\theta_{N-1}, \cdots f_0(\theta_0, x)),

  with ``f_i`` the ``i``-th entry of the module and ``θ_i`` its parameters.
  Linen names the ``i``-th entry of ``Sequential(layers)`` ``layers_i`` and
  stores its parameters at ``variables["params"]["layers_i"]``; parameter-free
  entries (``nn.relu``, ``jnp.tanh``, a module without parameters) have no
  entry and get ``None``. Other collections (e.g. ``batch_stats``) are closed
  over, read-only. Every layer must map one array to one array.

  Args:
    module: a ``flax.linen.Sequential``.
    variables: its variables, ``{"params": ..., ...}`` as returned by
      ``module.init``.

  Returns:
    ``(model, params_list)`` with ``model.apply(params_list, x) ==
    module.apply(variables, x)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> net = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((3, 5))
    >>> variables = net.init(jax.random.key(0), x)
    >>> model, params_list = from_flax_sequential(net, variables)
    >>> [p is None for p in params_list]
    [False, True, False]
    >>> bool(jnp.allclose(model.apply(params_list, x), net.apply(variables, x)))
    True
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  if not isinstance(module, nn.Sequential):
    raise ValueError(
        f"module of type {type(module).__name__} is not a flax.linen.Sequential;"
        " wrap the layers as nn.Sequential([...]) or build an "
        "llqr_optax.exact.Sequential of layer functions directly.")
  if not hasattr(variables, "keys") or "params" not in variables:
    keys = list(variables.keys()) if hasattr(variables, "keys") else variables
    raise ValueError(
        f"variables with top-level keys {keys!r} has no 'params' collection; "
        "pass the variables returned by module.init, e.g. {'params': params}.")
  num = len(module.layers)
  known = {f"layers_{i}" for i in range(num)}
  for col, tree in variables.items():
    unknown = sorted(k for k in tree.keys() if k not in known)
    if unknown:
      raise ValueError(
          f"variables[{col!r}] has entries {unknown} that match no layer of a "
          f"Sequential with {num} layers (names layers_0..layers_{num - 1}); "
          "pass the variables of this very module.")
  layers, params_list = [], []
  for i, entry in enumerate(module.layers):
    name = f"layers_{i}"
    if isinstance(entry, nn.Module):
      params = variables["params"].get(name)
      collections = {col: tree[name] for col, tree in variables.items()
                     if col != "params" and name in tree}
      layers.append(_module_layer(entry.clone(parent=None), collections))
      params_list.append(params)
    elif callable(entry):
      layers.append(_plain_layer(entry))
      params_list.append(None)
    else:
      raise ValueError(f"module.layers[{i}]={entry!r} is neither a module nor "
                       "a callable.")
  return Sequential(tuple(layers)), params_list
