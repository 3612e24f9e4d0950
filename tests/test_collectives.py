"""What the vocab-parallel losses send between devices, counted in compiled HLO.

On a 4-device 'vocab' mesh, one step (value and gradient) of each loss must issue
exactly the collectives README "Scaling out" lists: a max and one sum in the
forward pass per token chunk, one sum of ``dx`` in the linear loss's backward
pass, and never a gather of the vocabulary.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxactv

N, D, V = 16, 8, 4 * 64
COLLECTIVE = re.compile(
    r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(.*?to_apply=(%?[\w.\-]+)|"
    r"= (\S+) (all-gather|all-to-all|collective-permute)(?:-start)?\(")


def collectives(fn, *args):
  """``[(kind, shape, combiner)]`` of every collective in the compiled HLO."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  regions = dict(re.findall(r"\n(%?[\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S))
  out = []
  for m in COLLECTIVE.finditer(text):
    if m.group(2):
      body = regions.get(m.group(3), "")
      combiner = "max" if "maximum(" in body else "sum" if "add(" in body else "other"
      out.append((m.group(2), m.group(1), combiner))
    else:
      out.append((m.group(5), m.group(4), None))
  return out


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:4]), ("vocab",))


def _kinds(found):
  return sorted((kind, combiner) for kind, _, combiner in found)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_integer_ce_one_max_and_one_sum(mesh, smoothing):
  def loss(x, y):
    return jaxactv.softmax_cross_entropy_with_integer_labels(
        x, y, vocab_axis="vocab", label_smoothing=smoothing, reduction="mean")

  f = jax.shard_map(loss, mesh=mesh, in_specs=(P(None, "vocab"), P()), out_specs=P())
  x, y = jnp.ones((N, V)), jnp.zeros(N, jnp.int32)
  found = collectives(jax.value_and_grad(f), x, y)
  # The backward pass is local: the softmax of this device's classes, from the
  # forward's per-row numbers.
  assert _kinds(found) == [("all-reduce", "max"), ("all-reduce", "sum")], found


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_one_max_one_sum_per_chunk_and_one_sum_of_dx(mesh, reduction):
  def loss(x, w, y):
    return jaxactv.linear_softmax_cross_entropy(
        x, w, y, vocab_axis="vocab", reduction=reduction, label_smoothing=0.1)

  f = jax.shard_map(loss, mesh=mesh, in_specs=(P(), P(None, "vocab"), P()), out_specs=P())
  x, w, y = jnp.ones((N, D)), jnp.ones((D, V)), jnp.zeros(N, jnp.int32)
  found = collectives(jax.value_and_grad(lambda *a: f(*a).sum(), (0, 1)), x, w, y)
  kinds = _kinds(found)
  assert kinds == [("all-reduce", "max"), ("all-reduce", "sum"), ("all-reduce", "sum")], found
  # dx is the one [tokens, d_model] sum; the others carry a few numbers per token.
  assert sum(f"[{N},{D}]" in shape for _, shape, _ in found) == 1, found
