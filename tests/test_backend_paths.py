"""Both forms of the softmax-loss backward, whichever backend the suite runs on.

jaxactv._backend picks, per backend and dtype, whether a cross-entropy backward
reuses the forward's exponentials (float32 on CPU) or recomputes them (GPU, TPU,
half precision). The tests run on CPU, so the accelerator form is forced here and
both are checked against the unfused reference twins.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxactv
from jaxactv import _cross_entropy, reference


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
  want = jax.grad(lambda x: f(x, reference.softmax_cross_entropy_with_integer_labels))(x)
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
  want = jax.grad(lambda x, t: f(x, t, reference.softmax_cross_entropy), (0, 1))(x, soft)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-7)
  finite = np.isfinite(np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[1])[finite], np.asarray(want[1])[finite], rtol=1e-5,
                             atol=1e-7)
