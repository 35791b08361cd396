"""The options are declared once (``llqr_optax.options.Options``).

``scale_by_llqr`` and ``llqr`` keep explicit keyword-only signatures; here
they must follow the declaration name by name (order, defaults), and the
``Args:`` section of ``scale_by_llqr`` (the API reference's table of the
options) must list them in that order.
"""

from __future__ import annotations

import inspect
import re

import optax

import llqr_optax
from llqr_optax import options as options_lib

FIELDS = options_lib.Options._fields
DEFAULTS = options_lib.Options._field_defaults


def _keyword_only(fn):
  params = inspect.signature(fn).parameters
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), fn
  return params


def test_scale_by_llqr_signature_is_the_declaration():
  params = _keyword_only(llqr_optax.scale_by_llqr)
  assert tuple(params) == FIELDS
  assert params["loss"].default is inspect.Parameter.empty
  for name, default in DEFAULTS.items():
    assert params[name].default == default, name


def test_llqr_signature_is_the_declaration_plus_a_learning_rate():
  params = _keyword_only(llqr_optax.llqr)
  assert tuple(params) == ("loss", "learning_rate") + FIELDS[1:]
  assert params["learning_rate"].default is None
  for name, default in DEFAULTS.items():
    given = params[name].default
    assert options_lib.unwrap(given) == default, name
    # Wrapped exactly where optax would otherwise trace a program-shaping option.
    assert isinstance(given, options_lib.Static) == (name in options_lib.STATIC), name
  assert set(options_lib.STATIC) <= set(FIELDS)


def test_static_options_are_the_numeric_ones_that_shape_the_program():
  numeric = {n for n, d in DEFAULTS.items()
             if isinstance(d, (int, float)) and not isinstance(d, bool)}
  assert numeric - set(options_lib.STATIC) == {"damping", "ema"}  # schedulable
  tx = optax.inject_hyperparams(llqr_optax.llqr)(loss="squared_error")
  import jax.numpy as jnp
  assert set(tx.init({"w": jnp.zeros(2)}).hyperparams) == {"damping", "ema"}


def test_scale_by_llqr_documents_the_options_in_order():
  doc = inspect.cleandoc(llqr_optax.scale_by_llqr.__doc__)
  args = doc[doc.index("\nArgs:\n"):doc.index("\nReturns:\n")]
  listed = re.findall(r"^  (\w+):", args, re.M)
  assert tuple(listed) == FIELDS


def test_llqr_passes_every_option_on():
  """Every option given to llqr reaches scale_by_llqr's resolved options."""
  seen = {}
  real = llqr_optax.transform.scale_by_llqr

  def spy(**kw):
    seen.update(kw)
    return real(**kw)

  llqr_optax.transform.scale_by_llqr = spy
  try:
    llqr_optax.llqr(loss="squared_error", num_chunks=2, ema=0.5, floor=None,
                    guard=None, seed=3)
  finally:
    llqr_optax.transform.scale_by_llqr = real
  assert tuple(seen) == FIELDS
  assert (seen["num_chunks"], seen["ema"], seen["floor"], seen["guard"],
          seen["seed"], seen["refit_every"]) == (2, 0.5, None, None, 3,
                                                  DEFAULTS["refit_every"])
