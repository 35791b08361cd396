"""The training harness's optimizer names: options, alternatives, llqr's spelling.

``llqr_kron[damping=0.1|1.0]+adam`` is llqr with the Kronecker structure
before Adam, its ``damping`` tuned over two values: :func:`split_options`
reads the options, :func:`expand_alternatives` lists the variants,
:func:`parse_llqr` the geometry, structure and base, :func:`split_names` a
comma-separated list of such names.
"""

from __future__ import annotations

import ast
import itertools
import re
from typing import Any, Dict, List, Optional, Tuple

STRUCTURE_ALIASES = {"diag": "diagonal", "kron": "kronecker"}
# ``head[options]+base``: a name with options in brackets.
_WITH_OPTIONS = re.compile(r"([^\[\]]*)\[([^\[\]]*)\](\+[a-z_]+)?")


class Unavailable(Exception):
  """The optimizer cannot be built in this environment (skipped, not failed)."""



def parse_options(text: str) -> Dict[str, Any]:
  """``"damping=0.1,structure='kronecker'"`` → keyword arguments.

  Values are Python literals; a bare word is a string
  (``structure=kronecker``).
  """
  out: Dict[str, Any] = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key.strip().isidentifier():
      raise Unavailable(f"option {item!r} is not key=value")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def split_options(name: str) -> Tuple[str, Dict[str, Any]]:
  """``"llqr_kron[damping=0.1]+adam"`` → ``("llqr_kron+adam", {...})``."""
  m = _WITH_OPTIONS.fullmatch(name)
  if not m:
    return name, {}
  head, opts, tail = m.groups()
  return head + (tail or ""), parse_options(opts)


def parse_llqr(name: str) -> Optional[Tuple[str, str, str]]:
  """``llqr[_<geometry>][_<structure>][opts]+<base>`` → ``(geometry, structure,
  base)``; options in brackets are read by :func:`split_options`.

  The geometry may be left out (``ggn``), and so may the structure (llqr's
  default); ``None`` if ``name`` is not llqr.
  """
  plain, _ = split_options(name)
  m = re.fullmatch(r"llqr(_[a-z_]+)?\+([a-z_]+)", plain)
  if not m:
    return None
  body, base = m.groups()
  body = (body or "")[1:]
  head, _, tail = body.rpartition("_")
  if not body:
    return "ggn", "", base
  structure = STRUCTURE_ALIASES.get(tail, tail)
  import llqr_optax
  if structure in llqr_optax.GEOMETRIES and not head:
    return structure, "", base  # llqr_fisher+adam: a geometry, default structure
  geometry = head or "ggn"
  return geometry, structure, base


def expand_alternatives(name: str) -> List[str]:
  """``"llqr[damping=0.1|1,ema=0.9]+adam"`` → one name per combination.

  ``|`` separates the values of one option that the harness tunes, on the
  first seed, together with the learning rate.
  """
  m = _WITH_OPTIONS.fullmatch(name)
  if not m or "|" not in m.group(2):
    return [name]
  head, opts, tail = m.groups()
  items = []
  depth, cur = 0, ""
  for ch in opts:
    if ch == "," and depth == 0:
      items.append(cur)
      cur = ""
      continue
    depth += {"(": 1, ")": -1}.get(ch, 0)
    cur += ch
  items.append(cur)
  choices = []
  for item in filter(None, (t.strip() for t in items)):
    key, _, value = item.partition("=")
    choices.append([f"{key}={v.strip()}" for v in value.split("|")])
  return [f"{head}[{','.join(c)}]{tail or ''}" for c in itertools.product(*choices)]


def split_names(text: str) -> List[str]:
  """Optimizer names separated by commas outside brackets (options inside)."""
  names, depth, cur = [], 0, ""
  for ch in text:
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      names.append(cur)
      cur = ""
    else:
      cur += ch
  return [n.strip() for n in names + [cur] if n.strip()]
