"""Vocabulary-parallel linear cross-entropy on 8 host devices against one device.

    python benchmarks/vocab_parallel.py [--quick]

``linear_softmax_cross_entropy(..., vocab_axis="vocab")`` inside ``jax.shard_map``
on an 8-way 'vocab' mesh of host CPU devices, value and gradient w.r.t. (x, w),
against the same op unsharded on one device. It reports the time per step
(interleaved medians) and XLA's temp memory per device
(``compiled.memory_analysis()``, which describes one device's program). The memory
should fall roughly with the number of vocabulary shards; the time on host
devices says little about accelerators (all 8 "devices" share this machine's
cores), so read it as a check that the collectives cost nothing pathological.
It asserts nothing.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxactv

sys.path.insert(0, os.path.dirname(__file__))
from linear_targets import interleaved_medians, problem

SHARDS = 8


def step_fns(mesh, chunk_size):
  def local(x, w, y):
    return jaxactv.linear_softmax_cross_entropy(x, w, y, vocab_axis="vocab",
                                                chunk_size=chunk_size)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "vocab"), P()),
                          out_specs=P())
  single = lambda x, w, y: jaxactv.linear_softmax_cross_entropy(x, w, y, chunk_size=chunk_size)
  grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))
  return grad(sharded), grad(single)


def temp_mib(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(quick: bool):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:SHARDS]), ("vocab",))
  shapes = [(512, 128, 8192)] if quick else [(1024, 256, 32768), (1024, 128, 131072)]
  print("| N | D | V | chunk rows | time 8 shards (ms) | time 1 device (ms) | ratio "
        "| temp/device 8 shards (MiB) | temp 1 device (MiB) | memory ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for n, d, v in shapes:
    # The default chunk rule gives each program blocks of up to the same budget, so
    # the memory falls less than 8x; with the rows fixed, a block is rows x V / 8.
    for chunk_size in (None, 256):
      print(row(mesh, n, d, v, chunk_size, rounds=3 if quick else 7))


def row(mesh, n, d, v, chunk_size, rounds):
  x, w, y = problem(n, d, v)
  sharded, single = step_fns(mesh, chunk_size)
  xs = jax.device_put(x, NamedSharding(mesh, P()))
  ws = jax.device_put(w, NamedSharding(mesh, P(None, "vocab")))
  ys = jax.device_put(y, NamedSharding(mesh, P()))
  m_sharded, m_single = temp_mib(sharded, xs, ws, ys), temp_mib(single, x, w, y)
  t_sharded, t_single = interleaved_medians(
      lambda: sharded(xs, ws, ys), lambda: single(x, w, y), (), rounds=rounds)
  return (f"| {n} | {d} | {v} | {chunk_size or 'default'} | {t_sharded:.1f} | {t_single:.1f}"
          f" | {t_sharded / t_single:.2f}x | {m_sharded:.1f} | {m_single:.1f}"
          f" | 1/{m_single / m_sharded:.1f} |")

if __name__ == "__main__":
  main("--quick" in sys.argv)
