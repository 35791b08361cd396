r"""The LQR fitting problem of a refit: gradient samples and a curvature product.

The refit batch is split into ``num_chunks`` chunks along the leading axis of
the outputs; each chunk's loss gives one gradient sample :math:`g_c`. All
samples are pulled back through *one* linearisation of the model (one forward
pass), and the curvature product :math:`(C + \lambda I) v` of the whole refit
batch reuses it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax import sharding
from llqr_optax._samples import map_products

PyTree = Any


class Problem(NamedTuple):
  r"""What the LQR objective needs: gradient samples and a curvature product.

  The objective ``J(U)`` (:mod:`llqr_optax.fitting.objective`) is the
  quadratic model, with ``A = C + λI``, of the step ``δ = −U x_c`` for the
  gradient ``g_c``. ``U`` preconditions the gradient itself when ``x_c = g_c`` (the default),
  or another optimizer's direction for that gradient
  (:func:`~llqr_optax.precondition_base`).

  Attributes:
    grads: gradient samples ``g_c``, params-shaped float32 arrays with a
      leading chunk axis.
    matvec: ``v -> (C + λI) v`` on params-shaped float32 trees.
    inputs: what ``U`` is applied to, ``x_c``, shaped like ``grads``; ``None``
      means ``grads``.
    curvature: the undamped ``v -> C v``, if known (see :func:`with_damping`).

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting, structures
    >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # two samples, leaf (2,)
    >>> problem = fitting.Problem(g, lambda v: {"w": 2.0 * v["w"]})  # A = 2I
    >>> identity = structures.init({"w": jnp.ones(2)}, "scalar")
    >>> float(fitting.lqr_objective(problem, identity))  # U = I is 2 A⁻¹: no gain
    0.0
    >>> half = identity["w"]._replace(scale=jnp.float32(0.5))
    >>> float(fitting.lqr_objective(problem, {"w": half}))  # U = A⁻¹: -¼ Σ‖g_c‖²/2
    -0.625
  """
  grads: PyTree
  matvec: Callable[[PyTree], PyTree]
  inputs: Optional[PyTree] = None
  curvature: Optional[Callable[[PyTree], PyTree]] = None

  @property
  def samples(self) -> PyTree:
    """``x_c``: the inputs of ``U`` (the gradient samples by default)."""
    return self.grads if self.inputs is None else self.inputs


def with_damping(problem: Problem, damping: Any) -> Problem:
  """``problem`` with the product ``v -> C v + λ v``, ``C`` its ``curvature``.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting
    >>> p = fitting.Problem({"w": jnp.ones((1, 2))}, None, curvature=lambda v: v)
    >>> fitting.with_damping(p, 0.5).matvec({"w": jnp.ones(2)})["w"]
    Array([1.5, 1.5], dtype=float32)
  """
  curvature = problem.curvature
  matvec = lambda v: jax.tree.map(lambda cv, x: cv + damping * x, curvature(v), v)
  return problem._replace(matvec=matvec)


def curvature_scale(curvature: Callable[[PyTree], PyTree], like: PyTree,
                    key: jax.Array, num_probes: int = 4) -> jax.Array:
  r"""Hutchinson's estimate of ``tr(C) / P``, the mean eigenvalue of ``C``.

  .. math::

     \frac{\operatorname{tr} C}{P} \approx \frac{1}{kP} \sum_{j=1}^{k} z_j^\top C z_j,
     \qquad z_j \in \{-1, 1\}^P \text{ uniform},

  unbiased, at ``k`` curvature products (vectorised).

  Args:
    curvature: ``v -> C v``, undamped, on params-shaped float32 trees.
    like: a params-shaped tree (shapes only).
    key: a PRNG key.
    num_probes: ``k``.

  Returns:
    The estimate, a float32 scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from llqr_optax import fitting
    >>> c = lambda v: {"w": jnp.array([1.0, 3.0]) * v["w"]}  # tr(C)/P = 2
    >>> float(fitting.curvature_scale(c, {"w": jnp.zeros(2)}, jax.random.PRNGKey(0)))
    2.0
  """
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  probes = jax.tree.unflatten(treedef, [
      jax.random.rademacher(k, (num_probes,) + jnp.shape(x), jnp.float32)
      for k, x in zip(keys, leaves)])
  products = jax.vmap(curvature)(probes)
  size = sum(int(np.prod(jnp.shape(x))) for x in leaves)
  total = sum((jnp.sum(p * cp) for p, cp in zip(jax.tree.leaves(probes),
                                               jax.tree.leaves(products))),
              jnp.zeros((), jnp.float32))
  return total / (num_probes * max(size, 1))


def _slice_chunk(tree, c, size):
  return jax.tree.map(
      lambda t: jax.lax.dynamic_slice_in_dim(t, c * size, size, axis=0), tree)


def _chunk_cotangents(loss_fn, outputs, targets, num_chunks: int, size: int):
  r"""``∂ℓ(z_{B_c}, t_{B_c}) / ∂z`` for every chunk ``c``, each shaped like
  the outputs (zero outside the chunk's rows), stacked on a leading axis.

  When the chunks tile the batch, the outputs are reshaped to ``(n_c, size,
  …)`` and every chunk's cotangent is put back in its own rows by a product
  with the identity: no slice of the batch axis, so a batch sharded under
  ``jit`` (auto axes) stays on its devices instead of being gathered onto
  every one. Otherwise (rows left over, or explicit mesh axes, whose types
  leave a split batch axis's reshape ambiguous) each chunk is sliced from a
  replicated copy.
  """
  rows = outputs.shape[0]
  if num_chunks * size == rows and not sharding.explicitly_sharded((outputs, targets)):
    split = lambda t: t.reshape((num_chunks, size) + t.shape[1:])
    chunk_ct = jax.vmap(jax.grad(loss_fn))(split(outputs), jax.tree.map(split, targets))
    eye = jnp.eye(num_chunks, dtype=chunk_ct.dtype).reshape(
        (num_chunks, num_chunks) + (1,) * (chunk_ct.ndim - 1))
    return (eye * chunk_ct[None]).reshape((num_chunks,) + outputs.shape)
  chunk_targets = sharding.replicated(targets)

  def chunk_cotangent(c):
    chunk_loss = lambda z: loss_fn(_slice_chunk(sharding.replicated(z), c, size),
                                   _slice_chunk(chunk_targets, c, size))
    return jax.grad(chunk_loss)(outputs)

  return jax.vmap(chunk_cotangent)(jnp.arange(num_chunks))


def _to_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def chunks_for(num_chunks: int, batch: int) -> int:
  """The number of gradient samples a refit takes from a batch of ``batch`` rows.

  ``min(num_chunks, batch)``: a batch with fewer rows than ``num_chunks``
  gives one sample per row. Shapes are static, so this is decided when the
  step is traced and costs nothing at run time.

  Args:
    num_chunks: the ``num_chunks`` asked for.
    batch: rows along the leading axis of the model's outputs (per device
      under ``axis_name``).

  Returns:
    The number of chunks used.

  Example:
    >>> chunks_for(4, 128), chunks_for(4, 2)
    (4, 2)
  """
  return max(1, min(int(num_chunks), int(batch)))


def _check_batch_outputs(outputs, loss):
  """The outputs must be batch first, one event per example, before the targets."""
  shape = tuple(outputs.shape)
  if outputs.ndim == 0:
    raise ValueError(
        "apply_fn returned a scalar (shape ()); llqr needs the model's outputs "
        "for every example, batch first (logits or predictions), not the loss: "
        "apply_fn=lambda p: model.apply(p, x).")
  if loss.event_ndim is not None and outputs.ndim < 1 + loss.event_ndim:
    raise ValueError(
        f"apply_fn returned outputs of shape {shape}, one number per example, "
        f"but loss={loss.name!r} needs {1 + loss.event_ndim} axes, batch "
        "first (logits of shape (batch, classes)). If apply_fn returns "
        "per-example losses or predicted labels, return the model's logits "
        "instead: apply_fn=lambda p: model.apply(p, x).")
  if shape[0] == 0:
    raise ValueError(
        f"apply_fn returned outputs of shape {shape}: an empty batch. llqr "
        "needs at least one example.")


def build_problem(apply_fn: Callable[[PyTree], jax.Array], params: PyTree,
                  targets: Any = None, *, loss: losses_lib.LossLike,
                  geometry: geometry_lib.GeometryLike = "ggn",
                  damping: Any = 0.0, num_chunks: int = 4,
                  key: Optional[jax.Array] = None,
                  axis_name: Optional[str] = None):
  r"""Linearises the model once and returns the fitting problem.

  The batch's outputs are split into ``num_chunks`` chunks ``B_c``; sample
  ``c`` is the gradient of the loss restricted to chunk ``c``, and the
  curvature is that of the whole batch:

  .. math::

     g_c = \nabla_\theta\, \ell\big(z_{B_c}, t_{B_c}\big), \qquad
     A v = (C + \lambda I) v = J^\top Q J v + \lambda v,

  all pulled back through one linearisation (one forward pass).

  Args:
    apply_fn: ``apply_fn(params) -> outputs`` closing over the refit batch.
    params: where the curvature is taken.
    targets: the batch's targets (leading axis = examples), or ``None``.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a geometry name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ``.
    num_chunks: number of gradient samples; examples beyond
      ``num_chunks · (batch // num_chunks)`` enter the curvature only. A
      batch with fewer rows takes one sample per row (:func:`chunks_for`).
    key: PRNG key for sampled geometries.
    axis_name: a mapped axis (``pmap``/``shard_map``) over which the batch is
      sharded; products and samples are averaged over it.

  Returns:
    ``(problem, outputs, loss_value)``: the :class:`Problem` (its
    ``curvature`` the undamped product), the model's outputs on the batch and
    the loss there.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import fitting
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> problem, outputs, loss = fitting.build_problem(
    ...     lambda w: x @ w, jnp.ones((3, 2)), y, loss="squared_error",
    ...     damping=1.0, num_chunks=4)
    >>> problem.grads.shape, float(loss)  # 4 samples of the (3, 2) leaf
    ((4, 3, 2), 4.5)
  """
  loss = losses_lib.get_loss(loss)
  if axis_name is not None:
    # Local products, averaged explicitly below (see sharding.per_device); sampled
    # geometries draw independent labels on every device.
    params = sharding.per_device(params, axis_name)
    if key is not None:
      for a in sharding.mapped_axes(axis_name):
        key = jax.random.fold_in(key, jax.lax.axis_index(a))
  lin = geometry_lib.linearize(apply_fn, params, targets, loss=loss,
                               geometry=geometry, key=key,
                               check_outputs=_check_batch_outputs)
  outputs = lin.outputs
  if loss.check is not None and targets is not None:
    loss.check(outputs, targets)
  num_chunks = chunks_for(num_chunks, outputs.shape[0])
  size = outputs.shape[0] // num_chunks

  cotangents = _chunk_cotangents(loss.fn, outputs, targets, num_chunks, size)
  grads = _to_f32(map_products(lin.vjp, cotangents))
  dtypes = jax.tree.map(lambda p: p.dtype, params)

  def curvature(v):
    v = jax.tree.map(lambda x, d: x.astype(d), v, dtypes)
    return _to_f32(lin.matvec(v, 0.0))

  if axis_name is not None:
    # The loss is a mean over the local shard: the global mean's samples and
    # products are the means of the devices' (equal shard sizes). Sample c is
    # the mean over the union of the devices' chunks c.
    grads = jax.lax.pmean(grads, axis_name)
    local_curvature = curvature
    curvature = lambda v: jax.lax.pmean(
        local_curvature(sharding.per_device(v, axis_name)), axis_name)

  def matvec(v):
    return jax.tree.map(lambda cv, x: cv + damping * x, curvature(v), v)

  loss_value = loss.fn(outputs, targets)
  if axis_name is not None:
    loss_value = jax.lax.pmean(loss_value, axis_name)
  return Problem(grads, matvec, curvature=curvature), outputs, loss_value
