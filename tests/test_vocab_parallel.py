"""Vocabulary-parallel cross-entropy: ``vocab_axis`` inside ``jax.shard_map``.

The logits' class axis (and ``class_weights``) is split over a 4-device 'vocab' mesh
of host CPU devices (conftest.py asks for 8); labels stay replicated with global class
ids. The sharded loss and its gradient must equal the unsharded computation: the
plain-autodiff twin ``jaxactv.reference`` and PyTorch in float64 are the expected
values, and the unsharded op must agree too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import jaxactv
from jaxactv import reference

INT = jaxactv.softmax_cross_entropy_with_integer_labels
REDUCTIONS = ("none", "mean", "sum")
SHARDS = 4
V = SHARDS * 257  # 1028 classes, 257 per device: an odd slice size


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= SHARDS, "conftest.py should provide 8 host CPU devices"
  return jax.sharding.Mesh(np.array(jax.devices()[:SHARDS]), ("vocab",))


def f64(a):
  return np.asarray(a).astype(np.float64)


OPTIONS = {
    "ignore_index": {"ignore_index": -100},
    "smoothing": {"label_smoothing": 0.1},
    "weights": {"class_weights": True},
    "z_loss": {"z_loss": 1e-3},
    "all": {"ignore_index": -100, "label_smoothing": 0.1, "class_weights": True, "z_loss": 1e-3},
}


def make_inputs(seed, batch_shape, ignore):
  rng = np.random.default_rng(seed)
  x = rng.normal(scale=4.0, size=(*batch_shape, V)).astype(np.float32)
  labels = rng.integers(0, V, batch_shape).astype(np.int32)
  # Labels on and next to every shard boundary, and the last class.
  flat = labels.reshape(-1)
  edges = [0, 256, 257, 513, 514, 770, 771, V - 1]
  flat[: len(edges)] = edges
  if ignore:
    flat[[len(edges), len(edges) + 2]] = -100
  w = rng.uniform(0.2, 3.0, V).astype(np.float32)
  cts = {"none": rng.normal(size=batch_shape).astype(np.float32),
         "mean": np.float32(0.7 * flat.size), "sum": np.float32(-1.3)}
  return x, labels, w, cts


def sharded_losses(mesh, ndim, kwargs, weighted):
  """jit(shard_map) of every reduction, logits split over 'vocab', the result replicated."""
  x_spec = P(*([None] * (ndim - 1)), "vocab")

  def local(x, labels, w):
    return {r: INT(x, labels, class_weights=w if weighted else None, vocab_axis="vocab",
                   reduction=r, **kwargs) for r in REDUCTIONS}

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P(), P("vocab")),
                               out_specs=P()))


def values_and_grad(losses_fn, x, *args, cts):
  """(every reduction's value, the gradient of their sum weighted by ``cts``), one jit.

  One scalar holds every reduction's gradient, each with its own cotangent.
  """

  def scalar(x, *args):
    losses = losses_fn(x, *args)
    return sum(jnp.sum(losses[r] * cts[r]) for r in REDUCTIONS), losses

  (_, values), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(x, *args)
  return values, grad


CASES = [(option, (12,)) for option in OPTIONS] + [("all", (3, 4))]


@pytest.mark.parametrize("option, batch_shape", CASES,
                         ids=[f"{o}-{len(b) + 1}d" for o, b in CASES])
def test_sharded_loss_and_gradient_equal_the_unsharded_computation(mesh, option, batch_shape):
  spec = dict(OPTIONS[option])
  weighted = spec.pop("class_weights", False)
  x, labels, w, cts = make_inputs(0, batch_shape, "ignore_index" in spec)
  f = sharded_losses(mesh, x.ndim, spec, weighted)
  values, grad = values_and_grad(f, x, labels, w, cts=cts)

  def unsharded(fn):
    return lambda x, labels, w: {
        r: fn(x, labels, class_weights=w if weighted else None, reduction=r, **spec)
        for r in REDUCTIONS}

  twin, twin_grad = values_and_grad(
      unsharded(reference.softmax_cross_entropy_with_integer_labels), x, labels, w, cts=cts)
  plain, plain_grad = values_and_grad(unsharded(INT), x, labels, w, cts=cts)
  assert grad.shape == x.shape and grad.dtype == jnp.float32
  for r in REDUCTIONS:
    assert values[r].shape == (batch_shape if r == "none" else ())
    np.testing.assert_allclose(values[r], twin[r], rtol=1e-5, atol=1e-6, err_msg=r)
    # The psum adds the four slices' partial sums in another order than one device.
    np.testing.assert_allclose(values[r], plain[r], rtol=2e-6, atol=1e-6, err_msg=r)
  np.testing.assert_allclose(grad, twin_grad, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(grad, plain_grad, rtol=2e-6, atol=1e-6)
  if "ignore_index" in spec:
    ignored = labels == -100
    assert np.all(f64(values["none"])[ignored] == 0.0)
    assert np.all(f64(grad)[ignored] == 0.0)


def test_sharded_loss_matches_torch_with_every_option(mesh):
  x, labels, w, cts = make_inputs(1, (12,), ignore=True)
  spec = {"ignore_index": -100, "label_smoothing": 0.1}
  f = sharded_losses(mesh, 2, spec, weighted=True)
  values, grad = values_and_grad(f, x, labels, w, cts=cts)
  xt = torch.tensor(f64(x), requires_grad=True)
  for r in REDUCTIONS:
    loss = torch.nn.functional.cross_entropy(
        xt, torch.tensor(labels).long(), weight=torch.tensor(f64(w)), ignore_index=-100,
        label_smoothing=0.1, reduction=r)
    loss.backward(torch.tensor(f64(cts[r])))
    np.testing.assert_allclose(values[r], loss.detach().numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=r)
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2e-5, atol=1e-5)


def test_vocab_axis_outside_shard_map_raises_and_points_to_shard_map():
  x = jnp.zeros((2, 8), jnp.float32)
  labels = jnp.array([1, 2])
  with pytest.raises(ValueError, match="shard_map"):
    INT(x, labels, vocab_axis="vocab")
  with pytest.raises(ValueError, match="shard_map"):
    jax.jit(lambda x, y: INT(x, y, vocab_axis="vocab"))(x, labels)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_per_logit_mask_across_shards(mesh, reduction, check_vma):
  # Row 0 masks classes that are all on one shard; row 1 masks two whole shards (its
  # label elsewhere); row 3 masks every class: it must not count, on any shard.
  rng = np.random.default_rng(11)
  x = rng.standard_normal((5, V)).astype(np.float32)
  labels = np.array([0, 700, V - 1, 5, 300], np.int32)
  mask = np.ones((5, V), bool)
  mask[0, 257:514] = False
  mask[1, :514] = False
  mask[3, :] = False
  local = lambda x, m: INT(
      x, labels, where=m, vocab_axis="vocab", reduction=reduction, label_smoothing=0.1
  )
  sharded = jax.jit(
      jax.shard_map(
          local, mesh=mesh, in_specs=(P(None, "vocab"), P(None, "vocab")), out_specs=P(),
          check_vma=check_vma,
      )
  )
  twin = lambda x: reference.softmax_cross_entropy_with_integer_labels(
      x, labels, where=mask, reduction=reduction, label_smoothing=0.1
  )
  np.testing.assert_allclose(sharded(x, mask), jax.jit(twin)(x), rtol=1e-5, atol=1e-6)
  got = jax.jit(jax.grad(lambda x: sharded(x, mask).sum()))(x)
  want = jax.jit(jax.grad(lambda x: twin(x).sum()))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(f64(got)[3] == 0.0)
