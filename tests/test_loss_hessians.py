"""Reverse-over-reverse through the fused losses matches the twins' Hessians.

``jax.jacrev(jax.jacrev(loss))`` differentiates each custom backward rule again,
through the residuals its forward saved; a clamp or a stopped gradient in the
wrong place there gives a wrong second derivative (as ``max(max - x, 0)`` did in
the entropy: 1/2 at the argmax). The expected Hessians are ``jax.hessian`` of the
plain-autodiff twins in jaxactv.reference, in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxactv
from jaxactv import reference

X = np.array([0.3, 1.7, -0.4, 0.9, 1.7])  # a tie at the max, too
T = np.array([0.1, -1.0, 0.5, 2.0, 0.0])

CASES = {
    "int_ce": lambda m: lambda x: m.softmax_cross_entropy_with_integer_labels(
        x, jnp.array(2), label_smoothing=0.1, z_loss=0.01
    ),
    "soft_ce": lambda m: lambda x: m.softmax_cross_entropy(
        x, jax.nn.softmax(jnp.asarray(T)), label_smoothing=0.2
    ),
    "bce": lambda m: lambda x: m.sigmoid_binary_cross_entropy(
        x, jnp.array([1.0, 0.0, 1.0, 0.0, 0.3]), pos_weight=2.0, reduction="sum"
    ),
    "focal": lambda m: lambda x: m.sigmoid_focal_loss(
        x, jnp.array([1.0, 0.0, 1.0, 0.0, 1.0]), 0.25, 1.5, reduction="sum"
    ),
    "kl": lambda m: lambda x: m.kl_divergence_from_logits(x, jnp.asarray(T)),
    "kl_target": lambda m: lambda t: m.kl_divergence_from_logits(jnp.asarray(X), t),
    "entropy": lambda m: lambda x: m.entropy_from_logits(x),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hessian_matches_twin(name):
  with jax.enable_x64(True):
    point = jnp.asarray(T if name == "kl_target" else X, jnp.float64)
    got = jax.jit(jax.jacrev(jax.jacrev(CASES[name](jaxactv))))(point)
    want = jax.jit(jax.hessian(CASES[name](reference)))(point)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_linear_loss_hessian_in_x():
  with jax.enable_x64(True):
    x = jnp.array([[0.3, 1.7], [0.1, -0.2], [1.0, 2.0]])
    w = jnp.array([[0.5, -1.0, 0.3], [0.2, 0.1, -0.4]])
    y = jnp.array([0, 2, 1])
    f = lambda m: lambda x: m.linear_softmax_cross_entropy(x, w, y, logit_softcap=2.0)
    got = jax.jit(jax.jacrev(jax.jacrev(f(jaxactv))))(x)
    want = jax.jit(jax.hessian(f(reference)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
