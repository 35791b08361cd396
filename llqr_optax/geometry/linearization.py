r"""Curvature products through the model: ``(C + λI) v = JᵀQJv + λv``.

The geometry's output-space metric ``Q`` (:func:`output_metric`) pulled back
through the Jacobian ``J`` of ``apply_fn``: one ``jax.jvp`` (the forward
rollout ``δx``), the product ``Q``, one ``jax.vjp`` (the costate sweep).
``C`` is never formed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from llqr_optax import losses as losses_lib
from llqr_optax.geometry.base import GeometryLike, check_damping, get_geometry

Array = jax.Array
PyTree = Any


def output_metric(geometry: GeometryLike, loss: losses_lib.LossLike,
                  outputs: Array, targets: Any = None, *,
                  key: Optional[Array] = None) -> Callable[[Array], Array]:
  r"""The output-space metric ``Q`` of a geometry, as a product ``v -> Q v``.

  ``Q`` is the terminal cost ``Q_N`` of the layerwise LQR problem; the
  curvature is its pullback :math:`C = J^\top Q J`. For the built-in mean
  losses over ``n`` events, e.g.

  .. math::

     Q_{\text{GGN}} = \nabla^2_z \ell(z, t), \qquad
     Q_{\text{Fisher}}^{\text{softmax}} v
       = \tfrac{1}{n} \big(\operatorname{diag}(p) - p p^\top\big) v,
     \qquad p = \operatorname{softmax}(z).

  For ``"newton"`` this is the output Hessian ``∇²_z ℓ``, the terminal cost of
  the LQR problem; the stage costs come from :func:`linearize`'s Hessian.

  Args:
    geometry: a name or :class:`~llqr_optax.Geometry`.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    outputs: the model's outputs ``z``.
    targets: the targets (needed by ``"ggn"``, ``"newton"`` and
      ``"empirical_fisher"``).
    key: a PRNG key (``"mc_fisher"`` only).

  Returns:
    A linear function on arrays shaped like ``outputs``.

  Example:
    >>> import jax.numpy as jnp
    >>> q = output_metric("fisher", "squared_error", jnp.zeros(4))
    >>> q(jnp.ones(4))  # I / n with n = 4
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
  """
  geometry = get_geometry(geometry)
  loss = losses_lib.get_loss(loss)
  if geometry.needs_targets:
    if targets is None:
      raise ValueError(f"geometry={geometry.name!r} needs targets; pass targets=... "
                       "(the labels of the batch).")
    loss.check and loss.check(outputs, targets)
  if geometry.needs_key and key is None:
    raise ValueError(f"geometry={geometry.name!r} needs a PRNG key; pass "
                     "key=jax.random.key(0).")
  return geometry.metric(loss, outputs, targets, key)


def _tree_axpy(a, x, y):
  # Cast back: an array-valued ``a`` (e.g. float32 damping from
  # inject_hyperparams) must not promote bf16/float32 leaves.
  return jax.tree.map(lambda xi, yi: (a * xi.astype(yi.dtype) + yi).astype(yi.dtype),
                      x, y)


def _check_outputs(outputs):
  """``apply_fn`` must return one floating array (checked at trace time)."""
  if not isinstance(outputs, (jax.Array, np.ndarray)):
    raise ValueError(
        f"apply_fn returned a {type(outputs).__name__}, not one array of model "
        "outputs. If the model returns more (e.g. Flax's apply with mutable=... "
        "returns (outputs, variables)), pass apply_fn=lambda p: "
        "model.apply(p, x, ...)[0].")
  if not jnp.issubdtype(outputs.dtype, jnp.floating):
    raise ValueError(
        f"apply_fn returned outputs of dtype {outputs.dtype}; they must be "
        "floating (logits or predictions, not labels such as an argmax) to be "
        "differentiated.")


@dataclasses.dataclass(frozen=True)
class Linearization:
  """A model linearised once, for many curvature products.

  Attributes:
    outputs: ``apply_fn(params)``.
    jvp: ``δθ -> J δθ`` (the forward rollout of the layer dynamics).
    vjp: ``δz -> Jᵀ δz`` (the costate sweep).
    metric: the output-space metric ``Q``.
    hvp: for Newton, ``δθ -> ∇²_θ ℓ δθ``; otherwise ``None``.
  """

  outputs: Array
  jvp: Callable[[PyTree], Array]
  vjp: Callable[[Array], PyTree]
  metric: Callable[[Array], Array]
  hvp: Optional[Callable[[PyTree], PyTree]] = None

  def matvec(self, v: PyTree, damping: Union[float, Array] = 0.0) -> PyTree:
    """``(C + λI) v`` for a params-shaped ``v``."""
    cv = self.hvp(v) if self.hvp is not None else self.vjp(self.metric(self.jvp(v)))
    return _tree_axpy(damping, v, cv)


def _call_error(e: TypeError) -> ValueError:
  return ValueError(
      f"calling apply_fn(params) raised TypeError: {e}. llqr calls apply_fn "
      "with the params alone, so it must close over the batch's inputs: "
      "apply_fn=lambda p: model.apply(p, x), not apply_fn=model.apply. If it "
      "already does, the TypeError comes from the model itself (see above).")


def linearize(apply_fn: Callable[[PyTree], Array], params: PyTree,
              targets: Any = None, *, loss: losses_lib.LossLike,
              geometry: GeometryLike = "ggn",
              key: Optional[Array] = None,
              check_outputs: Optional[Callable[[Array, Any], None]] = None
              ) -> Linearization:
  r"""Linearises ``apply_fn`` at ``params`` for repeated curvature products.

  The forward pass runs once; every later :meth:`Linearization.matvec` costs one
  linear forward (``jvp``, the rollout of the layer dynamics ``δx``) and one
  transposed pass (``vjp``, the costate sweep):

  .. math::

     (C + \lambda I) v = J^\top Q\, (J v) + \lambda v
     \quad\text{(Newton: } \nabla^2_\theta \ell\, v + \lambda v \text{)}.

  Args:
    apply_fn: ``apply_fn(params) -> outputs``, closing over the inputs.
    params: the parameter pytree.
    targets: the targets of the batch.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.Geometry`.
    key: a PRNG key for ``"mc_fisher"``.
    check_outputs: ``check_outputs(outputs, loss)``, run on the outputs
      before anything reads the targets (llqr's batch-first checks), or
      ``None``.

  Returns:
    A :class:`Linearization`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> lin = linearize(lambda w: x @ w, jnp.zeros((3, 2)), jnp.zeros((4, 2)),
    ...                 loss="squared_error")
    >>> lin.outputs.shape
    (4, 2)
    >>> lin.matvec(jnp.ones((3, 2)), damping=1.0)  # Jᵀ J / n + I, n = 8
    Array([[2.5, 2.5],
           [2.5, 2.5],
           [2.5, 2.5]], dtype=float32)
  """
  geometry = get_geometry(geometry)
  loss = losses_lib.get_loss(loss)
  try:
    outputs, jvp = jax.linearize(apply_fn, params)
  except TypeError as e:
    raise _call_error(e) from e
  _check_outputs(outputs)
  if check_outputs is not None:
    check_outputs(outputs, loss)
  transpose = jax.linear_transpose(jvp, params)
  vjp = lambda ct: transpose(ct)[0]
  metric = output_metric(geometry, loss, outputs, targets, key=key)
  hvp = geometry.hessian_product(apply_fn, params, loss, targets)
  return Linearization(outputs, jvp, vjp, metric, hvp)


def curvature_product(apply_fn: Callable[[PyTree], Array], params: PyTree,
                      targets: Any = None, *, loss: losses_lib.LossLike,
                      geometry: GeometryLike = "ggn",
                      damping: Union[float, Array] = 0.0,
                      key: Optional[Array] = None) -> Callable[[PyTree], PyTree]:
  r"""The damped curvature product ``v -> (C + λI) v`` of a geometry.

  .. math::

     (C + \lambda I) v = J^\top Q J v + \lambda v
     \quad\text{or, for Newton,}\quad
     \nabla^2_\theta \ell\, v + \lambda v.

  Args:
    apply_fn: ``apply_fn(params) -> outputs``, closing over the inputs.
    params: the parameter pytree at which ``C`` is taken.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.Geometry` (see :mod:`llqr_optax.geometry`).
    damping: ``λ ≥ 0``.
    key: a PRNG key for ``"mc_fisher"``.

  Returns:
    A jit-compatible linear function on params-shaped pytrees.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> apply_fn = lambda w: x @ w
    >>> cvp = curvature_product(apply_fn, jnp.zeros((3, 2)), jnp.zeros((4, 2)),
    ...                         loss="squared_error", damping=1.0)
    >>> cvp(jnp.ones((3, 2)))  # Jᵀ J / n + I, n = 8
    Array([[2.5, 2.5],
           [2.5, 2.5],
           [2.5, 2.5]], dtype=float32)

  References:
    Dufort-Labbé et al., *Layerwise LQR for Geometry-Aware Optimization of
    Deep Networks*, arXiv:2605.04230 (2026).
  """
  check_damping(damping)
  lin = linearize(apply_fn, params, targets, loss=loss, geometry=geometry, key=key)
  return lambda v: lin.matvec(v, damping)
