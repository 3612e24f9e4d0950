"""sigmoid_binary_cross_entropy and sigmoid_focal_loss.

Expected numbers come from optax, PyTorch 2.13 in float64, float64 NumPy formulas
(closed-form derivatives and central finite differences), hand arithmetic, or the
plain-autodiff twins in ``jaxactv.reference``; never from the op under test.
Everything runs under ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from loss_testing import REDUCTIONS, all_reductions, f64, reduce_like_spec

import jaxactv
from jaxactv import reference

BCE = jaxactv.sigmoid_binary_cross_entropy
FOCAL = jaxactv.sigmoid_focal_loss
TF = torch.nn.functional


# ----------------------------------------------------------------------------- helpers


def np_sigmoid(x):
  x = f64(x)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def np_softplus(x):
  """log(1 + e^x) in float64, stable for every finite x."""
  x = f64(x)
  return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def np_bce(x, y, pos_weight=1.0, eps=0.0):
  """-p y' log s(x) - (1 - y') log(1 - s(x)) with y' = (1 - eps) y + eps / 2."""
  y = (1 - eps) * f64(y) + eps / 2
  return f64(pos_weight) * y * np_softplus(-x) + (1 - y) * np_softplus(x)


def np_bce_grads(x, y, pos_weight=1.0, eps=0.0):
  """(d/dx, d/dy, d/dpos_weight) of ``np_bce``, elementwise."""
  p = f64(pos_weight)
  ys = (1 - eps) * f64(y) + eps / 2
  dx = (p * ys + 1 - ys) * np_sigmoid(x) - p * ys
  dy = (1 - eps) * (p * np_softplus(-x) - np_softplus(x))
  dp = ys * np_softplus(-x)
  return dx, dy, dp


def np_focal(x, y, alpha=None, gamma=2.0):
  """alpha_t (1 - p_t)^gamma BCE, 1 - p_t = y s(-x) + (1 - y) s(x), in float64."""
  x, y = f64(x), f64(y)
  u = y * np_sigmoid(-x) + (1 - y) * np_sigmoid(x)
  loss = u**gamma * np_bce(x, y)
  if alpha is not None:
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
  return loss


def np_focal_label_grad(x, y, alpha=None, gamma=2.0):
  """d/dy of ``np_focal``: the weight through u, the BCE through -x, alpha_t through y."""
  x, y = f64(x), f64(y)
  p, q = np_sigmoid(x), np_sigmoid(-x)
  u = y * q + (1 - y) * p
  ce = np_bce(x, y)
  a_t = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
  da = 0.0 if alpha is None else 2 * alpha - 1
  return a_t * (gamma * u ** (gamma - 1) * (q - p) * ce - u**gamma * x) + da * u**gamma * ce


def hard_focal_derivatives(x, y, gamma):
  """First and second x-derivatives of the focal loss (no alpha) for hard labels, float64.

  With z = x for y = 0 and z = -x for y = 1 the loss is f(z) = s(z)^g softplus(z):
  f' = g s^g q S + s^(g+1),  f'' = s^g q (g^2 q S - g s S + (2g + 1) s),
  s = sigmoid(z), q = sigmoid(-z), S = softplus(z). Derived by hand.
  """
  x, y = f64(x), f64(y)
  sign = np.where(y == 1, -1.0, 1.0)
  z = sign * x
  s, q, big_s = np_sigmoid(z), np_sigmoid(-z), np_softplus(z)
  d1 = gamma * s**gamma * q * big_s + s ** (gamma + 1)
  d2 = s**gamma * q * (gamma**2 * q * big_s - gamma * s * big_s + (2 * gamma + 1) * s)
  return sign * d1, d2


def assert_within(got, ref, tol):
  """|got - ref| <= tol elementwise, reporting the worst violation."""
  err = np.abs(f64(got) - f64(ref))
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(err == 0, 0.0, err / tol)
  worst = np.unravel_index(np.argmax(ratio), err.shape)
  assert np.all(err <= tol), (
      f"{int((err > tol).sum())} violations; worst at {worst}: got {f64(got)[worst]!r}, "
      f"expected {f64(ref)[worst]!r}, tolerance {tol[worst]!r}")


def random_cts(rng, shape):
  """Cotangents per reduction; the mean's is scaled by the element count so that its share
  of the summed gradient is as large as the others'."""
  return {"none": rng.normal(size=shape).astype(np.float32),
          "mean": np.float32(0.7 * np.prod(shape)), "sum": np.float32(-1.3)}


def element_ct(cts, where):
  """(the cotangent each element receives from ``all_reductions``' three reductions, the sum
  of their sizes). The gradient adds the three contributions in float32, so its rounding
  follows the sizes, not the (possibly cancelling) total."""
  parts = (cts["none"], cts["mean"] / where.sum(), cts["sum"])
  total = np.where(where, sum(f64(p) for p in parts), 0.0)
  size = np.where(where, sum(np.abs(f64(p)) for p in parts), 0.0)
  return total, size


# ---------------------------------------------------------------- BCE: hand values


def test_bce_hand_values():
  # x = 0: log 2 whatever the label. x = log 3: s = 3/4, y = 1 -> -log(3/4); y = 0 -> log 4.
  x = np.array([0.0, 0.0, np.log(3.0), np.log(3.0)], np.float32)
  y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  got = jax.jit(BCE)(x, y)
  np.testing.assert_allclose(got, [np.log(2), np.log(2), -np.log(0.75), np.log(4.0)], rtol=1e-6)
  # pos_weight 2 doubles the positive term only; smoothing 0.5 makes every label 1/2.
  got = jax.jit(lambda x, y: BCE(x, y, pos_weight=2.0))(x, y)
  np.testing.assert_allclose(got, [2 * np.log(2), np.log(2), -2 * np.log(0.75), np.log(4.0)],
                             rtol=1e-6)
  got = jax.jit(lambda x, y: BCE(x, y, label_smoothing=1.0))(x, y)
  half = 0.5 * (-np.log(0.75)) + 0.5 * np.log(4.0)
  np.testing.assert_allclose(got, [np.log(2), np.log(2), half, half], rtol=1e-6)


# ------------------------------------------------------------------ BCE: optax, torch

BCE_CASES = [((7, 1031), None), ((7, 1031), (1, 1031)), ((6, 5, 9), (5, 9)), ((6, 5, 9), None)]
BCE_IDS = ["7x1031", "7x1031-colmask", "6x5x9-bcastmask", "6x5x9"]


@pytest.mark.parametrize("shape, mask_shape", BCE_CASES, ids=BCE_IDS)
def test_bce_matches_optax_values_and_both_gradients(shape, mask_shape):
  rng = np.random.default_rng(0)
  x = rng.normal(scale=4.0, size=shape).astype(np.float32)
  y = rng.uniform(size=shape).astype(np.float32)
  y[0] = np.round(y[0])
  where = None if mask_shape is None else rng.uniform(size=mask_shape) > 0.3
  full = np.ones(shape, bool) if where is None else np.broadcast_to(where, shape)
  cts = random_cts(rng, shape)
  extra = (full,) if where is None else (full, where)
  ours = all_reductions(lambda r: lambda x, y, _, w=None: BCE(x, y, where=w, reduction=r),
                        (x, y), cts, extra)

  def optax_loss(r):
    return lambda x, y, full, w=None: reduce_like_spec(
        jnp.where(full, optax.sigmoid_binary_cross_entropy(x, y), 0.0), r, full)

  theirs = all_reductions(optax_loss, (x, y), cts, extra)
  (values, (dx, dy)), (values_ref, (dx_ref, dy_ref)) = ours, theirs
  for r in REDUCTIONS:
    assert values[r].dtype == jnp.float32
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  assert dx.dtype == dy.dtype == jnp.float32
  # optax's sigmoid(x) - y cancels when sigmoid(x) ~ y (ours does not): ulp-of-1 atol.
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dy, dy_ref, rtol=2e-5, atol=1e-5)
  assert np.all(f64(dx)[~full] == 0.0) and np.all(f64(dy)[~full] == 0.0)
  assert np.all(f64(values["none"])[~full] == 0.0)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("pos_weight", ["none", "per-class", "scalar"])
def test_bce_matches_torch_pos_weight_every_reduction(pos_weight, eps):
  rng = np.random.default_rng(1)
  shape = (12, 17)
  x = rng.normal(scale=3.0, size=shape).astype(np.float32)
  y = rng.uniform(size=shape).astype(np.float32)
  y[::2] = np.round(y[::2])
  pw = {"none": None, "per-class": rng.uniform(0.3, 4.0, 17).astype(np.float32),
        "scalar": np.float32(2.5)}[pos_weight]
  cts = random_cts(rng, shape)
  extra = () if pw is None else (pw,)
  values, (dx, dy) = all_reductions(
      lambda r: lambda x, y, pw=None: BCE(x, y, pos_weight=pw, label_smoothing=eps,
                                          reduction=r), (x, y), cts, extra)
  # PyTorch has no BCE smoothing: give it the smoothed target.
  xt = torch.tensor(f64(x), requires_grad=True)
  yt = torch.tensor((1 - eps) * f64(y) + eps / 2, requires_grad=True)
  pwt = None if pw is None else torch.tensor(f64(pw))
  for r in REDUCTIONS:
    loss = TF.binary_cross_entropy_with_logits(xt, yt, pos_weight=pwt, reduction=r)
    loss.backward(torch.tensor(f64(cts[r])))
    np.testing.assert_allclose(values[r], loss.detach().numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=r)
  np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=2e-5, atol=1e-5)
  # d/dy = (1 - eps) d/dy' by the chain rule.
  np.testing.assert_allclose(dy, (1 - eps) * yt.grad.numpy(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_bce_smoothing_and_pos_weight_gradient_match_float64_formula(eps):
  rng = np.random.default_rng(2)
  x = rng.normal(scale=5.0, size=(8, 33)).astype(np.float32)
  y = rng.uniform(size=(8, 33)).astype(np.float32)
  y[:4] = np.round(y[:4])
  pw = rng.uniform(0.3, 4.0, 33).astype(np.float32)
  ct = rng.normal(size=(8, 33)).astype(np.float32)

  @jax.jit
  def run(x, y, pw, ct):
    v, pull = jax.vjp(lambda x, y, pw: BCE(x, y, pos_weight=pw, label_smoothing=eps), x, y, pw)
    return v, pull(ct)

  v, (dx, dy, dpw) = run(x, y, pw, ct)
  assert dpw.shape == pw.shape and dpw.dtype == jnp.float32
  np.testing.assert_allclose(v, np_bce(x, y, pw, eps), rtol=1e-5, atol=1e-7)
  gx, gy, gp = np_bce_grads(x, y, pw, eps)
  np.testing.assert_allclose(dx, gx * ct, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dy, gy * ct, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dpw, (gp * ct).sum(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ BCE: exactness


def test_bce_at_infinite_logits_is_exact_where_optax_and_torch_are_nan():
  x = np.array([np.inf, np.inf, -np.inf, -np.inf, np.inf, -np.inf], np.float32)
  y = np.array([1.0, 0.0, 1.0, 0.0, 0.3, 0.3], np.float32)
  v, g = jax.jit(lambda x: (BCE(x, y), jax.grad(lambda x: BCE(x, y).sum())(x)))(x)
  np.testing.assert_array_equal(v, [0.0, np.inf, np.inf, 0.0, np.inf, np.inf])
  # sigmoid(+-inf) - y, exactly.
  np.testing.assert_array_equal(g, np.array([0.0, 1.0, -1.0, 0.0, 0.7, -0.3], np.float32))
  # With pos_weight 2: (2y + 1 - y) s(x) - 2y; y = 0.3 at +inf: 1.3 - 0.6.
  g2 = jax.jit(jax.grad(lambda x: BCE(x, y, pos_weight=2.0).sum()))(x)
  np.testing.assert_array_equal(g2, np.array([0.0, 1.0, -2.0, 0.0, 0.7, -0.6], np.float32))
  # Label gradient (pos_weight softplus(-x) - softplus(x)) = -x: -inf / +inf, never NaN.
  gy = f64(jax.jit(jax.grad(lambda y: BCE(x, y).sum()))(y))
  np.testing.assert_array_equal(gy, [-np.inf, -np.inf, np.inf, np.inf, -np.inf, np.inf])
  # optax and PyTorch give NaN where the label agrees with the infinite logit.
  agree = [0, 3]
  assert np.all(np.isnan(f64(jax.jit(optax.sigmoid_binary_cross_entropy)(x, y))[agree]))
  theirs = TF.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y),
                                               reduction="none").numpy()
  assert np.all(np.isnan(theirs[agree]))


@pytest.mark.parametrize("x, y, pw", [(20.0, 1.0, None), (-20.0, 0.0, None), (30.0, 1.0, 3.0),
                                      (-25.0, 0.0, 3.0), (80.0, 1.0, None)])
def test_bce_gradient_keeps_precision_in_the_tails(x, y, pw):
  # x = 20, y = 1: d/dx = s(20) - 1 = -s(-20) ~ -2.06e-9, which 1 - s(20) rounds to 0.
  p = 1.0 if pw is None else pw
  expected = (p * y + 1 - y) * np_sigmoid(x) - p * y if y == 0 else -p * np_sigmoid(-x)
  g = jax.jit(jax.grad(lambda x: BCE(x, jnp.float32(y), pos_weight=pw)))(jnp.float32(x))
  assert expected != 0.0
  np.testing.assert_allclose(g, expected, rtol=1e-5)
  if (x, y) == (20.0, 1.0):
    assert abs(float(g) + 2.0611536e-9) < 1e-14


def test_bce_matches_twin_at_extreme_logits_every_option():
  rng = np.random.default_rng(3)
  shape = (7, 1031)
  x = rng.uniform(-80.0, 80.0, shape).astype(np.float32)
  y = rng.uniform(size=shape).astype(np.float32)
  y[:3] = np.round(y[:3])
  pw = rng.uniform(0.3, 4.0, 1031).astype(np.float32)
  where = rng.uniform(size=shape) > 0.2
  cts = random_cts(rng, shape)

  def make(fn):
    return lambda r: lambda x, y, pw, where: fn(x, y, where=where, pos_weight=pw,
                                                label_smoothing=0.1, reduction=r)

  ours = all_reductions(make(BCE), (x, y, pw), cts, (where,))
  twin = all_reductions(make(reference.sigmoid_binary_cross_entropy), (x, y, pw), cts, (where,))
  (values, grads), (values_ref, grads_ref) = ours, twin
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  # The twin's (p y' + 1 - y') s(x) - p y' cancels near the label: ulp-of-1 atol.
  for name, g, g_ref in zip(("x", "y", "pos_weight"), grads, grads_ref, strict=True):
    np.testing.assert_allclose(g, g_ref, rtol=2e-5, atol=1e-5, err_msg=f"d/d{name}")
  # And against float64 NumPy, per element.
  dx, dy, dp = grads
  gx, gy, gp = np_bce_grads(x, y, pw, 0.1)
  ct, ct_size = element_ct(cts, where)
  np.testing.assert_allclose(values["none"], np.where(where, np_bce(x, y, pw, 0.1), 0.0),
                             rtol=1e-5)
  np.testing.assert_allclose(values["mean"], np_bce(x, y, pw, 0.1)[where].mean(), rtol=1e-5)
  assert_within(dx, gx * ct, 1e-5 * np.abs(gx) * ct_size + 1e-7)
  # d/dy = (1 - eps)(p softplus(-x) - softplus(x)) subtracts terms of size |x| ~ 80: each
  # float32 term carries an ulp of itself, so the tolerance follows the terms, not the result.
  term_ulps = 8 * np.finfo(np.float32).eps * (f64(pw) + 1) * (np.abs(f64(x)) + 1) * ct_size
  assert_within(dy, gy * ct, 1e-5 * np.abs(gy) * ct_size + term_ulps)
  np.testing.assert_allclose(dp, (gp * ct).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_bce_half_precision_gives_float32_loss_of_its_values(dtype):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(scale=4.0, size=(16, 257)), dtype)
  y = jnp.asarray(rng.uniform(size=(16, 257)), dtype)
  x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
  v = jax.jit(BCE)(x, y)
  assert v.dtype == jnp.float32
  np.testing.assert_allclose(v, jax.jit(optax.sigmoid_binary_cross_entropy)(x32, y32),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(v, jax.jit(BCE)(x32, y32), rtol=1e-5, atol=1e-7)
  dx, dy = jax.jit(jax.grad(lambda x, y: BCE(x, y).sum(), (0, 1)))(x, y)
  assert dx.dtype == dy.dtype == dtype
  gx, gy, _ = np_bce_grads(x32, y32)
  half_eps = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
  np.testing.assert_allclose(f64(dx), gx, rtol=2 * half_eps, atol=1e-7)
  np.testing.assert_allclose(f64(dy), gy, rtol=2 * half_eps, atol=1e-7)


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_mean_over_nothing_is_zero_and_mask_excludes_from_mean(loss):
  fn = BCE if loss == "bce" else FOCAL
  rng = np.random.default_rng(5)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  y = rng.uniform(size=(4, 6)).astype(np.float32)
  v, g = jax.jit(jax.value_and_grad(lambda x: fn(x, y, where=np.zeros((4, 6), bool),
                                                 reduction="mean")))(x)
  assert float(v) == 0.0 and np.all(f64(g) == 0.0)
  # Rows 1 and 3 masked (holding huge finite garbage): the mean is over the 12 others.
  keep = np.array([True, False, True, False])[:, None]
  x[~keep[:, 0]] = 1e30
  v = jax.jit(lambda x: fn(x, y, where=keep, reduction="mean"))(x)
  per = np_bce(x, y) if loss == "bce" else np_focal(x, y)
  np.testing.assert_allclose(v, per[keep[:, 0]].sum() / 12, rtol=1e-5)


# ----------------------------------------------------------------------- focal loss


@pytest.mark.parametrize("gamma, alpha", [(0.0, None), (0.5, 0.25), (2.0, None), (2.0, 0.25)])
def test_focal_matches_optax_values_and_logit_gradients(gamma, alpha):
  rng = np.random.default_rng(6)
  shape = (7, 1031)
  x = rng.normal(scale=4.0, size=shape).astype(np.float32)
  y = rng.uniform(size=shape).astype(np.float32)
  y[:4] = np.round(y[:4])
  ct = rng.normal(size=shape).astype(np.float32)

  def run(fn):
    @jax.jit
    def f(x, y, ct):
      v, pull = jax.vjp(lambda x: fn(x, y, alpha=alpha, gamma=gamma), x)
      return v, pull(ct)[0]
    return f(x, y, ct)

  v, dx = run(FOCAL)
  v_ref, dx_ref = run(optax.sigmoid_focal_loss)
  np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(v, np_focal(x, y, alpha, gamma), rtol=1e-5, atol=1e-7)
  # Different but equivalent closed forms; 5e-5 relative where the terms partly cancel.
  np.testing.assert_allclose(dx, dx_ref, rtol=5e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_label_gradient_matches_float64_formula_and_finite_differences(alpha):
  # optax 0.2.8's label gradient is wrong, so the references here are a float64 closed form
  # and float64 central differences of the float64 loss.
  rng = np.random.default_rng(7)
  x = rng.normal(scale=3.0, size=(6, 40)).astype(np.float32)
  y = rng.uniform(0.05, 0.95, size=(6, 40)).astype(np.float32)
  y[:2] = np.round(y[:2])  # hard labels: the closed form only (a step would leave [0, 1])
  for gamma in (0.5, 2.0):
    dy = jax.jit(jax.grad(lambda y, x, gamma=gamma: FOCAL(x, y, alpha, gamma).sum()))(y, x)
    exact = np_focal_label_grad(x, y, alpha, gamma)
    np.testing.assert_allclose(dy, exact, rtol=2e-5, atol=1e-6)
    h = 1e-6
    fd = (np_focal(x, f64(y) + h, alpha, gamma) - np_focal(x, f64(y) - h, alpha, gamma)) / (2 * h)
    np.testing.assert_allclose(f64(dy)[2:], fd[2:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("x_abs", [50.0, 200.0])
def test_focal_gradients_and_hessians_finite_at_extreme_logits(x_abs):
  # optax issue 1267: gamma < 1 and hard labels put u^(gamma - 1) -> inf against p q -> 0.
  x = np.array([x_abs, -x_abs] * 4, np.float32)
  y = np.array([1, 0, 0, 1, 1, 1, 0, 0], np.float32)
  for gamma in (0.5, 2.0):
    f = lambda x, gamma=gamma: FOCAL(x, y, gamma=gamma).sum()
    g = f64(jax.jit(jax.grad(f))(x))
    hess = f64(jax.jit(jax.jacrev(jax.grad(f)))(x))
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(hess))
    d1, d2 = hard_focal_derivatives(x, y, gamma)
    assert np.abs(d1).max() > 0.5  # the wrong-side examples have gradients of size ~1
    # Relative 1e-4 where the float64 value is a normal float32; below that, 0 is right.
    np.testing.assert_allclose(g, d1, rtol=1e-4, atol=1e-37)
    np.testing.assert_allclose(np.diag(hess), d2, rtol=1e-4, atol=1e-37)
    np.testing.assert_array_equal(hess - np.diag(np.diag(hess)), 0.0)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_hessian_matches_float64_twin_at_moderate_logits(gamma):
  rng = np.random.default_rng(8)
  x = rng.uniform(-6.0, 6.0, 10).astype(np.float32)
  y = rng.uniform(size=10).astype(np.float32)
  y[:4] = [0, 1, 0, 1]
  c = rng.uniform(0.5, 2.0, 10).astype(np.float32)
  hess = jax.jit(jax.jacrev(jax.grad(lambda x: (FOCAL(x, y, 0.25, gamma) * c).sum())))(x)
  with jax.enable_x64(True):
    ref = jax.jit(jax.hessian(
        lambda x: (reference.sigmoid_focal_loss(x, f64(y), 0.25, gamma) * f64(c)).sum()))(f64(x))
    ref = np.asarray(ref)
  assert np.abs(ref).max() > 1e-2
  np.testing.assert_allclose(hess, ref, rtol=1e-4, atol=1e-7)
  # Hard labels: the hand-derived second derivative.
  _, d2 = hard_focal_derivatives(x[:4], y[:4], gamma)
  a_t = np.where(y[:4] == 1, 0.25, 0.75)
  np.testing.assert_allclose(np.diag(f64(hess))[:4], a_t * d2 * c[:4], rtol=1e-4)


def test_focal_alpha_and_gamma_are_traced_and_differentiable():
  rng = np.random.default_rng(9)
  x = rng.normal(scale=3.0, size=(5, 12)).astype(np.float32)
  y = rng.uniform(size=(5, 12)).astype(np.float32)
  y[:2] = np.round(y[:2])
  args = (np.float32(0.3), np.float32(1.5))
  per_class_alpha = rng.uniform(0.1, 0.9, 12).astype(np.float32)

  for alpha, gamma in (args, (per_class_alpha, args[1])):
    @jax.jit
    def ours(alpha, gamma):
      return jax.value_and_grad(lambda a, g: FOCAL(x, y, a, g, reduction="sum"), (0, 1))(
          alpha, gamma)

    v, (da, dg) = ours(alpha, gamma)
    assert da.shape == np.shape(alpha) and dg.shape == ()
    with jax.enable_x64(True):
      v_ref, (da_ref, dg_ref) = jax.jit(jax.value_and_grad(
          lambda a, g: reference.sigmoid_focal_loss(f64(x), f64(y), a, g, reduction="sum"),
          (0, 1)))(f64(alpha), f64(gamma))
      v_ref, da_ref, dg_ref = (np.asarray(r) for r in (v_ref, da_ref, dg_ref))
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    np.testing.assert_allclose(da, da_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-5, atol=1e-6)
    # By hand: d/dgamma = sum alpha_t u^g log(u) BCE; d/dalpha = sum (2y - 1) u^g BCE.
    u = f64(y) * np_sigmoid(-x) + (1 - f64(y)) * np_sigmoid(x)
    a64 = f64(alpha)
    a_t = a64 * y + (1 - a64) * (1 - y)
    base = u ** f64(gamma) * np_bce(x, y)
    np.testing.assert_allclose(dg, np.sum(a_t * base * np.log(u)), rtol=1e-5)
    da_hand = np.sum((2 * f64(y) - 1) * base, 0)
    np.testing.assert_allclose(da, da_hand if np.ndim(alpha) else da_hand.sum(), rtol=1e-5)


def test_focal_matches_twin_on_odd_shape_at_extreme_logits_with_mask():
  rng = np.random.default_rng(10)
  shape = (7, 1031)
  x = rng.uniform(-80.0, 80.0, shape).astype(np.float32)
  y = rng.uniform(size=shape).astype(np.float32)
  y[:3] = np.round(y[:3])
  where = rng.uniform(size=shape) > 0.2
  cts = random_cts(rng, shape)
  # gamma = 2: the twin's u**2 is well behaved at |x| = 80 (u**0.5 is not, see above).
  make = lambda fn: lambda r: lambda x, y, where: fn(x, y, 0.25, 2.0, where=where, reduction=r)
  ours = all_reductions(make(FOCAL), (x,), cts, (y, where))
  twin = all_reductions(make(reference.sigmoid_focal_loss), (x,), cts, (y, where))
  (values, (dx,)), (values_ref, (dx_ref,)) = ours, twin
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  # The twin's float32 1 - s(x) loses digits at |x| ~ 80: 5e-5 relative.
  np.testing.assert_allclose(dx, dx_ref, rtol=5e-5, atol=1e-5)
  np.testing.assert_allclose(values["none"], np.where(where, np_focal(x, y, 0.25, 2.0), 0.0),
                             rtol=1e-5, atol=1e-30)
  assert np.all(f64(dx)[~where] == 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_focal_half_precision_gives_float32_loss_of_its_values(dtype):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(scale=4.0, size=(16, 257)), dtype)
  y = jnp.asarray(rng.integers(0, 2, (16, 257)), dtype)
  x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
  v = jax.jit(lambda x, y: FOCAL(x, y, 0.25, 2.0))(x, y)
  assert v.dtype == jnp.float32
  theirs = jax.jit(lambda x, y: optax.sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0))(x32, y32)
  np.testing.assert_allclose(v, theirs, rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(v, np_focal(x32, y32, 0.25, 2.0), rtol=1e-5, atol=1e-30)
  dx = jax.jit(jax.grad(lambda x: FOCAL(x, y, 0.25, 2.0).sum()))(x)
  assert dx.dtype == dtype


def test_pos_weight_gradient_where_pos_weight_is_zero():
  # d loss / d p = y' softplus(-x): finite at p = 0 (once 0/0 = NaN, by dividing by p).
  x = np.array([[1.0, -2.0, 0.5]], np.float32)
  y = np.array([[1.0, 0.0, 1.0]], np.float32)
  pw = np.array([0.0, 1.0, 2.0], np.float32)
  for smoothing in (0.0, 0.2):
    f = lambda m, s=smoothing: lambda p: m.sigmoid_binary_cross_entropy(
        x, y, pos_weight=p, label_smoothing=s, reduction="sum"
    )
    got = jax.grad(f(jaxactv))(pw)
    ys = (1 - smoothing) * y + smoothing / 2
    want = (ys * np.logaddexp(0.0, -x.astype(np.float64))).sum(0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
