"""Pieces shared by the test modules: a tiny MLP, batches, dense references.

The model is a plain function on ``{"l0": {"w", "b"}, "l1": …}`` pytrees. Each
module passes its own sizes, keys and scales, so its numbers are the ones it
had when it defined a model of its own. The dense references are written
here once, independently of the library: by hand in NumPy (or ``jax.numpy``
where autodiff goes through them) or with ``jax.jacfwd``/``jax.hessian``.

Test modules import this file as ``helpers`` (pytest puts ``tests/`` on
``sys.path``; so does running a test file as a script).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from llqr_optax import structures

#: Every structure by name, and "auto", which picks one per leaf.
STRUCTURES = tuple(structures.STRUCTURES)
ALL_STRUCTURES = STRUCTURES + ("auto",)


@contextlib.contextmanager
def most_optimizations_disabled():
  """XLA's optimisation passes off for the programs compiled inside (tiny
  programs compile much faster, and compute the same to rounding); the
  previous setting comes back after."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


# --- model and data ----------------------------------------------------------


def mlp(params, x, activation=jnp.tanh):
  """The dense layers ``l0, l1, …`` of ``params``, ``activation`` between them.

  A layer is ``{"w": (fan_in, fan_out), "b": (fan_out,)}``; ``b`` may be left
  out. No activation after the last layer: its outputs are logits.
  """
  n = len(params)
  for i in range(n):
    layer = params[f"l{i}"]
    x = x @ layer["w"]
    if "b" in layer:
      x = x + layer["b"]
    if i < n - 1:
      x = activation(x)
  return x


def mlp_params(sizes, weight_keys, bias_keys=None, *, scaled=True, bias_scale=0.1):
  """Parameters of :func:`mlp` with layer widths ``sizes`` (input first).

  Layer ``i`` has ``w ~ N(0, 1) / sqrt(fan_in)`` (``N(0, 1)`` if not
  ``scaled``) drawn with ``weight_keys[i]``, and ``b = bias_scale · N(0, 1)``
  drawn with ``bias_keys[i]``, or zeros where that key is ``None`` (all
  zeros with ``bias_keys=None``). Arrays have JAX's default float dtype.
  """
  layers = list(zip(sizes[:-1], sizes[1:]))
  bias_keys = [None] * len(layers) if bias_keys is None else list(bias_keys)
  params = {}
  for i, (fan_in, fan_out) in enumerate(layers):
    w = jax.random.normal(weight_keys[i], (fan_in, fan_out))
    b = (jnp.zeros(fan_out) if bias_keys[i] is None
         else bias_scale * jax.random.normal(bias_keys[i], (fan_out,)))
    params[f"l{i}"] = {"w": w / np.sqrt(fan_in) if scaled else w, "b": b}
  return params


def classification_batch(key, batch, d_in, classes):
  """``(x, y)``: ``N(0, 1)`` inputs ``(batch, d_in)`` and integer labels below
  ``classes``, drawn with the two halves of ``jax.random.split(key)``."""
  kx, ky = jax.random.split(key)
  return (jax.random.normal(kx, (batch, d_in)),
          jax.random.randint(ky, (batch,), 0, classes))


def cross_entropy(logits, y):
  """optax's softmax cross-entropy with integer labels, averaged."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --- dense references ----------------------------------------------------------


def dense_fisher(dist, z, xp=np):
  """The output-space Fisher of the mean loss at outputs ``z``, as an
  ``(m, m)`` matrix (``m = z.size``, row-major), built by hand.

  ``dist`` is the loss's predictive distribution: ``"categorical"`` (events
  are the rows of the last axis; ``diag(p) − ppᵀ`` on each event's block),
  ``"bernoulli"`` (``p(1 − p)`` on the diagonal) or ``"gaussian"`` (the
  identity); everything over the number of events. ``xp`` is ``numpy`` or
  ``jax.numpy`` (to build it inside a traced function).
  """
  z = xp.asarray(z)
  if dist == "categorical":
    k = z.shape[-1]
    rows = z.reshape(-1, k)
    n = rows.shape[0]
    e = xp.exp(rows - rows.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    blocks = p[:, :, None] * (xp.eye(k)[None] - p[:, None, :])  # diag(p) − ppᵀ
    return xp.einsum("ef,eij->eifj", xp.eye(n), blocks).reshape(n * k, n * k) / n
  flat = z.reshape(-1)
  if dist == "bernoulli":
    p = 1.0 / (1.0 + xp.exp(-flat))
    return xp.diag(p * (1.0 - p)) / flat.size
  return xp.eye(flat.size) / flat.size


def ref_divergence(dist, kind, alpha, zp, zq, xp=np):
  """Rényi-α ``D(p‖q)`` (``kind="renyi"``) or the reverse ``KL(q‖p)``
  (``kind="reverse_kl"``, ``alpha`` unused) between the predictive
  distributions at outputs ``zp`` and ``zq``, averaged over events.

  Gaussians have unit variance; ``xp`` as in :func:`dense_fisher`.
  """
  zp, zq = xp.asarray(zp), xp.asarray(zq)
  if dist == "gaussian":
    d2 = xp.square(zp - zq).reshape(-1)
    return xp.mean((alpha if kind == "renyi" else 1.0) * d2 / 2.0)

  def probs(z):  # per-event probability vectors, (events, outcomes)
    if dist == "categorical":
      rows = z.reshape(-1, z.shape[-1])
      e = xp.exp(rows - rows.max(-1, keepdims=True))
      return e / e.sum(-1, keepdims=True)
    s = 1.0 / (1.0 + xp.exp(-z.reshape(-1)))
    return xp.stack([s, 1.0 - s], -1)

  p, q = probs(zp), probs(zq)
  if kind == "renyi":
    per = xp.log(xp.sum(p ** alpha * q ** (1.0 - alpha), -1)) / (alpha - 1.0)
  else:
    per = xp.sum(q * (xp.log(q) - xp.log(p)), -1)
  return xp.mean(per)


def dense_ggn(apply_fn, params, loss_fn):
  """``JᵀHJ`` over ``ravel_pytree(params)``: ``J`` the Jacobian of
  ``apply_fn``, ``H`` the Hessian of ``loss_fn(outputs)`` (traceable)."""
  flat, unravel = ravel_pytree(params)
  out = apply_fn(params)
  jac = jax.jacfwd(lambda v: apply_fn(unravel(v)).reshape(-1))(flat)
  hess = jax.hessian(lambda z: loss_fn(z.reshape(out.shape)))(out.reshape(-1))
  return jac.T @ hess @ jac


def dense_map(states, like):
  """The preconditioner ``U`` of structure ``states`` as a matrix over
  ``ravel_pytree(like)`` (its Jacobian: ``U`` is linear)."""
  flat, unravel = ravel_pytree(like)
  return jax.jacfwd(lambda v: ravel_pytree(structures.apply(states, unravel(v)))[0])(
      jnp.zeros_like(flat))


def perturbed(states, key, scale=0.3):
  """``states`` with every array moved by ``scale · N(0, 1)``: a generic
  (non-identity) preconditioner."""
  leaves, treedef = jax.tree.flatten(states)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


# --- comparisons ------------------------------------------------------------------


def flat(tree):
  """Every leaf of ``tree`` ravelled and concatenated (``ravel_pytree``'s
  order), as NumPy: no compilation."""
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


def rel_err(x, y):
  """``‖x − y‖ / ‖y‖`` over all leaves of two trees (or arrays) of one size."""
  x, y = flat(x), flat(y)
  assert x.shape == y.shape, (x.shape, y.shape)
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def all_finite(tree):
  """Whether every float leaf of ``tree`` is finite: a JAX bool, so it also
  works inside ``jit``; ``bool()`` or ``assert`` it outside."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)]))


def assert_trees_equal(a, b):
  """Same leaves, bit for bit."""
  jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def assert_same_shapes_and_dtypes(a, b):
  """The same tree (node types included) and, leaf by leaf, the same shape
  and dtype: what ``jit`` and ``lax.cond`` need to be equal between steps.
  Leaves may be ``jax.eval_shape``'s abstract values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert (tuple(x.shape), x.dtype) == (tuple(y.shape), y.dtype), (x, y)


def run_steps(step, params, state, xs, ys):
  """``[(updates, params, state)]`` after each of ``step``'s ``len(xs)`` steps,
  ``step(params, state, x, y) -> (params, state, updates)``."""
  out = []
  for x, y in zip(xs, ys):
    params, state, updates = step(params, state, x, y)
    out.append((updates, params, state))
  return out


def max_abs_diff(a, b) -> float:
  """The largest absolute difference between two trees' leaves, in float64."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(la, lb))
