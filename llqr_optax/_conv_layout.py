"""Convolutions in XLA:CPU's fast layout inside loops and conditionals.

XLA:CPU runs a convolution fast (Eigen, or its fused kernels) only in the
canonical layout: input ``(batch, spatial…, feature)``, kernel ``(spatial…,
in, out)``, output like the input. Its pass that rewrites other convolutions
into that layout, with transposes around them, visits the entry computation
only (``xla/service/cpu/conv_canonicalization.cc`` iterates
``module->entry_computation()``), so a convolution inside a ``while`` body or a
``cond`` branch keeps the layout autodiff gave it (a weight gradient is
``(feature, spatial, batch)``) and runs through a naive loop nest: 20 gradient
steps of the MNIST-1D ResNet took 1.42 s in a ``fori_loop`` against 0.28 s
unrolled.

:func:`canonical_convolutions` does that rewrite in JAX, before XLA sees the
program: it traces a function to its jaxpr and re-emits every convolution in
the canonical layout between two transposes (what XLA's pass would insert,
bit-identical results). llqr wraps with it the functions it hands to
``lax.cond`` and loops (the refit branch, inner-solver and CG bodies), on CPU
only: 0.40 s for the 20 steps above. :func:`repeat` is the fixed-length loop
of the inner solvers and of CG with a fixed budget.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore


def _canonical_specs(n: int):
  spatial = list(range(1, n - 1))
  return ((0, n - 1, *spatial), (n - 1, n - 2, *range(n - 2)), (0, n - 1, *spatial))


def _conv(lhs, rhs, *, dimension_numbers, **params):
  """One ``conv_general_dilated``, in the canonical layout."""
  n = lhs.ndim
  canonical = _canonical_specs(n)
  dn = dimension_numbers
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == canonical:
    return lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dn, **params)
  lb, lf, *ls = dn.lhs_spec
  ro, ri, *rs = dn.rhs_spec
  ob, of, *spatial_out = dn.out_spec
  out = lax.conv_general_dilated_p.bind(
      jnp.transpose(lhs, (lb, *ls, lf)), jnp.transpose(rhs, (*rs, ri, ro)),
      dimension_numbers=lax.ConvDimensionNumbers(*canonical), **params)
  perm = [0] * n
  perm[ob], perm[of] = 0, n - 1
  for j, axis in enumerate(spatial_out):
    perm[axis] = 1 + j
  return jnp.transpose(out, perm)


def _eval(jaxpr, consts, *args):
  """``jax.core.eval_jaxpr`` with :func:`_conv` for convolutions, into ``jit``s."""
  env = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is lax.conv_general_dilated_p:
      outs = [_conv(*invals, **eqn.params)]
    elif eqn.primitive.name in ("pjit", "jit") and "jaxpr" in eqn.params:
      inner = eqn.params["jaxpr"]
      outs = _eval(inner.jaxpr, inner.consts, *invals)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      subfuns, params = params if isinstance(params, tuple) else ((), params)
      outs = eqn.primitive.bind(*subfuns, *invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its convolutions in XLA:CPU's canonical layout (on CPU).

  Same results; elsewhere, under ``jax.disable_jit`` (``fn`` runs eagerly,
  once), and for a function whose program this cannot re-emit, ``fn`` itself.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax import lax
    >>> conv = lambda x, w: lax.conv_general_dilated(
    ...     x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    >>> x, w = jnp.ones((2, 8, 3)), jnp.ones((3, 3, 4))
    >>> weight_grad = lambda x, w: jax.grad(lambda w: conv(x, w).sum())(w)
    >>> bool(jnp.array_equal(canonical_convolutions(weight_grad)(x, w),
    ...                      weight_grad(x, w)))
    True
  """
  @functools.wraps(fn)
  def wrapped(*args):
    if jax.default_backend() != "cpu" or jax.config.jax_disable_jit:
      return fn(*args)  # elsewhere, or run eagerly: nothing to compile
    try:
      closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
      outs = _eval(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    except Exception:  # noqa: BLE001 - cannot trace or re-bind it here: as is
      return fn(*args)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)
  return wrapped


#: Inner loops of at most this many steps are unrolled around convolutions;
#: longer ones loop.
UNROLL_MAX = 8

#: On CPU, whether an inner loop whose body holds no convolution loops (one
#: copy of the body to compile); :func:`unrolled` sets it ``False`` for a
#: trace.
LOOP_PLAIN_BODIES = True


@contextlib.contextmanager
def unrolled():
  """Inner loops of at most :data:`UNROLL_MAX` steps traced inside are
  unrolled, with or without convolutions: XLA's counts of a compiled
  program's work (``cost_analysis``, its collectives) see a loop's body
  once, an unrolled body at every step (``benchmarks/scaling`` reads them)."""
  global LOOP_PLAIN_BODIES
  previous, LOOP_PLAIN_BODIES = LOOP_PLAIN_BODIES, False
  try:
    yield
  finally:
    LOOP_PLAIN_BODIES = previous


def holds(jaxpr, is_wanted: Callable[[Any], bool]) -> bool:
  """Whether ``jaxpr``, or a jaxpr nested in it, holds an equation
  ``is_wanted`` accepts."""
  return any(is_wanted(eqn) or any(holds(sub, is_wanted)
                                   for sub in jcore.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def is_convolution(eqn) -> bool:
  """Whether a jaxpr equation is a convolution."""
  return eqn.primitive is lax.conv_general_dilated_p


def _holds_convolutions(jaxpr) -> bool:
  """Whether ``jaxpr``, or a jaxpr nested in it, holds a convolution."""
  return holds(jaxpr, is_convolution)


def repeat(steps: int, body, carry):
  """``body`` applied ``steps`` times: a ``lax.fori_loop``, or unrolled where
  the body holds convolutions (on CPU, up to :data:`UNROLL_MAX` steps).

  On CPU, a body without convolutions loops: one copy of it to compile (the
  body is traced once more to look). A body with convolutions is unrolled,
  because XLA:CPU emits the convolutions of a loop body (or of a ``lax.cond``
  branch) in a slower form than the same ops at the top level: its pass that
  puts convolutions in the canonical layout of its fast kernels leaves the
  weight-gradient convolutions inside a body as they are (measured
  on the MNIST-1D ResNet: 20 gradient steps 0.15 s unrolled, 0.41 s in a
  loop). Unrolling costs compile time linear in the steps (50 momentum-SGD
  steps of the authors' solver compiled for 5 minutes on that ResNet), so
  longer solves loop, with the body's convolutions put in XLA:CPU's fast
  layout (:func:`canonical_convolutions`: 0.40 s for those 20 steps), and
  compile in seconds. A traced ``steps`` loops too.
  """
  if isinstance(steps, jax.core.Tracer) or int(steps) > UNROLL_MAX:
    return jax.lax.fori_loop(0, steps, canonical_convolutions(body), carry)
  if (int(steps) > 1 and LOOP_PLAIN_BODIES and jax.default_backend() == "cpu"
      and not jax.config.jax_disable_jit
      and not _holds_convolutions(jax.make_jaxpr(body)(jnp.int32(0), carry).jaxpr)):
    return jax.lax.fori_loop(0, int(steps), body, carry)
  for i in range(int(steps)):
    carry = body(i, carry)
  return carry
