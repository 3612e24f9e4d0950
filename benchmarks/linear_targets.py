"""The fused linear ops' targets, measured side by side in one run.

    python benchmarks/linear_targets.py [--rounds R]

1. Memory: value_and_grad w.r.t. (x, w) at N=8192, D=512, V=32768, float32: XLA's
   temp bytes (compiled.memory_analysis()) against the unfused x @ w + optax.
2. Time on this machine at N=2048, D=256, V=32768, float32: interleaved medians.
3. Accuracy: the loss and gradients against the unfused float32 computation, and
   bfloat16 inputs against float32 on the same bfloat16 values.
4. linear_softmax_cross_entropy fwd+bwd against the unfused version at every
   vocabulary of the benchmark sweep up to 131072 (issue 11: <= 1.10x, <= 1/8 memory).
5. The new options (where, weights, temperature, return_aux) against the plain call
   (issue 12: <= 1.05x).
6. linear_log_probs with entropy, fwd+bwd, against the unfused log_softmax + gather +
   entropy at N=2048, D=256, V=32768 (issue 12: <= 1.25x time, <= 1/8 memory).

The LLM-shape memory tables are in benchmarks/linear_memory.py.

It prints ratios; it asserts nothing (the tests check correctness, not speed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxactv


def fused(x, w, y):
  return jaxactv.linear_softmax_cross_entropy(x, w, y)


def unfused(x, w, y):
  logits = jnp.einsum("nd,dv->nv", x, w, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def temp_bytes(f, *shapes):
  grad = jax.jit(jax.value_and_grad(f, (0, 1)))
  return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def interleaved_medians(fa, fb, args, rounds=7):
  """Median ms of each, alternating the two closely (the machine may be shared)."""
  jax.block_until_ready(fa(*args))
  jax.block_until_ready(fb(*args))
  times = ([], [])
  for r in range(rounds):
    order = (0, 1) if r % 2 == 0 else (1, 0)
    for k in order:
      f = (fa, fb)[k]
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[k].append(time.perf_counter() - t)
  return [1e3 * float(np.median(t)) for t in times]


def problem(n, d, v, dtype=jnp.float32, seed=0):
  kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, d), dtype)
  w = (jax.random.normal(kw, (d, v)) / np.sqrt(d)).astype(dtype)
  y = jax.random.randint(ky, (n,), 0, v)
  return x, w, y


def options_fused(x, w, y, mask, weights):
  loss, aux = jaxactv.linear_softmax_cross_entropy(
      x, w, y, where=mask, weights=weights, temperature=0.7, return_aux=True
  )
  return loss + 0.0 * aux.z_loss


def log_probs_fused(x, w, y):
  lp, ent = jaxactv.linear_log_probs(x, w, y, temperature=0.7, return_entropy=True)
  return jnp.sum(lp) + 1e-2 * jnp.sum(ent)


def log_probs_unfused(x, w, y):
  logits = jnp.einsum("nd,dv->nv", x, w, preferred_element_type=jnp.float32) / 0.7
  logp = jax.nn.log_softmax(logits)
  lp = jnp.take_along_axis(logp, y[:, None], -1)[:, 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  return jnp.sum(lp) + 1e-2 * jnp.sum(ent)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=7)
  rounds = parser.parse_args().rounds
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
  n, d, v = 8192, 512, 32768
  shapes = (
      jax.ShapeDtypeStruct((n, d), jnp.float32),
      jax.ShapeDtypeStruct((d, v), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.int32),
  )
  ours, theirs = temp_bytes(fused, *shapes), temp_bytes(unfused, *shapes)
  print(
      f"memory  N={n} D={d} V={v} f32 value_and_grad temp: fused {ours / 2**20:.1f} MiB, "
      f"unfused {theirs / 2**20:.1f} MiB, ratio {ours / theirs:.3f} (target <= 0.125)"
  )

  n, d, v = 2048, 256, 32768
  x, w, y = problem(n, d, v)
  vg = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))
  a, b = interleaved_medians(vg(fused), vg(unfused), (x, w, y), rounds)
  print(
      f"time    N={n} D={d} V={v} f32 value_and_grad: fused {a:.0f} ms, unfused {b:.0f} ms, "
      f"ratio {a / b:.2f} (target <= 1.15)"
  )

  (lf, (dxf, dwf)), (lu, (dxu, dwu)) = vg(fused)(x, w, y), vg(unfused)(x, w, y)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  print(
      f"accuracy f32: loss rel {abs(float(lf - lu)) / abs(float(lu)):.1e} (target 1e-5), "
      f"dx {rel(dxf, dxu):.1e}, dw {rel(dwf, dwu):.1e} (target 1e-4)"
  )
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  lb = jax.jit(fused)(xb, wb, y)
  l32 = jax.jit(unfused)(xb.astype(jnp.float32), wb.astype(jnp.float32), y)
  print(
      f"accuracy bf16 inputs: loss rel to float32 on the same values "
      f"{abs(float(lb - l32)) / abs(float(l32)):.1e} (target 1e-4)"
  )

  for n, d, v in ((2048, 256, 32768), (1024, 256, 131072)):
    x, w, y = problem(n, d, v)
    a, b = interleaved_medians(vg(fused), vg(unfused), (x, w, y), rounds)
    shapes = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (x, w, y)]
    mem = temp_bytes(fused, *shapes) / temp_bytes(unfused, *shapes)
    print(
        f"sweep   N={n} D={d} V={v} f32 value_and_grad: fused {a:.0f} ms, unfused {b:.0f} ms, "
        f"ratio {a / b:.2f} (target <= 1.10), memory ratio {mem:.3f} (target <= 0.125)"
    )

  n, d, v = 2048, 256, 32768
  x, w, y = problem(n, d, v)
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random(n) > 0.1)
  weights = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
  plain = jax.jit(jax.value_and_grad(fused, (0, 1)))
  with_options = jax.jit(jax.value_and_grad(options_fused, (0, 1)))
  a, b = interleaved_medians(
      lambda *a: with_options(*a, mask, weights), plain, (x, w, y), rounds
  )
  print(
      f"options N={n} D={d} V={v} f32 value_and_grad, where+weights+temperature+aux: "
      f"{a:.0f} ms, plain {b:.0f} ms, ratio {a / b:.2f} (target <= 1.05)"
  )

  a, b = interleaved_medians(vg(log_probs_fused), vg(log_probs_unfused), (x, w, y), rounds)
  shapes = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (x, w, y)]
  mem = temp_bytes(log_probs_fused, *shapes) / temp_bytes(log_probs_unfused, *shapes)
  print(
      f"logprob N={n} D={d} V={v} f32 value_and_grad, with entropy: fused {a:.0f} ms, "
      f"unfused {b:.0f} ms, ratio {a / b:.2f} (target <= 1.25), memory ratio {mem:.3f} "
      "(target <= 0.125)"
  )


if __name__ == "__main__":
  main()
