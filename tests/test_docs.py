"""The documentation: its examples run, and the site builds with every public name.

Every ``>>>`` example in the package's docstrings runs here, one test per module,
under this suite's conftest (eight host devices), with ``jax``, ``jnp`` and
``jaxactv`` in scope as the API reference says. Each expected output was worked out
by hand (``log 2``, ``e**-17``, ...) and is printed rounded, so it does not depend
on the last bits of a float.

The Sphinx site is built once, offline, with warnings as errors (what ``make docs``
runs), and its API page must document every name in ``jaxactv.__all__`` and
``jaxactv.reference.__all__`` as read now, so a name added later must reach the
docs too.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxactv
import jaxactv.reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    ["jaxactv"] + [f"jaxactv.{m.name}" for m in pkgutil.iter_modules(jaxactv.__path__)]
)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _docstrings(module):
  """(name, docstring) of the module and of everything defined in it, jitted or not."""
  yield module.__name__, module.__doc__
  for name, obj in vars(module).items():
    target = inspect.unwrap(obj) if callable(obj) else obj
    if getattr(target, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(target) or inspect.isclass(target):
      yield f"{module.__name__}.{name}", getattr(obj, "__doc__", None)
    if inspect.isclass(target):
      for attr, member in vars(target).items():
        if inspect.isfunction(member):
          yield f"{module.__name__}.{name}.{attr}", member.__doc__


def _doctests(module):
  parser = doctest.DocTestParser()
  tests = []
  for name, doc in _docstrings(module):
    if isinstance(doc, str) and ">>>" in doc:
      globs = {"jax": jax, "jnp": jnp, "jaxactv": jaxactv}
      tests.append(parser.get_doctest(doc, globs, name, module.__file__, 0))
  return tests


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  report: list[str] = []
  with np.printoptions():  # examples may set print options: restore them after
    for test in _doctests(module):
      runner.run(test, out=report.append)
  assert runner.failures == 0, "".join(report)


def test_every_public_function_has_an_example():
  # Examples are part of the public docs: each public function shows one call.
  missing = []
  for name in jaxactv.__all__:
    obj = getattr(jaxactv, name)
    if callable(obj) and inspect.isfunction(inspect.unwrap(obj)):
      if ">>>" not in (obj.__doc__ or ""):
        missing.append(name)
  assert not missing, f"public functions without an Examples section: {missing}"


def test_a_failing_example_is_reported():
  # The runner above would catch a wrong output: check it on a deliberate one.
  wrong = doctest.DocTestParser().get_doctest(
      ">>> print(jnp.round(jaxactv.logsumexp(jnp.zeros(2)), 4))\n0.7\n",
      {"jnp": jnp, "jaxactv": jaxactv}, "wrong", None, 0,
  )
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  runner.run(wrong, out=lambda s: None)
  assert runner.failures == 1


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
  pytest.importorskip("sphinx")
  out = tmp_path_factory.mktemp("html")
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
  cmd += ["-d", str(out / ".doctrees"), str(ROOT / "docs"), str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
  return out


def test_api_page_documents_every_public_name(built_site):
  html = (built_site / "api.html").read_text()
  ids = set(re.findall(r'id="([^"]+)"', html))
  names = [n for n in jaxactv.__all__ if n != "reference"]
  missing = [n for n in names if f"jaxactv.{n}" not in ids]
  missing += [
      f"reference.{n}" for n in jaxactv.reference.__all__ if f"jaxactv.reference.{n}" not in ids
  ]
  if "reference" in jaxactv.__all__ and "module-jaxactv.reference" not in ids:
    missing.append("reference")
  assert not missing, f"not on the API page: {missing}"


def test_site_has_every_page_and_offline_math(built_site):
  pages = ["index", "getting_started", "api", "edge_cases", "migrating", "scaling_out",
           "examples", "benchmarks"]
  for page in pages:
    assert (built_site / f"{page}.html").exists(), page
  index = (built_site / "index.html").read_text()
  for page in pages[1:]:
    assert f'href="{page}.html"' in index, f"{page} is not in the navigation"
  api = (built_site / "api.html").read_text()
  # MathJax is bundled and loaded from the site itself, never from a CDN.
  scripts = re.findall(r'<script[^>]+src="([^"]+)"', api)
  mathjax = [s for s in scripts if "mathjax" in s.lower()]
  assert mathjax and all("://" not in s for s in mathjax), mathjax
  assert (built_site / mathjax[0].split("?")[0]).exists()
  assert r"\frac{e^{x_i - m}}" in api  # the softmax formula reached the page as math
  # The figures of the examples and the benchmark plot are copied into the site.
  for page, figure in [("examples", "training_curves"), ("benchmarks", "results")]:
    html = (built_site / f"{page}.html").read_text()
    src = re.search(rf'<img[^>]+src="([^"]*{figure}[^"]*\.png)"', html)
    assert src and (built_site / src.group(1)).exists(), (page, figure)
