"""Sphinx configuration: the llqr-optax documentation site (``make docs``).

Sphinx with MyST-NB, as optax and Flax build theirs: the pages are MyST
Markdown, the API reference is generated from the docstrings (optax-style
reStructuredText: ``.. math::``, Google-style Args/Returns, doctested
examples), and the notebooks of ``notebooks/`` are rendered with the outputs
of running them at build time (cached in ``_build/.jupyter_cache``; a
notebook runs again only when its code changes). ``make docs`` builds with
warnings as errors. The quick build of the tests passes
``-D nb_execution_mode=off`` (the notebooks' execution is tested on its own,
``tests/test_notebooks.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's llqr_optax, not another one
sys.path.insert(0, str(HERE / "_ext"))

import llqr_optax  # noqa: E402

project = "llqr-optax"
author = "the llqr-optax authors"
copyright = "2026, the llqr-optax authors"  # noqa: A001
release = version = llqr_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "llqr_docs",  # _ext/llqr_docs.py: every public name is in the API reference
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Every cross-reference must resolve (make docs passes -n -W), except to other
# projects' names (the docs are built offline: no intersphinx) and to the
# package's internal modules, which the reference leaves out on purpose.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|numpy|flax|collections|typing)(\..*)?"),
    (r"py:class", r"(Array|PyTree|ArrayTree|Matvec)"),
    (r"py:mod", r"llqr_optax\..*"),
]

# --- MyST ---------------------------------------------------------------------
myst_heading_anchors = 3  # [Defaults](guide.md#defaults), as on GitHub
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]  # $…$ in the notebooks

# --- Notebooks (MyST-NB) --------------------------------------------------------
nb_execution_mode = "cache"
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_timeout = 600  # a hang guard per cell, not a performance bound
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# --- API reference ----------------------------------------------------------------
autodoc_member_order = "bysource"
# Signatures show names and defaults only: the docstrings say what each
# argument takes, in words (the annotations spell out unions of jax and optax
# aliases over several lines).
autodoc_typehints = "none"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

# --- HTML -------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "llqr-optax"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # a wider column for the tables
