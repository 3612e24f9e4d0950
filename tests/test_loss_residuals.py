"""What the fused losses keep for the backward pass: the caller's arrays and O(batch) numbers.

``saved_residuals(f, *args)`` lists (aval, description) for every array reverse-mode
differentiation of ``f`` stores between the forward and the backward pass. The memory
contract: the only residual the size of the logits is the logits argument itself
("from the argument x"), next to the caller's other arrays (labels, targets, masks,
weights); everything the loss computes itself has at most one number per example.
The elementwise losses (BCE, focal) keep nothing but the caller's arrays and scalars.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jaxactv

SHAPES = [(7, 1031), (2, 3, 1031)]
SHAPE_IDS = ["7x1031", "2x3x1031"]
DTYPES = [jnp.float32, jnp.bfloat16]
DTYPE_IDS = ["f32", "bf16"]


def describe(residuals):
  return "\n".join(f"  {aval.str_short()}: {desc}" for aval, desc in residuals)


def from_argument(desc, name):
  return desc.startswith("from the argument") and desc.split()[-1] == name


def is_argument(desc):
  return desc.startswith("from the argument")


def check(residuals, logits_shape, dtype, arg_names, per_example_limit):
  """The contract, with a readable failure message.

  * exactly one residual is the logits argument ``x``, in the caller's dtype;
  * every other residual of the logits' size is one of the caller's arrays;
  * every residual the loss computed has at most ``per_example_limit`` numbers;
  * no float32 residual of the logits' size exists for half-precision logits.
  """
  msg = f"residuals:\n{describe(residuals)}"
  size = math.prod(logits_shape)
  logits = [(a, d) for a, d in residuals if from_argument(d, "x")]
  assert len(logits) == 1, msg
  assert tuple(logits[0][0].shape) == logits_shape and logits[0][0].dtype == dtype, msg
  for aval, desc in residuals:
    n = math.prod(aval.shape)
    if is_argument(desc):
      assert desc.split()[-1] in arg_names, msg
      continue
    assert n <= per_example_limit, f"a computed residual of {n} numbers\n{msg}"
    assert n < size, msg
  if dtype != jnp.float32:
    big_f32 = [a for a, _ in residuals if a.dtype == jnp.float32 and math.prod(a.shape) >= size]
    assert not big_f32, msg


def inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(scale=3.0, size=shape), dtype)
  soft = jnp.asarray(rng.dirichlet(np.ones(shape[-1]), shape[:-1]), dtype)
  labels = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
  w = jnp.asarray(rng.uniform(0.5, 2.0, shape[-1]), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=shape) > 0.3)
  return x, soft, labels, w, mask


# ------------------------------------------------------------------ cross-entropy


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_integer_label_ce_with_every_option_keeps_logits_and_per_example_numbers(
    shape, dtype, masked):
  x, _, labels, w, mask = inputs(shape, dtype)
  opts = {"label_smoothing": 0.1, "z_loss": 1e-4, "ignore_index": -100, "reduction": "mean"}
  if masked:
    res = saved_residuals(
        lambda x, labels, w, where: jaxactv.softmax_cross_entropy_with_integer_labels(
            x, labels, where=where, class_weights=w, **opts), x, labels, w, mask)
  else:
    res = saved_residuals(
        lambda x, labels, w: jaxactv.softmax_cross_entropy_with_integer_labels(
            x, labels, class_weights=w, **opts), x, labels, w)
  check(res, shape, dtype, {"x", "labels", "w", "where"}, math.prod(shape[:-1]))


@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_soft_label_ce_with_smoothing_and_z_loss_keeps_its_arguments_only(shape, dtype, masked):
  x, soft, _, _, mask = inputs(shape, dtype)
  opts = {"label_smoothing": 0.1, "z_loss": 1e-4, "reduction": "mean"}
  if masked:
    res = saved_residuals(lambda x, y, where: jaxactv.softmax_cross_entropy(
        x, y, where=where, **opts), x, soft, mask)
  else:
    res = saved_residuals(lambda x, y: jaxactv.softmax_cross_entropy(x, y, **opts), x, soft)
  check(res, shape, dtype, {"x", "y", "where"}, math.prod(shape[:-1]))


# ----------------------------------------------------------------- divergences


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_kl_keeps_both_logits_and_per_example_numbers(shape, dtype):
  x, _, _, _, _ = inputs(shape, dtype)
  t, *_ = inputs(shape, dtype, seed=1)
  res = saved_residuals(
      lambda x, t: jaxactv.kl_divergence_from_logits(x, t, reduction="mean"), x, t)
  check(res, shape, dtype, {"x", "t"}, math.prod(shape[:-1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_entropy_keeps_the_logits_and_per_example_numbers(shape, dtype):
  x, *_ = inputs(shape, dtype)
  res = saved_residuals(lambda x: jaxactv.entropy_from_logits(x, reduction="mean"), x)
  check(res, shape, dtype, {"x"}, math.prod(shape[:-1]))


# ---------------------------------------------------------------- elementwise losses


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bce_keeps_only_the_callers_arrays(shape, dtype):
  x, soft, _, w, mask = inputs(shape, dtype)
  res = saved_residuals(
      lambda x, y, pw, where: jaxactv.sigmoid_binary_cross_entropy(
          x, y, where=where, pos_weight=pw, label_smoothing=0.1, reduction="mean"),
      x, soft, w, mask)
  check(res, shape, dtype, {"x", "y", "pw", "where"}, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_focal_keeps_only_the_callers_arrays(shape, dtype):
  x, soft, _, w, _ = inputs(shape, dtype)
  alpha = jnp.clip(w / 2.0, 0.0, 1.0)  # a per-class alpha, traced
  res = saved_residuals(
      lambda x, y, alpha, gamma: jaxactv.sigmoid_focal_loss(x, y, alpha, gamma,
                                                            reduction="mean"),
      x, soft, alpha, jnp.float32(0.5))
  check(res, shape, dtype, {"x", "y", "alpha", "gamma"}, 1)


def test_a_class_mask_shared_by_all_examples_is_kept_unbroadcast():
  x = jnp.ones((64, 1000), jnp.float32)
  mask = jnp.ones((1, 1000), bool).at[0, 5].set(False)
  labels = jnp.zeros((64,), jnp.int32)
  soft = jnp.full((64, 1000), 1e-3, jnp.float32)
  for f in (
      lambda x: jaxactv.softmax_cross_entropy_with_integer_labels(
          x, labels, where=mask, label_smoothing=0.1, reduction="mean"
      ),
      lambda x: jaxactv.softmax_cross_entropy(x, soft, where=mask, reduction="mean"),
  ):
    masks = [a.shape for a, _ in saved_residuals(f, x) if a.dtype == jnp.bool_ and a.ndim == 2]
    assert masks == [(1, 1000)], masks
