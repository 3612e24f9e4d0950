"""softmax_cross_entropy and softmax_cross_entropy_with_integer_labels.

Every expected number comes from outside the op under test: optax (its float32
autodiff), PyTorch 2.13 in float64, float64 NumPy textbook formulas, hand arithmetic,
or the plain-autodiff twins in ``jaxactv.reference``. Everything runs under
``jax.jit``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from loss_testing import REDUCTIONS, all_reductions, canon_axes, f64, reduce_like_spec

import jaxactv
from jaxactv import reference

INT = jaxactv.softmax_cross_entropy_with_integer_labels
SOFT = jaxactv.softmax_cross_entropy
TF = torch.nn.functional


# ----------------------------------------------------------------------------- helpers


def np_classes_last(a, axes):
  """``a`` with the class axes moved to the end (order kept) and flattened: NumPy's view."""
  a = np.moveaxis(np.asarray(a), axes, range(-len(axes), 0))
  return a.reshape((*a.shape[: a.ndim - len(axes)], -1))


def np_from_classes_last(a, shape, axes):
  """The inverse of ``np_classes_last`` for an array of the original ``shape``."""
  class_dims = tuple(shape[d] for d in axes)
  a = a.reshape(a.shape[:-1] + class_dims)
  return np.moveaxis(a, range(-len(axes), 0), axes)


def np_log_softmax(x, valid=None):
  """float64 log-softmax over the last axis; entries outside ``valid`` are -inf."""
  x = f64(x)
  if valid is not None:
    x = np.where(valid, x, -np.inf)
  m = np.max(x, -1, keepdims=True)
  s = x - m
  return s - np.log(np.exp(s).sum(-1, keepdims=True))


def np_logsumexp(x):
  x = f64(x)
  m = np.max(x, -1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def np_int_ce(x, labels, eps=0.0, weights=None, z=0.0):
  """The textbook per-example loss (1-eps) w_y nll_y + eps/K sum_j w_j nll_j + z lse^2."""
  x = f64(x)
  k = x.shape[-1]
  w = np.ones(k) if weights is None else f64(weights)
  logp = np_log_softmax(x)
  nll_y = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  loss = (1 - eps) * w[labels] * nll_y + eps / k * np.sum(w * -logp, -1)
  return loss + z * np_logsumexp(x) ** 2


def np_int_ce_grad(x, labels, eps=0.0, weights=None, z=0.0):
  """d/dx of ``np_int_ce``'s sum: (sum_j t_j + 2 z lse) softmax - t, t the weighted target."""
  x = f64(x)
  k = x.shape[-1]
  w = np.ones(k) if weights is None else f64(weights)
  onehot = np.eye(k)[labels]
  t = (1 - eps) * w[labels][..., None] * onehot + eps / k * w
  p = np.exp(np_log_softmax(x))
  a = t.sum(-1, keepdims=True) + 2 * z * np_logsumexp(x)[..., None]
  return a * p - t


def jit_vjp(fn, args, ct):
  """(fn(*args), the vjp of ct w.r.t. every arg), under one jit."""

  @jax.jit
  def run(args, ct):
    y, pull = jax.vjp(fn, *args)
    return y, pull(ct)

  return run(tuple(jnp.asarray(a) for a in args), jnp.asarray(ct))


def random_cts(rng, batch_shape):
  """Cotangents per reduction; the mean's is scaled by the batch size so that its share
  of the summed gradient is as large as the others'."""
  return {
      "none": rng.normal(size=batch_shape).astype(np.float32),
      "mean": np.float32(0.7 * math.prod(batch_shape)),
      "sum": np.float32(-1.3),
  }


def torch_all_reductions(fn, arrays, grad_of, cts):
  """({reduction: value}, summed grads) of a float64 torch loss, as ``all_reductions``."""
  ts = [
      torch.tensor(np.asarray(a, np.float64), requires_grad=i in grad_of)
      if np.issubdtype(np.asarray(a).dtype, np.floating)
      else torch.tensor(np.asarray(a)).long()
      for i, a in enumerate(arrays)
  ]
  values = {}
  for r in REDUCTIONS:
    loss = fn(*ts, reduction=r)
    loss.backward(torch.tensor(np.asarray(cts[r], np.float64)))
    values[r] = loss.detach().numpy()
  return values, [ts[i].grad.numpy() for i in grad_of]


def random_soft_labels(rng, shape, axes):
  """Positive labels that sum to 1 over the class axes."""
  logits = rng.normal(scale=2.0, size=shape)
  e = np.exp(logits - logits.max(axis=axes, keepdims=True))
  return (e / e.sum(axis=axes, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------ the seeds' worked examples

ONEHOT = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.float32)
WORKED = [
    (np.array([[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]]), 1.3783888522474517),
    (np.array([[0.1, 0.2, 0.7], [0.1, 0.7, 0.2], [0.3, 0.4, 0.3]]), 0.6391075640678003),
]


@pytest.mark.parametrize("probs, expected", WORKED, ids=["first", "second"])
def test_seed_worked_examples(probs, expected):
  # By hand: the mean of -log p at the labelled class, the same for both label forms.
  labels = ONEHOT.argmax(-1)
  assert math.isclose(-np.mean(np.log(probs[np.arange(3), labels])), expected, rel_tol=1e-15)
  x = np.log(probs).astype(np.float32)
  soft = jax.jit(lambda x, y: SOFT(x, y, reduction="mean"))(x, ONEHOT)
  hard = jax.jit(lambda x, y: INT(x, y, reduction="mean"))(x, labels)
  # log p is rounded to float32 (~6e-8 absolute), so the loss carries ~1e-7 of that.
  np.testing.assert_allclose(soft, expected, rtol=1e-6)
  np.testing.assert_allclose(hard, expected, rtol=1e-6)
  assert soft.dtype == hard.dtype == jnp.float32


def test_seed_worked_example_per_example():
  # Target (1, 0, 0): predictions (0.5, 0.2, 0.3) and (0.7, 0.1, 0.2) lose -log 0.5, -log 0.7.
  probs = np.array([[0.5, 0.2, 0.3], [0.7, 0.1, 0.2]])
  x = np.log(probs).astype(np.float32)
  expected = [-np.log(0.5), -np.log(0.7)]
  soft = jax.jit(SOFT)(x, np.array([[1.0, 0.0, 0.0]] * 2, np.float32))
  hard = jax.jit(INT)(x, np.array([0, 0]))
  np.testing.assert_allclose(soft, expected, rtol=1e-6)
  np.testing.assert_allclose(hard, expected, rtol=1e-6)


def test_hand_values_with_every_option():
  # Two classes with equal logits: p = (1/2, 1/2), lse = log 2 + 1. Label 0, weights (2, 1),
  # eps = 0.5, z = 0.1: 0.5 * 2 * log 2 + 0.25 * (2 + 1) * log 2 + 0.1 * (1 + log 2)^2.
  x = np.array([[1.0, 1.0]], np.float32)
  got = jax.jit(lambda x: INT(x, np.array([0]), label_smoothing=0.5,
                              class_weights=np.array([2.0, 1.0], np.float32), z_loss=0.1))(x)
  log2 = math.log(2.0)
  np.testing.assert_allclose(got, [log2 + 0.75 * log2 + 0.1 * (1 + log2) ** 2], rtol=1e-6)
  # Soft labels (0.25, 0.75) with eps = 0.5 -> t = (0.375, 0.625), sum 1: loss = log 2.
  soft = jax.jit(lambda x: SOFT(x, np.array([[0.25, 0.75]], np.float32), label_smoothing=0.5))(x)
  np.testing.assert_allclose(soft, [log2], rtol=1e-6)


# -------------------------------------------------------------------- agreement with optax

# (shape, axis, mask): "logit" masks single logits, "example" whole examples.
OPTAX_CASES = [
    ((7, 1031), -1, None),
    ((7, 1031), 0, None),
    ((6, 5, 9), (0, 2), None),
    ((6, 5, 9), (0, 2), "logit"),
    ((7, 1031), -1, "example"),
    ((4, 6, 9), (0, 2), "example"),
]
OPTAX_IDS = ["7x1031", "7x1031-axis0", "6x5x9-axes02", "6x5x9-axes02-logitmask",
             "7x1031-examplemask", "4x6x9-axes02-examplemask"]


def optax_case(seed, shape, axis, mask):
  """Logits, integer labels, soft labels and a mask; a logit mask keeps each label's class."""
  rng = np.random.default_rng(seed)
  axes = canon_axes(axis, len(shape))
  x = rng.normal(scale=3.0, size=shape).astype(np.float32)
  batch_shape = tuple(n for d, n in enumerate(shape) if d not in axes)
  k = math.prod(shape[d] for d in axes)
  labels = rng.integers(0, k, batch_shape).astype(np.int32)
  soft = random_soft_labels(rng, shape, axes)
  where = None
  if mask == "logit":
    keep = rng.uniform(size=(*batch_shape, k)) > 0.4
    np.put_along_axis(keep, labels[..., None], True, -1)
    where = np_from_classes_last(keep, shape, axes)
  elif mask == "example":
    where = rng.uniform(size=batch_shape) > 0.4
    where.flat[0], where.flat[-1] = True, False
  return rng, x, labels, soft, where, batch_shape, axes


@pytest.mark.parametrize("shape, axis, mask", OPTAX_CASES, ids=OPTAX_IDS)
def test_integer_labels_match_optax(shape, axis, mask):
  rng, x, labels, _, where, batch_shape, axes = optax_case(0, shape, axis, mask)
  cts = random_cts(rng, batch_shape)
  counts = np.ones(batch_shape, bool) if mask != "example" else where

  extra = (labels, counts) if where is None else (labels, counts, where)
  ours = all_reductions(
      lambda r: lambda x, labels, _, w=None: INT(x, labels, axis, w, reduction=r), (x,), cts,
      extra)

  def optax_loss(r):
    def f(x, labels, counts, w=None):
      per = optax.softmax_cross_entropy_with_integer_labels(x, labels, axis, w)
      return reduce_like_spec(per, r, counts.astype(np.float32))
    return f

  theirs = all_reductions(optax_loss, (x,), cts, extra)
  (values, (dx,)), (values_ref, (dx_ref,)) = ours, theirs
  for r in REDUCTIONS:
    assert values[r].dtype == jnp.float32
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  assert dx.dtype == jnp.float32
  # p - onehot cancels at a label class with p near 1, so each side carries a few ulp of
  # 1 (times the cotangent) absolute: atol 1e-5.
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)
  if mask == "example":
    assert np.all(f64(values["none"])[~where] == 0.0)
    assert np.all(np_classes_last(f64(dx), axes)[~where] == 0.0)
  if mask == "logit":
    assert np.all(f64(dx)[~where] == 0.0)


@pytest.mark.parametrize("shape, axis, mask", OPTAX_CASES, ids=OPTAX_IDS)
def test_soft_labels_match_optax_values_and_both_gradients(shape, axis, mask):
  rng, x, _, y_soft, where, batch_shape, axes = optax_case(1, shape, axis, mask)
  cts = random_cts(rng, batch_shape)
  counts = np.ones(batch_shape, bool) if mask != "example" else where

  extra = (counts,) if where is None else (counts, where)
  ours = all_reductions(lambda r: lambda x, y, _, w=None: SOFT(x, y, axis, w, reduction=r),
                        (x, y_soft), cts, extra)

  def optax_loss(r):
    def f(x, y, counts, w=None):
      per = optax.softmax_cross_entropy(x, y, axis, w)
      return reduce_like_spec(per, r, counts.astype(np.float32))
    return f

  theirs = all_reductions(optax_loss, (x, y_soft), cts, extra)
  # optax's label gradient is 0 * log 0 = NaN wherever it masks (a logit or an example);
  # compare there with 0 instead.
  if where is None:
    label_ok = np.ones(shape, bool)
  elif mask == "logit":
    label_ok = where
  else:
    label_ok = np.broadcast_to(np.expand_dims(where, axes), shape)
  (values, (dx, dy)), (values_ref, (dx_ref, dy_ref)) = ours, theirs
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  assert dx.dtype == dy.dtype == jnp.float32
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)  # as above
  np.testing.assert_allclose(f64(dy)[label_ok], f64(dy_ref)[label_ok], rtol=2e-5, atol=1e-5)
  assert np.all(f64(dy)[~label_ok] == 0.0)
  assert np.all(f64(dx)[~label_ok] == 0.0)


# ------------------------------------------------------------------ agreement with PyTorch

# (ignore_index, weighted, label_smoothing): PyTorch's options, alone and together.
TORCH_INT_CASES = [
    (None, False, 0.0),
    (-100, False, 0.0),
    (3, False, 0.0),  # an ignore_index that is also a valid class id
    (None, True, 0.0),
    (None, False, 0.15),
    (-100, True, 0.0),
    (-100, False, 0.15),
    (None, True, 0.15),
    (-100, True, 0.15),
]


@pytest.mark.parametrize(
    "ignore_index, weighted, eps, layout",
    [(*case, "2d") for case in TORCH_INT_CASES]
    + [(3, False, 0.0, "3d-axis1"), (-100, True, 0.15, "3d-axis1")],
)
def test_integer_labels_match_torch(ignore_index, weighted, eps, layout):
  rng = np.random.default_rng(2)
  k = 11
  shape, axis = ((16, k), -1) if layout == "2d" else ((4, k, 5), 1)
  x = rng.normal(scale=2.0, size=shape).astype(np.float32)
  batch_shape = (16,) if layout == "2d" else (4, 5)
  labels = rng.integers(0, k, batch_shape)
  if ignore_index == -100:
    labels.flat[[1, 6, 7]] = -100
  if ignore_index == 3:
    labels.flat[[0, 2, 5]] = 3
  weights = rng.uniform(0.2, 3.0, k).astype(np.float32) if weighted else None
  cts = random_cts(rng, batch_shape)

  def ours_for(r):
    return lambda x, labels, *w: INT(x, labels, axis, ignore_index=ignore_index,
                                     label_smoothing=eps, class_weights=w[0] if w else None,
                                     reduction=r)

  ours = all_reductions(ours_for, (x,), cts, (labels,) if weights is None else (labels, weights))

  def torch_loss(x, reduction):
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    return TF.cross_entropy(x, torch.tensor(labels).long(), weight=w,
                            ignore_index=-100 if ignore_index is None else ignore_index,
                            label_smoothing=eps, reduction=reduction)

  theirs = torch_all_reductions(torch_loss, (x,), (0,), cts)
  (values, (dx,)), (values_ref, (dx_ref,)) = ours, theirs
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)
  if ignore_index is not None:
    ignored = labels == ignore_index
    assert np.all(f64(values["none"])[ignored] == 0.0)
    dx_last = np_classes_last(f64(dx), canon_axes(axis, len(shape)))
    assert np.all(dx_last[ignored] == 0.0)


@pytest.mark.parametrize("layout", ["2d", "3d-axis1"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_soft_labels_match_torch_probability_targets(eps, layout):
  rng = np.random.default_rng(3)
  k = 9
  shape, axis = ((16, k), -1) if layout == "2d" else ((4, k, 5), 1)
  x = rng.normal(scale=2.0, size=shape).astype(np.float32)
  y_soft = random_soft_labels(rng, shape, (1,))
  batch_shape = (16,) if layout == "2d" else (4, 5)
  cts = random_cts(rng, batch_shape)
  ours = all_reductions(
      lambda r: lambda x, y: SOFT(x, y, axis, label_smoothing=eps, reduction=r), (x, y_soft), cts
  )
  theirs = torch_all_reductions(
      lambda x, y, reduction: TF.cross_entropy(x, y, label_smoothing=eps, reduction=reduction),
      (x, y_soft), (0, 1), cts,
  )
  (values, (dx, dy)), (values_ref, (dx_ref, dy_ref)) = ours, theirs
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=1e-5, atol=1e-6, err_msg=r)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dy, dy_ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_labels_of_a_narrow_integer_dtype_reach_every_class(dtype):
  # 300 classes: a count that uint8 and int8 cannot hold (it wraps to 44 there). Each
  # label the dtype can hold must pick its own class, as the same ids in int32 do; the
  # last example carries the ignore_index (-1, or for unsigned ids the largest one).
  rng = np.random.default_rng(7)
  n, d, v = 6, 8, 300
  top = min(int(np.iinfo(dtype).max), v - 1)
  ignore = -1 if np.iinfo(dtype).min < 0 else top
  labels = np.array([0, 1, top // 2, top - 1, top if ignore != top else top - 2, ignore], dtype)
  x = rng.standard_normal((n, d)).astype(np.float32)
  w = rng.standard_normal((d, v)).astype(np.float32)
  logits = f64(x) @ f64(w)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ids = labels.astype(np.int64)
  nll = lse - logits[np.arange(n), np.where(ids == ignore, 0, ids)]
  expected = np.where(ids == ignore, 0.0, nll)
  probs = np.exp(logits - lse[:, None])
  dlogits = (probs - np.eye(v)[np.where(ids == ignore, 0, ids)]) * (ids != ignore)[:, None]

  def int_ce(z):
    return INT(z, labels, ignore_index=ignore)

  got, pull = jax.vjp(jax.jit(int_ce), jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pull(jnp.ones(n))[0], dlogits, rtol=1e-5, atol=1e-6)
  fused = jax.jit(lambda x, w: jaxactv.linear_softmax_cross_entropy(
      x, w, labels, ignore_index=ignore, reduction="none"))(x, w)
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)
  counted = ids != ignore
  log_probs = jax.jit(lambda x, w: jaxactv.linear_log_probs(x, w, labels[counted]))(
      x[counted], w)
  np.testing.assert_allclose(log_probs, -nll[counted], rtol=1e-5, atol=1e-5)
  twin = reference.softmax_cross_entropy_with_integer_labels(logits, labels, ignore_index=ignore)
  np.testing.assert_allclose(twin, expected, rtol=1e-5, atol=1e-5)


def test_mean_over_no_counted_example_is_zero_where_torch_is_nan():
  x = np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32)
  labels = np.full((3,), -100)
  v, g = jax.jit(jax.value_and_grad(
      lambda x: INT(x, labels, ignore_index=-100, reduction="mean")))(x)
  assert float(v) == 0.0 and np.all(f64(g) == 0.0)
  weighted = jax.jit(jax.value_and_grad(lambda x: INT(
      x, labels, ignore_index=-100, class_weights=np.ones(5, np.float32), label_smoothing=0.1,
      reduction="mean")))(x)
  assert float(weighted[0]) == 0.0 and np.all(f64(weighted[1]) == 0.0)
  # Soft labels, every example masked out.
  y = np.full((3, 5), 0.2, np.float32)
  v, g = jax.jit(jax.value_and_grad(
      lambda x: SOFT(x, y, where=np.zeros(3, bool), reduction="mean")))(x)
  assert float(v) == 0.0 and np.all(f64(g) == 0.0)
  assert torch.isnan(TF.cross_entropy(torch.tensor(x), torch.tensor(labels).long())).item()


def test_class_weights_zero_weight_mean_counts_weights_not_examples():
  # PyTorch's rule by hand: losses w_y * nll_y, mean divides by sum of w_y. Weight 0 on
  # class 1 drops example 1 from both sums.
  x = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.array([0, 1, 2])
  w = np.array([0.5, 0.0, 2.0], np.float32)
  nll = -np_log_softmax(x)[np.arange(3), labels]
  expected = (0.5 * nll[0] + 2.0 * nll[2]) / 2.5
  got = jax.jit(lambda x: INT(x, labels, class_weights=w, reduction="mean"))(x)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_example_mask_mean_equals_mean_over_kept_examples():
  rng = np.random.default_rng(5)
  x = rng.normal(scale=3.0, size=(10, 13)).astype(np.float32)
  # Rows that do not count hold huge finite garbage: their value must not leak.
  x[[2, 7]] = np.array([1e30, -1e30] * 6 + [3e38], np.float32)
  labels = rng.integers(0, 13, 10)
  keep = np.ones(10, bool)
  keep[[2, 7]] = False
  kept = optax.softmax_cross_entropy_with_integer_labels(x[keep], labels[keep])
  for fn, args in ((INT, (labels,)), (SOFT, (np.eye(13, dtype=np.float32)[labels],))):
    v, g = jax.jit(jax.value_and_grad(
        lambda x, fn=fn, args=args: fn(x, *args, where=keep, z_loss=1e-3, reduction="mean")))(x)
    expected = np.mean(f64(kept) + 1e-3 * np_logsumexp(x[keep]) ** 2)
    np.testing.assert_allclose(v, expected, rtol=1e-5)
    assert np.all(f64(g)[~keep] == 0.0)
    ref_g = np_int_ce_grad(x[keep], labels[keep], z=1e-3) / keep.sum()
    np.testing.assert_allclose(g[keep], ref_g, rtol=2e-5, atol=1e-7)


# -------------------------------------------------------------------- float64 formulas


def test_z_loss_matches_float64_formula():
  z = 0.05
  rng = np.random.default_rng(6)
  x = rng.normal(loc=4.0, scale=3.0, size=(9, 37)).astype(np.float32)
  labels = rng.integers(0, 37, 9)
  w = rng.uniform(0.5, 2.0, 37).astype(np.float32)
  ct = rng.normal(size=9).astype(np.float32)
  for eps, weights in ((0.0, None), (0.1, w)):
    y, (dx,) = jit_vjp(
        lambda x, eps=eps, weights=weights: INT(x, labels, label_smoothing=eps,
                                                class_weights=weights, z_loss=z), (x,), ct)
    np.testing.assert_allclose(y, np_int_ce(x, labels, eps, weights, z), rtol=1e-5)
    ref_dx = np_int_ce_grad(x, labels, eps, weights, z) * ct[:, None]
    np.testing.assert_allclose(dx, ref_dx, rtol=2e-5, atol=1e-7)
  # Soft labels: the same formula with a one-hot target.
  onehot = np.eye(37, dtype=np.float32)[labels]
  y, (dx, _) = jit_vjp(lambda x, t: SOFT(x, t, z_loss=z), (x, onehot), ct)
  np.testing.assert_allclose(y, np_int_ce(x, labels, z=z), rtol=1e-5)
  np.testing.assert_allclose(dx, np_int_ce_grad(x, labels, z=z) * ct[:, None], rtol=2e-5,
                             atol=1e-7)


def test_float64_under_enable_x64_matches_formula_tightly():
  rng = np.random.default_rng(7)
  x = rng.normal(scale=4.0, size=(6, 21))
  labels = rng.integers(0, 21, 6)
  w = rng.uniform(0.5, 2.0, 21)
  with jax.enable_x64(True):
    v, g = jax.jit(jax.value_and_grad(lambda x: INT(
        x, labels, label_smoothing=0.2, class_weights=w, z_loss=0.01, reduction="sum")))(
            jnp.asarray(x, jnp.float64))
    assert v.dtype == g.dtype == jnp.float64
    v, g = np.asarray(v), np.asarray(g)
  np.testing.assert_allclose(v, np_int_ce(x, labels, 0.2, w, 0.01).sum(), rtol=1e-13)
  np.testing.assert_allclose(g, np_int_ce_grad(x, labels, 0.2, w, 0.01), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------- the reference twins


@pytest.mark.parametrize("shape, axis", [((7, 1031), -1), ((6, 5, 9), (0, 2))],
                         ids=["7x1031", "6x5x9-axes02"])
def test_integer_labels_match_twin_with_every_option_at_extreme_logits(shape, axis):
  rng = np.random.default_rng(8)
  axes = canon_axes(axis, len(shape))
  x = rng.uniform(-80.0, 80.0, shape).astype(np.float32)
  batch_shape = tuple(n for d, n in enumerate(shape) if d not in axes)
  k = math.prod(shape[d] for d in axes)
  labels = rng.integers(0, k, batch_shape)
  labels.flat[[1, 3]] = -100
  keep = rng.uniform(size=(*batch_shape, k)) > 0.3
  np.put_along_axis(keep, np.clip(labels, 0, None)[..., None], True, -1)
  where = np_from_classes_last(keep, shape, axes)
  w = rng.uniform(0.2, 3.0, k).astype(np.float32)
  cts = random_cts(rng, batch_shape)
  # No mask on the 2-D shape, a per-logit mask on the 3-D one.
  extra = (labels, w) if len(shape) == 2 else (labels, w, where)

  def make(fn):
    return lambda r: lambda x, labels, w, mask=None: fn(
        x, labels, axis, mask, ignore_index=-100, label_smoothing=0.1, class_weights=w,
        z_loss=1e-3, reduction=r)

  ours = all_reductions(make(INT), (x,), cts, extra)
  twin = all_reductions(make(reference.softmax_cross_entropy_with_integer_labels), (x,), cts,
                        extra)
  (values, (dx,)), (values_ref, (dx_ref,)) = ours, twin
  for r in REDUCTIONS:
    # Losses reach ~1e2 and the smoothing term sums 1031 of them: 2e-5 relative.
    np.testing.assert_allclose(values[r], values_ref[r], rtol=2e-5, atol=1e-5, err_msg=r)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("shape, axis", [((7, 1031), -1), ((6, 5, 9), (0, 2))],
                         ids=["7x1031", "6x5x9-axes02"])
def test_soft_labels_match_twin_at_extreme_logits_both_gradients(shape, axis):
  rng = np.random.default_rng(9)
  axes = canon_axes(axis, len(shape))
  x = rng.uniform(-80.0, 80.0, shape).astype(np.float32)
  y_soft = random_soft_labels(rng, shape, axes)
  batch_shape = tuple(n for d, n in enumerate(shape) if d not in axes)
  where = rng.uniform(size=shape) > 0.3
  cts = random_cts(rng, batch_shape)
  # No mask on the 2-D shape, a per-logit mask on the 3-D one.
  mask = None if len(shape) == 2 else where

  def make(fn):
    return lambda r: lambda x, y, mask=None: fn(x, y, axis, mask, label_smoothing=0.1,
                                                z_loss=1e-3, reduction=r)

  extra = () if mask is None else (mask,)
  ours = all_reductions(make(SOFT), (x, y_soft), cts, extra)
  twin = all_reductions(make(reference.softmax_cross_entropy), (x, y_soft), cts, extra)
  (values, (dx, dy)), (values_ref, (dx_ref, dy_ref)) = ours, twin
  for r in REDUCTIONS:
    np.testing.assert_allclose(values[r], values_ref[r], rtol=2e-5, atol=1e-5, err_msg=r)
  np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=1e-5)
  # d/dlabel = (1 - eps)(lse - x_j) reaches ~160 here: 2e-5 relative. The twin's label
  # gradient at a masked class is 0 * log 0 = NaN; ours is 0 there.
  ok = np.ones(shape, bool) if mask is None else mask
  np.testing.assert_allclose(f64(dy)[ok], f64(dy_ref)[ok], rtol=2e-5, atol=1e-4)
  assert np.all(f64(dy)[~ok] == 0.0)


# ------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_half_precision_logits_give_the_float32_loss_of_their_values(dtype):
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(scale=3.0, size=(32, 1031)), dtype)
  x32 = x.astype(jnp.float32)  # exactly the same numbers
  labels = rng.integers(0, 1031, 32)
  y_soft = jnp.asarray(random_soft_labels(rng, (32, 1031), (1,)), dtype)
  g_hard = jax.jit(jax.grad(lambda x: INT(x, labels).sum()))(x)
  g_soft, g_label = jax.jit(jax.grad(lambda x, y: SOFT(x, y).sum(), (0, 1)))(x, y_soft)
  per_hard = jax.jit(INT)(x, labels)
  per_soft = jax.jit(SOFT)(x, y_soft)
  assert per_hard.dtype == per_soft.dtype == jnp.float32
  assert g_hard.dtype == g_soft.dtype == g_label.dtype == dtype
  opt_hard = jax.jit(optax.softmax_cross_entropy_with_integer_labels)(x32, labels)
  opt_soft = jax.jit(optax.softmax_cross_entropy)(x32, y_soft.astype(jnp.float32))
  np.testing.assert_allclose(per_hard, opt_hard, rtol=1e-5)
  np.testing.assert_allclose(per_soft, opt_soft, rtol=1e-5)
  np.testing.assert_allclose(per_hard, jax.jit(INT)(x32, labels), rtol=1e-5)
  np.testing.assert_allclose(per_soft, jax.jit(SOFT)(x32, y_soft.astype(jnp.float32)),
                             rtol=1e-5)
  # The gradient is the float32 one rounded once to the logits' dtype.
  g_ref = np_int_ce_grad(x32, labels)
  half_eps = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
  np.testing.assert_allclose(f64(g_hard), g_ref, rtol=2 * half_eps, atol=1e-7)


def test_optax_bfloat16_integer_cross_entropy_is_measurably_off():
  # optax issue 1020: optax computes in bfloat16 and loses ~0.6%; jaxactv computes in float32.
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(scale=3.0, size=(64, 1031)), jnp.bfloat16)
  labels = rng.integers(0, 1031, 64)
  exact = np_int_ce(f64(x), labels)
  theirs = f64(jax.jit(optax.softmax_cross_entropy_with_integer_labels)(x, labels))
  ours = f64(jax.jit(INT)(x, labels))
  assert np.max(np.abs(theirs - exact) / exact) > 2e-3
  assert np.max(np.abs(ours - exact) / exact) < 1e-5


# ----------------------------------------------------------------- infinite logits


def test_minus_inf_logits_without_target_mass_contribute_nothing():
  rng = np.random.default_rng(12)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  x[0, [1, 4]] = -np.inf
  x[2, 0] = -np.inf
  labels = np.array([0, 3, 5, 2])
  finite = np.isfinite(x)
  # NumPy: log-softmax over the finite logits only (e^-inf = 0).
  logp = np_log_softmax(x)
  ct = rng.normal(size=4).astype(np.float32)
  y, (dx,) = jit_vjp(lambda x: INT(x, labels), (x,), ct)
  np.testing.assert_allclose(y, -logp[np.arange(4), labels], rtol=1e-6)
  p = np.exp(logp)
  np.testing.assert_allclose(dx, (p - np.eye(6)[labels]) * ct[:, None], rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(f64(dx))) and np.all(f64(dx)[~finite] == 0.0)
  # Soft labels with zero mass on the -inf logits: 0 * log 0 = 0.
  t = random_soft_labels(rng, (4, 6), (1,))
  t = np.where(finite, t, 0.0).astype(np.float32)
  y, (dx, dt) = jit_vjp(SOFT, (x, t), ct)
  expected = -np.sum(np.where(finite, t * np.where(finite, logp, 0.0), 0.0), -1)
  np.testing.assert_allclose(y, expected, rtol=1e-6)
  ref_dx = (t.sum(-1, keepdims=True) * p - t) * ct[:, None]
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(f64(dx)))
  np.testing.assert_allclose(f64(dt)[finite], (-logp * ct[:, None])[finite], rtol=1e-5)
  # optax's plain soft-label loss turns 0 * log 0 into NaN.
  assert np.isnan(f64(jax.jit(optax.softmax_cross_entropy)(x, t))[0])


def test_minus_inf_logit_carrying_target_mass_gives_inf():
  x = np.array([[0.0, -np.inf, 1.0], [0.0, 2.0, -np.inf]], np.float32)
  hard = f64(jax.jit(INT)(x, np.array([1, 0])))
  assert hard[0] == np.inf
  np.testing.assert_allclose(hard[1], -np_log_softmax(x[1:])[0, 0], rtol=1e-6)
  # Smoothing puts eps/K on every class, the -inf one included.
  assert np.all(f64(jax.jit(lambda x: INT(x, np.array([0, 0]), label_smoothing=0.1))(x))
                == np.inf)
  soft = f64(jax.jit(SOFT)(x, np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], np.float32)))
  assert soft[0] == np.inf and np.isfinite(soft[1])
  # A negative "mass" there (not a probability): -(1 * log 1 + (-1) * log 0) = -inf.
  neg = f64(jax.jit(SOFT)(np.array([[0.0, -np.inf]], np.float32), np.array([[1.0, -1.0]])))
  assert neg[0] == -np.inf


@pytest.mark.parametrize("mass", [1e-15, 2.0**-63, 1e-30 * 2.0**40])
def test_a_tiny_target_mass_on_a_minus_inf_logit_still_gives_inf(mass):
  # The soft-label forward caps each distance at the largest float and reads a row sum of
  # finfo.max / 2**64 or more as inf, to stay one fused sweep; any mass above 2**-64 on an
  # impossible class must still give inf.
  x = np.array([[0.0, -np.inf, 1.0], [0.0, -np.inf, 1.0]], np.float32)
  t = np.array([[0.5, mass, 0.5], [0.5, 0.0, 0.5]], np.float32)
  loss = f64(jax.jit(SOFT)(x, t))
  assert loss[0] == np.inf
  # The row without mass there: 0 * log 0 = 0, the textbook value of the two others.
  lp = np_log_softmax(x[1:])[0]
  np.testing.assert_allclose(loss[1], -0.5 * (lp[0] + lp[2]), rtol=1e-6)


def test_mean_over_zero_total_weight_is_zero():
  # Every counted target has class weight 0 (torch: NaN). With smoothing the summed loss is
  # not 0, but the mean divides by the targets' weights: defined as 0, gradient 0.
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3)), jnp.float32)
  labels = jnp.array([0, 0])
  w = jnp.array([0.0, 1.0, 2.0])
  f = lambda x: jaxactv.softmax_cross_entropy_with_integer_labels(
      x, labels, class_weights=w, label_smoothing=0.3, reduction="mean"
  )
  total = jaxactv.softmax_cross_entropy_with_integer_labels(
      x, labels, class_weights=w, label_smoothing=0.3, reduction="sum"
  )
  assert float(total) > 0
  value, grad = jax.jit(jax.value_and_grad(f))(x)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
