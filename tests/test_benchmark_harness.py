"""benchmarks/run.py --quick keeps working, on tiny shapes: every op, both modes and dtypes.

Not a timed test: nothing here asserts how fast anything is. It runs the script
the way a user does (a subprocess, on CPU) and checks that the CSV has its
columns and a row per implementation, and that the table and the plot exist.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"

REQUIRED_COLUMNS = {
    "op", "impl", "mode", "shape", "dtype", "backend", "device", "median_ms", "p20_ms",
    "p80_ms", "compile_ms", "temp_bytes", "bytes_moved", "gbps", "roofline_fraction",
    "rel_err", "jax_version", "timestamp",
}  # fmt: skip
OPS = {
    "softmax", "log_softmax", "sigmoid", "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "linear_softmax_cross_entropy",
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

  table = (tmp_path / "results.md").read_text()
  assert "jaxactv / peer" in table and "linear_softmax_cross_entropy" in table
  assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
