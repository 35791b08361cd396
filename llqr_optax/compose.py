r"""LLQR around another optimizer: ``U`` fitted to the base optimizer's direction.

``optax.chain(llqr(...), base)`` feeds ``U(g)`` to the base optimizer.
:func:`precondition_base` composes the other way round: the base optimizer
proposes its update ``d`` for the gradient, and the step is ``U(d)``, with
``U`` fitted so that this step minimises the same quadratic model,

.. math::

   J(U) = \frac{1}{n_c} \sum_c \Big[ g_c^\top U d_c
     + \tfrac12 (U d_c)^\top (C + \lambda I)\, (U d_c) \Big],

where ``d_c`` is the base's update for the gradient sample ``g_c``, taken with
its current state (read, not advanced). Over unconstrained ``U`` the
minimiser maps every ``d_c`` to the exact damped step ``−(C + λI)⁻¹ g_c``; a
per-leaf ``"scalar"`` ``U`` gives each layer the curvature-optimal length
along the base's direction, cross-layer terms included.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from llqr_optax import transform
from llqr_optax.state import LLQRState

PyTree = Any


class PreconditionBaseState(NamedTuple):
  """State of :func:`precondition_base`.

  Attributes:
    llqr: the :class:`~llqr_optax.LLQRState` of ``U``.
    base: the base optimizer's state.
  """
  llqr: LLQRState
  base: optax.OptState


def precondition_base(base_optimizer: optax.GradientTransformation, *,
                      loss, structure: Any = "scalar", normalize: bool = True,
                      **llqr_kwargs) -> optax.GradientTransformationExtraArgs:
  r"""LLQR's structured ``U`` applied to another optimizer's update.

  .. math::

     \delta\theta_t = U_t\big(d_t\big), \qquad
     d_t = \text{base}(g_t), \qquad
     U_t = \arg\min_U \; \mathbb E_c\Big[ g_c^\top U d_c
       + \tfrac12 (U d_c)^\top (C + \lambda I) (U d_c) \Big],

  refitted on llqr's schedule from gradient samples ``g_c`` of the batch and
  the base's updates ``d_c`` for them (its state read, not advanced). The
  base keeps its learning rate and state; ``U`` corrects its direction and
  per-layer step lengths for the curvature. With ``normalize=True`` the
  overall size of the step stays the base's (``‖U d‖ ≈ ‖d‖`` on the refit's
  samples), so only the relative lengths and directions come from the
  quadratic model: the base's tuned rate keeps its meaning.

  ``update(grads, state, params, *, apply_fn, targets=None, **extra)`` takes
  the same extra arguments as :func:`~llqr_optax.scale_by_llqr` (unknown ones
  are passed to the base optimizer). A step whose output is not finite is
  zeroed and counted in ``skipped_updates``, and the base optimizer's state
  is then kept as it was, so no NaN enters its moments either.

  Args:
    base_optimizer: any optax optimizer (its output is an update, e.g.
      ``optax.adam(1e-3)``).
    loss: as for :func:`~llqr_optax.scale_by_llqr`.
    structure: as for :func:`~llqr_optax.scale_by_llqr`; the default
      ``"scalar"`` fits one step length per leaf. A structure that mixes
      coordinates (``"dense"``, ``"kronecker"``) would map the base's
      directions to the exact step, but the base is not linear in the
      gradient (Adam divides by its own statistics), so that map, fitted on a
      few samples, goes wrong as the base's state moves: on optax's
      Rosenbrock and mixed-tensor targets it diverged, the scalar did not.
    normalize: keep the base's overall step size (``‖U d‖ ≈ ‖d‖`` on the
      refit's samples): only the relative lengths come from the quadratic
      model, whose own best step is short-horizon biased.
    **llqr_kwargs: the other keyword arguments of
      :func:`~llqr_optax.scale_by_llqr` (``damping``, ``refit_every``, …).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, llqr_optax
    >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 1))
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> apply_fn = lambda p: x @ p["w"]
    >>> tx = llqr_optax.precondition_base(optax.adam(0.1), loss="squared_error")
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: 0.5 * jnp.mean((apply_fn(p) - y) ** 2))(params)
    >>> updates, state = tx.update(grads, state, params, apply_fn=apply_fn, targets=y)
    >>> int(llqr_optax.find_state(state).refits)
    1

  References:
    Dufort-Labbé, Bacon, Pascanu, Lacoste-Julien and Baratin, *Layerwise LQR
    for Geometry-Aware Optimization of Deep Networks*, arXiv:2605.04230 (2026)
    (``precond_on_update`` in the authors' code).
  """
  # A step length may reverse the base's direction on the refit's samples;
  # a U that reverses a whole leaf's samples is kept out (safety.accept_fit).
  llqr_kwargs.setdefault("floor", None)
  llqr_tx = transform.scale_by_llqr(loss=loss, structure=structure,
                                    normalize=normalize, **llqr_kwargs)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    return PreconditionBaseState(llqr_tx.init(params), base.init(params))

  def update_fn(updates, state, params=None, *, apply_fn: Optional[Callable] = None,
                targets: Any = None, full_params: Any = None,
                refit: Optional[bool] = None, **extra_args):
    if not isinstance(state, PreconditionBaseState):
      raise ValueError(
          f"state is a {type(state).__name__}, not the PreconditionBaseState "
          "of tx.init(params) for this precondition_base(...): call "
          "tx.init(params) again.")
    direction, base_state = base.update(updates, state.base, params, **extra_args)

    treedef = jax.tree.structure(updates)

    def inputs_fn(grads):
      # The base's descent direction for each gradient sample, its state read
      # but not advanced: U is fitted to what the base would do with g_c.
      # llqr hands over bare arrays (leaves unwrapped from e.g. nnx
      # Variables); the base sees the caller's structure.
      def one(g):
        d = base.update(jax.tree.unflatten(treedef, jax.tree.leaves(g)),
                        state.base, params, **extra_args)[0]
        return jax.tree.unflatten(jax.tree.structure(g),
                                  [-x for x in jax.tree.leaves(d)])
      return jax.vmap(one)(grads)

    out, llqr_state = llqr_tx.update(
        direction, state.llqr, params, apply_fn=apply_fn, targets=targets,
        full_params=full_params, refit=refit, inputs_fn=inputs_fn)
    kept = llqr_state.skipped_updates == state.llqr.skipped_updates
    base_state = jax.tree.map(lambda n, o: jnp.where(kept, n, o), base_state,
                              state.base)
    return out, PreconditionBaseState(llqr_state, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
