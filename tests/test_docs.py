"""The documentation site builds without a warning, and its reference is complete.

One quick build of ``docs/`` (the HTML builder, as ``make docs``, with the
same ``-n -W``: every warning, and every cross-reference that does not
resolve, is an error) into a temporary folder; the notebooks are not
executed here (``-D nb_execution_mode=off``: ``tests/test_notebooks.py``
runs them), so their pages are rendered without outputs. The docs' extension
(``docs/_ext/llqr_docs.py``) fails the build on a public name missing from
the API reference; this file checks the built inventory once more, and that
the README stays the short front door the docs link from.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import llqr_docs  # noqa: E402

README_MAX_BYTES = 12 * 1024


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  """``(returncode, output, html folder)`` of one quick build."""
  out = tmp_path_factory.mktemp("docs")
  cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-n", "-W", "--keep-going", "-q",
         "-D", "nb_execution_mode=off", "-d", str(out / "doctrees"), str(DOCS),
         str(out / "html")]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  return proc.returncode, proc.stdout + proc.stderr, out / "html"


def test_docs_build_without_warnings(build):
  rc, output, _ = build
  assert rc == 0, f"the docs build failed or warned:\n{output[-6000:]}"


def test_every_page_is_built(build):
  rc, _, html = build
  assert rc == 0
  sources = [p.relative_to(DOCS) for p in DOCS.rglob("*")
             if p.suffix in (".md", ".rst", ".ipynb") and "_build" not in p.parts]
  assert len(sources) >= 20
  missing = [str(s) for s in sources if not (html / s.with_suffix(".html")).exists()]
  assert not missing, missing


def inventory_names(path):
  """The Python objects of a Sphinx ``objects.inv`` (format 2: four header
  lines, then zlib-compressed ``name domain:role priority uri dispname``)."""
  with open(path, "rb") as f:
    for _ in range(4):
      f.readline()
    body = zlib.decompress(f.read()).decode()
  return {line.split()[0] for line in body.splitlines()
          if len(line.split()) > 1 and line.split()[1].startswith("py:")}


def test_every_public_name_is_in_the_reference(build):
  rc, _, html = build
  assert rc == 0
  documented = inventory_names(html / "objects.inv")
  assert "llqr_optax.llqr" in documented
  assert not llqr_docs.missing_names(documented)
  assert len(llqr_docs.public_names()) >= 100


def test_missing_names_finds_what_is_missing():
  names = llqr_docs.public_names()
  everything = set(names)
  assert llqr_docs.missing_names(everything) == []
  # A re-export counts as documented where its object is ...
  assert llqr_docs.missing_names(everything - {"llqr_optax.exact_step"}) == []
  # ... but a name documented nowhere does not.
  gone = everything - {"llqr_optax.llqr", "llqr_optax.exact.cg_solve"}
  assert llqr_docs.missing_names(gone) == ["llqr_optax.exact.cg_solve", "llqr_optax.llqr"]


def test_readme_is_the_front_door():
  text = (ROOT / "README.md").read_text()
  assert len(text.encode()) <= README_MAX_BYTES, len(text.encode())
  # The two commands come first: the first code block of the README.
  first = text[text.index("```"):]
  first = first[:first.index("```", 3)]
  assert first.startswith("```sh\n")
  assert [line.split()[:2] for line in first.splitlines()[1:]] == [["make", "demo"],
                                                                   ["make", "test"]]
  # "What to expect" is one delimited section, included by the docs page.
  for mark in ("<!-- what-to-expect: start", "<!-- what-to-expect: end -->"):
    assert text.count(mark) == 1, mark
    assert mark in (DOCS / "what_to_expect.md").read_text()
  # Every link into docs/ points at a page that exists.
  for link in re.findall(r"\]\((docs/[^)#]*)", text):
    assert (ROOT / link).exists(), link
