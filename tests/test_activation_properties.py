"""Property tests (hypothesis) for the activations: identities that hold for every input.

Inputs are float32 arrays with entries in [-100, 100]. Where a property compares two
results of jaxactv (shift invariance, log_softmax vs log of softmax) the tolerance is
derived from what each side promises; where it compares with an expected value, the
expected value is float64 NumPy. Everything runs under ``jax.jit``.
"""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxactv

F32_EPS = float(np.finfo(np.float32).eps)
F32_TINY = float(np.finfo(np.float32).tiny)
SHIFT = np.float32(50.0)
# x + 50 is rounded to float32: each logit moves by at most half an ulp of 150.
SHIFT_ROUNDING = float(np.spacing(np.float32(150.0))) / 2

# Batches of 1-4 rows of 1-16 logits: few distinct shapes, so few compilations.
logits = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16),
    elements=st.floats(-100.0, 100.0, width=32),
)
values = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=16),
    elements=st.floats(-100.0, 100.0, width=32),
)


@st.composite
def logits_and_mask(draw):
  x = draw(logits)
  where = draw(hnp.arrays(np.bool_, x.shape))
  return x, where


softmax = jax.jit(jaxactv.softmax)
log_softmax = jax.jit(jaxactv.log_softmax)
logsumexp = jax.jit(lambda x: jaxactv.logsumexp(x, axis=-1))
sigmoid = jax.jit(jaxactv.sigmoid)
log_sigmoid = jax.jit(jaxactv.log_sigmoid)
masked_softmax = jax.jit(lambda x, w: jaxactv.softmax(x, where=w))
masked_logsumexp = jax.jit(lambda x, w: jaxactv.logsumexp(x, -1, where=w))
softmax_sum_grad = jax.jit(jax.grad(lambda x, w: jaxactv.softmax(x, where=w).sum()))
logsumexp_grad = jax.jit(jax.grad(lambda x, w: jaxactv.logsumexp(x, -1, where=w).sum()))
sigmoid_grad = jax.jit(jax.grad(lambda x: jaxactv.sigmoid(x).sum()))
log_sigmoid_grad = jax.jit(jax.grad(lambda x: jaxactv.log_sigmoid(x).sum()))


def f64(a):
  return np.asarray(a).astype(np.float64)


def gap_to_max(x):
  x = x.astype(np.float64)
  return np.abs(x - x.max(-1, keepdims=True))


# ------------------------------------------------------------------------------ softmax


@given(logits)
def test_softmax_rows_sum_to_one_and_lie_in_unit_interval(x):
  p = f64(softmax(x))
  assert np.all((p >= 0) & (p <= 1))
  n = x.shape[-1]
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-6 + n * F32_EPS / 2)


@given(logits)
def test_softmax_is_shift_invariant(x):
  p = f64(softmax(x))
  q = f64(softmax(x + SHIFT))
  # Both sides' own error (softmax's condition number) plus the rounding of x + 50.
  tol = (16 * F32_EPS * (1 + gap_to_max(x)) + 2 * SHIFT_ROUNDING) * p + F32_TINY
  assert np.all(np.abs(p - q) <= tol), np.max(np.abs(p - q) / tol)


@given(logits)
def test_log_softmax_is_log_of_softmax_where_finite(x):
  p = f64(softmax(x))
  logp = f64(log_softmax(x))
  assert np.all(np.isfinite(logp)) and np.all(logp <= 0)
  normal = p >= F32_TINY
  # log p inherits softmax's relative error; log_softmax promises 4 ulp + 4 eps absolute.
  tol = 8 * F32_EPS * (1 + gap_to_max(x)) + 4 * F32_EPS * (1 + np.abs(logp))
  err = np.abs(logp - np.log(np.where(normal, p, 1.0)))
  assert np.all(err[normal] <= tol[normal]), (err / tol)[normal].max()


@given(logits_and_mask())
def test_masked_softmax_matches_float64_and_never_nans(args):
  x, where = args
  p = f64(masked_softmax(x, where))
  empty = ~where.any(-1)
  np.testing.assert_array_equal(p[~where], 0.0)
  np.testing.assert_array_equal(p[empty], 0.0)
  x64 = np.where(where, x.astype(np.float64), -np.inf)
  full = ~empty
  if full.any():
    z = x64[full] - x64[full].max(-1, keepdims=True)
    ref = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    tol = 8 * F32_EPS * (1 + np.nan_to_num(np.abs(z), posinf=0.0)) * ref + F32_TINY
    assert np.all(np.abs(p[full] - ref) <= tol)
  grad = f64(softmax_sum_grad(x, where))
  # sum(softmax) is 1 (or 0 on an empty row) whatever x is: its gradient vanishes.
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, 0.0, atol=4 * x.shape[-1] * F32_EPS)


# ---------------------------------------------------------------------------- logsumexp


@given(logits)
def test_logsumexp_lies_between_max_and_max_plus_log_n(x):
  lse = f64(logsumexp(x))
  m = x.max(-1).astype(np.float64)
  n = x.shape[-1]
  assert np.all(lse >= m)  # exact in float32: m + log(sum) with sum >= 1
  assert np.all(lse <= m + np.log(n) + 4 * F32_EPS * (np.abs(m) + np.log(n)) + 2 * F32_EPS)


@given(logits)
def test_logsumexp_shifts_with_its_input(x):
  lse, lse_shifted = f64(logsumexp(x)), f64(logsumexp(x + SHIFT))
  tol = 4 * F32_EPS * (np.abs(lse) + np.abs(lse_shifted) + 100) + SHIFT_ROUNDING
  np.testing.assert_allclose(lse_shifted - lse, 50.0, rtol=0, atol=tol.max())


@given(logits_and_mask())
def test_masked_logsumexp_matches_float64_and_gradient_is_a_distribution(args):
  x, where = args
  lse = f64(masked_logsumexp(x, where))
  empty = ~where.any(-1)
  assert np.all(lse[empty] == -np.inf)
  x64 = np.where(where, x.astype(np.float64), -np.inf)
  full = ~empty
  if full.any():
    m = x64[full].max(-1)
    ref = m + np.log(np.exp(x64[full] - m[:, None]).sum(-1))
    tol = 4 * F32_EPS * np.maximum(np.abs(ref), np.abs(m)) + 2 * F32_EPS
    assert np.all(np.abs(lse[full] - ref) <= tol), (lse[full], ref)
  grad = f64(logsumexp_grad(x, where))
  assert np.all(grad >= 0) and np.all(grad[~where] == 0.0)
  np.testing.assert_allclose(grad.sum(-1), np.where(empty, 0.0, 1.0), atol=1e-6 + 16 * F32_EPS)


# ------------------------------------------------------------------------------ sigmoid


@given(values)
def test_sigmoid_is_symmetric_and_in_unit_interval(x):
  s, s_neg = f64(sigmoid(x)), f64(sigmoid(-x))
  assert np.all((s >= 0) & (s <= 1))
  # sigma(x) + sigma(-x) = 1: each side is within a few ulp of the larger term.
  np.testing.assert_allclose(s + s_neg, 1.0, rtol=0, atol=2 * F32_EPS)


@given(values)
def test_sigmoid_matches_float64(x):
  s = f64(sigmoid(x))
  ref = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  assert np.all(np.abs(s - ref) <= 4 * F32_EPS * ref + F32_TINY)


@given(values)
def test_log_sigmoid_is_nonpositive_and_log_of_sigmoid(x):
  ls, s = f64(log_sigmoid(x)), f64(sigmoid(x))
  assert np.all(ls <= 0)
  ref = -np.logaddexp(0.0, -x.astype(np.float64))
  assert np.all(np.abs(ls - ref) <= 4 * F32_EPS * np.abs(ref) + F32_TINY)
  normal = s >= F32_TINY
  np.testing.assert_allclose(ls[normal], np.log(s[normal]), rtol=8 * F32_EPS, atol=4 * F32_EPS)


@given(values)
def test_sigmoid_gradients_are_finite_and_positive_where_normal(x):
  grad = f64(sigmoid_grad(x))
  e = np.exp(-np.abs(x.astype(np.float64)))
  ref = e / (1 + e) ** 2
  assert np.all(np.isfinite(grad))
  assert np.all(np.abs(grad - ref) <= 6 * F32_EPS * ref + F32_TINY)
  assert np.all(grad[ref >= F32_TINY] > 0)
  lgrad = f64(log_sigmoid_grad(x))
  # d/dx log sigma(x) = sigma(-x), in [0, 1]
  np.testing.assert_allclose(lgrad, 1.0 / (1.0 + np.exp(x.astype(np.float64))),
                             rtol=4 * F32_EPS, atol=F32_TINY)

