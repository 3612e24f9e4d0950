"""kl_divergence_from_logits and entropy_from_logits.

KL(softmax(t) || softmax(x)) is checked against optax's
``kl_divergence(log_softmax(x), softmax(t))``, float64 NumPy, hand values and the
plain-autodiff twins; entropy against float64 NumPy, hand values and its twin. Nothing
expected is computed by the op under test. Everything runs under ``jax.jit``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from loss_testing import REDUCTIONS, all_reductions, canon_axes, f64, reduce_like_spec

import jaxactv
from jaxactv import reference

KL = jaxactv.kl_divergence_from_logits
ENTROPY = jaxactv.entropy_from_logits
F32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- helpers


def np_log_softmax(x, axes, valid=None):
  """float64 log-softmax over ``axes``; entries outside ``valid`` are -inf."""
  x = f64(x)
  if valid is not None:
    x = np.where(valid, x, -np.inf)
  with np.errstate(invalid="ignore", divide="ignore"):  # rows with nothing left are NaN
    s = x - np.max(x, axis=axes, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axes, keepdims=True))


def np_kl(x, t, axes, valid=None):
  """sum q (log q - log p) in float64, 0 log 0 = 0."""
  logq, logp = np_log_softmax(t, axes, valid), np_log_softmax(x, axes, valid)
  q = np.exp(logq)
  with np.errstate(invalid="ignore"):
    terms = np.where(q > 0, q * (logq - logp), 0.0)
  return terms.sum(axis=axes)


def np_kl_grads(x, t, axes, valid=None):
  """(dKL/dx, dKL/dt) = (p - q, -q (log p - log q - E_q[log p - log q])) in float64."""
  logq, logp = np_log_softmax(t, axes, valid), np_log_softmax(x, axes, valid)
  p, q = np.exp(logp), np.exp(logq)
  with np.errstate(invalid="ignore"):
    d = np.where(q > 0, logp - logq, 0.0)
  mu = (q * d).sum(axis=axes, keepdims=True)
  return p - q, np.where(q > 0, -q * (d - mu), 0.0)


def np_entropy(x, axes, valid=None):
  logp = np_log_softmax(x, axes, valid)
  p = np.exp(logp)
  return -np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0).sum(axis=axes)


def np_entropy_grad(x, axes, valid=None):
  """dH/dx = -p (log p + H) in float64."""
  logp = np_log_softmax(x, axes, valid)
  p = np.exp(logp)
  h = np.expand_dims(np_entropy(x, axes, valid), axes)
  return np.where(p > 0, -p * (np.where(p > 0, logp, 0.0) + h), 0.0)


def random_cts(rng, batch_shape):
  """The mean's cotangent is scaled by the batch size so that its share of the summed
  gradient is as large as the others'."""
  return {"none": rng.normal(size=batch_shape).astype(np.float32),
          "mean": np.float32(0.7 * math.prod(batch_shape)), "sum": np.float32(-1.3)}


def per_example_ct(cts, counts, axes):
  """The cotangent each example receives from the three reductions, broadcast over classes."""
  ct = np.where(counts, f64(cts["none"]) + f64(cts["mean"]) / counts.sum() + f64(cts["sum"]), 0.0)
  return np.expand_dims(ct, axes)


# (shape, axis, mask): "logit" masks single logits, "example" whole examples.
CASES = [
    ((7, 1031), -1, None),
    ((6, 5, 9), (0, 2), "logit"),
    ((7, 1031), -1, "example"),
    ((6, 5, 9), (0, 2), "example"),
]
CASE_IDS = ["7x1031", "6x5x9-axes02-logitmask", "7x1031-examplemask", "6x5x9-axes02-examplemask"]


def make_case(seed, shape, axis, mask, scale=3.0):
  rng = np.random.default_rng(seed)
  axes = canon_axes(axis, len(shape))
  batch_shape = tuple(n for d, n in enumerate(shape) if d not in axes)
  x = rng.normal(scale=scale, size=shape).astype(np.float32)
  t = rng.normal(scale=scale, size=shape).astype(np.float32)
  where, valid, counts = None, None, np.ones(batch_shape, bool)
  if mask == "logit":
    where = rng.uniform(size=shape) > 0.4
    # Keep the first class of every example (index 0 along each class axis).
    first = tuple(slice(0, 1) if d in axes else slice(None) for d in range(len(shape)))
    where[first] = True
    valid = where
  elif mask == "example":
    where = rng.uniform(size=batch_shape) > 0.4
    where.flat[0], where.flat[-1] = True, False
    valid = np.broadcast_to(np.expand_dims(where, axes), shape)
    counts = where
  return rng, x, t, where, valid, counts, axes, batch_shape


# ------------------------------------------------------------------------------ KL


def test_kl_hand_values():
  # q = (1/2, 1/2), p = (3/4, 1/4): KL = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3).
  x = np.array([[np.log(3.0), 0.0], [1.5, -2.0]], np.float32)
  t = np.array([[0.0, 0.0], [1.5, -2.0]], np.float32)
  got = jax.jit(KL)(x, t)
  np.testing.assert_allclose(got[0], 0.5 * np.log(4 / 3), rtol=1e-6)
  assert float(got[1]) == 0.0  # identical distributions
  # KL(q || p) is not symmetric: KL(p || q) = 3/4 log(3/2) + 1/4 log(1/2).
  np.testing.assert_allclose(jax.jit(KL)(t, x)[0], 0.75 * np.log(1.5) + 0.25 * np.log(0.5),
                             rtol=1e-6)


@pytest.mark.parametrize("shape, axis, mask", CASES, ids=CASE_IDS)
def test_kl_matches_optax_and_float64_values_and_both_gradients(shape, axis, mask):
  rng, x, t, where, valid, counts, axes, batch_shape = make_case(0, shape, axis, mask)
  cts = random_cts(rng, batch_shape)
  full = np.ones(shape, bool) if valid is None else np.ascontiguousarray(valid)
  extra = (counts, full) if where is None else (counts, full, where)
  ours = all_reductions(lambda r: lambda x, t, _c, _f, w=None: KL(x, t, axis, w, reduction=r),
                        (x, t), cts, extra)

  def optax_loss(r):
    def f(x, t, counts, full, w=None):
      logp = jax.nn.log_softmax(x, axis, where=full)
      q = jax.nn.softmax(t, axis, where=full)
      per = optax.kl_divergence(logp, q, axis, where=full)
      return reduce_like_spec(jnp.where(counts, per, 0.0), r, counts)
    return f

  theirs = all_reductions(optax_loss, (x, t), cts, extra)
  (values, (dx, dt)), (values_ref, (dx_ref, dt_ref)) = ours, theirs
  for r in REDUCTIONS:
    assert values[r].dtype == jnp.float32
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  kl64 = np.where(counts, np_kl(x, t, axes, valid), 0.0)
  np.testing.assert_allclose(values["none"], kl64, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(values["mean"], kl64.sum() / counts.sum(), rtol=1e-5)
  # optax's gradients are NaN (0 * inf) at masked entries; compare where it is defined.
  ok = full
  np.testing.assert_allclose(f64(dx)[ok], f64(dx_ref)[ok], rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(f64(dt)[ok], f64(dt_ref)[ok], rtol=2e-5, atol=1e-5)
  assert np.all(f64(dx)[~ok] == 0.0) and np.all(f64(dt)[~ok] == 0.0)
  # And the closed forms in float64: dKL/dx = p - q; dKL/dt = -q (delta - E_q delta).
  gx, gt = np_kl_grads(x, t, axes, valid)
  ct = per_example_ct(cts, counts, axes)
  np.testing.assert_allclose(dx, np.where(ok, gx * ct, 0.0), rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dt, np.where(ok, gt * ct, 0.0), rtol=2e-5, atol=1e-5)


def test_kl_of_close_distributions_keeps_its_digits_where_the_textbook_formula_does_not():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 1031)).astype(np.float32)
  t = (x + 1e-4 * rng.normal(size=x.shape)).astype(np.float32)
  exact = np_kl(x, t, (1,))
  assert np.all(exact > 0) and np.all(exact < 1e-7)  # KL ~ 5e-9: tiny
  ours = f64(jax.jit(KL)(x, t))
  theirs = f64(jax.jit(
      lambda x, t: optax.kl_divergence(jax.nn.log_softmax(x), jax.nn.softmax(t)))(x, t))
  ours_err = np.max(np.abs(ours - exact) / exact)
  theirs_err = np.max(np.abs(theirs - exact) / exact)
  assert ours_err < 1e-3, ours_err
  assert theirs_err > 1e-2, theirs_err
  assert theirs_err > 10 * ours_err
  # The gradient at close distributions: p - q, a difference of nearly equal numbers.
  dx = jax.jit(jax.grad(lambda x: KL(x, t).sum()))(x)
  gx, _ = np_kl_grads(x, t, (1,))
  p = np.exp(np_log_softmax(x, (1,)))
  # p = exp(x - lse) carries ~|x - lse| ulp of itself (exp's condition number), and so
  # does q: the bound follows p, not the tiny p - q.
  bound = 4 * F32_EPS * (2 + np.abs(np.log(p))) * p
  assert np.all(np.abs(f64(dx) - gx) <= bound)


def test_kl_at_extreme_logits_matches_twin_and_float64():
  rng = np.random.default_rng(2)
  x = rng.uniform(-80.0, 80.0, (7, 1031)).astype(np.float32)
  t = rng.uniform(-80.0, 80.0, (7, 1031)).astype(np.float32)
  cts = random_cts(rng, (7,))
  ours = all_reductions(lambda r: lambda x, t: KL(x, t, reduction=r), (x, t), cts)
  twin = all_reductions(
      lambda r: lambda x, t: reference.kl_divergence_from_logits(x, t, reduction=r), (x, t), cts)
  (values, (dx, dt)), (values_ref, (dx_ref, dt_ref)) = ours, twin
  exact = np_kl(x, t, (1,))
  assert np.all(np.isfinite(exact)) and np.all(exact > 10)
  np.testing.assert_allclose(values["none"], exact, rtol=1e-5)
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  gx, gt = np_kl_grads(x, t, (1,))
  ct = per_example_ct(cts, np.ones(7, bool), (1,))
  np.testing.assert_allclose(dx, gx * ct, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dt, gt * ct, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dt, dt_ref, rtol=2e-5, atol=1e-5)


def test_kl_whose_mean_log_ratio_dwarfs_it_takes_the_centred_sweep():
  # The prediction's max sits on a class the target gives e^-30: the shifted logits then
  # differ by mu = E_q[x - t] of 0.5-3 while KL is 0.02-0.09, and the two-sweep form
  # (centred at 0) would cancel mu^2 / KL ~ 50 epsilons away (measured: 49). The batch
  # takes the third sweep, centred at mu, for those rows.
  rng = np.random.default_rng(21)
  t = rng.normal(size=(8, 1000)).astype(np.float32)
  x = (t + 1e-3 * rng.normal(size=t.shape)).astype(np.float32)
  t[:, 0] = -30.0
  x[:, 0] = x.max(1) + np.linspace(0.5, 3.0, 8).astype(np.float32)
  exact = np_kl(x, t, (1,))
  got = f64(jax.jit(KL)(x, t))
  assert np.max(np.abs(got - exact) / exact) < 32 * F32_EPS
  dx, dt = jax.jit(jax.grad(lambda x, t: KL(x, t).sum(), (0, 1)))(x, t)
  gx, gt = np_kl_grads(x, t, (1,))
  np.testing.assert_allclose(f64(dx), gx, rtol=0, atol=1e-6 * np.max(np.abs(gx)))
  # dKL/dt = -q (delta - mu), delta - mu ~ 1e-3 from shifted logits ~ 3 in size: delta
  # and its mean mu each round at an ulp of those, so the bound follows q times them
  # (measured: 14 epsilons of it at most, as before the two-sweep form).
  q = np.exp(np_log_softmax(t, (1,)))
  shifted = lambda v: np.abs(f64(v) - f64(v).max(1, keepdims=True))
  shifts = shifted(x) + shifted(t)
  size = 2.0 + shifts + (q * shifts).sum(1, keepdims=True)
  assert np.all(np.abs(f64(dt) - gt) <= 32 * F32_EPS * q * size)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_kl_keeps_its_digits_at_a_large_common_logit_offset(offset):
  # Softmax ignores a common offset; the divergence and its gradient p - q must too.
  # x - t or x - lse taken at the offset's scale round at its ulp (0.06 at 1e6): the
  # unshifted form gave 2e-2 relative error there, and 5e-4 at 1e4.
  rng = np.random.default_rng(12)
  x = (2.0 * rng.normal(size=(4, 1000)) + offset).astype(np.float32)
  t = (x + rng.normal(size=x.shape)).astype(np.float32)
  exact = np_kl(x, t, (1,))
  np.testing.assert_allclose(jax.jit(KL)(x, t), exact, rtol=2e-6)
  dx, dt = jax.jit(jax.grad(lambda x, t: KL(x, t).sum(), (0, 1)))(x, t)
  gx, gt = np_kl_grads(x, t, (1,))
  np.testing.assert_allclose(f64(dx), gx, rtol=0, atol=1e-6 * np.max(np.abs(gx)))
  np.testing.assert_allclose(f64(dt), gt, rtol=0, atol=1e-6 * np.max(np.abs(gt)))


def test_kl_with_a_large_logit_gap_is_finite():
  # By hand: q = softmax([0, -60]) = (1, e^-60), log p = [0, 40] - lse = (-40, ~0), so
  # KL = 1 * (0 + 40) + e^-60 * (-60 - 0) = 40 (to 1e-24). exp(x - t) = e^100 overflows
  # float32, but no term of the divergence needs it. Row 2: q = (1, e^-95), and e^-95
  # underflows float32, yet p = (1/2, 1/2) keeps its mass on class 2: KL = log 2.
  x = np.array([[0.0, 40.0], [0.0, 0.0]], np.float32)
  t = np.array([[0.0, -60.0], [0.0, -95.0]], np.float32)
  got = f64(jax.jit(KL)(x, t))
  np.testing.assert_allclose(got, [40.0, np.log(2.0)], rtol=1e-6)
  np.testing.assert_allclose(got, np_kl(x, t, (1,)), rtol=1e-6)


def test_entropy_at_extreme_logits_matches_twin_and_float64():
  rng = np.random.default_rng(6)
  x = rng.uniform(-80.0, 80.0, (7, 1031)).astype(np.float32)
  cts = random_cts(rng, (7,))
  ours = all_reductions(lambda r: lambda x: ENTROPY(x, reduction=r), (x,), cts)
  twin = all_reductions(lambda r: lambda x: reference.entropy_from_logits(x, reduction=r),
                        (x,), cts)
  (values, (dx,)), (values_ref, (dx_ref,)) = ours, twin
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  np.testing.assert_allclose(values["none"], np_entropy(x, (1,)), rtol=1e-5, atol=1e-6)
  ct = per_example_ct(cts, np.ones(7, bool), (1,))
  np.testing.assert_allclose(dx, np_entropy_grad(x, (1,)) * ct, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_half_precision_gives_the_float32_result_of_its_values(dtype):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(scale=3.0, size=(7, 1031)), dtype)
  t = jnp.asarray(rng.normal(scale=3.0, size=(7, 1031)), dtype)
  x32, t32 = x.astype(jnp.float32), t.astype(jnp.float32)  # exactly the same numbers
  dx, dt = jax.jit(jax.grad(lambda x, t: KL(x, t).sum(), (0, 1)))(x, t)
  dh = jax.jit(jax.grad(lambda x: ENTROPY(x).sum()))(x)
  per_kl, per_h = jax.jit(KL)(x, t), jax.jit(ENTROPY)(x)
  assert per_kl.dtype == per_h.dtype == jnp.float32
  assert dx.dtype == dt.dtype == dh.dtype == dtype
  optax_kl = jax.jit(
      lambda x, t: optax.kl_divergence(jax.nn.log_softmax(x), jax.nn.softmax(t)))(x32, t32)
  np.testing.assert_allclose(per_kl, optax_kl, rtol=1e-5)
  np.testing.assert_allclose(per_kl, np_kl(x32, t32, (1,)), rtol=1e-5)
  np.testing.assert_allclose(per_kl, jax.jit(KL)(x32, t32), rtol=1e-5)
  np.testing.assert_allclose(per_h, np_entropy(x32, (1,)), rtol=1e-5)
  np.testing.assert_allclose(per_h, jax.jit(ENTROPY)(x32), rtol=1e-5)
  # Each gradient is the float32 one rounded once to the input's dtype.
  half_eps = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
  gx, gt = np_kl_grads(x32, t32, (1,))
  for got, ref in ((dx, gx), (dt, gt), (dh, np_entropy_grad(x32, (1,)))):
    np.testing.assert_allclose(f64(got), ref, rtol=half_eps, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rows_longer_than_32768_match_float64(dtype):
  # On CPU such rows are reduced a piece at a time (_backend.long_row_piece), in the
  # separate-sweep form for float32 and the one-kernel form for half precision.
  rng = np.random.default_rng(11)
  x = rng.normal(scale=3.0, size=(3, 40960)).astype(np.float32)
  t = (x + rng.normal(size=x.shape)).astype(np.float32)
  x[0, :7] = -np.inf  # prediction ruled out where the target has no mass either
  t[0, :7] = -np.inf
  x[2] = -np.inf  # a row with no finite logit: entropy 0
  x, t = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in (x, t))
  h, dh = jax.jit(jax.value_and_grad(lambda x: ENTROPY(x.astype(dtype)).sum()))(x)
  per_h = jax.jit(lambda x: ENTROPY(x.astype(dtype)))(x)
  np.testing.assert_allclose(h, np_entropy(x, (1,)).sum(), rtol=1e-5)
  np.testing.assert_allclose(per_h, np_entropy(x, (1,)), rtol=1e-5, atol=1e-6)
  # The half-precision gradient is the float32 one rounded once to its dtype.
  rtol = 2.0**-8 if dtype == jnp.bfloat16 else 2e-5
  np.testing.assert_allclose(f64(dh)[:2], np_entropy_grad(x[:2], (1,)), rtol=rtol, atol=1e-8)
  assert np.all(f64(dh)[2] == 0.0) and np.all(f64(dh)[0, :7] == 0.0)
  per_kl = jax.jit(lambda x, t: KL(x.astype(dtype), t.astype(dtype)))(x[:2], t[:2])
  np.testing.assert_allclose(per_kl, np_kl(x[:2], t[:2], (1,)), rtol=1e-5)


def test_kl_minus_inf_logits():
  x = np.array([[0.0, 1.0, -np.inf, 2.0],
                [0.0, 1.0, 2.0, 3.0],
                [0.0, -np.inf, 1.0, 2.0]], np.float32)
  t = np.array([[0.5, -np.inf, -np.inf, 1.0],
                [-np.inf, 0.0, -np.inf, 1.0],
                [0.0, 1.0, 1.0, 0.0]], np.float32)
  ct = np.array([1.0, -0.5, 2.0], np.float32)

  @jax.jit
  def run(x, t, ct):
    v, pull = jax.vjp(KL, x, t)
    return v, pull(ct)

  v, (dx, dt) = run(x, t, ct)
  v = f64(v)
  # Rows 0 and 1: q = 0 where t = -inf, so those terms of sum q log(q / p) vanish, but the
  # prediction's mass there still counts in p's normaliser. Row 2: the target allows
  # class 1 and the prediction rules it out: inf.
  assert np.all(np.isfinite(f64(dx)[:2])) and np.all(np.isfinite(f64(dt)[:2]))
  gx, gt = np_kl_grads(x[:2], t[:2], (1,))
  np.testing.assert_allclose(dx[:2], gx * ct[:2, None], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dt[:2], gt * ct[:2, None], rtol=1e-5, atol=1e-7)
  assert np.all(f64(dt)[:2][~np.isfinite(t[:2])] == 0.0)
  assert v[2] == np.inf
  # Row 0 by hand: q = (e^.5, 0, 0, e) / (e^.5 + e), log p = x - log(1 + e + e^2).
  q0 = np.exp([0.5, 1.0]) / np.exp([0.5, 1.0]).sum()
  by_hand = np.sum(q0 * (np.log(q0) - (np.array([0.0, 2.0]) - np.log(1 + np.e + np.e**2))))
  np.testing.assert_allclose(np_kl(x[:1], t[:1], (1,)), [by_hand], rtol=1e-12)
  np.testing.assert_allclose(v[:2], np_kl(x[:2], t[:2], (1,)), rtol=1e-6)


@pytest.mark.parametrize("fill", [-np.inf, -1e9], ids=["-inf", "-1e9"])
def test_kl_to_a_top_k_teacher_with_the_student_mass_outside_it(fill):
  # Distillation from a teacher's top 5 of 100 classes (the rest filled): where the
  # student puts most of its mass outside those 5, 1 - p_out rounds away in float32.
  rng = np.random.default_rng(11)
  x = (6.0 * rng.standard_normal((6, 100))).astype(np.float32)
  x[:, 50:] += np.array([0.0, 5.0, 10.0, 16.0, 25.0, 90.0], np.float32)[:, None]
  t = np.full((6, 100), fill, np.float32)
  t[:, :5] = rng.standard_normal((6, 5))
  (v, (dx, dt)) = jax.jit(lambda x, t: jax.value_and_grad(
      lambda x, t: KL(x, t, reduction="sum"), (0, 1))(x, t))(x, t)
  want = np_kl(x, np.where(np.arange(100) < 5, t, -np.inf), (1,))
  assert want.max() > 90  # the last row's term is ~90: p_out = 1 - 1e-40 there
  np.testing.assert_allclose(v, want.sum(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(KL)(x, t), want, rtol=1e-6)
  gx, gt = np_kl_grads(x, np.where(np.arange(100) < 5, t, -np.inf), (1,))
  np.testing.assert_allclose(dx, gx, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dt, gt, rtol=1e-5, atol=1e-7)


def test_kl_to_a_target_with_no_mass_is_zero_with_zero_gradients():
  # Every target logit -inf (a padded position of the teacher): no class has target
  # probability, so none contributes, as the twin computes.
  x = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], np.float32)
  t = np.array([[-np.inf] * 3, [0.0, 1.0, -np.inf]], np.float32)
  v, (dx, dt) = jax.jit(lambda x, t: jax.value_and_grad(
      lambda x, t: KL(x, t, reduction="sum"), (0, 1))(x, t))(x, t)
  per_row = jax.jit(KL)(x, t)
  assert float(per_row[0]) == 0.0
  assert np.all(np.asarray(dx)[0] == 0) and np.all(np.asarray(dt)[0] == 0)
  np.testing.assert_allclose(per_row[1], np_kl(x[1:], t[1:], (1,))[0], rtol=1e-6)
  np.testing.assert_allclose(reference.kl_divergence_from_logits(x, t)[0], 0.0)
  np.testing.assert_allclose(v, float(per_row[1]), rtol=1e-6)


def test_kl_float64_under_enable_x64():
  rng = np.random.default_rng(3)
  x, t = rng.normal(scale=3.0, size=(2, 5, 33))
  with jax.enable_x64(True):
    v, (dx, dt) = jax.jit(jax.value_and_grad(lambda x, t: KL(x, t, reduction="sum"), (0, 1)))(
        jnp.asarray(x), jnp.asarray(t))
    assert v.dtype == dx.dtype == jnp.float64
    v, dx, dt = f64(v), f64(dx), f64(dt)
  np.testing.assert_allclose(v, np_kl(x, t, (1,)).sum(), rtol=1e-13)
  gx, gt = np_kl_grads(x, t, (1,))
  np.testing.assert_allclose(dx, gx, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(dt, gt, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------- entropy


def test_entropy_hand_values():
  x = np.array([[0.0, 0.0, 0.0, 0.0],
                [5.0, 5.0, -np.inf, -np.inf],
                [1.0, -np.inf, -np.inf, -np.inf],
                [np.log(3.0), 0.0, -np.inf, -np.inf]], np.float32)
  v, g = jax.jit(jax.value_and_grad(lambda x: ENTROPY(x).sum()))(x)
  # Uniform over 4: log 4; over 2: log 2; one class: 0; (3/4, 1/4): -(3/4 log 3/4 + 1/4 log 1/4).
  h4 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  np.testing.assert_allclose(jax.jit(ENTROPY)(x), [np.log(4), np.log(2), 0.0, h4], rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(v, np.log(4) + np.log(2) + h4, rtol=1e-6)
  # -inf logits contribute nothing and get gradient 0; a uniform row is a stationary point.
  g = f64(g)
  assert np.all(np.isfinite(g)) and np.all(g[~np.isfinite(x)] == 0.0)
  np.testing.assert_allclose(g[:3], 0.0, atol=1e-7)
  # Row 3 by hand: dH/dx = -p (log p + H).
  p = np.array([0.75, 0.25])
  np.testing.assert_allclose(g[3, :2], -p * (np.log(p) + h4), rtol=1e-5)


@pytest.mark.parametrize("shape, axis, mask", CASES, ids=CASE_IDS)
def test_entropy_matches_float64_and_twin_values_and_gradient(shape, axis, mask):
  rng, x, _, where, valid, counts, axes, batch_shape = make_case(4, shape, axis, mask)
  x[tuple(0 for _ in shape)] = -np.inf  # a -inf logit in a counted example
  cts = random_cts(rng, batch_shape)
  extra = () if where is None else (where,)
  make = lambda fn: lambda r: lambda x, w=None: fn(x, axis, w, reduction=r)
  ours = all_reductions(make(ENTROPY), (x,), cts, extra)
  twin = all_reductions(make(reference.entropy_from_logits), (x,), cts, extra)
  (values, (dx,)), (values_ref, (dx_ref,)) = ours, twin
  h64 = np.where(counts, np_entropy(x, axes, valid), 0.0)
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  np.testing.assert_allclose(values["none"], h64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(values["mean"], h64.sum() / counts.sum(), rtol=1e-5)
  np.testing.assert_allclose(values["sum"], h64.sum(), rtol=1e-5)
  ct = per_example_ct(cts, counts, axes)
  expected = np_entropy_grad(x, axes, valid) * ct
  np.testing.assert_allclose(dx, expected, rtol=2e-5, atol=1e-5)
  finite_ref = np.isfinite(f64(dx_ref))
  np.testing.assert_allclose(f64(dx)[finite_ref], f64(dx_ref)[finite_ref], rtol=2e-5, atol=1e-5)
  assert np.all(np.isfinite(f64(dx)))
  assert f64(dx)[tuple(0 for _ in shape)] == 0.0
  if valid is not None:
    assert np.all(f64(dx)[~valid] == 0.0)


def test_mean_over_no_counted_example_is_zero():
  x = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
  none = np.zeros(3, bool)
  for fn in (lambda x: KL(x, x[::-1], where=none, reduction="mean"),
             lambda x: ENTROPY(x, where=none, reduction="mean"),
             lambda x: ENTROPY(x, where=np.zeros((3, 4), bool), reduction="mean")):
    v, g = jax.jit(jax.value_and_grad(fn))(x)
    assert float(v) == 0.0 and np.all(f64(g) == 0.0)
