"""linear_softmax_cross_entropy against the unfused x @ w + cross-entropy.

Expected values come from jaxactv.reference (the logits formed in full, then the
textbook loss), float64 NumPy, and optax; never from the fused op itself.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from loss_testing import all_eqns

import jaxactv
from jaxactv import reference

RNG = np.random.default_rng(0)


def _problem(n=37, d=16, v=2049, scale=0.3, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(dtype)
  w = (scale * rng.standard_normal((d, v))).astype(dtype)
  b = (0.1 * rng.standard_normal(v)).astype(dtype)
  y = rng.integers(0, v, n).astype(np.int32)
  return x, w, b, y


def _value_and_grads(f, x, w, b):
  return jax.jit(jax.value_and_grad(lambda x, w, b: f(x, w, b).sum(), (0, 1, 2)))(x, w, b)


def _reference_values(options, x, w, b, y):
  """The unfused twin's losses and (d x, d w, d b) of their sum."""
  unfused = lambda x, w, b: reference.linear_softmax_cross_entropy(x, w, y, bias=b, **options)
  return jax.jit(unfused)(x, w, b), _value_and_grads(unfused, x, w, b)[1]


def _assert_close_to_reference(options, chunk_size, x, w, b, y, rtol=1e-5, grad_rtol=1e-4,
                               want=None):
  fused = lambda x, w, b: jaxactv.linear_softmax_cross_entropy(
      x, w, y, bias=b, chunk_size=chunk_size, **options
  )
  want_loss, ref_grads = _reference_values(options, x, w, b, y) if want is None else want
  np.testing.assert_allclose(jax.jit(fused)(x, w, b), want_loss, rtol=rtol, atol=1e-6)
  _, grads = _value_and_grads(fused, x, w, b)
  for name, g, r in zip("xwb", grads, ref_grads, strict=True):
    scale = np.abs(np.asarray(r)).max()
    np.testing.assert_allclose(g, r, rtol=0, atol=grad_rtol * scale, err_msg=f"d{name}")


OPTIONS = [
    {},
    {"reduction": "none"},
    {"reduction": "sum"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "reduction": "none"},
    {"logit_softcap": 3.0},
    {"logit_softcap": 3.0, "label_smoothing": 0.2, "z_loss": 1e-4, "reduction": "none"},
]

# None (the default rule), rows only, and (rows, classes per slice) with a slice width that
# leaves a narrower last slice (2049 = 2 * 1024 + 1 and 2049 = 2 * 700 + 649).
CHUNKS = [None, 8, (8, 1024), (16, 700)]


# Each compile of the chunked op costs about a second on CPU, so not every option meets
# every chunking. Each option set alone meets (16, 700), whose last row chunk is partial
# and whose last class slice is narrower than the rest. Every other chunking meets no
# option, and the options that reach across slices in every way at once (the softcap's
# chain rule, smoothing's sum over all classes, z-loss's log-sum-exp) both summed
# (the kept-logits sweep under chunk_size=None) and per token. The kept sweep meets each
# of these, in other company, in test_kept_logits_swept_in_slices_match_the_reference.
ACROSS_SLICES = {"logit_softcap": 3.0, "label_smoothing": 0.2, "z_loss": 1e-4}
UNEVEN_CASES = [(CHUNKS[-1], options) for options in OPTIONS] + [
    (chunk_size, options) for chunk_size in CHUNKS[:-1]
    for options in ({}, {**ACROSS_SLICES, "reduction": "sum"},
                    {**ACROSS_SLICES, "reduction": "none"})
]


@functools.cache
def _uneven_reference(option_items):
  # The twin does not depend on chunk_size: formed once per option set, not per chunking.
  return _reference_values(dict(option_items), *_problem())


@pytest.mark.parametrize(
    "chunk_size, options", UNEVEN_CASES,
    ids=[f"{c}-{','.join(o) or 'plain'}" for c, o in UNEVEN_CASES])
def test_matches_unfused_on_uneven_shapes(chunk_size, options):
  # N = 37 is not a multiple of any chunk and V = 2049 is odd.
  x, w, b, y = _problem()
  want = _uneven_reference(tuple(sorted(options.items())))
  _assert_close_to_reference(options, chunk_size, x, w, b, y, want=want)


def test_ignore_index_rows_count_for_nothing():
  x, w, b, y = _problem()
  y = y.copy()
  y[::3] = -100
  for reduction in ("mean", "sum", "none"):
    _assert_close_to_reference(
        {"ignore_index": -100, "reduction": reduction}, (8, 700), x, w, b, y
    )
  losses = jaxactv.linear_softmax_cross_entropy(x, w, y, ignore_index=-100, reduction="none")
  assert np.all(np.asarray(losses)[::3] == 0)
  dx = jax.jit(jax.grad(
      lambda x: jaxactv.linear_softmax_cross_entropy(x, w, y, ignore_index=-100)))(x)
  assert np.all(np.asarray(dx)[::3] == 0)


def test_mean_over_ignored_tokens_only_is_zero():
  x, w, _, y = _problem(n=5)
  y = np.full_like(y, -1)
  loss, dx = jax.value_and_grad(
      lambda x: jaxactv.linear_softmax_cross_entropy(x, w, y, ignore_index=-1)
  )(x)
  assert float(loss) == 0.0 and np.all(np.asarray(dx) == 0)


def test_padded_classes_never_enter_the_softmax():
  # Logits of O(1): a zero logit added for a padded class would move the loss visibly.
  rng = np.random.default_rng(1)
  n, d, v = 13, 8, 2049
  x = rng.standard_normal((n, d)).astype(np.float32)
  w = (0.05 * rng.standard_normal((d, v))).astype(np.float32)
  y = rng.integers(0, v, n).astype(np.int32)
  logits = x.astype(np.float64) @ w.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
  expected = np.mean(lse - logits[np.arange(n), y])
  with_zero_column = np.mean(np.logaddexp(lse, 0.0) - logits[np.arange(n), y])
  assert abs(with_zero_column - expected) > 1e-4  # the test can tell padding apart
  for chunk in [(8, 1024), (8, 128), (5, 2048)]:
    got = jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=chunk)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_leading_batch_dimensions():
  x, w, b, y = _problem(n=24)
  x3, y3 = x.reshape(2, 3, 4, -1), y.reshape(2, 3, 4)
  got = jaxactv.linear_softmax_cross_entropy(x3, w, y3, bias=b, reduction="none", chunk_size=5)
  assert got.shape == (2, 3, 4)
  want = reference.linear_softmax_cross_entropy(x, w, y, bias=b, reduction="none")
  np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-5)


def test_agrees_with_optax_unfused():
  x, w, _, y = _problem(n=64, d=32, v=1000)
  fused, dfused = jax.jit(jax.value_and_grad(
      lambda x, w: jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=16), (0, 1)
  ))(x, w)
  peer, dpeer = jax.jit(jax.value_and_grad(
      lambda x, w: optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean(), (0, 1)
  ))(x, w)
  np.testing.assert_allclose(fused, peer, rtol=1e-5)
  for g, r in zip(dfused, dpeer, strict=True):
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * np.abs(np.asarray(r)).max())


def test_softcap_gradient_has_the_chain_rule_factor():
  # With a tight cap most logits saturate: without the 1 - tanh^2 factor the gradient is off.
  x, w, b, y = _problem(n=9, v=300, scale=2.0)
  _assert_close_to_reference({"logit_softcap": 1.5}, 4, x, w, b, y)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype):
  x, w, _, y = _problem(n=40, d=32, v=3000)
  xh, wh = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  loss = jaxactv.linear_softmax_cross_entropy(xh, wh, y, chunk_size=(16, 1024))
  assert loss.dtype == jnp.float32
  # The same half-precision values in float32: the products are exact, only the order of
  # the float32 accumulation differs.
  want = jax.jit(reference.linear_softmax_cross_entropy)(
      xh.astype(jnp.float32), wh.astype(jnp.float32), y
  )
  np.testing.assert_allclose(loss, want, rtol=1e-4)
  dx, dw = jax.jit(jax.grad(lambda x, w: jaxactv.linear_softmax_cross_entropy(x, w, y), (0, 1)))(
      xh, wh)
  assert dx.dtype == dtype and dw.dtype == dtype
  ref_dx = jax.jit(jax.grad(reference.linear_softmax_cross_entropy))(
      xh.astype(jnp.float32), wh.astype(jnp.float32), y)
  np.testing.assert_allclose(
      np.asarray(dx, np.float32), ref_dx, rtol=0, atol=2e-2 * np.abs(ref_dx).max()
  )


def test_float64_when_enabled():
  with jax.enable_x64(True):
    x, w, b, y = _problem(n=11, v=77, dtype=np.float64)
    got = jaxactv.linear_softmax_cross_entropy(x, w, y, bias=b, chunk_size=(4, 30))
    assert got.dtype == jnp.float64
    logits = x @ w + b
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(got, np.mean(lse - logits[np.arange(11), y]), rtol=1e-13)


def test_out_of_range_labels():
  x, w, _, y = _problem(n=6, v=50)
  bad = y.copy()
  bad[2] = 50
  with pytest.raises(ValueError, match=r"50.*50 classes"):
    jaxactv.linear_softmax_cross_entropy(x, w, bad)
  losses = jax.jit(
      lambda x, y: jaxactv.linear_softmax_cross_entropy(x, w, y, reduction="none")
  )(x, bad)
  losses = np.asarray(losses)
  assert np.isnan(losses[2]) and np.all(np.isfinite(np.delete(losses, 2)))
  want = reference.linear_softmax_cross_entropy(x, w, y, reduction="none")
  np.testing.assert_allclose(np.delete(losses, 2), np.delete(np.asarray(want), 2), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"w": np.ones((5, 7), np.float32)}, ValueError, r"\(6, 4\).*\(5, 7\)"),
        ({"labels": np.zeros((3,), np.int32)}, ValueError, r"\(3,\).*\(6,\)"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": (4, 0)}, ValueError, "chunk_size"),
        ({"logit_softcap": 0.0}, ValueError, "logit_softcap"),
        ({"logit_softcap": -2.0}, ValueError, "logit_softcap"),
        ({"reduction": "avg"}, ValueError, "none.*mean.*sum"),
        ({"labels": np.zeros((6,), np.float32)}, TypeError, "integer"),
        ({"bias": np.zeros((3,), np.float32)}, ValueError, "bias"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"vocab_axis": "vocab"}, ValueError, "shard_map"),
    ],
)
def test_bad_input(kwargs, error, pattern):
  args = {
      "x": np.ones((6, 4), np.float32),
      "w": np.ones((4, 7), np.float32),
      "labels": np.zeros((6,), np.int32),
  }
  args.update(kwargs)
  x, w, labels = args.pop("x"), args.pop("w"), args.pop("labels")
  with pytest.raises(error, match=pattern):
    jaxactv.linear_softmax_cross_entropy(x, w, labels, **args)


@pytest.mark.parametrize("chunk_size", [None, 3, (2, 4)], ids=str)
def test_an_empty_batch_of_tokens_gives_what_the_unfused_loss_gives(chunk_size):
  # No tokens: the mean and sum are 0 (as the logits-level losses give), the per-token
  # losses and log-probs empty, and the gradients zero (dx empty).
  x, w = np.zeros((2, 0, 4), np.float32), np.ones((4, 10), np.float32)
  y = np.zeros((2, 0), np.int32)
  for reduction in ("mean", "sum", "none"):
    f = lambda x, w, reduction=reduction: jaxactv.linear_softmax_cross_entropy(
        x, w, y, reduction=reduction, chunk_size=chunk_size)
    v, pull = jax.vjp(jax.jit(f), x, w)
    dx, dw = pull(jnp.ones_like(v))
    want = jaxactv.softmax_cross_entropy_with_integer_labels(
        np.zeros((2, 0, 10), np.float32), y, reduction=reduction)
    assert v.shape == want.shape and np.all(np.asarray(v) == 0), (reduction, v)
    assert dx.shape == x.shape and np.all(np.asarray(dw) == 0)
  log_p, ent = jaxactv.linear_log_probs(x, w, y, return_entropy=True, chunk_size=chunk_size)
  assert log_p.shape == ent.shape == (2, 0)


@pytest.mark.parametrize("op", ["linear_softmax_cross_entropy", "linear_log_probs"])
def test_symbolic_token_count_under_jax_export_is_a_clear_error(op):
  (n,) = jax.export.symbolic_shape("n")
  args = (jax.ShapeDtypeStruct((n, 16), jnp.float32), jax.ShapeDtypeStruct((16, 100), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  with pytest.raises(NotImplementedError, match=r"\(n, 16\).*symbolic dimensions"):
    jax.export.export(jax.jit(getattr(jaxactv, op)))(*args)


# ------------------------------------------------------------------ memory and work


def test_no_array_the_size_of_the_logits_exists():
  n, d, v = 512, 32, 4096
  x = jnp.ones((n, d))
  w = jnp.ones((d, v))
  y = jnp.zeros((n,), jnp.int32)
  for reduction in ("mean", "none"):
    f = jax.value_and_grad(
        lambda x, w, r=reduction: jaxactv.linear_softmax_cross_entropy(
            x, w, y, reduction=r, chunk_size=64
        ).sum(),
        (0, 1),
    )
    jaxpr = jax.make_jaxpr(f)(x, w).jaxpr
    sizes = [
        int(np.prod(var.aval.shape))
        for eqn in all_eqns(jaxpr)
        for var in eqn.outvars
        if hasattr(var.aval, "shape")
    ]
    assert max(sizes) <= 64 * v, (reduction, max(sizes))
    assert max(sizes) < n * v


def _count_matmuls(f, *args):
  jaxpr = jax.make_jaxpr(f)(*args).jaxpr
  return sum(eqn.primitive.name == "dot_general" for eqn in all_eqns(jaxpr))


def test_matmul_count():
  # Each scan body is traced once, so these are matmuls per chunk.
  x, w, _, y = _problem(n=32, d=8, v=100)
  fused = lambda r: lambda x, w: jaxactv.linear_softmax_cross_entropy(
      x, w, y, reduction=r, chunk_size=8
  ).sum()
  for reduction in ("mean", "sum"):
    assert _count_matmuls(jax.value_and_grad(fused(reduction), (0, 1)), x, w) == 3
    assert _count_matmuls(fused(reduction), x, w) == 1  # no gradient work without grad
  assert _count_matmuls(jax.value_and_grad(fused("none"), (0, 1)), x, w) == 4


def _value_and_grad_temp_bytes(f, n, d, v):
  """XLA's temp memory for ``value_and_grad(f, (0, 1))`` at ``[n, d] x [d, v]`` float32:
  compiler memory analysis, compiled only (deterministic, not a timing)."""
  args = (
      jax.ShapeDtypeStruct((n, d), jnp.float32),
      jax.ShapeDtypeStruct((d, v), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.int32),
  )
  compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _unfused_loss(x, w, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


def test_memory_is_a_fraction_of_the_unfused_version():
  n, d, v = 2048, 64, 8192
  # 256-row chunks: 1/8 of the tokens per block (the default rule would use 1024 rows,
  # half of this small problem; the full-size comparison is in benchmarks/).
  fused = _value_and_grad_temp_bytes(
      lambda x, w, y: jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=256), n, d, v)
  unfused = _value_and_grad_temp_bytes(_unfused_loss, n, d, v)
  assert unfused >= n * v * 4  # it holds the logits
  assert fused * 4 < unfused, (fused, unfused)


def test_default_chunk_rule():
  from jaxactv._linear_blocks import SLICE_BYTES
  from jaxactv._linear_cross_entropy import BLOCK_BYTES, default_chunks

  # The accelerators' rule (128 rows at least): 32768 classes fit one slice.
  rows, width = default_chunks(100_000, 32768, 256, min_rows=128)
  assert width == 32768 and rows * width * 4 <= BLOCK_BYTES and rows % 8 == 0
  # CPU's (512 rows at least): 16 MiB / (4 * 512) = 8192 classes per slice, 512 rows.
  assert default_chunks(100_000, 32768, 256, min_rows=512) == (512, 8192)
  # Fewer tokens than min_rows: the slice is as wide as those tokens allow.
  assert default_chunks(100, 32768, 256, min_rows=512) == (104, 32768)
  rows, width = default_chunks(100_000, 262144, 256)
  assert width < 262144 and width % 128 == 0 and rows * width * 4 <= BLOCK_BYTES
  assert default_chunks(5, 1000, 64) == (8, 1000)
  # A wide hidden size bounds the [D, slice] slice of w and the [rows, D] chunk of x too.
  rows, width = default_chunks(100_000, 131072, 4096)
  assert 4096 * width * 4 <= SLICE_BYTES and rows * 4096 * 4 <= BLOCK_BYTES
  assert rows * width * 4 <= BLOCK_BYTES and width % 128 == 0


def test_kept_chunk_rule():
  from jaxactv._linear_blocks import (
      BLOCK_BYTES,
      KEPT_BYTES,
      KEPT_MIN_ROWS,
      default_chunks,
      kept_chunks,
  )

  # The benchmark's shapes: 64 MiB of logits fit 512 rows of 32768 classes, but an
  # eighth of 2048 tokens is 256; 128 rows of 131072 classes fill the 64 MiB.
  big = kept_chunks(2048, 32768, 256)
  assert big.kept and big.rows == 256 and big.rows * 32768 * 4 <= KEPT_BYTES
  assert kept_chunks(1024, 131072, 256)[:2] == (128, min(big.width, 131072))
  # Where the fixed rule takes the vocabulary as one slice, so does the sweep.
  assert default_chunks(1024, 8192, 256)[1] == 8192
  assert kept_chunks(1024, 8192, 256) == (128, 8192, True)
  # Many tokens: the 64 MiB bound, as a multiple of 8; every block fits its budget.
  rows, width, kept = kept_chunks(100_000, 50_000, 1024)
  assert kept and rows % 8 == 0 and rows * 50_000 * 4 <= KEPT_BYTES
  assert rows * 1024 * 4 <= BLOCK_BYTES and width <= 50_000
  # A small batch is one chunk; between, at least KEPT_MIN_ROWS rows.
  assert kept_chunks(100, 5000, 64)[:1] == (104,) and kept_chunks(100, 5000, 64).kept
  assert kept_chunks(300, 5000, 64).rows == KEPT_MIN_ROWS
  # 128 rows of 262144 classes exceed 64 MiB, and half-precision operands on CPU:
  # the fixed blocks of the forward pass, recomputed in the backward pass.
  assert kept_chunks(100_000, 262144, 256) == (*default_chunks(100_000, 262144, 256), False)
  assert not kept_chunks(2048, 32768, 256, half_operands=True).kept
  # Classes split over an Explicit mesh axis: each device's block is swept whole.
  assert kept_chunks(2048, 32768, 256, classes_split=True) == (256, 32768, True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3},
        {"logit_softcap": 3.0, "temperature": 0.7, "ignore_index": 5},
        {"class_weights": "random", "label_smoothing": 0.2, "where": "random"},
    ],
)
def test_kept_logits_swept_in_slices_match_the_reference(monkeypatch, options):
  # The default value-and-grad keeps each chunk's logits and sweeps them for the
  # gradient in slices; 96-class slices of 1000 classes (ten and a narrower last
  # one) over three chunks of 128 rows (300 tokens, padded) test that sweep on CPU.
  import jaxactv._linear_blocks as blocks

  assert blocks.kept_chunks(300, 1000, 16) == (128, 1000, True)  # one slice, as before
  monkeypatch.setattr(blocks, "kept_sweep_width", lambda: 96)
  monkeypatch.setattr(blocks, "sweeps_whole", lambda *shape: False)
  assert blocks.kept_chunks(300, 1000, 16) == (128, 96, True)
  x, w, b, y = _problem(n=300, d=16, v=1000)
  y[::7] = 5  # some tokens on ignore_index=5 where it is set
  rng = np.random.default_rng(1)
  options = dict(options)
  if options.get("class_weights") == "random":
    options["class_weights"] = rng.uniform(0.5, 2.0, 1000).astype(np.float32)
  if options.get("where") == "random":
    options["where"] = rng.random(300) < 0.8
  _assert_close_to_reference(options, None, x, w, b, y)


@pytest.mark.parametrize("half", ["x", "w"])
def test_one_half_precision_input_keeps_float32_matmuls(half):
  # bfloat16 x with float32 w (or the reverse): w's float32 copy would exceed the
  # slice budget in one matmul, which then ran in bfloat16 (loss off by 3e-4). The
  # value-and-grad must keep the fixed slices, converted to float32 one at a time.
  rng = np.random.default_rng(3)
  n, d, v = 64, 1024, 20000
  x = rng.standard_normal((n, d)).astype(np.float32)
  w = (0.03 * rng.standard_normal((d, v))).astype(np.float32)
  y = rng.integers(0, v, n).astype(np.int32)
  x, w = (jnp.asarray(a, jnp.bfloat16) if name == half else jnp.asarray(a)
          for name, a in (("x", x), ("w", w)))
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  m = z.max(-1)
  want = np.mean(m + np.log(np.exp(z - m[:, None]).sum(-1)) - z[np.arange(n), y])
  loss = lambda x, w: jaxactv.linear_softmax_cross_entropy(x, w, y)
  value, _ = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
  np.testing.assert_allclose(value, want, rtol=2e-6)


def test_default_value_and_grad_holds_an_eighth_of_the_unfused_memory():
  # The benchmark's float32 shape, compiled only: the kept 256 x 32768 block and the
  # slices of the sweep stay under 1/8 of what x @ w + optax holds (its logits and
  # their cotangent); three matmuls per chunk, as the unfused version.
  n, d, v = 2048, 256, 32768
  fused = _value_and_grad_temp_bytes(jaxactv.linear_softmax_cross_entropy, n, d, v)
  unfused = _value_and_grad_temp_bytes(_unfused_loss, n, d, v)
  assert unfused >= 2 * n * v * 4
  # jax 0.10's XLA:CPU sums exp(z - max) inside its reduction kernel; the oldest jax we
  # support (0.8.3) writes that block out first, one more kept-block-sized buffer
  # (66.5 MiB, 0.13x): 1/8 is the target from jax 0.10 on, 1/7 before it.
  limit = 8 if jax.__version_info__ >= (0, 10) else 7
  assert fused * limit <= unfused, (fused, unfused)
  x, w, _, y = _problem(n=64, d=8, v=1000)
  loss = lambda x, w: jaxactv.linear_softmax_cross_entropy(x, w, y)
  assert _count_matmuls(jax.value_and_grad(loss, (0, 1)), x, w) == 3


def test_slicing_the_vocabulary_copies_nothing_the_size_of_w():
  # With slices, the forward's temp memory is blocks and per-row numbers: doubling V
  # (and so w) must not double it, as a hoisted copy of the slices of w would.
  d = 256

  def forward_temp(v):
    args = (
        jax.ShapeDtypeStruct((512, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((512,), jnp.int32),
    )
    f = lambda x, w, y: jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=(64, 1024))
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

  small, large = forward_temp(8192), forward_temp(32768)
  assert large - small < d * (32768 - 8192) * 4 / 4, (small, large)


def test_gradient_dtypes_follow_each_input():
  x = jnp.ones((4, 3), jnp.bfloat16)
  w = jnp.ones((3, 5), jnp.bfloat16)
  b = jnp.zeros((5,), jnp.float32)
  y = jnp.array([0, 1, 2, 3])
  for reduction in ("mean", "none"):
    grads = jax.grad(
        lambda x, w, b, r=reduction: jaxactv.linear_softmax_cross_entropy(
            x, w, y, bias=b, reduction=r
        ).sum(),
        (0, 1, 2),
    )(x, w, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_hidden_state_on_an_ignored_token_adds_nothing(reduction):
  x, w, b, y = _problem(n=10, v=50)
  x, y = x.copy(), y.copy()
  x[3] = np.nan
  y[3] = -100
  f = lambda m: lambda x, w, b: m.linear_softmax_cross_entropy(
      x, w, y, bias=b, ignore_index=-100, reduction=reduction
  ).sum()
  got = jax.jit(jax.grad(f(jaxactv), (0, 1, 2)))(x, w, b)
  clean = np.where(np.isnan(x), 0.0, x).astype(np.float32)
  want = jax.jit(jax.grad(f(reference), (0, 1, 2)))(clean, w, b)
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
