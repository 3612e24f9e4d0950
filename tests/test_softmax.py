"""jaxactv.softmax, log_softmax and logsumexp against float64 NumPy, hand values and the twins.

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
F64_EPS = float(np.finfo(np.float64).eps)

NAMES = ("softmax", "log_softmax", "logsumexp")
OPS = {name: getattr(jaxactv, name) for name in NAMES}
# These tests were written for a reduction over the last axis by default, with
# (x, axis, where) positional; logsumexp now has jax.nn's signature (axis=None, b third).
OPS["logsumexp"] = lambda x, axis=-1, where=None, keepdims=False: jaxactv.logsumexp(
    x, axis, keepdims=keepdims, where=where)
REFS = {name: getattr(reference, name) for name in NAMES}
REFS["logsumexp"] = lambda x, axis=-1, where=None, keepdims=False: reference.logsumexp(
    x, axis, keepdims=keepdims, where=where)

HALF = {
    # dtype: (eps, smallest normal)
    jnp.bfloat16: (2.0**-7, float(jnp.finfo(jnp.bfloat16).tiny)),
    jnp.float16: (2.0**-10, float(jnp.finfo(jnp.float16).tiny)),
}

# (shape, axis): an unaligned 2-D shape over either axis, and a 3-D shape with a tuple axis.
CASES = [((7, 1031), -1), ((7, 1031), 0), ((6, 5, 9), (0, 2))]
CASE_IDS = ["7x1031-last", "7x1031-first", "6x5x9-axes02"]


def axes_of(axis, ndim):
  axis = (axis,) if isinstance(axis, int) else axis
  return tuple(sorted(a % ndim for a in axis))


# ------------------------------------------------------------------ float64 references


def np_masked(x, where=None):
  x = np.asarray(x, np.float64)
  return x if where is None else np.where(where, x, -np.inf)


def np_row_max(x, axes):
  return np.max(x, axis=axes, keepdims=True)


def np_softmax(x, axes, where=None):
  """e^(x - max) / sum e^(x - max), in float64, for rows with a finite max."""
  z = np_masked(x, where)
  e = np.exp(z - np_row_max(z, axes))
  return e / e.sum(axis=axes, keepdims=True)


def np_log_softmax(x, axes, where=None):
  """(x - max) - log sum e^(x - max), in float64, for rows with a finite max."""
  z = np_masked(x, where)
  s = z - np_row_max(z, axes)
  return s - np.log(np.exp(s).sum(axis=axes, keepdims=True))


def np_logsumexp(x, axes, where=None, keepdims=False):
  """max + log sum e^(x - max), in float64, for rows with a finite max."""
  z = np_masked(x, where)
  m = np_row_max(z, axes)
  out = m + np.log(np.exp(z - m).sum(axis=axes, keepdims=True))
  return out if keepdims else np.squeeze(out, axes)


def np_vjp(name, x, ct, axes, where=None):
  """The textbook vector-Jacobian products in float64, for rows with a finite max."""
  ct = np.asarray(ct, np.float64)
  s = np_softmax(x, axes, where)
  if name == "softmax":
    return s * (ct - (ct * s).sum(axis=axes, keepdims=True))
  if name == "log_softmax":
    if where is not None:
      ct = np.where(where, ct, 0.0)
    return ct - s * ct.sum(axis=axes, keepdims=True)
  return np.expand_dims(ct, axes) * s


NP = {"softmax": np_softmax, "log_softmax": np_log_softmax, "logsumexp": np_logsumexp}


def f64(a):
  """Any float array (bfloat16 and float16 included) as float64 NumPy, exactly."""
  return np.asarray(a).astype(np.float64)


def assert_within(got, ref, tol, what=""):
  """|got - ref| <= tol elementwise; equal infinities and NaN positions count as equal."""
  got, ref = f64(got), np.asarray(ref, np.float64)
  tol = np.broadcast_to(tol, ref.shape)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  same = (got == ref) | (np.isnan(got) & np.isnan(ref))
  with np.errstate(invalid="ignore"):
    ratio = np.where(same, 0.0, np.abs(got - ref) / tol)
  ratio = np.where(np.isnan(ratio), np.inf, ratio)
  worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.ndim else ()
  assert ratio.max() <= 1.0, (
      f"{what}: off by {ratio.max():.3g} x the tolerance at {worst}: got {got[worst]!r}, "
      f"expected {ref[worst]!r} (tolerance {tol[worst]!r}, {(ratio > 1).sum()} violations)"
  )


def value_tolerance(name, x, axes, ref, where=None, eps=F32_EPS, tiny=F32_TINY):
  """The accuracy each op promises, elementwise, for finite rows.

  softmax's relative error is ~ |x_i - max| * eps (the condition number of exp);
  log_softmax has a few ulp relative plus an absolute ~ulp of 1.0 near 0 (documented);
  logsumexp a few ulp relative to max(|lse|, |max|) (m + log(sum) cancels when
  lse ~ 0) plus, like log_softmax, ~ulp of 1.0 absolute: log of a sum rounded near 1.
  """
  ref = np.abs(np.asarray(ref, np.float64))
  z = np_masked(x, where)
  with np.errstate(invalid="ignore"):
    gap = np.nan_to_num(np.abs(z - np_row_max(z, axes)), posinf=0.0)
  if name == "softmax":
    return 8 * eps * (1 + gap) * ref + tiny
  if name == "log_softmax":
    return 4 * eps + 4 * eps * ref
  row_max = np.abs(np.squeeze(np_row_max(z, axes), axes))
  return 4 * eps * np.maximum(ref, row_max) + 2 * eps


def assert_values(name, got, x, axes, where=None, what=""):
  """got == the float64 formula on x within the tolerance each op promises in float32."""
  ref = NP[name](x, axes, where)
  assert_within(got, ref, value_tolerance(name, x, axes, ref, where), what or name)


def run_vjp(fn, x, ct, **kwargs):
  """(fn(x, **kwargs), d<fn, ct>/dx) under jit."""

  @jax.jit
  def run(x, ct):
    y, pullback = jax.vjp(lambda x: fn(x, **kwargs), x)
    return y, pullback(ct)[0]

  return run(x, ct)


def random_ct(rng, name, shape, axes):
  out_shape = shape if name != "logsumexp" else tuple(
      d for i, d in enumerate(shape) if i not in axes
  )
  return rng.normal(size=out_shape).astype(np.float32)


def partial_mask(rng, shape, axes, p=0.4):
  """A random mask that masks out about p of every row but keeps at least one entry."""
  where = rng.uniform(size=shape) > p
  # Keep each row's first entry (index 0 along every reduced axis).
  first = tuple(slice(0, 1) if i in axes else slice(None) for i in range(len(shape)))
  where[first] = True
  return where


# ----------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", NAMES)
def test_is_a_custom_vjp(name):
  jaxpr = jax.make_jaxpr(OPS[name])(jnp.ones((2, 3), jnp.float32))
  assert "custom_vjp_call" in str(jaxpr)


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_raises_on_op_and_works_on_twin(name):
  rng = np.random.default_rng(10)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  t = rng.normal(size=(3, 5)).astype(np.float32)
  with pytest.raises(TypeError):
    jax.jit(lambda x, t: jax.jvp(OPS[name], (x,), (t,)))(x, t)
  _, tangent = jax.jit(lambda x, t: jax.jvp(REFS[name], (x,), (t,)))(x, t)
  s, t64 = np_softmax(x, (1,)), t.astype(np.float64)
  st = (s * t64).sum(-1, keepdims=True)
  expected = {"softmax": s * (t64 - st), "log_softmax": t64 - st, "logsumexp": st[:, 0]}[name]
  np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- hand-checked values


def test_softmax_hand_values():
  x = np.array([2.0, 1.0, 0.1])
  got = jax.jit(jaxactv.softmax)(jnp.asarray(x, jnp.float32))
  e = np.exp(x)
  np.testing.assert_allclose(got, e / e.sum(), rtol=4 * F32_EPS, atol=0)
  np.testing.assert_allclose(got, [0.659, 0.242, 0.099], atol=1e-3)


def test_log_softmax_and_logsumexp_hand_values():
  # log(e^0 + e^0) = log 2; each half has log-probability -log 2.
  x = jnp.zeros((2,), jnp.float32)
  np.testing.assert_allclose(jax.jit(OPS['logsumexp'])(x), np.log(2.0), rtol=F32_EPS)
  np.testing.assert_allclose(jax.jit(jaxactv.log_softmax)(x), [-np.log(2.0)] * 2, rtol=F32_EPS)
  # logsumexp([1000, 1000]) = 1000 + log 2, without overflow.
  big = jnp.full((2,), 1000.0, jnp.float32)
  np.testing.assert_allclose(jax.jit(OPS['logsumexp'])(big), 1000.0 + np.log(2.0), rtol=F32_EPS)


@pytest.mark.parametrize("level", [0.0, 63.0, -63.0, 1000.0])
def test_log_softmax_of_equal_logits_is_minus_log_n(level):
  # By hand: n equal logits have probability 1/n each, log-probability -log(n), whatever
  # their common value; logsumexp is level + log(n).
  x = jnp.full((3,), level, jnp.float32)
  logp = jax.jit(jaxactv.log_softmax)(x)
  np.testing.assert_allclose(logp, [-np.log(3.0)] * 3, rtol=4 * F32_EPS, atol=4 * F32_EPS)
  np.testing.assert_allclose(jax.jit(jaxactv.softmax)(x), [1 / 3] * 3, rtol=2 * F32_EPS)
  lse = jax.jit(OPS['logsumexp'])(x)
  np.testing.assert_allclose(lse, level + np.log(3.0), rtol=2 * F32_EPS, atol=2 * F32_EPS)


def test_two_class_softmax_is_sigmoid_of_difference():
  rng = np.random.default_rng(11)
  ab = rng.uniform(-6.0, 6.0, (64, 2)).astype(np.float32)
  a, b = ab[:, 0].astype(np.float64), ab[:, 1].astype(np.float64)
  expected = 1.0 / (1.0 + np.exp(b - a))
  p = jax.jit(jaxactv.softmax)(ab)[:, 0]
  s = jax.jit(jaxactv.sigmoid)(ab[:, 0] - ab[:, 1])
  tol = 8 * F32_EPS * (1 + np.abs(a - b)) * expected
  assert_within(p, expected, tol, "softmax([a, b])[0]")
  assert_within(s, expected, tol, "sigmoid(a - b)")
  assert_within(p, f64(s), 2 * tol, "softmax([a, b])[0] vs sigmoid(a - b)")


def test_softmax_jacobian_is_diag_minus_outer():
  x = np.array([0.3, -1.2, 2.5, 0.0, 1.1], np.float32)
  jac = jax.jit(jax.jacrev(jaxactv.softmax))(x)
  s = np_softmax(x, (0,))
  np.testing.assert_allclose(jac, np.diag(s) - np.outer(s, s), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape, axis", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_float32_values_match_float64(name, shape, axis):
  axes = axes_of(axis, len(shape))
  x = np.random.default_rng(12).uniform(-100.0, 100.0, shape).astype(np.float32)
  got = jax.jit(lambda x: OPS[name](x, axis=axis))(x)
  assert got.dtype == jnp.float32
  assert_values(name, got, x, axes)


@pytest.mark.parametrize("shape, axis", CASES, ids=CASE_IDS)
def test_softmax_rows_sum_to_one(shape, axis):
  axes = axes_of(axis, len(shape))
  x = np.random.default_rng(13).uniform(-100.0, 100.0, shape).astype(np.float32)
  p = f64(jax.jit(lambda x: jaxactv.softmax(x, axis=axis))(x))
  assert np.all(p >= 0) and np.all(p <= 1)
  np.testing.assert_allclose(p.sum(axis=axes), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_shift_invariance(name):
  # Multiples of 2^-10 in [-100, 100]: x + 50 is exact in float32.
  rng = np.random.default_rng(14)
  x = (np.round(rng.uniform(-100.0, 100.0, (7, 1031)) * 1024) / 1024).astype(np.float32)
  shifted = x + np.float32(50.0)
  assert np.array_equal(shifted.astype(np.float64), x.astype(np.float64) + 50.0)
  got = jax.jit(OPS[name])(shifted)
  ref = NP[name](x, (1,)) + (50.0 if name == "logsumexp" else 0.0)
  assert_within(got, ref, value_tolerance(name, shifted, (1,), ref), f"{name}(x + 50)")


def test_log_softmax_is_log_of_softmax_where_finite():
  x = np.random.default_rng(15).uniform(-100.0, 100.0, (7, 1031)).astype(np.float32)
  p = f64(jax.jit(jaxactv.softmax)(x))
  logp = f64(jax.jit(jaxactv.log_softmax)(x))
  normal = p >= F32_TINY
  assert normal.sum() > 1000 and (~normal).sum() > 100  # both regimes are exercised
  gap = np.abs(x - x.max(-1, keepdims=True))
  # log p inherits softmax's relative error; log_softmax has its own few-ulp error.
  tol = 8 * F32_EPS * (1 + gap) + 4 * F32_EPS * (1 + np.abs(logp)) + 1e-7
  assert_within(logp[normal], np.log(p[normal]), tol[normal], "log_softmax vs log(softmax)")
  # Where softmax underflows, log_softmax is still finite and below log(tiny).
  assert np.all(np.isfinite(logp)) and np.all(logp[~normal] < np.log(F32_TINY) + 1e-3)


@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_tuple_axis_and_keepdims(keepdims):
  x = np.random.default_rng(16).normal(scale=4.0, size=(3, 4, 5)).astype(np.float32)
  got = jax.jit(lambda x: jaxactv.logsumexp(x, axis=(0, 2), keepdims=keepdims))(x)
  assert got.shape == ((1, 4, 1) if keepdims else (4,))
  ref = np_logsumexp(x, (0, 2), keepdims=keepdims)
  np.testing.assert_allclose(got, ref, rtol=4 * F32_EPS)


def test_logsumexp_default_axis_is_none_as_in_jax_nn():
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  got = jax.jit(jaxactv.logsumexp)(x)
  assert got.shape == jax.nn.logsumexp(x).shape == ()
  np.testing.assert_allclose(got, np_logsumexp(x, (0, 1)), rtol=4 * F32_EPS)


# ------------------------------------------------------- values and vjps vs the twins

TWIN_CASES = [
    ((7, 1031), -1, None),
    ((7, 1031), 0, None),
    ((6, 5, 9), (0, 2), None),
    ((7, 1031), -1, "partial"),
    ((6, 5, 9), (0, 2), "partial"),
    ((7, 1031), -1, "broadcast"),
]
TWIN_IDS = ["7x1031", "7x1031-axis0", "6x5x9-axes02", "7x1031-mask", "6x5x9-mask", "bcast-mask"]


@pytest.mark.parametrize("shape, axis, mask", TWIN_CASES, ids=TWIN_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_values_and_vjp_match_reference_twin(name, shape, axis, mask):
  axes = axes_of(axis, len(shape))
  rng = np.random.default_rng(18)
  x = rng.normal(scale=3.0, size=shape).astype(np.float32)
  ct = random_ct(rng, name, shape, axes)
  if mask == "partial":
    where = partial_mask(rng, shape, axes)
  elif mask == "broadcast":
    where = rng.uniform(size=(1, shape[-1])) > 0.3  # the same columns out in every row
    where[0, 0] = True
  else:
    where = None
  kwargs = {"axis": axis} if where is None else {"axis": axis, "where": jnp.asarray(where)}
  if name == "log_softmax" and where is not None:
    # Policy: a masked output is the constant -inf, so its cotangent goes nowhere; the
    # twin (like jax.nn) sends it into the other entries. Compare where they agree;
    # test_log_softmax_gradient_policy checks the masked cotangent itself.
    ct = np.where(where, ct, np.float32(0.0))
  y, dx = run_vjp(OPS[name], x, ct, **kwargs)
  y_ref, dx_ref = run_vjp(REFS[name], x, ct, **kwargs)
  assert y.dtype == dx.dtype == jnp.float32
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=2e-6)
  # And the gradient against the float64 formula.
  assert_within(dx, np_vjp(name, x, ct, axes, where), 2e-6 + 2e-5 * np.abs(f64(dx_ref)), name)
  if where is not None and name != "logsumexp":
    masked = np.broadcast_to(~where, shape)
    expected_masked = 0.0 if name == "softmax" else -np.inf
    assert np.all(f64(y)[masked] == expected_masked)
    assert np.all(f64(dx)[masked] == 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_reverse_over_reverse_matches_reference_hessian(name):
  rng = np.random.default_rng(19)
  for shape, axis in [((5,), -1), ((2, 3), (0, 1))]:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    c = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def scalar(f, x, axis=axis, c=c):
      y = f(x, axis=axis)
      return y.sum() if name == "logsumexp" else (y * c).sum()

    hess = jax.jit(jax.jacrev(jax.jacrev(lambda x: scalar(OPS[name], x))))(x)
    ref_hess = jax.jit(jax.hessian(lambda x: scalar(REFS[name], x)))(x)
    assert hess.shape == shape + shape
    assert np.abs(np.asarray(ref_hess)).max() > 1e-2  # a Hessian that is not trivially 0
    np.testing.assert_allclose(hess, ref_hess, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- infinities and masks


@pytest.mark.parametrize("name", NAMES)
def test_minus_inf_logit_gets_probability_zero_and_finite_gradient(name):
  rng = np.random.default_rng(20)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  x[0, 2] = -np.inf
  x[2, [0, 5]] = -np.inf
  finite = np.isfinite(x)
  ct = random_ct(rng, name, x.shape, (1,))
  y, dx = run_vjp(OPS[name], x, ct)
  y, dx = f64(y), f64(dx)
  assert np.all(np.isfinite(dx))
  if name == "softmax":
    assert np.all(y[~finite] == 0.0) and np.all(dx[~finite] == 0.0)
  elif name == "log_softmax":
    # Policy: log p stays -inf under any finite change of a -inf logit: gradient 0 there;
    # the other entries get the textbook g_i - p_i * sum(g).
    assert np.all(y[~finite] == -np.inf)
    np.testing.assert_array_equal(dx[~finite], 0.0)
  else:
    np.testing.assert_array_equal(dx[~finite], 0.0)
  # The float64 formulas handle -inf logits (e^-inf = 0) as long as each row has a finite max.
  assert_values(name, y, x, (1,))
  want = np_vjp(name, x, ct, (1,))
  np.testing.assert_allclose(dx[finite], want[finite], rtol=1e-5, atol=1e-7)


def test_log_softmax_gradient_policy():
  # Row 0: masked entries (cotangent must not leak). Row 1: an unmasked -inf logit
  # (gradient 0: its log-probability is -inf whatever x does). Row 2: all masked.
  # Row 3: all -inf.
  x = np.array(
      [[1.0, 2.0, 50.0, -1.0],
       [0.5, -np.inf, 1.5, 2.0],
       [1.0, 2.0, 3.0, 4.0],
       [-np.inf] * 4],
      np.float32,
  )
  where = np.array([[True, True, False, False], [True] * 4, [False] * 4, [True] * 4])
  ct = np.array([[0.3, -1.0, 7.0, 2.0], [1.0, 2.5, -0.5, 0.25], [1.0] * 4, [1.0] * 4],
                np.float32)
  y, dx = run_vjp(jaxactv.log_softmax, x, ct, where=jnp.asarray(where))
  y, dx = f64(y), f64(dx)
  # Row 0, by hand: p = softmax([1, 2]) on the two unmasked entries, cotangent [0.3, -1].
  p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
  np.testing.assert_allclose(y[0, :2], np.log(p), rtol=4 * F32_EPS, atol=4 * F32_EPS)
  assert np.all(y[0, 2:] == -np.inf)
  np.testing.assert_allclose(dx[0], [0.3 + 0.7 * p[0], -1.0 + 0.7 * p[1], 0.0, 0.0],
                             rtol=1e-6, atol=1e-7)
  # Row 1: 0 at the -inf logit; elsewhere g_i - p_i * sum(g), by hand.
  assert dx[1, 1] == 0.0 and y[1, 1] == -np.inf
  q = np.exp([0.5, 1.5, 2.0]) / np.exp([0.5, 1.5, 2.0]).sum()
  np.testing.assert_allclose(dx[1, [0, 2, 3]], ct[1, [0, 2, 3]] - q * ct[1].sum(), rtol=1e-6)
  # Rows 2 and 3: nothing to normalise: -inf values, zero gradients.
  assert np.all(y[2:] == -np.inf)
  np.testing.assert_array_equal(dx[2:], 0.0)


@pytest.mark.parametrize("kind", ["all -inf", "all masked", "all masked, huge logits"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_row_gives_limit_values_and_zero_gradient(name, kind):
  rng = np.random.default_rng(21)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  where = np.ones((3, 5), bool)
  if kind == "all -inf":
    x[1] = -np.inf
  else:
    where[1] = False
    if kind == "all masked, huge logits":
      x[1] = [1e30, 3e38, -3e38, 100.0, 0.0]
  kwargs = {} if kind == "all -inf" else {"where": jnp.asarray(where)}
  fn = lambda x: OPS[name](x, **kwargs)
  empty_value = 0.0 if name == "softmax" else -np.inf
  ct_shape = (3,) if name == "logsumexp" else (3, 5)
  for ct in (np.ones(ct_shape, np.float32), random_ct(rng, name, (3, 5), (1,))):
    y, dx = run_vjp(fn, x, ct)
    y, dx = f64(y), f64(dx)
    assert np.all(y[1] == empty_value), y[1]
    np.testing.assert_array_equal(dx[1], 0.0)
    ok = [0, 2]
    assert_values(name, y[ok], x[ok], (1,))
    np.testing.assert_allclose(dx[ok], np_vjp(name, x[ok], ct[ok], (1,)), rtol=1e-5, atol=1e-7)
  grad = f64(jax.jit(jax.grad(lambda x: fn(x).sum()))(x))
  assert not np.any(np.isnan(grad))
  np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_huge_masked_logit_does_not_poison_gradient(name):
  # jax issue 17117: x = [1, 1, 100] with the 100 masked out.
  x = jnp.array([1.0, 1.0, 100.0], jnp.float32)
  where = jnp.array([True, True, False])
  c = jnp.array([1.0, 2.0, 3.0], jnp.float32)
  fn = OPS[name]
  grad = f64(jax.jit(jax.grad(lambda x: (fn(x, where=where) * c).sum()))(x))
  assert np.all(np.isfinite(grad))
  # The reference on only the unmasked entries, and 0 for the masked one.
  ref2 = jax.jit(jax.grad(lambda x: (REFS[name](x) * c[:2]).sum()))(x[:2])
  np.testing.assert_allclose(grad, [*np.asarray(ref2), 0.0], rtol=1e-6, atol=1e-7)
  # By hand: p = [1/2, 1/2]; softmax: p_i (c_i - p.c) = [-1/4, 1/4]; log_softmax:
  # c_i - p_i * (c_1 + c_2) = [-1/2, 1/2].
  np.testing.assert_allclose(grad, {"softmax": [-0.25, 0.25, 0], "log_softmax": [-0.5, 0.5, 0]}
                             [name], atol=1e-7)


def test_huge_masked_logit_does_not_poison_logsumexp_gradient():
  x = jnp.array([1.0, 1.0, 100.0], jnp.float32)
  where = jnp.array([True, True, False])
  value, grad = jax.jit(jax.value_and_grad(lambda x: jaxactv.logsumexp(x, -1, where=where)))(x)
  np.testing.assert_allclose(value, 1.0 + np.log(2.0), rtol=2 * F32_EPS)
  np.testing.assert_allclose(grad, [0.5, 0.5, 0.0], atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_plus_inf_logits_share_probability(k):
  x = np.array([[1.0, -2.0, 0.5, 3.0, -np.inf, 7.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]], np.float32)
  inf_at = [0, 3, 5][:k]
  x[0, inf_at] = np.inf
  is_inf = np.zeros(6, bool)
  is_inf[inf_at] = True
  p = f64(jax.jit(jaxactv.softmax)(x))
  np.testing.assert_allclose(p[0], np.where(is_inf, 1.0 / k, 0.0), rtol=F32_EPS, atol=0)
  np.testing.assert_array_equal(p[0, ~is_inf], 0.0)
  logp = f64(jax.jit(jaxactv.log_softmax)(x))
  np.testing.assert_allclose(logp[0, is_inf], -np.log(k), rtol=F32_EPS, atol=0)
  assert np.all(logp[0, ~is_inf] == -np.inf)
  lse, dlse = jax.jit(jax.value_and_grad(lambda x: jaxactv.logsumexp(x, -1)[0]))(x)
  assert float(lse) == np.inf
  np.testing.assert_allclose(f64(dlse)[0], np.where(is_inf, 1.0 / k, 0.0), rtol=F32_EPS, atol=0)
  np.testing.assert_array_equal(f64(dlse)[1], 0.0)
  # The other row is untouched.
  assert_values("softmax", p[1:], x[1:], (1,))
  assert_values("log_softmax", logp[1:], x[1:], (1,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_plus_inf_row_beats_the_largest_finite_logits(dtype):
  # The finite logits sit one and two steps below the dtype's largest float, the
  # closest any finite logit comes to a +inf one: they still get probability 0 and
  # log-probability -inf (float16's step there is 32, so e**-32 must not survive).
  big = np.asarray(jnp.finfo(dtype).max, np.float64)
  below = np.nextafter(np.asarray(big, dtype), np.asarray(0, dtype)).astype(np.float64)
  two_below = np.nextafter(np.asarray(below, dtype), np.asarray(0, dtype)).astype(np.float64)
  x = jnp.asarray(np.array([[below, np.inf, two_below, 0.0, np.inf, -big]]), dtype)
  is_inf = np.array([False, True, False, False, True, False])
  p = f64(jax.jit(jaxactv.softmax)(x))
  np.testing.assert_array_equal(p[0], np.where(is_inf, 0.5, 0.0))
  logp = f64(jax.jit(jaxactv.log_softmax)(x))
  np.testing.assert_allclose(logp[0, is_inf], -np.log(2.0), rtol=2.0**-7)
  assert np.all(logp[0, ~is_inf] == -np.inf), logp
  # Without a +inf, a row whose max is the largest float is an ordinary row: float64
  # NumPy's log-softmax, and the gradient of one entry is e_j - softmax.
  finite = jnp.asarray(np.array([[big, below, 0.0]]), dtype)
  xf = f64(finite)
  want = xf - xf.max() - np.log(np.sum(np.exp(xf - xf.max())))
  # (Near 0 the error is about an ulp of 1.0, as the log_softmax docstring says.)
  np.testing.assert_allclose(f64(jax.jit(jaxactv.log_softmax)(finite)), want, rtol=2.0**-7,
                             atol=2.0**-10)
  grad = jax.jit(jax.grad(lambda x: jaxactv.log_softmax(x)[0, 1].astype(jnp.float32)))(finite)
  np.testing.assert_allclose(f64(grad)[0], np.eye(3)[1] - np.exp(want[0]), atol=2.0**-7)


def test_jax_nn_softmax_is_nan_on_plus_inf_row():
  # What the +inf policy improves on: jax.nn gives a NaN row (inf - inf).
  p = jax.jit(jax.nn.softmax)(jnp.array([np.inf, 1.0, 2.0], jnp.float32))
  assert np.all(np.isnan(np.asarray(p)))


@pytest.mark.parametrize("name", NAMES)
def test_masked_plus_inf_and_nan_are_left_out(name):
  x = np.array([[np.inf, 1.0, 2.0], [np.nan, 1.0, 2.0]], np.float32)
  where = np.array([[False, True, True]] * 2)
  ct = random_ct(np.random.default_rng(22), name, x.shape, (1,))
  y, dx = run_vjp(OPS[name], x, ct, where=jnp.asarray(where))
  y, dx = f64(y), f64(dx)
  assert not np.any(np.isnan(y)) and np.all(np.isfinite(dx))
  clean = np.where(where, x, 0.0)  # the masked entry's value must not matter
  assert_values(name, y, clean, (1,), where)
  np.testing.assert_allclose(dx, np_vjp(name, clean, ct, (1,), where), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_nan_poisons_only_its_own_row(name):
  rng = np.random.default_rng(23)
  x = rng.normal(size=(4, 7)).astype(np.float32)
  x[2, 3] = np.nan
  ct = random_ct(rng, name, x.shape, (1,))
  y, dx = run_vjp(OPS[name], x, ct)
  y, dx = f64(y), f64(dx)
  assert np.all(np.isnan(y[2])) and np.all(np.isnan(dx[2]))
  ok = [0, 1, 3]
  assert_values(name, y[ok], x[ok], (1,))
  np.testing.assert_allclose(dx[ok], np_vjp(name, x[ok], ct[ok], (1,)), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------- dtypes & inputs


def half_grad_tolerance(name, x64, ct64, eps, tiny):
  """Error bound for a backward pass fed half-precision residuals and cotangents."""
  s = np_softmax(x64, (1,))
  a = np.abs(ct64)
  if name == "softmax":
    scale = s * (a + (a * s).sum(-1, keepdims=True))
  elif name == "log_softmax":
    # The accelerator form keeps y = log p, rounded to half: exp(y) is off by ~|y| * eps
    # relative (the CPU form keeps x and rebuilds p from it, which is tighter).
    scale = a + s * (2 + np.abs(np.log(s))) * a.sum(-1, keepdims=True)
  else:
    scale = np.expand_dims(a, 1) * s
  return 2 * eps * scale + tiny


@pytest.mark.parametrize("dtype", sorted(HALF, key=str), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_values_and_gradients(name, dtype):
  eps, tiny = HALF[dtype]
  rng = np.random.default_rng(24)
  x = jnp.asarray(rng.normal(scale=3.0, size=(5, 67)), dtype)
  ct = jnp.asarray(random_ct(rng, name, (5, 67), (1,)), dtype)
  y, dx = run_vjp(OPS[name], x, ct)
  assert y.dtype == dtype and dx.dtype == dtype
  # The references see exactly the half-precision values the op saw.
  x64, ct64 = f64(x), f64(ct)
  ref = NP[name](x64, (1,))
  value_tol = eps * np.abs(ref) + (eps if name == "log_softmax" else tiny)
  assert_within(y, ref, value_tol, f"{name} value in {dtype.__name__}")
  assert_within(dx, np_vjp(name, x64, ct64, (1,)), half_grad_tolerance(name, x64, ct64, eps, tiny),
                f"{name} gradient in {dtype.__name__}")


@pytest.mark.parametrize("name", NAMES)
def test_float16_large_arrays_have_finite_gradients(name):
  # jax issue 40409: float16 arrays with >= 2**16 elements.
  rng = np.random.default_rng(25)
  x = jnp.asarray(rng.normal(size=(4, 2**15)), jnp.float16)
  w = jnp.asarray(random_ct(rng, name, (4, 2**15), (1,)), jnp.float16)
  grad = jax.jit(jax.grad(lambda x: (OPS[name](x).astype(jnp.float32) * w).sum()))(x)
  assert grad.dtype == jnp.float16 and grad.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(grad)))
  eps, tiny = HALF[jnp.float16]
  x64, w64 = f64(x), f64(w)
  assert_within(grad, np_vjp(name, x64, w64, (1,)), half_grad_tolerance(name, x64, w64, eps, tiny),
                f"{name} float16 gradient")


@pytest.mark.parametrize("name", NAMES)
def test_float64_under_enable_x64(name):
  rng = np.random.default_rng(26)
  x = rng.normal(scale=3.0, size=(6, 33))
  ct = random_ct(rng, name, x.shape, (1,)).astype(np.float64)
  with jax.enable_x64(True):
    y, dx = run_vjp(OPS[name], jnp.asarray(x, jnp.float64), jnp.asarray(ct, jnp.float64))
    assert y.dtype == jnp.float64 and dx.dtype == jnp.float64
    y, dx = np.asarray(y), np.asarray(dx)
  ref = NP[name](x, (1,))
  if name == "softmax":
    tol = 8 * F64_EPS * (1 + np.abs(x - x.max(-1, keepdims=True))) * ref
  else:
    tol = 1e-14 * np.abs(ref) + (1e-14 if name == "log_softmax" else 0.0)
  assert_within(y, ref, tol, f"{name} float64")
  dx_ref = np_vjp(name, x, ct, (1,))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_integer_input_is_promoted_like_float(name):
  ints = jnp.array([[0, 1, 2, 3], [-2, 5, 5, 1]], jnp.int32)
  got = jax.jit(OPS[name])(ints)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, jax.jit(OPS[name])(ints.astype(jnp.float32)))
  assert_values(name, got, np.asarray(ints), (1,))


# ------------------------------------------------------------------ transformations


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_batch(name):
  rng = np.random.default_rng(27)
  x = rng.normal(scale=3.0, size=(6, 4, 9)).astype(np.float32)
  where = partial_mask(rng, x.shape, (2,))
  batched = jax.jit(jax.vmap(OPS[name]))(x)
  np.testing.assert_allclose(batched, jax.jit(OPS[name])(x), rtol=2 * F32_EPS, atol=F32_TINY)
  assert_values(name, batched, x, (2,))
  vm = jax.jit(jax.vmap(lambda x, w: OPS[name](x, where=w)))(x, where)
  full = jax.jit(lambda x, w: OPS[name](x, where=w))(x, where)
  np.testing.assert_allclose(vm, full, rtol=2 * F32_EPS, atol=F32_TINY)
  assert_values(name, vm, x, (2,), where)


@pytest.mark.parametrize("name", NAMES)
def test_grad_of_vmap_matches_formula(name):
  rng = np.random.default_rng(28)
  x = rng.normal(scale=3.0, size=(6, 9)).astype(np.float32)
  where = partial_mask(rng, x.shape, (1,))
  ct = random_ct(rng, name, x.shape, (1,))
  grad = jax.jit(jax.grad(lambda x: (jax.vmap(lambda r, w: OPS[name](r, where=w))(x, where)
                                     * ct).sum()))(x)
  np.testing.assert_allclose(grad, np_vjp(name, x, ct, (1,), where), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", NAMES)
def test_axis_out_of_range_names_the_axis(name):
  x = jnp.ones((2, 3), jnp.float32)
  with pytest.raises(ValueError, match="axis=5"):
    jax.jit(lambda x: OPS[name](x, axis=5))(x)
  with pytest.raises(ValueError, match=r"axis=\(0, -3\)"):
    jax.jit(lambda x: OPS[name](x, axis=(0, -3)))(x)


@pytest.mark.parametrize("name", NAMES)
def test_repeated_axis_raises(name):
  x = jnp.ones((2, 3), jnp.float32)
  with pytest.raises(ValueError, match="repeat"):
    jax.jit(lambda x: OPS[name](x, axis=(1, -1)))(x)


@pytest.mark.parametrize("axis", [1.0, "1", (0, 1.5), True])
@pytest.mark.parametrize("name", NAMES)
def test_non_int_axis_raises_type_error(name, axis):
  x = jnp.ones((2, 3), jnp.float32)
  with pytest.raises(TypeError, match="axis"):
    jax.jit(lambda x: OPS[name](x, axis=axis))(x)


@pytest.mark.parametrize("name", NAMES)
def test_non_boolean_where_raises_type_error(name):
  x = jnp.ones((2, 3), jnp.float32)
  for where in (jnp.ones((2, 3), jnp.float32), jnp.ones((2, 3), jnp.int32)):
    with pytest.raises(TypeError, match="where"):
      jax.jit(lambda x, w: OPS[name](x, where=w))(x, where)


@pytest.mark.parametrize("name", NAMES)
def test_unbroadcastable_where_names_both_shapes(name):
  x = jnp.ones((2, 4), jnp.float32)
  for bad in ((3,), (2, 1, 4), (4, 2)):
    with pytest.raises(ValueError) as info:
      jax.jit(lambda x, w: OPS[name](x, where=w))(x, jnp.ones(bad, bool))
    assert str(bad) in str(info.value) and "(2, 4)" in str(info.value), str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_complex_input_raises_type_error(name):
  z = jnp.ones((2, 3), jnp.complex64) * (1 + 2j)
  if name == "logsumexp":  # as jax.nn.logsumexp, to which complex inputs are handed
    np.testing.assert_allclose(jax.jit(OPS[name])(z), jax.nn.logsumexp(z, -1), rtol=1e-6)
    return
  with pytest.raises(TypeError, match="real floating"):
    jax.jit(OPS[name])(z)
