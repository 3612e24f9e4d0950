"""Run two Python processes that join as one JAX job on loopback (not collected).

``run(script_args, tmp_path)`` starts ``python *script_args PORT PROCESS_ID`` for
process ids 0 and 1 with a free coordinator port, 4 host CPU devices each and gloo
CPU collectives, waits at most ``deadline_s``, always reaps both, and returns their
exit codes and outputs. One process failing leaves the other waiting in a
collective: both are stopped then.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(script_args, tmp_path, deadline_s=110, env_extra=None):
  port = free_port()
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
  })
  env.update(env_extra or {})
  logs = [Path(tmp_path) / f"process{i}.log" for i in range(2)]
  procs = []
  try:
    for i, log in enumerate(logs):
      env_i = dict(env, COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID=str(i))
      with open(log, "w") as out:
        procs.append(subprocess.Popen(
            [sys.executable, *map(str, script_args), str(port), str(i)], stdout=out,
            stderr=subprocess.STDOUT, env=env_i, cwd=tmp_path))
    start = time.monotonic()
    while any(p.poll() is None for p in procs):
      if time.monotonic() - start > deadline_s or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [log.read_text() for log in logs]
  return [p.returncode for p in procs], outputs


def report(codes, outputs) -> str:
  return "\n".join(f"--- process {i} (exit {c}):\n{o[-3000:]}"
                   for i, (c, o) in enumerate(zip(codes, outputs, strict=True)))
