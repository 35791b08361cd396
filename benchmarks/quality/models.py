"""The quality study's models and flat-vector bookkeeping.

:class:`Net` is a plain JAX chain of affine layers (dense, or 1-D conv by
im2col) whose forward pass exposes each layer's inputs and pre-activations,
which K-FAC's factors need; :class:`Layout` maps the flat
(``ravel_pytree``) parameter vector to leaves and layers.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


class Net:
  """A chain of affine layers with relu between them, ending in logits.

  ``layers`` entries: ``(name, kind, cfg)`` with kind ``"dense"`` (cfg:
  ``(d_in, d_out)``) or ``"conv"`` (cfg: ``(k, c_in, c_out, stride, pad)``,
  1-D, kernel stored ``(k, c_in, c_out)``). Conv layers see the input as
  ``(n, length, channels)``; a dense layer after a conv flattens it.
  """

  def __init__(self, name: str, layers: Sequence[tuple], in_length: int = 40):
    self.name = name
    self.layers = tuple(layers)
    self.in_length = in_length

  def __hash__(self):
    return hash((self.name, self.layers))

  def __eq__(self, other):
    return isinstance(other, Net) and (self.name, self.layers) == (other.name, other.layers)

  def describe(self) -> str:
    parts = []
    for name, kind, cfg in self.layers:
      if kind == "dense":
        parts.append(f"{name}: dense {cfg[0]}->{cfg[1]}")
      else:
        k, ci, co, s, p = cfg
        parts.append(f"{name}: conv1d k{k} {ci}->{co} stride {s} pad {p}")
    return "; ".join(parts) + " (relu between layers)"

  def init(self, key) -> Dict[str, Dict[str, jax.Array]]:
    params = {}
    for (name, kind, cfg), k in zip(self.layers,
                                    jax.random.split(key, len(self.layers))):
      if kind == "dense":
        d_in, d_out = cfg
        shape, fan_in = (d_in, d_out), d_in
      else:
        kk, ci, co, _, _ = cfg
        shape, fan_in, d_out = (kk, ci, co), kk * ci, co
      params[name] = {"w": jnp.sqrt(2.0 / fan_in) * jax.random.normal(k, shape),
                      "b": jnp.zeros((shape[-1],))}
    return params

  @staticmethod
  def _patches(h, k, stride, pad):
    """``(n, L, c) -> (n, T, k·c)``: im2col, rows ordered like ``w.reshape(k·c, ·)``."""
    h = jnp.pad(h, ((0, 0), (pad, pad), (0, 0)))
    length = h.shape[1]
    t = (length - k) // stride + 1
    idx = stride * np.arange(t)[:, None] + np.arange(k)[None, :]
    p = h[:, idx, :]  # (n, T, k, c)
    return p.reshape(p.shape[0], t, k * h.shape[2])

  def forward(self, params, x, perturb=None):
    """Logits and, per layer, the inputs ``a`` ``(n, T, d_in)`` (dense: T = 1).

    ``perturb``: optional per-layer arrays added to the pre-activations
    ``(n, T, d_out)`` (zeros: their gradient is the pre-activation gradient).
    """
    h = x
    inputs = []
    num = len(self.layers)
    for i, (name, kind, cfg) in enumerate(self.layers):
      w, b = params[name]["w"], params[name]["b"]
      if kind == "dense":
        a = h.reshape(h.shape[0], 1, -1)
      else:
        k, _, _, stride, pad = cfg
        if h.ndim == 2:
          h = h[:, :, None]
        a = self._patches(h, k, stride, pad)
      s = a @ w.reshape(-1, w.shape[-1]) + b
      if perturb is not None:
        s = s + perturb[i]
      inputs.append(a)
      h = s if kind != "dense" else s[:, 0, :]
      if i < num - 1:
        h = jax.nn.relu(h)
    return h, inputs

  def apply(self, params, x):
    return self.forward(params, x)[0]

  def preact_shapes(self, n):
    shapes, length = [], self.in_length
    for _, kind, cfg in self.layers:
      if kind == "dense":
        shapes.append((n, 1, cfg[1]))
      else:
        k, _, co, s, p = cfg
        length = (length + 2 * p - k) // s + 1
        shapes.append((n, length, co))
    return shapes


def make_models(quick: bool) -> List[Net]:
  if quick:
    return [Net("mlp_40-16-10", [("l1", "dense", (40, 16)),
                                 ("l2", "dense", (16, 10))])]
  return [
      Net("mlp_40-32-32-10", [("l1", "dense", (40, 32)),
                              ("l2", "dense", (32, 32)),
                              ("l3", "dense", (32, 10))]),
      Net("conv1d_8-12", [("c1", "conv", (5, 1, 8, 2, 2)),
                          ("c2", "conv", (5, 8, 12, 2, 2)),
                          ("out", "dense", (120, 10))]),
  ]


class Layout:
  """Flat (``ravel_pytree``) indices of every leaf and every layer."""

  def __init__(self, params):
    flat, self.unravel = ravel_pytree(params)
    self.size = int(flat.size)
    idx = self.unravel(jnp.arange(self.size, dtype=jnp.float32))
    self.leaf_index = jax.tree.map(lambda a: np.asarray(a).astype(np.int64), idx)
    self.leaves = [np.ravel(a) for a in jax.tree.leaves(self.leaf_index)]
    self.layers = {name: np.concatenate([np.ravel(a) for a in jax.tree.leaves(sub)])
                   for name, sub in self.leaf_index.items()}

  def flat(self, tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)

  def tree(self, vec):
    return self.unravel(jnp.asarray(vec, jnp.float32))
