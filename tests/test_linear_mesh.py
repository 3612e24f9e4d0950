"""Both fused linear ops on the meshes real jobs use (8 host CPU devices, conftest.py).

* jax.shard_map on meshes of 1, 2 and 3 axes: tokens split over the non-vocab axes
  (one, or a tuple), classes over a vocab axis via vocab_axis, in both check_vma
  modes; w and bias are replicated over the token axes and must get the summed
  gradient.
* Plain jax.jit with NamedSharding inputs on AxisType.Auto and AxisType.Explicit
  meshes (jax.make_mesh's default), also under jax.set_mesh: batch over "data",
  classes over "vocab", labels/masks/weights sharded like the batch or replicated.

Every case must equal the unsharded twins in jaxactv.reference: values, and the
gradients of x, w and bias.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxactv
from jaxactv import reference

N, D, V = 24, 16, 4 * 257

CE = {"label_smoothing": 0.1, "z_loss": 1e-3, "temperature": 0.7, "reduction": "none"}
LP = {"temperature": 1.3, "logit_softcap": 4.0, "return_entropy": True}


def _problem():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((N, D)).astype(np.float32)
  w = (0.3 * rng.standard_normal((D, V))).astype(np.float32)
  b = (0.1 * rng.standard_normal(V)).astype(np.float32)
  y = rng.integers(0, V, N).astype(np.int32)
  mask = rng.random(N) > 0.25
  weights = rng.uniform(0.5, 2.0, N).astype(np.float32)
  return x, w, b, y, mask, weights


# Per-token cotangents: each token's gradient weighs differently, so a token shard
# that got another's cotangent, or the sum over devices taken twice, shows.
CT = np.linspace(0.5, 1.5, N).astype(np.float32)
CT2 = np.linspace(-1.0, 1.0, N).astype(np.float32)


def _both(mod, x, w, b, y, mask, weights, **shard):
  """Per-token CE (with where and weights) and log-probs with entropy, one module's."""
  ce = mod.linear_softmax_cross_entropy(x, w, y, bias=b, where=mask, weights=weights, **CE,
                                        **shard)
  lp, ent = mod.linear_log_probs(x, w, y, bias=b, where=mask, **LP, **shard)
  return ce, lp, ent


def _scalar(outs, ct, ct2):
  ce, lp, ent = outs
  return jnp.sum(ct * ce) + jnp.sum(ct2 * lp) + jnp.sum(ct * ent)


@functools.cache  # the twin, once for every mesh below
def _expected():
  x, w, b, y, mask, weights = _problem()
  f = lambda x, w, b: _both(reference, x, w, b, y, mask, weights)
  grads = jax.jit(jax.grad(lambda *a: _scalar(f(*a), CT, CT2), (0, 1, 2)))(x, w, b)
  return jax.jit(f)(x, w, b), grads


def _assert_equal(outs, grads):
  want, want_grads = _expected()
  for name, g, r in zip(("ce", "log_probs", "entropy"), outs, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=name)
  for name, g, r in zip("xwb", grads, want_grads, strict=True):
    np.testing.assert_allclose(
        g, r, rtol=0, atol=1e-5 * np.abs(np.asarray(r)).max(), err_msg=f"d{name}"
    )


# ------------------------------------------------------------------------ shard_map

MESHES = {
    # name: (mesh shape, axis names, the axes the tokens are split over, vocab axis)
    "data": ((8,), ("data",), "data", None),
    "vocab": ((4,), ("vocab",), None, "vocab"),
    "data,vocab": ((2, 4), ("data", "vocab"), "data", "vocab"),
    "3d,tokens over (data,seq)": ((2, 2, 2), ("data", "seq", "vocab"), ("data", "seq"), "vocab"),
    "3d,tokens over seq only": ((2, 2, 2), ("data", "seq", "vocab"), "seq", "vocab"),
}


# Each mesh once, and both check_vma modes on the data x vocab mesh (the suite's time).
@pytest.mark.parametrize(("mesh_name", "check_vma"), [
    ("data", True), ("vocab", False), ("data,vocab", True), ("data,vocab", False),
    ("3d,tokens over (data,seq)", True), ("3d,tokens over seq only", False)])
def test_shard_map_equals_unsharded(mesh_name, check_vma):
  shape, names, tokens, vocab = MESHES[mesh_name]
  devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  mesh = jax.sharding.Mesh(devices, names)
  x, w, b, y, mask, weights = _problem()
  tok, cls = P(tokens), P(vocab)

  def local(x, w, b, y, mask, weights):
    return _both(jaxactv, x, w, b, y, mask, weights, vocab_axis=vocab, chunk_size=(5, 100))

  f = jax.shard_map(
      local, mesh=mesh, in_specs=(P(tokens, None), P(None, vocab), cls, tok, tok, tok),
      out_specs=(tok, tok, tok), check_vma=check_vma,
  )
  run = jax.jit(lambda x, w, b: (
      f(x, w, b, y, mask, weights),
      jax.grad(lambda *a: _scalar(f(*a, y, mask, weights), CT, CT2), (0, 1, 2))(x, w, b),
  ))
  _assert_equal(*run(x, w, b))


def test_shard_map_sum_reduction_and_aux_on_a_data_vocab_mesh():
  # "sum" summed over the token shards by the caller; the argmax over the global vocabulary.
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "vocab"))
  x, w, b, y, mask, weights = _problem()
  cw = np.random.default_rng(2).uniform(0.5, 2.0, V).astype(np.float32)
  opts = {"where": mask, "weights": weights, "class_weights": cw, "z_loss": 1e-3}

  def local(x, w, b, cw, y, mask, weights):
    loss, aux = jaxactv.linear_softmax_cross_entropy(
        x, w, y, bias=b, where=mask, weights=weights, class_weights=cw, z_loss=1e-3,
        reduction="sum", return_aux=True, vocab_axis="vocab", chunk_size=(8, 100),
    )
    return lax.psum(loss, "data"), aux.argmax, aux.lse

  f = jax.jit(jax.shard_map(
      local, mesh=mesh,
      in_specs=(P("data"), P(None, "vocab"), P("vocab"), P("vocab"), P("data"), P("data"),
                P("data")),
      out_specs=(P(), P("data"), P("data")),
  ))
  loss, amax, lse = f(x, w, b, cw, y, mask, weights)
  want, aux = jax.jit(lambda x, w, b: reference.linear_softmax_cross_entropy(
      x, w, y, bias=b, reduction="sum", return_aux=True, **opts
  ))(x, w, b)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_array_equal(amax, aux.argmax)
  np.testing.assert_allclose(lse, aux.lse, rtol=1e-6)
  grads = jax.jit(jax.grad(
      lambda x, w, b: f(x, w, b, cw, y, mask, weights)[0], (0, 1, 2)))(x, w, b)
  want_grads = jax.jit(jax.grad(
      lambda x, w, b: reference.linear_softmax_cross_entropy(
          x, w, y, bias=b, reduction="sum", **opts), (0, 1, 2)))(x, w, b)
  for name, g, r in zip("xwb", grads, want_grads, strict=True):
    np.testing.assert_allclose(
        g, r, rtol=0, atol=1e-5 * np.abs(np.asarray(r)).max(), err_msg=f"d{name}"
    )


# ------------------------------------------------------------------------ plain jit


@pytest.mark.parametrize(
    ("axis_type", "in_set_mesh", "per_token"),
    [
        (AxisType.Auto, False, "sharded"),
        (AxisType.Explicit, False, "replicated"),
        (AxisType.Explicit, True, "sharded"),
    ],
    ids=str,
)
def test_plain_jit_with_named_shardings(axis_type, in_set_mesh, per_token):
  mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(axis_type,) * 2)
  x, w, b, y, mask, weights = _problem()
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  xs, ws, bs = put(x, "data", None), put(w, None, "vocab"), put(b, "vocab")
  tok = ("data",) if per_token == "sharded" else ()
  ys, ms, wts = put(y, *tok), put(mask, *tok), put(weights, *tok)
  cts = put(CT, *tok), put(CT2, *tok)

  def run(x, w, b, y, mask, weights, ct, ct2):
    f = lambda x, w, b: _both(jaxactv, x, w, b, y, mask, weights, chunk_size=(5, 300))
    return f(x, w, b), jax.grad(lambda *a: _scalar(f(*a), ct, ct2), (0, 1, 2))(x, w, b)

  with jax.set_mesh(mesh) if in_set_mesh else contextlib.nullcontext():
    outs, grads = jax.jit(run)(xs, ws, bs, ys, ms, wts, *cts)
  _assert_equal(outs, grads)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_plain_jit_gathers_neither_tokens_nor_classes(axis_type):
  # Chunks are strided columns of the tokens: each device walks its own tokens, so the
  # compiled step has no all-gather at all (the sums over devices are all-reduces). With
  # one class slice; slices of a vocab-sharded w under plain jit are not aligned with its
  # shards, and XLA gathers w for them (use vocab_axis inside shard_map there).
  mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(axis_type,) * 2)
  x, w, _, y, *_ = _problem()
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  f = jax.jit(jax.value_and_grad(
      lambda x, w, y: jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=4), (0, 1)
  ))
  text = f.lower(put(x, "data", None), put(w, None, "vocab"), put(y, "data")).compile().as_text()
  assert "all-gather" not in text
  assert "all-reduce" in text


# ------------------------------------------------- the default chunks (kept logits)


@pytest.fixture
def narrow_sweep(monkeypatch):
  """The kept logits' gradient swept 100 classes at a time (257 local classes: two
  slices and a narrower last one), so these small meshes test the sweep too."""
  import jaxactv._linear_blocks as blocks

  monkeypatch.setattr(blocks, "kept_sweep_width", lambda: 100)
  monkeypatch.setattr(blocks, "sweeps_whole", lambda *shape: False)


def _default_chunks_ce(x, w, b, y, mask, weights, **shard):
  # "mean": the value-and-grad that keeps each chunk's logits (chunk_size=None).
  return jaxactv.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights, label_smoothing=0.1, z_loss=1e-3,
      **shard,
  )


@functools.cache
def _expected_mean():
  x, w, b, y, mask, weights = _problem()
  f = lambda x, w, b: reference.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=mask, weights=weights, label_smoothing=0.1, z_loss=1e-3)
  return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, w, b)


def _assert_mean_equal(loss, grads):
  want, want_grads = _expected_mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for name, g, r in zip("xwb", grads, want_grads, strict=True):
    np.testing.assert_allclose(
        g, r, rtol=0, atol=1e-5 * np.abs(np.asarray(r)).max(), err_msg=f"d{name}"
    )


@pytest.mark.parametrize(("mesh_name", "check_vma"), [
    ("data,vocab", True), ("data,vocab", False), ("3d,tokens over (data,seq)", True)])
def test_default_chunks_under_shard_map(narrow_sweep, mesh_name, check_vma):
  shape, names, tokens, _ = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names)
  x, w, b, y, mask, weights = _problem()

  def local(x, w, b, y, mask, weights):
    # The global mean: each token shard's sum and total weight, summed over the token axes.
    s = _default_chunks_ce(x, w, b, y, mask, weights, vocab_axis="vocab", reduction="sum")
    return lax.psum(s, tokens) / lax.psum(jnp.sum(jnp.where(mask, weights, 0.0)), tokens)

  f = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(tokens), P(None, "vocab"), P("vocab"), P(tokens), P(tokens), P(tokens)),
      out_specs=P(), check_vma=check_vma,
  )
  # jax.make_mesh's axes are Explicit: the inputs must already be laid out as in_specs.
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  y, mask, weights = (put(a, tokens) for a in (y, mask, weights))
  run = jax.jit(jax.value_and_grad(lambda x, w, b: f(x, w, b, y, mask, weights), (0, 1, 2)))
  _assert_mean_equal(*run(put(x, tokens, None), put(w, None, "vocab"), put(b, "vocab")))


def _plain_jit_default_chunks(axis_type):
  mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(axis_type,) * 2)
  x, w, b, y, mask, weights = _problem()
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  args = (put(x, "data", None), put(w, None, "vocab"), put(b, "vocab"),
          put(y, "data"), put(mask, "data"), put(weights, "data"))
  f = jax.jit(jax.value_and_grad(
      lambda x, w, b, *t: _default_chunks_ce(x, w, b, *t), (0, 1, 2)))
  with jax.set_mesh(mesh):
    _assert_mean_equal(*f(*args))
    return f.lower(*args).compile().as_text()


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_default_chunks_under_plain_jit_gather_nothing(axis_type):
  # 1028 classes: the fixed rule takes them as one slice, so the kept block is swept
  # whole, and even an Auto mesh, whose shardings the trace cannot see, gathers nothing.
  assert "all-gather" not in _plain_jit_default_chunks(axis_type)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_swept_slices_under_plain_jit(narrow_sweep, axis_type):
  # Where the sweep would slice, classes split over "vocab" under Explicit types make
  # each device sweep its kept block whole: slices would not line up with the shards.
  text = _plain_jit_default_chunks(axis_type)
  if axis_type == AxisType.Explicit:
    assert "all-gather" not in text
