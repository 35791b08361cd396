r"""Geometries: matrix-free curvature products on parameter pytrees.

Every geometry is a positive (semi-)definite quadratic form on the parameter
step. Except Newton, each is a metric ``Q`` on the model's outputs pulled back
through the Jacobian ``J`` of ``apply_fn``:

.. math::

   C v = J^\top Q\, J v, \qquad (C + \lambda I) v = J^\top Q J v + \lambda v,

computed as one ``jax.jvp`` (the forward rollout ``δx``), the output-space
product ``Q``, and one ``jax.vjp`` (the costate sweep). ``C`` is never formed.

======================  ========================================================
geometry                output-space metric ``Q``
======================  ========================================================
``"ggn"``               ``∇²_z ℓ(z, t)``, the Gauss-Newton matrix
``"fisher"``            Fisher of the predictive distribution (exact)
``"mc_fisher"``         Fisher from labels sampled from the model
``"empirical_fisher"``  per-event outer products of the observed gradients
``"renyi"``             ``∇²_{z'} D_α(p_z ‖ p_{z'})`` at ``z' = z``
``"reverse_kl"``        ``∇²_{z'} KL(p_{z'} ‖ p_z)`` at ``z' = z``
``"newton"``            none: the full Hessian ``∇²_θ ℓ(f(θ), t)`` (``jvp`` of
                        ``grad``)
======================  ========================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from llqr_optax import losses as losses_lib

__all__ = ["GEOMETRIES", "Geometry", "Linearization", "check_damping",
           "curvature_product", "get_geometry", "linearize", "output_metric"]

Array = jax.Array
PyTree = Any

#: The geometry names ``geometry=`` takes (:class:`Geometry` adds options).
GEOMETRIES = ("ggn", "fisher", "mc_fisher", "empirical_fisher", "newton",
              "renyi", "reverse_kl")


@dataclasses.dataclass(frozen=True)
class Geometry:
  r"""A geometry by name, with its options.

  A geometry is the curvature ``C`` of the quadratic model whose damped
  minimiser ``−(C + λI)⁻¹ g`` LLQR approximates; except for Newton it is an
  output-space metric ``Q`` pulled back through the model's Jacobian ``J``.
  For Rényi-α it is the Hessian of the divergence at equality,

  .. math::

     C = J^\top Q J, \qquad
     Q_{\text{Rényi}} = \nabla^2_{z'} D_\alpha(p_z \,\|\, p_{z'})\big|_{z' = z},
     \qquad
     D_\alpha(p \,\|\, q) = \frac{1}{\alpha - 1} \log \sum_k p_k^\alpha q_k^{1-\alpha}.

  Attributes:
    name: one of :data:`GEOMETRIES`.
    alpha: the Rényi order (``name="renyi"`` only), ``α > 0``, ``α ≠ 1``.
    num_samples: labels drawn per event (``name="mc_fisher"`` only).

  Raises:
    ValueError: on an unknown name, an invalid ``alpha`` or ``num_samples``.

  Example:
    >>> Geometry("renyi", alpha=0.5).name
    'renyi'
    >>> Geometry("mc_fisher", num_samples=4).needs_key
    True
  """

  name: str = "ggn"
  alpha: float = 0.5
  num_samples: int = 1

  def __post_init__(self):
    if self.name not in GEOMETRIES:
      raise ValueError(
          f"geometry={self.name!r} is unknown; choose one of {list(GEOMETRIES)}.")
    if self.name == "renyi" and (not self.alpha > 0 or self.alpha == 1):
      raise ValueError(
          f"alpha={self.alpha!r} is not a valid Rényi order: it needs alpha > 0 "
          "and alpha != 1 (alpha = 1 is the KL divergence: use geometry='fisher').")
    if int(self.num_samples) != self.num_samples or self.num_samples < 1:
      raise ValueError(
          f"num_samples={self.num_samples!r} must be a positive integer.")

  @property
  def needs_key(self) -> bool:
    return self.name == "mc_fisher"


GeometryLike = Union[str, Geometry]


def get_geometry(geometry: GeometryLike) -> Geometry:
  """Resolves a name or a :class:`Geometry`.

  Example:
    >>> get_geometry("fisher")
    Geometry(name='fisher', alpha=0.5, num_samples=1)
  """
  if isinstance(geometry, Geometry):
    return geometry
  if isinstance(geometry, str):
    return Geometry(geometry)
  raise ValueError(
      f"geometry={geometry!r} is neither a name nor a Geometry; pass one of "
      f"{list(GEOMETRIES)}.")


def check_damping(damping, *, allow_zero: bool = True, name: str = "damping"):
  """Raises ``ValueError`` for a negative (or, if not allowed, zero) damping."""
  if (isinstance(damping, (np.ndarray, np.generic, jax.Array))
      and not isinstance(damping, jax.core.Tracer) and np.ndim(damping) == 0):
    damping = float(damping)  # a concrete scalar array is checked like a float
  if isinstance(damping, (int, float)):
    if damping < 0 or (damping == 0 and not allow_zero) or damping != damping:
      need = ">= 0" if allow_zero else "> 0 (the problem is singular without it)"
      raise ValueError(f"{name}={damping!r} is invalid: it must be {need}; "
                       "a typical value is 1e-3.")


def _output_hvp(fn: Callable[[Array], Array], z: Array) -> Callable[[Array], Array]:
  """``v -> ∇²fn(z) v`` by forward-over-reverse autodiff."""
  _, hvp = jax.linearize(jax.grad(fn), z)
  return hvp


def _per_event_outer(loss: losses_lib.Loss, grads: Array, scale: float):
  """``v -> scale · Σ_e g_e (g_e · v_e)`` for event gradients stacked in ``grads``."""
  ndim = grads.ndim - 1 if loss.event_ndim is None else loss.event_ndim

  batch_shape = grads.shape[:grads.ndim - ndim]
  flat = grads.reshape(batch_shape + (-1,))

  def product(v):
    # A contraction (dot), not ``sum(grads * v, keepdims=True)``: XLA:CPU
    # miscompiled that reduce-then-broadcast under vmap for > 32768 elements
    # (wrong products, no error), see tests/test_geometry_compiled.py.
    dots = jnp.einsum("...k,...k->...", flat, v.reshape(batch_shape + (-1,)))
    return scale * grads * dots.reshape(batch_shape + (1,) * ndim)
  return product


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
    geometry: a name or :class:`Geometry`.
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
  name = geometry.name
  if name in ("ggn", "newton", "empirical_fisher"):
    if targets is None:
      raise ValueError(f"geometry={name!r} needs targets; pass targets=... "
                       "(the labels of the batch).")
    loss.check and loss.check(outputs, targets)
  if name in ("ggn", "newton"):
    return _output_hvp(lambda z: loss.fn(z, targets), outputs)
  if name == "fisher":
    losses_lib.fisher_product(loss, outputs, outputs)  # early error if no distribution
    return lambda v: losses_lib.fisher_product(loss, outputs, v)
  n = loss.num_events(outputs)
  if name == "empirical_fisher":
    g = jax.grad(loss.fn)(outputs, targets)
    return _per_event_outer(loss, g, float(n))
  if name == "mc_fisher":
    if key is None:
      raise ValueError("geometry='mc_fisher' needs a PRNG key; pass key=jax.random.key(0).")
    keys = jax.random.split(key, geometry.num_samples)
    grads = jax.vmap(lambda k: jax.grad(loss.fn)(
        outputs, losses_lib.sample_targets(loss, k, outputs)))(keys)
    products = [_per_event_outer(loss, grads[s], n / geometry.num_samples)
                for s in range(geometry.num_samples)]
    return lambda v: sum(p(v) for p in products)
  # Divergences: Hessian in the second argument at equality.
  p_out = jax.lax.stop_gradient(outputs)
  losses_lib.divergence(loss, name, geometry.alpha, p_out, p_out)  # early error
  return _output_hvp(
      lambda q: losses_lib.divergence(loss, name, geometry.alpha, p_out, q), p_out)


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


def linearize(apply_fn: Callable[[PyTree], Array], params: PyTree,
              targets: Any = None, *, loss: losses_lib.LossLike,
              geometry: GeometryLike = "ggn",
              key: Optional[Array] = None) -> Linearization:
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
    geometry: a name or :class:`Geometry`.
    key: a PRNG key for ``"mc_fisher"``.

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
  return _linearize(apply_fn, params, targets, loss=loss, geometry=geometry,
                    key=key)


def _call_error(e: TypeError) -> ValueError:
  return ValueError(
      f"calling apply_fn(params) raised TypeError: {e}. llqr calls apply_fn "
      "with the params alone, so it must close over the batch's inputs: "
      "apply_fn=lambda p: model.apply(p, x), not apply_fn=model.apply. If it "
      "already does, the TypeError comes from the model itself (see above).")


def _linearize(apply_fn, params, targets, *, loss, geometry, key,
               check_outputs: Optional[Callable[[Array, Any], None]] = None):
  """:func:`linearize`, with ``check_outputs(outputs, loss)`` run on the
  outputs before anything reads the targets (llqr's batch-first checks)."""
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
  hvp = None
  if geometry.name == "newton":
    total = lambda p: loss.fn(apply_fn(p), targets)
    _, hvp = jax.linearize(jax.grad(total), params)
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
    geometry: a name or :class:`Geometry` (see the module table).
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
