"""Every op, value and gradient, runs under jax.numpy_dtype_promotion("strict").

Values are compared with the same call in the standard mode (float64 NumPy checks
the numbers elsewhere); what this module asserts is that strict mode raises nothing
and changes nothing, for float16, bfloat16, float32 and (with x64) float64.
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
  }


def _run(dtype):
  x = jnp.asarray(X, dtype)
  fs = _ops(dtype)
  return jax.jit(lambda x: {n: jax.value_and_grad(f)(x) for n, f in fs.items()})(x)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32],
                         ids=["f16", "bf16", "f32"])
def test_every_op_value_and_grad_in_strict_mode(dtype):
  standard = _run(dtype)
  with jax.numpy_dtype_promotion("strict"):
    strict = _run(dtype)
  for name in standard:
    for s, t in zip(standard[name], strict[name], strict=True):
      assert s.dtype == t.dtype, name
      np.testing.assert_array_equal(np.asarray(s, np.float64), np.asarray(t, np.float64),
                                    err_msg=name)
    assert strict[name][1].dtype == dtype, name  # gradients in the input's dtype


def test_every_op_value_and_grad_in_strict_mode_float64():
  with jax.enable_x64(True):
    standard = _run(jnp.float64)
    with jax.numpy_dtype_promotion("strict"):
      strict = _run(jnp.float64)
    for name in standard:
      assert strict[name][0].dtype == jnp.float64, name
      np.testing.assert_array_equal(strict[name][1], standard[name][1], err_msg=name)
