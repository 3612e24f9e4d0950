"""Swapping jax.nn / optax for jaxactv gives their numbers: tuple axes, logsumexp, labels.

Expected values come from optax, jax.nn, scipy and float64 NumPy, never from jaxactv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

import jaxactv
from jaxactv import reference

RNG = np.random.default_rng(10)


# ------------------------------------------------------------------ tuple class axes


def test_issue_example_unsorted_tuple_axis_matches_optax():
  logits = jnp.full((1, 2, 3), -10.0).at[0, 1, 0].set(10.0)
  labels = jnp.array([1])
  for axis in [(2, 1), (-1, -2)]:
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis=axis)
    got = jaxactv.softmax_cross_entropy_with_integer_labels(logits, labels, axis=axis)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(got[0]) < 1e-5  # optax: 0.0; 0.1.0 gave 20.0


@pytest.mark.parametrize("axis", [(2, 1), (-1, -2), (2, -3, 1)])
def test_tuple_axes_match_optax_for_every_loss(axis):
  x = jnp.asarray(RNG.normal(size=(3, 4, 5)).astype(np.float32))
  nd = 3
  axes = [a % nd for a in axis]
  batch = tuple(n for d, n in enumerate(x.shape) if d not in axes)
  k = int(np.prod([x.shape[a] for a in axes]))
  labels = jnp.asarray(RNG.integers(0, k, size=batch))
  want = optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis)
  got = jaxactv.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  soft = jax.nn.softmax(jnp.asarray(RNG.normal(size=x.shape).astype(np.float32)), axis=axis)
  np.testing.assert_allclose(
      jaxactv.softmax_cross_entropy(x, soft, axis=axis),
      optax.softmax_cross_entropy(x, soft, axis=axis), rtol=1e-5, atol=1e-6)
  # A per-logit mask follows the same order.
  where = jnp.asarray(RNG.random(x.shape) > 0.3).at[..., 0].set(True).at[:, 0].set(True)
  where = where.at[0].set(True)
  np.testing.assert_allclose(
      jaxactv.softmax_cross_entropy(x, soft, axis=axis, where=where),
      optax.softmax_cross_entropy(x, soft, axis=axis, where=where), rtol=1e-5, atol=1e-6)
  # Activations do not depend on the order.
  np.testing.assert_allclose(jaxactv.softmax(x, axis), jax.nn.softmax(x, axis), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(jaxactv.logsumexp(x, axis), jax.nn.logsumexp(x, axis), rtol=1e-6)


def test_tuple_axis_repeating_an_axis_is_an_error():
  with pytest.raises(ValueError, match="repeats an axis"):
    jaxactv.softmax_cross_entropy_with_integer_labels(jnp.zeros((2, 3, 4)), jnp.zeros(2, int),
                                                      axis=(2, -1))


# ------------------------------------------------------------------------ logsumexp


def test_logsumexp_signature_is_jax_nns():
  import inspect

  for ours, theirs in [(jaxactv.logsumexp, jax.nn.logsumexp),
                       (jaxactv.logmeanexp, jax.nn.logmeanexp)]:
    a, b = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    assert list(a) == list(b)
    assert [p.default for p in a.values()] == [p.default for p in b.values()]


@pytest.mark.parametrize(
    "b_shape, axis, keepdims",
    [(None, None, False), ((5,), -1, False), ((1, 5), 0, True), ((4, 5), (0, 1), True),
     ((4, 1), (1, 0), False), ((4, 5), None, True)],
)
def test_logsumexp_matches_scipy_with_b_and_sign(b_shape, axis, keepdims):
  a = RNG.normal(size=(4, 5)) * 3
  b = None if b_shape is None else RNG.normal(size=b_shape) * (RNG.random(b_shape) > 0.2)
  want, want_sign = scipy.special.logsumexp(a, axis, b, keepdims, return_sign=True)
  got, sign = jaxactv.logsumexp(jnp.asarray(a, jnp.float32), axis,
                                None if b is None else jnp.asarray(b, jnp.float32),
                                keepdims, True)
  ok = want_sign != 0
  np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], rtol=2e-6, atol=2e-6)
  np.testing.assert_array_equal(sign, want_sign)
  # Without return_sign a negative sum is NaN, as in jax.nn.
  plain = jaxactv.logsumexp(jnp.asarray(a, jnp.float32), axis,
                            None if b is None else jnp.asarray(b, jnp.float32), keepdims)
  jax_plain = jax.nn.logsumexp(jnp.asarray(a, jnp.float32), axis,
                               None if b is None else jnp.asarray(b, jnp.float32), keepdims)
  np.testing.assert_array_equal(np.isnan(plain), np.isnan(jax_plain))


def test_logsumexp_gradients_in_a_and_b_match_jax_nn():
  a = jnp.asarray(RNG.normal(size=(3, 6)).astype(np.float32))
  b = jnp.asarray((RNG.normal(size=(6,)) + 0.5).astype(np.float32))
  ct = jnp.asarray(RNG.normal(size=(3,)).astype(np.float32))

  def f(lse):
    return lambda a, b: jnp.vdot(lse(a, 1, b, return_sign=True)[0], ct)

  got = jax.jit(jax.grad(f(jaxactv.logsumexp), (0, 1)))(a, b)
  want = jax.grad(f(jax.nn.logsumexp), (0, 1))(a, b)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_logsumexp_rank0_positional_where_complex_and_logmeanexp():
  np.testing.assert_allclose(jaxactv.logsumexp(2.0), 2.0)
  np.testing.assert_allclose(jaxactv.logsumexp(jnp.float32(2.0), b=3.0), 2.0 + np.log(3.0),
                             rtol=1e-6)
  x = jnp.asarray(RNG.normal(size=(4, 3)).astype(np.float32))
  assert jaxactv.logsumexp(x).shape == ()
  # The third positional argument is b, as in jax.nn.
  b = jnp.asarray([1.0, 2.0, 3.0])
  np.testing.assert_allclose(jaxactv.logsumexp(x, -1, b), jax.nn.logsumexp(x, -1, b), rtol=1e-6)
  z = x + 1j * x[::-1]
  np.testing.assert_allclose(jaxactv.logsumexp(z, 1), jax.nn.logsumexp(z, 1), rtol=1e-6)
  where = jnp.asarray(RNG.random((4, 3)) > 0.3).at[:, 0].set(True)
  for axis in [None, 0, 1]:
    np.testing.assert_allclose(jaxactv.logmeanexp(x, axis, where),
                               jax.nn.logmeanexp(x, axis, where), rtol=1e-6, atol=1e-6)
  # A mean over nothing: -inf (jax.nn: NaN), see the docstring.
  assert float(jaxactv.logmeanexp(x[0], where=jnp.zeros(3, bool))) == -np.inf


# ---------------------------------------------------------------------- class weights


def _np_weighted_ce(x, labels, w, eps, reduction):
  x = np.asarray(x, np.float64)
  logp = x - scipy.special.logsumexp(x, -1, keepdims=True)
  k = x.shape[-1]
  nll = -logp
  loss = (1 - eps) * w[labels] * nll[np.arange(len(labels)), labels] + eps / k * (nll * w).sum(-1)
  return loss.sum() if reduction == "sum" else loss.sum() / w[labels].sum()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_class_weights_gradient_matches_reference_and_finite_differences(reduction, eps):
  x = RNG.normal(size=(6, 3)).astype(np.float64)
  labels = np.array([0, 1, 2, 0, 0, 1])
  w = np.array([0.5, 1.0, 2.0])

  def ours(w):
    return jaxactv.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(x, jnp.float32), jnp.asarray(labels), class_weights=w,
        label_smoothing=eps, reduction=reduction)

  def twin(w):
    return reference.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(x, jnp.float32), jnp.asarray(labels), class_weights=w,
        label_smoothing=eps, reduction=reduction)

  got = jax.jit(jax.grad(ours))(jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(got, jax.grad(twin)(jnp.asarray(w, jnp.float32)), rtol=1e-5)
  h = 1e-6
  fd = [(_np_weighted_ce(x, labels, w + h * e, eps, reduction)
         - _np_weighted_ce(x, labels, w - h * e, eps, reduction)) / (2 * h) for e in np.eye(3)]
  np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(np.asarray(got)) > 0)


def test_pos_weight_gradient_matches_finite_differences():
  x = RNG.normal(size=(5, 3))
  y = (RNG.random((5, 3)) > 0.5).astype(np.float64)
  p = np.array([0.5, 2.0, 3.0])

  def np_bce(p):
    ls = -np.logaddexp(0, -x)
    return (-(p * y * ls) - (1 - y) * (-np.logaddexp(0, x))).sum()

  got = jax.grad(lambda p: jaxactv.sigmoid_binary_cross_entropy(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), pos_weight=p,
      reduction="sum"))(jnp.asarray(p, jnp.float32))
  h = 1e-6
  fd = [(np_bce(p + h * e) - np_bce(p - h * e)) / (2 * h) for e in np.eye(3)]
  np.testing.assert_allclose(got, fd, rtol=1e-5)


# ------------------------------------------------------------------ broadcast labels


@pytest.mark.parametrize("shape", [(5,), (1, 5), (3, 1)])
def test_broadcast_labels_match_optax_values_and_gradients(shape):
  x = jnp.asarray(RNG.normal(size=(3, 5)).astype(np.float32))
  y = jnp.asarray(RNG.random(shape).astype(np.float32))
  pairs = [
      (jaxactv.softmax_cross_entropy, optax.softmax_cross_entropy),
      (jaxactv.sigmoid_binary_cross_entropy, optax.sigmoid_binary_cross_entropy),
      (lambda x, y: jaxactv.sigmoid_focal_loss(x, y, 0.25, 2.0),
       lambda x, y: optax.sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0)),
  ]
  ct = jnp.asarray(RNG.normal(size=(3, 5)).astype(np.float32))
  for ours, theirs in pairs:
    want = jax.jit(theirs)(x, y)
    np.testing.assert_allclose(ours(x, y), want, rtol=1e-5, atol=1e-6)
    c = ct[:, 0] if want.shape == (3,) else ct
    got = jax.jit(jax.grad(_dot_with(ours, c), (0, 1)))(x, y)
    ref = jax.jit(jax.grad(_dot_with(theirs, c), (0, 1)))(x, y)
    assert got[1].shape == shape
    for g, r in zip(got, ref, strict=True):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def _dot_with(f, c):
  return lambda x, y: jnp.vdot(f(x, y), c)


# ---------------------------------------------------------------------- forward mode


HESSIAN_OPS = ("sigmoid", "log_sigmoid", "softmax", "log_softmax", "logsumexp", "logmeanexp")


def _hessians_and_hvps(module, x, c, v):
  out = {}
  for name in HESSIAN_OPS:
    f = getattr(module, name)

    def scalar(x, f=f):
      return jnp.vdot(jnp.broadcast_to(f(x), (5,)), c)

    out[name] = jax.hessian(scalar)(x), jax.jvp(jax.grad(scalar), (x,), (v,))[1]
  return out


def test_hessian_and_hvp_work_and_match_the_twin():
  x, c, v = (jnp.asarray(RNG.normal(size=(5,)).astype(np.float32)) for _ in range(3))
  ours = jax.jit(lambda x, c, v: _hessians_and_hvps(jaxactv, x, c, v))(x, c, v)
  twin = jax.jit(lambda x, c, v: _hessians_and_hvps(reference, x, c, v))(x, c, v)
  for name in HESSIAN_OPS:
    for got, want in zip(ours[name], twin[name], strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)


def test_pure_forward_mode_still_raises():
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(jaxactv.softmax, (jnp.ones(3),), (jnp.ones(3),))
