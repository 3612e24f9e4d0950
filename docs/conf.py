"""Sphinx configuration: MyST markdown pages, autodoc + napoleon API, offline MathJax.

``make docs`` builds the site into docs/_build/html with warnings as errors. Nothing
is fetched at build or view time: MathJax is copied from the sphinx-mathjax-offline
package into the site, and the theme (furo) ships its own assets.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout's jaxactv, not an installed one
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
# Importing jaxactv imports jax: keep it on the CPU and quiet while the docs build.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxactv  # noqa: E402

project = "jaxactv"
author = "the jaxactv authors"
copyright = "the jaxactv authors"
release = version = jaxactv.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # bundles MathJax into _static/mathjax
    "jaxactv_api",  # docs/_ext: the API page, generated from jaxactv.__all__
    "jaxactv_include",  # docs/_ext: pages that reuse the README and the other READMEs
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_typehints = "signature"
# The modules use `from __future__ import annotations`, so these names stay short.
autodoc_type_aliases = {"ArrayLike": "ArrayLike", "Axis": "Axis"}
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"jaxactv {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_copy_source = False


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
  # Sphinx writes an alias inside a union as TypeAliasForwardRef('ArrayLike'): keep the name.
  def short(text):
    return None if text is None else re.sub(r"TypeAliasForwardRef\('([^']+)'\)", r"\1", text)

  return short(signature), short(return_annotation)


def setup(app):
  app.connect("autodoc-process-signature", _short_aliases)
