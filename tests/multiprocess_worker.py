"""One process of the two-process test (tests/test_multiprocess.py); not collected.

Run as ``python multiprocess_worker.py PORT PROCESS_ID``. Each process owns 4 host
CPU devices; ``jax.distributed.initialize`` over loopback joins them into one set of
8, with gloo for the CPU collectives. The vocab-parallel losses then run on

* an 8-way ``vocab`` mesh, whose vocabulary spans both processes, and
* a ``(data, vocab) = (2, 4)`` mesh, whose ``data`` axis spans them,

and each process checks the global loss and gradients against a single-process,
unsharded reference computed on its own first device.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxactv  # noqa: E402
from jaxactv import reference  # noqa: E402

N, D, V = 16, 8, 8 * 24


def global_array(a, mesh, spec):
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def to_host(a):
  return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def check(name, got, want):
  want = np.asarray(want)
  atol = 1e-5 * max(np.abs(want).max(), 1e-30)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)
  print(f"process {jax.process_index()}: {name} ok", flush=True)


def run(mesh, tokens):
  rng = np.random.default_rng(0)  # the same problem in both processes
  x = rng.normal(size=(N, D)).astype(np.float32)
  w = (0.5 * rng.normal(size=(D, V))).astype(np.float32)
  y = rng.integers(0, V, N).astype(np.int32)
  logits = rng.normal(scale=3.0, size=(N, V)).astype(np.float32)
  mesh_name = "x".join(mesh.axis_names)

  def linear(x, w, y):
    loss = jaxactv.linear_softmax_cross_entropy(x, w, y, vocab_axis="vocab", reduction="sum")
    return loss if tokens is None else jax.lax.psum(loss, tokens)

  def integer(logits, y):
    loss = jaxactv.softmax_cross_entropy_with_integer_labels(
        logits, y, vocab_axis="vocab", reduction="sum", label_smoothing=0.1)
    return loss if tokens is None else jax.lax.psum(loss, tokens)

  specs = (P(tokens), P(None, "vocab"), P(tokens))
  f = jax.shard_map(linear, mesh=mesh, in_specs=specs, out_specs=P())
  args = [global_array(a, mesh, s) for a, s in zip((x, w, y), specs, strict=True)]
  value, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(*args)
  want, (rx, rw) = jax.value_and_grad(
      lambda x, w: reference.linear_softmax_cross_entropy(x, w, y, reduction="sum"), (0, 1)
  )(x, w)
  check(f"linear value on {mesh_name}", to_host(value), want)
  check(f"linear dx on {mesh_name}", to_host(dx), rx)
  check(f"linear dw on {mesh_name}", to_host(dw), rw)

  specs = (P(tokens, "vocab"), P(tokens))
  f = jax.shard_map(integer, mesh=mesh, in_specs=specs, out_specs=P())
  args = [global_array(a, mesh, s) for a, s in zip((logits, y), specs, strict=True)]
  value, grad = jax.jit(jax.value_and_grad(f))(*args)
  want, rgrad = jax.value_and_grad(
      lambda z: reference.softmax_cross_entropy_with_integer_labels(
          z, y, reduction="sum", label_smoothing=0.1))(logits)
  check(f"integer CE value on {mesh_name}", to_host(value), want)
  check(f"integer CE grad on {mesh_name}", to_host(grad), rgrad)


def main():
  port, process_id = sys.argv[1], int(sys.argv[2])
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
      initialization_timeout=60)
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  with jax.default_device(jax.local_devices()[0]):
    run(jax.make_mesh((8,), ("vocab",)), None)
    mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    # The data axis spans the two processes: each one holds one row of the mesh.
    rows = {d.process_index for d in mesh.devices[process_id]}
    assert rows == {process_id}, mesh.devices
    run(mesh, "data")
  jnp.zeros(()).block_until_ready()
  jax.distributed.shutdown()
  print(f"process {process_id}: done", flush=True)


if __name__ == "__main__":
  main()
