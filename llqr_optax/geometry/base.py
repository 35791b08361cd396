r"""The interface every geometry implements, and the registry of names.

A geometry is the curvature ``C`` of the quadratic model whose damped
minimiser ``−(C + λI)⁻¹ g`` LLQR approximates. Each one is a subclass of
:class:`Geometry` that carries its own rules: its output-space metric ``Q``
(:meth:`Geometry.metric`), whether it needs targets, a PRNG key or a
predictive distribution, and whether it adds the network's own second-order
terms (Newton). Adding a geometry is a module with its class and a line
registering it (:func:`register`), as for structures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Dict, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from llqr_optax import losses as losses_lib

Array = jax.Array
PyTree = Any

#: Every geometry by name: the built-ins and those added by :func:`register`.
KINDS: Dict[str, type] = {}


def _kind(name) -> type:
  if not isinstance(name, str) or name not in KINDS:
    raise ValueError(f"geometry={name!r} is unknown; choose one of {list(KINDS)}.")
  return KINDS[name]


@dataclasses.dataclass(frozen=True, repr=False)
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

  ``Geometry(name, ...)`` returns an instance of the class registered under
  ``name`` (:func:`register`), which carries the geometry's rules: a new
  geometry subclasses this class, sets the class attributes below and
  implements :meth:`metric` (and :meth:`check_options` if it takes options).

  Attributes:
    name: one of :data:`GEOMETRIES`, or a name added by :func:`register`.
    alpha: the Rényi order (``name="renyi"`` only), ``α > 0``, ``α ≠ 1``.
    num_samples: labels drawn per event (``name="mc_fisher"`` only).
    needs_targets: (class) :meth:`metric` reads the targets.
    needs_key: (class) :meth:`metric` draws samples from a PRNG key.
    needs_distribution: (class) :meth:`metric` needs the loss's predictive
      distribution (:attr:`~llqr_optax.losses.Loss.distribution`).
    second_order: (class) ``C`` is the full Hessian of the loss: the
      network's own second-order terms (the LQR problem's stage costs) are
      added to the pullback of ``Q`` (:meth:`hessian_product`).

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

  needs_targets: ClassVar[bool] = False
  needs_key: ClassVar[bool] = False
  needs_distribution: ClassVar[bool] = False
  second_order: ClassVar[bool] = False

  def __new__(cls, *args, **kwargs):
    # A name given (a call, dataclasses.replace) picks the registered class;
    # without one (unpickling) the class stays.
    if args or "name" in kwargs:
      cls = _kind(args[0] if args else kwargs["name"])
    elif cls is Geometry:
      cls = _kind("ggn")
    return object.__new__(cls)

  def __post_init__(self):
    if KINDS.get(self.name) is not type(self):
      raise ValueError(
          f"geometry={self.name!r} is not the name {type(self).__name__} is "
          f"registered under; use Geometry({self.name!r}, ...).")
    self.check_options()
    if int(self.num_samples) != self.num_samples or self.num_samples < 1:
      raise ValueError(
          f"num_samples={self.num_samples!r} must be a positive integer.")

  def __repr__(self):
    fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                       for f in dataclasses.fields(self))
    return f"Geometry({fields})"

  def check_options(self) -> None:
    """Raises ``ValueError`` on options this geometry cannot take (none here)."""

  def metric(self, loss: losses_lib.Loss, outputs: Array, targets: Any,
             key: Optional[Array]) -> Callable[[Array], Array]:
    """The output-space metric ``Q`` at ``outputs``, as ``v -> Q v``.

    Called by :func:`~llqr_optax.geometry.output_metric` once the targets
    (if :attr:`needs_targets`) and the key (if :attr:`needs_key`) are known
    to be there.
    """
    raise NotImplementedError

  def hessian_product(self, apply_fn: Callable[[PyTree], Array], params: PyTree,
                      loss: losses_lib.Loss,
                      targets: Any) -> Optional[Callable[[PyTree], PyTree]]:
    """``δθ -> ∇²_θ ℓ(f(θ), t) δθ`` for a :attr:`second_order` geometry
    (``jvp`` of ``grad``), ``None`` for a pullback ``JᵀQJ``."""
    if not self.second_order:
      return None
    total = lambda p: loss.fn(apply_fn(p), targets)
    _, hvp = jax.linearize(jax.grad(total), params)
    return hvp


def register(cls: type) -> type:
  """Adds a :class:`Geometry` subclass under its ``name`` (usable as a decorator).

  Example:
    >>> import llqr_optax
    >>> class Identity(llqr_optax.Geometry):
    ...   name = "identity_metric"
    ...   def metric(self, loss, outputs, targets, key):
    ...     return lambda v: v / loss.num_events(outputs)
    >>> _ = register(Identity)
    >>> llqr_optax.Geometry("identity_metric").name
    'identity_metric'
    >>> del KINDS["identity_metric"]
  """
  if not (isinstance(cls, type) and issubclass(cls, Geometry)):
    raise ValueError(f"register({cls!r}): a geometry is a subclass of Geometry.")
  name = cls.__dict__.get("name")
  if not isinstance(name, str):
    raise ValueError(f"register({cls.__name__}): set the class attribute name = "
                     "'...', the name geometry= will take.")
  KINDS[name] = cls
  return cls


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
      f"{list(KINDS)}.")


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


def output_hvp(fn: Callable[[Array], Array], z: Array) -> Callable[[Array], Array]:
  """``v -> ∇²fn(z) v`` by forward-over-reverse autodiff."""
  _, hvp = jax.linearize(jax.grad(fn), z)
  return hvp


def per_event_outer(loss: losses_lib.Loss, grads: Array, scale: float):
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
