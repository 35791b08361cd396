"""Mapping and reducing over a refit's samples (``llqr_optax._samples``).

The forms XLA:CPU runs faster (a loop over the samples, a sum of slices, a
curvature product batched only where it holds no convolution or batched
matrix product) equal ``jax.vmap`` and ``jnp.sum``, and a compiled refit holds
no reduction over the stacked sample axis of a large array (the form that ran
~50x slower).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llqr_optax import _samples, fitting, structures


@pytest.mark.parametrize("mapper", ["map_samples", "map_products"])
@pytest.mark.parametrize("num", [1, 4, _samples.LOOP_MAX + 1])
def test_map_samples_equals_vmap(num, mapper):
  """A curvature product mapped over ``num`` samples, loop or ``vmap``, in
  float32 (the refit's dtype), on a two-leaf tree."""
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (16, 5))
  params = {"w": jnp.ones((5, 3)) * 0.1, "b": jnp.zeros(3)}
  apply_fn = lambda p: jnp.tanh(x @ p["w"] + p["b"])
  problem, _, _ = fitting.build_problem(apply_fn, params, jnp.zeros((16, 3)),
                                        loss="squared_error", damping=0.5,
                                        num_chunks=4)
  samples = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(1), (num,) + p.shape), params)
  got = jax.jit(lambda s: getattr(_samples, mapper)(problem.matvec, s))(samples)
  want = jax.jit(jax.vmap(problem.matvec))(samples)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  # non-vacuous: the products differ from the samples themselves
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(samples)[0])


@pytest.mark.parametrize("num", [1, 3, _samples.LOOP_MAX + 1])
def test_sum_and_mean_samples_equal_jnp(num):
  x = jax.random.normal(jax.random.PRNGKey(2), (num, 6, 5))
  np.testing.assert_allclose(_samples.sum_samples(x), jnp.sum(x, axis=0),
                             rtol=1e-6, atol=1e-6)
  mean = _samples.mean_samples({"w": x})["w"]
  np.testing.assert_allclose(mean, jnp.mean(x, axis=0), rtol=1e-6, atol=1e-6)


def _sample_axis_reductions(hlo: str, num: int):
  """``reduce`` ops in ``hlo`` whose operand has ``num`` rows and at least two
  axes, reduced over axis 0 only (to an array, not a scalar)."""
  shapes = {m.group(1): tuple(int(v) for v in m.group(2).split(",") if v)
            for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo)}
  found = []
  for m in re.finditer(r"%([\w.\-]+) = \w+\[[\d,]*\][^=\n]*? reduce\("
                       r"%([\w.\-]+), [^)]*\), dimensions=\{([\d,]*)\}", hlo):
    shape = shapes.get(m.group(2), ())
    if len(shape) >= 2 and shape[0] == num and m.group(3) == "0":
      found.append((m.group(1), shape))
  return found


@pytest.mark.parametrize("structure", ["diagonal", "kronecker", "ekfac"])
def test_compiled_refit_has_no_reduction_over_the_sample_axis(structure):
  """XLA:CPU reduces a short leading axis of a large array ~50x slower than
  it adds the slices (0.8 ms against 50-80 ms for ``(4, 1024, 1024)``): the
  refit's means over samples and autodiff's transposes of maps over them
  must come out as sums of slices. ``jnp.mean(x, axis=0)`` in one place fails
  this (the scan finds it: checked by the first assertion)."""
  num = 4
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 12))
  params = {"w": jnp.ones((12, 10)) * 0.1, "b": jnp.zeros(10)}
  apply_fn = lambda p: jnp.tanh(x @ p["w"] + p["b"])

  def refit(p, states):
    problem, _, _ = fitting.build_problem(apply_fn, p, jnp.zeros((32, 10)),
                                          loss="squared_error", damping=0.5,
                                          num_chunks=num)
    return fitting.refit(problem, states, steps=2, solver="pcg", first=False).states

  slow = jax.jit(lambda g: jnp.mean(g, axis=0)).lower(
      jnp.ones((num, 12, 10))).compile().as_text()
  assert _sample_axis_reductions(slow, num), "the scan must find jnp.mean(axis=0)"
  states = structures.init(params, structure)
  hlo = jax.jit(refit).lower(params, states).compile().as_text()
  assert not _sample_axis_reductions(hlo, num)


def _count(jaxpr, primitive):
  """Equations of ``primitive`` in ``jaxpr`` and the jaxprs nested in it."""
  from jax.extend import core as jcore
  return sum((eqn.primitive is primitive)
             + sum(_count(sub, primitive) for sub in jcore.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def _product(model):
  """``(v -> J v, one sample, the primitive to count)``: a Jacobian-vector
  product of a dense layer, a 1-D convolution or an attention score."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 3))
  if model == "dense":
    f, primitive = lambda w: jnp.tanh(x @ w), jax.lax.dot_general_p
  elif model == "convolution":
    f, primitive = lambda w: jnp.tanh(jax.lax.conv_general_dilated(
        x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))), \
        jax.lax.conv_general_dilated_p
  else:  # attention: a matrix product with a batch axis (the 8 sequences)
    f, primitive = lambda w: jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", x @ w, x)), \
        jax.lax.dot_general_p
  w = jnp.ones((3, 3)) * 0.3 if model != "convolution" else jnp.ones((2, 3, 3)) * 0.3
  return (lambda v: jax.jvp(f, (w,), (v,))[1]), w, primitive


@pytest.mark.parametrize("model", ["dense", "convolution", "attention"])
def test_map_products_batches_dense_products_and_loops_the_others(model):
  """Four samples: a dense product runs batched (its program holds the
  product once), a convolution's or attention's once per sample (four
  times); both equal ``jax.vmap``."""
  fn, w, primitive = _product(model)
  samples = jax.random.normal(jax.random.PRNGKey(1), (4,) + w.shape)
  once = _count(jax.make_jaxpr(fn)(samples[0]).jaxpr, primitive)
  mapped = _count(jax.make_jaxpr(lambda s: _samples.map_products(fn, s))(samples).jaxpr,
                  primitive)
  assert once > 0 and mapped == (once if model == "dense" else 4 * once), (once, mapped)
  got = jax.jit(lambda s: _samples.map_products(fn, s))(samples)
  np.testing.assert_allclose(got, jax.vmap(fn)(samples), rtol=1e-5, atol=1e-6)
