"""linear_softmax_cross_entropy's per-token masks and weights, class weights, temperature
and per-token monitors (return_aux), against the unfused computation.

Expected values come from jaxactv.reference (the logits formed in full, then the
textbook loss, differentiated by autodiff) and from float64 NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxactv
from jaxactv import reference


def _problem(n=37, d=16, v=2049, scale=0.3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  w = (scale * rng.standard_normal((d, v))).astype(np.float32)
  b = (0.1 * rng.standard_normal(v)).astype(np.float32)
  y = rng.integers(0, v, n).astype(np.int32)
  mask = rng.random(n) > 0.3
  weights = rng.uniform(0.0, 2.0, n).astype(np.float32)
  class_weights = rng.uniform(0.2, 3.0, v).astype(np.float32)
  return x, w, b, y, mask, weights, class_weights


def _outputs_and_grads(f, x, w, b, ct):
  """``f``'s value and the gradients of ``sum(ct * f)``, in one jit."""

  def both(x, w, b):
    return f(x, w, b), jax.grad(lambda *a: jnp.sum(f(*a) * ct), (0, 1, 2))(x, w, b)

  return jax.jit(both)(x, w, b)


def _check(options, chunk_size, reductions=("mean", "none"), seed=0):
  x, w, b, y, mask, weights, cw = _problem(seed=seed)
  extra = {"where": mask, "weights": weights, "class_weights": cw}
  opts = {k: extra.get(k, v) if v is True else v for k, v in options.items()}
  for reduction in reductions:
    # A per-token cotangent that is not constant, for "none".
    ct = np.linspace(0.5, 1.5, x.shape[0]).astype(np.float32) if reduction == "none" else 1.0
    got, dgot = _outputs_and_grads(
        lambda x, w, b, r=reduction: jaxactv.linear_softmax_cross_entropy(
            x, w, y, bias=b, reduction=r, chunk_size=chunk_size, **opts
        ), x, w, b, ct,
    )
    want, dwant = _outputs_and_grads(
        lambda x, w, b, r=reduction: reference.linear_softmax_cross_entropy(
            x, w, y, bias=b, reduction=r, **opts
        ), x, w, b, ct,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=reduction)
    for name, g, r in zip("xwb", dgot, dwant, strict=True):
      np.testing.assert_allclose(
          g, r, rtol=0, atol=1e-4 * np.abs(np.asarray(r)).max(), err_msg=f"{reduction} d{name}"
      )


EVERYTHING = {
    "where": True, "weights": True, "class_weights": True, "temperature": 0.5,
    "logit_softcap": 3.0, "label_smoothing": 0.2, "z_loss": 1e-3, "ignore_index": 3,
}
CASES = [
    {"where": True, "weights": True},
    {"class_weights": True, "ignore_index": 3},
    {"temperature": 1.7, "logit_softcap": 2.0, "label_smoothing": 0.1, "class_weights": True},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(o))
def test_options_match_unfused(options):
  # (16, 700): N = 37 is not a multiple of 16, and 2049 = 2 * 700 + 649 leaves a narrower
  # last slice.
  _check(options, (16, 700))


@pytest.mark.parametrize(
    ("chunk_size", "reductions"),
    [((16, 700), ("mean", "sum", "none")), (None, ("mean",)), (8, ("none",))],
    ids=str,
)
def test_every_option_at_once(chunk_size, reductions):
  _check(EVERYTHING, chunk_size, reductions=reductions, seed=1)


def test_weighted_mean_follows_pytorchs_rule_in_float64():
  x, w, b, y, mask, weights, cw = _problem(n=29, v=301)
  got = jaxactv.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights, class_weights=cw, temperature=2.0,
      chunk_size=(8, 128),
  )
  z = (x.astype(np.float64) @ w.astype(np.float64) + b) / 2.0
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  nll = lse - z[np.arange(len(y)), y]
  num = np.sum(np.where(mask, weights * cw[y] * nll, 0.0))
  den = np.sum(np.where(mask, weights * cw[y], 0.0))
  np.testing.assert_allclose(got, num / den, rtol=1e-5)


def test_masked_tokens_count_for_nothing_and_leak_no_nan():
  x, w, b, y, mask, weights, _ = _problem(n=20, v=300)
  x = x.copy()
  x[~mask] = np.nan  # padding with garbage hidden states
  losses = jaxactv.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights, reduction="none", chunk_size=(8, 128)
  )
  assert np.all(np.asarray(losses)[~mask] == 0) and np.all(np.isfinite(losses))
  f = lambda m, x: m.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights, chunk_size=(8, 128)
  )
  dx, dw, db = jax.jit(jax.grad(lambda x, w, b: jaxactv.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights, chunk_size=(8, 128)), (0, 1, 2)))(x, w, b)
  clean = np.where(np.isnan(x), 0.0, x).astype(np.float32)
  _, rdw, rdb = jax.jit(jax.grad(lambda x, w, b: reference.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights), (0, 1, 2)))(clean, w, b)
  assert np.all(np.asarray(dx)[~mask] == 0)
  np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(f(jaxactv, x), f(reference, clean), rtol=1e-5)


def test_mean_over_zero_total_weight_is_zero():
  x, w, _, y, _, _, _ = _problem(n=6, v=50)
  for kwargs in ({"where": np.zeros(6, bool)}, {"weights": np.zeros(6, np.float32)}):
    loss, dx = jax.value_and_grad(
        lambda x, k=kwargs: jaxactv.linear_softmax_cross_entropy(x, w, y, **k)
    )(x)
    assert float(loss) == 0.0 and np.all(np.asarray(dx) == 0)


def test_aux_monitors_match_float64_and_carry_no_gradient():
  x, w, b, y, mask, weights, _ = _problem(n=37, v=2049)
  w = w.copy()
  # Ties for the argmax, in different slices: columns 5, 800 and 1500 are equal and large.
  w[:, 800] = w[:, 1500] = w[:, 5] = 2.0 * np.sign(x.mean(0))
  b = b.copy()
  b[[5, 800, 1500]] = 0.5
  for reduction in ("mean", "none"):
    _, aux = jaxactv.linear_softmax_cross_entropy(
        x, w, y, bias=b, where=mask, weights=weights, z_loss=1e-2, temperature=0.8,
        reduction=reduction, return_aux=True, chunk_size=(16, 700),
    )
    assert isinstance(aux, jaxactv.LinearCrossEntropyAux)
    z = (x.astype(np.float64) @ w.astype(np.float64) + b) / 0.8
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    assert aux.lse.dtype == jnp.float32 and aux.argmax.dtype == jnp.int32
    np.testing.assert_allclose(aux.lse, lse, rtol=1e-6)
    np.testing.assert_array_equal(aux.argmax, np.argmax(z, -1))
    assert np.sum(np.argmax(z, -1) == 5) > 5  # the ties are exercised
    z_rows = np.where(mask, weights * 1e-2 * lse**2, 0.0)
    want = z_rows if reduction == "none" else z_rows.sum() / np.sum(np.where(mask, weights, 0))
    np.testing.assert_allclose(aux.z_loss, want, rtol=1e-5)
  grads = jax.grad(lambda x: sum(
      jnp.sum(a.astype(jnp.float32)) for a in jaxactv.linear_softmax_cross_entropy(
          x, w, y, z_loss=1e-2, return_aux=True)[1]))(x)
  assert np.all(np.asarray(grads) == 0)


def test_temperature_one_is_the_plain_loss():
  x, w, b, y, *_ = _problem(n=16, v=300)
  plain = jaxactv.linear_softmax_cross_entropy(x, w, y, bias=b)
  np.testing.assert_array_equal(
      jaxactv.linear_softmax_cross_entropy(x, w, y, bias=b, temperature=1.0), plain
  )


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"where": np.ones((5,), bool)}, ValueError, r"where.*\(6,\)"),
        ({"where": np.ones((6,), np.float32)}, TypeError, "boolean"),
        ({"weights": np.ones((3,), np.float32)}, ValueError, r"weights.*\(6,\)"),
        ({"weights": np.ones((6,), np.int32)}, TypeError, "weights"),
        ({"class_weights": np.ones((3,), np.float32)}, ValueError, "class_weights"),
        ({"return_aux": 1}, TypeError, "return_aux"),
    ],
)
def test_bad_options(kwargs, error, pattern):
  x, w, y = np.ones((6, 4), np.float32), np.ones((4, 7), np.float32), np.zeros(6, np.int32)
  with pytest.raises(error, match=pattern):
    jaxactv.linear_softmax_cross_entropy(x, w, y, **kwargs)


def test_traced_temperature_is_refused():
  x, w, y = np.ones((6, 4), np.float32), np.ones((4, 7), np.float32), np.zeros(6, np.int32)
  with pytest.raises(ValueError, match="temperature"):
    jax.jit(lambda t: jaxactv.linear_softmax_cross_entropy(x, w, y, temperature=t))(1.0)
