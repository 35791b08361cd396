"""Convolutions in XLA:CPU's canonical layout inside llqr's conditionals and loops.

``canonical_convolutions`` must compute what the function computes (1-D and
2-D convolutions, strides, dilations, feature groups, their gradients), and
llqr's compiled programs must hold no convolution outside the canonical
layout once the refit sits in a ``lax.cond`` (the one-step loop) or an inner
solver loops: the check reads the compiled HLO's ``dim_labels``, and fails
when the wrapping is removed from ``stages.maybe_refit`` (checked).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax import lax

import llqr_optax
from llqr_optax._conv_layout import canonical_convolutions

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="XLA:CPU's layout rule")

CANONICAL = {1: "b0f_0io->b0f", 2: "b01f_01io->b01f"}


def _non_canonical(hlo: str, ndim: int) -> list:
  labels = re.findall(r"dim_labels=([a-z0-9_>-]+)", hlo)
  assert labels, "no convolution in the program"
  return [l for l in labels if l != CANONICAL[ndim]]


@pytest.mark.parametrize("case", ["1d", "2d-strided-dilated", "grouped"])
def test_same_values_as_the_function(case):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  if case == "1d":
    x, w = jax.random.normal(k[0], (4, 16, 3)), jax.random.normal(k[1], (5, 3, 6))
    conv = lambda x, w: lax.conv_general_dilated(
        x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  elif case == "2d-strided-dilated":
    x, w = jax.random.normal(k[0], (2, 9, 11, 3)), jax.random.normal(k[1], (3, 2, 3, 4))
    conv = lambda x, w: lax.conv_general_dilated(
        x, w, (2, 1), "VALID", rhs_dilation=(1, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  else:
    x, w = jax.random.normal(k[0], (2, 10, 4)), jax.random.normal(k[1], (3, 2, 6))
    conv = lambda x, w: lax.conv_general_dilated(
        x, w, (1,), "SAME", feature_group_count=2,
        dimension_numbers=("NWC", "WIO", "NWC"))
  loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  fn = lambda x, w: (conv(x, w), jax.grad(loss, argnums=(0, 1))(x, w))
  got = jax.jit(canonical_convolutions(fn))(x, w)
  want = jax.jit(fn)(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_in_a_loop_are_canonical():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 12, 3))
  w0 = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4))
  conv = lambda w: lax.conv_general_dilated(x, w, (1,), "SAME",
                                            dimension_numbers=("NWC", "WIO", "NWC"))
  grad = jax.grad(lambda w: jnp.sum(conv(w) ** 2))
  body = lambda i, w: w - 1e-3 * grad(w)
  plain = jax.jit(lambda w: lax.fori_loop(0, 5, body, w))
  fixed = jax.jit(lambda w: lax.fori_loop(0, 5, canonical_convolutions(body), w))
  assert _non_canonical(plain.lower(w0).compile().as_text(), 1)  # XLA leaves them
  assert not _non_canonical(fixed.lower(w0).compile().as_text(), 1)
  np.testing.assert_allclose(fixed(w0), plain(w0), rtol=1e-6, atol=1e-6)


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3,))(x[..., None]))
    return nn.Dense(3)(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("kw", [dict(), dict(inner_solver="sgd", inner_steps=12)],
                         ids=["one-step-cond", "looped-solver"])
def test_llqr_programs_hold_only_canonical_convolutions(kw):
  model = _ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(3), (16, 10))
  y = jnp.arange(16) % 3
  params = model.init(jax.random.PRNGKey(4), x)
  tx = optax.chain(llqr_optax.llqr(loss="softmax_cross_entropy", **kw), optax.sgd(0.1))

  def step(p, s):
    g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(q, x), y).mean())(p)
    u, s = tx.update(g, s, p, apply_fn=lambda q: model.apply(q, x), targets=y)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  assert not _non_canonical(hlo, 1)
