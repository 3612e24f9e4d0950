"""The README's "Scaling out" recipes, run exactly as written.

Recipes 1 and 2 run in this process (conftest.py provides 8 host CPU devices) and
must equal the unsharded plain-autodiff twins; recipe 3 runs as two processes of 4
devices on loopback and must print recipe 1's loss on both.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
import two_processes

from jaxactv import reference

README = Path(__file__).resolve().parents[1] / "README.md"


def recipe(name: str) -> str:
  text = README.read_text()
  found = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", text, re.S)
  assert found, f"README.md has no recipe {name!r}"
  return found.group(1)


def run_recipe(name: str) -> dict:
  namespace: dict = {}
  exec(compile(recipe(name), f"README.md:{name}", "exec"), namespace)
  return namespace


def close(got, want, what):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                             atol=1e-5 * max(np.abs(want).max(), 1e-30), err_msg=what)


@pytest.fixture(scope="module")
def shard_map_recipe():
  return run_recipe("shard_map")


def test_shard_map_recipe_equals_the_unsharded_loss(shard_map_recipe):
  ns = shard_map_recipe
  x, w, labels = (np.asarray(ns[k]) for k in ("x", "w", "labels"))
  want, (rx, rw) = jax.value_and_grad(
      lambda x, w: reference.linear_softmax_cross_entropy(x, w, labels), (0, 1))(x, w)
  close(ns["loss"], want, "loss")
  close(ns["dx"], rx, "dx")
  close(ns["dw"], rw, "dw")


def test_jit_recipe_equals_the_unsharded_loss():
  ns = run_recipe("jit")
  logits, labels, targets = (np.asarray(ns[k]) for k in ("logits", "labels", "targets"))

  def twin(z):
    return (reference.softmax_cross_entropy_with_integer_labels(z, labels, reduction="mean")
            + reference.sigmoid_binary_cross_entropy(z, targets, reduction="mean"))

  want, want_grad = jax.value_and_grad(twin)(logits)
  close(ns["loss"], want, "loss")
  close(ns["grad"], want_grad, "grad")


def test_multihost_recipe_on_two_processes(tmp_path, shard_map_recipe):
  script = tmp_path / "multihost.py"
  script.write_text(recipe("multihost"))
  codes, outputs = two_processes.run([script], tmp_path)
  report = two_processes.report(codes, outputs)
  assert codes == [0, 0], report
  want = float(shard_map_recipe["loss"])
  for i, out in enumerate(outputs):
    found = re.search(rf"process {i}: loss ([-0-9.e+]+)", out)
    assert found, report
    assert abs(float(found.group(1)) - want) <= 1e-5 * abs(want), report
