"""The benchmarks' Flax linen models.

MLPs (the demo's, the training tasks', the deep autoencoder), the cost
study's small CNN, a 1-D convolutional ResNet and a causal character-level
Transformer. Their parameters are plain pytrees (no mutable collections), so
every optimizer, ``llqr`` included, sees the same ``params``. Only
``flax.linen``, ``jax`` and ``numpy``: they import on older pinned stacks as
well (jax 0.8.2 / flax 0.10.7 in the peer environment, where ``flax.nnx``
does not import).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


class MLP(nn.Module):
  """Dense layers of the given widths (relu or tanh), then a linear head.

  ``head_name`` names the head: ``"head"`` (the training tasks), or ``None``
  for Flax's automatic ``Dense_<len(widths)>`` (the demo's and the cost
  study's MLP). Flax seeds each layer's initialisation by its name, so the
  two give different parameters from the same key.
  """

  widths: Tuple[int, ...] = (100, 100)
  classes: int = 10
  activation: str = "relu"
  head_name: Optional[str] = "head"

  @nn.compact
  def __call__(self, x):
    act = {"relu": nn.relu, "tanh": jnp.tanh}[self.activation]
    for w in self.widths:
      x = act(nn.Dense(w)(x))
    return nn.Dense(self.classes, name=self.head_name)(x)


class CNN(nn.Module):
  """Two 1-D convolutions (32 channels, width 5) and a dense head."""

  @nn.compact
  def __call__(self, x):
    x = x[..., None]
    x = nn.relu(nn.Conv(32, (5,))(x))
    x = nn.relu(nn.Conv(32, (5,))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class ResBlock1D(nn.Module):
  """Pre-activation residual block: x + conv(relu(LN(conv(relu(LN(x)))))).

  The convolutions have no bias: a LayerNorm follows the first, and the
  second's would only shift the residual stream.
  """

  channels: int
  kernel: int = 3

  @nn.compact
  def __call__(self, x):
    conv = lambda name: nn.Conv(self.channels, (self.kernel,), use_bias=False,
                                name=name)
    h = conv("conv1")(nn.relu(nn.LayerNorm()(x)))
    h = conv("conv2")(nn.relu(nn.LayerNorm()(h)))
    return x + h


class ResNet1D(nn.Module):
  """Stem convolution, residual blocks, LayerNorm, global mean pool, dense head.

  Input ``(B, L)`` signals are read as one channel of length ``L``.
  """

  channels: int = 32
  blocks: int = 2
  stem_kernel: int = 5
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.channels, (self.stem_kernel,), name="stem")(x[..., None])
    for i in range(self.blocks):
      h = ResBlock1D(self.channels, name=f"block{i}")(h)
    h = nn.relu(nn.LayerNorm()(h)).mean(axis=1)
    return nn.Dense(self.classes, name="head")(h)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention from plain Dense layers (2-D kernels)."""

  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    hd = self.d_model // self.heads
    qkv = nn.Dense(3 * self.d_model, name="qkv")(x).reshape(b, t, 3, self.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(x.dtype)
    causal = np.tril(np.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, self.d_model)
    return nn.Dense(self.d_model, name="out")(out)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, 4×)."""

  d_model: int
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.d_model, self.heads, name="attn")(
        nn.LayerNorm(name="ln1")(x))
    h = nn.Dense(4 * self.d_model, name="fc")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(self.d_model, name="proj")(nn.gelu(h))


class CharTransformer(nn.Module):
  """Causal character-level Transformer LM with learned positions.

  ``(B, T)`` int tokens → ``(B, T, vocab)`` next-token logits.
  """

  vocab: int
  context: int = 64
  d_model: int = 64
  heads: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[1]
    h = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    pos = self.param("pos", nn.initializers.normal(0.02), (self.context, self.d_model))
    h = h + pos[:t]
    for i in range(self.layers):
      h = TransformerBlock(self.d_model, self.heads, name=f"layer{i}")(h)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(h))
