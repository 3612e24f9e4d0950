"""linear_log_probs: per-token log-probabilities and entropies of softmax(x @ w + b),
against the unfused jax.nn.log_softmax + gather + entropy, and float64 NumPy.

Also: no array of [tokens, classes] elements exists in either fused op's jaxpr.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from loss_testing import all_eqns

import jaxactv


def _problem(n=37, d=16, v=2049, scale=0.3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  w = (scale * rng.standard_normal((d, v))).astype(np.float32)
  b = (0.1 * rng.standard_normal(v)).astype(np.float32)
  t = rng.integers(0, v, n).astype(np.int32)
  mask = rng.random(n) > 0.3
  return x, w, b, t, mask


def unfused(x, w, b, t, temperature=1.0, logit_softcap=None, where=None):
  """The textbook version with jax.nn, in float32."""
  logits = jnp.dot(x, w, preferred_element_type=jnp.float32) + b
  logits = logits / temperature
  if logit_softcap is not None:
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
  logp = jax.nn.log_softmax(logits)
  lp = jnp.take_along_axis(logp, t[:, None], -1)[:, 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  if where is not None:
    lp, ent = jnp.where(where, lp, 0.0), jnp.where(where, ent, 0.0)
  return lp, ent


def _values_and_grads(f, x, w, b, a, c):
  def both(x, w, b):
    loss = lambda *args: jnp.sum(a * f(*args)[0] + c * f(*args)[1])
    return f(x, w, b), jax.grad(loss, (0, 1, 2))(x, w, b)

  return jax.jit(both)(x, w, b)


CASES = [
    ({}, (16, 700)),
    ({"temperature": 0.7}, None),
    ({"temperature": 1.3, "logit_softcap": 2.0, "where": True}, (16, 700)),
    ({"temperature": 0.6, "where": True}, 8),
]


@pytest.mark.parametrize(("options", "chunk_size"), CASES, ids=str)
def test_matches_unfused(options, chunk_size):
  # N = 37 is not a multiple of the chunk; V = 2049 = 2 * 700 + 649 leaves a narrower slice.
  x, w, b, t, mask = _problem()
  opts = {k: (mask if v is True else v) for k, v in options.items()}
  rng = np.random.default_rng(1)
  a, c = rng.standard_normal((2, x.shape[0])).astype(np.float32)  # arbitrary cotangents
  fused = lambda x, w, b: jaxactv.linear_log_probs(
      x, w, t, bias=b, return_entropy=True, chunk_size=chunk_size, **opts
  )
  (lp, ent), grads = _values_and_grads(fused, x, w, b, a, c)
  (rlp, rent), rgrads = _values_and_grads(
      lambda x, w, b: unfused(x, w, b, t, **opts), x, w, b, a, c
  )
  assert lp.dtype == ent.dtype == jnp.float32
  np.testing.assert_allclose(lp, rlp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, rent, rtol=1e-5, atol=1e-5)
  for name, g, r in zip("xwb", grads, rgrads, strict=True):
    np.testing.assert_allclose(
        g, r, rtol=0, atol=1e-4 * np.abs(np.asarray(r)).max(), err_msg=f"d{name}"
    )


def test_values_in_float64():
  x, w, b, t, _ = _problem(n=20, v=513)
  lp, ent = jaxactv.linear_log_probs(
      x, w, t, bias=b, temperature=0.8, return_entropy=True, chunk_size=(8, 128)
  )
  z = (x.astype(np.float64) @ w.astype(np.float64) + b) / 0.8
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  np.testing.assert_allclose(lp, logp[np.arange(20), t], rtol=1e-5)
  np.testing.assert_allclose(ent, -(np.exp(logp) * logp).sum(-1), rtol=1e-5)


def test_log_probs_alone_and_its_gradient():
  x, w, _, t, _ = _problem(n=12, v=300)
  lp, dx = jax.value_and_grad(
      lambda x: jnp.sum(jaxactv.linear_log_probs(x, w, t, chunk_size=(8, 128)))
  )(x)
  rlp, rdx = jax.value_and_grad(lambda x: jnp.sum(unfused(x, w, 0.0, t)[0]))(x)
  np.testing.assert_allclose(lp, rlp, rtol=1e-5)
  np.testing.assert_allclose(dx, rdx, rtol=0, atol=1e-4 * np.abs(rdx).max())


def test_masked_tokens_give_zero_and_leak_no_nan():
  x, w, b, t, mask = _problem(n=20, v=300)
  x = x.copy()
  x[~mask] = np.nan
  loss = lambda x, w, b: jnp.sum(sum(jaxactv.linear_log_probs(
      x, w, t, bias=b, where=mask, return_entropy=True, chunk_size=(8, 128))))
  (lp, ent) = jaxactv.linear_log_probs(x, w, t, where=mask, return_entropy=True)
  assert np.all(np.asarray(lp)[~mask] == 0) and np.all(np.asarray(ent)[~mask] == 0)
  dx, dw, db = jax.grad(loss, (0, 1, 2))(x, w, b)
  clean = np.where(np.isnan(x), 0.0, x).astype(np.float32)
  _, rdw, rdb = jax.grad(
      lambda x, w, b: jnp.sum(sum(unfused(x, w, b, t, where=mask))), (0, 1, 2)
  )(clean, w, b)
  assert np.all(np.asarray(dx)[~mask] == 0)
  np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-6)


def test_out_of_range_token():
  x, w, _, t, _ = _problem(n=6, v=50)
  bad = t.copy()
  bad[2] = 50
  with pytest.raises(ValueError, match=r"50.*50 classes"):
    jaxactv.linear_log_probs(x, w, bad)
  lp, ent = jax.jit(lambda t: jaxactv.linear_log_probs(x, w, t, return_entropy=True))(bad)
  assert np.isnan(lp[2]) and np.isnan(ent[2])
  assert np.all(np.isfinite(np.delete(np.asarray(lp), 2)))


def test_bfloat16_inputs():
  x, w, _, t, _ = _problem(n=24, d=32, v=1000)
  xh, wh = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  f = lambda x, w: jaxactv.linear_log_probs(x, w, t, return_entropy=True, chunk_size=(8, 384))
  lp, ent = f(xh, wh)
  assert lp.dtype == ent.dtype == jnp.float32
  rlp, rent = unfused(xh.astype(jnp.float32), wh.astype(jnp.float32), 0.0, t)
  np.testing.assert_allclose(lp, rlp, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ent, rent, rtol=1e-4, atol=1e-4)
  dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w)[0]), (0, 1))(xh, wh)
  assert dx.dtype == dw.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"tokens": np.zeros((6,), np.float32)}, TypeError, "tokens"),
        ({"tokens": np.zeros((5,), np.int32)}, ValueError, r"tokens.*\(6,\)"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"where": np.ones((6,), np.int32)}, TypeError, "boolean"),
        ({"return_entropy": "yes"}, TypeError, "return_entropy"),
        ({"vocab_axis": "vocab"}, ValueError, "shard_map"),
    ],
)
def test_bad_input(kwargs, error, pattern):
  args = {"x": np.ones((6, 4), np.float32), "w": np.ones((4, 7), np.float32),
          "tokens": np.zeros((6,), np.int32)}
  args.update(kwargs)
  x, w, tokens = args.pop("x"), args.pop("w"), args.pop("tokens")
  with pytest.raises(error, match=pattern):
    jaxactv.linear_log_probs(x, w, tokens, **args)


# ------------------------------------------------------------------------ memory


def _largest_array(f, *args):
  jaxpr = jax.make_jaxpr(f)(*args).jaxpr
  return max(
      int(np.prod(var.aval.shape))
      for eqn in all_eqns(jaxpr)
      for var in eqn.outvars
      if hasattr(var.aval, "shape")
  )


def test_no_array_of_tokens_by_classes_exists_in_either_op():
  n, d, v = 512, 32, 4096
  x, w = jnp.ones((n, d)), jnp.ones((d, v))
  b, y = jnp.zeros((v,)), jnp.zeros((n,), jnp.int32)
  mask, weights = jnp.ones((n,), bool), jnp.ones((n,))

  def log_probs(x, w, b):
    lp, ent = jaxactv.linear_log_probs(
        x, w, y, bias=b, temperature=0.7, logit_softcap=5.0, where=mask,
        return_entropy=True, chunk_size=64,
    )
    return jnp.sum(lp) + jnp.sum(ent)

  def cross_entropy(x, w, b, reduction):
    loss, aux = jaxactv.linear_softmax_cross_entropy(
        x, w, y, bias=b, where=mask, weights=weights, class_weights=jnp.ones((v,)),
        temperature=0.7, label_smoothing=0.1, z_loss=1e-4, reduction=reduction,
        return_aux=True, chunk_size=64,
    )
    return jnp.sum(loss) + jnp.sum(aux.lse)

  fns = [log_probs] + [lambda x, w, b, r=r: cross_entropy(x, w, b, r) for r in ("mean", "none")]
  for f in fns:
    largest = _largest_array(jax.value_and_grad(f, (0, 1, 2)), x, w, b)
    assert largest <= 64 * v, largest
    assert largest < n * v
