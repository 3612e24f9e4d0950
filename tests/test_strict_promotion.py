"""Every op, value and gradient, runs under jax.numpy_dtype_promotion("strict").

float64 NumPy, optax and jax.nn check the numbers elsewhere; this module asserts
that strict mode raises nothing, keeps the gradients in the inputs' dtypes and (in
float32, against the standard mode) changes no number, for float16, bfloat16,
float32 and, with x64, float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxactv

X = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32) * 3
LABELS = np.array([0, 5, 2, 3])


def _ops(dtype):
  y = jnp.asarray(np.abs(np.sin(X)), dtype)
  lab = jnp.asarray(LABELS)
  w = jnp.linspace(0.5, 2.0, 6).astype(dtype)
  head = jnp.asarray(np.cos(np.arange(30.0)).reshape(6, 5), dtype)
  return {
      "sigmoid": lambda x: jaxactv.sigmoid(x).astype(jnp.float32).sum(),
      "log_sigmoid": lambda x: jaxactv.log_sigmoid(x).astype(jnp.float32).sum(),
      "softmax": lambda x: (jaxactv.softmax(x) * x).astype(jnp.float32).sum(),
      "log_softmax": lambda x: jaxactv.log_softmax(x, where=x > -4)[:, 0].astype(
          jnp.float32).sum(),
      "logsumexp": lambda x: jaxactv.logsumexp(x, -1, b=y).astype(jnp.float32).sum(),
      "logmeanexp": lambda x: jaxactv.logmeanexp(x, 0).astype(jnp.float32).sum(),
      "int_ce": lambda x: jaxactv.softmax_cross_entropy_with_integer_labels(
          x, lab, class_weights=w, label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
      "soft_ce": lambda x: jaxactv.softmax_cross_entropy(
          x, y, label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
      "bce": lambda x: jaxactv.sigmoid_binary_cross_entropy(
          x, y, pos_weight=w, label_smoothing=0.1, reduction="mean"),
      "focal": lambda x: jaxactv.sigmoid_focal_loss(x, y, 0.25, 2.0, reduction="mean"),
      "kl": lambda x: jaxactv.kl_divergence_from_logits(x, x[::-1], reduction="mean"),
      "entropy": lambda x: jaxactv.entropy_from_logits(x, reduction="mean"),
      # x as hidden states [4, 6] and a [6, 5] head, in one slice and in several.
      "linear_ce": lambda x: jaxactv.linear_softmax_cross_entropy(
          x, head, lab % 5, label_smoothing=0.1, z_loss=1e-3),
      "linear_ce_sliced": lambda x: jaxactv.linear_softmax_cross_entropy(
          x, head, lab % 5, chunk_size=(2, 2)),
      "linear_log_probs": lambda x: sum(
          t.astype(jnp.float32).sum()
          for t in jaxactv.linear_log_probs(x, head, lab % 5, return_entropy=True,
                                            chunk_size=(2, 3))),
  }


def _run(dtype):
  x = jnp.asarray(X, dtype)
  fs = _ops(dtype)
  return jax.jit(lambda x: {n: jax.value_and_grad(f)(x) for n, f in fs.items()})(x)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32],
                         ids=["f16", "bf16", "f32"])
def test_every_op_value_and_grad_in_strict_mode(dtype):
  with jax.numpy_dtype_promotion("strict"):
    strict = _run(dtype)
  for name, (value, grad) in strict.items():
    assert grad.dtype == dtype, name  # gradients in the input's dtype
    assert not np.any(np.isnan(np.asarray(value, np.float64))), name
    assert np.all(np.isfinite(np.asarray(grad, np.float64))), name
  # Strict mode changes no number: float32 against the standard mode.
  if dtype == jnp.float32:
    standard = _run(dtype)
    for name in standard:
      for s, t in zip(standard[name], strict[name], strict=True):
        np.testing.assert_array_equal(s, t, err_msg=name)


def test_every_op_value_and_grad_in_strict_mode_float64():
  with jax.enable_x64(True):
    with jax.numpy_dtype_promotion("strict"):
      strict = _run(jnp.float64)
    for name, (_, grad) in strict.items():
      assert grad.dtype == jnp.float64, name
      assert np.all(np.isfinite(np.asarray(grad))), name
