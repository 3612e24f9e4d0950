"""checkify.all_checks stays silent on the edge table, value and gradient; bad labels raise.

The edge policy promises exact, NaN-free answers at -inf (and, for the activations
and sigmoid losses, +inf) logits, on all-masked and all--inf rows, for ignored
examples, zero total weight, empty batches and large float16 arrays. Under
``checkify.all_checks`` every primitive's output is checked for NaN, every float
division for a zero divisor and every gather/scatter for out-of-bounds indices, so
silence means that no intermediate of the op or of its backward pass is NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxactv

INF = np.inf


def _silent(fs, *args):
  """Run every ``f`` in ``fs`` (value, then one vjp with a cotangent of ones) under
  ``checkify.all_checks``, all in one jit; assert that nothing was reported."""

  def value_and_vjp(*args):
    outs = {}
    for name, f in fs.items():
      out, pull = jax.vjp(f, *args)
      outs[name] = out, pull(jax.tree.map(jnp.ones_like, out))
    return outs

  err, out = jax.jit(checkify.checkify(value_and_vjp, errors=checkify.all_checks))(*args)
  assert err.get() is None, err.get()
  return out


# Rows: +inf mixed, all -inf, finite, two +inf, -inf mixed.
ROWS = np.array(
    [[INF, 0.0, -INF, 1.0], [-INF, -INF, -INF, -INF], [1.0, 2.0, 3.0, -1.0],
     [INF, INF, 0.0, 0.0], [-INF, 0.5, -2.0, -INF]],
    np.float32,
)
ROW_MASK = np.array([True, True, False, True, True])[:, None] & np.ones((1, 4), bool)
ELEMENTS = np.array([INF, -INF, 0.0, 30.0, -30.0, 1e4], np.float32)

ACTIVATIONS = {
    "sigmoid": lambda x: jaxactv.sigmoid(x),
    "log_sigmoid": lambda x: jaxactv.log_sigmoid(x),
    "softmax": lambda x: jaxactv.softmax(x),
    "log_softmax": lambda x: jaxactv.log_softmax(x),
    "logsumexp": lambda x: jaxactv.logsumexp(x, axis=-1),
    "logmeanexp": lambda x: jaxactv.logmeanexp(x, axis=-1),
    "softmax_masked": lambda x: jaxactv.softmax(x, where=jnp.asarray(ROW_MASK[: x.shape[0]])),
    "log_softmax_masked": lambda x: jaxactv.log_softmax(
        x, where=jnp.asarray(ROW_MASK[: x.shape[0]])),
    "logsumexp_masked": lambda x: jaxactv.logsumexp(
        x, axis=-1, where=jnp.asarray(ROW_MASK[: x.shape[0]])),
    "logmeanexp_masked": lambda x: jaxactv.logmeanexp(
        x, axis=-1, where=jnp.asarray(ROW_MASK[: x.shape[0]])),
    "logsumexp_b": lambda x: jaxactv.logsumexp(
        x, axis=-1, b=jnp.array([1.0, 0.0, 2.0, 0.5]), return_sign=True),
}


@pytest.mark.parametrize("rows", ["edge", "empty"])
def test_activations_are_silent_on_infinities_and_empty_rows(rows):
  x = ROWS if rows == "edge" else np.zeros((0, 4), np.float32)
  _silent({n: f for n, f in ACTIVATIONS.items() if "sigmoid" not in n}, jnp.asarray(x))
  e = ELEMENTS if rows == "edge" else np.zeros((0,), np.float32)
  _silent({n: ACTIVATIONS[n] for n in ("sigmoid", "log_sigmoid")}, jnp.asarray(e))


LABELS = np.array([0, 1, 2, 2, 1])  # row 1 (all -inf) carries mass: loss inf
SAFE_ROWS = np.where(ROWS == INF, 5.0, ROWS)  # +inf is outside the losses' policy


def _int_ce(**kw):
  return lambda x, w: jaxactv.softmax_cross_entropy_with_integer_labels(
      x, jnp.asarray(LABELS[: x.shape[0]]), class_weights=w, **kw)


INT_CE = {
    "plain": _int_ce(),
    "smooth_z": _int_ce(label_smoothing=0.2, z_loss=1e-3),
    "mean": _int_ce(reduction="mean", label_smoothing=0.1),
    "ignored": _int_ce(ignore_index=1, reduction="mean"),
    "masked_rows": lambda x, w: jaxactv.softmax_cross_entropy_with_integer_labels(
        x, jnp.asarray(LABELS[: x.shape[0]]), where=jnp.asarray(ROW_MASK[: x.shape[0]]),
        class_weights=w, label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
    "masked_examples": lambda x, w: jaxactv.softmax_cross_entropy_with_integer_labels(
        x, jnp.asarray(LABELS[: x.shape[0]]), where=jnp.asarray(ROW_MASK[: x.shape[0], 0]),
        class_weights=w, reduction="sum"),
}


@pytest.mark.parametrize("rows", ["edge", "empty"])
def test_integer_ce_is_silent_on_the_edge_table(rows):
  x = jnp.asarray(SAFE_ROWS if rows == "edge" else np.zeros((0, 4), np.float32))
  # Weights: none, all ones, and 0 at every label but the last class (zero total weight).
  _silent({n: functools.partial(_unweighted, f) for n, f in INT_CE.items()}, x)
  # With the weights differentiated too, the loss must be finite (an infinite mean has
  # no derivative in the weights): -inf logits where no smoothing reaches them, masked
  # rows, ignored examples, and zero total weight (where even an infinite total gives 0).
  smooth = {"smooth_z", "mean", "masked_rows"}
  weighted = {n: f for n, f in INT_CE.items() if n not in smooth}
  _silent(weighted, x.at[1, 1].set(0.0) if rows == "edge" else x, jnp.ones(4, jnp.float32))
  zero_at_labels = jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32)
  _silent({n: INT_CE[n] for n in ("mean", "masked_rows")}, x, zero_at_labels)


def _unweighted(f, x):
  return f(x, None)


def test_integer_ce_on_a_row_of_minus_inf_is_inf_not_nan():
  loss = jax.jit(jaxactv.softmax_cross_entropy_with_integer_labels)(
      jnp.full((1, 3), -INF), jnp.array([0]))
  assert float(loss[0]) == INF


SOFT_LABELS = np.array(
    [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0],
     [0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]], np.float32)

LOSSES_2D = {
    "soft_ce": lambda x, y: jaxactv.softmax_cross_entropy(x, y),
    "soft_ce_smooth_z_masked": lambda x, y: jaxactv.softmax_cross_entropy(
        x, y, where=jnp.asarray(ROW_MASK[: x.shape[0]]), label_smoothing=0.1, z_loss=1e-3,
        reduction="mean"),
    "soft_ce_broadcast": lambda x, y: jaxactv.softmax_cross_entropy(
        x, jnp.array([0.0, 0.5, 0.5, 0.0]), reduction="sum"),
    "kl": lambda x, y: jaxactv.kl_divergence_from_logits(
        x, jnp.where(y > 0, jnp.log(jnp.where(y > 0, y, 1.0)), -INF)),
    "kl_masked": lambda x, y: jaxactv.kl_divergence_from_logits(
        x, jnp.where(y > 0, jnp.log(jnp.where(y > 0, y, 1.0)), -INF),
        where=jnp.asarray(ROW_MASK[: x.shape[0]]), reduction="mean"),
    "entropy": lambda x, y: jaxactv.entropy_from_logits(x),
    "entropy_masked": lambda x, y: jaxactv.entropy_from_logits(
        x, where=jnp.asarray(ROW_MASK[: x.shape[0]]), reduction="mean"),
}


def test_softmax_losses_are_silent_on_the_edge_table():
  x, y = SAFE_ROWS, SOFT_LABELS
  _silent(LOSSES_2D, jnp.asarray(x), jnp.asarray(y))
  # A -inf logit outside the target's support: finite KL.
  x_kl = np.where(np.isinf(x), -3.0, x)
  x_kl[0, 2] = -INF
  _silent({n: f for n, f in LOSSES_2D.items() if n.startswith("kl")},
          jnp.asarray(x_kl), jnp.asarray(y))
  _silent(LOSSES_2D, jnp.zeros((0, 4), jnp.float32), jnp.zeros((0, 4), jnp.float32))


ELEM_LABELS = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0], np.float32)
SIGMOID_LOSSES = {
    "bce": lambda x, y: jaxactv.sigmoid_binary_cross_entropy(x, y),
    "bce_pos_weight_smooth": lambda x, y: jaxactv.sigmoid_binary_cross_entropy(
        x, y, pos_weight=jnp.full(x.shape, 2.0), label_smoothing=0.1, reduction="mean"),
    "bce_masked": lambda x, y: jaxactv.sigmoid_binary_cross_entropy(
        x, y, where=jnp.arange(x.shape[0]) % 2 == 0, reduction="mean"),
    "focal": lambda x, y: jaxactv.sigmoid_focal_loss(x, y),
    "focal_alpha_small_gamma": lambda x, y: jaxactv.sigmoid_focal_loss(x, y, 0.25, 0.5),
    "focal_gamma_zero": lambda x, y: jaxactv.sigmoid_focal_loss(x, y, 0.25, 0.0),
}


def test_sigmoid_losses_are_silent_at_plus_and_minus_inf():
  # Labels that agree with the infinite logits (loss 0) and ones that do not (inf).
  x = np.concatenate([ELEMENTS, -ELEMENTS])
  y = np.concatenate([ELEM_LABELS, ELEM_LABELS])
  _silent(SIGMOID_LOSSES, jnp.asarray(x), jnp.asarray(y))
  _silent(SIGMOID_LOSSES, jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32))


FP16_OPS = {
    "softmax": lambda x: jaxactv.softmax(x),
    "log_softmax": lambda x: jaxactv.log_softmax(x),
    "logsumexp": lambda x: jaxactv.logsumexp(x),
    "logmeanexp": lambda x: jaxactv.logmeanexp(x, where=x > -1.0),
    "sigmoid": lambda x: jaxactv.sigmoid(x),
    "int_ce_mean": lambda x: jaxactv.softmax_cross_entropy_with_integer_labels(
        x, jnp.arange(x.shape[0]) % x.shape[1], reduction="mean", label_smoothing=0.1),
    "soft_ce_mean": lambda x: jaxactv.softmax_cross_entropy(
        x, jnp.full(x.shape, 1.0 / x.shape[1], x.dtype), reduction="mean"),
    "bce_mean": lambda x: jaxactv.sigmoid_binary_cross_entropy(
        x, jnp.zeros_like(x), reduction="mean"),
    "focal_mean": lambda x: jaxactv.sigmoid_focal_loss(x, jnp.ones_like(x), reduction="mean"),
    "kl_mean": lambda x: jaxactv.kl_divergence_from_logits(x, x[::-1], reduction="mean"),
    "entropy_mean": lambda x: jaxactv.entropy_from_logits(x, reduction="mean"),
}


def test_float16_arrays_of_two_to_the_sixteen_elements_are_silent():
  x = jax.random.normal(jax.random.key(0), (2**12, 2**5), jnp.float32) * 4
  _silent(FP16_OPS, x.astype(jnp.float16))


@functools.cache
def _checked_ce(**kw):
  f = functools.partial(jaxactv.softmax_cross_entropy_with_integer_labels, check_labels=True, **kw)
  return jax.jit(checkify.checkify(f, errors=checkify.all_checks))


def test_label_check_is_opt_in_and_leaves_no_effect_by_default():
  # A dropped debug_check still puts an error effect on the jaxpr, and a jit with
  # effects loses its fast dispatch: the default trace must carry none.
  f = jaxactv.softmax_cross_entropy_with_integer_labels
  x, labels = jnp.zeros((2, 5)), jnp.array([0, 7])
  assert not jax.make_jaxpr(f)(x, labels).effects
  grad = jax.grad(lambda x, y: f(x, y, reduction="sum"))
  assert not jax.make_jaxpr(grad)(x, labels).effects
  assert jax.make_jaxpr(functools.partial(f, check_labels=True))(x, labels).effects
  # Without it, the bad example's loss is NaN (the policy's answer, selected, not an
  # arithmetic NaN), and checkify has nothing to report.
  err, out = jax.jit(checkify.checkify(f, errors=checkify.all_checks))(x, labels)
  assert np.isnan(np.asarray(out)[1]) and err.get() is None


@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_label_under_jit_names_the_label_and_the_class_count(bad):
  labels = jnp.array([[0, 1], [2, bad]])
  err, _ = _checked_ce()(jnp.zeros((2, 2, 5)), labels)
  msg = err.get()
  assert msg is not None and f"= {bad} " in msg and "5 classes" in msg, msg
  assert "[3]" in msg, msg  # the flattened position of the bad label
  # Unwrapped, the policy is unchanged: that example's loss is NaN, the others exact.
  plain = jax.jit(jaxactv.softmax_cross_entropy_with_integer_labels)(
      jnp.zeros((2, 2, 5)), labels)
  assert np.isnan(plain[1, 1]) and np.allclose(plain[0], np.log(5.0))


def test_ignore_index_is_not_reported_and_gradient_check_is_silent():
  labels = jnp.array([0, -100, 3])
  err, _ = _checked_ce(ignore_index=-100)(jnp.zeros((3, 4)), labels)
  assert err.get() is None
  grad = jax.grad(lambda x, y: jaxactv.softmax_cross_entropy_with_integer_labels(
      x, y, ignore_index=-100, reduction="mean", check_labels=True))
  err, g = jax.jit(checkify.checkify(grad, errors=checkify.all_checks))(jnp.zeros((3, 4)), labels)
  assert err.get() is None
  np.testing.assert_array_equal(np.asarray(g[1]), 0.0)


def test_out_of_range_label_in_the_gradient_is_reported_too():
  grad = jax.grad(lambda x, y: jaxactv.softmax_cross_entropy_with_integer_labels(
      x, y, check_labels=True).sum())
  err, _ = jax.jit(checkify.checkify(grad, errors=checkify.all_checks))(
      jnp.zeros((2, 3)), jnp.array([0, 3]))
  assert err.get() is not None and "= 3 " in err.get() and "3 classes" in err.get()


def test_fused_linear_loss_with_kept_logits_is_silent(monkeypatch):
  # The default value-and-grad keeps each chunk's logits and sweeps them in slices
  # (96 classes of 1000 here, the last one narrower), reading the label's logit with
  # a gather: no NaN, zero division or out-of-bounds index, with a -inf bias masking
  # classes (a whole slice and part of another) and ignored tokens.
  import jaxactv._linear_blocks as blocks

  monkeypatch.setattr(blocks, "kept_sweep_width", lambda: 96)
  monkeypatch.setattr(blocks, "sweeps_whole", lambda *shape: False)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 16)).astype(np.float32)
  w = (0.3 * rng.standard_normal((16, 1000))).astype(np.float32)
  bias = np.zeros(1000, np.float32)
  bias[100:250] = -INF
  y = rng.integers(0, 100, 300).astype(np.int32)
  y[::5] = -100
  f = lambda x, w: jaxactv.linear_softmax_cross_entropy(
      x, w, y, bias=bias, ignore_index=-100, z_loss=1e-3)
  # With label smoothing, mass goes to the -inf classes too: each counted token's loss
  # is inf (as optax's is), an ignored token's 0, and nothing computes inf * 0 on the way.
  smoothed = {
      reduction: lambda x, w, reduction=reduction: jaxactv.linear_softmax_cross_entropy(
          x, w, y, bias=bias, ignore_index=-100, label_smoothing=0.1, reduction=reduction)
      for reduction in ("mean", "none")
  }
  assert blocks.kept_chunks(300, 1000, 16).kept
  out = _silent({"linear": f, **smoothed}, x, w)
  loss, (dx, dw) = out["linear"]
  assert np.isfinite(loss) and np.isfinite(dx).all() and np.isfinite(dw).all()
  assert np.all(np.asarray(dw)[:, 100:250] == 0)  # masked classes get no gradient
  assert np.asarray(out["mean"][0]) == np.inf
  per_token = np.asarray(out["none"][0])
  assert np.all(per_token[::5] == 0) and np.all(np.delete(per_token, np.s_[::5]) == np.inf)
