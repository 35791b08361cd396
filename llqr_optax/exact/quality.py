r"""How second-order is a step? ``ρ`` against the exact damped step, matrix-free.

For the damped quadratic model of the loss at ``θ``,

.. math::

   m(\delta) = g^\top \delta + \tfrac12\, \delta^\top (C + \lambda I)\, \delta,
   \qquad \delta^\star = -(C + \lambda I)^{-1} g,
   \qquad m(\delta^\star) = -\tfrac12\, g^\top (C + \lambda I)^{-1} g,

a direction ``d`` (any optimizer's update) at its best scale
:math:`\alpha^\star = -g^\top d / d^\top (C + \lambda I) d` decreases the model
by :math:`m(\alpha^\star d) = -\tfrac12 (g^\top d)^2 / d^\top (C + \lambda I) d`,
and

.. math::

   \rho(d) = \frac{m(\alpha^\star d)}{m(\delta^\star)}
   = \frac{(g^\top d)^2}{d^\top (C + \lambda I) d \;\, g^\top (C + \lambda I)^{-1} g}
   \in [0, 1]

is the fraction of the exact step's decrease it achieves: 1 for the exact
step (and any multiple of it), the squared cosine between ``d`` and
:math:`\delta^\star` in the ``(C + λI)`` inner product. It is invariant to the
scale of ``d``; a negative ``α*`` says ``d`` points uphill. The exact step
comes from conjugate gradients (:func:`cg_solve`), to a stated relative
residual, on the whole curvature or on its per-leaf diagonal blocks (the
ideal block-diagonal preconditioner, K-FAC's ceiling).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from llqr_optax import geometry as geometry_lib
from llqr_optax import losses as losses_lib
from llqr_optax._conv_layout import canonical_convolutions, repeat
from llqr_optax.exact import _checks

Array = jax.Array
PyTree = Any


def _vdot(a: PyTree, b: PyTree) -> Array:
  return sum((jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))),
             jnp.zeros((), jnp.result_type(*jax.tree.leaves(a))))


def _leaf_vdots(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.sum(x * y), a, b)


def block_diagonal(matvec: Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
  r"""The per-leaf diagonal blocks of a linear map on pytrees.

  .. math::

     (\operatorname{blockdiag} A)\, v = \big( A_{ll}\, v_l \big)_l, \qquad
     A_{ll} v_l = \big[ A\, (0, \dots, v_l, \dots, 0) \big]_l ,

  one product of ``A`` per leaf: vectorised with ``vmap``, except on CPU,
  where one product per leaf in turn runs faster (batched convolutions are
  slow on XLA:CPU; 3.5 s against 0.5 s a step for 10 iterations on the
  18-leaf MNIST-1D ResNet).

  Example:
    >>> import jax.numpy as jnp
    >>> a = lambda v: {"x": v["x"] + v["y"].sum(), "y": v["y"] + v["x"].sum()}
    >>> block_diagonal(a)({"x": jnp.ones(2), "y": jnp.ones(3)})["x"]  # no coupling
    Array([1., 1.], dtype=float32)
  """
  def apply(v):
    leaves, treedef = jax.tree.flatten(v)
    n = len(leaves)
    def product(i):
      one = [x if j == i else jnp.zeros_like(x) for j, x in enumerate(leaves)]
      return jax.tree.leaves(matvec(jax.tree.unflatten(treedef, one)))[i]
    if jax.default_backend() == "cpu":
      return jax.tree.unflatten(treedef, [product(i) for i in range(n)])
    embedded = [jnp.stack([x if j == i else jnp.zeros_like(x) for j in range(n)])
                for i, x in enumerate(leaves)]
    products = jax.vmap(matvec)(jax.tree.unflatten(treedef, embedded))
    return jax.tree.unflatten(treedef, [p[i] for i, p in enumerate(jax.tree.leaves(products))])
  return apply


class Solution(NamedTuple):
  """What :func:`cg_solve` and :func:`cg` return.

  Attributes:
    step: the damped step ``δ ≈ −(C + λI)⁻¹ g`` (params-shaped).
    residual: ``‖(C + λI) δ + g‖ / ‖g‖`` where CG stopped.
    iterations: the CG iterations run.
  """
  step: PyTree
  residual: Array
  iterations: Array


def cg(matvec: Callable[[PyTree], PyTree], rhs: PyTree, *, tol: Optional[float] = 1e-6,
       max_steps: int = 100, x0: Optional[PyTree] = None,
       per_leaf: bool = False,
       preconditioner: Optional[Callable[[PyTree], PyTree]] = None) -> Solution:
  r"""Conjugate gradients on ``A x = b`` for a symmetric positive definite ``A``.

  Runs until :math:`\lVert A x - b \rVert \le \text{tol}\, \lVert b \rVert` or
  ``max_steps`` (a ``lax.while_loop``); with ``tol=None``, exactly
  ``max_steps`` iterations (a training step's fixed budget), unrolled up to
  8 around convolutions (on CPU) and looped otherwise. With ``per_leaf``,
  ``A`` is taken as block diagonal over the leaves and each leaf runs its own
  CG (its own step lengths) in the same loop; the residual is then the
  largest leaf's. A direction of zero curvature (converged) leaves ``x`` as it is.
  ``preconditioner`` (``r -> M⁻¹ r``, symmetric positive definite) makes it
  preconditioned CG; a step where ``rᵀM⁻¹r ≤ 0`` (an indefinite ``M``) stops
  the iteration where it is.

  Returns:
    A :class:`Solution` with ``step = x``.

  Example:
    >>> import jax.numpy as jnp
    >>> a = lambda v: {"w": jnp.array([[2.0, 1.0], [1.0, 3.0]]) @ v["w"]}
    >>> out = cg(a, {"w": jnp.array([1.0, 2.0])}, tol=1e-6)
    >>> [round(float(x), 4) for x in out.step["w"]], int(out.iterations)
    ([0.2, 0.6], 2)
  """
  dot = _leaf_vdots if per_leaf else _vdot
  scale = lambda c, t: (jax.tree.map(lambda s, x: s * x, c, t) if per_leaf
                        else jax.tree.map(lambda x: c * x, t))
  x = jax.tree.map(jnp.zeros_like, rhs) if x0 is None else x0
  r = jax.tree.map(lambda b, ax: b - ax, rhs, matvec(x)) if x0 is not None else rhs
  norm_b = jax.tree.map(jnp.sqrt, dot(rhs, rhs))

  def relative(rr):
    ratio = jax.tree.map(lambda q, nb: jnp.sqrt(q) / jnp.where(nb > 0, nb, 1.0),
                         rr, norm_b)
    return jnp.max(jnp.stack(jax.tree.leaves(ratio)))

  precond = (lambda v: v) if preconditioner is None else preconditioner
  ratio = lambda q, d: jax.tree.map(
      lambda a, b: jnp.where((b > 0) & (a > 0), a / jnp.where(b > 0, b, 1.0), 0.0), q, d)

  def body(carry):
    x, r, p, rz, k = carry
    ap = matvec(p)
    alpha = ratio(rz, dot(p, ap))
    x = jax.tree.map(lambda a, b: a + b, x, scale(alpha, p))
    r = jax.tree.map(lambda a, b: a - b, r, scale(alpha, ap))
    z = precond(r)
    rz_new = dot(r, z)
    p = jax.tree.map(lambda a, b: a + b, z, scale(ratio(rz_new, rz), p))
    return x, r, p, rz_new, k + 1

  def going(carry):
    return (carry[4] < max_steps) & (relative(dot(carry[1], carry[1])) > tol)

  z = precond(r)
  carry = (x, r, z, dot(r, z), jnp.zeros((), jnp.int32))
  if tol is None:
    carry = repeat(int(max_steps), lambda _, c: body(c), carry)
  else:
    carry = jax.lax.while_loop(going, canonical_convolutions(body), carry)
  x, r, _, _, k = carry
  return Solution(x, relative(dot(r, r)), k)


def cg_solve(apply_fn: Callable[[PyTree], Array], params: PyTree, targets: Any = None,
          *, loss: losses_lib.LossLike, geometry: geometry_lib.GeometryLike = "ggn",
          damping: Union[float, Array], tol: float = 1e-6, max_steps: int = 100,
          per_leaf: bool = False, key: Optional[Array] = None) -> Solution:
  r"""The exact damped step ``−(C + λI)⁻¹ g`` by conjugate gradients.

  Matrix-free: one curvature product per iteration (``jvp`` and ``vjp``, or a
  Hessian-vector product for Newton), after one forward pass. With
  ``per_leaf``, the step of the per-leaf diagonal blocks of ``C``: each
  parameter array's own Newton-like step, the cross-leaf terms dropped (the
  best any block-diagonal preconditioner can do; one product per leaf per
  iteration).

  Args:
    apply_fn: ``apply_fn(params) -> outputs``, closing over the inputs.
    params: the parameters.
    targets: the batch's targets.
    loss: a loss name, :class:`~llqr_optax.losses.Loss` or callable.
    geometry: a name or :class:`~llqr_optax.geometry.Geometry`.
    damping: ``λ > 0``.
    tol: the relative residual at which CG stops.
    max_steps: the most CG iterations.
    per_leaf: solve the per-leaf diagonal blocks only.
    key: a PRNG key (``"mc_fisher"`` only).

  Returns:
    A :class:`Solution`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((4, 3))
    >>> out = cg_solve(lambda w: x @ w, jnp.zeros((3, 2)), jnp.ones((4, 2)),
    ...             loss="squared_error", damping=1.0)
    >>> bool(jnp.allclose(out.step, 0.2)), bool(out.residual <= 1e-6)
    (True, True)
  """
  _checks.check_solve_damping(damping, allow_singular=False, where="cg_solve")
  loss = losses_lib.get_loss(loss)
  lin = geometry_lib.linearize(apply_fn, params, targets, loss=loss,
                               geometry=geometry, key=key)
  g = jax.grad(lambda p: loss.fn(apply_fn(p), targets))(params)
  matvec = lambda v: lin.matvec(v, damping)
  if per_leaf:
    matvec = block_diagonal(matvec)
  out = cg(matvec, jax.tree.map(jnp.negative, g), tol=tol, max_steps=max_steps,
           per_leaf=per_leaf)
  return out


class StepQuality(NamedTuple):
  r"""How much of the exact damped step's model decrease a direction achieves.

  Attributes:
    rho: ``ρ = m(α* d) / m(δ*)`` in ``[0, 1]``.
    scale: the best scale ``α* = −gᵀd / dᵀ(C + λI)d`` (negative: ``d`` points
      uphill).
    cosine: the Euclidean cosine between ``d`` and ``δ*``.
    exact_decrease: ``m(δ*) = ½ gᵀδ*`` (negative).
    residual: CG's relative residual for ``δ*``.
    iterations: CG's iterations for ``δ*``.
  """
  rho: Array
  scale: Array
  cosine: Array
  exact_decrease: Array
  residual: Array
  iterations: Array


def step_quality(direction: PyTree, apply_fn: Callable[[PyTree], Array],
                 params: PyTree, targets: Any = None, *, loss: losses_lib.LossLike,
                 geometry: geometry_lib.GeometryLike = "ggn",
                 damping: Union[float, Array], tol: float = 1e-6,
                 max_steps: int = 100, exact: Optional[Solution] = None,
                 key: Optional[Array] = None) -> StepQuality:
  r"""``ρ`` of ``direction``: the fraction of the exact damped step's decrease.

  ``direction`` is any update for the params, e.g. the ``updates`` an optax
  chain just returned (its sign and scale do not matter). Costs one forward
  pass, one gradient, CG's products (``iterations``, up to ``max_steps``) and
  one more product for ``dᵀ(C + λI)d``; pass ``exact`` (from :func:`cg_solve`) to
  score several directions against one solve.

  Args:
    direction: a params-shaped update.
    apply_fn, params, targets, loss, geometry, damping, tol, max_steps, key:
      as for :func:`cg_solve`.
    exact: a :class:`Solution` of this problem, to reuse.

  Returns:
    A :class:`StepQuality`.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [0.0, 3.0]])  # C = diag(1/2, 9/2)
    >>> q = step_quality({"w": jnp.ones(2)}, lambda p: x @ p["w"],
    ...                  {"w": jnp.zeros(2)}, jnp.ones(2), loss="squared_error",
    ...                  damping=1e-3)  # d = (1, 1) against δ* ≈ (1, 1/3)
    >>> round(float(q.rho), 3), round(float(q.cosine), 3)
    (0.801, 0.895)
  """
  loss = losses_lib.get_loss(loss)
  if exact is None:
    exact = cg_solve(apply_fn, params, targets, loss=loss, geometry=geometry,
                  damping=damping, tol=tol, max_steps=max_steps, key=key)
  lin = geometry_lib.linearize(apply_fn, params, targets, loss=loss,
                               geometry=geometry, key=key)
  g = jax.grad(lambda p: loss.fn(apply_fn(p), targets))(params)
  d = jax.tree.map(lambda x, p: jnp.asarray(x, jnp.result_type(p)), direction, params)
  gd, dad = _vdot(g, d), _vdot(d, lin.matvec(d, damping))
  exact_decrease = 0.5 * _vdot(g, exact.step)
  ok = (dad > 0) & (exact_decrease < 0)
  safe = lambda v: jnp.where(ok, v, 1.0)
  rho = jnp.where(ok, -0.5 * gd ** 2 / safe(dad) / safe(exact_decrease), 0.0)
  norms = jnp.sqrt(_vdot(d, d) * _vdot(exact.step, exact.step))
  cosine = jnp.where(norms > 0, _vdot(d, exact.step) / jnp.where(norms > 0, norms, 1.0), 0.0)
  return StepQuality(rho=rho, scale=jnp.where(ok, -gd / safe(dad), 0.0), cosine=cosine,
                     exact_decrease=exact_decrease, residual=exact.residual,
                     iterations=exact.iterations)


def rho_meter(apply: Callable[[PyTree, Any], Array], *, loss: losses_lib.LossLike,
              geometry: geometry_lib.GeometryLike = "ggn",
              damping: Union[float, Array] = 1e-3, tol: float = 1e-4,
              max_steps: int = 50, prefix: str = "rho") -> Callable[..., dict]:
  r"""A compiled ``ρ`` of live updates, for a training loop's logger.

  ``meter(updates, params, inputs, targets)`` scores the update an optimizer
  just produced (e.g. ``tx.update``'s output, before ``apply_updates``) on
  the current batch by :func:`step_quality`, and returns Python floats named
  like :func:`~llqr_optax.diagnostics`' (``{prefix}``, ``{prefix}_scale``,
  ``{prefix}_cosine``, ``{prefix}_cg_residual``, ``{prefix}_cg_iterations``).
  It compiles once per shape. Call it every ``k`` steps: each call costs a
  forward pass, a gradient and up to ``max_steps + 1`` curvature products
  (each about a training step's forward and backward pass), and waits for the
  result.

  Args:
    apply: ``apply(params, inputs) -> outputs`` (e.g. a Flax ``model.apply``).
    loss, geometry, damping, tol, max_steps: as for :func:`step_quality`.
    prefix: the names' prefix.

  Returns:
    ``meter(updates, params, inputs, targets) -> dict``.

  Example:
    >>> import jax.numpy as jnp
    >>> meter = rho_meter(lambda p, x: x @ p["w"], loss="squared_error", damping=1e-3)
    >>> x = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> logs = meter({"w": -jnp.ones(2)}, {"w": jnp.zeros(2)}, x, jnp.ones(2))
    >>> round(logs["rho"], 3), sorted(logs)[:2]
    (0.801, ['rho', 'rho_cg_iterations'])
  """
  @jax.jit
  def measure(updates, params, inputs, targets):
    return step_quality(updates, lambda p: apply(p, inputs), params, targets,
                        loss=loss, geometry=geometry, damping=damping, tol=tol,
                        max_steps=max_steps)

  def meter(updates, params, inputs, targets=None) -> dict:
    q = jax.device_get(measure(updates, params, inputs, targets))
    return {prefix: float(q.rho), f"{prefix}_scale": float(q.scale),
            f"{prefix}_cosine": float(q.cosine),
            f"{prefix}_cg_residual": float(q.residual),
            f"{prefix}_cg_iterations": float(q.iterations)}

  return meter
