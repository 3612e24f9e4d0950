"""The ``jaxactv-api`` directive: the API reference, generated from ``jaxactv.__all__``.

Every public name is documented, grouped by the module that defines it, so a name
added to ``__all__`` reaches the docs without editing them. A name whose module is
not in GROUPS lands under "Other"; ``jaxactv.reference`` is documented as a module.
"""

from __future__ import annotations

import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

GROUPS = [
    ("Activations", ["jaxactv._sigmoid", "jaxactv._softmax"]),
    ("Softmax cross-entropy", ["jaxactv._cross_entropy"]),
    ("Sigmoid losses (multi-label)", ["jaxactv._binary"]),
    ("Divergences from logits", ["jaxactv._divergence"]),
    ("Big vocabularies: the fused linear ops",
     ["jaxactv._linear_cross_entropy", "jaxactv._linear_log_probs"]),
]


def _home(obj) -> str:
  return getattr(inspect.unwrap(obj), "__module__", "") or ""


def _line(obj) -> int:
  try:
    return inspect.getsourcelines(inspect.unwrap(obj))[1]
  except (OSError, TypeError):
    return 0


def _entry(name: str, obj) -> list[str]:
  target = inspect.unwrap(obj)
  if inspect.isclass(target) and hasattr(target, "_fields"):
    # A NamedTuple: its docstring's Attributes section documents the fields; autodoc's
    # members would document them again ("Alias for field number 0").
    return [f".. autoclass:: jaxactv.{name}", ""]
  if inspect.isclass(target):
    return [f".. autoclass:: jaxactv.{name}", "   :members:", ""]
  if callable(obj):
    return [f".. autofunction:: jaxactv.{name}", ""]
  return [f".. py:data:: {name}", "   :module: jaxactv", f"   :value: {obj!r}", ""]


def api_rst() -> list[str]:
  import jaxactv

  names = [n for n in jaxactv.__all__ if n not in ("reference", "__version__")]
  placed: set[str] = set()
  lines: list[str] = []
  for title, modules in [*GROUPS, ("Other", None)]:
    group = [n for n in names if n not in placed
             and (modules is None or _home(getattr(jaxactv, n)) in modules)]
    # In the order of the modules, then of the source: sigmoid before log_sigmoid.
    rank = {m: i for i, m in enumerate(modules or [])}
    group.sort(key=lambda n: (rank.get(_home(getattr(jaxactv, n)), 0), _line(getattr(jaxactv, n))))
    if not group:
      continue
    lines += [title, "-" * len(title), ""]
    for name in group:
      lines += _entry(name, getattr(jaxactv, name))
      placed.add(name)
  if "reference" in jaxactv.__all__:
    title = "Plain autodiff twins: jaxactv.reference"
    lines += [title, "-" * len(title), ""]
    lines += [".. automodule:: jaxactv.reference", "   :members:", ""]
  if "__version__" in jaxactv.__all__:
    lines += ["Version", "-------", "", *_entry("__version__", jaxactv.__version__)]
  return lines


class JaxactvApi(SphinxDirective):
  has_content = False

  def run(self) -> list[nodes.Node]:
    container = nodes.section()
    container.document = self.state.document
    content = StringList(api_rst(), source="jaxactv.__all__")
    nested_parse_with_titles(self.state, content, container)
    return container.children


def setup(app):
  app.add_directive("jaxactv-api", JaxactvApi)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
