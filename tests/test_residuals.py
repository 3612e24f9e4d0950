"""What each custom_vjp rule keeps for the backward pass: at most one input-sized array.

``saved_residuals(f, *args)`` lists (ShapedArray, description) for every array that
reverse-mode differentiation of ``f`` stores between the forward and backward pass.
The expected lists come from the rules' memory contract, not from running the rules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jaxactv
from jaxactv import _sigmoid

SHAPES = [((7, 1031), -1), ((6, 5, 9), (0, 2))]
SHAPE_IDS = ["7x1031-last", "6x5x9-axes02"]


def describe(residuals):
  return "\n".join(f"  {aval.str_short()}: {desc}" for aval, desc in residuals)


def per_row_shape(shape, axis):
  axes = (axis,) if isinstance(axis, int) else axis
  axes = {a % len(shape) for a in axes}
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


def input_sized(residuals, shape):
  return [(aval, desc) for aval, desc in residuals if tuple(aval.shape) == tuple(shape)]


def x_of(shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)


# ------------------------------------------------------------------------------ sigmoid


@pytest.fixture(params=[False, True], ids=["keep-x", "keep-s"])
def keep_s(request, monkeypatch):
  # _backend.keep_sigmoid_of_minus_abs picks the sigmoid's residual (s = sigmoid(-|x|),
  # float32, for half precision on CPU; x elsewhere): force each form. jaxactv.sigmoid
  # is jitted, so it is traced again under the patch and after it.
  monkeypatch.setattr(_sigmoid, "keep_sigmoid_of_minus_abs", lambda dtype: request.param)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["sigmoid", "log_sigmoid"])
def test_sigmoid_rules_keep_exactly_the_input(name, dtype, keep_s):
  fn = getattr(jaxactv, name)
  x = x_of((7, 1031), dtype)
  res = saved_residuals(lambda x: fn(x).sum(), x)
  msg = f"{name} residuals:\n{describe(res)}"
  assert len(res) == 1, msg
  aval, desc = res[0]
  if name == "sigmoid" and keep_s:
    # One array of x's shape in the compute dtype, computed in the forward pass.
    assert aval.shape == x.shape and aval.dtype == jnp.float32, msg
    assert "from the argument" not in desc, msg
  else:
    assert aval.shape == x.shape and aval.dtype == dtype, msg
    assert "from the argument" in desc, msg


# ------------------------------------------------------------------------------ softmax


@pytest.mark.parametrize("shape, axis", SHAPES, ids=SHAPE_IDS)
def test_softmax_keeps_only_its_output(shape, axis):
  x = x_of(shape)
  res = saved_residuals(lambda x: jaxactv.softmax(x, axis=axis).sum(), x)
  msg = f"softmax residuals:\n{describe(res)}"
  assert len(res) == 1, msg
  aval, desc = res[0]
  assert aval.shape == x.shape and aval.dtype == x.dtype, msg
  # The output, not the argument: the backward pass is y * (g - sum(g * y)).
  assert "from the argument" not in desc, msg


def test_softmax_with_mask_keeps_no_extra_input_sized_float():
  x = x_of((7, 1031))
  where = jnp.asarray(np.random.default_rng(1).uniform(size=(7, 1031)) > 0.3)
  res = saved_residuals(lambda x, w: jaxactv.softmax(x, where=w).sum(), x, where)
  msg = f"masked softmax residuals:\n{describe(res)}"
  floats = [r for r in input_sized(res, x.shape) if jnp.issubdtype(r[0].dtype, jnp.floating)]
  assert len(floats) == 1, msg
  assert all(r[0].dtype == jnp.bool_ for r in input_sized(res, x.shape) if r not in floats), msg


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_softmax_half_precision_residual_is_not_a_float32_copy(dtype):
  x = x_of((7, 1031), dtype)
  res = saved_residuals(lambda x: jaxactv.softmax(x).sum(), x)
  msg = f"softmax {dtype.__name__} residuals:\n{describe(res)}"
  assert len(res) == 1, msg
  assert res[0][0].dtype == dtype and res[0][0].shape == x.shape, msg
  total_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a, _ in res)
  assert total_bytes == x.size * 2, msg


# -------------------------------------------------------------------------- log_softmax


@pytest.mark.parametrize("shape, axis", SHAPES, ids=SHAPE_IDS)
def test_log_softmax_keeps_one_input_sized_array_and_per_row_data(shape, axis, log_softmax_keeps_x):
  x = x_of(shape)
  res = saved_residuals(lambda x: jaxactv.log_softmax(x, axis=axis).sum(), x)
  msg = f"log_softmax residuals:\n{describe(res)}"
  big = input_sized(res, shape)
  assert len(big) == 1, msg
  aval, desc = big[0]
  assert aval.dtype == x.dtype, msg
  # keep-x: the argument itself, no copy; keep-y: the output.
  assert ("from the argument" in desc) == log_softmax_keeps_x, msg
  row = per_row_shape(shape, axis)
  others = [aval for aval, _ in res if tuple(aval.shape) != tuple(shape)]
  assert all(tuple(a.shape) == row for a in others), msg


def test_log_softmax_with_mask_keeps_the_callers_mask_not_a_copy(log_softmax_keeps_x):
  x = x_of((7, 1031))
  where = jnp.asarray(np.random.default_rng(2).uniform(size=(7, 1031)) > 0.3)
  res = saved_residuals(lambda x, w: jaxactv.log_softmax(x, where=w).sum(), x, where)
  msg = f"masked log_softmax residuals:\n{describe(res)}"
  big = input_sized(res, x.shape)
  floats = [r for r in big if r[0].dtype == jnp.float32]
  masks = [r for r in big if r[0].dtype == jnp.bool_]
  assert len(floats) == 1 and len(masks) == 1 and len(big) == 2, msg
  assert "from the argument" in masks[0][1], msg
  others = [aval for aval, _ in res if tuple(aval.shape) != x.shape]
  assert all(tuple(a.shape) == (7, 1) for a in others), msg


def test_log_softmax_half_precision_residual_keeps_input_dtype(log_softmax_keeps_x):
  x = x_of((7, 1031), jnp.bfloat16)
  res = saved_residuals(lambda x: jaxactv.log_softmax(x).sum(), x)
  msg = f"log_softmax bf16 residuals:\n{describe(res)}"
  big = input_sized(res, x.shape)
  assert len(big) == 1 and big[0][0].dtype == jnp.bfloat16, msg


# ---------------------------------------------------------------------------- logsumexp


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape, axis", SHAPES, ids=SHAPE_IDS)
def test_logsumexp_keeps_the_argument_and_per_row_data(shape, axis, keepdims):
  x = x_of(shape)
  res = saved_residuals(
      lambda x: jaxactv.logsumexp(x, axis=axis, keepdims=keepdims).sum(), x
  )
  msg = f"logsumexp residuals:\n{describe(res)}"
  big = input_sized(res, shape)
  assert len(big) == 1, msg
  assert big[0][0].dtype == x.dtype and "from the argument" in big[0][1], msg
  row = per_row_shape(shape, axis)
  others = [aval for aval, _ in res if tuple(aval.shape) != tuple(shape)]
  assert others and all(tuple(a.shape) == row for a in others), msg


def test_logsumexp_with_mask_keeps_the_callers_arrays():
  x = x_of((7, 1031), jnp.bfloat16)
  where = jnp.asarray(np.random.default_rng(3).uniform(size=(7, 1031)) > 0.3)
  res = saved_residuals(lambda x, w: jaxactv.logsumexp(x, -1, where=w).sum(), x, where)
  msg = f"masked logsumexp residuals:\n{describe(res)}"
  big = input_sized(res, x.shape)
  assert sorted(str(a.dtype) for a, _ in big) == ["bfloat16", "bool"], msg
  assert all("from the argument" in desc for _, desc in big), msg
  others = [aval for aval, _ in res if tuple(aval.shape) != x.shape]
  assert all(tuple(a.shape) == (7, 1) for a in others), msg

