"""The docs' own Sphinx extension: the API reference is complete, constants documented.

- :func:`public_names` is what "public" means here: every name in the
  ``__all__`` of ``llqr_optax`` and of its public subpackages and modules.
  After Sphinx has read every page, each of them must be documented in the
  API reference (``docs/api/``), under its own name or, for a name that is
  re-exported (``llqr_optax.exact_step`` is ``llqr_optax.exact.exact_step``),
  under another public name of the same object. A missing one is a warning,
  so ``make docs`` (``-W``) fails on it: a new public name needs its entry.
- A module constant (``PAPER``, ``DIAGNOSTICS``, ...) has no docstring of its
  own: its ``#:`` comment sits in the module that defines it, which autodoc
  does not read when the constant is documented where users import it from.
  :func:`_constant_doc` finds that comment; a public constant without one is
  a warning too.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.nodes import make_refnode

logger = logging.getLogger(__name__)

#: The modules whose ``__all__`` is public API.
PUBLIC_MODULES = ("llqr_optax", "llqr_optax.exact", "llqr_optax.structures",
                  "llqr_optax.fitting", "llqr_optax.losses", "llqr_optax.geometry")


def public_names() -> dict:
  """``{full name: object}`` for every public name of the package."""
  names = {}
  for modname in PUBLIC_MODULES:
    module = importlib.import_module(modname)
    for name in module.__all__:
      names[f"{modname}.{name}"] = getattr(module, name)
  return names


def missing_names(documented) -> list:
  """Public names not in ``documented`` (a set of full names) nor re-exports
  of an object documented under another public name."""
  names = public_names()
  seen = {id(obj) for full, obj in names.items() if full in documented
          and not isinstance(obj, (str, int, float, bool))}  # interned
  return sorted(full for full, obj in names.items()
                if full not in documented and id(obj) not in seen)


def _check_complete(app, env):
  py = env.get_domain("py")
  documented = set(py.objects) | set(py.modules)
  for full in missing_names(documented):
    logger.warning(f"{full} is public but not documented in the API reference "
                   "(docs/api/): add an entry for it.", type="llqr", subtype="api")


def _defining_comment(obj, attr):
  """The ``#:`` comment of the module of ``llqr_optax`` that defines ``attr`` as ``obj``."""
  package = importlib.import_module("llqr_optax")
  for info in pkgutil.walk_packages(package.__path__, "llqr_optax."):
    module = importlib.import_module(info.name)
    if getattr(module, attr, None) is not obj:
      continue
    docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
    if ("", attr) in docs:
      return list(docs[("", attr)])
  return None


def _constant_doc(app, what, name, obj, options, lines):
  """Replaces the docstring of a constant's type by the constant's ``#:`` comment."""
  if what != "data" or inspect.isclass(obj) or inspect.isroutine(obj):
    return
  type_doc = inspect.getdoc(type(obj)) or ""
  if lines and "\n".join(lines).strip() != type_doc.strip():
    return  # autodoc found the comment itself
  comment = _defining_comment(obj, name.rsplit(".", 1)[-1])
  if comment is None:
    logger.warning(f"{name} is documented but has no #: comment where it is defined.",
                   type="llqr", subtype="api")
    lines[:] = []
  else:
    lines[:] = comment


def _resolve_by_short_name(app, env, node, contnode):
  """Resolves a docstring's reference that Sphinx cannot to the one object of
  the reference with that name: a re-export (``llqr_optax.geometry.curvature_product``
  is documented as ``llqr_optax.curvature_product``), or a name relative to
  the module that defines it (``Linearization`` in ``linearize``'s docstring,
  documented where users import it from). Ambiguous names stay unresolved:
  the build's ``-n -W`` reports them."""
  if node.get("refdomain") != "py":
    return None
  objects = env.get_domain("py").objects
  target = node["reftarget"].lstrip(".~")
  for suffix in (target, target.rsplit(".", 1)[-1]):
    found = [n for n, entry in objects.items() if n.startswith("llqr_optax.")
             and not entry.aliased  # a canonical name: the same entry again
             and (n == suffix or n.endswith("." + suffix))]
    if len(found) == 1:
      entry = objects[found[0]]
      return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id,
                          contnode, found[0])
    if found:
      return None
  return None


def setup(app):
  app.connect("env-check-consistency", _check_complete)
  app.connect("missing-reference", _resolve_by_short_name)
  app.connect("autodoc-process-docstring", _constant_doc)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
