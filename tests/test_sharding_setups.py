"""Every public op on the meshes JAX's documentation leads users into.

Plain ``jax.jit`` with ``NamedSharding`` inputs on 2- and 3-axis meshes from
``jax.make_mesh``, whose axes are ``Explicit`` by default (sharding in types: an
op whose output sharding is ambiguous raises unless told), and the same meshes
with ``Auto`` axes, and ``Explicit`` inside ``with jax.set_mesh(mesh)``. The batch
is split over one axis (or two), the classes over another; labels, masks and
weights are either split like the batch or replicated. Each value and gradient
must equal the unsharded computation of the plain-autodiff twin
(``jaxactv.reference``) to 1e-5 relative.

The vocabulary-parallel integer cross-entropy (``vocab_axis`` inside
``jax.shard_map``) runs on (data, vocab) and (data, fsdp, vocab) meshes with the
tokens split over the non-vocab axes, in both ``check_vma`` modes.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxactv
from jaxactv import reference

B, K = 8, 20  # batch over 2 (or 2 x 2) devices, classes over 4 (or 2)


class Case(NamedTuple):
  ours: callable  # (**arrays) -> losses
  twin: callable
  arrays: dict  # name -> role: "logits", "full" (logits' shape), "batch", "class"
  diff: tuple[str, ...]  # the arguments differentiated


def _int_labels(rng):
  y = rng.integers(0, K, B).astype(np.int32)
  y[3] = -100  # ignored
  return y


def make_arrays(rng):
  logits = rng.normal(scale=3.0, size=(B, K)).astype(np.float32)
  # No infinities: the edge policy has tests of its own, where the twin is not the
  # reference (it answers NaN at some edges where jaxactv is exact).
  return {
      "logits": logits,
      "target": rng.normal(scale=2.0, size=(B, K)).astype(np.float32),
      "soft": jax.nn.softmax(rng.normal(size=(B, K))).astype(np.float32),
      "binary": (rng.uniform(size=(B, K)) < 0.3).astype(np.float32),
      "labels": _int_labels(rng),
      "mask": rng.uniform(size=(B, K)) < 0.8,
      "row_mask": np.arange(B) != 5,
      "class_weights": rng.uniform(0.5, 2.0, K).astype(np.float32),
      "pos_weight": rng.uniform(0.5, 3.0, K).astype(np.float32),
  }


def _is_label(labels):
  """A per-logit mask that keeps each example's own label."""
  return jnp.arange(K) == jnp.maximum(labels, 0)[:, None]


CASES = {
    "sigmoid": Case(lambda logits: jaxactv.sigmoid(logits),
                    lambda logits: reference.sigmoid(logits), {"logits": "logits"}, ("logits",)),
    "log_sigmoid": Case(lambda logits: jaxactv.log_sigmoid(logits),
                        lambda logits: reference.log_sigmoid(logits),
                        {"logits": "logits"}, ("logits",)),
    "softmax": Case(lambda logits, mask: jaxactv.softmax(logits, where=mask),
                    lambda logits, mask: reference.softmax(logits, where=mask),
                    {"logits": "logits", "mask": "full"}, ("logits",)),
    "log_softmax": Case(
        lambda logits, mask: jnp.where(mask, jaxactv.log_softmax(logits, where=mask), 0.0),
        lambda logits, mask: jnp.where(mask, reference.log_softmax(logits, where=mask), 0.0),
        {"logits": "logits", "mask": "full"}, ("logits",)),
    "logsumexp": Case(lambda logits, mask: jaxactv.logsumexp(logits, axis=-1, where=mask),
                      lambda logits, mask: reference.logsumexp(logits, axis=-1, where=mask),
                      {"logits": "logits", "mask": "full"}, ("logits",)),
    "int_ce": Case(
        lambda logits, labels, row_mask, class_weights:
            jaxactv.softmax_cross_entropy_with_integer_labels(
                logits, labels, where=row_mask, class_weights=class_weights, ignore_index=-100,
                label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
        lambda logits, labels, row_mask, class_weights:
            reference.softmax_cross_entropy_with_integer_labels(
                logits, labels, where=row_mask, class_weights=class_weights, ignore_index=-100,
                label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
        {"logits": "logits", "labels": "batch", "row_mask": "batch", "class_weights": "class"},
        ("logits",)),
    "int_ce_class_mask": Case(
        lambda logits, labels, mask: jaxactv.softmax_cross_entropy_with_integer_labels(
            logits, jnp.maximum(labels, 0), where=mask | _is_label(labels)),
        lambda logits, labels, mask: reference.softmax_cross_entropy_with_integer_labels(
            logits, jnp.maximum(labels, 0), where=mask | _is_label(labels)),
        {"logits": "logits", "labels": "batch", "mask": "full"}, ("logits",)),
    "soft_ce": Case(
        lambda logits, soft, row_mask: jaxactv.softmax_cross_entropy(
            jnp.maximum(logits, -50.0), soft, where=row_mask, label_smoothing=0.1),
        lambda logits, soft, row_mask: reference.softmax_cross_entropy(
            jnp.maximum(logits, -50.0), soft, where=row_mask, label_smoothing=0.1),
        {"logits": "logits", "soft": "full", "row_mask": "batch"}, ("logits", "soft")),
    "bce": Case(
        lambda logits, binary, mask, pos_weight: jaxactv.sigmoid_binary_cross_entropy(
            jnp.maximum(logits, -50.0), binary, where=mask, pos_weight=pos_weight,
            reduction="mean"),
        lambda logits, binary, mask, pos_weight: reference.sigmoid_binary_cross_entropy(
            jnp.maximum(logits, -50.0), binary, where=mask, pos_weight=pos_weight,
            reduction="mean"),
        {"logits": "logits", "binary": "full", "mask": "full", "pos_weight": "class"},
        ("logits", "binary")),
    "focal": Case(
        lambda logits, binary, mask: jaxactv.sigmoid_focal_loss(
            jnp.maximum(logits, -50.0), binary, alpha=0.25, where=mask),
        lambda logits, binary, mask: reference.sigmoid_focal_loss(
            jnp.maximum(logits, -50.0), binary, alpha=0.25, where=mask),
        {"logits": "logits", "binary": "full", "mask": "full"}, ("logits",)),
    "kl": Case(
        lambda logits, target, row_mask: jaxactv.kl_divergence_from_logits(
            logits, target, where=row_mask, reduction="sum"),
        lambda logits, target, row_mask: reference.kl_divergence_from_logits(
            logits, target, where=row_mask, reduction="sum"),
        {"logits": "logits", "target": "full", "row_mask": "batch"}, ("logits", "target")),
    # Per-example mask: the twin's gradient is NaN at a masked logit (0 * log 0).
    "entropy": Case(
        lambda logits, row_mask: jaxactv.entropy_from_logits(logits, where=row_mask),
        lambda logits, row_mask: reference.entropy_from_logits(logits, where=row_mask),
        {"logits": "logits", "row_mask": "batch"}, ("logits",)),
}


def scalar_and_grads(fn, names, diff):
  """jit of (losses, grads of sum(losses * ct)) over the arrays named ``diff``."""

  def scalar(*args):
    a = dict(zip(names, args, strict=True))
    out = fn(**a)
    ct = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    return jnp.sum(out * ct), out

  argnums = tuple(names.index(d) for d in diff)
  return jax.jit(jax.value_and_grad(scalar, argnums, has_aux=True))


MESHES = {
    # name: (shape, axis names, batch axes, class axis)
    "data_x_vocab": ((2, 4), ("data", "vocab"), "data", "vocab"),
    "data_fsdp_x_vocab": ((2, 2, 2), ("data", "fsdp", "vocab"), ("data", "fsdp"), "vocab"),
}


def specs(role, batch, classes, replicated):
  if role == "logits":
    return P(batch, classes)
  if replicated:
    return P()
  return {"full": P(batch, classes), "batch": P(batch), "class": P(classes)}[role]


@pytest.fixture(scope="module")
def arrays():
  return make_arrays(np.random.default_rng(0))


@pytest.fixture(scope="module")
def expected(arrays):
  """The twin's unsharded values and gradients, one per case."""
  out = {}
  for name, case in CASES.items():
    names = tuple(case.arrays)
    (_, v), g = scalar_and_grads(case.twin, names, case.diff)(*(arrays[n] for n in names))
    out[name] = (np.asarray(v), [np.asarray(x) for x in g])
  return out


def _close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want[np.isfinite(want)]).max(initial=0.0), 1e-30)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


# (mesh, axis types, aux arrays replicated): each row compiles every op once.
SETUPS = [
    ("data_x_vocab", "explicit", False),
    ("data_fsdp_x_vocab", "explicit_set_mesh", True),
    ("data_fsdp_x_vocab", "auto", False),
    ("data_x_vocab", "auto", True),
]


@pytest.mark.parametrize(
    "mesh_name, axis_type, replicated", SETUPS,
    ids=[f"{m}-{t}-{'aux_replicated' if r else 'aux_sharded'}" for m, t, r in SETUPS])
def test_plain_jit_on_sharded_inputs_equals_unsharded(
    arrays, expected, mesh_name, axis_type, replicated
):
  shape, axis_names, batch, classes = MESHES[mesh_name]
  kind = AxisType.Auto if axis_type == "auto" else AxisType.Explicit
  mesh = jax.make_mesh(shape, axis_names, axis_types=(kind,) * len(shape))
  scope = jax.set_mesh(mesh) if axis_type == "explicit_set_mesh" else contextlib.nullcontext()
  failures = []
  with scope:
    for name, case in CASES.items():
      names = tuple(case.arrays)
      args = [
          jax.device_put(arrays[n], NamedSharding(mesh, specs(r, batch, classes, replicated)))
          for n, r in case.arrays.items()
      ]
      try:
        (_, values), grads = scalar_and_grads(case.ours, names, case.diff)(*args)
        want_v, want_g = expected[name]
        _close(values, want_v, f"{name} value")
        for d, g, w in zip(case.diff, grads, want_g, strict=True):
          _close(g, w, f"{name} d/d{d}")
      except Exception as e:  # collect every op's failure, not just the first
        failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  assert not failures, "\n".join(failures)


# ------------------------------------------------------------- shard_map, vocab_axis

SHARD_MAP_MESHES = {
    "vocab": ((4,), ("vocab",), None),
    "data_x_vocab": ((2, 4), ("data", "vocab"), "data"),
    "data_fsdp_x_vocab": ((2, 2, 2), ("data", "fsdp", "vocab"), ("data", "fsdp")),
    "vocab_x_data": ((2, 4), ("vocab", "data"), "data"),
}


@pytest.mark.parametrize("mesh_name, check_vma", [
    ("vocab", True), ("data_x_vocab", True), ("data_x_vocab", False),
    ("data_fsdp_x_vocab", True), ("vocab_x_data", False)])
def test_vocab_parallel_integer_ce_under_shard_map(arrays, mesh_name, check_vma):
  shape, axis_names, tokens = SHARD_MAP_MESHES[mesh_name]
  v = dict(zip(axis_names, shape, strict=True))["vocab"]
  mesh = jax.make_mesh(shape, axis_names, axis_types=(AxisType.Explicit,) * len(shape))
  rng = np.random.default_rng(1)
  x = rng.normal(scale=3.0, size=(B, 2, v * 5)).astype(np.float32)
  y = rng.integers(0, v * 5, (B, 2)).astype(np.int32)
  y[0, 1] = -100
  cw = rng.uniform(0.5, 2.0, v * 5).astype(np.float32)
  options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)

  def local(x, y, cw):
    # The tokens' sum on each token shard, then over the token shards: a global sum.
    loss = jaxactv.softmax_cross_entropy_with_integer_labels(
        x, y, class_weights=cw, vocab_axis="vocab", reduction="sum", **options)
    return loss if tokens is None else jax.lax.psum(loss, tokens)

  in_specs = (P(tokens, None, "vocab"), P(tokens), P("vocab"))
  f = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=check_vma)
  args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, y, cw), in_specs,
                                                                     strict=True)]
  value, grad = jax.jit(jax.value_and_grad(f))(*args)
  twin = lambda x: reference.softmax_cross_entropy_with_integer_labels(
      x, y, class_weights=cw, reduction="sum", **options)
  want, want_grad = jax.value_and_grad(twin)(x)
  _close(value, want, "value")
  _close(grad, want_grad, "d/dlogits")


def test_vocab_axis_not_in_the_enclosing_shard_map_names_it_and_the_mesh_axes():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

  def local(x, y):
    return jaxactv.softmax_cross_entropy_with_integer_labels(x, y, vocab_axis="vocab")

  f = jax.shard_map(local, mesh=mesh, in_specs=(P("data", "model"), P("data")),
                    out_specs=P("data"))
  x = jax.device_put(np.zeros((8, 16), np.float32), NamedSharding(mesh, P("data", "model")))
  y = jax.device_put(np.zeros(8, np.int32), NamedSharding(mesh, P("data")))
  with pytest.raises(ValueError, match=r"vocab_axis='vocab'.*\('data', 'model'\)"):
    jax.jit(f)(x, y)


def test_vocab_axis_outside_shard_map_says_so():
  with pytest.raises(ValueError, match=r"vocab_axis='vocab'.*outside jax.shard_map"):
    jaxactv.softmax_cross_entropy_with_integer_labels(
        np.zeros((2, 3), np.float32), np.zeros(2, np.int32), vocab_axis="vocab")


# ------------------------------------------- shard_map, tokens split, every public op

# Per-example outputs (reduction "none"), so shard_map can hand each token shard's
# losses back as they are; replicated parameters (class weights, pos_weight, alpha,
# gamma) are differentiated too: their cotangent is the sum over every token shard.
PER_EXAMPLE = {
    **{k: CASES[k] for k in ("sigmoid", "log_sigmoid", "softmax", "log_softmax", "logsumexp",
                             "int_ce_class_mask", "soft_ce", "entropy")},
    "kl": Case(
        lambda logits, target, row_mask: jaxactv.kl_divergence_from_logits(
            logits, target, where=row_mask),
        lambda logits, target, row_mask: reference.kl_divergence_from_logits(
            logits, target, where=row_mask),
        {"logits": "logits", "target": "full", "row_mask": "batch"}, ("logits", "target")),
    "int_ce": Case(
        lambda logits, labels, row_mask, class_weights:
            jaxactv.softmax_cross_entropy_with_integer_labels(
                logits, labels, where=row_mask, class_weights=class_weights, ignore_index=-100,
                label_smoothing=0.1, z_loss=1e-3),
        lambda logits, labels, row_mask, class_weights:
            reference.softmax_cross_entropy_with_integer_labels(
                logits, labels, where=row_mask, class_weights=class_weights, ignore_index=-100,
                label_smoothing=0.1, z_loss=1e-3),
        {"logits": "logits", "labels": "batch", "row_mask": "batch", "class_weights": "class"},
        ("logits", "class_weights")),
    "bce": Case(
        lambda logits, binary, mask, pos_weight: jaxactv.sigmoid_binary_cross_entropy(
            logits, binary, where=mask, pos_weight=pos_weight),
        lambda logits, binary, mask, pos_weight: reference.sigmoid_binary_cross_entropy(
            logits, binary, where=mask, pos_weight=pos_weight),
        {"logits": "logits", "binary": "full", "mask": "full", "pos_weight": "class"},
        ("logits", "binary", "pos_weight")),
    "focal": Case(
        lambda logits, binary, alpha, gamma: jaxactv.sigmoid_focal_loss(
            logits, binary, alpha=alpha, gamma=gamma),
        lambda logits, binary, alpha, gamma: reference.sigmoid_focal_loss(
            logits, binary, alpha=alpha, gamma=gamma),
        {"logits": "logits", "binary": "full", "alpha": "class", "gamma": "class"},
        ("logits", "alpha", "gamma")),
}

TOKEN_MESHES = {
    "data": ((2,), ("data",), "data"),
    "data_x_model": ((2, 4), ("data", "model"), "data"),
    "data_fsdp_x_model": ((2, 2, 2), ("data", "fsdp", "model"), ("data", "fsdp")),
}


@pytest.fixture(scope="module")
def per_example_expected(arrays):
  arrays = dict(arrays, alpha=np.float32(0.25), gamma=np.float32(1.5))
  out = {}
  for name, case in PER_EXAMPLE.items():
    names = tuple(case.arrays)
    (_, v), g = scalar_and_grads(case.twin, names, case.diff)(*(arrays[n] for n in names))
    out[name] = (np.asarray(v), [np.asarray(x) for x in g])
  return arrays, out


@pytest.mark.parametrize("mesh_name, check_vma", [
    ("data", True), ("data_x_model", False), ("data_fsdp_x_model", True)])
def test_every_op_under_shard_map_with_tokens_split(per_example_expected, mesh_name, check_vma):
  arrays, expected = per_example_expected
  shape, axis_names, tokens = TOKEN_MESHES[mesh_name]
  mesh = jax.make_mesh(shape, axis_names, axis_types=(AxisType.Explicit,) * len(shape))
  failures = []
  for name, case in PER_EXAMPLE.items():
    names = tuple(case.arrays)
    in_specs = tuple(P(tokens) if r != "class" else P() for r in case.arrays.values())

    def local(*a, case=case, names=names):
      return case.ours(**dict(zip(names, a, strict=True)))

    f = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(tokens),
                      check_vma=check_vma)
    args = [jax.device_put(arrays[n], NamedSharding(mesh, s))
            for n, s in zip(names, in_specs, strict=True)]
    try:
      (_, values), grads = scalar_and_grads(
          lambda f=f, names=names, **a: f(*(a[n] for n in names)), names, case.diff)(*args)
      want_v, want_g = expected[name]
      _close(values, want_v, f"{name} value")
      for d, g, w in zip(case.diff, grads, want_g, strict=True):
        _close(g, w, f"{name} d/d{d}")
    except Exception as e:
      failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  assert not failures, "\n".join(failures)
