"""Bad input to the losses: clear errors at trace time, NaN (never a wrong class) under jit.

Each error must name what was wrong (the argument, the shapes, the allowed values).
Out-of-range integer labels raise when the labels are concrete; under ``jax.jit`` no
exception can be raised, so that example's loss and gradient are NaN while the other
examples keep their correct values (checked against optax and float64 NumPy).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest

import jaxactv

INT = jaxactv.softmax_cross_entropy_with_integer_labels
SOFT = jaxactv.softmax_cross_entropy
BCE = jaxactv.sigmoid_binary_cross_entropy
FOCAL = jaxactv.sigmoid_focal_loss
KL = jaxactv.kl_divergence_from_logits
ENTROPY = jaxactv.entropy_from_logits

X = np.zeros((3, 5), np.float32)
LABELS = np.array([0, 4, 2])

# name -> (loss, its second argument for logits X): every loss, callable as fn(x, second, **kw).
SECOND = {
    "int": (INT, LABELS),
    "soft": (SOFT, np.full((3, 5), 0.2, np.float32)),
    "bce": (BCE, np.zeros((3, 5), np.float32)),
    "focal": (FOCAL, np.zeros((3, 5), np.float32)),
    "kl": (KL, np.zeros((3, 5), np.float32)),
    "entropy": (lambda x, _, **kw: ENTROPY(x, **kw), None),
}


def call(name, x=X, second=None, **kwargs):
  fn, default = SECOND[name]
  return fn(x, default if second is None else second, **kwargs)


# ----------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name, bad", [
    ("int", np.zeros((4,), np.int32)),
    ("int", np.zeros((3, 1), np.int32)),
    ("soft", np.zeros((3, 4), np.float32)),
    ("bce", np.zeros((3, 4), np.float32)),
    ("focal", np.zeros((5, 3), np.float32)),
    ("kl", np.zeros((3, 4), np.float32)),
])
def test_shape_mismatch_names_both_shapes(name, bad):
  with pytest.raises(ValueError) as info:
    call(name, second=bad)
  msg = str(info.value)
  assert str(bad.shape) in msg and str(X.shape) in msg, msg


def test_shape_mismatch_is_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match=re.escape("(3, 4)")):
    jax.jit(SOFT)(X, np.zeros((3, 4), np.float32))
  with pytest.raises(ValueError, match=re.escape("(4,)")):
    jax.jit(INT)(X, np.zeros((4,), np.int32))


def test_integer_labels_with_tuple_axis_need_the_batch_shape():
  x = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError) as info:
    INT(x, np.zeros((2, 3), np.int32), axis=(1, 2))
  assert "(2,)" in str(info.value) and "(2, 3)" in str(info.value)


# ------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("labels", [np.zeros(3, np.float32), np.zeros(3, bool),
                                    np.array([0.0, 1.0, 2.0])], ids=["f32", "bool", "f64"])
def test_float_or_bool_labels_to_the_integer_label_op_raise_type_error(labels):
  with pytest.raises(TypeError, match="integer"):
    INT(X, labels)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.bool_, np.uint8])
@pytest.mark.parametrize("name", list(SECOND))
def test_integer_or_boolean_logits_raise_type_error(name, dtype):
  with pytest.raises(TypeError, match="logits"):
    call(name, x=np.zeros((3, 5), dtype))


def test_integer_target_logits_raise_type_error():
  with pytest.raises(TypeError, match="target_logits"):
    KL(X, np.zeros((3, 5), np.int32))


# ------------------------------------------------------------------------ options


@pytest.mark.parametrize("reduction", ["avg", "Mean", "", None, "batchmean"])
@pytest.mark.parametrize("name", list(SECOND))
def test_unknown_reduction_lists_the_allowed_values(name, reduction):
  with pytest.raises(ValueError) as info:
    call(name, reduction=reduction)
  msg = str(info.value)
  assert "reduction" in msg and all(f"'{r}'" in msg for r in ("none", "mean", "sum")), msg


@pytest.mark.parametrize("name, option, value", [
    ("int", "label_smoothing", -0.1),
    ("int", "z_loss", -1e-4),
    ("soft", "label_smoothing", -0.5),
    ("soft", "z_loss", -1.0),
    ("bce", "label_smoothing", -1e-3),
    ("focal", "gamma", -0.5),
    ("focal", "gamma", float("nan")),
    ("focal", "alpha", -0.25),
])
def test_negative_option_raises_value_error_naming_it(name, option, value):
  with pytest.raises(ValueError, match=option):
    call(name, **{option: value})


@pytest.mark.parametrize("name", ["int", "soft", "bce"])
def test_label_smoothing_above_one_raises(name):
  with pytest.raises(ValueError, match="label_smoothing"):
    call(name, label_smoothing=1.5)
  # The closed interval's end is fine (traced: one compiled program, not op-by-op).
  jax.jit(lambda x: call(name, x=x, label_smoothing=1.0))(X)


def test_label_smoothing_over_zero_classes_raises_naming_it():
  empty = np.zeros((2, 0), np.float32)
  with pytest.raises(ValueError, match=r"label_smoothing=0\.1 .* shape \(2, 0\)"):
    SOFT(empty, empty, label_smoothing=0.1)
  # Without smoothing an empty class axis sums to 0, as in optax.
  np.testing.assert_array_equal(SOFT(empty, empty), optax.softmax_cross_entropy(empty, empty))


def test_alpha_above_one_raises():
  with pytest.raises(ValueError, match="alpha"):
    FOCAL(X, X, alpha=1.25)


@pytest.mark.parametrize("shape", [(4,), (6,), (1, 5), (5, 1), ()])
def test_class_weights_of_the_wrong_shape_raise(shape):
  with pytest.raises(ValueError) as info:
    INT(X, LABELS, class_weights=np.ones(shape, np.float32))
  msg = str(info.value)
  assert "class_weights" in msg and "(5,)" in msg and str(shape) in msg, msg


def test_unbroadcastable_pos_weight_and_where_raise():
  with pytest.raises(ValueError, match="pos_weight"):
    BCE(X, X, pos_weight=np.ones(4, np.float32))
  with pytest.raises(ValueError, match="where"):
    BCE(X, X, where=np.ones((3, 4), bool))
  with pytest.raises(ValueError, match="where"):
    SOFT(X, X, where=np.ones((4,), bool))
  with pytest.raises(TypeError, match="where"):
    KL(X, X, where=np.ones((3, 5), np.float32))


def test_non_integer_ignore_index_raises():
  with pytest.raises(TypeError, match="ignore_index"):
    INT(X, LABELS, ignore_index=1.0)


# -------------------------------------------------------------- out-of-range labels


@pytest.mark.parametrize("labels, first", [
    (np.array([0, 7, 2]), 7),
    (np.array([0, 1, -1]), -1),
    (np.array([5, 9, 2]), 5),  # the first bad value, not the largest
])
def test_out_of_range_concrete_labels_name_the_value_and_the_class_count(labels, first):
  for run in (lambda: INT(X, labels), lambda: jax.jit(lambda x: INT(x, labels))(X)):
    with pytest.raises(ValueError) as info:
      run()
    msg = str(info.value)
    assert f"= {first}" in msg and "5 classes" in msg, msg


def test_ignore_index_values_are_not_out_of_range():
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  labels = np.array([-100, 3, 77, 0])
  with pytest.raises(ValueError, match="= 77"):
    INT(x, labels, ignore_index=-100)
  labels = np.array([-100, 3, -100, 0])
  # Concrete labels (closed over) under jit: checked while tracing, computed compiled.
  got = np.asarray(jax.jit(lambda x: INT(x, labels, ignore_index=-100))(x))
  expected = np.asarray(jax.jit(optax.softmax_cross_entropy_with_integer_labels)(
      x, np.clip(labels, 0, 4)))
  np.testing.assert_allclose(got, np.where(labels == -100, 0.0, expected), rtol=1e-6)
  # An ignore_index that is out of range the other way.
  got = np.asarray(jax.jit(lambda x: INT(x, np.array([9, 3, 9, 0]), ignore_index=9))(x))
  np.testing.assert_allclose(got[[1, 3]], expected[[1, 3]], rtol=1e-6)
  assert got[0] == got[2] == 0.0


@pytest.mark.parametrize("options", [
    {},
    {"label_smoothing": 0.1, "class_weights": np.linspace(0.5, 2.0, 7, dtype=np.float32),
     "z_loss": 1e-3, "ignore_index": -100},
], ids=["plain", "every-option"])
def test_out_of_range_traced_labels_give_nan_for_that_example_only(options):
  rng = np.random.default_rng(1)
  x = rng.normal(scale=2.0, size=(6, 7)).astype(np.float32)
  labels = np.array([1, 7, 3, -1, 6, 1000], np.int32)  # 7, -1 and 1000 are not classes
  bad = np.array([False, True, False, True, False, True])
  ct = rng.normal(size=6).astype(np.float32)

  @jax.jit
  def run(x, labels, ct):
    loss, pull = jax.vjp(lambda x: INT(x, labels, **options), x)
    return loss, pull(ct)[0]

  loss, grad = run(x, labels, ct)
  loss, grad = np.asarray(loss, np.float64), np.asarray(grad, np.float64)
  assert np.all(np.isnan(loss[bad])), loss
  assert np.all(np.isnan(grad[bad])), grad[bad]
  # The good examples: the float64 formula, and never a wrapped or clamped class.
  good = ~bad
  xg = x[good].astype(np.float64)
  logp = xg - xg.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  eps = options.get("label_smoothing", 0.0)
  w = options.get("class_weights", np.ones(7, np.float32)).astype(np.float64)
  lg = labels[good]
  lse = np.log(np.exp(xg).sum(-1))
  expected = ((1 - eps) * w[lg] * -logp[np.arange(3), lg] + eps / 7 * (w * -logp).sum(-1)
              + options.get("z_loss", 0.0) * lse**2)
  np.testing.assert_allclose(loss[good], expected, rtol=1e-5)
  assert np.all(np.isfinite(grad[good]))
  t = (1 - eps) * w[lg][:, None] * np.eye(7)[lg] + eps / 7 * w
  a = t.sum(-1, keepdims=True) + 2 * options.get("z_loss", 0.0) * lse[:, None]
  np.testing.assert_allclose(grad[good], (a * np.exp(logp) - t) * ct[good, None], rtol=2e-5,
                             atol=1e-6)
  # A plain "mean" of a batch with a bad label is NaN too, not a silently wrong number.
  mean = jax.jit(lambda x, labels: INT(x, labels, reduction="mean", **options))(x, labels)
  assert np.isnan(float(mean))


def test_traced_ignore_index_label_is_not_nan():
  x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
  labels = np.array([-100, 2, 3], np.int32)
  loss = jax.jit(lambda x, labels: INT(x, labels, ignore_index=-100))(x, labels)
  expected = optax.softmax_cross_entropy_with_integer_labels(x[1:], labels[1:])
  np.testing.assert_allclose(loss, [0.0, *np.asarray(expected)], rtol=1e-6)


def test_traced_mask_rows_with_out_of_range_labels_still_count_as_masked():
  # An example left out by `where` may carry any label (padding): loss 0, gradient 0.
  x = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
  labels = np.array([1, 99, 2], np.int32)
  keep = np.array([True, False, True])
  v, g = jax.jit(jax.value_and_grad(
      lambda x, labels: INT(x, labels, where=keep, reduction="sum")))(x, labels)
  expected = optax.softmax_cross_entropy_with_integer_labels(x[keep], labels[keep]).sum()
  np.testing.assert_allclose(v, expected, rtol=1e-6)
  assert np.all(np.asarray(g)[1] == 0.0)


# ------------------------------------------------------- garbage under the mask

# name -> loss(x, where) on logits of shape (3, 5); the masked rows or entries hold NaN/inf.
_Y = np.full((3, 5), 0.2, np.float32)
_T = np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32)
MASKED = {
    "int": lambda x, w: INT(x, LABELS, where=w, label_smoothing=0.1, z_loss=1e-3),
    "soft": lambda x, w: SOFT(x, _Y, where=w, label_smoothing=0.1, z_loss=1e-3),
    "kl": lambda x, w: KL(x, _T, where=w),
    "entropy": lambda x, w: ENTROPY(x, where=w),
    "bce": lambda x, w: BCE(x, _Y, where=w),
    "focal": lambda x, w: FOCAL(x, _Y, where=w),
}


@pytest.mark.parametrize("kind", ["example", "logit"])
@pytest.mark.parametrize("name", list(MASKED))
def test_nan_and_inf_under_the_mask_give_loss_zero_and_gradient_zero(name, kind):
  # Padding often holds garbage (NaN from a fully masked attention row, say). The spec: a
  # masked example (or logit) gives loss 0 and gradient 0, so its values must not leak,
  # as jaxactv.softmax already promises for masked NaN and +inf logits.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  if kind == "example":
    x[1] = [np.nan, np.inf, -np.inf, np.nan, 1.0]
    where = np.array([True, False, True])
    if name in ("bce", "focal"):
      where = np.broadcast_to(where[:, None], (3, 5))
    garbage = np.zeros((3, 5), bool)
    garbage[1] = True
  else:
    x[0, 3], x[2, 1] = np.nan, np.inf
    where = np.ones((3, 5), bool)
    where[0, 3] = where[2, 1] = False
    garbage = ~where
  clean = np.where(garbage, 0.0, x).astype(np.float32)
  fn = MASKED[name]
  run = jax.jit(jax.value_and_grad(lambda x, w: fn(x, w).sum()))
  v, g = run(x, where)
  v_clean, g_clean = run(clean, where)
  g = np.asarray(g, np.float64)
  assert np.isfinite(float(v)) and float(v) == pytest.approx(float(v_clean), rel=1e-6)
  assert np.all(g[garbage] == 0.0), g
  np.testing.assert_allclose(g[~garbage], np.asarray(g_clean)[~garbage], rtol=1e-6, atol=1e-7)
