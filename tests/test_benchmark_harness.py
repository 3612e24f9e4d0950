"""benchmarks/run.py --quick keeps working, on tiny shapes: every op, both modes and dtypes.

Not a timed test: nothing here asserts how fast anything is. It runs the script
the way a user does (a subprocess, on CPU) and checks that the CSV has its
columns and a row per implementation, and that the table and the plot exist.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"

REQUIRED_COLUMNS = {
    "op", "impl", "mode", "shape", "dtype", "backend", "device", "median_ms", "p20_ms",
    "p80_ms", "compile_ms", "temp_bytes", "bytes_moved", "gbps", "roofline_fraction",
    "rel_err", "jax_version", "timestamp", "ratio", "ratio_p20", "ratio_p80",
}  # fmt: skip
OPS = {
    "softmax", "log_softmax", "sigmoid", "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "kl_divergence_from_logits",
    "entropy_from_logits", "linear_softmax_cross_entropy",
}  # fmt: skip
PEERS = {"jax.nn", "optax", "x@w+optax"}


def _run_tiny(out: Path) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users have
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--tiny", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip


def test_tiny_run_writes_csv_table_and_plot(tmp_path):
  proc = _run_tiny(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

  with open(tmp_path / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows
  assert REQUIRED_COLUMNS <= set(rows[0]), REQUIRED_COLUMNS - set(rows[0])
  assert {r["op"] for r in rows} == OPS
  assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
  assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
  assert [r for r in rows if r["error"]] == []
  if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
    # The sweep re-executed itself with the allocator settings that make ratios repeat.
    assert all(r["allocator"].startswith("steady") for r in rows), rows[0]["allocator"]

  cases: dict[tuple, dict] = {}
  for r in rows:
    cases.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), {})[r["impl"]] = r
  for key, impls in cases.items():
    assert "jaxactv" in impls and "copy" in impls and PEERS & set(impls), key
    for impl, r in impls.items():
      # Present and well formed, not fast: no bound on any time.
      assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), (key, impl)
      assert int(r["bytes_moved"]) > 0 and r["temp_bytes"] != "", (key, impl)
    # The float64 reference and the output it is compared with line up (fwd: the
    # value, fwd+bwd: the gradient): a mismatch would show as an O(1) error.
    assert float(impls["jaxactv"]["rel_err"]) < 0.05, key
    # The per-round ratio against the peer comes with its spread.
    ours = impls["jaxactv"]
    assert float(ours["ratio_p20"]) <= float(ours["ratio"]) <= float(ours["ratio_p80"]), key

  table = (tmp_path / "results.md").read_text()
  assert "jaxactv / peer" in table and "linear_softmax_cross_entropy" in table
  assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ benchmarks/check.py


def _load_check():
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_check", ROOT / "benchmarks" / "check.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _rows(op, mode, dtype, peer, ratios, temps=None, backend="cpu"):
  rows = []
  for i, r in enumerate(ratios):
    linear = op == "linear_softmax_cross_entropy"
    shape = f"8x8x{1 << (15 + i)}" if linear else f"{64 >> i}x{32768 << i}"
    t_ours, t_peer = (temps[i] if temps else (0, 0))
    common = {"op": op, "mode": mode, "dtype": dtype, "shape": shape, "backend": backend}
    rows.append({**common, "impl": "jaxactv", "ratio": str(r), "ratio_p20": str(0.9 * r),
                 "ratio_p80": str(1.1 * r), "median_ms": "1", "temp_bytes": str(t_ours)})
    rows.append({**common, "impl": peer, "median_ms": "1", "temp_bytes": str(t_peer)})
  return rows


def test_check_judges_geomean_worst_shape_and_the_special_targets():
  check = _load_check()
  rows = (
      _rows("softmax", "fwd", "float32", "jax.nn", [0.9, 1.05])  # geomean 0.97, max 1.05: ok
      + _rows("softmax", "fwd+bwd", "float32", "jax.nn", [0.5, 1.2])  # max 1.2 > 1.10: MISS
      + _rows("log_softmax", "fwd", "float32", "jax.nn", [1.04, 1.02])  # geomean > 1: MISS
      + _rows("sigmoid_binary_cross_entropy", "fwd+bwd", "float32", "optax", [0.55, 0.62])
      + _rows("linear_softmax_cross_entropy", "fwd+bwd", "float32", "x@w+optax", [1.05, 1.05],
              temps=[(10, 100), (20, 100)])  # time ok; temp 0.1 ok, 0.2 MISS
  )
  targets = {t.name.split(":")[0]: t for t in check.evaluate(rows) if "geomean" in t.name}
  assert targets["softmax fwd float32"].ok is True
  assert "geomean 0.97x, max 1.05x" in targets["softmax fwd float32"].measured
  assert targets["softmax fwd+bwd float32"].ok is False
  assert targets["log_softmax fwd float32"].ok is False
  bce = [t for t in check.evaluate(rows) if "0.60x optax" in t.name]
  assert [t.ok for t in bce] == [False]  # 0.62 at one shape
  linear = [t for t in check.evaluate(rows) if "unfused" in t.name]
  assert [t.ok for t in linear] == [True, False]
  for t in check.evaluate(rows):
    if t.ok is not None:
      assert t.line().startswith("ok" if t.ok else "MISS"), t.line()


def test_check_leaves_the_gpu_bandwidth_target_to_a_gpu():
  check = _load_check()
  rows = _rows("softmax", "fwd+bwd", "float32", "jax.nn", [0.9, 0.9])
  for r in rows:
    r["roofline_fraction"] = "0.5"
  gpu = [t for t in check.evaluate(rows) if "bandwidth" in t.name]
  assert len(gpu) == 1 and gpu[0].ok is None and gpu[0].line().startswith("n/a")
  for r in rows:
    r["backend"] = "gpu"
  gpu = [t for t in check.evaluate(rows) if "bandwidth" in t.name]
  assert gpu[0].ok is False  # 50% < 80%


def test_check_stability_compares_two_runs_shape_by_shape():
  check = _load_check()
  first = _rows("softmax", "fwd", "float32", "jax.nn", [1.00, 0.50])
  steady = _rows("softmax", "fwd", "float32", "jax.nn", [1.04, 0.48])  # 3.8% and 4.2%
  moved = _rows("softmax", "fwd", "float32", "jax.nn", [1.00, 0.55])  # 0.50 vs 0.55: 9.1%
  ok = check.stability(first, steady)
  assert ok.ok is True and ok.measured.startswith("2 of 2 shapes within"), ok.measured
  miss = check.stability(first, moved)
  assert miss.ok is False and miss.measured.startswith("1 of 2 shapes within"), miss.measured
  assert "9.1%" in miss.measured and "0.50x vs 0.55x" in miss.measured
  assert check.stability(first, []).ok is False  # nothing to compare is not a pass
  half = check.stability(first, steady[:2])  # the second run lost a shape
  assert half.ok is False and half.measured.startswith("1 of 2 shapes within"), half.measured
