"""linear_softmax_cross_entropy on a mesh of 8 host CPU devices (see conftest.py).

Two ways a user shards it: plain jax.jit with NamedSharding inputs, and explicit
vocabulary parallelism inside jax.shard_map with vocab_axis. Both must equal the
unsharded op, gradients of x, w and bias included, in both of shard_map's
check_vma modes (they hand replicated cotangents over differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxactv
from jaxactv import reference

N, D, V = 24, 16, 4 * 257  # 257 classes per shard: odd


def _problem():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((N, D)).astype(np.float32)
  w = (0.3 * rng.standard_normal((D, V))).astype(np.float32)
  b = (0.1 * rng.standard_normal(V)).astype(np.float32)
  y = rng.integers(0, V, N).astype(np.int32)
  y[5] = -100
  return x, w, b, y


def test_eight_devices_are_available():
  assert len(jax.devices()) >= 8


OPTIONS = [
    {},
    {"reduction": "none", "label_smoothing": 0.1},
    {"reduction": "sum", "z_loss": 1e-3, "logit_softcap": 4.0, "chunk_size": (8, 100)},
    {"ignore_index": -100, "label_smoothing": 0.2, "chunk_size": 5},
]


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_vocab_parallel_equals_unsharded(options, check_vma):
  x, w, b, y = _problem()
  if "ignore_index" not in options:
    y = np.where(y < 0, 0, y)
  mesh = Mesh(np.array(jax.devices()[:4]), ("vocab",))

  def local(x, w, b, y):
    return jaxactv.linear_softmax_cross_entropy(x, w, y, bias=b, vocab_axis="vocab", **options)

  sharded = jax.jit(
      jax.shard_map(
          local,
          mesh=mesh,
          in_specs=(P(), P(None, "vocab"), P("vocab"), P()),
          out_specs=P(),
          check_vma=check_vma,
      )
  )
  plain = {k: v for k, v in options.items() if k != "chunk_size"}
  unsharded = lambda x, w, b, y: reference.linear_softmax_cross_entropy(x, w, y, bias=b, **plain)
  np.testing.assert_allclose(sharded(x, w, b, y), jax.jit(unsharded)(x, w, b, y), rtol=1e-5,
                             atol=1e-6)
  grads = jax.jit(jax.grad(lambda *a: sharded(*a, y).sum(), (0, 1, 2)))(x, w, b)
  want = jax.jit(jax.grad(lambda *a: unsharded(*a, y).sum(), (0, 1, 2)))(x, w, b)
  for name, g, r in zip("xwb", grads, want, strict=True):
    # A cotangent handed over the wrong way is off by the axis size (4), not by 1e-4.
    np.testing.assert_allclose(
        g, r, rtol=0, atol=1e-4 * np.abs(np.asarray(r)).max(), err_msg=f"d{name}"
    )


def test_vocab_parallel_never_gathers_the_vocabulary():
  x, w, _, y = _problem()
  y = np.where(y < 0, 0, y)
  mesh = Mesh(np.array(jax.devices()[:4]), ("vocab",))
  f = jax.shard_map(
      lambda x, w, y: jaxactv.linear_softmax_cross_entropy(x, w, y, vocab_axis="vocab"),
      mesh=mesh,
      in_specs=(P(), P(None, "vocab"), P()),
      out_specs=P(),
  )
  text = jax.jit(jax.value_and_grad(f, (0, 1))).lower(x, w, y).as_text()
  assert "all_gather" not in text and "all-gather" not in text
  assert "all_reduce" in text or "all-reduce" in text


def test_plain_jit_with_named_shardings():
  x, w, _, y = _problem()
  y = np.where(y < 0, 0, y)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "vocab"))
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  ws = jax.device_put(w, NamedSharding(mesh, P(None, "vocab")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  f = jax.jit(
      jax.value_and_grad(
          lambda x, w, y: jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=8), (0, 1)
      )
  )
  value, (dx, dw) = f(xs, ws, ys)
  want, (rx, rw) = jax.jit(jax.value_and_grad(reference.linear_softmax_cross_entropy, (0, 1)))(
      x, w, y)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(dx, rx, rtol=0, atol=1e-4 * np.abs(np.asarray(rx)).max())
  np.testing.assert_allclose(dw, rw, rtol=0, atol=1e-4 * np.abs(np.asarray(rw)).max())


def test_vocab_axis_outside_shard_map_says_how_to_call_it():
  x, w, _, y = _problem()
  with pytest.raises(ValueError, match="shard_map"):
    jaxactv.linear_softmax_cross_entropy(x, w, np.abs(y), vocab_axis="vocab")
  with pytest.raises(ValueError, match="shard_map"):
    jax.jit(
        lambda x: jaxactv.linear_softmax_cross_entropy(x, w, np.abs(y), vocab_axis="vocab")
    )(jnp.asarray(x))
