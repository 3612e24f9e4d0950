"""jaxactv.sigmoid and jaxactv.log_sigmoid against float64 NumPy, hand values and the twins.

Every expected number is computed independently of the op under test: the textbook
formula in float64 NumPy, hand arithmetic, or the plain-autodiff twin in
``jaxactv.reference``. Everything runs under ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxactv
from jaxactv import reference

F32_EPS = float(np.finfo(np.float32).eps)
F32_TINY = float(np.finfo(np.float32).tiny)

OPS = {
    "sigmoid": (jaxactv.sigmoid, reference.sigmoid),
    "log_sigmoid": (jaxactv.log_sigmoid, reference.log_sigmoid),
}

HALF = {
    # dtype: (eps, smallest normal)
    jnp.bfloat16: (2.0**-7, float(jnp.finfo(jnp.bfloat16).tiny)),
    jnp.float16: (2.0**-10, float(jnp.finfo(jnp.float16).tiny)),
}


# ------------------------------------------------------------------ float64 references


def np_sigmoid(x):
  """1 / (1 + e^-x) in float64: the textbook formula, accurate in both tails."""
  x = np.asarray(x, np.float64)
  with np.errstate(over="ignore"):
    return 1.0 / (1.0 + np.exp(-x))


def np_log_sigmoid(x):
  """log(1 / (1 + e^-x)) = -log(1 + e^-x), in float64."""
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_sigmoid_grad(x):
  """sigma'(x) = e^-|x| / (1 + e^-|x|)^2 in float64."""
  e = np.exp(-np.abs(np.asarray(x, np.float64)))
  return e / (1.0 + e) ** 2


def np_log_sigmoid_grad(x):
  """d/dx log sigma(x) = sigma(-x) in float64."""
  return np_sigmoid(-np.asarray(x, np.float64))


NP = {
    "sigmoid": (np_sigmoid, np_sigmoid_grad),
    "log_sigmoid": (np_log_sigmoid, np_log_sigmoid_grad),
}


def assert_ulp_close(got, ref, ulps, eps=F32_EPS, tiny=F32_TINY):
  """|got - ref| <= ulps * eps * |ref| + tiny, elementwise; infinities and NaNs must match.

  The absolute ``tiny`` (the smallest normal number) admits results that the backend
  flushes to zero: XLA:CPU does not keep subnormals.
  """
  got = np.asarray(np.asarray(got).astype(np.float32), np.float64)
  ref = np.asarray(ref, np.float64)
  same = (got == ref) | (np.isnan(got) & np.isnan(ref))
  with np.errstate(invalid="ignore"):
    ratio = np.where(same, 0.0, np.abs(got - ref) / (ulps * eps * np.abs(ref) + tiny))
  ratio = np.where(np.isnan(ratio), np.inf, ratio)
  worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.ndim else ()
  assert ratio.max() <= 1.0, (
      f"off by {ratio.max():.2f} x the tolerance of {ulps} ulp at {worst}: "
      f"got {got[worst]!r}, expected {ref[worst]!r}"
  )


def value_and_vjp(fn, x, ct):
  """(fn(x), d<fn(x), ct>/dx), all under jit."""

  @jax.jit
  def run(x, ct):
    y, pullback = jax.vjp(fn, x)
    return y, pullback(ct)[0]

  return run(x, ct)


# ----------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", sorted(OPS))
def test_is_a_custom_vjp(name):
  fn, _ = OPS[name]
  jaxpr = jax.make_jaxpr(fn)(jnp.ones((3,), jnp.float32))
  assert "custom_vjp_call" in str(jaxpr)


@pytest.mark.parametrize("name", sorted(OPS))
def test_forward_mode_raises_on_op_and_works_on_twin(name):
  fn, ref_fn = OPS[name]
  _, np_grad = NP[name]
  x = jnp.array([-3.0, -0.5, 0.25, 0.5, 3.0], jnp.float32)
  t = jnp.array([1.0, -2.0, 0.5, 3.0, -1.0], jnp.float32)
  with pytest.raises(TypeError):
    jax.jit(lambda x, t: jax.jvp(fn, (x,), (t,)))(x, t)
  _, tangent_out = jax.jit(lambda x, t: jax.jvp(ref_fn, (x,), (t,)))(x, t)
  np.testing.assert_allclose(tangent_out, np_grad(x) * np.asarray(t), rtol=4 * F32_EPS, atol=0)


@pytest.mark.parametrize("name", sorted(OPS))
def test_reference_twin_derivative_at_zero(name):
  # sigma'(0) = 1/4 and (log sigma)'(0) = sigma(0) = 1/2, by hand. x = 0 is where the
  # twins' min(x, 0) and |x| have kinks that must cancel in the derivative.
  _, ref_fn = OPS[name]
  expected = {"sigmoid": 0.25, "log_sigmoid": 0.5}[name]
  zero, one = jnp.float32(0.0), jnp.float32(1.0)
  _, tangent = jax.jit(lambda x, t: jax.jvp(ref_fn, (x,), (t,)))(zero, one)
  assert float(tangent) == expected
  assert float(jax.jit(jax.grad(ref_fn))(zero)) == expected


# ----------------------------------------------------------------- hand-checked values


def test_sigmoid_hand_values():
  x = np.array([2.0, 3.0, 5.0, 6.0])
  got = jax.jit(jaxactv.sigmoid)(jnp.asarray(x, jnp.float32))
  expected = 1.0 / (1.0 + np.exp(-x))
  np.testing.assert_allclose(got, expected, rtol=2 * F32_EPS, atol=0)
  # The same numbers worked by hand to 4 decimals.
  np.testing.assert_allclose(got, [0.8808, 0.9526, 0.9933, 0.9975], atol=1e-4)


def test_sigmoid_at_zero_is_one_half_with_gradient_one_quarter():
  y, dx = value_and_vjp(jaxactv.sigmoid, jnp.float32(0.0), jnp.float32(1.0))
  assert float(y) == 0.5
  assert float(dx) == 0.25


def test_log_sigmoid_at_zero_is_minus_log_two_with_gradient_one_half():
  y, dx = value_and_vjp(jaxactv.log_sigmoid, jnp.float32(0.0), jnp.float32(1.0))
  np.testing.assert_allclose(y, -np.log(2.0), rtol=F32_EPS)
  assert float(dx) == 0.5


# -------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape", [(7, 1031), (3, 5, 11), ()])
@pytest.mark.parametrize("name", sorted(OPS))
def test_float32_values_within_few_ulp_of_float64(name, shape):
  fn, _ = OPS[name]
  np_fn, _ = NP[name]
  x = np.random.default_rng(0).uniform(-100.0, 100.0, shape).astype(np.float32)
  got = jax.jit(fn)(x)
  assert got.dtype == jnp.float32 and got.shape == shape
  assert_ulp_close(got, np_fn(x), ulps=4)


@pytest.mark.parametrize("name", sorted(OPS))
def test_float32_gradients_within_few_ulp_of_float64(name):
  fn, _ = OPS[name]
  _, np_grad = NP[name]
  rng = np.random.default_rng(1)
  # Up to |x| = 85 the derivative e^-|x| / (1 + e^-|x|)^2 is a normal float32 number.
  x = rng.uniform(-85.0, 85.0, (7, 1031)).astype(np.float32)
  ct = rng.normal(size=(7, 1031)).astype(np.float32)
  _, dx = value_and_vjp(fn, x, ct)
  assert dx.dtype == jnp.float32
  assert_ulp_close(dx, np_grad(x) * ct.astype(np.float64), ulps=6)


@pytest.mark.parametrize("name", sorted(OPS))
def test_values_and_vjp_match_reference_twin(name):
  fn, ref_fn = OPS[name]
  rng = np.random.default_rng(2)
  x = rng.normal(scale=6.0, size=(5, 13, 3)).astype(np.float32)
  ct = rng.normal(size=x.shape).astype(np.float32)
  y, dx = value_and_vjp(fn, x, ct)
  y_ref, dx_ref = value_and_vjp(ref_fn, x, ct)
  np.testing.assert_allclose(y, y_ref, rtol=4 * F32_EPS, atol=0)
  np.testing.assert_allclose(dx, dx_ref, rtol=8 * F32_EPS, atol=F32_TINY)


# -------------------------------------------------------------------------- the tails


@pytest.mark.parametrize("x", [17.0, -17.0, 30.0, -30.0, 80.0, -80.0])
def test_sigmoid_tail_gradient_is_accurate(x):
  dx = jax.jit(jax.grad(jaxactv.sigmoid))(jnp.float32(x))
  e = np.exp(-abs(x))
  truth = e / (1.0 + e) ** 2
  assert truth > 0
  np.testing.assert_allclose(float(dx), truth, rtol=1e-3)


def test_jax_nn_sigmoid_gradient_vanishes_at_17():
  # Why the custom rule exists: s * (1 - s) with s rounded to 1 is exactly 0 ...
  assert float(jax.jit(jax.grad(jax.nn.sigmoid))(jnp.float32(17.0))) == 0.0
  # ... while the true derivative, 4.14e-8, is a normal float32 number.
  dx = float(jax.jit(jax.grad(jaxactv.sigmoid))(jnp.float32(17.0)))
  np.testing.assert_allclose(dx, 4.139937718785167e-08, rtol=1e-3)


@pytest.mark.parametrize(
    "x, value, grad",
    [(1000.0, 0.0, 0.0), (-1000.0, -1000.0, 1.0)],
)
def test_log_sigmoid_exact_at_plus_minus_1000(x, value, grad):
  y, dx = value_and_vjp(jaxactv.log_sigmoid, jnp.float32(x), jnp.float32(1.0))
  assert float(y) == value
  assert np.isfinite(float(dx)) and float(dx) == grad


@pytest.mark.parametrize(
    "name, x, value, grad",
    [
        ("sigmoid", np.inf, 1.0, 0.0),
        ("sigmoid", -np.inf, 0.0, 0.0),
        ("log_sigmoid", np.inf, 0.0, 0.0),
        ("log_sigmoid", -np.inf, -np.inf, 1.0),
    ],
)
def test_infinities(name, x, value, grad):
  fn, _ = OPS[name]
  y, dx = value_and_vjp(fn, jnp.float32(x), jnp.float32(1.0))
  assert float(y) == value
  assert float(dx) == grad
  # grad of a sum agrees with the vjp
  assert float(jax.jit(jax.grad(fn))(jnp.float32(x))) == grad


@pytest.mark.parametrize("name", sorted(OPS))
def test_nan_stays_in_its_own_element(name):
  fn, _ = OPS[name]
  np_fn, np_grad = NP[name]
  x = np.array([-2.0, np.nan, 0.5, 40.0], np.float32)
  y, dx = value_and_vjp(fn, x, jnp.ones(4, jnp.float32))
  y, dx = np.asarray(y), np.asarray(dx)
  assert np.isnan(y[1]) and np.isnan(dx[1])
  ok = np.array([0, 2, 3])
  np.testing.assert_allclose(y[ok], np_fn(x[ok]), rtol=4 * F32_EPS)
  np.testing.assert_allclose(dx[ok], np_grad(x[ok]), rtol=4 * F32_EPS)


# -------------------------------------------------------------------- dtypes & inputs


@pytest.mark.parametrize("dtype", sorted(HALF, key=str), ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_half_precision_values_and_gradients(name, dtype):
  fn, _ = OPS[name]
  np_fn, np_grad = NP[name]
  eps, tiny = HALF[dtype]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(-20.0, 20.0, (9, 130)), dtype)
  ct = jnp.asarray(rng.normal(size=(9, 130)), dtype)
  y, dx = value_and_vjp(fn, x, ct)
  assert y.dtype == dtype and dx.dtype == dtype
  # The reference sees exactly the half-precision values the op saw.
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  ct64 = np.asarray(ct.astype(jnp.float32), np.float64)
  assert_ulp_close(y, np_fn(x64), ulps=1, eps=eps, tiny=tiny)
  assert_ulp_close(dx, np_grad(x64) * ct64, ulps=1, eps=eps, tiny=tiny)


@pytest.mark.parametrize("name", sorted(OPS))
def test_float64_under_enable_x64(name):
  fn, _ = OPS[name]
  np_fn, np_grad = NP[name]
  x = np.random.default_rng(4).uniform(-30.0, 30.0, (6, 17))
  x[0, 0] = 1e-10  # sigmoid(1e-10) = 0.5 + 2.5e-11: lost in float32, kept in float64
  with jax.enable_x64(True):
    xj = jnp.asarray(x, jnp.float64)
    y, dx = value_and_vjp(fn, xj, jnp.ones_like(xj))
    assert y.dtype == jnp.float64 and dx.dtype == jnp.float64
    np.testing.assert_allclose(y, np_fn(x), rtol=1e-14, atol=0)
    np.testing.assert_allclose(dx, np_grad(x), rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", sorted(OPS))
def test_integer_input_is_promoted_like_float(name):
  fn, _ = OPS[name]
  np_fn, _ = NP[name]
  ints = jnp.arange(-4, 5, dtype=jnp.int32)
  got = jax.jit(fn)(ints)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, jax.jit(fn)(ints.astype(jnp.float32)))
  np.testing.assert_allclose(got, np_fn(np.arange(-4, 5)), rtol=2 * F32_EPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_complex_input_raises_type_error(name):
  fn, _ = OPS[name]
  with pytest.raises(TypeError, match="real floating"):
    jax.jit(fn)(jnp.ones((3,), jnp.complex64))


# ------------------------------------------------------------------ transformations


@pytest.mark.parametrize("name", sorted(OPS))
def test_vmap_equals_batch(name):
  fn, _ = OPS[name]
  np_fn, _ = NP[name]
  x = np.random.default_rng(5).normal(scale=5.0, size=(4, 3, 7)).astype(np.float32)
  batched = jax.jit(jax.vmap(fn))(x)
  np.testing.assert_array_equal(batched, jax.jit(fn)(x))
  np.testing.assert_allclose(batched, np_fn(x), rtol=4 * F32_EPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_reverse_over_reverse_matches_reference_hessian(name):
  fn, ref_fn = OPS[name]
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(scale=3.0, size=6), jnp.float32)
  c = jnp.asarray(rng.normal(size=6), jnp.float32)
  hess = jax.jit(jax.jacrev(jax.jacrev(lambda x: (fn(x) * c).sum())))(x)
  ref_hess = jax.jit(jax.hessian(lambda x: (ref_fn(x) * c).sum()))(x)
  assert hess.shape == (6, 6)
  np.testing.assert_allclose(hess, ref_hess, rtol=1e-5, atol=1e-7)
  # Elementwise ops have a diagonal Hessian, nonzero where c is.
  assert np.all(np.abs(np.diag(np.asarray(hess))) > 0)
