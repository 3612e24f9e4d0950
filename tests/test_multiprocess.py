"""Two JAX processes on loopback, as a two-host job runs: the vocab-parallel losses
across process boundaries (the worker, tests/multiprocess_worker.py, does the checks).

The test always reaps both children, and fails (never hangs) within 2 minutes.
"""

from __future__ import annotations

from pathlib import Path

import two_processes

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def test_two_processes_on_loopback_match_one_process(tmp_path):
  codes, outputs = two_processes.run([WORKER], tmp_path)
  report = two_processes.report(codes, outputs)
  assert codes == [0, 0], report
  for i, out in enumerate(outputs):
    assert f"process {i}: done" in out, report
    # Both meshes, both losses, every value and gradient.
    assert out.count(" ok") == 10, report
