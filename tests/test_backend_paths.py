"""Every backend-dependent form, whichever backend the suite runs on.

jaxactv._backend picks, per backend and dtype, whether a cross-entropy backward
reuses the forward's exponentials (CPU) or recomputes them (GPU, TPU), which residual
the sigmoid keeps, how the fused linear ops call their matmuls (CPU: half-precision
operands converted to float32 first, ``x^T`` transposed for ``dw``), and how
log_softmax's backward sums its cotangent. The tests run on CPU, so the accelerator
forms are forced here and every form is checked against the unfused reference twins.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

import jaxactv
from jaxactv import _arith, _cross_entropy, _linear_blocks, _sigmoid, _softmax, reference


@pytest.fixture(params=[True, False], ids=["reuse", "recompute"])
def backward_form(request, monkeypatch):
  monkeypatch.setattr(_cross_entropy, "reuse_forward_exponentials", lambda dtype: request.param)
  return request.param


def _data():
  rng = np.random.default_rng(7)
  x = (3 * rng.standard_normal((9, 37))).astype(np.float32)
  x[2, 5] = -np.inf
  labels = rng.integers(0, 37, 9).astype(np.int32)
  labels[2] = 4
  soft = rng.dirichlet(np.ones(37), 9).astype(np.float32)
  soft[2, 5] = 0.0
  soft[2] /= soft[2].sum()
  mask = np.ones(9, bool)
  mask[6] = False
  return x, labels, soft, mask


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}], ids=["plain", "smooth+z"]
)
def test_integer_labels(backward_form, options):
  x, labels, _, mask = _data()
  f = lambda x, fn: fn(x, labels, where=mask, reduction="mean", **options)
  got = jax.jit(jax.grad(lambda x: f(x, jaxactv.softmax_cross_entropy_with_integer_labels)))(x)
  want = jax.jit(jax.grad(lambda x: f(x, reference.softmax_cross_entropy_with_integer_labels)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}], ids=["plain", "smooth+z"]
)
def test_soft_labels(backward_form, options):
  x, _, soft, mask = _data()
  if options:
    x = np.where(np.isinf(x), 0.0, x).astype(np.float32)  # smoothing puts mass on every class
  f = lambda x, t, fn: fn(x, t, where=mask, reduction="mean", **options)
  got = jax.jit(jax.grad(lambda x, t: f(x, t, jaxactv.softmax_cross_entropy), (0, 1)))(x, soft)
  want = jax.jit(jax.grad(lambda x, t: f(x, t, reference.softmax_cross_entropy), (0, 1)))(
      x, soft)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-7)
  finite = np.isfinite(np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[1])[finite], np.asarray(want[1])[finite], rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_large_logits_keep_the_gradient_exact(backward_form, dtype, scale):
  # The recomputing form once took exp(x - lse), rounding lse at the scale of the max:
  # at logits of 1e4 float32 probabilities were off by 5e-4, and bfloat16 [1e30, 1e30, 0]
  # got gradient [0.5, 0.5, 0] for targets [0.5, 0.5, 0]. Float64 NumPy says:
  base = np.array([[0.0, 0.0, -1.0], [0.0, -0.5, -3.0]])
  x64 = np.asarray(jnp.asarray(scale + base, dtype).astype(jnp.float32), np.float64)
  x = jnp.asarray(x64, dtype)
  e = np.exp(x64 - x64.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  t = np.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
  labels = np.array([0, 2])
  soft = jax.jit(jax.grad(lambda x: jaxactv.softmax_cross_entropy(x, jnp.asarray(t, dtype)).sum()))
  hard = jax.jit(jax.grad(
      lambda x: jaxactv.softmax_cross_entropy_with_integer_labels(x, labels).sum()))
  tol = 2e-7 if dtype == jnp.float32 else 2.0**-8
  np.testing.assert_allclose(np.asarray(soft(x), np.float64), p - t, rtol=0, atol=tol)
  np.testing.assert_allclose(np.asarray(hard(x), np.float64), p - np.eye(3)[labels], rtol=0,
                             atol=tol)


# ---------------------------------------------------- sigmoid: the two residual forms


@pytest.fixture(params=[True, False], ids=["keep s", "keep x"])
def sigmoid_residual(request, monkeypatch):
  # On CPU half-precision sigmoids keep s = sigmoid(-|x|), elsewhere x: force each.
  monkeypatch.setattr(_sigmoid, "keep_sigmoid_of_minus_abs", lambda dtype: request.param)
  jax.clear_caches()  # jaxactv.sigmoid is jitted: trace it again under the patch
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sigmoid_residual_forms(sigmoid_residual, dtype):
  x = np.array([-np.inf, -80, -17, -3, -1, -0.0, 0, 1e-3, 0.5, 1, 3, 17, 30, 80, np.inf],
               np.float32)
  xd = jnp.asarray(x, dtype)
  x64 = np.asarray(xd.astype(jnp.float32), np.float64)
  g = jnp.asarray(np.linspace(-2, 2, x.size), dtype)
  y, dx = jax.jit(lambda x, g: (lambda y, pb: (y, pb(g)[0]))(*jax.vjp(jaxactv.sigmoid, x)))(xd, g)
  assert y.dtype == dx.dtype == dtype
  with np.errstate(over="ignore"):
    e = np.exp(-np.abs(x64))
    want_y = np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))
    want_dx = np.asarray(g.astype(jnp.float32), np.float64) * e / (1 + e) ** 2
  eps = 4 * float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=eps, atol=0)
  # Relative to the exact tails (e^-17 ~ 4e-8, e^-80 ~ 2e-35), not absolute.
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=eps, atol=0)
  # Forward-over-reverse sees through either rule: the second derivative
  # sigma'(x) (1 - 2 sigma(x)), float32 only (bfloat16 rounds it away).
  if dtype == jnp.float32:
    xs = jnp.asarray([-17.0, -3.0, -0.5, 0.0, 0.5, 3.0, 17.0], jnp.float32)
    h = jax.jit(jax.jacfwd(jax.grad(lambda x: jaxactv.sigmoid(x).sum())))(xs)
    x64 = np.asarray(xs, np.float64)
    s = 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(np.asarray(h, np.float64), np.diag(s * (1 - s) * (1 - 2 * s)),
                               rtol=1e-5, atol=1e-12)


# ------------------------------------------ log_softmax backward: its four switches


@pytest.fixture(params=[True, False], ids=["exp loop", "exp in sum"])
def exp_loop_form(request, monkeypatch):
  # On CPU, float32 rows of more than 1024 logits take exp in a loop of its own.
  monkeypatch.setattr(_softmax, "exponentials_in_own_loop", lambda dtype, n: request.param)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


@pytest.fixture(params=[2, None], ids=["in pieces of 2", "whole rows"])
def row_pieces(request, monkeypatch):
  # On CPU rows of more than 32768 values are reduced a piece at a time.
  piece = request.param
  monkeypatch.setattr(
      _arith, "long_row_piece", lambda n: piece if piece and n % piece == 0 and n > piece else None
  )
  jax.clear_caches()
  yield piece
  jax.clear_caches()


# log_softmax's four form switches: (keep x, matvec row sum, exp loop, rows in pieces of 2).
# All sixteen settings would cost a compile each for every axis, dtype and mask. The eight
# with an even number of switches on hold every setting of every three switches together,
# so any one, two or three switches that broke the backward show on every axis, dtype and
# mask below. Two settings CPU itself takes have odd parity and are added: bfloat16 rows
# (keep x only) and float32 rows of 1025 to 32768 logits (all but pieces).
LOG_SOFTMAX_FORMS = [
    forms for forms in itertools.product([True, False], repeat=4) if sum(forms) % 2 == 0
] + [(True, False, False, False), (True, True, True, False)]


@pytest.fixture(params=LOG_SOFTMAX_FORMS, ids=lambda forms: "".join("TF"[not f] for f in forms))
def log_softmax_forms(request, monkeypatch):
  keep_x, matvec, exp_loop, pieces = request.param
  # matvec: on CPU float32 log_softmax sums its cotangent as g @ ones, elsewhere with a
  # reduce. The other three as in log_softmax_keeps_x, exp_loop_form and row_pieces.
  monkeypatch.setattr(_softmax, "reuse_forward_exponentials", lambda dtype: keep_x)
  monkeypatch.setattr(_arith, "row_sum_as_matvec", lambda dtype: matvec)
  monkeypatch.setattr(_softmax, "exponentials_in_own_loop", lambda dtype, n: exp_loop)
  monkeypatch.setattr(
      _arith, "long_row_piece", lambda n: 2 if pieces and n % 2 == 0 and n > 2 else None
  )
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("masked", [False, True], ids=["", "where"])
@pytest.mark.parametrize("axis", [-1, (1, 2), 1], ids=["last", "last two", "middle"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_log_softmax_backward_forms(log_softmax_forms, axis, dtype, masked):
  rng = np.random.default_rng(11)
  x = (3 * rng.standard_normal((5, 3, 6))).astype(np.float32)
  x[0, 1, 2] = -np.inf  # one -inf logit: value -inf, gradient 0
  x[1, 2, :] = -np.inf  # a row with nothing to normalise (over the last axis)
  x[2, 0, 4] = np.inf  # a +inf logit: 1/k on the +inf entries
  # A +inf row with the largest finite float in it: that logit counts as +inf too.
  x[3, 1, 0], x[3, 1, 3] = np.inf, float(jnp.finfo(dtype).max)
  # A NaN row with a -inf logit (and, masked, a masked entry): NaN everywhere in it.
  x[4, 0, 1], x[4, 0, 3] = np.nan, -np.inf
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  keep = rng.uniform(size=x.shape) > 0.2 if masked else np.ones(x.shape, bool)
  keep[4, 0, 1] = True  # the NaN stays visible
  if masked:
    keep[4, 0, 5] = False
  g = rng.standard_normal(x.shape).astype(np.float32)
  xd, gd = jnp.asarray(x, dtype), jnp.asarray(g, dtype)
  where = jnp.asarray(keep) if masked else None
  y, dx = jax.jit(lambda x, g: (lambda y, pb: (y, pb(g)[0]))(
      *jax.vjp(lambda x: jaxactv.log_softmax(x, axis, where=where), x)))(xd, gd)
  # Float64 NumPy: dx = g - softmax * sum(g) over the row's unmasked entries, 0 where
  # the value is -inf; a masked entry is a -inf logit; NaN on a row holding a NaN.
  axes = (axis,) if isinstance(axis, int) else axis
  x64 = np.where(keep, x.astype(np.float64), -np.inf)
  g64 = np.where(keep, np.asarray(gd.astype(jnp.float32), np.float64), 0.0)
  nan_row = np.isnan(x64).any(axes, keepdims=True)
  m = np.where(nan_row, 0.0, np.nanmax(np.where(np.isnan(x64), -np.inf, x64), axes, keepdims=True))
  inf_row = m == np.inf
  big = float(jnp.finfo(dtype).max)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    e = np.where(inf_row, (x64 >= big) * 1.0, np.exp(x64 - np.where(np.isfinite(m), m, 0)))
    s = e.sum(axes, keepdims=True)
    p = np.where(s > 0, e / np.where(s > 0, s, 1), 0.0)
    # x - m - log s on finite rows: log p would underflow to -inf at x - m ~ -finfo.max.
    want_y = np.where(inf_row | (s == 0), np.log(p), x64 - m - np.log(np.where(s > 0, s, 1)))
  want_dx = np.where(want_y == -np.inf, 0.0, g64 - p * g64.sum(axes, keepdims=True))
  want_y, want_dx = (np.where(nan_row, np.nan, a) for a in (want_y, want_dx))
  tol = 2e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("rows", ["random", "confident", "one class"])
def test_second_order_both_residuals(log_softmax_keeps_x, exp_loop_form, name, rows):
  # jax.hessian differentiates the backward pass: through y when y is kept, through the
  # rebuilt forward when x is. "confident" (0 and -20: exp(-20) is lost next to 1) and
  # "one class" rows sum to exactly 1, where a max(sum, 1) guard would halve the
  # derivative. Against the reference twin, which has no guard.
  rng = np.random.default_rng(13)
  x = {
      "random": rng.standard_normal((3, 5)),
      "confident": np.array([[0.0, -20.0], [1.0, 0.5]]),
      "one class": np.array([[0.3], [-2.0]]),
  }[rows]
  x, c, v = (jnp.asarray(a, jnp.float32) for a in (x, *rng.standard_normal((2, *x.shape))))

  def hvp_and_hessian(f):
    def scalar(x):
      return jnp.vdot(f(x), c)

    return jax.jvp(jax.grad(scalar), (x,), (v,))[1], jax.hessian(scalar)(x)

  got = jax.jit(lambda: hvp_and_hessian(getattr(jaxactv, name)))()
  want = jax.jit(lambda: hvp_and_hessian(getattr(reference, name)))()
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_reverse_over_reverse_on_a_plus_inf_row(log_softmax_keeps_x, exp_loop_form, name):
  # jacrev of jacrev multiplies every branch's derivative by its cotangent, the unused
  # branch of a select included: an inf there would give 0 * inf = NaN. A +inf row is
  # constant under any finite change (1/k and 0, or -log k and -inf): its block of the
  # Hessian is 0; the finite row's block is the reference twin's on that row alone.
  rng = np.random.default_rng(23)
  x = np.stack([[np.inf, 0.5, np.inf, -1.0, 2.0, 0.0], rng.standard_normal(6)]).astype(np.float32)
  c = rng.standard_normal(x.shape).astype(np.float32)

  def hessian(f, x, c):
    return jax.jacrev(jax.jacrev(lambda x: jnp.vdot(jnp.where(jnp.isinf(f(x)), 0.0, f(x)), c)))(x)

  got = np.asarray(jax.jit(lambda x: hessian(getattr(jaxactv, name), x, c))(x))
  assert np.all(np.isfinite(got)), got
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(got[:, :, 0], 0.0)
  want = jax.jit(lambda x: hessian(getattr(reference, name), x, c[1:]))(x[1:])
  np.testing.assert_allclose(got[1, :, 1], np.asarray(want)[0, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_softmax_exponential_forms(exp_loop_form, row_pieces, dtype):
  # The edge rows of the module docs, either way exp is placed: float64 NumPy.
  big = float(jnp.finfo(dtype).max)
  x = np.array([
      [0.5, -1.0, 2.0, -np.inf],  # an ordinary row with a -inf logit
      [np.inf, 1.0, big, np.inf],  # +inf row: finfo.max counts as +inf
      [-np.inf] * 4,  # nothing to normalise
      [big, 0.0, -1.0, 1.0],  # a finite row whose max is finfo.max
      [np.nan, 0.0, 1.0, 2.0],  # NaN poisons its row
  ])
  xd = jnp.asarray(x, dtype)
  x = np.asarray(xd.astype(jnp.float32), np.float64)
  g = np.random.default_rng(5).standard_normal(x.shape)
  y, dx = jax.jit(lambda x, g: (lambda y, pb: (y, pb(g)[0]))(*jax.vjp(jaxactv.softmax, x)))(
      xd, jnp.asarray(g, dtype))
  with np.errstate(invalid="ignore"):
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
  p[1] = [1 / 3, 0.0, 1 / 3, 1 / 3]  # the dtype's own finfo.max is one of the +inf entries
  p[2] = 0.0
  gd = np.asarray(jnp.asarray(g, dtype).astype(jnp.float32), np.float64)
  want_dx = p * (gd - (gd * p).sum(-1, keepdims=True))
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), p, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_long_rows_take_the_exp_loop_unpatched(name):
  # 4096 float32 logits a row: the CPU form with exp in its own loop, against the twin,
  # with a +inf row and an empty row among them.
  assert _softmax.exponentials_in_own_loop(jnp.float32, 4096) == (jax.default_backend() == "cpu")
  rng = np.random.default_rng(17)
  x = (4 * rng.standard_normal((4, 4096))).astype(np.float32)
  x[1, [7, 4000]] = np.inf
  x[2] = -np.inf
  g = rng.standard_normal(x.shape).astype(np.float32)
  got = jax.jit(lambda x: jax.vjp(getattr(jaxactv, name), x)[1](g)[0])(x)
  y = jax.jit(getattr(jaxactv, name))(x)
  finite = np.asarray(x[[0, 3]], np.float64)
  lse = np.log(np.exp(finite - finite.max(-1, keepdims=True)).sum(-1, keepdims=True))
  lp = finite - finite.max(-1, keepdims=True) - lse
  want = np.exp(lp) if name == "softmax" else lp
  np.testing.assert_allclose(np.asarray(y)[[0, 3]], want, rtol=2e-6, atol=1e-7)
  inf_row = np.where(np.isinf(x[1]), 0.5, 0.0)
  if name == "softmax":
    np.testing.assert_array_equal(np.asarray(y)[1], inf_row)
    np.testing.assert_array_equal(np.asarray(y)[2], 0.0)
  else:
    with np.errstate(divide="ignore"):  # log 0 = -inf: the row's other logits
      np.testing.assert_allclose(np.asarray(y)[1], np.log(inf_row), rtol=1e-6)
    assert np.all(np.asarray(y)[2] == -np.inf)
  # Float64 NumPy; float32 row sums over 4096 entries round at about 4e-6 of their size.
  g64 = np.asarray(g[[0, 3]], np.float64)
  p = np.exp(lp)
  if name == "softmax":
    want_dx = p * (g64 - (g64 * p).sum(-1, keepdims=True))
  else:
    want_dx = g64 - p * g64.sum(-1, keepdims=True)
  atol = 1e-9 if name == "softmax" else 2e-5  # softmax's terms are scaled by p ~ 1/4096
  np.testing.assert_allclose(np.asarray(got)[[0, 3]], want_dx, rtol=1e-5, atol=atol)
  assert np.all(np.isfinite(np.asarray(got)[[1, 2]]))


# ------------------------------- soft labels: shared or separate sweeps; long rows


@pytest.fixture(params=[True, False], ids=["separate sweeps", "shared shift"])
def soft_sweeps_form(request, monkeypatch):
  # On CPU, float32 rows of more than 1024 logits: three sweeps that share nothing.
  monkeypatch.setattr(
      _cross_entropy, "soft_loss_in_separate_sweeps", lambda dtype, n: request.param
  )
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


def _soft_edge_rows(dtype):
  # Float64 NumPy: loss = sum_j t_j (lse - x_j), gradient sum(t) softmax(x) - t.
  x = np.array([
      [0.5, -1.0, 2.0, 0.0, 1.0, -3.0, 0.25, 4.0],  # ordinary
      [0.5, -np.inf, 2.0, 0.0, 1.0, -3.0, 0.25, 4.0],  # -inf logit, no mass on it: finite
      [0.5, -np.inf, 2.0, 0.0, 1.0, -3.0, 0.25, 4.0],  # -inf logit with mass: inf
      [-np.inf] * 8,  # nothing to normalise, no mass: 0
      [-np.inf] * 8,  # nothing to normalise, with mass: inf
      [np.nan, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0],  # NaN poisons its row
  ])
  rng = np.random.default_rng(23)
  t = rng.dirichlet(np.ones(8), len(x))
  t[1, 1] = 0.0
  t[3] = 0.0
  xd = jnp.asarray(x, dtype)
  return xd, np.asarray(xd.astype(jnp.float32), np.float64), jnp.asarray(t, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_soft_label_forms_on_edge_rows(soft_sweeps_form, row_pieces, dtype):
  xd, x, td = _soft_edge_rows(dtype)
  t = np.asarray(td.astype(jnp.float32), np.float64)
  f = lambda x, t: jaxactv.softmax_cross_entropy(x, t)
  loss = jax.jit(f)(xd, td)
  dx, dt = jax.jit(jax.grad(lambda x, t: f(x, t)[:2].sum(), (0, 1)))(xd, td)
  fin = x[:2]
  lse = np.log(np.exp(fin - fin.max(-1, keepdims=True)).sum(-1)) + fin.max(-1)
  with np.errstate(invalid="ignore"):
    want = (t[:2] * np.where(t[:2] == 0, 0.0, lse[:, None] - fin)).sum(-1)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  loss = np.asarray(loss, np.float64)
  np.testing.assert_allclose(loss[:2], want, rtol=tol)
  np.testing.assert_array_equal(loss[2:], [np.inf, 0.0, np.inf, np.nan])
  p = np.exp(fin - lse[:, None])
  want_dx = t[:2].sum(-1, keepdims=True) * p - t[:2]
  np.testing.assert_allclose(np.asarray(dx[:2], np.float64), want_dx, rtol=tol, atol=tol * 1e-2)
  np.testing.assert_array_equal(np.asarray(dx[2:5]), 0.0)  # their loss is not in the sum
  assert dx[1, 1] == 0.0  # the -inf logit
  # d loss / d t_j = lse - x_j: +inf at the -inf logit.
  assert dt[1, 1] == np.inf
  np.testing.assert_allclose(np.asarray(dt[0], np.float64), lse[0] - fin[0], rtol=tol, atol=tol)


def test_soft_label_forms_second_order(soft_sweeps_form, row_pieces):
  # jax.hessian through the rule (forward-over-reverse) against the unfused twin, with
  # z-loss, on soft labels that do not sum to one.
  rng = np.random.default_rng(29)
  x = (2 * rng.standard_normal((2, 8))).astype(np.float32)
  t = (rng.dirichlet(np.ones(8), 2) * [[1.0], [0.5]]).astype(np.float32)
  opts = {"z_loss": 1e-2, "reduction": "sum"}
  got = jax.jit(jax.hessian(lambda x: jaxactv.softmax_cross_entropy(x, t, **opts)))(x)
  want = _reference_once(("soft ce hessian", 29), lambda: jax.jit(jax.hessian(
      lambda x: reference.softmax_cross_entropy(x, t, **opts)))(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


_REFERENCES: dict = {}


def _reference_once(key, compute):
  """The twin's answer, computed for the first of a test's forms and reused for the rest.

  The patched forms live in jaxactv's private modules. jaxactv.reference computes with
  none of them (it takes only the ``LinearCrossEntropyAux`` type from one, for
  ``return_aux``), so its answer is the same under every form.
  """
  if key not in _REFERENCES:
    _REFERENCES[key] = jax.tree.map(np.asarray, compute())
  return _REFERENCES[key]


@pytest.mark.parametrize("axes", [(-1,), (1, 2)], ids=["last", "last two"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reduce_rows_in_pieces(row_pieces, axes, keepdims):
  rng = np.random.default_rng(37)
  a = rng.standard_normal((3, 4, 8)).astype(np.float32)
  a[1, :, :] = -np.inf
  axes = tuple(d % a.ndim for d in axes)
  for reduce, want in [(jnp.sum, np.sum), (_arith.max_at_least(-1.0), None)]:
    got = jax.jit(lambda a, reduce=reduce: _arith.reduce_rows(reduce, a, axes, keepdims))(a)
    if want is None:  # the max over the rows and -1
      expect = np.maximum(np.max(a, axes, keepdims=keepdims), -1.0)
    else:
      expect = want(a.astype(np.float64), axes, keepdims=keepdims)
    np.testing.assert_allclose(got, expect, rtol=1e-6)


@pytest.mark.parametrize("n", [65536, 4096], ids=["in pieces", "whole rows"])
def test_long_rows_unpatched(n):
  # The forms CPU picks for itself: at 65536 float32 logits a row every row reduction
  # goes in pieces of 16384; at 4096 rows are reduced whole and the soft-label loss
  # takes its separate sweeps. The losses and log_softmax against float64 NumPy, with
  # -inf logits and an empty row.
  on_cpu = jax.default_backend() == "cpu"
  assert _arith.long_row_piece(65536) == (16384 if on_cpu else None)
  assert _arith.long_row_piece(32768) is None
  assert _cross_entropy.soft_loss_in_separate_sweeps(jnp.float32, n) == on_cpu
  rng = np.random.default_rng(41)
  x = (3 * rng.standard_normal((3, n))).astype(np.float32)
  x[0, :100] = -np.inf
  x[2] = -np.inf
  t = rng.dirichlet(np.ones(n), 3).astype(np.float32)
  t[0, :100] = 0.0
  t[2] = 0.0
  labels = np.array([500, 7, 0], np.int32)
  x64 = x[:2].astype(np.float64)
  lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
  with np.errstate(invalid="ignore"):
    soft = (t[:2] * np.where(t[:2] == 0, 0.0, lse[:, None] - x64)).sum(-1)
  got = jax.jit(jaxactv.softmax_cross_entropy)(x, t)
  np.testing.assert_allclose(got[:2], soft, rtol=2e-6)
  assert got[2] == 0.0
  got = jax.jit(jaxactv.softmax_cross_entropy_with_integer_labels)(x, labels)
  np.testing.assert_allclose(got[:2], lse - x64[[0, 1], labels[:2]], rtol=2e-6)
  assert got[2] == np.inf
  y = jax.jit(jaxactv.log_softmax)(x)
  np.testing.assert_allclose(y[:2], x64 - lse[:, None], rtol=2e-6, atol=2e-6)
  assert np.all(np.asarray(y[2]) == -np.inf)
  dx = jax.jit(jax.grad(lambda x: jaxactv.softmax_cross_entropy(x, t).sum()))(x)
  p = np.exp(x64 - lse[:, None])
  np.testing.assert_allclose(dx[:2], t[:2].sum(-1, keepdims=True) * p - t[:2], rtol=1e-5,
                             atol=1e-10)
  np.testing.assert_array_equal(dx[2], 0.0)


@pytest.mark.parametrize("n", [65536, 4096], ids=["in pieces", "whole rows"])
def test_long_rows_where_users_run_them(n):
  # The CPU forms of long rows on a jax.make_mesh mesh (Explicit axes), classes split
  # and not, under checkify, strict promotion and jax.export: against optax and jax.nn.
  rng = np.random.default_rng(43)
  x = (3 * rng.standard_normal((8, n))).astype(np.float32)
  t = rng.dirichlet(np.ones(n), 8).astype(np.float32)
  labels = rng.integers(0, n, 8).astype(np.int32)
  want = (optax.softmax_cross_entropy(x, t),
          optax.softmax_cross_entropy_with_integer_labels(x, labels), jax.nn.log_softmax(x))

  def ops(x, t, labels):
    return (jaxactv.softmax_cross_entropy(x, t),
            jaxactv.softmax_cross_entropy_with_integer_labels(x, labels), jaxactv.log_softmax(x))

  def check(got):
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(np.asarray(g), w, rtol=3e-6, atol=3e-6)

  mesh = jax.make_mesh((2, 4), ("data", "model"))
  for spec in [P("data", None), P("data", "model")]:
    with jax.set_mesh(mesh):
      args = (jax.device_put(x, spec), jax.device_put(t, spec),
              jax.device_put(labels, P("data")))
      check(jax.jit(ops)(*args))
  err, got = jax.jit(checkify.checkify(ops, errors=checkify.all_checks))(x, t, labels)
  err.throw()
  check(got)
  with jax.numpy_dtype_promotion("strict"):
    check(jax.export.export(jax.jit(ops))(x, t, labels).call(x, t, labels))


# --------------------------------------------- fused linear ops: the two matmul forms


@pytest.fixture(params=[True, False], ids=["cpu matmuls", "accelerator matmuls"])
def matmul_form(request, monkeypatch):
  monkeypatch.setattr(_linear_blocks, "upcast_half_matmul_operands", lambda dtype: request.param)
  monkeypatch.setattr(_linear_blocks, "transpose_dw_operand", lambda: request.param)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("chunk_size", [(16, 64), (8, 24)], ids=["one slice", "slices"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=["f32", "bf16", "f16"])
def test_linear_matmul_forms(matmul_form, chunk_size, dtype, seed=3):
  rng = np.random.default_rng(seed)
  n, d, v = 37, 16, 64
  x = jnp.asarray(rng.standard_normal((n, d)), dtype)
  w = jnp.asarray(rng.standard_normal((d, v)) / 4, dtype)
  b = jnp.asarray(rng.standard_normal(v) / 4, dtype)
  y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  mask = jnp.asarray(rng.random(n) > 0.2)
  # Masked-out rows hold NaN hidden states: they must add nothing to dw or db.
  x_nan = jnp.where(mask[:, None], x, jnp.nan)

  def ce(fn, **kw):
    return lambda x, w, b: fn(x, w, y, bias=b, where=mask, label_smoothing=0.1, **kw)

  got = jax.jit(jax.value_and_grad(
      ce(jaxactv.linear_softmax_cross_entropy, chunk_size=chunk_size), (0, 1, 2)))(x_nan, w, b)
  want = _reference_once(("linear ce", seed, dtype), lambda: jax.jit(jax.value_and_grad(
      ce(reference.linear_softmax_cross_entropy), (0, 1, 2)))(x, w, b))
  f32 = lambda t: np.asarray(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(f32(got[0]), f32(want[0]), rtol=2e-5)
  for g, r in zip(got[1], want[1], strict=True):
    assert g.dtype == dtype
    close_to_reference(f32(g), f32(r), dtype, matmul_form)

  def lp(fn, **kw):
    return lambda x, w: fn(x, w, y, bias=b, return_entropy=True, **kw)

  def total(f):
    return lambda x, w: sum(jnp.sum(t) for t in f(x, w))

  fused = lp(jaxactv.linear_log_probs, chunk_size=chunk_size)
  got = jax.jit(jax.value_and_grad(total(fused), (0, 1)))(x, w)
  want = _reference_once(("linear log probs", seed, dtype), lambda: jax.jit(jax.value_and_grad(
      total(lp(reference.linear_log_probs)), (0, 1)))(x, w))
  np.testing.assert_allclose(f32(got[0]), f32(want[0]), rtol=2e-5)
  for g, r in zip(got[1], want[1], strict=True):
    close_to_reference(f32(g), f32(r), dtype, matmul_form)


def close_to_reference(got, want, dtype, cpu_form):
  eps = float(jnp.finfo(dtype).eps)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  elif cpu_form:
    # Float32 matmuls: dw rounds once, at the end; the summed loss's dx rounds when its
    # chunk is stored and again when scaled by the cotangent. Two ulp of the entry.
    np.testing.assert_allclose(got, want, rtol=2 * eps, atol=1e-6)
  else:
    # The logits' cotangent is rounded to half precision for the matmuls, as an unfused
    # half-precision model would: two ulp of the largest entry.
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * eps * np.abs(want).max())
