"""optax's contract targets, written as least squares, for every form the
docs recommend.

optax's contrib contract test runs each optimizer on a parabola, Rosenbrock,
a matrix parabola and a mixed 1-D/2-D target and asks for the optimum within
3e-2. Here each target is a least-squares problem (outputs = residuals,
``loss="squared_error"``, targets 0), so llqr's curvature is its Gauss-Newton
matrix; every form runs at llqr's defaults with the rate its recipe in the docs
uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llqr_optax

A, B = 1.0, 100.0
T_VEC = jnp.array([1.0, -1.0, 1.0])
T_MAT = jnp.array([[3.0, -2.0], [1.0, 4.0]])
T_1D, T_2D = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])

TARGETS = {
    "parabola": (jnp.array([-1.0, 10.0, 1.0]), T_VEC, lambda p: p - T_VEC),
    "rosenbrock": (jnp.zeros(2), jnp.array([A, A ** 2]),
                   lambda p: jnp.stack([A - p[0], jnp.sqrt(B) * (p[1] - p[0] ** 2)])),
    "matrix_parabola": (jnp.zeros((2, 2)), T_MAT, lambda p: (p - T_MAT).reshape(-1)),
    "mixed": ((jnp.zeros(3), jnp.zeros((2, 2))), (T_1D, T_2D),
              lambda p: jnp.concatenate([p[0] - T_1D, (p[1] - T_2D).reshape(-1)])),
}

LOSS = "squared_error"
#: The forms the docs recommend, at the rates of their recipes.
FORMS = {
    "chain(llqr, adam)": lambda: optax.chain(llqr_optax.llqr(loss=LOSS),
                                             optax.adam(1e-2)),
    "chain(llqr, sgd-momentum)": lambda: optax.chain(
        llqr_optax.llqr(loss=LOSS), optax.sgd(1e-2, momentum=0.9)),
    "precondition_base(adam)": lambda: llqr_optax.precondition_base(
        optax.adam(1e-2), loss=LOSS),
    "llqr alone, learning_rate=1": lambda: llqr_optax.llqr(
        loss=LOSS, learning_rate=1.0),
}
STEPS = 10_000


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("form", list(FORMS))
def test_form_reaches_the_optimum(form, target):
  p0, p_star, residuals = TARGETS[target]
  tx = FORMS[form]()

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      out = residuals(params)
      grads = jax.grad(lambda p: 0.5 * jnp.mean(residuals(p) ** 2))(params)
      updates, state = tx.update(grads, state, params, apply_fn=residuals,
                                 targets=jnp.zeros_like(out))
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=STEPS)[0]

  params, state = run(p0)
  inner = llqr_optax.find_state(state)
  assert int(inner.skipped_updates) == 0 and int(inner.skipped_refits) == 0
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(p_star)):
    np.testing.assert_allclose(got, want, atol=3e-2)
