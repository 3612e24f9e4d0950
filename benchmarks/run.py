"""Benchmark jaxactv against jax.nn, optax and the unfused linear + loss.

Usage (from the repository root, inside the project's environment)::

  python benchmarks/run.py                 # the full sweep (5-8 min on 2 CPU cores)
  python benchmarks/run.py --quick         # a smaller sweep (under 2 min on 2 CPU cores)
  python benchmarks/run.py --quick --tiny  # the quick sweep on tiny shapes (the test runs this)
  python benchmarks/run.py --ops softmax,sigmoid --dtypes float32 --out /tmp/bench

For every case (op, mode, shape, dtype) each implementation is compiled once
(``jax.jit(f).lower(*args).compile()``, timed), its ``memory_analysis()`` is read,
it is warmed up, and then all implementations of the case are called in
interleaved rounds (alternating the order each round) with ``block_until_ready``,
so background load hits them alike. A plain copy of the same number of bytes is
timed in the same rounds: it is the bandwidth roofline of the machine.

Writes ``results.csv``, ``results.md`` and ``results.png`` into ``--out``
(default ``benchmarks/results/``). See ``benchmarks/README.md`` for the columns.
No number here is asserted by a test.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
# Benchmark the jaxactv next to this script, not whichever one the environment has
# installed (several checkouts may share one virtual environment).
sys.path.insert(0, str(HERE.parent))
import jaxactv  # noqa: E402

DEFAULT_OUT = HERE / "results"

ACTIVATION_OPS = ("softmax", "log_softmax", "sigmoid")
LOSS_OPS = (
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
)
DIVERGENCE_OPS = ("kl_divergence_from_logits", "entropy_from_logits")
LINEAR_OP = "linear_softmax_cross_entropy"
ALL_OPS = (*ACTIVATION_OPS, *LOSS_OPS, *DIVERGENCE_OPS, LINEAR_OP)
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OURS = "jaxactv"
COPY = "copy"
NAIVE = "naive"

COLUMNS = (
    "op", "impl", "mode", "shape", "dtype", "classes", "backend", "device", "allocator",
    "median_ms", "p20_ms", "p80_ms", "compile_ms", "temp_bytes", "peak_bytes",
    "ratio", "ratio_p20", "ratio_p80", "bytes_moved", "gbps", "copy_gbps",
    "roofline_fraction", "rel_err", "reps",
    "error", "jax_version", "jaxactv_version", "timestamp",
)  # fmt: skip


# ------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Sweep:
  """Which shapes to run and how long to time each case."""

  name: str
  classes: tuple[int, ...]  # class counts of the row-wise ops
  elements: int  # rows * classes of the row-wise ops (rows = elements // classes)
  linear: tuple[tuple[int, int, int], ...]  # (tokens N, hidden D, classes V)
  naive_max_classes: int  # the naive softmax only up to here
  budget_s: float  # time spent in the timed rounds of one case (all impls together)
  min_reps: int
  max_reps: int

  def rows(self, classes: int) -> int:
    return max(8, self.elements // classes)


SWEEPS = {
    "full": Sweep(
        "full", (1024, 8192, 32768, 131072), 2**22,
        ((2048, 256, 32768), (1024, 256, 131072)), 32768, 4.0, 15, 400,
    ),
    "quick": Sweep(
        "quick", (1024, 32768), 2**19, ((512, 128, 16384), (256, 128, 65536)), 32768, 1.0, 9, 200,
    ),
    "tiny": Sweep("tiny", (256,), 8 * 256, ((16, 32, 256),), 256, 0.0, 2, 2),
}  # fmt: skip


# -------------------------------------------------------------- float64 references
# Computed with NumPy in float64 from the very inputs the benchmark uses (bfloat16
# inputs rounded first), to report each implementation's relative error.


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_lse(x):
  m = x.max(-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ref_activation(op, mode, x, g):
  if op == "softmax":
    y = _np_softmax(x)
    return y if mode == "fwd" else y * (g - (g * y).sum(-1, keepdims=True))
  if op == "log_softmax":
    return x - _np_lse(x) if mode == "fwd" else g - _np_softmax(x) * g.sum(-1, keepdims=True)
  s = _np_sigmoid(x)
  return s if mode == "fwd" else g * s * (1.0 - s)


def _ref_loss(op, mode, z, labels):
  """The mean loss (fwd) or its gradient with respect to the logits (fwd+bwd)."""
  rows = z.shape[0]
  if op == "sigmoid_binary_cross_entropy":
    if mode == "fwd":
      return np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z))))
    return (_np_sigmoid(z) - labels) / z.size
  if labels.ndim == 1:  # integer labels, without a dense one-hot
    at = (np.arange(rows), labels)
    if mode == "fwd":
      return np.mean(_np_lse(z)[:, 0] - z[at])
    dz = _np_softmax(z)
    dz[at] -= 1.0
    return dz / rows
  if mode == "fwd":
    return np.mean(np.sum(labels * (_np_lse(z) - z), -1))
  return (_np_softmax(z) * labels.sum(-1, keepdims=True) - labels) / rows


def _ref_divergence(op, mode, x, t=None):
  """The mean KL(softmax(t) || softmax(x)) or entropy of softmax(x), or its d/dx."""
  p = _np_softmax(x)
  log_p = x - _np_lse(x)
  if op == "entropy_from_logits":
    h = -np.sum(p * log_p, -1, keepdims=True)
    return np.mean(h) if mode == "fwd" else -p * (log_p + h) / x.shape[0]
  q = _np_softmax(t)
  if mode == "fwd":
    return np.mean(np.sum(q * (t - _np_lse(t) - log_p), -1))
  return (p - q) / x.shape[0]


def _ref_linear(mode, x, w, labels):
  z = x @ w
  if mode == "fwd":
    return _ref_loss("softmax_cross_entropy_with_integer_labels", mode, z, labels)
  dz = _ref_loss("softmax_cross_entropy_with_integer_labels", mode, z, labels)
  return dz @ w.T  # dx


def rel_err(out, ref) -> float:
  """``max |out - ref| / max |ref|`` (NaN if ``out`` holds a NaN)."""
  out = np.asarray(out).astype(np.float64)
  ref = np.asarray(ref, np.float64)
  err = float(np.max(np.abs(out - ref)))
  scale = float(np.max(np.abs(ref)))
  return err / scale if scale > 0 else err


def _f64(a) -> np.ndarray:
  return np.asarray(a).astype(np.float64)


# ------------------------------------------------------------------------ the cases


@dataclass
class Impl:
  name: str
  fn: Callable
  args: tuple
  donate: tuple[int, ...] = ()  # the last arg is donated and replaced by the output


@dataclass
class Case:
  op: str
  mode: str
  shape: tuple[int, ...]
  dtype: str
  peer: str  # the impl the ratios are taken against
  impls: list[Impl]
  bytes_moved: int  # inputs read once + outputs written once
  reference: Callable[[], np.ndarray]  # float64 value of the checked output
  pick: Callable  # impl output -> the checked output (fwd: the value; fwd+bwd: d/dinput)
  meta: dict = field(default_factory=dict)


def naive_softmax(x):
  """The textbook formula: overflows to inf/NaN once a logit exceeds ~88 (float32)."""
  return jnp.exp(x) / jnp.sum(jnp.exp(x), -1, keepdims=True)


def _vjp_fn(op):
  """Forward + backward of an activation: the primal and the input cotangent."""

  def f(x, g):
    y, pullback = jax.vjp(op, x)
    return y, pullback(g)[0]

  return f


def _value_and_grad(loss, argnums=0):
  def f(*args):
    return jax.value_and_grad(loss, argnums=argnums)(*args)

  return f


_ACTIVATION_IMPLS = {
    "softmax": (jaxactv.softmax, "jax.nn", jax.nn.softmax),
    "log_softmax": (jaxactv.log_softmax, "jax.nn", jax.nn.log_softmax),
    "sigmoid": (jaxactv.sigmoid, "jax.nn", jax.nn.sigmoid),
}
_LOSS_IMPLS = {
    "softmax_cross_entropy_with_integer_labels": (
        lambda z, y: jaxactv.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean"),
        lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean(),
    ),
    "softmax_cross_entropy": (
        lambda z, y: jaxactv.softmax_cross_entropy(z, y, reduction="mean"),
        lambda z, y: optax.softmax_cross_entropy(z, y).mean(),
    ),
    "sigmoid_binary_cross_entropy": (
        lambda z, y: jaxactv.sigmoid_binary_cross_entropy(z, y, reduction="mean"),
        lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean(),
    ),
}


def _entropy_peer(x):
  """The textbook entropy with jax.nn (optax has none from logits)."""
  return -jnp.sum(jax.nn.softmax(x) * jax.nn.log_softmax(x), -1).mean()


_DIVERGENCE_IMPLS = {
    # The distillation direction KL(teacher || student); the gradient is the student's.
    "kl_divergence_from_logits": (
        lambda x, t: jaxactv.kl_divergence_from_logits(x, t, reduction="mean"),
        "optax",
        lambda x, t: optax.kl_divergence(jax.nn.log_softmax(x), jax.nn.softmax(t)).mean(),
    ),
    "entropy_from_logits": (
        lambda x: jaxactv.entropy_from_logits(x, reduction="mean"), "jax.nn", _entropy_peer,
    ),
}


def _linear_ours(x, w, labels):
  return jaxactv.linear_softmax_cross_entropy(x, w, labels)


def _linear_unfused(x, w, labels):
  return optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()


def _copy(src, dst):
  """``-src``, written into the donated buffer ``dst``: reads and writes every byte once.

  A multiply, not ``jnp.copy``, so XLA cannot elide it. Writing into a donated
  buffer keeps the allocator out of the measurement: a fresh output of tens of MiB
  is mapped anew on every call on Linux and its page faults would be timed too.
  """
  del dst
  return src * -1.0


def make_case(op, mode, shape, dtype_name, sweep, seed) -> Case:
  rng = np.random.default_rng(seed)
  dtype = DTYPES[dtype_name]
  isz = jnp.dtype(dtype).itemsize

  def arr(a):
    return jnp.asarray(a.astype(np.float32), dtype)

  if op in _ACTIVATION_IMPLS:
    ours, peer_name, peer = _ACTIVATION_IMPLS[op]
    x = arr(2.0 * rng.standard_normal(shape))
    n = x.size
    fns = [(OURS, ours), (peer_name, peer)]
    if op == "softmax" and shape[-1] <= sweep.naive_max_classes:
      fns.append((NAIVE, naive_softmax))
    if mode == "fwd":
      impls = [Impl(name, f, (x,)) for name, f in fns]
      bytes_moved = 2 * n * isz  # x read, y written
      pick = lambda out: out
      g = None
    else:
      g = arr(rng.standard_normal(shape))
      impls = [Impl(name, _vjp_fn(f), (x, g)) for name, f in fns]
      bytes_moved = 4 * n * isz  # x, g read; y, dx written
      pick = lambda out: out[1]
    reference = lambda: _ref_activation(op, mode, _f64(x), None if g is None else _f64(g))
    case = Case(op, mode, shape, dtype_name, peer_name, impls, bytes_moved, reference, pick)

  elif op in _LOSS_IMPLS:
    ours, peer = _LOSS_IMPLS[op]
    rows, classes = shape
    z = arr(2.0 * rng.standard_normal(shape))
    if op == "softmax_cross_entropy_with_integer_labels":
      labels = jnp.asarray(rng.integers(0, classes, rows), jnp.int32)
    elif op == "softmax_cross_entropy":
      labels = arr(_np_softmax(rng.standard_normal(shape)))
    else:
      labels = arr(rng.random(shape) < 0.5)
    label_bytes = labels.size * labels.dtype.itemsize
    if mode == "fwd":
      fns = [(OURS, ours), ("optax", peer)]
      bytes_moved = z.size * isz + label_bytes + 4  # logits, labels read; loss written
      pick = lambda out: out
    else:
      fns = [(OURS, _value_and_grad(ours)), ("optax", _value_and_grad(peer))]
      bytes_moved = 2 * z.size * isz + label_bytes + 4  # + dlogits written
      pick = lambda out: out[1]
    impls = [Impl(name, f, (z, labels)) for name, f in fns]
    reference = lambda: _ref_loss(op, mode, _f64(z), _f64(labels) if labels.ndim == 2
                                  else np.asarray(labels))
    case = Case(op, mode, shape, dtype_name, "optax", impls, bytes_moved, reference, pick)

  elif op in _DIVERGENCE_IMPLS:
    ours, peer_name, peer = _DIVERGENCE_IMPLS[op]
    x32 = 2.0 * rng.standard_normal(shape)
    args = (arr(x32),)
    if op == "kl_divergence_from_logits":  # a teacher close to the student, as in distillation
      args += (arr(x32 + rng.standard_normal(shape)),)
    fns = [(OURS, ours), (peer_name, peer)]
    in_bytes = sum(a.size for a in args) * isz
    if mode == "fwd":
      bytes_moved = in_bytes + 4  # inputs read; the mean written
      pick = lambda out: out
    else:
      fns = [(name, _value_and_grad(f)) for name, f in fns]
      bytes_moved = in_bytes + args[0].size * isz + 4  # + d/dlogits written
      pick = lambda out: out[1]
    impls = [Impl(name, f, args) for name, f in fns]
    reference = lambda: _ref_divergence(op, mode, *(_f64(a) for a in args))
    case = Case(op, mode, shape, dtype_name, peer_name, impls, bytes_moved, reference, pick)

  elif op == LINEAR_OP:
    tokens, hidden, classes = shape
    x = arr(rng.standard_normal((tokens, hidden)))
    w = arr(rng.standard_normal((hidden, classes)) / math.sqrt(hidden))
    labels = jnp.asarray(rng.integers(0, classes, tokens), jnp.int32)
    read = (x.size + w.size) * isz + labels.size * 4
    peer_name = "x@w+optax"
    if mode == "fwd":
      fns = [(OURS, _linear_ours), (peer_name, _linear_unfused)]
      bytes_moved = read + 4
      pick = lambda out: out
    else:
      fns = [(OURS, _value_and_grad(_linear_ours, (0, 1))),
             (peer_name, _value_and_grad(_linear_unfused, (0, 1)))]
      bytes_moved = 2 * read - labels.size * 4 + 4  # + dx, dw written
      pick = lambda out: out[1][0]
    impls = [Impl(name, f, (x, w, labels)) for name, f in fns]
    reference = lambda: _ref_linear(mode, _f64(x), _f64(w), np.asarray(labels))
    case = Case(op, mode, shape, dtype_name, peer_name, impls, bytes_moved, reference, pick)
  else:
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(ALL_OPS)}")

  # The roofline: a float32 array whose read + write is the case's bytes_moved.
  copy_src = jnp.asarray(rng.standard_normal(max(1, case.bytes_moved // 8)), jnp.float32)
  case.impls.append(Impl(COPY, _copy, (copy_src, jnp.zeros_like(copy_src)), donate=(1,)))
  case.meta["copy_bytes"] = 8 * copy_src.size
  return case


def case_specs(sweep: Sweep, ops, dtypes):
  specs = []
  for op in ops:
    for dtype in dtypes:
      for mode in MODES:
        if op == LINEAR_OP:
          shapes = sweep.linear
        else:
          shapes = [(sweep.rows(c), c) for c in sweep.classes]
        specs += [(op, mode, tuple(shape), dtype) for shape in shapes]
  return specs


# ---------------------------------------------------------------------- measurement


def _err_text(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}".splitlines()[0]
  return text[:200]


def _blocked(compiled, impl: Impl) -> float:
  t = time.perf_counter()
  out = jax.block_until_ready(compiled(*impl.args))
  dt = time.perf_counter() - t
  if impl.donate:  # the donated buffer is gone: the output takes its place
    impl.args = (*impl.args[:-1], out)
  return dt


def measure(case: Case, sweep: Sweep, machine: dict) -> list[dict]:
  """Compile, warm up and time every impl of ``case`` in interleaved rounds."""
  rows: dict[str, dict] = {}
  compiled = {}
  for impl in case.impls:
    row = {
        "op": case.op, "impl": impl.name, "mode": case.mode,
        "shape": "x".join(map(str, case.shape)), "dtype": case.dtype,
        "classes": case.shape[-1], **machine,
        "bytes_moved": case.meta["copy_bytes"] if impl.name == COPY else case.bytes_moved,
        "error": "",
    }  # fmt: skip
    rows[impl.name] = row
    try:
      t = time.perf_counter()
      # keep_unused: the copy never reads its donated buffer, which jit would drop.
      jitted = jax.jit(impl.fn, donate_argnums=impl.donate, keep_unused=bool(impl.donate))
      compiled[impl.name] = jitted.lower(*impl.args).compile()
      row["compile_ms"] = 1e3 * (time.perf_counter() - t)
      mem = compiled[impl.name].memory_analysis()
      if mem is not None:
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        row["peak_bytes"] = int(
            mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        )  # fmt: skip
    except Exception as e:  # record and carry on
      row["error"] = _err_text(e)
      compiled.pop(impl.name, None)

  impls = {impl.name: impl for impl in case.impls}
  live = list(compiled)

  def call_all(names, times):
    for name in names:
      if name not in live:
        continue
      try:
        dt = _blocked(compiled[name], impls[name])
      except Exception as e:  # e.g. out of memory: record and carry on
        rows[name]["error"] = _err_text(e)
        live.remove(name)
        continue
      if times is not None:
        times[name].append(dt)

  # Warm-up: one call each, a second if the calls are fast.
  warm = {name: [] for name in live}
  call_all(list(live), warm)
  round_s = sum(t[0] for t in warm.values() if t)
  if round_s < 0.5:
    warm = {name: [] for name in live}
    call_all(list(live), warm)
    round_s = sum(t[0] for t in warm.values() if t)
  min_reps = sweep.min_reps if round_s < 1.0 else min(sweep.min_reps, 5)
  reps = int(min(sweep.max_reps, max(min_reps, sweep.budget_s / max(round_s, 1e-9))))

  # Timed rounds. jaxactv and its peer sit next to each other in every round (first
  # and second, then second-to-last and last: the order flips each round), so a burst
  # of background load hits both; the per-round ratio jaxactv / peer cancels it.
  times = {name: [] for name in live}
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for r in range(reps):
      order = live if r % 2 == 0 else live[::-1]
      call_all(list(order), times)
  finally:
    if gc_was_enabled:
      gc.enable()

  for name, ts in times.items():
    if not ts or name not in live:
      continue
    row = rows[name]
    p20, p50, p80 = (1e3 * float(v) for v in np.percentile(ts, [20, 50, 80]))
    row.update(median_ms=p50, p20_ms=p20, p80_ms=p80, reps=len(ts))
    row["gbps"] = row["bytes_moved"] / (p50 * 1e-3) / 1e9

  peer = case.peer
  for name, ts in times.items():
    n = min(len(ts), len(times.get(peer, ())))
    if name == COPY or name not in live or peer not in live or n == 0:
      continue
    per_round = np.asarray(ts[:n]) / np.asarray(times[peer][:n])
    q20, q50, q80 = (float(v) for v in np.percentile(per_round, [20, 50, 80]))
    rows[name].update(ratio=q50, ratio_p20=q20, ratio_p80=q80)

  copy_gbps = rows[COPY].get("gbps")
  for row in rows.values():
    if copy_gbps and row.get("gbps"):
      row["copy_gbps"] = copy_gbps
      row["roofline_fraction"] = row["gbps"] / copy_gbps

  # Accuracy against float64, from one more call of each impl.
  try:
    ref = case.reference()
  except Exception as e:
    ref = None
    print(f"    (no float64 reference: {_err_text(e)})", flush=True)
  if ref is not None:
    for name in live:
      if name == COPY:
        continue
      try:
        rows[name]["rel_err"] = rel_err(case.pick(compiled[name](*impls[name].args)), ref)
      except Exception as e:
        rows[name]["error"] = rows[name]["error"] or _err_text(e)
  return list(rows.values())


# ------------------------------------------------------------------------ reporting


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "cpu"


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def machine_info() -> dict:
  backend = jax.default_backend()
  dev = jax.devices()[0]
  if backend == "cpu":
    device = f"{_cpu_name()} ({_cpu_count()} cores)"
  else:
    device = f"{dev.device_kind} (x{jax.device_count()})"
  return {
      "backend": backend,
      "device": device,
      "allocator": allocator_note(),
      "jax_version": jax.__version__,
      "jaxactv_version": jaxactv.__version__,
      "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
  }


def write_csv(rows: list[dict], path: Path) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      out = {}
      for k in COLUMNS:
        v = row.get(k, "")
        if isinstance(v, float):
          v = f"{v:.6g}"
        out[k] = v
      writer.writerow(out)


def _ms(v) -> str:
  if v is None or v == "":
    return "—"
  v = float(v)
  if v >= 100:
    return f"{v:.0f}"
  if v >= 10:
    return f"{v:.1f}"
  if v >= 0.1:
    return f"{v:.2f}"
  return f"{v:.3f}"


def _bytes(v) -> str:
  if v is None or v == "":
    return "—"
  v = float(v)
  for unit in ("B", "KiB", "MiB", "GiB"):
    if v < 1024 or unit == "GiB":
      return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
    v /= 1024
  raise AssertionError


def _ratio(a, b) -> float | None:
  if a in (None, "") or b in (None, "") or float(b) == 0:
    return None
  return float(a) / float(b)


def _mem_ratio(a, b) -> float | None:
  """``a / b`` of two byte counts: 1 when both are 0, inf when only ``b`` is."""
  if a in (None, "") or b in (None, ""):
    return None
  a, b = float(a), float(b)
  if b == 0:
    return 1.0 if a == 0 else math.inf
  return a / b


def _fmt_ratio(r) -> str:
  if r is None:
    return "—"
  return "∞" if math.isinf(r) else f"{r:.2f}×" if r < 100 else f"{r:.1e}×"


def _pct(v) -> str:
  return "—" if v in (None, "") else f"{100 * float(v):.0f}%"


def _err(v) -> str:
  if v in (None, ""):
    return "—"
  v = float(v)
  return "nan" if math.isnan(v) else f"{v:.0e}"


def _geomean(xs):
  xs = [x for x in xs if x is not None and x > 0]
  return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def _ms_spread(row) -> str:
  if row is None:
    return "—"
  if row.get("error") and row.get("median_ms") in (None, ""):
    return "failed"
  return f"{_ms(row.get('median_ms'))} ({_ms(row.get('p20_ms'))}–{_ms(row.get('p80_ms'))})"


def time_ratio(ours: dict | None, peer: dict | None) -> float | None:
  """jaxactv / peer: the median of the per-round ratios, else the ratio of the medians."""
  if ours is None:
    return None
  if ours.get("ratio") not in (None, ""):
    return float(ours["ratio"])
  return None if peer is None else _ratio(ours.get("median_ms"), peer.get("median_ms"))


def _ratio_spread(ours: dict | None, peer: dict | None) -> str:
  r = time_ratio(ours, peer)
  if r is None:
    return "—"
  if ours.get("ratio_p20") in (None, ""):
    return _fmt_ratio(r)
  return f"{_fmt_ratio(r)} ({float(ours['ratio_p20']):.2f}–{float(ours['ratio_p80']):.2f})"


def group_cases(rows):
  """``{(op, mode, shape, dtype): {impl: row}}`` in run order."""
  cases: dict[tuple, dict] = {}
  for row in rows:
    key = (row["op"], row["mode"], row["shape"], row["dtype"])
    cases.setdefault(key, {})[row["impl"]] = row
  return cases


def peer_of(impls: dict) -> str | None:
  names = [n for n in impls if n not in (OURS, NAIVE, COPY)]
  return names[0] if names else None


def write_markdown(rows, path: Path, machine: dict, sweep: Sweep, wall_s: float) -> None:
  cases = group_cases(rows)
  lines = [
      "# jaxactv benchmark results",
      "",
      f"Machine: backend `{machine['backend']}`, device {machine['device']}, "
      f"{platform.system()} {platform.machine()}, Python {platform.python_version()}; "
      f"jax {machine['jax_version']}, jaxactv {machine['jaxactv_version']}, "
      f"optax {optax.__version__}. Date {machine['timestamp']}; sweep `{sweep.name}`, "
      f"{wall_s / 60:.1f} min; allocator {machine.get('allocator', 'system default')}.",
      "",
      "Times are the median (20th–80th percentile) in ms over interleaved rounds after "
      "warm-up. **time ratio = jaxactv / peer**: jaxactv and its peer are called back to "
      "back in every round, and the ratio is the median (20th–80th percentile) of the "
      "per-round ratios, so load that hits a round hits both (below 1: jaxactv is faster "
      "or smaller). *temp* is `compiled.memory_analysis().temp_size_in_bytes`. *% of copy* "
      "is the effective bandwidth (bytes that must move at least once / median time) over "
      "that of a plain copy of as many bytes timed in the same rounds (into a donated "
      "buffer, so the copy pays no allocation). *rel err* is "
      "max |out − ref| / max |ref| against a float64 NumPy reference on the same input "
      "(fwd: the output; fwd+bwd: the gradient with respect to the first input).",
      "",
      "## Summary per op, mode and dtype",
      "",
      "*time ratio*: geometric mean over the shapes of each shape's time ratio "
      "(min–max over the shapes). *temp ratio*: jaxactv's temp bytes summed over the "
      "shapes / the peer's (a sum, so that a few bytes of per-row scalars do not swamp it), "
      "with both sums.",
      "",
      "| op | mode | dtype | time ratio (min–max) | temp ratio | temp jaxactv / peer |",
      "|---|---|---|---|---|---|",
  ]
  summary: dict[tuple, dict] = {}
  for (op, mode, _shape, dtype), impls in cases.items():
    peer = peer_of(impls)
    ours = impls.get(OURS)
    if ours is None or peer is None:
      continue
    s = summary.setdefault((op, mode, dtype), {"t": [], "ours": [], "peer": []})
    s["t"].append(time_ratio(ours, impls[peer]))
    if ours.get("temp_bytes") not in (None, "") and impls[peer].get("temp_bytes") not in (None, ""):
      s["ours"].append(float(ours["temp_bytes"]))
      s["peer"].append(float(impls[peer]["temp_bytes"]))
  for (op, mode, dtype), s in summary.items():
    ok = [x for x in s["t"] if x is not None and x > 0]
    g = _geomean(ok)
    t_cell = "—" if g is None else f"{g:.2f}× ({min(ok):.2f}–{max(ok):.2f})"
    m_cell = _fmt_ratio(_mem_ratio(sum(s["ours"]), sum(s["peer"]))) if s["ours"] else "—"
    sums = f"{_bytes(sum(s['ours']))} / {_bytes(sum(s['peer']))}" if s["ours"] else "—"
    lines.append(f"| {op} | {mode} | {dtype} | {t_cell} | {m_cell} | {sums} |")

  by_op: dict[str, list] = {}
  for key, impls in cases.items():
    by_op.setdefault(key[0], []).append((key, impls))
  for op, items in by_op.items():
    peer = peer_of(items[0][1])
    has_naive = any(NAIVE in impls for _, impls in items)
    lines += ["", f"## {op} (peer: `{peer}`)", ""]
    if op == "softmax" and has_naive:
      lines += [
          "*naive* is the textbook `exp(x) / sum(exp(x))`: it overflows to inf/NaN as "
          "soon as a logit exceeds ~88 in float32 (the benchmark's logits are 2·N(0, 1), so "
          "it survives here), and its bfloat16 version computes in bfloat16.",
          "",
      ]
    if op == LINEAR_OP:
      lines += [
          "Shape is tokens × hidden × classes. The peer materialises the "
          "`[tokens, classes]` logits (`x @ w`, then optax); jaxactv never does, so the "
          "temp-bytes ratio is the point of this op.",
          "",
      ]
    head = ["mode", "shape", "dtype", "jaxactv ms", f"{peer} ms", "time ratio",
            "jaxactv temp", "peer temp", "temp ratio", "% of copy (ours / peer)",
            "rel err (ours / peer)"]  # fmt: skip
    if has_naive:
      head += ["naive ms", "naive rel err"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (_op, mode, shape, dtype), impls in items:
      ours, other = impls.get(OURS), impls.get(peer)
      get = lambda r, k: None if r is None else r.get(k)
      cells = [
          mode, shape, dtype, _ms_spread(ours), _ms_spread(other),
          _ratio_spread(ours, other),
          _bytes(get(ours, "temp_bytes")), _bytes(get(other, "temp_bytes")),
          _fmt_ratio(_mem_ratio(get(ours, "temp_bytes"), get(other, "temp_bytes"))),
          f"{_pct(get(ours, 'roofline_fraction'))} / {_pct(get(other, 'roofline_fraction'))}",
          f"{_err(get(ours, 'rel_err'))} / {_err(get(other, 'rel_err'))}",
      ]  # fmt: skip
      if has_naive:
        naive = impls.get(NAIVE)
        cells += [
            "—" if naive is None else _ms_spread(naive),
            "—" if naive is None else _err(naive.get("rel_err")),
        ]
      lines.append("| " + " | ".join(cells) + " |")
  errors = [r for r in rows if r.get("error")]
  if errors:
    lines += ["", "## Errors", ""]
    lines += [f"- {r['op']} {r['mode']} {r['shape']} {r['dtype']} {r['impl']}: {r['error']}"
              for r in errors]
  path.write_text("\n".join(lines) + "\n")


PLOT_OPS = (
    ("softmax", "tab:blue"),
    ("softmax_cross_entropy_with_integer_labels", "tab:orange"),
    ("sigmoid_binary_cross_entropy", "tab:purple"),
    (LINEAR_OP, "tab:green"),
)
PLOT_DTYPES = ("float32", "bfloat16")


def write_plot(rows, path: Path, machine: dict) -> None:
  """Time and temp bytes of forward + backward against the number of classes.

  One row of panels per dtype: time on the left, temp bytes on the right; one
  colour per op, jaxactv solid with filled markers, its peer dashed with open ones.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  cases = group_cases(rows)
  dtypes = [d for d in PLOT_DTYPES if any(k[3] == d for k in cases)] or [PLOT_DTYPES[0]]
  fig, axes = plt.subplots(
      len(dtypes), 2, figsize=(11, 0.6 + 3.4 * len(dtypes)), squeeze=False,
      constrained_layout=True,
  )  # fmt: skip
  shown_ops = []
  for (ax_t, ax_m), dtype in zip(axes, dtypes, strict=True):
    for op, color in PLOT_OPS:
      items = [v for k, v in cases.items() if k[0] == op and k[1] == "fwd+bwd" and k[3] == dtype]
      if not items:
        continue
      if op not in shown_ops:
        shown_ops.append(op)
      for impl, style in ((OURS, "-"), (peer_of(items[0]), "--")):
        pts = sorted(
            (int(v[impl]["classes"]), v[impl].get("median_ms"), v[impl].get("temp_bytes"))
            for v in items if impl in v
        )
        kw = dict(color=color, ls=style, marker="o", ms=5, lw=1.6,
                  mfc=color if impl == OURS else "white")
        xs_t = [(c, t) for c, t, _ in pts if t not in (None, "")]
        # A temp size of 0 has no place on a log axis: it is drawn at 1 byte.
        xs_m = [(c, max(m, 1)) for c, _, m in pts if m not in (None, "")]
        if xs_t:
          ax_t.plot(*zip(*xs_t, strict=True), **kw)
        if xs_m:
          ax_m.plot(*zip(*xs_m, strict=True), **kw)
    for ax, what, unit in ((ax_t, "time", "median ms"), (ax_m, "XLA temp bytes", "temp bytes")):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("classes")
      ax.set_ylabel(unit)
      ax.set_title(f"{dtype}: {what}, forward + backward", fontsize=10)
      ax.grid(True, which="major", alpha=0.3)
    ax_m.set_yscale("log", base=2)
    ax_m.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=4, numticks=8))
    ax_m.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_m.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: _bytes(v).replace(".0 ", " "))
    )
  peers = {op: peer_of(next(v for k, v in cases.items() if k[0] == op)) for op in shown_ops}
  handles = [Line2D([], [], color=dict(PLOT_OPS)[op], lw=3, label=f"{op} (vs {peers[op]})")
             for op in shown_ops]
  handles += [
      Line2D([], [], color="k", ls="-", marker="o", label="jaxactv: solid, filled"),
      Line2D([], [], color="k", ls="--", marker="o", mfc="white", label="peer: dashed, open"),
  ]
  fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
  fig.suptitle(
      f"jaxactv vs peers on {machine['backend']}: {machine['device']}, "
      f"jax {machine['jax_version']}\n"
      "row-wise ops: rows × classes held constant; linear: tokens × hidden × classes",
      fontsize=10,
  )
  fig.savefig(path, dpi=80)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="a smaller sweep, under 2 min on 2 cores")
  p.add_argument("--tiny", action="store_true",
                 help="shrink the sweep to tiny shapes and 2 repeats (the test runs "
                 "--quick --tiny to keep the harness working)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
  p.add_argument("--ops", default=",".join(ALL_OPS), help="comma-separated ops to run")
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
  p.add_argument("--no-plot", action="store_true", help="skip the PNG")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds of timed rounds per case (default: the sweep's, 4 s full)")
  p.add_argument("--allocator", choices=("steady", "system"), default="steady",
                 help="steady (default): rerun under glibc settings that reuse freed "
                 "buffers, for ratios that repeat; system: malloc as it comes")
  args = p.parse_args(argv)
  args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
  args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  for o in args.ops:
    if o not in ALL_OPS:
      p.error(f"unknown op {o!r}; choose from {', '.join(ALL_OPS)}")
  for d in args.dtypes:
    if d not in DTYPES:
      p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
  return args


# glibc's malloc hands allocations above its threshold (128 KiB, raised as large blocks
# are freed, up to 32 MiB) to mmap and gives them back on free, so a call of a compiled
# function may take its outputs and temps as fresh pages from the kernel, and for which
# sizes it does drifts with the process's history. On a 2-core cloud VM, `x * 2` on
# 32 MiB took 12.4 ms that way against 1.9 ms with the buffers reused, and whole rows
# were bimodal from one process to the next. The sweep re-executes itself with these
# settings: no mmap, one arena, no trimming, so freed buffers are reused.
STEADY_MALLOC = (
    "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=4294967296"
)
STEADY_MARKER = "JAXACTV_BENCH_ALLOCATOR"  # set in the re-executed process


def use_steady_allocator(allocator: str) -> None:
  """Re-execute this process (same interpreter, flags and arguments) with ``STEADY_MALLOC``.

  For a script's own process only (``python benchmarks/run.py``, ``check.py``), on Linux
  with glibc; elsewhere, with ``--allocator system`` or once re-executed, it does
  nothing. Tunables the caller set are kept (ours come after, so they win).
  """
  if allocator != "steady" or os.environ.get(STEADY_MARKER) == "steady":
    return
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return
  tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), STEADY_MALLOC) if t)
  env = {**os.environ, "GLIBC_TUNABLES": tunables, STEADY_MARKER: "steady"}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def allocator_note() -> str:
  if os.environ.get(STEADY_MARKER) == "steady":
    return "steady (glibc: no mmap, one arena, no trimming)"
  return "system default"


def main(argv=None) -> int:
  args = parse_args(argv)
  if argv is None:  # the script itself, not a caller's process
    use_steady_allocator(args.allocator)
  sweep = SWEEPS["tiny" if args.tiny else "quick" if args.quick else "full"]
  if args.budget is not None:
    sweep = dataclasses.replace(sweep, budget_s=args.budget)
  args.out.mkdir(parents=True, exist_ok=True)
  machine = machine_info()
  specs = case_specs(sweep, args.ops, args.dtypes)
  print(f"jaxactv benchmarks: sweep {sweep.name}, {len(specs)} cases on "
        f"{machine['backend']} / {machine['device']}, jax {machine['jax_version']}, "
        f"allocator {machine['allocator']}", flush=True)
  start = time.perf_counter()
  rows: list[dict] = []
  csv_path = args.out / "results.csv"
  for i, (op, mode, shape, dtype) in enumerate(specs):
    t0 = time.perf_counter()
    try:
      case = make_case(op, mode, shape, dtype, sweep, seed=i)
      case_rows = measure(case, sweep, machine)
    except Exception as e:  # e.g. the inputs do not fit: record, carry on
      case_rows = [{"op": op, "impl": OURS, "mode": mode, "shape": "x".join(map(str, shape)),
                    "dtype": dtype, "classes": shape[-1], **machine, "error": _err_text(e)}]
    case = None
    gc.collect()
    rows += case_rows
    write_csv(rows, csv_path)  # after every case, so an interrupted run keeps its rows
    by = {r["impl"]: r for r in case_rows}
    peer = peer_of(by)
    ours = by.get(OURS, {})
    ratio = time_ratio(ours, by.get(peer))
    mem = _mem_ratio(ours.get("temp_bytes"), by.get(peer, {}).get("temp_bytes"))
    err = "; ".join(f"{r['impl']}: {r['error']}" for r in case_rows if r.get("error"))
    print(
        f"[{i + 1}/{len(specs)}] {op} {mode} {'x'.join(map(str, shape))} {dtype}: "
        f"jaxactv {_ms(ours.get('median_ms'))} ms, {peer} "
        f"{_ms(by.get(peer, {}).get('median_ms'))} ms, time {_fmt_ratio(ratio)}, "
        f"temp {_fmt_ratio(mem)} ({time.perf_counter() - t0:.1f} s)"
        + (f"  ERROR {err}" if err else ""),
        flush=True,
    )
  wall = time.perf_counter() - start
  write_markdown(rows, args.out / "results.md", machine, sweep, wall)
  if not args.no_plot:
    write_plot(rows, args.out / "results.png", machine)
  print(f"done in {wall:.0f} s: wrote {csv_path}, results.md"
        + ("" if args.no_plot else ", results.png"), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
