r"""Losses on model outputs, and what each knows about its predictive distribution.

A :class:`Loss` is the scalar the user minimises, as a function of the model's
outputs and the targets. Built-in losses are *means over events* (one event is a
row of logits for the softmax, one element for the sigmoid and the Gaussian), so
their value equals ``optax.<loss>(...).mean()``:

.. math::

   \ell(z, t) = \frac{1}{n} \sum_{e=1}^{n} \ell_e(z_e, t_e).

Built-in losses also name their predictive distribution (categorical, Bernoulli,
unit-variance Gaussian), which the Fisher, Monte-Carlo Fisher and divergence
geometries need. A user loss is any ``loss(outputs, targets) -> scalar``; its
events are the rows of the leading axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

__all__ = ["Loss", "fisher_product", "get_loss", "log_probs", "sample_targets",
           "sigmoid_binary_cross_entropy", "softmax_cross_entropy", "squared_error"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Loss:
  r"""A loss on outputs and the structure the curvature products need.

  Built-in losses are means over the ``n`` events of the outputs,

  .. math::

     \ell(z, t) = \frac{1}{n} \sum_{e=1}^{n} \ell_e(z_e, t_e),
     \qquad \ell_e(z_e, t_e) = -\log p(t_e \mid z_e)
     \text{ (up to a constant)},

  where ``p(· | z_e)`` is the named predictive ``distribution``, which the
  Fisher, Monte-Carlo Fisher and divergence geometries need. A user loss
  (``distribution=None``) supports ``"ggn"``, ``"newton"`` and
  ``"empirical_fisher"``.

  Attributes:
    name: a readable name, used in error messages.
    fn: ``fn(outputs, targets) -> scalar``, a mean over events.
    event_ndim: trailing axes of ``outputs`` that form one event (1 for a
      softmax over the last axis, 0 for elementwise losses). ``None`` means
      every axis but the leading one.
    distribution: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or
      ``None`` for a user loss (no Fisher, no sampling, no divergences).
    check: ``check(outputs, targets)`` raises ``ValueError`` on shapes or
      dtypes that do not fit; runs at trace time on static shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from llqr_optax import Loss
    >>> l1 = Loss("mean_abs", lambda z, t: jnp.mean(jnp.abs(z - t)), event_ndim=0)
    >>> float(l1(jnp.array([1.0, -3.0]), jnp.zeros(2)))
    2.0
    >>> l1.num_events(jnp.zeros((4, 5)))
    20
  """

  name: str
  fn: Callable[[Array, Any], Array]
  event_ndim: Optional[int] = None
  distribution: Optional[str] = None
  check: Optional[Callable[[Any, Any], None]] = None

  def __call__(self, outputs, targets):
    if self.check is not None:
      self.check(outputs, targets)
    return self.fn(outputs, targets)

  def num_events(self, outputs: Array) -> int:
    """Number of events ``n`` the loss averages over."""
    ndim = outputs.ndim - 1 if self.event_ndim is None else self.event_ndim
    shape = outputs.shape[:outputs.ndim - ndim]
    n = 1
    for s in shape:
      n *= s
    return n


def _shape_error(name, outputs, targets, expected):
  return ValueError(
      f"targets with shape {tuple(jnp.shape(targets))} and dtype "
      f"{jnp.asarray(targets).dtype} do not fit outputs of shape "
      f"{tuple(outputs.shape)} for loss={name!r}: expected {expected}. "
      "Fix the targets or the model's output shape.")


def softmax_cross_entropy(label_smoothing: float = 0.0) -> Loss:
  r"""Softmax cross-entropy over the last axis, averaged over the other axes.

  .. math::

     \ell(z, t) = -\frac{1}{n} \sum_e \sum_k \tilde t_{ek}
       \log \operatorname{softmax}(z_e)_k, \qquad
     \tilde t = (1 - \epsilon)\, t + \epsilon / K.

  Args:
    label_smoothing: ``ε`` in ``[0, 1)``.

  Returns:
    A :class:`Loss` accepting integer labels of shape ``logits.shape[:-1]`` or
    one-hot (or soft) labels of shape ``logits.shape``.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = softmax_cross_entropy()
    >>> float(loss(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log 4
    1.386...
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(
        f"label_smoothing={label_smoothing!r} is outside [0, 1); "
        "pass a value such as 0.1, or 0.0 for none.")
  name = "softmax_cross_entropy"

  def check(outputs, targets):
    t = jnp.asarray(targets) if not hasattr(targets, "dtype") else targets
    if outputs.ndim < 1:
      raise ValueError(f"outputs of loss={name!r} must have a class axis; got "
                       f"shape {tuple(outputs.shape)}.")
    if jnp.issubdtype(t.dtype, jnp.integer):
      if tuple(t.shape) != tuple(outputs.shape[:-1]):
        raise _shape_error(name, outputs, t,
                           f"integer labels of shape {tuple(outputs.shape[:-1])}")
    elif jnp.issubdtype(t.dtype, jnp.floating):
      if tuple(t.shape) != tuple(outputs.shape):
        raise _shape_error(name, outputs, t,
                           f"one-hot labels of shape {tuple(outputs.shape)}")
    else:
      raise _shape_error(name, outputs, t, "integer or floating labels")

  def fn(logits, targets):
    num_classes = logits.shape[-1]
    if jnp.issubdtype(targets.dtype, jnp.integer):
      targets = jax.nn.one_hot(targets, num_classes, dtype=logits.dtype)
    targets = targets.astype(logits.dtype)
    if label_smoothing:
      targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(targets * logp, axis=-1))

  return Loss(name, fn, event_ndim=1, distribution="categorical", check=check)


def _elementwise_check(name):
  def check(outputs, targets):
    t = jnp.asarray(targets) if not hasattr(targets, "dtype") else targets
    if tuple(t.shape) != tuple(outputs.shape):
      raise _shape_error(name, outputs, t,
                         f"targets of the same shape {tuple(outputs.shape)}")
    if not (jnp.issubdtype(t.dtype, jnp.floating)
            or jnp.issubdtype(t.dtype, jnp.integer)
            or jnp.issubdtype(t.dtype, jnp.bool_)):
      raise _shape_error(name, outputs, t, "real-valued targets")
  return check


def sigmoid_binary_cross_entropy() -> Loss:
  r"""Elementwise sigmoid binary cross-entropy, averaged over all elements.

  .. math::

     \ell(z, t) = \frac{1}{n} \sum_e -t_e \log \sigma(z_e)
       - (1 - t_e) \log (1 - \sigma(z_e)).

  Example:
    >>> import jax.numpy as jnp
    >>> float(sigmoid_binary_cross_entropy()(jnp.zeros(3), jnp.ones(3)))
    0.693...
  """
  def fn(logits, targets):
    t = targets.astype(logits.dtype)
    return jnp.mean(jax.nn.softplus(logits) - t * logits)

  name = "sigmoid_binary_cross_entropy"
  return Loss(name, fn, event_ndim=0, distribution="bernoulli",
              check=_elementwise_check(name))


def squared_error() -> Loss:
  r"""Half squared error, averaged over all elements (``optax.l2_loss``).

  .. math::

     \ell(z, t) = \frac{1}{2n} \sum_e (z_e - t_e)^2,

  the negative log-likelihood of a unit-variance Gaussian up to a constant.

  Example:
    >>> import jax.numpy as jnp
    >>> float(squared_error()(jnp.array([1.0, 3.0]), jnp.zeros(2)))
    2.5
  """
  def fn(outputs, targets):
    return 0.5 * jnp.mean(jnp.square(outputs - targets.astype(outputs.dtype)))

  name = "squared_error"
  return Loss(name, fn, event_ndim=0, distribution="gaussian",
              check=_elementwise_check(name))


_BUILTIN = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "squared_error": squared_error,
}

LossLike = Union[str, Loss, Callable[[Array, Any], Array]]


def get_loss(loss: LossLike) -> Loss:
  """Resolves a loss name, a :class:`Loss` or a user callable to a :class:`Loss`.

  Args:
    loss: one of ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"``,
      ``"squared_error"``, a :class:`Loss`, or ``loss(outputs, targets) ->
      scalar`` (a mean over the leading axis).

  Returns:
    The :class:`Loss`.

  Example:
    >>> get_loss("squared_error").distribution
    'gaussian'
  """
  if isinstance(loss, Loss):
    return loss
  if isinstance(loss, str):
    if loss not in _BUILTIN:
      raise ValueError(
          f"loss={loss!r} is not a built-in loss; choose one of "
          f"{sorted(_BUILTIN)} or pass a callable loss(outputs, targets).")
    return _BUILTIN[loss]()
  if callable(loss):
    name = getattr(loss, "__name__", "user loss")
    return Loss(name, loss, event_ndim=None, distribution=None)
  raise ValueError(
      f"loss={loss!r} is neither a name nor a callable; pass e.g. "
      "'softmax_cross_entropy' or a function loss(outputs, targets).")


# --- what each predictive distribution knows --------------------------------


def fisher_product(loss: Loss, outputs: Array, v: Array) -> Array:
  r"""Product of the output-space Fisher of the mean loss with ``v``.

  Categorical: :math:`(\operatorname{diag} p - p p^\top) v / n`; Bernoulli:
  :math:`p (1-p) v / n`; Gaussian: :math:`v / n`.
  """
  n = loss.num_events(outputs)
  if loss.distribution == "categorical":
    p = jax.nn.softmax(outputs, axis=-1)
    return (p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)) / n
  if loss.distribution == "bernoulli":
    p = jax.nn.sigmoid(outputs)
    return p * (1 - p) * v / n
  if loss.distribution == "gaussian":
    return v / n
  raise _no_distribution(loss, "the Fisher")


def sample_targets(loss: Loss, key: Array, outputs: Array) -> Array:
  """Draws targets from the model's predictive distribution at ``outputs``."""
  outputs = jax.lax.stop_gradient(outputs)
  if loss.distribution == "categorical":
    return jax.random.categorical(key, outputs, axis=-1)
  if loss.distribution == "bernoulli":
    return jax.random.bernoulli(key, jax.nn.sigmoid(outputs)).astype(outputs.dtype)
  if loss.distribution == "gaussian":
    return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)
  raise _no_distribution(loss, "Monte-Carlo Fisher sampling")


def _no_distribution(loss, what):
  return ValueError(
      f"{what} needs the predictive distribution of the loss, but loss="
      f"{loss.name!r} is a user callable without one; use geometry='ggn', "
      "'newton' or 'empirical_fisher', or a built-in loss.")


def log_probs(loss: Loss, outputs: Array, what: str = "this") -> Array:
  """Log-probabilities of the categorical view of the predictive distribution.

  Categorical: ``log_softmax`` over the last axis; Bernoulli: one two-class
  categorical per element, with logits ``[0, z]``. ``what`` names the caller
  in the error a loss without such a distribution raises.

  Example:
    >>> import jax.numpy as jnp
    >>> log_probs(sigmoid_binary_cross_entropy(), jnp.zeros(2)).shape
    (2, 2)
  """
  if loss.distribution == "bernoulli":
    outputs = jnp.stack([jnp.zeros_like(outputs), outputs], axis=-1)
  elif loss.distribution != "categorical":
    raise _no_distribution(loss, what)
  return jax.nn.log_softmax(outputs, axis=-1)
